//! Throughput: Kafka (a Tansu broker process, 4 partitions) → `meterflow run` (its own process)
//! → `meterflow emulate billwerk` (its own process, no rate limit, answers at once). Broker,
//! meterflow and emulator share the machine, as in the peer comparison in
//! `shared/reference/lessons-from-peers.md`.
//!
//! Prints, per scenario: events, events/s (first to last record), meterflow's CPU µs per event,
//! its peak RSS (`VmHWM`), and as `anon+file` its anonymous memory (heap, stacks, librdkafka's
//! buffers) at the largest of samples taken every 50 ms, with the file-backed pages (the
//! binary's and its libraries', shared and reclaimable) mapped at that sample.
//!
//! `cargo bench --bench throughput [-- --events N] [-- --only none|sqlite|postgres] [-- --tansu]
//!  [-- --sink billwerk|billingrails] [-- --perf] [-- --replicas 1,2,4]`
//!
//! The broker is librdkafka's mock cluster (in the bench process, on real TCP ports) unless
//! `--tansu` asks for a Tansu process (its produce path is slow to fill on this machine).
//! `--sink billingrails` sends to `meterflow emulate billingrails` in batches of 100 instead of
//! one billwerk usage record per event. `--perf` records meterflow with `perf record` (cpu-clock,
//! DWARF call stacks) and prints the share of its CPU per pipeline stage (benches/stage_cpu.py).
//! meterflow's log of each scenario is kept in `target/bench-throughput/`.
//!
//! `--replicas 1,2,4` runs the PostgreSQL scenario once per count, with that many `meterflow
//! run` processes in one consumer group sharing one ledger database, and adds what the
//! database did meanwhile: transactions and rows written per second (`pg_stat_database`) and
//! the CPU of every PostgreSQL process on the machine, per event.

use meterflow_testkit as common;
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meterflow::ack::ledger::scratch::{self, ScratchDatabase};
use support::{arg, held, meterflow, usage, SinkKind};

/// Set when a scenario with a ledger left an event billed twice: the bench then exits 1.
static BILLED_TWICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
    stat(emulator, "records").unwrap_or(0)
}

/// One count of the emulator's `GET /_emulator/stats` (`None`: no answer).
fn stat(emulator: &str, field: &str) -> Option<u64> {
    http_get(emulator, "/_emulator/stats?per_key=false")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v[field].as_u64())
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
    /// Every replica's CPU together, per event.
    cpu_us: f64,
    /// The largest replica's.
    rss_mib: f64,
    /// The largest anonymous memory any replica had at a sample (every 50 ms), and that
    /// replica's file-backed pages at the same sample.
    anon_mib: f64,
    file_mib: f64,
    database: Option<DatabaseLoad>,
}

/// What the ledger's PostgreSQL did between the first record and the last.
struct DatabaseLoad {
    transactions_per_s: f64,
    rows_written_per_s: f64,
    cpu_us_per_event: f64,
}

/// Committed transactions and rows written so far in database `name` (`pg_stat_database`).
async fn database_counts(admin_url: &str, name: &str) -> (f64, f64) {
    use sqlx::{Connection, Row};
    let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await else {
        return (0.0, 0.0);
    };
    let row = sqlx::query(
        "SELECT CAST(xact_commit AS FLOAT8), CAST(tup_inserted + tup_updated + tup_deleted AS FLOAT8)
         FROM pg_stat_database WHERE datname = $1",
    )
    .bind(name)
    .fetch_optional(&mut conn)
    .await
    .ok()
    .flatten();
    let _ = conn.close().await;
    row.map_or((0.0, 0.0), |r| (r.get(0), r.get(1)))
}

/// CPU seconds of every process named `postgres` on the machine.
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| usage(pid).0)
        .sum()
}

/// The database name in a `postgres://…/NAME[?…]` URL.
fn database_name(url: &str) -> Option<&str> {
    let path = url.rsplit_once('/')?.1;
    Some(path.split('?').next().unwrap_or(path))
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    name: &str,
    sink: SinkKind,
    perf: bool,
    ledger: &str,
    replicas: usize,
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
        let why = match mock {
            Some(_) => "the mock cluster keeps ~5 MiB per partition; use --tansu or fewer --events",
            None => "Tansu's watermarks; the run waits for that many",
        };
        eprintln!(
            "the broker holds {events} of the {} events produced ({why})",
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
    let mut replicas_running: Vec<Child> = (0..replicas)
        .map(|r| {
            let log_path = logs.join(format!("{}-{name}-{r}.log", sink.name()));
            let log = std::fs::File::create(&log_path).unwrap();
            Command::new(meterflow())
                .args(["run", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("meterflow starts")
        })
        .collect();
    let log_path = logs.join(format!("{}-{name}-0.log", sink.name()));
    let perf_data = logs.join(format!("{}-{name}.perf.data", sink.name()));
    let pids: Vec<u32> = replicas_running.iter().map(Child::id).collect();
    let pid = pids[0];
    let cpu = |pids: &[u32]| pids.iter().map(|p| usage(*p).0).sum::<f64>();
    let postgres = ledger.starts_with("postgres");
    let admin_url = scratch::server_url();
    let db_name = database_name(ledger).unwrap_or_default().to_string();
    // perf follows only the threads that exist when it attaches: attach once meterflow is
    // delivering, when librdkafka's threads and the runtime's workers are all up.
    let mut recorder: Option<Child> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, u64, f64)> = None;
    let mut db_first = None;
    let mut resident = (0u64, 0u64);
    let last = loop {
        for pid in &pids {
            let (anon, file) = support::resident_split(*pid);
            if anon > resident.0 {
                resident = (anon, file);
            }
        }
        let n = records(&emu_addr);
        let now = Instant::now();
        if first.is_none() && n > 0 {
            first = Some((now, n, cpu(&pids)));
            if postgres {
                db_first = Some((database_counts(&admin_url, &db_name).await, postgres_cpu()));
            }
            if perf {
                recorder = Some(support::start_perf(pid, &perf_data));
            }
        }
        if n >= events as u64 || now > deadline {
            break (now, n, cpu(&pids));
        }
        if let Some(status) = replicas_running
            .iter_mut()
            .find_map(|mf| mf.try_wait().ok().flatten())
        {
            eprintln!(
                "a meterflow exited early ({status}); its log is in {}",
                logs.display()
            );
            break (now, n, 0.0);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let cpu_end = cpu(&pids);
    let rss = pids.iter().map(|p| usage(*p).1).max().unwrap_or(0);
    let postgres_cpu_end = postgres.then(postgres_cpu);
    if let Some(recorder) = recorder {
        support::stop_perf(recorder);
    }
    for pid in &pids {
        let _ = Command::new("kill")
            .arg("-15")
            .arg(pid.to_string())
            .status();
    }
    for mf in &mut replicas_running {
        let _ = mf.wait();
    }
    // A backend reports its counts when its connection closes at the latest: read them after
    // the replicas have gone.
    let db_last = match postgres {
        true => Some(database_counts(&admin_url, &db_name).await),
        false => None,
    };
    // Every replica has stopped: what the emulator holds now is final. A delivery key on more
    // than one record is an event billed twice (billwerk; Billingrails stores a key once).
    let twice = stat(&emu_addr, "duplicate_keys");
    let _ = emulator.kill();
    let _ = emulator.wait();
    match twice {
        Some(0) => {}
        Some(n) if ledger == "none" => eprintln!(
            "{name}: {n} delivery keys on more than one record, billed twice (no ledger: a \
             re-send after a lost answer bills again)"
        ),
        Some(n) => {
            eprintln!(
                "{name}: {n} delivery keys on more than one record: BILLED TWICE with a ledger; \
                 meterflow's log: {}",
                log_path.display()
            );
            BILLED_TWICE.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        None => eprintln!("{name}: the emulator did not answer its stats; duplicates not checked"),
    }
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
    let database = match (db_first, db_last, postgres_cpu_end) {
        (Some(((tx0, rows0), pg0)), Some((tx1, rows1)), Some(pg1)) => Some(DatabaseLoad {
            transactions_per_s: (tx1 - tx0) / secs,
            rows_written_per_s: (rows1 - rows0) / secs,
            cpu_us_per_event: (pg1 - pg0) * 1e6 / counted as f64,
        }),
        _ => None,
    };
    Row {
        scenario: if replicas > 1 {
            format!("{name} ×{replicas}")
        } else {
            name.to_string()
        },
        events: last.1,
        rate: counted as f64 / secs,
        cpu_us: (cpu_end.max(last.2) - cpu0) * 1e6 / counted as f64,
        rss_mib: rss as f64 / 1024.0,
        anon_mib: resident.0 as f64 / 1024.0,
        file_mib: resident.1 as f64 / 1024.0,
        database,
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
    let replica_counts: Vec<usize> = match arg("--replicas") {
        None => vec![1],
        Some(list) => match list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=16).contains(n))
            })
            .collect::<Option<Vec<_>>>()
        {
            Some(counts) if !counts.is_empty() => counts,
            _ => {
                eprintln!("--replicas {list}: expected counts from 1 to 16, e.g. 1,2,4");
                std::process::exit(2);
            }
        },
    };
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
    let scenarios = [
        ("ledger=none", "none".to_string()),
        (
            "ledger=sqlite",
            format!("sqlite://{}", dir.path().join("ledger.db").display()),
        ),
        // A database of its own for each run (below), dropped at its end: the rows a run
        // leaves must not slow the next run or change a test's result.
        ("ledger=postgres", String::new()),
    ];
    println!("load before: {}", support::load_average());
    println!(
        "{:<22} {:>9} {:>12} {:>14} {:>14} {:>16} {:>10} {:>12} {:>12}",
        "scenario",
        "events",
        "events/s",
        "CPU µs/event",
        "peak RSS MiB",
        "anon+file MiB",
        "db tx/s",
        "db rows/s",
        "db µs/event"
    );
    for (name, ledger) in scenarios {
        if only.as_deref().is_some_and(|o| !name.ends_with(o)) {
            continue;
        }
        // Several replicas share a PostgreSQL ledger (or none); a SQLite ledger is one process's.
        let counts: &[usize] = if name.ends_with("sqlite") {
            &[1]
        } else {
            &replica_counts
        };
        for &replicas in counts {
            let scratch_db = match name.ends_with("postgres") {
                true => match ScratchDatabase::create(&scratch::server_url()).await {
                    Ok(db) => Some(db),
                    Err(e) => {
                        eprintln!(
                            "{name}: no scratch database on {}: {e}",
                            scratch::server_url()
                        );
                        continue;
                    }
                },
                false => None,
            };
            let ledger = scratch_db
                .as_ref()
                .map_or(ledger.clone(), |db| db.url.clone());
            let row = scenario(
                name,
                sink,
                perf,
                &ledger,
                replicas,
                events,
                &brokers,
                mock.as_ref(),
            )
            .await;
            let db = |f: fn(&DatabaseLoad) -> f64| {
                row.database
                    .as_ref()
                    .map_or_else(|| "—".to_string(), |d| format!("{:.0}", f(d)))
            };
            println!(
                "{:<22} {:>9} {:>12.0} {:>14.1} {:>14.1} {:>16} {:>10} {:>12} {:>12}",
                row.scenario,
                row.events,
                row.rate,
                row.cpu_us,
                row.rss_mib,
                format!("{:.1}+{:.1}", row.anon_mib, row.file_mib),
                db(|d| d.transactions_per_s),
                db(|d| d.rows_written_per_s),
                db(|d| d.cpu_us_per_event)
            );
        }
    }
    if BILLED_TWICE.load(std::sync::atomic::Ordering::Relaxed) {
        std::process::exit(1);
    }
}
