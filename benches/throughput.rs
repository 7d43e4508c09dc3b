//! Throughput: Kafka (a Tansu broker process, 4 partitions) → `meterflow run` (its own process)
//! → `meterflow emulate billwerk` (its own process, no rate limit, answers at once). Broker,
//! meterflow and emulator share the machine, as in the peer comparison in
//! `shared/reference/lessons-from-peers.md`.
//!
//! Prints, per scenario: events, events/s (first to last record), meterflow's CPU µs per event,
//! and its peak RSS.
//!
//! `cargo bench --bench throughput [-- --events N] [-- --only none|sqlite|postgres] [-- --tansu]
//!  [-- --sink billwerk|billingrails] [-- --perf]`
//!
//! The broker is librdkafka's mock cluster (in the bench process, on real TCP ports) unless
//! `--tansu` asks for a Tansu process (its produce path is slow to fill on this machine).
//! `--sink billingrails` sends to `meterflow emulate billingrails` in batches of 100 instead of
//! one billwerk usage record per event. `--perf` records meterflow with `perf record` (cpu-clock,
//! DWARF call stacks) and prints the share of its CPU per pipeline stage (benches/stage_cpu.py).
//! meterflow's log of each scenario is kept in `target/bench-throughput/`.

use meterflow_testkit as common;
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meterflow::ack::ledger::scratch::{self, ScratchDatabase};
use support::{arg, held, meterflow, usage, SinkKind};

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn records(emulator: &str) -> u64 {
    http_get(emulator, "/_emulator/stats?per_key=false")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["records"].as_u64())
        .unwrap_or(0)
}

fn start_emulator(sink: SinkKind, port: u16) -> Child {
    let child = Command::new(meterflow())
        .args([
            "emulate",
            sink.name(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("emulator starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

struct Row {
    scenario: String,
    events: u64,
    rate: f64,
    cpu_us: f64,
    rss_mib: f64,
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    name: &str,
    sink: SinkKind,
    perf: bool,
    ledger: &str,
    events: usize,
    brokers: &str,
    mock: Option<
        &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    >,
) -> Row {
    let port = common::free_port();
    let mut emulator = start_emulator(sink, port);
    let emu_addr = format!("127.0.0.1:{port}");
    let run = rand::random::<u32>();
    let (topic, dlq, group) = (
        format!("bench-{run}"),
        format!("bench-dlq-{run}"),
        format!("bench-{run}"),
    );
    match mock {
        Some(m) => {
            m.create_topic(&topic, 4, 1).unwrap();
            m.create_topic(&dlq, 1, 1).unwrap();
        }
        None => common::create_topics(brokers, &[(&topic, 4), (&dlq, 1)]).await,
    }
    let payloads: Vec<Vec<u8>> = (0..events).map(|i| support::event(run, i)).collect();
    common::produce(brokers, &topic, 4, &payloads).await;
    // librdkafka's mock cluster keeps about 5 MiB per partition and drops older records: count
    // what the topic still holds, not what was produced.
    let events = held(brokers, &topic, 4);
    if events < payloads.len() {
        eprintln!(
            "the broker holds {events} of the {} events produced (the mock cluster keeps ~5 MiB \
             per partition; use --tansu or fewer --events)",
            payloads.len()
        );
    }
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-throughput");
    std::fs::create_dir_all(&logs).unwrap();
    let config = logs.join(format!("{}-{name}.toml", sink.name()));
    let base_url = match sink {
        SinkKind::Billwerk => format!("http://{emu_addr}"),
        SinkKind::Billingrails => format!("http://{emu_addr}/v1"),
    };
    let text = support::meterflow_config(sink, brokers, &group, &topic, &dlq, &base_url, ledger);
    std::fs::write(&config, text).unwrap();
    let log_path = logs.join(format!("{}-{name}.log", sink.name()));
    let log = std::fs::File::create(&log_path).unwrap();
    let perf_data = logs.join(format!("{}-{name}.perf.data", sink.name()));
    let mut mf = Command::new(meterflow())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("meterflow starts");
    let pid = mf.id();
    // perf follows only the threads that exist when it attaches: attach once meterflow is
    // delivering, when librdkafka's threads and the runtime's workers are all up.
    let mut recorder: Option<Child> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, u64, f64)> = None;
    let last = loop {
        let n = records(&emu_addr);
        let now = Instant::now();
        if first.is_none() && n > 0 {
            first = Some((now, n, usage(pid).0));
            if perf {
                recorder = Some(support::start_perf(pid, &perf_data));
            }
        }
        if n >= events as u64 || now > deadline {
            break (now, n, usage(pid).0);
        }
        if let Ok(Some(status)) = mf.try_wait() {
            eprintln!(
                "meterflow exited early ({status}); its log: {}",
                log_path.display()
            );
            break (now, n, 0.0);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (cpu_end, rss) = usage(pid);
    if let Some(recorder) = recorder {
        support::stop_perf(recorder);
    }
    let _ = Command::new("kill")
        .arg("-15")
        .arg(pid.to_string())
        .status();
    let _ = mf.wait();
    let _ = emulator.kill();
    let _ = emulator.wait();
    if perf {
        support::print_stage_shares(&perf_data);
    }
    if last.1 < events as u64 {
        eprintln!(
            "only {} of {events} events arrived; meterflow's log: {}",
            last.1,
            log_path.display()
        );
    }
    let (t0, n0, cpu0) = first.unwrap_or(last);
    let secs = (last.0 - t0).as_secs_f64().max(0.001);
    let counted = last.1.saturating_sub(n0).max(1);
    Row {
        scenario: name.to_string(),
        events: last.1,
        rate: counted as f64 / secs,
        cpu_us: (cpu_end.max(last.2) - cpu0) * 1e6 / counted as f64,
        rss_mib: rss as f64 / 1024.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: usize = arg("--events")
        .and_then(|e| e.parse().ok())
        .unwrap_or(200_000);
    let only = arg("--only");
    let sink = match arg("--sink").as_deref() {
        None | Some("billwerk") => SinkKind::Billwerk,
        Some("billingrails") => SinkKind::Billingrails,
        Some(other) => {
            eprintln!("--sink {other}: expected billwerk or billingrails");
            std::process::exit(2);
        }
    };
    let perf = support::flag("--perf");
    let dir = tempfile::tempdir().unwrap();
    let use_tansu = support::flag("--tansu");
    let mock = if use_tansu {
        None
    } else {
        Some(rdkafka::mocking::MockCluster::new(1).expect("mock cluster"))
    };
    let broker = if use_tansu {
        match common::Tansu::start_with_storage(dir.path(), "memory://tansu/") {
            Some(t) => Some(t),
            None => {
                eprintln!("--tansu needs tansu (cargo install tansu --version 0.6.0 --locked --features dynostore,libsql)");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    let brokers = match (&broker, &mock) {
        (Some(t), _) => t.brokers(),
        (None, Some(m)) => m.bootstrap_servers(),
        _ => unreachable!(),
    };
    println!("sink: {}", sink.name());
    println!(
        "broker: {}",
        if use_tansu {
            "tansu (memory storage), 4 partitions"
        } else {
            "librdkafka mock cluster, 4 partitions"
        }
    );
    // A database of its own, dropped at the end: the rows a run leaves must not slow the next
    // run or change a test's result.
    let postgres_db = if only.as_deref().is_none_or(|o| o == "postgres") {
        ScratchDatabase::create(&scratch::server_url()).await.ok()
    } else {
        None
    };
    let postgres = postgres_db
        .as_ref()
        .map_or_else(scratch::server_url, |db| db.url.clone());
    let scenarios = [
        ("ledger=none", "none".to_string()),
        (
            "ledger=sqlite",
            format!("sqlite://{}", dir.path().join("ledger.db").display()),
        ),
        ("ledger=postgres", postgres),
    ];
    println!("load before: {}", support::load_average());
    println!(
        "{:<18} {:>9} {:>12} {:>14} {:>14}",
        "scenario", "events", "events/s", "CPU µs/event", "peak RSS MiB"
    );
    for (name, ledger) in scenarios {
        if only.as_deref().is_some_and(|o| !name.ends_with(o)) {
            continue;
        }
        let row = scenario(name, sink, perf, &ledger, events, &brokers, mock.as_ref()).await;
        println!(
            "{:<18} {:>9} {:>12.0} {:>14.1} {:>14.1}",
            row.scenario, row.events, row.rate, row.cpu_us, row.rss_mib
        );
    }
}
