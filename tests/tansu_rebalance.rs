//! A minimal reproduction of a Tansu 0.6.0 group-coordinator bug, without meterflow: two plain
//! librdkafka consumers in one group, one of them killed with SIGKILL. When the killed member
//! is the group's leader, the survivor is never given its partitions (Kafka gives them within
//! the session timeout plus a rebalance). `docs/tansu-rebalance.md` has the logs and the cause.
//!
//! Both tests are ignored: the first fails on Tansu 0.6.0 by design (it states what Kafka does),
//! the second is its control. Run them by hand after a Tansu upgrade:
//! `cargo nextest run --test tansu_rebalance --run-ignored ignored-only`.
//!
//! Each member is a child process (this test binary again, running `member_process`), so that
//! it can die without leaving the group, as a crashed replica does.

use meterflow_testkit as common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const MEMBER_ENV: &str = "METERFLOW_TANSU_REPRO_MEMBER";
const SESSION_TIMEOUT_MS: &str = "10000";
const PARTITIONS: i64 = 4;

/// The member: joins `group`, polls, and prints its assignment's size whenever it changes.
/// Does nothing unless started by [`spawn_member`].
#[test]
#[ignore = "a child process of the reproduction, not a test"]
fn member_process() {
    let Ok(spec) = std::env::var(MEMBER_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let (brokers, group, topic) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Long enough that no member expires during the follower's join pause (3 s in Tansu),
        // with frequent heartbeats: only the killed member's session can run out.
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut last = -1;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
        let now = consumer
            .assignment()
            .map(|a| a.count() as i64)
            .unwrap_or(-1);
        if now != last {
            println!("assignment {now}");
            last = now;
        }
    }
}

struct Member {
    child: Child,
    assigned: Arc<AtomicI64>,
}

fn spawn_member(brokers: &str, group: &str, topic: &str) -> Member {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["member_process", "--exact", "--ignored", "--nocapture"])
        .env(MEMBER_ENV, format!("{brokers}|{group}|{topic}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("member starts");
    let assigned = Arc::new(AtomicI64::new(-1));
    let seen = assigned.clone();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("assignment ") {
                seen.store(n.trim().parse().unwrap_or(-1), Ordering::Release);
            }
        }
    });
    Member { child, assigned }
}

impl Member {
    fn assigned(&self) -> i64 {
        self.assigned.load(Ordering::Acquire)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// A joins first (Tansu makes the first member the leader), B second; once both hold
/// partitions, one is killed. Returns how long the survivor took to hold every partition
/// (`None` after 60 s), or `None` when Tansu is not installed (skipped).
async fn survivor_takeover(kill_leader: bool) -> Option<Option<Duration>> {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::require_tansu(dir.path())?;
    let brokers = broker.brokers();
    let run = rand::random::<u32>();
    let (topic, group) = (format!("repro-{run}"), format!("repro-{run}"));
    common::create_topics(&brokers, &[(&topic, PARTITIONS as i32)]).await;

    let a = spawn_member(&brokers, &group, &topic);
    assert!(
        wait(Duration::from_secs(30), || a.assigned() == PARTITIONS),
        "A alone holds every partition"
    );
    let b = spawn_member(&brokers, &group, &topic);
    assert!(
        wait(Duration::from_secs(60), || a.assigned() > 0
            && b.assigned() > 0
            && a.assigned() + b.assigned() == PARTITIONS),
        "A and B share the partitions (A {}, B {})",
        a.assigned(),
        b.assigned()
    );
    std::thread::sleep(Duration::from_secs(3));
    let (mut victim, survivor) = if kill_leader { (a, b) } else { (b, a) };
    let _ = victim.child.kill();
    let _ = victim.child.wait();
    let killed = Instant::now();
    let took = wait(Duration::from_secs(60), || {
        survivor.assigned() == PARTITIONS
    })
    .then(|| killed.elapsed());
    println!(
        "killed the {}: survivor holds {} of {PARTITIONS} partitions after {:.1}s",
        if kill_leader { "leader" } else { "follower" },
        survivor.assigned(),
        killed.elapsed().as_secs_f64()
    );
    drop(survivor);
    drop(broker);
    Some(took)
}

/// Fails on Tansu 0.6.0: the dead leader stays the group's leader, and the survivor is never
/// assigned anything again. Kafka re-elects a leader among the live members.
#[tokio::test]
#[ignore = "fails on Tansu 0.6.0 (docs/tansu-rebalance.md); run by hand after an upgrade"]
async fn tansu_survivor_takes_over_when_the_group_leader_dies() {
    let Some(outcome) = survivor_takeover(true).await else {
        return;
    };
    let Some(took) = outcome else {
        panic!("the survivor was not given the dead leader's partitions within 60 s");
    };
    println!("took over after {:.1}s", took.as_secs_f64());
}

/// The control: when the killed member is not the leader, Tansu 0.6.0 hands its partitions to
/// the survivor once its session has timed out.
#[tokio::test]
#[ignore = "the control of the reproduction above; needs Tansu, run by hand"]
async fn tansu_survivor_takes_over_when_a_follower_dies() {
    let Some(took) = survivor_takeover(false).await else {
        return;
    };
    assert!(
        took.is_some(),
        "the survivor was given the dead follower's partitions"
    );
}
