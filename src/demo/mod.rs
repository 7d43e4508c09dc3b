//! `meterflow demo`: the whole pipeline with zero setup — librdkafka's in-process mock cluster,
//! the billwerk emulator with a realistic rate limit and faults, generated events (some invalid),
//! and the real pipeline between them. Ends with a reconciliation read from the emulator and the
//! dead-letter topic, not assumed; exits non-zero if anything was lost or billed twice.

pub mod generate;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;

use crate::admin::AdminServer;
use crate::config::builder::{Bucket, ConfigBuilder, Override};
use crate::emulator::billwerk::{self, BillwerkOptions};
use crate::emulator::faults::FaultSettings;
use crate::emulator::ratelimit::RateLimitSettings;
use crate::pipeline::{self, RunStats};
use generate::{EventGenerator, COMPONENTS, CONTRACTS};

/// `meterflow demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Events to generate.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Share of events made invalid (each kind of invalid event appears).
    #[arg(long, default_value_t = 0.01)]
    pub invalid_share: f64,
    /// The emulator's rate limit: requests per window (0 = unlimited).
    #[arg(long, default_value_t = 5_000)]
    pub limit: u32,
    /// The emulator's rate-limit window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Share of usage requests answered 5xx.
    #[arg(long, default_value_t = 0.01)]
    pub fail_rate: f64,
    /// Share of usage requests recorded, then answered by dropping the connection.
    #[arg(long, default_value_t = 0.002)]
    pub drop_rate: f64,
    /// Share of usage requests recorded, then answered after the client's timeout.
    #[arg(long, default_value_t = 0.0005)]
    pub slow_rate: f64,
    /// Partitions of the usage topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Delivery ledger: `sqlite` (a temporary file), `none`, or a `postgres://` URL.
    #[arg(long, default_value = "sqlite")]
    pub ledger: String,
    /// Tell meterflow this many requests per window are allowed (for providers that send no
    /// rate-limit headers, e.g. the emulator with `--limit 0`); 0 = let it probe.
    #[arg(long, default_value_t = 0)]
    pub assume_limit: u32,
    /// Give up waiting after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Where the admin server (the status page at `/`, `/metrics`, `/readyz`) listens while the
    /// demo runs; port 0 picks a free one. "" = no admin server.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_listen: String,
    /// Sum events that bill identically into one usage record (`[sink.aggregate]`, hourly
    /// buckets, a 5000-event / 1 s window); the check then compares the exact quantity sums per
    /// contract and component.
    #[arg(long)]
    pub aggregate: bool,
}

/// What the demo measured.
#[derive(Debug, Default)]
pub struct DemoReport {
    pub produced: usize,
    pub produced_invalid: BTreeMap<String, usize>,
    pub delivered_records: u64,
    /// Dead letters by reason, one per source offset (a second letter for an offset is the same
    /// event: counted in `dead_letter_copies`, not here).
    pub dead_lettered: BTreeMap<String, usize>,
    pub dead_letter_copies: usize,
    pub duplicate_keys: u64,
    pub requests: u64,
    pub throttled: u64,
    pub retries: u64,
    pub reconciled_found: u64,
    pub faults: String,
    pub elapsed: Duration,
    /// Events meterflow settled as delivered (counted by the pipeline).
    pub delivered_events: u64,
    /// Quantity sums per (contract id, component id): of the valid events produced, and of the
    /// records billwerk holds.
    pub produced_sums: BTreeMap<(String, String), Decimal>,
    pub billed_sums: BTreeMap<(String, String), Decimal>,
    /// Pre-aggregation was on: records are sums, not one per event.
    pub aggregate: bool,
}

impl DemoReport {
    pub fn valid_produced(&self) -> usize {
        self.produced - self.produced_invalid.values().sum::<usize>()
    }

    pub fn lost(&self) -> i64 {
        let settled =
            self.delivered_events as i64 + self.dead_lettered.values().sum::<usize>() as i64;
        self.produced as i64 - settled
    }

    pub fn is_exact(&self) -> bool {
        self.duplicate_keys == 0
            && self.produced_sums == self.billed_sums
            && self.delivered_events as usize == self.valid_produced()
            && (self.aggregate || self.delivered_records as usize == self.valid_produced())
            && self.dead_lettered == self.produced_invalid
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if std::env::var("RUST_LOG").is_err() {
        crate::telemetry::init_logging(&crate::config::LogConfig {
            format: crate::config::LogFormat::Text,
            level: "error,rdkafka::client=off,librdkafka=off".into(),
        });
    } else {
        crate::telemetry::init_logging(&Default::default());
    }
    let report = run_demo(&args).await?;
    print_report(&args, &report);
    if !report.is_exact() {
        anyhow::bail!("reconciliation failed: events were lost or billed twice");
    }
    Ok(())
}

/// Runs the demo and returns its figures (also used by tests and benchmarks).
pub async fn run_demo(args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let metrics = crate::telemetry::metrics_handle();
    let cluster = MockCluster::new(1)?;
    cluster.create_topic("usage", args.partitions.max(1), 1)?;
    cluster.create_topic("usage-dead-letters", 1, 1)?;
    let brokers = cluster.bootstrap_servers();

    let mut options = BillwerkOptions::default();
    for (external, id) in CONTRACTS {
        options = options.with_contract(external, id);
    }
    options.components = COMPONENTS.iter().map(|(_, c)| c.to_string()).collect();
    let limit = if args.limit == 0 {
        RateLimitSettings::default()
    } else {
        RateLimitSettings::per_window(args.limit, args.window)
    };
    let faults = FaultSettings {
        fail_rate: args.fail_rate,
        drop_rate: args.drop_rate,
        slow_rate: args.slow_rate,
        slow_duration: Duration::from_secs(3),
        ..FaultSettings::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let emulator = billwerk::start(options.with_limit(limit).with_faults(faults), listener).await?;

    // Produce.
    let mut generator = EventGenerator::new(args.seed, args.invalid_share, chrono::Utc::now());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()?;
    let mut report = DemoReport {
        produced: args.events,
        aggregate: args.aggregate,
        ..Default::default()
    };
    let events: Vec<(String, Vec<u8>)> = (0..args.events)
        .map(|i| {
            let event = generator.next_event();
            match event.invalid {
                Some(kind) => *report.produced_invalid.entry(kind.to_string()).or_default() += 1,
                None => {
                    let (key, quantity) = billed_as(&event.payload);
                    *report.produced_sums.entry(key).or_default() += quantity;
                }
            }
            (format!("{i}"), event.payload)
        })
        .collect();
    // `send_result` enqueues at once; `send` only when its future is polled, so awaiting sends
    // one after another costs a linger wait per message.
    for chunk in events.chunks(5000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for (key, payload) in chunk {
            match producer.send_result(FutureRecord::to("usage").payload(payload).key(key)) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => anyhow::bail!("cannot enqueue a demo event: {e}"),
            }
        }
        for f in pending {
            f.await?.map_err(|(e, _)| e)?;
        }
    }

    // Run the real pipeline.
    let dir = tempfile::tempdir()?;
    let ledger = match args.ledger.as_str() {
        "sqlite" => format!("sqlite://{}", dir.path().join("ledger.db").display()),
        other => other.to_string(),
    };
    let mut config = demo_config(
        &brokers,
        &emulator.base_url(),
        &ledger,
        args.concurrency,
        args.window,
    );
    if args.aggregate {
        config = aggregated(config);
    }
    if args.assume_limit > 0 {
        config = config.rate_limit(Some(args.assume_limit));
    }
    let config = config.build()?;
    let stats = Arc::new(RunStats::default());
    let admin = match args.admin_listen.as_str() {
        "" => None,
        listen => {
            let admin = AdminServer::start(listen, stats.admin_state())
                .await
                .map_err(|e| {
                    anyhow::anyhow!("{e} (the demo's --admin-listen; \"\" runs without it)")
                })?;
            println!(
                "status page: http://{}/  (refreshes itself every 5 s while the demo runs; \
                 /metrics and /readyz beside it)",
                admin.addr()
            );
            Some(admin)
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let pipeline = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let bar = (!args.quiet).then(|| {
        let bar = indicatif::ProgressBar::new(args.events as u64);
        // A constant template; the default style if it ever failed to parse.
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} settled  {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let deadline = started + args.timeout;
    loop {
        let settled = stats.delivered.load(Ordering::Relaxed)
            + stats.already_delivered.load(Ordering::Relaxed)
            + stats.dead_lettered.load(Ordering::Relaxed);
        if let Some(bar) = &bar {
            bar.set_position(settled);
            let s = emulator.stats();
            bar.set_message(format!(
                "{} records, {} × 429, {:.0} ev/s",
                s.records,
                s.rate_limited,
                settled as f64 / started.elapsed().as_secs_f64().max(0.001)
            ));
        }
        if settled >= args.events as u64 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.elapsed = started.elapsed();
    if let Some(bar) = bar {
        bar.finish();
    }
    // Let the final offsets be stored and committed, then drain.
    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(30), pipeline).await;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    match stopped {
        Ok(joined) => joined??,
        Err(_) => anyhow::bail!("the pipeline did not stop within 30 s"),
    }

    let s = emulator.stats();
    report.delivered_records = s.records;
    report.delivered_events =
        stats.delivered.load(Ordering::Relaxed) + stats.already_delivered.load(Ordering::Relaxed);
    for record in emulator.records() {
        *report
            .billed_sums
            .entry((record.contract_id, record.component_id))
            .or_default() += record.quantity;
    }
    report.duplicate_keys = s.duplicate_keys;
    report.requests = s.answers_by_status.values().sum();
    report.throttled = s.rate_limited;
    report.faults = format!(
        "{} × 5xx, {} dropped after recording, {} slow past the timeout",
        s.faults_injected.fail, s.faults_injected.drop, s.faults_injected.slow
    );
    let rendered = metrics.render();
    report.retries = sum_metric(&rendered, "meterflow_retries_total");
    report.reconciled_found = sum_metric_with(
        &rendered,
        "meterflow_reconciliations_total",
        "result=\"found\"",
    );
    let expected_dead = report.produced_invalid.values().sum::<usize>();
    (report.dead_lettered, report.dead_letter_copies) = count_dead_letters(&brokers, expected_dead);
    // Clients first, then the cluster they talk to (or librdkafka logs "all brokers down").
    drop(producer);
    drop(cluster);
    Ok(report)
}

/// The contract id, component id and quantity a valid generated event bills as.
fn billed_as(payload: &[u8]) -> ((String, String), Decimal) {
    // The demo's own generated events; an unreadable one bills as nothing.
    let event: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    let contract = match event["contract_id"].as_str() {
        Some(id) => id.to_string(),
        None => {
            let external = event["contract_external_id"].as_str().unwrap_or_default();
            CONTRACTS
                .iter()
                .find(|(e, _)| *e == external)
                .map(|(_, id)| id.to_string())
                .unwrap_or_default()
        }
    };
    let metric = event["metric"].as_str().unwrap_or_default();
    let component = COMPONENTS
        .iter()
        .find(|(m, _)| *m == metric)
        .map(|(_, id)| id.to_string())
        .unwrap_or_default();
    let quantity = match &event["quantity"] {
        serde_json::Value::String(s) => s.parse().unwrap_or_default(),
        other => other.to_string().parse().unwrap_or_default(),
    };
    ((contract, component), quantity)
}

/// The demo config with pre-aggregation: a wider batch window, and descriptions that do not
/// render the event's own quantity (which would make every event's record different).
fn aggregated(config: ConfigBuilder) -> ConfigBuilder {
    let (api_calls, storage) = rules();
    config
        .aggregate(Bucket::Hour)
        .max_events(5000)
        .max_wait(Duration::from_secs(1))
        .clear_rules()
        .rule(api_calls.description("API calls in {attributes.region}"))
        .rule(storage.description("GB stored ({attributes.plan})"))
}

/// The demo's price rules, without descriptions: enterprise API calls, and storage.
fn rules() -> (Override, Override) {
    (
        Override::metric("api_calls")
            .attribute("plan", "enterprise")
            .price_per_unit(Decimal::new(8, 4))
            .name("API calls (enterprise)"),
        Override::metric("storage_gb").price_per_unit(Decimal::new(21, 3)),
    )
}

fn demo_config(
    brokers: &str,
    base_url: &str,
    ledger: &str,
    concurrency: usize,
    window: Duration,
) -> ConfigBuilder {
    let (api_calls, storage) = rules();
    let mut config = ConfigBuilder::new()
        .brokers(brokers)
        .group_id("meterflow-demo")
        .topic("usage")
        .dead_letter_topic("usage-dead-letters")
        .session_timeout(Duration::from_secs(6))
        .drain_timeout(Duration::from_secs(3))
        .commit_interval(Duration::from_millis(200))
        .kafka_property("fetch.wait.max.ms", "10")
        .billwerk(
            base_url,
            billwerk::DEFAULT_CLIENT_ID,
            billwerk::DEFAULT_CLIENT_SECRET,
        )
        .concurrency(concurrency)
        .request_timeout(Duration::from_secs(1))
        .rate_window(window)
        .headroom(0.005)
        .backoff(Duration::from_millis(50), Duration::from_secs(1))
        .rule(api_calls.description("{quantity} API calls in {attributes.region}"))
        .rule(storage.description("{quantity} GB stored ({attributes.plan})"))
        .ledger_url(ledger)
        .admin_listen("");
    for (metric, id) in COMPONENTS {
        config = config.component(metric, id);
    }
    config
}

/// Dead letters by reason, each source offset once; and how many second letters for an offset
/// the topic holds.
fn count_dead_letters(brokers: &str, expected: usize) -> (BTreeMap<String, usize>, usize) {
    let mut out = BTreeMap::new();
    let mut copies = 0;
    let mut seen = crate::dlq::select::SeenSources::default();
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "meterflow-demo-dlq-reader")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create::<BaseConsumer>()
    else {
        return (out, copies);
    };
    if consumer.subscribe(&["usage-dead-letters"]).is_err() {
        return (out, copies);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut read = 0;
    // Read what is there: stop at the expected count, or after a quiet second past it.
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                read += 1;
                let headers: Vec<(String, Vec<u8>)> = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                let info = crate::dlq::select::LetterInfo::from_headers(&headers, None);
                if seen.is_second_copy(&info) {
                    copies += 1;
                    continue;
                }
                let reason = info.reason.unwrap_or_else(|| "?".into());
                *out.entry(reason).or_default() += 1;
            }
            _ if read >= expected && quiet_since.elapsed() > Duration::from_secs(1) => break,
            _ => {}
        }
    }
    (out, copies)
}

fn sum_metric_with(rendered: &str, name: &str, label: &str) -> u64 {
    rendered
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn sum_metric(rendered: &str, name: &str) -> u64 {
    sum_metric_with(rendered, name, "")
}

fn print_report(args: &DemoArgs, r: &DemoReport) {
    let dead: usize = r.dead_lettered.values().sum();
    let rate = (r.valid_produced() + dead) as f64 / r.elapsed.as_secs_f64().max(0.001);
    println!();
    println!("meterflow demo — reconciliation (read from the emulator and the dead-letter topic)");
    println!("  {:<34} {:>10}", "events produced", r.produced);
    println!("  {:<34} {:>10}", "  valid", r.valid_produced());
    println!(
        "  {:<34} {:>10}",
        "  invalid",
        r.produced - r.valid_produced()
    );
    println!(
        "  {:<34} {:>10}",
        "usage records at billwerk", r.delivered_records
    );
    if args.aggregate {
        println!(
            "  {:<34} {:>10}   ({:.1} events per record)",
            "  events summed into them",
            r.delivered_events,
            r.delivered_events as f64 / r.delivered_records.max(1) as f64
        );
    }
    let matching = r
        .produced_sums
        .iter()
        .filter(|(k, v)| r.billed_sums.get(*k) == Some(*v))
        .count();
    println!(
        "  {:<34} {:>10}   (of {}; billwerk holds {})",
        "quantity sums that match",
        matching,
        r.produced_sums.len(),
        r.billed_sums.len()
    );
    println!("  {:<34} {:>10}", "dead-lettered", dead);
    for (reason, n) in &r.dead_lettered {
        let expected = r.produced_invalid.get(reason).copied().unwrap_or(0);
        println!(
            "  {:<34} {:>10}   (produced {expected})",
            format!("  {reason}"),
            n
        );
    }
    println!(
        "  {:<34} {:>10}",
        "  second letters for one event", r.dead_letter_copies
    );
    println!(
        "  {:<34} {:>10}",
        "billed twice (duplicate keys)", r.duplicate_keys
    );
    println!("  {:<34} {:>10}", "lost", r.lost().max(0));
    println!("  {:<34} {:>10}", "requests answered", r.requests);
    println!(
        "  {:<34} {:>10}   (limit {} per {})",
        "429 answers",
        r.throttled,
        args.limit,
        humantime::format_duration(args.window)
    );
    println!("  {:<34} {:>10}", "retries", r.retries);
    println!(
        "  {:<34} {:>10}",
        "unknown outcomes found at billwerk", r.reconciled_found
    );
    println!("  {:<34} {:>10}", "faults injected", "");
    println!("    {}", r.faults);
    println!("  {:<34} {:>9.1}s", "elapsed", r.elapsed.as_secs_f64());
    println!("  {:<34} {:>10.0}", "events settled per second", rate);
    println!(
        "  {}",
        if r.is_exact() {
            "OK: every valid event billed exactly once (exact quantity sums per contract and \
             component); every invalid one dead-lettered."
        } else {
            "MISMATCH: see the counts above."
        }
    );
}
