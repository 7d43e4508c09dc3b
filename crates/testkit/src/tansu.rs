//! A Tansu broker process for the tests that need a real Kafka protocol peer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

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
