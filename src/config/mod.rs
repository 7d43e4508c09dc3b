//! The TOML configuration: its shape, `${ENV}` interpolation, and validation that reports every
//! problem at once, each naming the key, the bad value and what would be accepted.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

pub mod builder;
mod interpolate;
mod parse;
mod secret;
#[cfg(test)]
mod tests;
mod validate;

pub use interpolate::{push_key, EnvLookup};
pub(crate) use parse::did_you_mean;
pub use secret::{is_secret_key, redact_property, Secret};

/// The default of `kafka.stuck_after`: how long a partition may be held before `/readyz`
/// reports it.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(15 * 60);

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub input: InputMapping,
    #[serde(default)]
    pub batch: BatchConfig,
    pub sink: SinkConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    /// metric name → billwerk ComponentId.
    #[serde(default)]
    pub components: BTreeMap<String, String>,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub overrides: Vec<OverrideRule>,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub dead_letter_topic: String,
    #[serde(default = "defaults::session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How long a revoke or shutdown waits for in-flight work; must be below `session_timeout`.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Commit stored offsets this often (librdkafka `auto.commit.interval.ms`).
    #[serde(default = "defaults::commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// `/readyz` fails when a partition's committed offset has been held this long.
    #[serde(default = "defaults::stuck_after", with = "humantime_serde")]
    pub stuck_after: Duration,
    /// Pass-through librdkafka properties (TLS, SASL, fetch tuning). Values may use `${ENV}`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

// By hand: `properties` may hold SASL passwords and TLS keys.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), redact_property(k, v)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("session_timeout", &self.session_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("stuck_after", &self.stuck_after)
            .field("properties", &properties)
            .finish()
    }
}

/// JSON Pointers (RFC 6901) from the product's event to meterflow's canonical fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputMapping {
    pub id: String,
    pub contract_id: String,
    pub contract_external_id: String,
    pub metric: String,
    pub quantity: String,
    pub timestamp: String,
    pub attributes: String,
    pub price_per_unit: String,
    /// Events stamped further ahead of this process's clock are dead-lettered
    /// (`timestamp_out_of_window`); 0 = no bound.
    #[serde(deserialize_with = "window_bound")]
    pub max_future: Duration,
    /// Events older than this when read are dead-lettered (`timestamp_out_of_window`); 0 = no
    /// bound. At most `ledger.retention`: the ledger must remember every event the window lets in.
    #[serde(deserialize_with = "window_bound")]
    pub max_age: Duration,
}

/// A duration like `"35d"`, or `0` / `"0"` (people write `max_age = 0` for "no bound").
fn window_bound<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Bound;
    impl serde::de::Visitor<'_> for Bound {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            humantime::parse_duration(s.trim()).map_err(|e| {
                E::custom(format!(
                    "{:?} is not a duration ({e}): expected a duration",
                    crate::text::truncate_chars(s, 40)
                ))
            })
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            if n == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(E::custom(format!("{n} has no unit: expected a duration")))
            }
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
        }
    }
    d.deserialize_any(Bound)
}

impl Default for InputMapping {
    fn default() -> Self {
        InputMapping {
            id: "/id".into(),
            contract_id: "/contract_id".into(),
            contract_external_id: "/contract_external_id".into(),
            metric: "/metric".into(),
            quantity: "/quantity".into(),
            timestamp: "/timestamp".into(),
            attributes: "/attributes".into(),
            price_per_unit: "/price_per_unit".into(),
            max_future: defaults::MAX_FUTURE,
            max_age: defaults::MAX_AGE,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Flush a batch at this many events.
    pub max_events: usize,
    /// ... or when its oldest event has waited this long.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Memory budget: events read but not yet settled. At the budget the consumer stops
    /// taking messages and keeps librdkafka's prefetch.
    pub max_in_flight: usize,
    /// ... and pauses the partitions if the budget stays full this long (pausing drops the
    /// prefetch, and lets rebalance callbacks run again). 0: pause at once.
    #[serde(with = "humantime_serde")]
    pub pause_after: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 500,
            max_wait: Duration::from_millis(100),
            max_in_flight: 5_000,
            pause_after: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Billwerk,
    Billingrails,
}

impl SinkKind {
    /// The name in config and in metric labels (`sink`).
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Billwerk => "billwerk",
            SinkKind::Billingrails => "billingrails",
        }
    }
}

/// `[sink]`: the keys every provider shares, and the provider's own ([`ProviderConfig`],
/// chosen by `kind`). Read through [`SinkFile`], the section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "SinkFile")]
pub struct SinkConfig {
    /// e.g. `https://sandbox.billwerk.com` or `https://api.billingrails.com/v1`.
    pub base_url: String,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Of those, at most this many for one contract (default: a quarter, at least 1), so that a
    /// contract whose requests keep failing cannot hold every permit while it retries.
    pub concurrency_per_contract: Option<usize>,
    pub request_timeout: Duration,
    /// What only this provider takes (`kind`).
    pub provider: ProviderConfig,
}

/// The provider's own keys of `[sink]`, by `kind`: a billwerk sink has OAuth credentials, a
/// Billingrails sink an API key, and neither carries the other's as empty options.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Billwerk(BillwerkConfig),
    Billingrails(BillingrailsSinkConfig),
}

/// `kind = "billwerk"`.
#[derive(Debug, Clone)]
pub struct BillwerkConfig {
    /// OAuth client id (`sink.client_id`; required: validation refuses an empty one).
    pub client_id: String,
    /// OAuth client secret (`sink.client_secret`; required).
    pub client_secret: Secret,
    /// Accounts with an entity hierarchy: sent as `X-SELECTED-LEGAL-ENTITY-ID`.
    pub legal_entity_id: Option<String>,
    /// Entries in the external-id → contract-id cache.
    pub contract_cache_size: usize,
    /// Pre-aggregation (opt-in), `[sink.aggregate]`.
    pub aggregate: AggregateConfig,
}

/// `kind = "billingrails"`.
#[derive(Debug, Clone)]
pub struct BillingrailsSinkConfig {
    /// `sink.api_key` (required: validation refuses an empty one).
    pub api_key: Secret,
    /// `[sink.billingrails]`: paths (relative to base_url), batch size, event shape.
    pub billingrails: BillingrailsConfig,
}

impl SinkConfig {
    pub fn kind(&self) -> SinkKind {
        match self.provider {
            ProviderConfig::Billwerk(_) => SinkKind::Billwerk,
            ProviderConfig::Billingrails(_) => SinkKind::Billingrails,
        }
    }

    /// `concurrency_per_contract`, or its default: a quarter of `concurrency`, at least 1.
    pub fn contract_concurrency(&self) -> usize {
        self.concurrency_per_contract
            .unwrap_or(self.concurrency / 4)
            .clamp(1, self.concurrency.max(1))
    }

    pub fn billwerk(&self) -> Option<&BillwerkConfig> {
        match &self.provider {
            ProviderConfig::Billwerk(b) => Some(b),
            ProviderConfig::Billingrails(_) => None,
        }
    }

    pub fn billwerk_mut(&mut self) -> Option<&mut BillwerkConfig> {
        match &mut self.provider {
            ProviderConfig::Billwerk(b) => Some(b),
            ProviderConfig::Billingrails(_) => None,
        }
    }

    pub fn billingrails(&self) -> Option<&BillingrailsSinkConfig> {
        match &self.provider {
            ProviderConfig::Billingrails(b) => Some(b),
            ProviderConfig::Billwerk(_) => None,
        }
    }

    pub fn billingrails_mut(&mut self) -> Option<&mut BillingrailsSinkConfig> {
        match &mut self.provider {
            ProviderConfig::Billingrails(b) => Some(b),
            ProviderConfig::Billwerk(_) => None,
        }
    }

    /// Every secret value of the section.
    pub fn secrets(&self) -> Vec<&Secret> {
        match &self.provider {
            ProviderConfig::Billwerk(b) => vec![&b.client_secret],
            ProviderConfig::Billingrails(b) => vec![&b.api_key],
        }
    }
}

/// `[sink]` as written: one table for every provider (the TOML users write names `kind` and
/// then that provider's keys); only [`SinkConfig`] is read from it. Keys of the other provider are accepted and unused, as they
/// always were; a required key left out reads as empty, which validation refuses with the key's
/// name ([`validate`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkFile {
    pub kind: SinkKind,
    pub base_url: String,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub legal_entity_id: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub concurrency_per_contract: Option<usize>,
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "defaults::contract_cache_size")]
    pub contract_cache_size: usize,
    #[serde(default)]
    pub billingrails: BillingrailsConfig,
    #[serde(default)]
    pub aggregate: AggregateConfig,
}

/// A problem a section finds while it is built, at `key` below the section: serde carries only
/// text, so the key travels in it (`parse.rs` reads it back and reports `sink.<key>`).
#[derive(Debug)]
pub struct KeyedProblem {
    pub key: &'static str,
    pub message: String,
}

/// How [`KeyedProblem`] reads in a serde message.
pub(crate) const KEYED_PREFIX: &str = "key `";

impl std::fmt::Display for KeyedProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{KEYED_PREFIX}{}`: {}", self.key, self.message)
    }
}

impl TryFrom<SinkFile> for SinkConfig {
    type Error = KeyedProblem;

    fn try_from(file: SinkFile) -> Result<Self, KeyedProblem> {
        let provider = match file.kind {
            SinkKind::Billwerk => ProviderConfig::Billwerk(BillwerkConfig {
                client_id: file.client_id.unwrap_or_default(),
                client_secret: file.client_secret.unwrap_or_else(|| Secret::new("")),
                legal_entity_id: file.legal_entity_id,
                contract_cache_size: file.contract_cache_size,
                aggregate: file.aggregate,
            }),
            SinkKind::Billingrails => {
                if file.aggregate.enabled {
                    return Err(KeyedProblem {
                        key: "aggregate.enabled",
                        message: "pre-aggregation is for billwerk (one usage record per \
                                  request): Billingrails takes batches of events \
                                  (sink.billingrails.batch_size); remove [sink.aggregate] or set \
                                  enabled = false"
                            .into(),
                    });
                }
                ProviderConfig::Billingrails(BillingrailsSinkConfig {
                    api_key: file.api_key.unwrap_or_else(|| Secret::new("")),
                    billingrails: file.billingrails,
                })
            }
        };
        Ok(SinkConfig {
            base_url: file.base_url,
            concurrency: file.concurrency,
            concurrency_per_contract: file.concurrency_per_contract,
            request_timeout: file.request_timeout,
            provider,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingrailsConfig {
    pub ingest_path: String,
    pub batch_path: String,
    /// At most 100 (the API's limit).
    pub batch_size: usize,
    /// Property carrying the customer (the meter's account mapping).
    pub account_property: String,
    /// Property carrying the event's quantity (an exact JSON number), the value a meter sums.
    pub quantity_property: String,
    /// `event_name` template; `{metric}` by default.
    pub event_name: String,
    /// Carry price/description overrides as these properties when set.
    pub price_property: Option<String>,
    pub description_property: Option<String>,
}

impl Default for BillingrailsConfig {
    fn default() -> Self {
        BillingrailsConfig {
            ingest_path: "/events/ingest".into(),
            batch_path: "/events/batch".into(),
            batch_size: 100,
            account_property: "billingrails_account_id".into(),
            quantity_property: "quantity".into(),
            event_name: "{metric}".into(),
            price_property: None,
            description_property: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    pub enabled: bool,
    /// DueDate is truncated to this bucket.
    pub bucket: Bucket,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            enabled: false,
            bucket: Bucket::Hour,
        }
    }
}

/// `sink.aggregate.bucket`: the period billwerk pre-aggregation sums over (`"hour"` or `"day"`;
/// anything else is refused naming the key, like every other enum of the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    /// As the config file writes it.
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// The provider's window (billwerk does not document it).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Requests per window when the provider sends no `X-RateLimit-Limit`; None: start
    /// conservatively (`initial_rate` per second) and back off on 429.
    pub limit: Option<u32>,
    /// Fraction of the budget left unused, 0.0 ..< 0.5.
    pub headroom: f64,
    /// Requests per second before the first answer tells the real limit.
    pub initial_rate: u32,
    /// The longest a 429 or a spent window pauses the senders, whatever `Retry-After` or
    /// `X-RateLimit-Reset` say; at least `window`.
    #[serde(with = "humantime_serde")]
    pub max_pause: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            window: Duration::from_secs(60),
            limit: None,
            headroom: 0.005,
            initial_rate: 10,
            max_pause: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Honour a `price_per_unit` inside events. Off by default: a compromised producer must not
    /// be able to set prices.
    pub allow_event_price: bool,
    pub event_price_min: Option<Decimal>,
    pub event_price_max: Option<Decimal>,
}

/// `[[overrides]]`: first match wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideRule {
    /// Matches this metric; absent matches any.
    #[serde(default)]
    pub metric: Option<String>,
    /// Every listed attribute must equal the given value.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub price_per_unit: Option<Decimal>,
    #[serde(default)]
    pub name: Option<String>,
    /// Template over event fields: `{id}`, `{metric}`, `{quantity}`, `{timestamp}`,
    /// `{contract}`, `{attributes.KEY}`.
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// `sqlite://PATH` (default) or `postgres://...` for several replicas; `none` disables it.
    pub url: String,
    /// How long delivered entries are kept at least (pruning also waits until every partition's
    /// committed offset is past what they cover; docs/delivery-semantics.md).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

// By hand: a PostgreSQL URL may carry a password.
impl std::fmt::Debug for LedgerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerConfig")
            .field("url", &redact_url(&self.url))
            .field("retention", &self.retention)
            .finish()
    }
}

/// A URL with any password replaced by `***`, for messages and Debug output.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => url.to_string(),
        // Unparseable: hide everything between `//` and the last `@`, where a password would be.
        Err(_) => match (url.find("//"), url.rfind('@')) {
            (Some(start), Some(at)) if at > start => {
                format!("{}//***{}", &url[..start], &url[at..])
            }
            _ => url.to_string(),
        },
    }
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            url: "sqlite://meterflow-ledger.db".into(),
            // Beyond the longest dedupe windows in the industry (Metronome 34 d, m3ter 35 d).
            retention: Duration::from_secs(35 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address for /metrics, /healthz, /readyz; empty disables the admin server.
    pub listen: String,
    /// Emit `meterflow_contract_delivered_quantity` per contract (bounded cardinality).
    pub per_contract_metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            per_contract_metrics: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `meterflow=debug,rdkafka=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

mod defaults {
    use std::time::Duration;
    /// `input.max_future`: clocks of producers drift by seconds, not minutes.
    pub const MAX_FUTURE: Duration = Duration::from_secs(5 * 60);
    /// `input.max_age`: a monthly billing period plus a few days for late producers and
    /// backlogs; equal to the default `ledger.retention`.
    pub const MAX_AGE: Duration = Duration::from_secs(35 * 24 * 3600);
    pub fn session_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn commit_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn stuck_after() -> Duration {
        super::DEFAULT_STUCK_AFTER
    }
    pub fn concurrency() -> usize {
        32
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn contract_cache_size() -> usize {
        10_000
    }
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `kafka.drain_timeout` or `overrides[2].description`.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A syntax error has no key.
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

/// The checks of a config that only later stages can make: the field mapping's pointers (the
/// decoder's rules), the price book, templates. Those stages read config's types, so config
/// asks for their checks through this trait rather than calling them: the loader above both
/// (`crate::load`, where `Config::load` and `Config::from_toml_str` live) passes the real ones,
/// and every problem of a file is still reported at once, in the order of its sections.
pub trait StageChecks {
    /// Every problem with `[input]`'s mapping, keyed `input.FIELD`.
    fn mapping(&self, input: &InputMapping) -> Vec<ConfigProblem>;
    /// Every problem the price book finds (components, overrides, description templates).
    fn prices(&self, config: &Config) -> Vec<ConfigProblem>;
    /// Parses a template: `Ok(true)` when it is empty.
    fn template(&self, text: &str) -> Result<bool, String>;
}

impl Config {
    /// Parses TOML, interpolates `${VAR}` / `${VAR:-default}` / `$${` in string values through
    /// `env`, deserializes and validates (with the later stages' `checks`); every problem at
    /// once, none showing a secret. `Config::from_toml_str` (in `crate::load`) is this with the
    /// real checks.
    pub fn parse_checked(
        text: &str,
        env: EnvLookup<'_>,
        checks: &dyn StageChecks,
    ) -> Result<Config, ConfigError> {
        let mut tree = parse::parse_toml(text).map_err(|p| ConfigError::Invalid(vec![p]))?;
        let mut problems = interpolate::interpolate_tree(&mut tree, env);
        parse::stringify_scalars(&mut tree);
        let mut suppressed: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
        let parsed = parse::deserialize(tree);
        problems.extend(parsed.problems);
        suppressed.extend(parsed.suppressed);
        let Some(config) = parsed.config else {
            return Err(ConfigError::Invalid(problems));
        };
        // Semantic checks on keys that already have a problem would only repeat it.
        let covered = |key: &str| {
            suppressed.iter().any(|s| {
                key == s
                    || key
                        .strip_prefix(s.as_str())
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            })
        };
        problems.extend(
            config
                .validate_with(checks)
                .into_iter()
                .filter(|p| !covered(&p.key)),
        );
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every problem at once (with the later stages' `checks`); empty when the config can run.
    pub fn validate_with(&self, checks: &dyn StageChecks) -> Vec<ConfigProblem> {
        validate::validate(self, checks)
    }
}
