//! meterflow and a peer (Vector) side by side on the same work (issue 13):
//!
//! `cargo bench --bench peers [-- --vector PATH] [--events N] [--runs N] [--paths p1,p2]
//!  [--ledgers none,sqlite,postgres] [--perf]`
//!
//! - One broker process for every run: Tansu (memory storage), one topic of 4 partitions,
//!   `fetch.wait.max.ms` 10 for both consumers (Tansu holds each fetch for the full wait).
//! - One nginx process as the sink (generated config in a temp dir, loopback, `access_log off`),
//!   answering at once: billwerk's token (`POST /oauth/token/`) and usage
//!   (`POST /api/v1/contracts/{id}/usage`, 201), Billingrails' batch and single ingestion (202,
//!   "queued"). Its `stub_status` request counter is the measure; the bench's own polls are
//!   subtracted, and so are the requests that carry no events (token, meterflow's readiness probe
//!   of the base URL): the only ones with an access log.
//! - The same events for every run, produced once, one record per produce batch (`linger.ms` 0,
//!   `batch.num.messages` 1: Tansu's memory storage skips the rest of a batch when a fetch starts
//!   inside it) and read back by a plain consumer before any tool runs. Each run reads them from
//!   the earliest offset under a consumer group of its own.
//! - P1: one billwerk usage POST per event (meterflow's billwerk sink, concurrency 64; Vector's
//!   http sink, `batch.max_events` 1, `request.concurrency` 64). P2: batches of 100 (meterflow's
//!   Billingrails sink, concurrency 16; Vector's http sink, `batch.max_events` 100, a JSON array
//!   wrapped as Billingrails' `{"events": [...]}`, `request.concurrency` 16). meterflow runs with
//!   each `--ledgers` entry (none, SQLite, PostgreSQL in a scratch database); Vector has no ledger.
//! - Vector: `kafka` source → `remap` (prices each event as meterflow's config does: component by
//!   metric, the enterprise override's unit price, quantity × price, the rendered description) →
//!   `http` sink, end-to-end acknowledgements on (offsets stored once the sink has its answer).
//!   The config is checked with `vector validate --no-environment` first.
//! - `--runs N` (default 3) rounds; the order of the tools rotates from one round to the next.
//!   Medians are printed.
//!
//! events/s: from the first request at the sink to the request that brings the count to 95 % of
//! the target (the issue's "time runs to the 190 000th request" of 200 000; P2: 95 % of
//! ⌈events/100⌉ batches, counted as 100 events each), so neither the group join nor the last
//! flush timers are in it. CPU µs/event: utime+stime of the tool's process over the same span,
//! per event. Peak RSS: VmHWM at the end. A run is complete when the sink saw every request (P1:
//! one per event; P2: at least ⌈events/100⌉ batches) and the tool's group committed every offset;
//! a short run is reported and the bench exits non-zero.
//!
//! Without `--vector` meterflow runs alone and the peer columns say so. `--perf` records each
//! meterflow run over the measured span (benches/stage_cpu.py, as `throughput -- --perf`).
//! Logs and configs of every run are kept in `target/bench-peers/`.

use meterflow_testkit as common;
mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meterflow::ack::ledger::scratch::{self, ScratchDatabase};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::{arg, flag, meterflow, usage, SinkKind};

const PARTITIONS: i32 = 4;
const CONTRACT: &str = "5cd186af443e551fe8e4f5dd";
const BATCH: u64 = 100;

/// nginx as the sink: its own process, config and files in a temp dir.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: String,
    /// `stub_status` requests this bench made (each counts itself).
    polls: u64,
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        let port = common::free_port();
        let addr = format!("127.0.0.1:{port}");
        let d = dir.display();
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # Neither client should pay for reconnects (the default closes a connection after 1000).
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen {addr};
        # Requests that carry no events (the token, meterflow's readiness probe of the base URL,
        # anything else) are logged, to be subtracted; usage and batch requests are not.
        location / {{
            access_log {d}/uncounted.log;
            return 404 '{{"message":"not found"}}';
        }}
        location = /oauth/token/ {{
            access_log {d}/uncounted.log;
            return 200 '{{"access_token":"bench-token","token_type":"bearer","expires_in":86400}}';
        }}
        location ~ ^/api/v1/contracts/[^/]+/usage$ {{
            return 201 '{{"Id":"bench-usage"}}';
        }}
        location = /v1/events/batch {{
            return 202 '{{"message":"Events queued for processing"}}';
        }}
        location = /v1/events/ingest {{
            return 202 '{{"message":"Event queued for processing"}}';
        }}
        location = /nginx_status {{
            stub_status;
        }}
    }}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts (apt-get install -y nginx)");
        let mut nginx = Nginx {
            child,
            dir: dir.to_path_buf(),
            addr,
            polls: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while nginx.requests().is_none() {
            assert!(
                Instant::now() < deadline,
                "nginx did not answer; its log: {}",
                dir.join("error.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// Requests nginx counted, less this bench's own `stub_status` polls.
    fn requests(&mut self) -> Option<u64> {
        let mut s = std::net::TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /nginx_status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        self.polls += 1;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        // "Active connections: 1 \nserver accepts handled requests\n 5 5 9 \nReading: ..."
        let body = out.split_once("\r\n\r\n")?.1;
        let counters = body.lines().nth(2)?;
        let requests: u64 = counters.split_whitespace().nth(2)?.parse().ok()?;
        Some(requests.saturating_sub(self.polls))
    }

    /// Requests that carry no events so far (their access log, one line each).
    fn uncounted(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("uncounted.log"))
            .map(|t| t.lines().count() as u64)
            .unwrap_or(0)
    }

    /// Usage and batch requests so far.
    fn delivered(&mut self) -> Option<u64> {
        let requests = self.requests()?;
        Some(requests.saturating_sub(self.uncounted()))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> PathBuf {
    [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("nginx"))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Work {
    /// One billwerk usage POST per event.
    P1,
    /// Batches of 100 events per request.
    P2,
}

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::P1 => "P1",
            Work::P2 => "P2",
        }
    }
    /// Requests at the sink when every event arrived.
    fn requests(self, events: u64) -> u64 {
        match self {
            Work::P1 => events,
            Work::P2 => events.div_ceil(BATCH),
        }
    }
    /// Events one request carries (P2: counted as full batches).
    fn per_request(self) -> u64 {
        match self {
            Work::P1 => 1,
            Work::P2 => BATCH,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Ledger {
    None,
    Sqlite,
    Postgres,
}

impl Ledger {
    fn name(self) -> &'static str {
        match self {
            Ledger::None => "none",
            Ledger::Sqlite => "sqlite",
            Ledger::Postgres => "postgres",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Tool {
    Meterflow(Ledger),
    Vector,
}

impl Tool {
    fn label(self) -> String {
        match self {
            Tool::Meterflow(l) => format!("meterflow ledger={}", l.name()),
            Tool::Vector => "vector".to_string(),
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
struct Measure {
    rate: f64,
    cpu_us: f64,
    rss_mib: f64,
    requests: u64,
    committed: i64,
    complete: bool,
}

struct Bench {
    brokers: String,
    topic: String,
    dlq: String,
    events: u64,
    logs: PathBuf,
    scratch: PathBuf,
    vector: Option<PathBuf>,
    perf: bool,
}

impl Bench {
    /// Starts `tool` on `work` under a new consumer group, measures it at the sink, stops it.
    async fn run(&self, nginx: &mut Nginx, work: Work, tool: Tool, round: usize) -> Measure {
        let tag = format!(
            "{}-{}-r{round}",
            work.name().to_lowercase(),
            tool.label().replace([' ', '='], "-")
        );
        let group = format!("{tag}-{:08x}", rand::random::<u32>());
        let log_path = self.logs.join(format!("{tag}.log"));
        let config = self.logs.join(format!(
            "{tag}.{}",
            if tool == Tool::Vector {
                "toml"
            } else {
                "mf.toml"
            }
        ));
        let mut postgres: Option<ScratchDatabase> = None;
        let mut command = match tool {
            Tool::Meterflow(ledger) => {
                let ledger_url = match ledger {
                    Ledger::None => "none".to_string(),
                    Ledger::Sqlite => {
                        let file = self.scratch.join(format!("{group}.db"));
                        format!("sqlite://{}", file.display())
                    }
                    Ledger::Postgres => {
                        let db = ScratchDatabase::create(&scratch::server_url())
                            .await
                            .expect("a scratch PostgreSQL database (127.0.0.1:5432)");
                        let url = db.url.clone();
                        postgres = Some(db);
                        url
                    }
                };
                let (sink, base_url) = match work {
                    Work::P1 => (SinkKind::Billwerk, format!("http://{}", nginx.addr)),
                    Work::P2 => (SinkKind::Billingrails, format!("http://{}/v1", nginx.addr)),
                };
                let text = support::meterflow_config(
                    sink,
                    &self.brokers,
                    &group,
                    &self.topic,
                    &self.dlq,
                    &base_url,
                    &ledger_url,
                );
                std::fs::write(&config, text).unwrap();
                let mut c = Command::new(meterflow());
                c.args(["run", "--config"]).arg(&config);
                c
            }
            Tool::Vector => {
                let data_dir = self.scratch.join(format!("{group}-vector"));
                std::fs::create_dir_all(&data_dir).unwrap();
                let text = vector_config(
                    work,
                    &self.brokers,
                    &group,
                    &self.topic,
                    &nginx.addr,
                    &data_dir,
                );
                std::fs::write(&config, text).unwrap();
                let mut c = Command::new(self.vector.as_ref().expect("--vector"));
                c.arg("--config").arg(&config).env("VECTOR_LOG", "warn");
                c
            }
        };
        let base = nginx.delivered().expect("nginx answers");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the tool starts");
        let pid = child.id();
        let perf_data = self.logs.join(format!("{tag}.perf.data"));
        let mut recorder = None;
        let expected = work.requests(self.events);
        let target = expected * 95 / 100;
        let started = Instant::now();
        let mut first: Option<(Instant, u64, f64)> = None;
        let mut at_target: Option<(Instant, u64, f64)> = None;
        let mut progress = (Instant::now(), 0u64);
        let mut last_commit_check = Instant::now();
        let mut committed = 0i64;
        let mut exited = false;
        let n = loop {
            let n = nginx.delivered().unwrap_or(base).saturating_sub(base);
            let now = Instant::now();
            if n > progress.1 {
                progress = (now, n);
            }
            if first.is_none() && n > 0 {
                first = Some((now, n, usage(pid).0));
                if self.perf && matches!(tool, Tool::Meterflow(_)) {
                    recorder = Some(support::start_perf(pid, &perf_data));
                }
            }
            if at_target.is_none() && n >= target {
                at_target = Some((now, n, usage(pid).0));
                if let Some(r) = recorder.take() {
                    support::stop_perf(r);
                }
            }
            if n >= expected && now - last_commit_check > Duration::from_millis(500) {
                // Every request arrived (P2: at least as many batches as full ones would
                // take): done once the group committed every offset.
                last_commit_check = now;
                committed = common::committed_total(&self.brokers, &group, &self.topic, PARTITIONS);
                if committed >= self.events as i64 {
                    break n;
                }
            }
            let stalled = match first {
                Some(_) => now - progress.0 > Duration::from_secs(30),
                None => now - started > Duration::from_secs(120),
            };
            if stalled {
                eprintln!(
                    "{}: no progress at {n} of {expected} requests; its log: {}",
                    tool.label(),
                    log_path.display()
                );
                break n;
            }
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "{} exited early ({status}); its log: {}",
                    tool.label(),
                    log_path.display()
                );
                exited = true;
                break n;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (_, rss) = usage(pid);
        if let Some(r) = recorder.take() {
            support::stop_perf(r);
        }
        if !exited {
            terminate(&mut child);
        }
        if committed < self.events as i64 {
            committed = common::committed_total(&self.brokers, &group, &self.topic, PARTITIONS);
        }
        drop(postgres);
        if self.perf && matches!(tool, Tool::Meterflow(_)) && perf_data.exists() {
            println!(
                "{} {}: CPU per stage over the measured span",
                work.name(),
                tool.label()
            );
            support::print_stage_shares(&perf_data);
        }
        let complete = n >= expected && committed >= self.events as i64;
        if !complete {
            eprintln!(
                "{} {}: SHORT — {n} of {expected} requests at the sink, {committed} of {} offsets \
                 committed; its log: {}",
                work.name(),
                tool.label(),
                self.events,
                log_path.display()
            );
        }
        match (first, at_target) {
            (Some((t0, n0, cpu0)), Some((t1, n1, cpu1))) => {
                let counted = n1.saturating_sub(n0).max(1) * work.per_request();
                let secs = (t1 - t0).as_secs_f64().max(0.001);
                Measure {
                    rate: counted as f64 / secs,
                    cpu_us: (cpu1 - cpu0) * 1e6 / counted as f64,
                    rss_mib: rss as f64 / 1024.0,
                    requests: n,
                    committed,
                    complete,
                }
            }
            _ => Measure {
                rate: 0.0,
                cpu_us: 0.0,
                rss_mib: rss as f64 / 1024.0,
                requests: n,
                committed,
                complete: false,
            },
        }
    }
}

/// SIGTERM, then SIGKILL after 20 s.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Vector doing meterflow's job: Kafka → price each event → the sink's request shape.
fn vector_config(
    work: Work,
    brokers: &str,
    group: &str,
    topic: &str,
    nginx: &str,
    data_dir: &Path,
) -> String {
    // meterflow's bench config: api_calls and storage_gb are components; the enterprise plan's
    // api_calls are overridden to 0.0015 a unit, named, and described from the event.
    let price = r#"
component = if .metric == "api_calls" { "5ce53069443e551b9caccc64" } else if .metric == "storage_gb" { "5ce53069443e551b9caccc65" } else { null }
if component == null { abort }
enterprise = .metric == "api_calls" && .attributes.plan == "enterprise"
description = (to_string(.quantity) ?? "") + " API calls in " + (to_string(.attributes.region) ?? "")
"#;
    let (shape, sink) = match work {
        Work::P1 => (
            r#"
body = { "ComponentId": component, "Quantity": .quantity, "DueDate": .timestamp, "Memo": .id }
if enterprise {
  body.ProductOverride = { "PricePerUnit": 0.0015, "Name": "API calls (enterprise)", "Description": description }
  body.Amount = (to_float(.quantity) ?? 0.0) * 0.0015
}
. = body
"#,
            format!(
                r#"uri = "http://{nginx}/api/v1/contracts/{CONTRACT}/usage"
batch.max_events = 1
request.concurrency = 64
"#
            ),
        ),
        Work::P2 => (
            r#"
properties = { "billingrails_account_id": .contract_id, "quantity": .quantity, "plan": .attributes.plan, "region": .attributes.region }
if enterprise {
  properties.unit_price = 0.0015
  properties.description = description
  properties.amount = (to_float(.quantity) ?? 0.0) * 0.0015
}
. = { "event_name": .metric, "idempotency_key": .id, "properties": properties, "timestamp": .timestamp }
"#,
            format!(
                r#"uri = "http://{nginx}/v1/events/batch"
batch.max_events = {BATCH}
request.concurrency = 16
payload_prefix = '{{"events":'
payload_suffix = '}}'
"#
            ),
        ),
    };
    format!(
        r#"data_dir = "{data_dir}"

[sources.kafka]
type = "kafka"
bootstrap_servers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
auto_offset_reset = "earliest"
fetch_wait_max_ms = 10
commit_interval_ms = 200
decoding.codec = "json"

[transforms.price]
type = "remap"
inputs = ["kafka"]
source = '''{price}{shape}'''

[sinks.provider]
type = "http"
inputs = ["price"]
method = "post"
encoding.codec = "json"
healthcheck.enabled = false
acknowledgements.enabled = true
{sink}"#,
        data_dir = data_dir.display()
    )
}

/// Checks a Vector config with `vector validate --no-environment`.
fn validate_vector(vector: &Path, config: &Path) {
    let out = Command::new(vector)
        .args(["validate", "--no-environment"])
        .arg(config)
        .output()
        .expect("vector runs");
    if !out.status.success() {
        eprintln!(
            "vector validate --no-environment {} failed:\n{}{}",
            config.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::process::exit(1);
    }
}

/// Produces the events one record per produce request: a fetch then never starts inside a
/// batch (Tansu's memory storage would skip the rest of it).
async fn produce_one_per_batch(brokers: &str, topic: &str, payloads: &[Vec<u8>]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer");
    for (c, chunk) in payloads.chunks(5000).enumerate() {
        let mut pending = Vec::with_capacity(chunk.len());
        for (i, payload) in chunk.iter().enumerate() {
            let n = c * 5000 + i;
            let key = format!("k{n}");
            let record = FutureRecord::to(topic)
                .payload(payload)
                .key(&key)
                .partition((n % PARTITIONS as usize) as i32);
            match p.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => panic!("cannot enqueue: {e}"),
            }
        }
        for f in pending {
            f.await
                .expect("delivery reported")
                .expect("produce acknowledged");
        }
    }
}

/// A plain consumer reads every offset of every partition back: (records, seconds).
fn read_back(brokers: &str, topic: &str, events: u64) -> (u64, f64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("read-back-{:08x}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let mut high = Vec::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        let (_, h) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        high.push(h);
    }
    consumer.assign(&tpl).expect("assign");
    let mut next = vec![0i64; PARTITIONS as usize];
    let mut read = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    while read < events && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let p = m.partition() as usize;
                if m.offset() != next[p] {
                    eprintln!(
                        "partition {p}: read offset {} where {} was next (records skipped)",
                        m.offset(),
                        next[p]
                    );
                    std::process::exit(1);
                }
                next[p] += 1;
                read += 1;
            }
            Some(Err(e)) => eprintln!("read-back: {e}"),
            None => {}
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if read < events || next != high {
        eprintln!("read back {read} of {events} records (next offsets {next:?}, high watermarks {high:?})");
        std::process::exit(1);
    }
    (read, secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn list(name: &str, default: &str) -> Vec<String> {
    arg(name)
        .unwrap_or_else(|| default.to_string())
        .split(',')
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = arg("--events")
        .and_then(|e| e.parse().ok())
        .unwrap_or(200_000);
    let runs: usize = arg("--runs")
        .and_then(|e| e.parse().ok())
        .unwrap_or(3)
        .max(1);
    let works: Vec<Work> = list("--paths", "p1,p2")
        .iter()
        .map(|p| match p.as_str() {
            "p1" => Work::P1,
            "p2" => Work::P2,
            other => {
                eprintln!("--paths {other}: expected p1 and/or p2");
                std::process::exit(2);
            }
        })
        .collect();
    let ledgers: Vec<Ledger> = list("--ledgers", "none,sqlite,postgres")
        .iter()
        .map(|l| match l.as_str() {
            "none" => Ledger::None,
            "sqlite" => Ledger::Sqlite,
            "postgres" => Ledger::Postgres,
            other => {
                eprintln!("--ledgers {other}: expected none, sqlite, postgres");
                std::process::exit(2);
            }
        })
        .collect();
    let vector = arg("--vector").map(PathBuf::from);
    if let Some(v) = &vector {
        if !v.exists() {
            eprintln!("--vector {}: no such file", v.display());
            std::process::exit(2);
        }
    }
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-peers");
    std::fs::create_dir_all(&logs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let Some(tansu) = common::Tansu::start_with_storage(dir.path(), "memory://tansu/") else {
        eprintln!("needs tansu (cargo install tansu --version 0.6.0 --locked --features dynostore,libsql)");
        std::process::exit(2);
    };
    let brokers = tansu.brokers();
    let run_id = rand::random::<u32>();
    let bench = Bench {
        brokers: brokers.clone(),
        topic: format!("peers-{run_id:08x}"),
        dlq: format!("peers-dlq-{run_id:08x}"),
        events,
        logs: logs.clone(),
        scratch: dir.path().to_path_buf(),
        vector: vector.clone(),
        perf: flag("--perf"),
    };
    if let Some(v) = &vector {
        for work in &works {
            let config = logs.join(format!("validate-{}.toml", work.name().to_lowercase()));
            let data_dir = dir.path().join("validate");
            std::fs::create_dir_all(&data_dir).unwrap();
            std::fs::write(
                &config,
                vector_config(
                    *work,
                    &brokers,
                    "validate",
                    &bench.topic,
                    "127.0.0.1:1",
                    &data_dir,
                ),
            )
            .unwrap();
            validate_vector(v, &config);
        }
        let version = Command::new(v)
            .arg("--version")
            .output()
            .expect("vector runs");
        println!("peer: {}", String::from_utf8_lossy(&version.stdout).trim());
    } else {
        println!(
            "peer: none (no --vector PATH): meterflow runs alone, the peer columns are missing"
        );
    }
    common::create_topics(&brokers, &[(&bench.topic, PARTITIONS), (&bench.dlq, 1)]).await;
    let payloads: Vec<Vec<u8>> = (0..events as usize)
        .map(|i| support::event(run_id, i))
        .collect();
    let produced = Instant::now();
    produce_one_per_batch(&brokers, &bench.topic, &payloads).await;
    println!(
        "broker: tansu 0.6 (memory storage), {PARTITIONS} partitions; {events} events produced \
         one per batch in {:.1} s",
        produced.elapsed().as_secs_f64()
    );
    drop(payloads);
    let (read, secs) = read_back(&brokers, &bench.topic, events);
    println!(
        "read back: every offset, {read} records by a plain consumer in {secs:.1} s ({:.0}/s)",
        read as f64 / secs.max(0.001)
    );
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).unwrap();
    let mut nginx = Nginx::start(&nginx_dir);
    println!(
        "sink: nginx at {} (stub_status polled every 10 ms)",
        nginx.addr
    );
    println!("load average before: {}", support::load_average());

    let mut tools: Vec<Tool> = Vec::new();
    if vector.is_some() {
        tools.push(Tool::Vector);
    }
    tools.extend(ledgers.iter().map(|l| Tool::Meterflow(*l)));
    let mut results: Vec<(Work, Tool, Measure)> = Vec::new();
    println!(
        "{:<4} {:<5} {:<27} {:>10} {:>13} {:>9} {:>9} {:>9} {:>6}",
        "path",
        "round",
        "tool",
        "events/s",
        "CPU µs/event",
        "RSS MiB",
        "requests",
        "committed",
        "load1"
    );
    for work in &works {
        for round in 0..runs {
            let mut order = tools.clone();
            order.rotate_left(round % tools.len().max(1));
            for tool in order {
                let m = bench.run(&mut nginx, *work, tool, round).await;
                let load1 = support::load_average()
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                println!(
                    "{:<4} {:<5} {:<27} {:>10.0} {:>13.1} {:>9.1} {:>9} {:>9} {:>6}{}",
                    work.name(),
                    round + 1,
                    tool.label(),
                    m.rate,
                    m.cpu_us,
                    m.rss_mib,
                    m.requests,
                    m.committed,
                    load1,
                    if m.complete { "" } else { "  SHORT" }
                );
                results.push((*work, tool, m));
            }
        }
    }
    println!("load average after: {}", support::load_average());
    println!();
    println!(
        "Medians over {runs} run(s), {events} events; events/s and CPU over the first request to \
         the one reaching 95 % of the requests (P1: the {}th of {events}; P2: batches, 100 events \
         each). Ratios are meterflow / vector.",
        events * 95 / 100
    );
    println!();
    println!("| path | tool | events/s | CPU µs/event | peak RSS MiB | all arrived | events/s ratio | CPU ratio | RSS ratio |");
    println!("|---|---|---:|---:|---:|---|---:|---:|---:|");
    let mut short = false;
    for work in &works {
        let med = |tool: Tool| {
            let ms: Vec<&Measure> = results
                .iter()
                .filter(|(w, t, _)| w == work && *t == tool)
                .map(|(_, _, m)| m)
                .collect();
            (
                median(ms.iter().map(|m| m.rate).collect()),
                median(ms.iter().map(|m| m.cpu_us).collect()),
                median(ms.iter().map(|m| m.rss_mib).collect()),
                ms.iter().all(|m| m.complete),
            )
        };
        let peer = vector.as_ref().map(|_| med(Tool::Vector));
        for tool in &tools {
            let (rate, cpu, rss, complete) = med(*tool);
            short |= !complete;
            let ratios = match (tool, peer) {
                (Tool::Vector, _) => "— | — | —".to_string(),
                (_, Some((pr, pc, pm, _))) => {
                    format!("{:.2} | {:.2} | {:.2}", rate / pr, cpu / pc, rss / pm)
                }
                (_, None) => "no peer | no peer | no peer".to_string(),
            };
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |",
                work.name(),
                tool.label(),
                rate,
                cpu,
                rss,
                if complete { "yes" } else { "**no**" },
                ratios
            );
        }
        if vector.is_none() {
            println!(
                "| {} | vector | missing (no --vector) | | | | | | |",
                work.name()
            );
        }
    }
    drop(nginx);
    drop(tansu);
    if short {
        eprintln!("some runs were short: not every event arrived (see above)");
        std::process::exit(1);
    }
}
