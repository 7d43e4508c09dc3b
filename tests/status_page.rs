//! The status page at the admin server's `/`, read by headless Chromium (Debian's `chromium`):
//! - against `meterflow demo` running as its own process, as a user starts it: the address it
//!   prints serves a page that shows the usage topic's partitions and the pacer;
//! - with a `<script>` in a logged error text: Chromium's DOM holds it as text, not as an element.
//!
//! Without Chromium these tests skip with a message, and fail under CI (`CI=true`).
//! `METERFLOW_STATUS_SCREENSHOT=docs/status-page.png` also writes the demo's screenshot there.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meterflow::admin::{self, AdminState, Readiness, StatusBoard};

/// The Chromium binary, or `None` (after saying so) when it is not installed outside CI.
fn chromium() -> Option<PathBuf> {
    let candidates = [
        std::env::var("METERFLOW_CHROMIUM").unwrap_or_default(),
        "chromium".into(),
        "chromium-browser".into(),
    ];
    for c in candidates.iter().filter(|c| !c.is_empty()) {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Some(PathBuf::from(c));
        }
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("chromium is not installed: .ci/run installs Debian's chromium package");
    }
    eprintln!("skipping: chromium is not installed (apt-get install chromium)");
    None
}

/// Runs headless Chromium on `url` with `args` (a fresh profile each time), within 60 s.
fn run_chromium(chromium: &Path, url: &str, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium failed: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

fn dump_dom(chromium: &Path, url: &str) -> String {
    run_chromium(chromium, url, &["--dump-dom".into()])
}

/// `meterflow demo` as its own process; killed if the test ends early.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_the_status_page_and_chromium_shows_partitions_and_pacer() {
    let Some(chromium) = chromium() else { return };
    // A low limit and many events: the run lasts long enough to look at, and the provider's
    // rate-limit headers fill the pacer's figures.
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_meterflow"))
            .args([
                "demo",
                "--events",
                "15000",
                "--limit",
                "600",
                "--quiet",
                "--timeout",
                "120s",
            ])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("meterflow demo starts"),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let printer = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let url = loop {
        let line = line_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the demo prints the status page's address first");
        if let Some(rest) = line.strip_prefix("status page: ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with('/'),
        "{url}"
    );

    // Wait until the pipeline is assigned all four partitions and the provider has answered.
    let started = Instant::now();
    let mut page = String::new();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(response) = reqwest::get(&url).await {
            assert_eq!(response.status(), 200);
            assert!(response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"));
            page = response.text().await.unwrap();
            // Every partition with the brokers' figures (the first report comes within 5 s).
            let rows: Vec<&str> = page
                .split("<tr class=\"partition\">")
                .skip(1)
                .map(|r| r.split("</tr>").next().unwrap())
                .collect();
            if rows.len() == 4
                && !rows.iter().any(|r| r.contains('—'))
                && page.contains(" of 600</td>")
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        page.matches("<tr class=\"partition\">").count(),
        4,
        "four partitions while the demo runs:\n{page}"
    );

    let dom = {
        let chromium = chromium.clone();
        let url = url.clone();
        tokio::task::spawn_blocking(move || dump_dom(&chromium, &url))
            .await
            .unwrap()
    };
    assert!(dom.contains("<title>meterflow status</title>"), "{dom}");
    assert!(dom.contains("<h2>Partitions</h2>"), "{dom}");
    for partition in 0..4 {
        // topic, partition, committed offset, lag: numbers from the brokers.
        let row = between(
            &dom,
            &format!("<tr class=\"partition\"><td>usage</td><td class=\"n\">{partition}</td>"),
            "</tr>",
        );
        let cells: Vec<&str> = row
            .split("<td class=\"n\">")
            .skip(1)
            .map(|c| c.trim_end_matches("</td>"))
            .collect();
        assert_eq!(cells.len(), 3, "{row}");
        let committed: i64 = cells[0].parse().unwrap_or_else(|_| panic!("{row}"));
        let lag: i64 = cells[1].parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(committed >= 0 && lag >= 0, "{row}");
        assert!(
            cells[2] == "none" || cells[2].ends_with(" s") || cells[2].contains("min"),
            "{row}"
        );
    }
    assert!(dom.contains("<h2>Pacer</h2>"), "{dom}");
    let pace = between(&dom, "<td id=\"pace\" class=\"n\">", " requests/s</td>");
    assert!(
        pace.parse::<f64>().is_ok_and(|p| p > 0.0),
        "pace {pace:?} in:\n{dom}"
    );
    let quota = between(&dom, "<td id=\"quota\" class=\"n\">", "</td>");
    assert!(quota.ends_with(" of 600"), "quota {quota:?}");
    let gate = between(&dom, "<td id=\"gate\">", "</td>");
    assert!(
        gate.contains(">open<") || gate.contains(">closed<"),
        "gate {gate:?}"
    );
    assert!(dom.contains("<h2>Dead letters, last hour</h2>"), "{dom}");

    let shot_dir = tempfile::tempdir().unwrap();
    let shot = match std::env::var("METERFLOW_STATUS_SCREENSHOT") {
        Ok(path) if !path.is_empty() => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path),
        _ => shot_dir.path().join("status-page.png"),
    };
    {
        let chromium = chromium.clone();
        let url = url.clone();
        let args = vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,900".to_string(),
        ];
        tokio::task::spawn_blocking(move || run_chromium(&chromium, &url, &args))
            .await
            .unwrap();
    }
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        png.len() > 10_000,
        "a rendered page, not a blank one: {} bytes",
        png.len()
    );

    // The demo still ends with its exact reconciliation.
    let status = tokio::task::spawn_blocking(move || demo.0.wait().unwrap())
        .await
        .unwrap();
    let printed = printer.join().unwrap();
    assert!(status.success(), "{status}:\n{printed}");
    assert!(
        printed.contains("OK: every valid event billed exactly once"),
        "{printed}"
    );
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in:\n{text}"))
        + start.len();
    let len = text[from..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} after {start:?}"));
    &text[from..from + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_in_an_error_text_stays_text_in_chromium() {
    let Some(chromium) = chromium() else { return };
    meterflow::telemetry::init_logging(&meterflow::config::LogConfig {
        format: meterflow::config::LogFormat::Text,
        level: "off".into(),
    });
    tracing::error!(
        target: "meterflow::deliver::runner",
        event_id = "evt_<img src=x onerror=alert(2)>",
        "provider answered 422: <script>document.title='pwned'</script>"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = AdminState::new(Arc::new(Readiness::new()), Arc::new(StatusBoard::new()));
    tokio::spawn(admin::serve(listener, state, async {
        let _ = stopped.await;
    }));

    let html = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(
        html.contains(
            "provider answered 422: &lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"
        ),
        "{html}"
    );
    assert!(
        !html.contains("<script") && !html.contains("<img"),
        "{html}"
    );

    let dom = tokio::task::spawn_blocking(move || dump_dom(&chromium, &url))
        .await
        .unwrap();
    let _ = stop.send(());
    assert!(dom.contains("<title>meterflow status</title>"), "{dom}");
    assert!(!dom.contains("pwned</title>"), "the script ran:\n{dom}");
    assert!(!dom.contains("<script") && !dom.contains("<img"), "{dom}");
    assert!(
        dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "shown as text:\n{dom}"
    );
    assert!(
        dom.contains("evt_&lt;img src=x onerror=alert(2)&gt;"),
        "{dom}"
    );
}
