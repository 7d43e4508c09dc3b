//! `meterflow validate`: exit codes and output of the real binary, and `--connect` against
//! librdkafka's in-process mock cluster and a local HTTP token endpoint.

use meterflow_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use meterflow::validate::{check, Verdict};
use rdkafka::mocking::MockCluster;

const SECRET: &str = "s3cr3t-never-printed";

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meterflow"));
    cmd.env_remove("METERFLOW_CONFIG")
        .env("BILLWERK_CLIENT_ID", "client-1")
        .env("BILLWERK_CLIENT_SECRET", SECRET)
        .env("BILLINGRAILS_API_KEY", SECRET)
        .env("KAFKA_SASL_PASSWORD", SECRET);
    cmd
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn validate(path: &Path) -> Output {
    let out = bin()
        .args(["validate", "--config"])
        .arg(path)
        .output()
        .unwrap();
    Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[test]
fn every_example_config_is_ok() {
    for name in ["minimal.toml", "meterflow.toml", "billingrails.toml"] {
        let out = validate(&example(name));
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        assert_eq!(
            out.stdout.trim(),
            format!("config OK: {}", example(name).display())
        );
    }
}

#[test]
fn an_invalid_config_prints_one_line_per_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example("minimal.toml"))
        .unwrap()
        .replace("group_id", "groupid")
        .replace("https://sandbox.billwerk.com", "sandbox")
        .replace("${BILLWERK_CLIENT_ID}", "${UNSET_CLIENT_ID}");
    std::fs::write(&path, text).unwrap();
    let out = validate(&path);
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout, "");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 4, "one line per problem:\n{}", out.stderr);
    for line in &lines {
        assert!(line.starts_with("error: "), "{line}");
    }
    assert!(out
        .stderr
        .contains("error: sink.client_id: environment variable UNSET_CLIENT_ID is not set"));
    assert!(out
        .stderr
        .contains("error: kafka.groupid: unknown key (did you mean `group_id`?)"));
    assert!(out.stderr.contains("error: kafka.group_id: is required"));
    assert!(out
        .stderr
        .contains("error: sink.base_url: \"sandbox\" is not a URL"));
    assert!(!out.stderr.contains(SECRET));
}

#[test]
fn an_unreadable_file_exits_2() {
    let out = validate(Path::new("/nonexistent/meterflow.toml"));
    assert_eq!(out.code, 2);
    assert!(out
        .stderr
        .starts_with("error: cannot read config file /nonexistent/meterflow.toml"));
}

/// A billwerk token endpoint that accepts `client-1` / SECRET only.
async fn token_server() -> String {
    let app = axum::Router::new().route(
        "/oauth/token/",
        post(|headers: HeaderMap, body: String| async move {
            use base64_basic::encode;
            let expected = format!("Basic {}", encode(&format!("client-1:{SECRET}")));
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if auth == expected && body == "grant_type=client_credentials" {
                (
                    StatusCode::OK,
                    r#"{"access_token":"t","token_type":"bearer"}"#,
                )
            } else {
                (StatusCode::UNAUTHORIZED, r#"{"Message":"invalid client"}"#)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Tiny Basic-auth encoder so the test needs no extra crate.
mod base64_basic {
    pub fn encode(s: &str) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = (chunk[0] as u32) << 16
                | (*chunk.get(1).unwrap_or(&0) as u32) << 8
                | *chunk.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// Written by hand, not with `ConfigBuilder` (which takes every value literally): the secret
/// must come through `${BILLWERK_CLIENT_SECRET}`, read with the environment `check` is given.
fn config_text(brokers: &str, base_url: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "meterflow-validate-test"
topics = ["usage-events"]
dead_letter_topic = "usage-events-dlq"
[sink]
kind = "billwerk"
base_url = "{base_url}"
client_id = "client-1"
client_secret = "${{BILLWERK_CLIENT_SECRET}}"
[components]
api_calls = "5ce53069443e551b9caccc64"
"#
    )
}

fn env_with(secret: &'static str) -> impl Fn(&str) -> Option<String> {
    move |name| (name == "BILLWERK_CLIENT_SECRET").then(|| secret.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_checks_brokers_topics_and_credentials() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("usage-events", 2, 1).unwrap();
    let base_url = token_server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meterflow.toml");
    std::fs::write(&path, config_text(&cluster.bootstrap_servers(), &base_url)).unwrap();

    // The dead-letter topic is missing and the secret is wrong: both reported.
    let report = check(&path, true, &env_with("wrong-secret")).await;
    assert_eq!(report.verdict, Verdict::Invalid, "{:#?}", report.lines);
    assert_eq!(
        report.lines,
        vec![
            format!(
                "error: kafka.dead_letter_topic: topic \"usage-events-dlq\" does not exist on \
                 the cluster at {:?}: create it (meterflow does not create topics)",
                cluster.bootstrap_servers()
            ),
            format!(
                "error: sink.client_secret: billwerk at {base_url} refused the credentials \
                 (HTTP 401): check sink.client_id and sink.client_secret"
            ),
        ]
    );

    cluster.create_topic("usage-events-dlq", 1, 1).unwrap();
    // A topic meterflow may not access is named as such, with the grant to ask for.
    cluster
        .topic_error(
            "usage-events-dlq",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let report = check(&path, true, &env_with(SECRET)).await;
    assert_eq!(report.verdict, Verdict::Invalid, "{:#?}", report.lines);
    assert_eq!(report.lines.len(), 1, "{:#?}", report.lines);
    assert!(
        report.lines[0].starts_with("error: kafka.dead_letter_topic: the cluster at")
            && report.lines[0].contains("refuses meterflow access to topic \"usage-events-dlq\"")
            && report.lines[0].contains("grant"),
        "{}",
        report.lines[0]
    );
    cluster
        .topic_error(
            "usage-events-dlq",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        )
        .unwrap();
    let report = check(&path, true, &env_with(SECRET)).await;
    assert_eq!(report.verdict, Verdict::Valid, "{:#?}", report.lines);
    assert!(report.lines[0].starts_with("config OK (brokers, topics and provider reachable)"));

    // Without --connect nothing is contacted.
    let report = check(&path, false, &env_with("wrong-secret")).await;
    assert_eq!(report.verdict, Verdict::Valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_unreachable_brokers_and_provider() {
    // Ports nobody listens on: bind, note the port, drop.
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (kafka_port, http_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meterflow.toml");
    std::fs::write(
        &path,
        config_text(
            &format!("127.0.0.1:{kafka_port}"),
            &format!("http://127.0.0.1:{http_port}"),
        ),
    )
    .unwrap();
    let report = check(&path, true, &env_with(SECRET)).await;
    assert_eq!(report.verdict, Verdict::Invalid);
    assert_eq!(report.lines.len(), 2, "{:#?}", report.lines);
    assert!(report.lines[0].starts_with(&format!(
        "error: kafka.brokers: no broker at \"127.0.0.1:{kafka_port}\" answered"
    )));
    assert!(report.lines[1].starts_with(&format!(
        "error: sink.base_url: no HTTP answer from http://127.0.0.1:{http_port}"
    )));
    for line in &report.lines {
        assert!(!line.contains(SECRET));
    }
}

/// Issue 11, problem 6: a topic that keeps events longer than the ledger keeps its entries is
/// worth a warning (an offset reset would re-read events the ledger forgot). On a Tansu broker:
/// DescribeConfigs is not in librdkafka's mock cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_warns_when_a_topic_outlives_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tansu) = common::require_tansu(dir.path()) else {
        return;
    };
    let brokers = tansu.brokers();
    common::create_topics(&brokers, &[("usage-events-dlq", 1)]).await;
    {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
        let ninety_days = (90u64 * 86_400_000).to_string();
        let topic = NewTopic::new("usage-events", 2, TopicReplication::Fixed(1))
            .set("retention.ms", &ninety_days);
        for r in admin
            .create_topics(&[topic], &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    }
    let base_url = token_server().await;
    let path = dir.path().join("meterflow.toml");
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    std::fs::write(
        &path,
        format!(
            "{}\n[ledger]\nurl = \"{ledger}\"\n",
            config_text(&brokers, &base_url)
        ),
    )
    .unwrap();
    let report = check(&path, true, &env_with(SECRET)).await;
    assert_eq!(report.verdict, Verdict::Valid, "{:#?}", report.lines);
    assert_eq!(
        report.warnings,
        vec![
            "warning: kafka.topics[0]: topic \"usage-events\" keeps events for 90d, longer than \
             ledger.retention (35d): after an offset reset (or with a new group id) events older \
             than the ledger's entries would be read again and billed twice; raise \
             ledger.retention to at least the topic's retention.ms, or lower that"
                .to_string()
        ]
    );
    // A ledger that keeps its entries as long: no warning.
    std::fs::write(
        &path,
        format!(
            "{}\n[ledger]\nurl = \"{ledger}\"\nretention = \"90d\"\n",
            config_text(&brokers, &base_url)
        ),
    )
    .unwrap();
    let report = check(&path, true, &env_with(SECRET)).await;
    assert_eq!(report.verdict, Verdict::Valid, "{:#?}", report.lines);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

/// `--connect` asks for a token with the sink's own code, so it holds the answer to the same
/// standard as the service: a 200 without a usable token is not a working billwerk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_names_a_token_endpoint_that_answers_without_a_token() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("usage-events", 2, 1).unwrap();
    cluster.create_topic("usage-events-dlq", 1, 1).unwrap();
    let app = axum::Router::new().route(
        "/oauth/token/",
        post(|| async { (StatusCode::OK, r#"{"token_type":"bearer"}"#) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meterflow.toml");
    std::fs::write(&path, config_text(&cluster.bootstrap_servers(), &base_url)).unwrap();
    let report = check(&path, true, &env_with(SECRET)).await;
    assert_eq!(report.verdict, Verdict::Invalid, "{:#?}", report.lines);
    assert_eq!(report.lines.len(), 1, "{:#?}", report.lines);
    assert!(
        report.lines[0].starts_with(&format!(
            "error: sink.base_url: {base_url}/oauth/token/ did not grant a token ("
        )),
        "{:#?}",
        report.lines
    );
    assert!(!report.lines[0].contains(SECRET));
}
