//! Shared by the integration tests: Kafka clusters (librdkafka's mock cluster, a Tansu broker
//! process), producing events, reading dead letters, and configs pointing at an emulator.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// A dead letter as read back from the topic.
#[derive(Debug, Clone)]
pub struct ReadDeadLetter {
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl ReadDeadLetter {
    pub fn reason(&self) -> &str {
        self.headers
            .get("meterflow.reason")
            .map(String::as_str)
            .unwrap_or("")
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Produces payloads round-robin over `partitions`, waiting for each acknowledgement batch.
pub async fn produce(brokers: &str, topic: &str, partitions: i32, payloads: &[Vec<u8>]) {
    let p = producer(brokers);
    let keys: Vec<String> = (0..payloads.len()).map(|i| format!("k{i}")).collect();
    // `send_result` enqueues at once; `send` only when its future is polled, so awaiting sends
    // one after another costs a linger wait per message.
    for (c, (chunk, keys)) in payloads.chunks(5000).zip(keys.chunks(5000)).enumerate() {
        let mut pending = Vec::with_capacity(chunk.len());
        for (i, (payload, key)) in chunk.iter().zip(keys).enumerate() {
            let record = FutureRecord::to(topic)
                .payload(payload)
                .key(key)
                .partition(((c * 5000 + i) % partitions as usize) as i32);
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

/// Reads every message of `topic` from the beginning until `expected` are read or `timeout`.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<ReadDeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(hs) = m.headers() {
                for h in hs.iter() {
                    headers.insert(
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(ReadDeadLetter {
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Committed offsets of `group` on `topic`, summed over partitions.
pub fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(0).max(0))
        .sum()
}

/// A meterflow config for a billwerk emulator at `base_url`.
pub fn billwerk_config(
    brokers: &str,
    group: &str,
    topic: &str,
    dlq: &str,
    base_url: &str,
    ledger_url: &str,
) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
dead_letter_topic = "{dlq}"
session_timeout = "6s"
drain_timeout = "3s"
commit_interval = "200ms"

[kafka.properties]
"fetch.wait.max.ms" = "10"

# The tests' events carry fixed timestamps (2026-11-20) and assert the due dates the provider
# got: no age bound, or they would be dead-lettered once those dates are 35 days old.
[input]
max_age = "0"

[batch]
max_events = 200
max_wait = "20ms"

[sink]
kind = "billwerk"
base_url = "{base_url}"
client_id = "meterflow-emulator"
client_secret = "meterflow-emulator-secret"
concurrency = 16
request_timeout = "2s"

[rate_limit]
window = "1s"

[retry]
initial_backoff = "20ms"
max_backoff = "500ms"

[components]
api_calls = "5ce53069443e551b9caccc64"
storage_gb = "5ce53069443e551b9caccc65"

[[overrides]]
metric = "api_calls"
attributes = {{ plan = "enterprise" }}
price_per_unit = "0.0015"
name = "API calls (enterprise)"
description = "{{quantity}} API calls in {{attributes.region}}"

[ledger]
url = "{ledger_url}"

[admin]
listen = ""
"#
    )
}

/// A meterflow config for a Billingrails emulator at `base_url` (its `/v1` prefix included).
pub fn billingrails_config(
    brokers: &str,
    group: &str,
    topic: &str,
    dlq: &str,
    base_url: &str,
    ledger_url: &str,
) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
dead_letter_topic = "{dlq}"
session_timeout = "6s"
drain_timeout = "3s"
commit_interval = "200ms"

[kafka.properties]
"fetch.wait.max.ms" = "10"

# The tests' events carry fixed timestamps (2026-11-20) and assert the due dates the provider
# got: no age bound, or they would be dead-lettered once those dates are 35 days old.
[input]
max_age = "0"

[batch]
max_events = 200
max_wait = "20ms"

[sink]
kind = "billingrails"
base_url = "{base_url}"
api_key = "br_test_meterflow_emulator"
concurrency = 8
request_timeout = "2s"

[sink.billingrails]
batch_size = 100
account_property = "billingrails_account_id"
event_name = "{{metric}}"
price_property = "unit_price"
description_property = "description"

[rate_limit]
window = "1s"
limit = 5000

[retry]
initial_backoff = "20ms"
max_backoff = "500ms"

[components]
api_calls = "api_calls"
storage_gb = "storage_gb"

[[overrides]]
metric = "api_calls"
attributes = {{ plan = "enterprise" }}
price_per_unit = "0.0015"
description = "{{quantity}} API calls in {{attributes.region}}"

[ledger]
url = "{ledger_url}"

[admin]
listen = ""
"#
    )
}

/// A free loopback port.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Tansu broker process; killed on drop.
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    storage: String,
}

impl Tansu {
    /// The `tansu` binary, or `None` (tests then skip locally and fail in CI).
    pub fn binary() -> Option<PathBuf> {
        let candidates = [
            std::env::var("TANSU_BIN").ok().map(PathBuf::from),
            std::env::var("HOME")
                .ok()
                .map(|h| Path::new(&h).join(".cargo/bin/tansu")),
        ];
        for c in candidates.into_iter().flatten() {
            if c.exists() {
                return Some(c);
            }
        }
        Command::new("tansu")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| PathBuf::from("tansu"))
    }

    /// Starts a broker in `dir` with SQLite storage (it survives restarts).
    pub fn start(dir: &Path) -> Option<Tansu> {
        Self::start_with_storage(dir, "sqlite://broker.db")
    }

    /// Starts a broker with the given `--storage-engine` (`memory://tansu/` for benchmarks).
    pub fn start_with_storage(dir: &Path, storage: &str) -> Option<Tansu> {
        let port = free_port();
        let mut t = Tansu {
            child: None,
            port,
            dir: dir.to_path_buf(),
            storage: storage.into(),
        };
        t.spawn()?;
        Some(t)
    }

    fn spawn(&mut self) -> Option<()> {
        let bin = Self::binary()?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.join("tansu.log")).ok()?;
        let child = Command::new(bin)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .ok()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("tansu restarts");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Skips (returns `None`) without Tansu locally; panics in CI, where it must be installed.
pub fn require_tansu(dir: &Path) -> Option<Tansu> {
    match Tansu::start(dir) {
        Some(t) => Some(t),
        None if std::env::var("CI").is_ok() => {
            panic!("Tansu must be installed in CI (see .ci/run)")
        }
        None => {
            eprintln!("skipping: tansu not installed (cargo install tansu --version 0.6.0 --locked --features dynostore,libsql)");
            None
        }
    }
}

/// Creates topics on a real broker through the admin API.
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("create topic {t}: {e}");
            }
        }
    }
}

/// `meterflow run` as a child process, killed with SIGKILL.
pub struct Meterflow {
    child: Child,
}

impl Meterflow {
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> Meterflow {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("meterflow starts");
        Meterflow { child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Meterflow {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `meterflow run` once per entry of `max_events` (the config for it from `config`), on
/// topic `usage` (4 partitions) of `brokers`: every run but the last is killed with SIGKILL at a
/// random moment after it made progress; the last runs until all `n` offsets are committed (or
/// two minutes). Logs go to `dir/meterflow.log`. Returns the number of kills.
pub async fn kill_and_restart(
    brokers: &str,
    group: &str,
    n: usize,
    max_events: &[usize],
    seed: u64,
    dir: &Path,
    config: impl Fn(usize) -> String,
) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let log = dir.join("meterflow.log");
    let config_path = dir.join("meterflow.toml");
    let mut kills = 0;
    for (round, &max) in max_events.iter().enumerate() {
        std::fs::write(&config_path, config(max)).unwrap();
        let before = committed_total(brokers, group, "usage", 4);
        let mut meterflow = Meterflow::start(&config_path, &log);
        let last = round + 1 == max_events.len();
        // A killed member holds its partitions until its session times out: wait until this
        // run makes progress, then kill it at a random moment.
        let mut until = Instant::now() + Duration::from_secs(if last { 120 } else { 30 });
        let mut progressing = false;
        loop {
            let committed = committed_total(brokers, group, "usage", 4);
            if committed >= n as i64 || Instant::now() >= until {
                break;
            }
            if !last && !progressing && committed > before {
                progressing = true;
                until = Instant::now() + Duration::from_millis(rng.random_range(300..3000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        meterflow.kill();
        if !last {
            kills += 1;
        }
        eprintln!(
            "round {round} (max_events {max}): committed {} of {n}",
            committed_total(brokers, group, "usage", 4)
        );
    }
    kills
}

/// Polls `done` every 100 ms until it holds or `limit` has passed; says whether it held.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Lets the last offsets be stored and committed for `linger`, then stops a pipeline started
/// with `pipeline::run(.., async { stopped.await })` and waits (30 s at most) for its drain.
pub async fn stop_pipeline(
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
    linger: Duration,
) {
    tokio::time::sleep(linger).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("pipeline stops within the drain deadline")
        .unwrap()
        .unwrap();
}
