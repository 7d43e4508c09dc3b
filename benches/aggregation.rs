//! Events per request and events per second: billwerk with pre-aggregation on and off (with a
//! realistic rate limit and without any), and Billingrails with batches of 100.
//!
//! ```sh
//! cargo bench --bench aggregation                      # every case, 50 000 events each
//! cargo bench --bench aggregation -- --events 50000 --only billingrails
//! cargo bench --bench aggregation -- --only billingrails --billingrails-url http://127.0.0.1:18091/v1
//! ```
//!
//! Each case: generated events (the demo's generator: 6 contracts, 3 metrics, timestamps over the
//! last hour, no invalid ones) are produced to librdkafka's in-process mock cluster first, then the
//! real pipeline (SQLite ledger, 4 partitions, 32 requests in flight) runs against an in-process
//! emulator until every event is settled. The clock runs from the first settled event to the
//! last (joining the group is left out); events/s counts the events settled in that time.
//! `--billingrails-url` sends the Billingrails case
//! to an emulator in another process (e.g. to profile meterflow alone with `perf`).

use meterflow_testkit as common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;

use meterflow::config::builder::{Bucket, ConfigBuilder, Override};
use meterflow::demo::generate::{EventGenerator, COMPONENTS, CONTRACTS};
use meterflow::emulator::billingrails::{self, BillingrailsOptions};
use meterflow::emulator::billwerk::{self, BillwerkOptions};
use meterflow::emulator::ratelimit::RateLimitSettings;
use meterflow::pipeline::{self, RunStats};

#[derive(Clone, Copy, PartialEq)]
enum Provider {
    Billwerk { aggregate: bool },
    Billingrails,
}

struct Case {
    name: &'static str,
    provider: Provider,
    /// Emulator limit per second; 0 = unlimited.
    limit: u32,
    /// `[batch] max_events` and `max_wait`: the aggregation window.
    window: (usize, Duration),
}

/// meterflow's default batch window.
const DEFAULT_WINDOW: (usize, Duration) = (500, Duration::from_millis(100));
/// A wider window, for a pipeline that the provider's limit holds back anyway.
const WIDE_WINDOW: (usize, Duration) = (5000, Duration::from_secs(1));

struct Figures {
    events: usize,
    /// Events settled after the clock started.
    counted: usize,
    requests: u64,
    throttled: u64,
    elapsed: Duration,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let events: usize = value("--events")
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let only = value("--only");
    let billingrails_url = value("--billingrails-url");
    let mut cases = Vec::new();
    for limit in [0, 2000] {
        cases.push(Case {
            name: "billwerk, one record per event",
            provider: Provider::Billwerk { aggregate: false },
            limit,
            window: DEFAULT_WINDOW,
        });
        cases.push(Case {
            name: "billwerk, aggregated (hour), window 500 events / 100 ms",
            provider: Provider::Billwerk { aggregate: true },
            limit,
            window: DEFAULT_WINDOW,
        });
        cases.push(Case {
            name: "billwerk, aggregated (hour), window 5000 events / 1 s",
            provider: Provider::Billwerk { aggregate: true },
            limit,
            window: WIDE_WINDOW,
        });
    }
    cases.push(Case {
        name: "Billingrails, batches of 100",
        provider: Provider::Billingrails,
        limit: 0,
        window: DEFAULT_WINDOW,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| case | emulator limit | events | requests | events/request | seconds | events/s | 429s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for case in &cases {
        let provider = match case.provider {
            Provider::Billwerk { .. } => "billwerk",
            Provider::Billingrails => "billingrails",
        };
        if only.as_deref().is_some_and(|o| o != provider) {
            continue;
        }
        let f = runtime.block_on(run_case(case, events, billingrails_url.as_deref()));
        let limit = if case.limit == 0 {
            "none".to_string()
        } else {
            format!("{}/s", case.limit)
        };
        let per_request = f.events as f64 / f.requests.max(1) as f64;
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.0} | {} |",
            case.name,
            limit,
            f.events,
            f.requests,
            per_request,
            f.elapsed.as_secs_f64(),
            f.counted as f64 / f.elapsed.as_secs_f64(),
            f.throttled
        );
    }
}

/// The emulator a case runs against; `External` when it runs in another process.
enum Emulator {
    Billwerk(billwerk::BillwerkEmulator),
    Billingrails(billingrails::BillingrailsEmulator),
    External,
}

impl Emulator {
    /// (answers given, of which 429).
    fn requests(&self) -> (u64, u64) {
        let s = match self {
            Emulator::Billwerk(e) => e.stats(),
            Emulator::Billingrails(e) => e.stats(),
            Emulator::External => return (0, 0),
        };
        (s.answers_by_status.values().sum(), s.rate_limited)
    }
}

async fn run_case(case: &Case, n: usize, external_billingrails: Option<&str>) -> Figures {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("usage", 4, 1).unwrap();
    cluster.create_topic("usage-dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let mut generator = EventGenerator::new(2026, 0.0, chrono::Utc::now());
    let events: Vec<Vec<u8>> = (0..n).map(|_| generator.next_event().payload).collect();
    common::produce(&brokers, "usage", 4, &events).await;

    let limit = if case.limit == 0 {
        RateLimitSettings::default()
    } else {
        RateLimitSettings::per_window(case.limit, Duration::from_secs(1))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (emulator, base_url) = match (case.provider, external_billingrails) {
        (Provider::Billwerk { .. }, _) => {
            let mut options = BillwerkOptions::default();
            for (external, id) in CONTRACTS {
                options = options.with_contract(external, id);
            }
            let e = billwerk::start(options.with_limit(limit), listener)
                .await
                .unwrap();
            let base = e.base_url();
            (Emulator::Billwerk(e), base)
        }
        (Provider::Billingrails, Some(url)) => (Emulator::External, url.to_string()),
        (Provider::Billingrails, None) => {
            let e = billingrails::start(BillingrailsOptions::default().with_limit(limit), listener)
                .await
                .unwrap();
            let base = format!("{}/v1", e.base_url());
            (Emulator::Billingrails(e), base)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    // Without a limit the emulators send no rate-limit headers: tell meterflow the budget
    // rather than let it probe upwards from 10 requests/s.
    let assumed = if case.limit == 0 {
        1_000_000
    } else {
        case.limit
    };
    let (provider, aggregate) = match case.provider {
        Provider::Billwerk { aggregate } => ("billwerk", aggregate),
        Provider::Billingrails => ("billingrails", false),
    };
    let config = config(
        &brokers,
        provider,
        &base_url,
        &ledger,
        assumed,
        aggregate,
        case.window,
    )
    .build()
    .unwrap();

    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let deadline = started + Duration::from_secs(900);
    let settled = || {
        stats.delivered.load(Ordering::Relaxed)
            + stats.already_delivered.load(Ordering::Relaxed)
            + stats.dead_lettered.load(Ordering::Relaxed)
    };
    // The clock starts at the first settled event: joining the group (~3 s on the mock
    // cluster) is not delivery.
    let mut first: Option<(Instant, u64)> = None;
    while settled() < n as u64 && Instant::now() < deadline {
        if first.is_none() && settled() > 0 {
            first = Some((Instant::now(), settled()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (t0, settled_before) = first.unwrap_or((started, 0));
    let elapsed = t0.elapsed();
    let counted = n - settled_before as usize;
    let (requests, throttled) = emulator.requests();
    let _ = stop.send(());
    let stopping = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(30), run).await;
    eprintln!(
        "{} (limit {}): pipeline stopped in {:.1} s{}",
        case.name,
        case.limit,
        stopping.elapsed().as_secs_f64(),
        if stopped.is_err() { " (timed out)" } else { "" }
    );
    assert_eq!(
        stats.dead_lettered.load(Ordering::Relaxed),
        0,
        "benchmark events are all valid"
    );
    Figures {
        events: n,
        counted,
        requests,
        throttled,
        elapsed,
    }
}

fn config(
    brokers: &str,
    provider: &str,
    base_url: &str,
    ledger: &str,
    limit: u32,
    aggregate: bool,
    (max_events, max_wait): (usize, Duration),
) -> ConfigBuilder {
    let mut config = ConfigBuilder::new()
        .brokers(brokers)
        .group_id(&format!("bench-{provider}"))
        .topic("usage")
        .dead_letter_topic("usage-dlq")
        .session_timeout(Duration::from_secs(6))
        .drain_timeout(Duration::from_secs(3))
        .commit_interval(Duration::from_millis(200))
        .kafka_property("fetch.wait.max.ms", "10")
        .max_events(max_events)
        .max_wait(max_wait);
    config = if provider == "billwerk" {
        config.billwerk(
            base_url,
            billwerk::DEFAULT_CLIENT_ID,
            billwerk::DEFAULT_CLIENT_SECRET,
        )
    } else {
        config.billingrails(base_url, billingrails::DEFAULT_API_KEY)
    };
    if aggregate {
        config = config.aggregate(Bucket::Hour);
    }
    for (metric, id) in COMPONENTS {
        let id = if provider == "billingrails" {
            metric
        } else {
            id
        };
        config = config.component(metric, id);
    }
    config
        .concurrency(32)
        .request_timeout(Duration::from_secs(5))
        .rate_window(Duration::from_secs(1))
        .rate_limit(Some(limit))
        .headroom(0.005)
        .rule(
            Override::metric("api_calls")
                .attribute("plan", "enterprise")
                .price_per_unit(Decimal::new(8, 4))
                .name("API calls (enterprise)")
                .description("API calls in {attributes.region}"),
        )
        .rule(
            Override::metric("storage_gb")
                .price_per_unit(Decimal::new(21, 3))
                .description("GB stored ({attributes.plan})"),
        )
        .ledger_url(ledger)
        .admin_listen("")
        .log_level("error")
}
