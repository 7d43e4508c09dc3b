//! Semantic checks of a deserialized [`Config`]: combinations that cannot work, values out of
//! range. Every problem names the key, the bad value (never a secret) and what is accepted.
//! Pure: no I/O, no clock.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, ConfigProblem, ProviderConfig, StageChecks};

/// The consumer group session timeout range brokers accept by default
/// (`group.min.session.timeout.ms` = 6 s, `group.max.session.timeout.ms` = 5 min).
const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// librdkafka properties meterflow sets itself: the delivery promise depends on them, or a
/// dedicated key sets them.
const MANAGED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("group.id", "set kafka.group_id instead"),
    ("session.timeout.ms", "set kafka.session_timeout instead"),
    (
        "auto.commit.interval.ms",
        "set kafka.commit_interval instead",
    ),
    (
        "enable.auto.offset.store",
        "meterflow stores an offset only once every earlier event is settled",
    ),
    (
        "enable.auto.commit",
        "meterflow commits the offsets it stored; turning this off would never commit",
    ),
    (
        "partition.assignment.strategy",
        "meterflow's rebalance drain relies on cooperative-sticky",
    ),
];

struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub(super) fn validate(config: &Config, checks: &dyn StageChecks) -> Vec<ConfigProblem> {
    let mut p = Problems(Vec::new());
    kafka(config, &mut p);
    p.0.extend(checks.mapping(&config.input));
    input_window(config, &mut p);
    batch(config, &mut p);
    sink(config, checks, &mut p);
    rate_limit_and_retry(config, &mut p);
    p.0.extend(checks.prices(config));
    ledger_admin_log(config, &mut p);
    p.0
}

fn kafka(config: &Config, p: &mut Problems) {
    let k = &config.kafka;
    if k.brokers.trim().is_empty() {
        p.add(
            "kafka.brokers",
            "is empty: expected comma-separated bootstrap servers, e.g. \"localhost:9092\"",
        );
    } else if k.brokers.split(',').any(|b| b.trim().is_empty()) {
        p.add(
            "kafka.brokers",
            format!(
                "{:?} has an empty entry: expected comma-separated host:port pairs",
                k.brokers
            ),
        );
    }
    if k.group_id.trim().is_empty() {
        p.add(
            "kafka.group_id",
            "is empty: expected the consumer group id, e.g. \"meterflow\"",
        );
    }
    if k.topics.is_empty() {
        p.add(
            "kafka.topics",
            "is empty: expected at least one input topic, e.g. [\"usage-events\"]",
        );
    }
    for (i, topic) in k.topics.iter().enumerate() {
        let key = format!("kafka.topics[{i}]");
        if let Some(pattern) = topic.strip_prefix('^') {
            // librdkafka subscribes to every topic matching a `^`-prefixed regex.
            match regex::Regex::new(&format!("^{pattern}")) {
                Ok(re) if re.is_match(&k.dead_letter_topic) => p.add(
                    key,
                    format!(
                        "the pattern {topic:?} matches the dead-letter topic {:?}: meterflow \
                         would consume its own dead letters",
                        k.dead_letter_topic
                    ),
                ),
                Ok(_) => {}
                Err(e) => p.add(key, format!("{topic:?} is not a valid regex pattern: {e}")),
            }
        } else if let Some(why) = topic_problem(topic) {
            p.add(key, why);
        } else if k.topics[..i].contains(topic) {
            p.add(key, format!("{topic:?} is listed twice"));
        }
    }
    if k.dead_letter_topic.trim().is_empty() {
        p.add(
            "kafka.dead_letter_topic",
            "is empty: expected the topic for events that can never be delivered, e.g. \
             \"usage-events-dlq\"",
        );
    } else if let Some(why) = topic_problem(&k.dead_letter_topic) {
        p.add("kafka.dead_letter_topic", why);
    } else if k.topics.contains(&k.dead_letter_topic) {
        p.add(
            "kafka.dead_letter_topic",
            format!(
                "{:?} is also an input topic: dead letters would be consumed again; expected a \
                 topic not in kafka.topics",
                k.dead_letter_topic
            ),
        );
    }
    if k.session_timeout < MIN_SESSION_TIMEOUT || k.session_timeout > MAX_SESSION_TIMEOUT {
        p.add(
            "kafka.session_timeout",
            format!(
                "{} is outside what brokers accept by default: expected 6s to 5m",
                human(k.session_timeout)
            ),
        );
    }
    if k.drain_timeout >= k.session_timeout {
        p.add(
            "kafka.drain_timeout",
            format!(
                "{} is not below kafka.session_timeout ({}): the drain must end before the group \
                 evicts this member; expected a shorter drain_timeout or a longer \
                 session_timeout",
                human(k.drain_timeout),
                human(k.session_timeout)
            ),
        );
    }
    if k.commit_interval.is_zero() {
        p.add(
            "kafka.commit_interval",
            "is 0: expected a positive interval like \"1s\"",
        );
    }
    if k.stuck_after <= k.commit_interval {
        p.add(
            "kafka.stuck_after",
            format!(
                "{} is not longer than kafka.commit_interval ({}): every partition would count \
                 as stuck between two commits; expected a duration like \"15m\"",
                human(k.stuck_after),
                human(k.commit_interval)
            ),
        );
    }
    for (name, why) in MANAGED_PROPERTIES {
        if k.properties.contains_key(*name) {
            let mut key = "kafka.properties".to_string();
            super::push_key(&mut key, name);
            p.add(
                key,
                format!("meterflow sets this property itself ({why}); remove it"),
            );
        }
    }
}

/// Kafka's own rule for topic names.
fn topic_problem(topic: &str) -> Option<String> {
    let legal = topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if topic.is_empty() {
        Some("is empty: expected a topic name".into())
    } else if !legal || topic.len() > 249 || topic == "." || topic == ".." {
        Some(format!(
            "{topic:?} is not a valid Kafka topic name: expected 1 to 249 of a-z A-Z 0-9 . _ -"
        ))
    } else {
        None
    }
}

/// The largest `input.max_future`: a billing period.
const MAX_FUTURE_BOUND: Duration = Duration::from_secs(31 * 24 * 3600);
/// The smallest `input.max_age` (other than 0): a shorter one would dead-letter the events of
/// any backlog (a 429 pause, a provider outage, a restart).
const MIN_MAX_AGE: Duration = Duration::from_secs(3600);

fn input_window(config: &Config, p: &mut Problems) {
    let i = &config.input;
    if i.max_future > MAX_FUTURE_BOUND {
        p.add(
            "input.max_future",
            format!(
                "{} is out of range: expected at most 31d (a billing period; the default is \
                 \"5m\"), or \"0\" for no bound",
                crate::text::compact_duration(i.max_future)
            ),
        );
    }
    if !i.max_age.is_zero() && i.max_age < MIN_MAX_AGE {
        p.add(
            "input.max_age",
            format!(
                "{} is too short: expected at least 1h (every event of a backlog older than that \
                 would be dead-lettered; the default is \"35d\"), or \"0\" for no bound",
                crate::text::compact_duration(i.max_age)
            ),
        );
    }
    // The ledger forgets entries after `ledger.retention`: an event the window still lets in
    // after its entry is gone (an offset reset, a replay) would be billed a second time.
    // (A zero retention is reported on its own.)
    let retention = config.ledger.retention;
    if config.ledger.url != "none"
        && !retention.is_zero()
        && !i.max_age.is_zero()
        && i.max_age > retention
    {
        p.add(
            "input.max_age",
            format!(
                "{} is longer than ledger.retention ({}): an event re-read after its ledger \
                 entry was pruned would pass the window and be billed again; expected \
                 input.max_age at most ledger.retention (raise ledger.retention, or lower \
                 input.max_age)",
                crate::text::compact_duration(i.max_age),
                crate::text::compact_duration(retention)
            ),
        );
    }
}

fn batch(config: &Config, p: &mut Problems) {
    let b = &config.batch;
    if b.max_events == 0 {
        p.add("batch.max_events", "is 0: expected at least 1");
    }
    if b.max_in_flight < b.max_events {
        p.add(
            "batch.max_in_flight",
            format!(
                "{} is below batch.max_events ({}): a full batch could never be read; expected \
                 max_in_flight ≥ max_events",
                b.max_in_flight, b.max_events
            ),
        );
    }
    if b.pause_after > MAX_PAUSE_AFTER {
        p.add(
            "batch.pause_after",
            format!(
                "{} is longer than {}: while the budget holds, rebalance callbacks wait, and \
                 the group's other members with them; expected 0 (pause at once) to {}",
                human(b.pause_after),
                human(MAX_PAUSE_AFTER),
                human(MAX_PAUSE_AFTER)
            ),
        );
    }
}

/// The longest `batch.pause_after`: a rebalance waits for it.
const MAX_PAUSE_AFTER: Duration = Duration::from_secs(10);

fn sink(config: &Config, checks: &dyn StageChecks, p: &mut Problems) {
    let s = &config.sink;
    match url::Url::parse(&s.base_url) {
        _ if s.base_url.trim().is_empty() => p.add(
            "sink.base_url",
            "is empty: expected the provider's base URL, e.g. \"https://sandbox.billwerk.com\"",
        ),
        Ok(u) if !u.username().is_empty() || u.password().is_some() => p.add(
            "sink.base_url",
            "carries credentials: put them in the credential keys of [sink], not in the URL",
        ),
        Ok(u) if !matches!(u.scheme(), "http" | "https") || !u.has_host() => p.add(
            "sink.base_url",
            format!(
                "{:?} is not an http(s) URL: expected e.g. \"https://sandbox.billwerk.com\"",
                s.base_url
            ),
        ),
        Ok(u) if u.query().is_some() || u.fragment().is_some() => p.add(
            "sink.base_url",
            format!(
                "{:?} has a query or fragment: expected a base URL that paths are appended to",
                s.base_url
            ),
        ),
        Ok(_) => {}
        Err(e) => p.add(
            "sink.base_url",
            format!(
                "{:?} is not a URL ({e}): expected e.g. \"https://sandbox.billwerk.com\"",
                s.base_url
            ),
        ),
    }
    match &s.provider {
        ProviderConfig::Billwerk(b) => {
            if b.client_id.trim().is_empty() {
                p.add(
                    "sink.client_id",
                    "is required for billwerk: the OAuth client id of an API client",
                );
            }
            if b.client_secret.expose().is_empty() {
                p.add(
                    "sink.client_secret",
                    "is required for billwerk: the OAuth client secret, e.g. \
                     \"${BILLWERK_CLIENT_SECRET}\"",
                );
            }
            if b.legal_entity_id
                .as_deref()
                .is_some_and(|v| v.trim().is_empty())
            {
                p.add(
                    "sink.legal_entity_id",
                    "is empty: expected the legal entity id, or remove the key",
                );
            }
        }
        ProviderConfig::Billingrails(provider) => {
            if provider.api_key.expose().is_empty() {
                p.add(
                    "sink.api_key",
                    "is required for billingrails: the API key, e.g. \"${BILLINGRAILS_API_KEY}\"",
                );
            }
            let br = &provider.billingrails;
            if !(1..=100).contains(&br.batch_size) {
                p.add(
                    "sink.billingrails.batch_size",
                    format!(
                        "{} is out of range: expected 1 to 100 (Billingrails takes at most 100 \
                         events per batch)",
                        br.batch_size
                    ),
                );
            }
            for (key, path) in [
                ("sink.billingrails.ingest_path", &br.ingest_path),
                ("sink.billingrails.batch_path", &br.batch_path),
            ] {
                if !path.starts_with('/') {
                    p.add(
                        key,
                        format!("{path:?} is not a path: expected it to start with `/`"),
                    );
                }
            }
            if br.account_property.trim().is_empty() {
                p.add(
                    "sink.billingrails.account_property",
                    "is empty: expected the event property that names the customer, e.g. \
                     \"billingrails_account_id\"",
                );
            }
            if br.quantity_property.trim().is_empty() {
                p.add(
                    "sink.billingrails.quantity_property",
                    "is empty: expected the event property the meter sums, e.g. \"quantity\"",
                );
            }
            // Each carries something meterflow sets; two on one name would overwrite each other.
            let named = [
                ("account_property", Some(&br.account_property)),
                ("quantity_property", Some(&br.quantity_property)),
                ("price_property", br.price_property.as_ref()),
                ("description_property", br.description_property.as_ref()),
            ];
            for (i, (key, name)) in named.iter().enumerate() {
                let Some(name) = name.filter(|n| !n.trim().is_empty()) else {
                    continue;
                };
                if let Some((earlier, _)) = named[..i]
                    .iter()
                    .find(|(_, other)| other.is_some_and(|o| o == name))
                {
                    p.add(
                        format!("sink.billingrails.{key}"),
                        format!(
                            "{name:?} is already sink.billingrails.{earlier}: expected a property \
                             name of its own"
                        ),
                    );
                }
            }
            match checks.template(&br.event_name) {
                Ok(true) => p.add(
                    "sink.billingrails.event_name",
                    "is empty: expected a template like \"{metric}\"",
                ),
                Ok(_) => {}
                Err(e) => p.add("sink.billingrails.event_name", e),
            }
            for (key, v) in [
                ("sink.billingrails.price_property", &br.price_property),
                (
                    "sink.billingrails.description_property",
                    &br.description_property,
                ),
            ] {
                if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    p.add(key, "is empty: expected a property name, or remove the key");
                }
            }
        }
    }
    if !(1..=1024).contains(&s.concurrency) {
        p.add(
            "sink.concurrency",
            format!("{} is out of range: expected 1 to 1024", s.concurrency),
        );
    }
    if let Some(per) = s.concurrency_per_contract {
        if per == 0 || per > s.concurrency {
            p.add(
                "sink.concurrency_per_contract",
                format!(
                    "{per} is out of range: expected 1 to sink.concurrency ({}), or remove the key for a quarter of it",
                    s.concurrency
                ),
            );
        }
    }
    if s.request_timeout.is_zero() {
        p.add(
            "sink.request_timeout",
            "is 0: expected a positive timeout like \"10s\"",
        );
    }
    // `[sink.aggregate]` with a Billingrails sink is refused while the section is read
    // (`SinkConfig`'s conversion): the Billingrails config has no such key. Its `bucket` is an
    // enum, refused as it is read too.
}

/// The largest `rate_limit.max_pause` accepted.
const MAX_PAUSE_BOUND: Duration = Duration::from_secs(7 * 24 * 3600);

fn rate_limit_and_retry(config: &Config, p: &mut Problems) {
    let r = &config.rate_limit;
    if r.window.is_zero() {
        p.add(
            "rate_limit.window",
            "is 0: expected the provider's rate-limit window, e.g. \"1m\"",
        );
    }
    if !(r.headroom.is_finite() && (0.0..0.5).contains(&r.headroom)) {
        p.add(
            "rate_limit.headroom",
            format!(
                "{} is out of range: expected a fraction from 0.0 up to (not including) 0.5",
                r.headroom
            ),
        );
    }
    if r.limit == Some(0) {
        p.add(
            "rate_limit.limit",
            "is 0: expected the requests allowed per window, or remove the key to learn it from \
             the provider",
        );
    }
    if r.initial_rate == 0 {
        p.add(
            "rate_limit.initial_rate",
            "is 0: expected at least 1 request per second",
        );
    }
    if r.max_pause < r.window || r.max_pause > MAX_PAUSE_BOUND {
        p.add(
            "rate_limit.max_pause",
            format!(
                "{} is out of range: expected at least rate_limit.window ({}) and at most 7d",
                humantime::format_duration(r.max_pause),
                humantime::format_duration(r.window)
            ),
        );
    }
    let t = &config.retry;
    if t.initial_backoff.is_zero() {
        p.add(
            "retry.initial_backoff",
            "is 0: expected a positive backoff like \"100ms\" (0 would retry in a hot loop)",
        );
    }
    if t.initial_backoff > t.max_backoff {
        p.add(
            "retry.initial_backoff",
            format!(
                "{} is above retry.max_backoff ({}): expected initial_backoff ≤ max_backoff",
                human(t.initial_backoff),
                human(t.max_backoff)
            ),
        );
    }
}

fn ledger_admin_log(config: &Config, p: &mut Problems) {
    let url = config.ledger.url.as_str();
    let shown = super::redact_url(url);
    if url == "none" || url == "sqlite::memory:" {
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            p.add(
                "ledger.url",
                "\"sqlite://\" has no file path: expected e.g. \"sqlite://meterflow-ledger.db\"",
            );
        }
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url::Url::parse(url) {
            Ok(u) if u.has_host() => {}
            _ => p.add(
                "ledger.url",
                format!(
                    "{shown:?} is not a PostgreSQL URL: expected \
                     \"postgres://USER:PASSWORD@HOST:5432/DB\""
                ),
            ),
        }
    } else {
        p.add(
            "ledger.url",
            format!(
                "{shown:?} is not accepted: expected \"sqlite://PATH\", \"postgres://...\" \
                 (several replicas), or \"none\" (no exactly-once protection)"
            ),
        );
    }
    if config.ledger.retention.is_zero() {
        p.add(
            "ledger.retention",
            "is 0: expected how long delivered entries are kept, e.g. \"35d\"",
        );
    }
    let listen = config.admin.listen.as_str();
    if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
        p.add(
            "admin.listen",
            format!(
                "{listen:?} is not a socket address: expected IP:PORT like \"127.0.0.1:9090\" or \
                 \"0.0.0.0:9090\", or \"\" to disable the admin server"
            ),
        );
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        p.add(
            "log.level",
            format!(
                "{:?} is not a tracing filter ({e}): expected e.g. \"info\" or \
                 \"meterflow=debug,rdkafka=warn\"",
                config.log.level
            ),
        );
    }
}
