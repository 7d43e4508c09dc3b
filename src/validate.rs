//! `meterflow validate --config FILE [--connect]`: checks a config file and prints
//! `config OK: FILE`, or one `error: KEY: MESSAGE` line per problem.
//!
//! Exit codes: 0 valid (and reachable, with `--connect`), 1 invalid or unreachable, 2 the file
//! cannot be read. With `--connect` it also asks the brokers for metadata (through the
//! configured `kafka.properties`, so TLS/SASL are exercised), checks that every input topic and
//! the dead-letter topic exist, and that the provider answers: billwerk must grant a token for
//! the configured credentials; Billingrails must answer HTTP at all. Secrets are never printed.
//! It also warns (without failing) when an input topic keeps events longer than the delivery
//! ledger keeps its entries (`retention.ms` > `ledger.retention`).

use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::config::{is_secret_key, Config, ConfigError, ConfigProblem, EnvLookup, SinkKind};

/// How long the brokers and the provider get to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// The config has problems, or (with `--connect`) something did not answer as expected.
    Invalid,
    /// The file could not be read.
    Unreadable,
}

impl Verdict {
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Valid => 0,
            Verdict::Invalid => 1,
            Verdict::Unreadable => 2,
        }
    }
}

/// What `validate` found: the verdict and the lines to print.
#[derive(Debug, Clone)]
pub struct Report {
    pub verdict: Verdict,
    pub lines: Vec<String>,
    /// `warning: KEY: MESSAGE` lines: worth fixing, but the config works (printed to stderr).
    pub warnings: Vec<String>,
}

/// Runs the command with the process environment: prints the report (problems to stderr) and
/// returns the exit code.
pub async fn run(path: &Path, connect: bool) -> i32 {
    let report = check(path, connect, &|name| std::env::var(name).ok()).await;
    for line in &report.warnings {
        eprintln!("{line}");
    }
    for line in &report.lines {
        if report.verdict == Verdict::Valid {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }
    report.verdict.exit_code()
}

/// Checks a config file, reading `${VAR}`s through `env`.
pub async fn check(path: &Path, connect: bool, env: EnvLookup<'_>) -> Report {
    let config = match Config::load_with_env(path, env) {
        Ok(config) => config,
        Err(ConfigError::Read { path, source }) => {
            return Report {
                verdict: Verdict::Unreadable,
                lines: vec![format!("error: cannot read config file {path}: {source}")],
                warnings: Vec::new(),
            }
        }
        Err(ConfigError::Invalid(problems)) => {
            return Report {
                verdict: Verdict::Invalid,
                lines: problems.iter().map(|p| format!("error: {p}")).collect(),
                warnings: Vec::new(),
            }
        }
    };
    let mut warnings = Vec::new();
    if connect {
        let problems = check_connectivity(&config).await;
        if !problems.is_empty() {
            return Report {
                verdict: Verdict::Invalid,
                lines: problems.iter().map(|p| format!("error: {p}")).collect(),
                warnings,
            };
        }
        let retention_config = config.clone();
        warnings = tokio::task::spawn_blocking(move || retention_warnings(&retention_config))
            .await
            .unwrap_or_default()
            .iter()
            .map(|p| format!("warning: {p}"))
            .collect();
    }
    Report {
        warnings,
        verdict: Verdict::Valid,
        lines: vec![format!(
            "config OK{}: {}",
            if connect {
                " (brokers, topics and provider reachable)"
            } else {
                ""
            },
            path.display()
        )],
    }
}

/// Asks the brokers and the provider; one problem per thing that did not answer as expected.
pub async fn check_connectivity(config: &Config) -> Vec<ConfigProblem> {
    let kafka_config = config.clone();
    let kafka = tokio::task::spawn_blocking(move || check_kafka(&kafka_config));
    let provider = check_provider(config);
    let (kafka, mut problems) = tokio::join!(kafka, provider);
    let mut all = kafka.unwrap_or_else(|e| {
        vec![ConfigProblem {
            key: "kafka.brokers".into(),
            message: format!("the broker check failed: {e}"),
        }]
    });
    all.append(&mut problems);
    let secrets = secret_values(config);
    for p in &mut all {
        for s in &secrets {
            p.message = p.message.replace(s.as_str(), "***");
        }
    }
    all
}

/// Every configured secret value, to scrub from messages that libraries wrote.
fn secret_values(config: &Config) -> Vec<String> {
    let mut secrets: Vec<String> = config
        .kafka
        .properties
        .iter()
        .filter(|(k, _)| {
            let mut key = "kafka.properties".to_string();
            crate::config::push_key(&mut key, k);
            is_secret_key(&key)
        })
        .map(|(_, v)| v.clone())
        .collect();
    secrets.extend(
        config
            .sink
            .secrets()
            .into_iter()
            .map(|s| s.expose().to_string()),
    );
    // Very short values would blank unrelated text; they are not worth hiding that way.
    secrets.retain(|s| s.len() >= 4);
    secrets
}

fn check_kafka(config: &Config) -> Vec<ConfigProblem> {
    let k = &config.kafka;
    let problem = |key: &str, message: String| ConfigProblem {
        key: key.to_string(),
        message,
    };
    let mut client = ClientConfig::new();
    for (name, value) in &k.properties {
        client.set(name, value);
    }
    client
        .set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        // librdkafka logs every failed connection attempt; the problem line says it once.
        .set("log_level", "0");
    let consumer: BaseConsumer = match client.create() {
        Ok(c) => c,
        Err(e) => {
            return vec![problem(
                "kafka.properties",
                format!("librdkafka refused the client configuration: {e}"),
            )]
        }
    };
    let metadata = match consumer.fetch_metadata(None, CONNECT_TIMEOUT) {
        Ok(m) => m,
        Err(e) => {
            let why = match &e {
                KafkaError::MetadataFetch(code) => code.to_string(),
                e => e.to_string(),
            };
            return vec![problem(
                "kafka.brokers",
                format!(
                    "no broker at {:?} answered a metadata request within {}s ({why}); check \
                     the addresses, the network and kafka.properties (TLS/SASL)",
                    k.brokers,
                    CONNECT_TIMEOUT.as_secs()
                ),
            )];
        }
    };
    let exists = |name: &str| {
        metadata
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none())
    };
    let mut problems = Vec::new();
    for (i, topic) in k.topics.iter().enumerate() {
        // A `^` pattern may match topics created later: nothing to check now.
        if !topic.starts_with('^') && !exists(topic) {
            problems.push(problem(
                &format!("kafka.topics[{i}]"),
                format!(
                    "topic {topic:?} does not exist on the cluster at {:?}",
                    k.brokers
                ),
            ));
        }
    }
    let forbidden = metadata.topics().iter().any(|t| {
        t.name() == k.dead_letter_topic
            && t.error().is_some_and(|e| {
                rdkafka::error::RDKafkaErrorCode::from(e)
                    == rdkafka::error::RDKafkaErrorCode::TopicAuthorizationFailed
            })
    });
    if forbidden {
        problems.push(problem(
            "kafka.dead_letter_topic",
            format!(
                "the cluster at {:?} refuses meterflow access to topic {:?}: grant its principal \
                 WRITE, DESCRIBE and READ on it (READ for the look-ups after a crash and for \
                 `dlq replay`)",
                k.brokers, k.dead_letter_topic
            ),
        ));
    } else if !exists(&k.dead_letter_topic) {
        problems.push(problem(
            "kafka.dead_letter_topic",
            format!(
                "topic {:?} does not exist on the cluster at {:?}: create it (meterflow does \
                 not create topics)",
                k.dead_letter_topic, k.brokers
            ),
        ));
    }
    problems
}

/// Input topics that keep events longer than the ledger keeps its entries: a group offset reset
/// (or a new group) could re-read events whose entries were pruned, and bill them again.
pub fn retention_warnings(config: &Config) -> Vec<ConfigProblem> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let url = config.ledger.url.trim();
    if url.is_empty() || url == "none" {
        return Vec::new();
    }
    let ledger = config.ledger.retention;
    let mut client = ClientConfig::new();
    for (name, value) in &config.kafka.properties {
        client.set(name, value);
    }
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("log_level", "0");
    let problem = |i: usize, message: String| ConfigProblem {
        key: format!("kafka.topics[{i}]"),
        message,
    };
    let admin: AdminClient<DefaultClientContext> = match client.create() {
        Ok(a) => a,
        Err(e) => {
            return vec![problem(
                0,
                format!("cannot ask the brokers for retention.ms ({e}): check by hand that it is not longer than ledger.retention"),
            )]
        }
    };
    let topics: Vec<(usize, &String)> = config
        .kafka
        .topics
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.starts_with('^'))
        .collect();
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|(_, t)| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(CONNECT_TIMEOUT));
    let results = match futures::executor::block_on(admin.describe_configs(&specifiers, &options))
    {
        Ok(r) => r,
        Err(e) => {
            return vec![problem(
                0,
                format!("the brokers did not describe the topics' configuration ({e}): check by hand that retention.ms is not longer than ledger.retention ({})", days(ledger)),
            )]
        }
    };
    let mut warnings = Vec::new();
    for ((i, topic), result) in topics.iter().zip(results) {
        let value = result
            .ok()
            .and_then(|r| r.get("retention.ms").and_then(|e| e.value.clone()));
        let Some(value) = value else {
            warnings.push(problem(
                *i,
                format!("the brokers did not report retention.ms of {topic:?}: check by hand that it is not longer than ledger.retention ({})", days(ledger)),
            ));
            continue;
        };
        let kept = match value.trim().parse::<i64>() {
            Ok(ms) if ms < 0 => None,
            Ok(ms) => Some(Duration::from_millis(ms.unsigned_abs())),
            Err(_) => continue,
        };
        if kept.is_none_or(|kept| kept > ledger) {
            let kept = kept.map_or_else(
                || "forever (retention.ms = -1)".to_string(),
                |k| format!("for {}", days(k)),
            );
            warnings.push(problem(
                *i,
                format!(
                    "topic {topic:?} keeps events {kept}, longer than ledger.retention ({}): \
                     after an offset reset (or with a new group id) events older than the \
                     ledger's entries would be read again and billed twice; raise \
                     ledger.retention to at least the topic's retention.ms, or lower that",
                    days(ledger)
                ),
            ));
        }
    }
    warnings
}

/// `35d` for whole days, humantime otherwise.
fn days(d: Duration) -> String {
    if d.as_secs() > 0 && d.as_secs() % 86_400 == 0 && d.subsec_nanos() == 0 {
        format!("{}d", d.as_secs() / 86_400)
    } else {
        humantime::format_duration(d).to_string()
    }
}

async fn check_provider(config: &Config) -> Vec<ConfigProblem> {
    let s = &config.sink;
    let problem = |key: &str, message: String| {
        vec![ConfigProblem {
            key: key.to_string(),
            message,
        }]
    };
    let client = match reqwest::Client::builder().timeout(CONNECT_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => return problem("sink.base_url", format!("cannot build an HTTP client: {e}")),
    };
    let base = s.base_url.trim_end_matches('/');
    match s.kind() {
        SinkKind::Billwerk => {
            use crate::deliver::billwerk::{check_credentials, TokenError};
            match check_credentials(s, CONNECT_TIMEOUT).await {
                Ok(()) => Vec::new(),
                Err(TokenError::Refused { status }) => problem(
                    "sink.client_secret",
                    format!(
                        "billwerk at {base} refused the credentials (HTTP {status}): check \
                         sink.client_id and sink.client_secret"
                    ),
                ),
                Err(TokenError::Unavailable(detail)) => problem(
                    "sink.base_url",
                    format!(
                        "{base}/oauth/token/ did not grant a token ({detail}): expected a \
                         billwerk host like https://sandbox.billwerk.com"
                    ),
                ),
                Err(TokenError::Unreachable(why)) => problem(
                    "sink.base_url",
                    format!(
                        "no HTTP answer from {base} within {}s ({why})",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                ),
            }
        }
        SinkKind::Billingrails => match client.get(base).send().await {
            Ok(_) => Vec::new(),
            Err(e) => problem("sink.base_url", no_answer(base, &e)),
        },
    }
}

fn no_answer(base: &str, e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    format!(
        "no HTTP answer from {base} within {}s ({why})",
        CONNECT_TIMEOUT.as_secs()
    )
}
