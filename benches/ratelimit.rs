//! How well meterflow paces itself against a provider's rate limit:
//! `cargo bench --bench ratelimit [-- --quick] [SCENARIO...]`.
//!
//! Each scenario runs the real pipeline (librdkafka's mock cluster → pipeline → billwerk
//! emulator) with enough pre-produced events that the provider's limit, not the supply, is the
//! bottleneck. The figures come from the emulator's own per-window tallies, not from meterflow:
//! the first window in which a usage record is stored is the warm-up (meterflow discovers the
//! limit there) and is reported apart; the measured windows are the whole windows after it.
//!
//! Flags: `--quick` (5 measured windows instead of 10), `--windows N`, `--limit N` (per window),
//! `--window 1s`, `--headroom F` (overrides `[rate_limit] headroom`), `--concurrency N`,
//! `--list`. Positional arguments select scenarios whose name contains them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use meterflow::config::builder::ConfigBuilder;
use meterflow::emulator::billwerk::{self, BillwerkEmulator, BillwerkOptions};
use meterflow::emulator::ratelimit::WindowTally;
use meterflow::emulator::RateLimitSettings;
use meterflow::pipeline::{self, RunStats};

const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";
const COMPONENT: &str = "5ce53069443e551b9caccc64";
const PARTITIONS: i32 = 4;

#[derive(Debug, Clone)]
struct Settings {
    windows: usize,
    limit: u32,
    window: Duration,
    headroom: Option<f64>,
    concurrency: usize,
}

#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    about: &'static str,
    headers: bool,
    retry_after: bool,
    reset_header: bool,
    /// `[rate_limit] limit` as a multiple of the emulator's limit (None: not configured).
    configured_limit: Option<f64>,
    replicas: usize,
    /// Halve the limit this many measured windows in, half-way through a window.
    halve_after: Option<usize>,
    target: Target,
}

/// What issue 4 asks of a scenario.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Utilisation at least this (%), 429s at most this share of requests (%).
    Pace {
        utilisation: f64,
        refused: f64,
    },
    /// 429s come in at most this many episodes (one sink-wide pause each) per window.
    Episodes(usize),
    None,
}

impl Scenario {
    const fn new(name: &'static str, about: &'static str) -> Self {
        Scenario {
            name,
            about,
            headers: true,
            retry_after: false,
            reset_header: false,
            configured_limit: None,
            replicas: 1,
            halve_after: None,
            target: Target::Pace {
                utilisation: 99.0,
                refused: 0.5,
            },
        }
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("fixed", "X-RateLimit headers, fixed limit"),
        Scenario {
            halve_after: Some(3),
            ..Scenario::new("halve", "the limit halves mid-window (set_limit)")
        },
        Scenario {
            retry_after: true,
            ..Scenario::new("retry-after", "headers + Retry-After on 429")
        },
        Scenario {
            reset_header: true,
            ..Scenario::new("reset-header", "headers + X-RateLimit-Reset")
        },
        Scenario {
            headers: false,
            configured_limit: Some(1.0),
            ..Scenario::new(
                "no-headers",
                "no headers, [rate_limit] limit = the real one",
            )
        },
        Scenario {
            headers: false,
            configured_limit: Some(1.2),
            target: Target::Episodes(2),
            ..Scenario::new(
                "no-headers-over",
                "no headers, [rate_limit] limit 20% too high",
            )
        },
        Scenario {
            headers: false,
            retry_after: true,
            configured_limit: Some(1.2),
            target: Target::None,
            ..Scenario::new(
                "retry-after-over",
                "no headers, Retry-After on 429, limit 20% too high",
            )
        },
        Scenario {
            replicas: 2,
            target: Target::Pace {
                utilisation: 97.0,
                refused: 1.0,
            },
            ..Scenario::new("two-replicas", "two pipelines, one group, one budget")
        },
    ]
}

/// Sums over a run of windows.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    windows: usize,
    budget: u64,
    admitted: u64,
    refused: u64,
}

impl Totals {
    fn add(&mut self, t: &WindowTally) {
        self.windows += 1;
        self.budget += u64::from(t.limit);
        self.admitted += u64::from(t.admitted);
        self.refused += u64::from(t.refused);
    }
    fn requests(&self) -> u64 {
        self.admitted + self.refused
    }
    fn utilisation(&self) -> f64 {
        100.0 * self.admitted as f64 / (self.budget.max(1)) as f64
    }
    fn refused_share(&self) -> f64 {
        100.0 * self.refused as f64 / (self.requests().max(1)) as f64
    }
}

struct Outcome {
    scenario: Scenario,
    warm_up: WindowTally,
    measured: Vec<WindowTally>,
    /// For `halve`: the measured windows before the change.
    before_change: Vec<WindowTally>,
    delivered: Vec<u64>,
    records: u64,
    answers_2xx: u64,
    duplicates: u64,
    elapsed: Duration,
}

fn main() -> anyhow::Result<()> {
    // `RUST_LOG=meterflow=debug` shows the pipelines' own log (timestamps to match windows).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut settings = Settings {
        windows: 10,
        limit: 2000,
        window: Duration::from_secs(1),
        headroom: None,
        concurrency: 32,
    };
    let mut selected = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        match arg.as_str() {
            "--bench" => {} // cargo bench passes it
            "--quick" => settings.windows = 5,
            "--windows" => settings.windows = value("--windows")?.parse()?,
            "--limit" => settings.limit = value("--limit")?.parse()?,
            "--window" => settings.window = humantime::parse_duration(&value("--window")?)?,
            "--headroom" => settings.headroom = Some(value("--headroom")?.parse()?),
            "--concurrency" => settings.concurrency = value("--concurrency")?.parse()?,
            "--list" => {
                for s in scenarios() {
                    println!("{:<16} {}", s.name, s.about);
                }
                return Ok(());
            }
            other if other.starts_with("--") => anyhow::bail!("unknown flag {other}"),
            other => selected.push(other.to_string()),
        }
    }
    let chosen: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| selected.is_empty() || selected.iter().any(|f| s.name.contains(f.as_str())))
        .collect();
    if chosen.is_empty() {
        anyhow::bail!("no scenario matches {selected:?} (see --list)");
    }
    meterflow::telemetry::init_logging(&meterflow::config::LogConfig {
        format: meterflow::config::LogFormat::Text,
        level: "error,rdkafka::client=off,librdkafka=off".into(),
    });
    let _ = meterflow::telemetry::metrics_handle();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!(
        "rate-limit pacing: limit {} per {}, {} measured windows after a warm-up window, \
         {PARTITIONS} partitions, concurrency {}, headroom {}; load before: {}",
        settings.limit,
        humantime::format_duration(settings.window),
        settings.windows,
        settings.concurrency,
        settings
            .headroom
            .map_or("default".to_string(), |h| h.to_string()),
        load_average(),
    );
    let mut outcomes = Vec::new();
    for scenario in chosen {
        eprintln!("… {}: {}", scenario.name, scenario.about);
        let outcome = runtime.block_on(run(&settings, scenario))?;
        print_details(&settings, &outcome);
        outcomes.push(outcome);
    }
    println!();
    print_table(&settings, &outcomes);
    println!("load after: {}", load_average());
    Ok(())
}

async fn run(settings: &Settings, scenario: Scenario) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let cluster = MockCluster::new(1)?;
    cluster.create_topic("usage", PARTITIONS, 1)?;
    cluster.create_topic("usage-dlq", 1, 1)?;
    let brokers = cluster.bootstrap_servers();

    // Enough events that the sink is never starved: the fastest plausible pace over the run,
    // plus time to join the group.
    let per_second = f64::from(settings.limit) / settings.window.as_secs_f64()
        * scenario.configured_limit.unwrap_or(1.0).max(1.0);
    let run_seconds = settings.window.as_secs_f64() * (settings.windows as f64 + 3.0) + 5.0;
    let events = (per_second * run_seconds * 1.2) as usize;
    produce(&brokers, events).await?;
    eprintln!(
        "  produced {events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let limit = RateLimitSettings {
        limit: settings.limit,
        window: settings.window,
        headers: scenario.headers,
        retry_after: scenario.retry_after,
        reset_header: scenario.reset_header,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let emulator = billwerk::start(
        BillwerkOptions::default()
            .with_contract("bench", CONTRACT)
            .with_limit(limit.clone()),
        listener,
    )
    .await?;

    let configured = scenario
        .configured_limit
        .map(|share| (f64::from(settings.limit) * share).round() as u32);
    let stats: Vec<Arc<RunStats>> = (0..scenario.replicas)
        .map(|_| Arc::new(RunStats::default()))
        .collect();
    let mut stops = Vec::new();
    let mut pipelines = Vec::new();
    for s in &stats {
        let config = config(&brokers, &emulator.base_url(), settings, configured).build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        pipelines.push(tokio::spawn(pipeline::run(config, s.clone(), async {
            let _ = stopped.await;
        })));
    }

    // The warm-up window: the first in which a usage record was stored. Not the first with an
    // answer: meterflow's start-up requests are answered before the consumer group has its
    // partitions (the mock cluster's first assignment takes ~3 s), and counting from them put
    // the join into the first measured windows (0 %, 0 %, then 99 %).
    let deadline = Instant::now() + Duration::from_secs(30);
    let warm_up_start = loop {
        if emulator.stats().records > 0 {
            if let Some(current) = emulator.windows().last() {
                break current.started;
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{}: no usage record reached the emulator in 30 s",
                scenario.name
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let window = settings.window;
    let mut before_change_starts = Vec::new();
    let mut change_at = None;
    let measured_starts: Vec<Instant> = match scenario.halve_after {
        None => (1..=settings.windows)
            .map(|i| warm_up_start + window * i as u32)
            .collect(),
        Some(k) => {
            before_change_starts = (1..=k).map(|i| warm_up_start + window * i as u32).collect();
            let at = warm_up_start + window * (k as u32 + 1) + window / 2;
            sleep_until(at).await;
            emulator.set_limit(RateLimitSettings {
                limit: settings.limit / 2,
                ..limit.clone()
            })?;
            change_at = Some(at);
            // The emulator starts a fresh window at the change (found exactly below).
            (0..settings.windows)
                .map(|i| at + window * i as u32)
                .collect()
        }
    };
    let end = *measured_starts.last().expect("windows ≥ 1") + window + Duration::from_millis(20);
    sleep_until(end).await;

    let tallies = emulator.windows();
    let measured_starts = match change_at {
        None => measured_starts,
        Some(at) => {
            // The new windows are anchored where the emulator took the change, a little after
            // `at`: find that anchor from the first new window that saw answers.
            let first = tallies
                .iter()
                .find(|t| t.started >= at)
                .ok_or_else(|| anyhow::anyhow!("no answer after the limit change"))?;
            let skipped = ((first.started - at).as_secs_f64() / window.as_secs_f64()).floor();
            let anchor = first.started - window * skipped as u32;
            (0..settings.windows)
                .map(|i| anchor + window * i as u32)
                .collect()
        }
    };
    let find = |start: Instant| find_window(&tallies, start, window);
    let warm_up = find(warm_up_start);
    let measured: Vec<WindowTally> = measured_starts.iter().map(|&s| find(s)).collect();
    let before_change: Vec<WindowTally> = before_change_starts.iter().map(|&s| find(s)).collect();

    let stopping = Instant::now();
    for stop in stops {
        let _ = stop.send(());
    }
    for p in pipelines {
        match tokio::time::timeout(Duration::from_secs(30), p).await {
            Ok(joined) => joined??,
            Err(_) => anyhow::bail!("{}: a pipeline did not stop within 30 s", scenario.name),
        }
    }
    eprintln!("  stopped in {:.1} s", stopping.elapsed().as_secs_f64());
    let s = emulator.stats();
    let answers_2xx = s
        .answers_by_status
        .iter()
        .filter(|(status, _)| (200..300).contains(*status))
        .map(|(_, n)| n)
        .sum();
    let outcome = Outcome {
        warm_up,
        measured,
        before_change,
        delivered: stats
            .iter()
            .map(|s| s.delivered.load(Ordering::Relaxed))
            .collect(),
        records: s.records,
        answers_2xx,
        duplicates: s.duplicate_keys,
        elapsed: started.elapsed(),
        scenario,
    };
    emulator_shutdown(emulator).await;
    drop(cluster);
    Ok(outcome)
}

async fn emulator_shutdown(emulator: BillwerkEmulator) {
    emulator.shutdown().await;
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}

/// The tally of the window starting at `start` (an empty one if it saw no answer).
fn find_window(tallies: &[WindowTally], start: Instant, window: Duration) -> WindowTally {
    let near = |t: &&WindowTally| {
        let d = if t.started > start {
            t.started - start
        } else {
            start - t.started
        };
        d < Duration::from_micros(100)
    };
    tallies.iter().find(near).cloned().unwrap_or(WindowTally {
        started: start,
        length: window,
        limit: tallies.last().map_or(0, |t| t.limit),
        admitted: 0,
        refused: 0,
        refused_at: Vec::new(),
        ended_early: false,
    })
}

async fn produce(brokers: &str, events: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?;
    let payloads: Vec<(String, Vec<u8>)> = (0..events)
        .map(|i| {
            let payload = format!(
                r#"{{"id":"evt_bench_{i:08}","contract_id":"{CONTRACT}","metric":"api_calls","quantity":{},"timestamp":"2026-11-20T10:15:00Z"}}"#,
                i % 97 + 1
            );
            (format!("k{i}"), payload.into_bytes())
        })
        .collect();
    // `send_result` enqueues at once (`send` only when its future is polled: one linger wait
    // per message when awaited in turn).
    for (c, chunk) in payloads.chunks(5000).enumerate() {
        let mut pending = Vec::with_capacity(chunk.len());
        for (i, (key, payload)) in chunk.iter().enumerate() {
            let record = FutureRecord::to("usage")
                .payload(payload)
                .key(key)
                .partition(((c * 5000 + i) % PARTITIONS as usize) as i32);
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => anyhow::bail!("cannot enqueue an event: {e}"),
            }
        }
        for f in pending {
            f.await?.map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

fn config(
    brokers: &str,
    base_url: &str,
    settings: &Settings,
    configured_limit: Option<u32>,
) -> ConfigBuilder {
    let config = ConfigBuilder::new()
        .brokers(brokers)
        .group_id("meterflow-bench")
        .topic("usage")
        .dead_letter_topic("usage-dlq")
        .session_timeout(Duration::from_secs(6))
        .drain_timeout(Duration::from_secs(1))
        .commit_interval(Duration::from_millis(200))
        .kafka_property("fetch.wait.max.ms", "10")
        .billwerk(
            base_url,
            billwerk::DEFAULT_CLIENT_ID,
            billwerk::DEFAULT_CLIENT_SECRET,
        )
        .concurrency(settings.concurrency)
        // Every event bills one contract: its share is the whole concurrency (the default, a
        // quarter, held the pipeline to 55 % of the budget, below what the limit allows).
        .concurrency_per_contract(settings.concurrency)
        .request_timeout(Duration::from_secs(2))
        .rate_window(settings.window)
        .rate_limit(configured_limit)
        .backoff(Duration::from_millis(50), Duration::from_secs(1))
        .component("api_calls", COMPONENT)
        // The events carry a fixed timestamp (2026-11-20): no age bound.
        .max_age(Duration::ZERO)
        .ledger_url("none")
        .admin_listen("");
    match settings.headroom {
        Some(h) => config.headroom(h),
        None => config,
    }
}

/// 429 episodes in a window: refusals less than 20 ms apart belong to one episode (the
/// requests already in flight when the first 429 came back).
fn episodes(t: &WindowTally) -> usize {
    let mut n = 0;
    let mut last: Option<Duration> = None;
    for &at in &t.refused_at {
        if last.is_none_or(|l| at.saturating_sub(l) > Duration::from_millis(20)) {
            n += 1;
        }
        last = Some(at);
    }
    n
}

fn series(windows: &[WindowTally]) -> String {
    windows
        .iter()
        .map(|t| {
            let util = 100.0 * f64::from(t.admitted) / f64::from(t.limit.max(1));
            if t.refused > 0 {
                format!("{util:.1}%/{}×429({} ep)", t.refused, episodes(t))
            } else {
                format!("{util:.1}%")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_details(settings: &Settings, o: &Outcome) {
    let _ = settings;
    println!("{} — {}", o.scenario.name, o.scenario.about);
    // Wall-clock time of the warm-up window's start, to find a window in meterflow's logs.
    let began = chrono::Utc::now()
        - chrono::Duration::from_std(o.warm_up.started.elapsed()).unwrap_or_default();
    println!(
        "  warm-up window: {} × 2xx, {} × 429 (limit {}), began {}",
        o.warm_up.admitted,
        o.warm_up.refused,
        o.warm_up.limit,
        began.format("%H:%M:%S%.3f")
    );
    if !o.before_change.is_empty() {
        println!(
            "  before the change (limit {}): {}",
            o.before_change[0].limit,
            series(&o.before_change)
        );
        println!(
            "  after the change (limit {}):  {}",
            o.measured[0].limit,
            series(&o.measured)
        );
    } else {
        println!("  per window (util / 429s): {}", series(&o.measured));
    }
    println!(
        "  whole run: {} records, {} × 2xx, {} billed twice, delivered per replica {:?}, {:.1} s",
        o.records,
        o.answers_2xx,
        o.duplicates,
        o.delivered,
        o.elapsed.as_secs_f64()
    );
}

fn print_table(settings: &Settings, outcomes: &[Outcome]) {
    println!(
        "| scenario | windows | budget | requests | 2xx | 429s | utilisation | 429 % | warm-up 2xx / 429s | events delivered | duration | target |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for o in outcomes {
        let mut t = Totals::default();
        for w in &o.measured {
            t.add(w);
        }
        let target = match o.scenario.target {
            Target::Pace {
                utilisation,
                refused,
            } => format!(
                "≥ {utilisation} %, ≤ {refused} % 429s: {}",
                met(t.utilisation() >= utilisation && t.refused_share() <= refused)
            ),
            Target::Episodes(most) => format!(
                "≤ {most} pauses a window: {}",
                met(o.measured.iter().all(|w| episodes(w) <= most))
            ),
            Target::None => "—".to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} % | {:.2} % | {} / {} | {} | {:.1} s | {target} |",
            o.scenario.name,
            t.windows,
            t.budget,
            t.requests(),
            t.admitted,
            t.refused,
            t.utilisation(),
            t.refused_share(),
            o.warm_up.admitted,
            o.warm_up.refused,
            o.delivered.iter().sum::<u64>(),
            settings.window.as_secs_f64() * t.windows as f64,
        );
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
