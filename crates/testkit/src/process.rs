//! `meterflow run` as a child process, and runs of it killed with SIGKILL.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meterflow::config::builder::ConfigBuilder;

use crate::committed_total;

/// `meterflow run` as a child process, killed with SIGKILL.
pub struct Meterflow {
    child: Child,
}

impl Meterflow {
    /// Starts `bin run --config config`, its log appended to `log`. `bin` is the test's
    /// `env!("CARGO_BIN_EXE_meterflow")`: cargo tells only the product crate's own tests and
    /// benchmarks where its binary is.
    pub fn start(bin: &Path, config: &Path, log: &Path) -> Meterflow {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
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

/// Runs `bin run` (see [`Meterflow::start`]) once per entry of `max_events` (the config for it
/// from `config`), on topic `usage` (4 partitions) of `brokers`: every run but the last is killed
/// with SIGKILL at a random moment after it made progress; the last runs until all `n` offsets are
/// committed (or two minutes). Logs go to `dir/meterflow.log`. Returns the number of kills.
// Each argument is named at its (two) call sites; a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn kill_and_restart(
    bin: impl AsRef<Path>,
    brokers: &str,
    group: &str,
    n: usize,
    max_events: &[usize],
    seed: u64,
    dir: &Path,
    config: impl Fn(usize) -> ConfigBuilder,
) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let log = dir.join("meterflow.log");
    let config_path = dir.join("meterflow.toml");
    let mut kills = 0;
    for (round, &max) in max_events.iter().enumerate() {
        std::fs::write(&config_path, config(max).to_toml()).unwrap();
        let before = committed_total(brokers, group, "usage", 4);
        let mut meterflow = Meterflow::start(bin.as_ref(), &config_path, &log);
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
