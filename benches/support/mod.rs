//! Shared by the benches that run `meterflow run` as a process of its own (throughput, peers):
//! flags, a process's CPU time and peak RSS from /proc, the bench's event shape, meterflow's
//! configs for a local HTTP sink, and `perf` around a run with benches/stage_cpu.py.
//!
//! Each bench declares `use meterflow_testkit as common;` at its root; this module uses it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::common;

/// The value after `name` on the command line (`--events 1000`).
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Whether `name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// The machine's load average (/proc/loadavg: 1, 5, 15 minutes, runnable/total, last pid).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// (user+system CPU seconds, peak RSS in KiB) of a process.
pub fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = 100.0; // CLK_TCK on Linux x86_64
    let cpu = fields
        .get(11)
        .zip(fields.get(12))
        .map(|(u, s)| (u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0)) / ticks)
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (cpu, status_kib(&status, "VmHWM:"))
}

/// A `/proc/PID/status` field in KiB (0 when missing).
fn status_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What `/proc/PID/status` says the process holds now, in KiB: (anonymous, file-backed).
/// Anonymous is the heap, stacks and librdkafka's buffers; file-backed is mostly the pages of
/// the binary and its shared libraries, shared with other processes and reclaimable. `VmHWM`
/// ([`usage`]) is the peak of both together.
pub fn resident_split(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        status_kib(&status, "RssAnon:"),
        status_kib(&status, "RssFile:"),
    )
}

/// The release build of the workspace's `meterflow` binary (cargo bench builds it).
pub fn meterflow() -> &'static str {
    env!("CARGO_BIN_EXE_meterflow")
}

/// Records the topic's partitions hold (high minus low watermark).
pub fn held(brokers: &str, topic: &str, partitions: i32) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (high - low) as usize
        })
        .sum()
}

/// The bench's event `i` of run `run`: ~220 bytes, an enterprise-plan `api_calls` event (the
/// configs' override prices it at 0.0015 and renders a description).
pub fn event(run: u32, i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": format!("b{run}_{i}"),
        "contract_id": "5cd186af443e551fe8e4f5dd",
        "metric": "api_calls",
        "quantity": (i % 500) + 1,
        "timestamp": "2026-11-20T10:15:00Z",
        "attributes": {"plan": "enterprise", "region": "eu-west-1"}
    }))
    .unwrap()
}

pub use meterflow::config::SinkKind;

/// meterflow's config for a sink at `base_url` that sends no rate-limit headers (the emulator
/// without a limit, nginx): billwerk one usage record per event at concurrency 64; Billingrails
/// batches of 100 at concurrency 16. `base_url` is the provider's base (billwerk: the host;
/// Billingrails: with its `/v1`). Logs at warn.
///
/// Every benchmark event bills one contract, so the per-contract share is the whole
/// concurrency: meterflow's default (a quarter of it) would keep 16 billwerk requests in
/// flight where the peer is given 64.
pub fn meterflow_config(
    sink: SinkKind,
    brokers: &str,
    group: &str,
    topic: &str,
    dlq: &str,
    base_url: &str,
    ledger: &str,
) -> String {
    match sink {
        SinkKind::Billwerk => common::billwerk_config(brokers, group, topic, dlq, base_url, ledger)
            .concurrency(64)
            .concurrency_per_contract(64),
        SinkKind::Billingrails => {
            common::billingrails_config(brokers, group, topic, dlq, base_url, ledger)
                .concurrency(16)
                .concurrency_per_contract(16)
        }
    }
    .max_events(500)
    // No rate-limit headers come back: tell meterflow the budget.
    .rate_limit(Some(10_000_000))
    .log_level("warn")
    .to_toml()
}

/// `perf record` of process `pid` (cpu-clock, DWARF call stacks) into `out`. perf follows only
/// the threads that exist when it attaches: start it once the process is delivering.
pub fn start_perf(pid: u32, out: &Path) -> Child {
    Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "499"])
        .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf record starts (apt-get install linux-perf)")
}

/// Stops a `perf record` (SIGINT, so it writes its file) and waits for it.
pub fn stop_perf(mut recorder: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &recorder.id().to_string()])
        .status();
    let _ = recorder.wait();
}

/// `perf script` through benches/stage_cpu.py: the share of meterflow's CPU per stage.
pub fn print_stage_shares(perf_data: &Path) {
    let mut script = Command::new("perf")
        .args(["script", "-F", "comm,tid,time,ip,sym", "-i"])
        .arg(perf_data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf script runs");
    let classify = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/stage_cpu.py"))
        .stdin(script.stdout.take().unwrap())
        .output()
        .expect("python3 runs");
    let _ = script.wait();
    println!("{}", String::from_utf8_lossy(&classify.stdout));
}
