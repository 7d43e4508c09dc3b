//! [`ConfigBuilder`]: a config from typed setters, for the tests, the benchmarks and the demo,
//! instead of TOML text written by hand (and patched with `str::replace`, which does nothing
//! when the text it looks for has changed).
//!
//! The builder only ever writes TOML text: [`ConfigBuilder::to_toml`] for a file handed to
//! `meterflow run --config`, and [`ConfigBuilder::build`] parses that same text through
//! [`Config::from_toml_str_with_env`], the loader's own parsing and validation. So it cannot make
//! a config the loader would not make from the file, and it does not depend on how the config's
//! structs are laid out. Values are written with the `toml` serializer (quotes, backslashes and
//! newlines in paths and URLs are escaped), and a `${` in a value is written as `$${`: every
//! value is taken literally, none is read from the environment.

use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use toml::{Table, Value};

use super::{Config, ConfigError, LogFormat};

/// A meterflow config under construction; see the module documentation.
///
/// Setters are named after their TOML keys (section in the doc comment) and replace what was
/// set before. Keys never set are left out, so they take the loader's defaults. Required keys
/// (`kafka.brokers`, `group_id`, `topics`, `dead_letter_topic`, the sink) have no defaults:
/// without them [`build`](Self::build) fails, as the loader would.
#[derive(Clone, Default, PartialEq)]
pub struct ConfigBuilder {
    root: Table,
}

pub use super::Bucket;

/// One `[[overrides]]` rule (first match wins).
#[derive(Clone, Default, PartialEq)]
pub struct Override {
    table: Table,
}

impl Override {
    /// A rule for every metric (no `metric` key).
    pub fn any_metric() -> Override {
        Override::default()
    }

    /// A rule for `metric`.
    pub fn metric(metric: &str) -> Override {
        let mut rule = Override::default();
        rule.table.insert("metric".into(), text(metric));
        rule
    }

    /// `attributes.KEY = VALUE`: the event's attribute must equal `value`.
    pub fn attribute(mut self, key: &str, value: &str) -> Override {
        with_table(&mut self.table, &["attributes"], |t| {
            t.insert(key.into(), text(value));
        });
        self
    }

    pub fn price_per_unit(mut self, price: Decimal) -> Override {
        self.table
            .insert("price_per_unit".into(), text(&price.to_string()));
        self
    }

    pub fn name(mut self, name: &str) -> Override {
        self.table.insert("name".into(), text(name));
        self
    }

    /// A description template (`{quantity}`, `{attributes.KEY}`, ...).
    pub fn description(mut self, template: &str) -> Override {
        self.table.insert("description".into(), text(template));
        self
    }
}

// By hand: the text holds credentials. `to_toml` shows it.
impl std::fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigBuilder").finish_non_exhaustive()
    }
}

impl ConfigBuilder {
    /// Nothing set yet.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The TOML text: what [`build`](Self::build) parses, and what a config file for `meterflow
    /// run` holds.
    pub fn to_toml(&self) -> String {
        // A table of strings, numbers, booleans, arrays and tables always serializes; an empty
        // text would fail `build` and the loader alike, never pass silently.
        toml::to_string(&self.root).unwrap_or_default()
    }

    /// The config the loader makes of [`to_toml`](Self::to_toml)'s text: parsed, validated, every
    /// problem at once.
    pub fn build(&self) -> Result<Config, ConfigError> {
        // Every `${` was written as `$${`: there is nothing to read from the environment.
        Config::from_toml_str_with_env(&self.to_toml(), &|_| None)
    }

    fn set(mut self, path: &[&str], key: &str, value: Value) -> ConfigBuilder {
        with_table(&mut self.root, path, |t| {
            t.insert(key.into(), value);
        });
        self
    }

    fn unset(mut self, path: &[&str], key: &str) -> ConfigBuilder {
        remove_at(&mut self.root, path, key);
        self
    }

    // [kafka]

    /// `kafka.brokers`: comma-separated bootstrap servers.
    pub fn brokers(self, brokers: &str) -> ConfigBuilder {
        self.set(&["kafka"], "brokers", text(brokers))
    }

    /// `kafka.group_id`.
    pub fn group_id(self, group: &str) -> ConfigBuilder {
        self.set(&["kafka"], "group_id", text(group))
    }

    /// `kafka.topics`: one input topic.
    pub fn topic(self, topic: &str) -> ConfigBuilder {
        self.topics(&[topic])
    }

    /// `kafka.topics`.
    pub fn topics(self, topics: &[&str]) -> ConfigBuilder {
        let topics = topics.iter().map(|t| text(t)).collect();
        self.set(&["kafka"], "topics", Value::Array(topics))
    }

    /// `kafka.dead_letter_topic`.
    pub fn dead_letter_topic(self, topic: &str) -> ConfigBuilder {
        self.set(&["kafka"], "dead_letter_topic", text(topic))
    }

    /// `kafka.session_timeout`.
    pub fn session_timeout(self, timeout: Duration) -> ConfigBuilder {
        self.set(&["kafka"], "session_timeout", duration(timeout))
    }

    /// `kafka.drain_timeout`.
    pub fn drain_timeout(self, timeout: Duration) -> ConfigBuilder {
        self.set(&["kafka"], "drain_timeout", duration(timeout))
    }

    /// `kafka.commit_interval`.
    pub fn commit_interval(self, interval: Duration) -> ConfigBuilder {
        self.set(&["kafka"], "commit_interval", duration(interval))
    }

    /// `kafka.stuck_after`.
    pub fn stuck_after(self, after: Duration) -> ConfigBuilder {
        self.set(&["kafka"], "stuck_after", duration(after))
    }

    /// `kafka.properties.KEY`: a librdkafka property.
    pub fn kafka_property(self, key: &str, value: &str) -> ConfigBuilder {
        self.set(&["kafka", "properties"], key, text(value))
    }

    // [input]

    /// `input.max_age`; zero is no bound.
    pub fn max_age(self, age: Duration) -> ConfigBuilder {
        self.set(&["input"], "max_age", duration(age))
    }

    /// `input.max_future`; zero is no bound.
    pub fn max_future(self, ahead: Duration) -> ConfigBuilder {
        self.set(&["input"], "max_future", duration(ahead))
    }

    // [batch]

    /// `batch.max_events`.
    pub fn max_events(self, events: usize) -> ConfigBuilder {
        self.set(&["batch"], "max_events", count(events))
    }

    /// `batch.max_wait`.
    pub fn max_wait(self, wait: Duration) -> ConfigBuilder {
        self.set(&["batch"], "max_wait", duration(wait))
    }

    /// `batch.max_in_flight`.
    pub fn max_in_flight(self, events: usize) -> ConfigBuilder {
        self.set(&["batch"], "max_in_flight", count(events))
    }

    /// `batch.pause_after`.
    pub fn pause_after(self, after: Duration) -> ConfigBuilder {
        self.set(&["batch"], "pause_after", duration(after))
    }

    // [sink]

    /// `sink.kind = "billwerk"` with its base URL and OAuth client; drops Billingrails keys.
    pub fn billwerk(self, base_url: &str, client_id: &str, client_secret: &str) -> ConfigBuilder {
        self.unset(&["sink"], "api_key")
            .unset(&["sink"], "billingrails")
            .set(&["sink"], "kind", text("billwerk"))
            .set(&["sink"], "base_url", text(base_url))
            .set(&["sink"], "client_id", text(client_id))
            .set(&["sink"], "client_secret", text(client_secret))
    }

    /// `sink.kind = "billingrails"` with its base URL (`/v1` included) and API key; drops
    /// billwerk keys.
    pub fn billingrails(self, base_url: &str, api_key: &str) -> ConfigBuilder {
        self.unset(&["sink"], "client_id")
            .unset(&["sink"], "client_secret")
            .unset(&["sink"], "legal_entity_id")
            .unset(&["sink"], "aggregate")
            .set(&["sink"], "kind", text("billingrails"))
            .set(&["sink"], "base_url", text(base_url))
            .set(&["sink"], "api_key", text(api_key))
    }

    /// `sink.legal_entity_id` (billwerk).
    pub fn legal_entity_id(self, id: &str) -> ConfigBuilder {
        self.set(&["sink"], "legal_entity_id", text(id))
    }

    /// `sink.concurrency`.
    pub fn concurrency(self, requests: usize) -> ConfigBuilder {
        self.set(&["sink"], "concurrency", count(requests))
    }

    /// `sink.concurrency_per_contract`.
    pub fn concurrency_per_contract(self, requests: usize) -> ConfigBuilder {
        self.set(&["sink"], "concurrency_per_contract", count(requests))
    }

    /// `sink.request_timeout`.
    pub fn request_timeout(self, timeout: Duration) -> ConfigBuilder {
        self.set(&["sink"], "request_timeout", duration(timeout))
    }

    /// `sink.contract_cache_size`.
    pub fn contract_cache_size(self, entries: usize) -> ConfigBuilder {
        self.set(&["sink"], "contract_cache_size", count(entries))
    }

    /// `[sink.aggregate] enabled = true` with `bucket` (billwerk pre-aggregation).
    pub fn aggregate(self, bucket: Bucket) -> ConfigBuilder {
        self.set(&["sink", "aggregate"], "enabled", Value::Boolean(true))
            .set(&["sink", "aggregate"], "bucket", text(bucket.name()))
    }

    /// `sink.billingrails.batch_size`.
    pub fn billingrails_batch_size(self, events: usize) -> ConfigBuilder {
        self.set(&["sink", "billingrails"], "batch_size", count(events))
    }

    /// `sink.billingrails.account_property`.
    pub fn billingrails_account_property(self, property: &str) -> ConfigBuilder {
        self.set(
            &["sink", "billingrails"],
            "account_property",
            text(property),
        )
    }

    /// `sink.billingrails.quantity_property`.
    pub fn billingrails_quantity_property(self, property: &str) -> ConfigBuilder {
        self.set(
            &["sink", "billingrails"],
            "quantity_property",
            text(property),
        )
    }

    /// `sink.billingrails.event_name`: a template (`{metric}`).
    pub fn billingrails_event_name(self, template: &str) -> ConfigBuilder {
        self.set(&["sink", "billingrails"], "event_name", text(template))
    }

    /// `sink.billingrails.price_property`.
    pub fn billingrails_price_property(self, property: &str) -> ConfigBuilder {
        self.set(&["sink", "billingrails"], "price_property", text(property))
    }

    /// `sink.billingrails.description_property`.
    pub fn billingrails_description_property(self, property: &str) -> ConfigBuilder {
        self.set(
            &["sink", "billingrails"],
            "description_property",
            text(property),
        )
    }

    /// `sink.billingrails.ingest_path` and `batch_path`.
    pub fn billingrails_paths(self, ingest: &str, batch: &str) -> ConfigBuilder {
        self.set(&["sink", "billingrails"], "ingest_path", text(ingest))
            .set(&["sink", "billingrails"], "batch_path", text(batch))
    }

    // [rate_limit]

    /// `rate_limit.window`.
    pub fn rate_window(self, window: Duration) -> ConfigBuilder {
        self.set(&["rate_limit"], "window", duration(window))
    }

    /// `rate_limit.limit`: requests per window when the provider does not say; `None` removes
    /// it (start at `initial_rate` and learn the limit).
    pub fn rate_limit(self, limit: Option<u32>) -> ConfigBuilder {
        match limit {
            Some(limit) => self.set(&["rate_limit"], "limit", Value::Integer(limit.into())),
            None => self.unset(&["rate_limit"], "limit"),
        }
    }

    /// `rate_limit.headroom`.
    pub fn headroom(self, share: f64) -> ConfigBuilder {
        self.set(&["rate_limit"], "headroom", Value::Float(share))
    }

    /// `rate_limit.initial_rate`.
    pub fn initial_rate(self, per_second: u32) -> ConfigBuilder {
        self.set(
            &["rate_limit"],
            "initial_rate",
            Value::Integer(per_second.into()),
        )
    }

    /// `rate_limit.max_pause`.
    pub fn max_pause(self, pause: Duration) -> ConfigBuilder {
        self.set(&["rate_limit"], "max_pause", duration(pause))
    }

    // [retry]

    /// `retry.initial_backoff` and `retry.max_backoff`.
    pub fn backoff(self, initial: Duration, max: Duration) -> ConfigBuilder {
        self.set(&["retry"], "initial_backoff", duration(initial))
            .set(&["retry"], "max_backoff", duration(max))
    }

    // [components], [pricing], [[overrides]]

    /// `components.METRIC = ID`: the billwerk component (or Billingrails name) of a metric.
    pub fn component(self, metric: &str, id: &str) -> ConfigBuilder {
        self.set(&["components"], metric, text(id))
    }

    /// `pricing.allow_event_price`.
    pub fn allow_event_price(self, allow: bool) -> ConfigBuilder {
        self.set(&["pricing"], "allow_event_price", Value::Boolean(allow))
    }

    /// `pricing.event_price_min` and `event_price_max`; `None` leaves that side open.
    pub fn event_price_bounds(self, min: Option<Decimal>, max: Option<Decimal>) -> ConfigBuilder {
        [("event_price_min", min), ("event_price_max", max)]
            .into_iter()
            .fold(self, |b, (key, bound)| match bound {
                Some(price) => b.set(&["pricing"], key, text(&price.to_string())),
                None => b.unset(&["pricing"], key),
            })
    }

    /// Appends an `[[overrides]]` rule (after those already there: first match wins).
    pub fn rule(mut self, rule: Override) -> ConfigBuilder {
        match self.root.get_mut("overrides") {
            Some(Value::Array(rules)) => rules.push(Value::Table(rule.table)),
            _ => {
                self.root.insert(
                    "overrides".into(),
                    Value::Array(vec![Value::Table(rule.table)]),
                );
            }
        }
        self
    }

    /// Removes every `[[overrides]]` rule.
    pub fn clear_rules(mut self) -> ConfigBuilder {
        self.root.remove("overrides");
        self
    }

    // [ledger]

    /// `ledger.url`: `sqlite://PATH`, `postgres://...` or `none`.
    pub fn ledger_url(self, url: &str) -> ConfigBuilder {
        self.set(&["ledger"], "url", text(url))
    }

    /// `ledger.url = "sqlite://PATH"`.
    pub fn sqlite_ledger(self, path: &Path) -> ConfigBuilder {
        self.ledger_url(&format!("sqlite://{}", path.display()))
    }

    /// `ledger.retention`.
    pub fn ledger_retention(self, retention: Duration) -> ConfigBuilder {
        self.set(&["ledger"], "retention", duration(retention))
    }

    // [admin], [log]

    /// `admin.listen`; `""` runs without the admin server.
    pub fn admin_listen(self, listen: &str) -> ConfigBuilder {
        self.set(&["admin"], "listen", text(listen))
    }

    /// `admin.per_contract_metrics`.
    pub fn per_contract_metrics(self, on: bool) -> ConfigBuilder {
        self.set(&["admin"], "per_contract_metrics", Value::Boolean(on))
    }

    /// `log.format`.
    pub fn log_format(self, format: LogFormat) -> ConfigBuilder {
        let name = match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        self.set(&["log"], "format", text(name))
    }

    /// `log.level`: a `tracing` filter.
    pub fn log_level(self, filter: &str) -> ConfigBuilder {
        self.set(&["log"], "level", text(filter))
    }
}

/// Runs `f` on the table at `path` under `root`, made (or made a table) where missing.
fn with_table(root: &mut Table, path: &[&str], f: impl FnOnce(&mut Table)) {
    match path.split_first() {
        None => f(root),
        Some((first, rest)) => {
            let mut table = match root.remove(*first) {
                Some(Value::Table(t)) => t,
                _ => Table::new(),
            };
            with_table(&mut table, rest, f);
            root.insert(first.to_string(), Value::Table(table));
        }
    }
}

/// Removes `key` from the table at `path` under `root`, if there is one.
fn remove_at(root: &mut Table, path: &[&str], key: &str) {
    let mut table = root;
    for k in path {
        match table.get_mut(*k) {
            Some(Value::Table(t)) => table = t,
            _ => return,
        }
    }
    table.remove(key);
}

/// A string value taken literally: `${` is written as `$${`, which interpolation turns back.
fn text(s: &str) -> Value {
    Value::String(s.replace("${", "$${"))
}

/// A duration as the loader reads it (`humantime`: `"1s"`, `"20ms"`, `"1m 30s"`; `"0s"`).
fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

/// A count; TOML integers are i64, and no count in a config comes near that.
fn count(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::str::FromStr;

    use super::*;

    /// Everything the loader requires, nothing else.
    fn required() -> ConfigBuilder {
        ConfigBuilder::new()
            .brokers("127.0.0.1:9092")
            .group_id("g")
            .topic("usage")
            .dead_letter_topic("usage-dlq")
            .billwerk("http://127.0.0.1:1", "client", "secret")
            .component("api_calls", "5ce53069443e551b9caccc64")
    }

    /// The TOML text read back as a plain tree (no interpolation, no validation).
    fn tree(b: &ConfigBuilder) -> Table {
        toml::from_str(&b.to_toml()).unwrap()
    }

    fn at<'a>(t: &'a Table, path: &[&str]) -> Option<&'a Value> {
        let (last, parents) = path.split_last()?;
        let mut table = t;
        for k in parents {
            table = table.get(*k)?.as_table()?;
        }
        table.get(*last)
    }

    #[test]
    fn setters_come_back_from_the_loader() {
        let config = required()
            .topics(&["a", "b"])
            .session_timeout(Duration::from_secs(6))
            .drain_timeout(Duration::from_secs(3))
            .commit_interval(Duration::from_millis(200))
            .stuck_after(Duration::from_secs(90))
            .kafka_property("fetch.wait.max.ms", "10")
            .max_age(Duration::ZERO)
            .max_future(Duration::from_secs(300))
            .max_events(200)
            .max_wait(Duration::from_millis(20))
            .max_in_flight(400)
            .concurrency(16)
            .request_timeout(Duration::from_secs(2))
            .aggregate(Bucket::Day)
            .rate_window(Duration::from_secs(1))
            .rate_limit(Some(20_000))
            .headroom(0.02)
            .initial_rate(7)
            .max_pause(Duration::from_secs(120))
            .backoff(Duration::from_millis(20), Duration::from_millis(500))
            .component("api_calls", "5ce53069443e551b9caccc64")
            .allow_event_price(true)
            .event_price_bounds(Some(Decimal::new(1, 3)), Some(Decimal::new(10, 0)))
            .rule(
                Override::metric("api_calls")
                    .attribute("plan", "enterprise")
                    .price_per_unit(Decimal::new(15, 4))
                    .name("API calls (enterprise)")
                    .description("{quantity} API calls in {attributes.region}"),
            )
            .rule(Override::any_metric().description("{metric}"))
            .ledger_url("sqlite::memory:")
            .ledger_retention(Duration::from_secs(40 * 86_400))
            .admin_listen("")
            .per_contract_metrics(false)
            .log_format(LogFormat::Json)
            .log_level("meterflow=debug")
            .build()
            .unwrap();
        let k = &config.kafka;
        assert_eq!(k.brokers, "127.0.0.1:9092");
        assert_eq!(k.group_id, "g");
        assert_eq!(k.topics, ["a", "b"]);
        assert_eq!(k.dead_letter_topic, "usage-dlq");
        assert_eq!(k.session_timeout, Duration::from_secs(6));
        assert_eq!(k.drain_timeout, Duration::from_secs(3));
        assert_eq!(k.commit_interval, Duration::from_millis(200));
        assert_eq!(k.stuck_after, Duration::from_secs(90));
        assert_eq!(
            k.properties,
            BTreeMap::from([("fetch.wait.max.ms".to_string(), "10".to_string())])
        );
        assert_eq!(config.input.max_age, Duration::ZERO);
        assert_eq!(config.input.max_future, Duration::from_secs(300));
        assert_eq!(config.batch.max_events, 200);
        assert_eq!(config.batch.max_wait, Duration::from_millis(20));
        assert_eq!(config.batch.max_in_flight, 400);
        let r = &config.rate_limit;
        assert_eq!(r.window, Duration::from_secs(1));
        assert_eq!(r.limit, Some(20_000));
        assert_eq!(r.headroom, 0.02);
        assert_eq!(r.initial_rate, 7);
        assert_eq!(r.max_pause, Duration::from_secs(120));
        assert_eq!(config.retry.initial_backoff, Duration::from_millis(20));
        assert_eq!(config.retry.max_backoff, Duration::from_millis(500));
        assert_eq!(
            config.components,
            BTreeMap::from([(
                "api_calls".to_string(),
                "5ce53069443e551b9caccc64".to_string()
            )])
        );
        assert!(config.pricing.allow_event_price);
        assert_eq!(config.pricing.event_price_min, Some(Decimal::new(1, 3)));
        assert_eq!(config.pricing.event_price_max, Some(Decimal::new(10, 0)));
        assert_eq!(config.overrides.len(), 2);
        let first = &config.overrides[0];
        assert_eq!(first.metric.as_deref(), Some("api_calls"));
        assert_eq!(
            first.attributes,
            BTreeMap::from([("plan".to_string(), "enterprise".to_string())])
        );
        assert_eq!(
            first.price_per_unit,
            Some(Decimal::from_str("0.0015").unwrap())
        );
        assert_eq!(first.name.as_deref(), Some("API calls (enterprise)"));
        assert_eq!(
            first.description.as_deref(),
            Some("{quantity} API calls in {attributes.region}")
        );
        assert_eq!(config.overrides[1].metric, None);
        assert_eq!(config.ledger.url, "sqlite::memory:");
        assert_eq!(config.ledger.retention, Duration::from_secs(40 * 86_400));
        assert_eq!(config.admin.listen, "");
        assert!(!config.admin.per_contract_metrics);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "meterflow=debug");
        // The sink through the text only: its structs are not the builder's business.
        let t = tree(&required().concurrency(16).aggregate(Bucket::Day));
        assert_eq!(at(&t, &["sink", "kind"]), Some(&text("billwerk")));
        assert_eq!(at(&t, &["sink", "client_id"]), Some(&text("client")));
        assert_eq!(at(&t, &["sink", "client_secret"]), Some(&text("secret")));
        assert_eq!(at(&t, &["sink", "concurrency"]), Some(&Value::Integer(16)));
        assert_eq!(
            at(&t, &["sink", "aggregate", "enabled"]),
            Some(&Value::Boolean(true))
        );
        assert_eq!(at(&t, &["sink", "aggregate", "bucket"]), Some(&text("day")));
    }

    #[test]
    fn unset_keys_take_the_loaders_defaults() {
        let built = required().build().unwrap();
        let text = "[kafka]\nbrokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\n\
                    topics = [\"usage\"]\ndead_letter_topic = \"usage-dlq\"\n\
                    [sink]\nkind = \"billwerk\"\nbase_url = \"http://127.0.0.1:1\"\n\
                    client_id = \"client\"\nclient_secret = \"secret\"\n\
                    [components]\napi_calls = \"5ce53069443e551b9caccc64\"\n";
        let written = Config::from_toml_str_with_env(text, &|_| None).unwrap();
        // The same config as from the hand-written text (Debug covers every field).
        assert_eq!(format!("{built:?}"), format!("{written:?}"));
    }

    #[test]
    fn quotes_backslashes_newlines_and_dollars_are_taken_literally() {
        let odd = "a \"quoted\" \\back\\slash\nnew line ${HOME} $${x} $ end ünï";
        // A description is a template: braces are its fields.
        let odd_text = "a \"quoted\" \\back\\slash\nnew line $ end $$ ünï";
        let path = Path::new("/tmp/led\"ger\\dir/x y.db");
        let config = required()
            .group_id(odd)
            .kafka_property("odd.\"key\"", odd)
            .sqlite_ledger(path)
            .rule(
                Override::metric("api_calls")
                    .attribute("a.\"b\"", odd)
                    .name(odd)
                    .description(odd_text),
            )
            .build()
            .unwrap();
        assert_eq!(config.kafka.group_id, odd);
        assert_eq!(
            config
                .kafka
                .properties
                .get("odd.\"key\"")
                .map(String::as_str),
            Some(odd)
        );
        assert_eq!(
            config.ledger.url,
            "sqlite:///tmp/led\"ger\\dir/x y.db".to_string()
        );
        let rule = &config.overrides[0];
        assert_eq!(
            rule.attributes.get("a.\"b\"").map(String::as_str),
            Some(odd)
        );
        assert_eq!(rule.name.as_deref(), Some(odd));
        assert_eq!(rule.description.as_deref(), Some(odd_text));
        // No value can add a key or a section: a quote does not end the string.
        let injected = required().brokers("x\"\n[admin]\nlisten = \"0.0.0.0:1");
        let t = tree(&injected);
        assert_eq!(t.get("admin"), None);
        assert_eq!(
            injected.build().unwrap().kafka.brokers,
            "x\"\n[admin]\nlisten = \"0.0.0.0:1"
        );
    }

    #[test]
    fn what_the_loader_refuses_the_builder_cannot_build() {
        let err = ConfigBuilder::new().build().unwrap_err().to_string();
        assert!(err.contains("kafka: is required"), "{err}");
        assert!(err.contains("sink: is required"), "{err}");
        // Validation, not only parsing: the drain must end before the session times out.
        let err = required()
            .session_timeout(Duration::from_secs(6))
            .drain_timeout(Duration::from_secs(6))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("kafka.drain_timeout: "), "{err}");
        let err = required().ledger_url("mysql://x").build().unwrap_err();
        assert!(err.to_string().starts_with("ledger.url: "), "{err}");
    }

    #[test]
    fn a_sink_kind_replaces_the_others_keys_and_setters_replace_values() {
        let b = required()
            .legal_entity_id("entity")
            .aggregate(Bucket::Hour)
            .billingrails("http://127.0.0.1:1/v1", "br_key")
            .billingrails_batch_size(50)
            .billingrails_event_name("{metric}");
        let t = tree(&b);
        let sink = t["sink"].as_table().unwrap();
        let mut keys: Vec<&str> = sink.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["api_key", "base_url", "billingrails", "kind"]);
        b.build().unwrap();
        let back = b.billwerk("http://127.0.0.1:2", "c", "s");
        assert!(at(&tree(&back), &["sink", "api_key"]).is_none());
        assert!(at(&tree(&back), &["sink", "billingrails"]).is_none());
        back.build().unwrap();

        let b = required().rate_limit(Some(5)).max_events(1).max_events(2);
        assert_eq!(b.build().unwrap().batch.max_events, 2);
        let b = b.rate_limit(None);
        assert!(at(&tree(&b), &["rate_limit", "limit"]).is_none());
        assert_eq!(b.build().unwrap().rate_limit.limit, None);
        let b = b
            .rule(Override::metric("api_calls"))
            .rule(Override::any_metric());
        assert_eq!(b.build().unwrap().overrides.len(), 2);
        assert!(b.clear_rules().build().unwrap().overrides.is_empty());
    }
}
