//! Events per request and events per second: billwerk with pre-aggregation on and off (with a
//! realistic rate limit and without any), and Billingrails with batches of 100.
//!
//! ```sh
//! cargo bench --bench aggregation                      # every case, 20 000 events each
//! cargo bench --bench aggregation -- --events 50000 --only billingrails
//! cargo bench --bench aggregation -- --only billingrails --billingrails-url http://127.0.0.1:18091/v1
//! ```
//!
//! Each case: generated events (the demo's generator: 6 contracts, 3 metrics, timestamps over the
//! last hour, no invalid ones) are produced to librdkafka's in-process mock cluster first, then the
//! real pipeline (SQLite ledger, 4 partitions, 32 requests in flight) runs against an in-process
//! emulator until every event is settled. The clock runs from the pipeline's start to the last
//! settlement, so it includes joining the group. `--billingrails-url` sends the Billingrails case
//! to an emulator in another process (e.g. to profile meterflow alone with `perf`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use meterflow::config::Config;
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
}

struct Figures {
    events: usize,
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
        .unwrap_or(20_000);
    let only = value("--only");
    let billingrails_url = value("--billingrails-url");
    let cases = [
        Case {
            name: "billwerk, one record per event",
            provider: Provider::Billwerk { aggregate: false },
            limit: 0,
        },
        Case {
            name: "billwerk, aggregated (hour)",
            provider: Provider::Billwerk { aggregate: true },
            limit: 0,
        },
        Case {
            name: "billwerk, one record per event",
            provider: Provider::Billwerk { aggregate: false },
            limit: 2000,
        },
        Case {
            name: "billwerk, aggregated (hour)",
            provider: Provider::Billwerk { aggregate: true },
            limit: 2000,
        },
        Case {
            name: "Billingrails, batches of 100",
            provider: Provider::Billingrails,
            limit: 0,
        },
    ];
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
            f.events as f64 / f.elapsed.as_secs_f64(),
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
    produce(&brokers, n).await;

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
    let config = config_text(&brokers, provider, &base_url, &ledger, assumed, aggregate);
    let config = Config::from_toml_str(&config).unwrap();

    let stats = Arc::new(RunStats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let run = tokio::spawn(pipeline::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let deadline = started + Duration::from_secs(600);
    while stats.delivered.load(Ordering::Relaxed)
        + stats.already_delivered.load(Ordering::Relaxed)
        + stats.dead_lettered.load(Ordering::Relaxed)
        < n as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let (requests, throttled) = emulator.requests();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
    assert_eq!(
        stats.dead_lettered.load(Ordering::Relaxed),
        0,
        "benchmark events are all valid"
    );
    Figures {
        events: n,
        requests,
        throttled,
        elapsed,
    }
}

async fn produce(brokers: &str, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut generator = EventGenerator::new(2026, 0.0, chrono::Utc::now());
    let events: Vec<Vec<u8>> = (0..n).map(|_| generator.next_event().payload).collect();
    let keys: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    for (chunk, keys) in events.chunks(2000).zip(keys.chunks(2000)) {
        let pending: Vec<_> = chunk
            .iter()
            .zip(keys)
            .map(|(payload, key)| {
                producer.send(
                    FutureRecord::to("usage").payload(payload).key(key),
                    Duration::from_secs(10),
                )
            })
            .collect();
        for f in pending {
            f.await.unwrap();
        }
    }
}

fn config_text(
    brokers: &str,
    provider: &str,
    base_url: &str,
    ledger: &str,
    limit: u32,
    aggregate: bool,
) -> String {
    let mut components = String::new();
    for (metric, id) in COMPONENTS {
        let id = if provider == "billingrails" {
            metric
        } else {
            id
        };
        components.push_str(&format!("{metric} = \"{id}\"\n"));
    }
    let sink = if provider == "billwerk" {
        format!(
            "kind = \"billwerk\"\nbase_url = \"{base_url}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"",
            billwerk::DEFAULT_CLIENT_ID,
            billwerk::DEFAULT_CLIENT_SECRET
        )
    } else {
        format!(
            "kind = \"billingrails\"\nbase_url = \"{base_url}\"\napi_key = \"{}\"",
            billingrails::DEFAULT_API_KEY
        )
    };
    let aggregate = if aggregate {
        "[sink.aggregate]\nenabled = true\nbucket = \"hour\"\n"
    } else {
        ""
    };
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "bench-{provider}"
topics = ["usage"]
dead_letter_topic = "usage-dlq"
session_timeout = "6s"
drain_timeout = "3s"
commit_interval = "200ms"

[kafka.properties]
"fetch.wait.max.ms" = "10"

[sink]
{sink}
concurrency = 32
request_timeout = "5s"

{aggregate}
[rate_limit]
window = "1s"
limit = {limit}
headroom = 0.005

[components]
{components}
[[overrides]]
metric = "api_calls"
attributes = {{ plan = "enterprise" }}
price_per_unit = "0.0008"
name = "API calls (enterprise)"
description = "API calls in {{attributes.region}}"

[[overrides]]
metric = "storage_gb"
price_per_unit = "0.021"
description = "GB stored ({{attributes.plan}})"

[ledger]
url = "{ledger}"

[admin]
listen = ""

[log]
level = "error"
"#
    )
}
