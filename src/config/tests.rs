use std::collections::HashMap;
use std::time::Duration;

use rust_decimal::Decimal;

use super::*;

const SECRET: &str = "hunter2-TOP-SECRET";

fn env(name: &str) -> Option<String> {
    match name {
        "BILLWERK_CLIENT_ID" => Some("client-1".into()),
        "BILLWERK_CLIENT_SECRET" | "BILLINGRAILS_API_KEY" | "KAFKA_SASL_PASSWORD" => {
            Some(SECRET.into())
        }
        _ => None,
    }
}

const VALID: &str = r#"
[kafka]
brokers = "localhost:9092"
group_id = "meterflow"
topics = ["usage-events"]
dead_letter_topic = "usage-events-dlq"

[sink]
kind = "billwerk"
base_url = "https://sandbox.billwerk.com"
client_id = "${BILLWERK_CLIENT_ID}"
client_secret = "${BILLWERK_CLIENT_SECRET}"

[components]
api_calls = "5ce53069443e551b9caccc64"
storage = "5ce53069443e551b9caccc65"
"#;

fn valid() -> Config {
    Config::from_toml_str_with_env(VALID, &env).expect("the base config is valid")
}

fn load(text: &str) -> Result<Config, Vec<ConfigProblem>> {
    Config::from_toml_str_with_env(text, &env).map_err(|e| match e {
        ConfigError::Invalid(p) => p,
        e => panic!("unexpected error {e}"),
    })
}

fn problems(text: &str) -> Vec<ConfigProblem> {
    load(text).expect_err("expected problems")
}

/// The base config with `edit` applied to its TOML tree.
fn edited(edit: impl FnOnce(&mut toml::Table)) -> String {
    let mut table: toml::Table = toml::from_str(VALID).unwrap();
    edit(&mut table);
    toml::to_string(&table).unwrap()
}

/// The billwerk part of a billwerk config.
fn bw(c: &mut Config) -> &mut BillwerkConfig {
    c.sink.billwerk_mut().expect("a billwerk sink")
}

/// `[sink.billingrails]` of a Billingrails config.
fn br(c: &mut Config) -> &mut BillingrailsConfig {
    &mut c
        .sink
        .billingrails_mut()
        .expect("a Billingrails sink")
        .billingrails
}

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.entry(key)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
}

fn keys(problems: &[ConfigProblem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

/// The one problem of a config mutated from the valid one; asserts it is the only one.
fn only_problem(edit: impl FnOnce(&mut Config)) -> ConfigProblem {
    let mut c = valid();
    edit(&mut c);
    let mut p = c.validate();
    assert_eq!(p.len(), 1, "expected exactly one problem, got {p:#?}");
    p.remove(0)
}

fn assert_problem(edit: impl FnOnce(&mut Config), key: &str, contains: &[&str]) {
    let p = only_problem(edit);
    assert_eq!(p.key, key, "{p}");
    for c in contains {
        assert!(p.message.contains(c), "{p:?} should contain {c:?}");
    }
}

#[test]
fn the_base_config_is_valid_and_has_defaults() {
    let c = valid();
    assert!(c.validate().is_empty());
    assert_eq!(c.kafka.session_timeout, Duration::from_secs(30));
    let billwerk = c.sink.billwerk().unwrap();
    assert_eq!(Some(billwerk.client_id.as_str()), Some("client-1"));
    assert_eq!(billwerk.client_secret.expose(), SECRET);
    assert_eq!(c.input.id, "/id");
    assert_eq!(c.batch.max_events, 500);
}

#[test]
fn example_configs_load_and_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = Config::from_toml_str_with_env(&text, &env) {
                panic!("{} does not validate:\n{e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "expected minimal, meterflow and billingrails examples"
    );
    let full = std::fs::read_to_string(dir.join("meterflow.toml")).unwrap();
    let c = Config::from_toml_str_with_env(&full, &env).unwrap();
    assert_eq!(c.overrides.len(), 2);
    assert_eq!(
        c.overrides[0].price_per_unit,
        Some("0.0008".parse().unwrap())
    );
}

#[test]
fn the_full_example_sets_every_key() {
    // Every key of the shape appears (commented or not) in config/meterflow.toml.
    let full = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/meterflow.toml"),
    )
    .unwrap();
    for key in [
        "brokers",
        "group_id",
        "topics",
        "dead_letter_topic",
        "session_timeout",
        "drain_timeout",
        "commit_interval",
        "stuck_after",
        "[kafka.properties]",
        "[input]",
        "contract_external_id",
        "price_per_unit",
        "max_future",
        "max_age",
        "max_events",
        "max_wait",
        "max_in_flight",
        "pause_after",
        "kind",
        "base_url",
        "client_id",
        "client_secret",
        "legal_entity_id",
        "api_key",
        "concurrency",
        "request_timeout",
        "contract_cache_size",
        "ingest_path",
        "batch_path",
        "batch_size",
        "account_property",
        "event_name",
        "price_property",
        "description_property",
        "[sink.aggregate]",
        "enabled",
        "bucket",
        "window",
        "limit",
        "headroom",
        "initial_rate",
        "max_pause",
        "initial_backoff",
        "max_backoff",
        "[components]",
        "allow_event_price",
        "event_price_min",
        "event_price_max",
        "[[overrides]]",
        "attributes",
        "name",
        "description",
        "url",
        "retention",
        "listen",
        "per_contract_metrics",
        "format",
        "level",
    ] {
        assert!(
            full.contains(key),
            "config/meterflow.toml does not mention {key}"
        );
    }
}

// ---- interpolation ----

#[test]
fn a_missing_variable_names_the_key() {
    let text = VALID.replace("${BILLWERK_CLIENT_SECRET}", "${NOT_SET_ANYWHERE}");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(
        p[0].to_string(),
        "sink.client_secret: environment variable NOT_SET_ANYWHERE is not set"
    );
}

#[test]
fn defaults_and_escapes_interpolate() {
    let text = edited(|t| {
        table(t, "kafka").insert("brokers".into(), "${NOT_SET:-broker:9092}".into());
        t.insert(
            "overrides".into(),
            toml::Value::Array(vec![
                toml::toml! { description = "$${quantity} {quantity}" }.into(),
            ]),
        );
    });
    // `$${quantity}` becomes `${quantity}`, which as a template is `$` then the field.
    let c = load(&text).unwrap();
    assert_eq!(c.kafka.brokers, "broker:9092");
    assert_eq!(
        c.overrides[0].description.as_deref(),
        Some("${quantity} {quantity}")
    );
}

#[test]
fn interpolation_happens_in_nested_tables_and_arrays() {
    let vars: HashMap<&str, &str> = HashMap::from([
        ("TOPIC", "from-env"),
        ("BILLWERK_CLIENT_ID", "id"),
        ("BILLWERK_CLIENT_SECRET", "s"),
    ]);
    let text = VALID.replace("[\"usage-events\"]", "[\"${TOPIC}\", \"b\"]");
    let c = Config::from_toml_str_with_env(&text, &|n| vars.get(n).map(|v| v.to_string())).unwrap();
    assert_eq!(c.kafka.topics, vec!["from-env", "b"]);
}

#[test]
fn integer_and_boolean_properties_and_attributes_become_text() {
    let text = format!(
        "{VALID}
[kafka.properties]
\"fetch.min.bytes\" = 1024
\"enable.ssl.certificate.verification\" = false
[[overrides]]
attributes = {{ tier = 3, beta = true }}
name = \"tier 3\"
"
    );
    let c = load(&text).unwrap();
    assert_eq!(c.kafka.properties["fetch.min.bytes"], "1024");
    assert_eq!(
        c.kafka.properties["enable.ssl.certificate.verification"],
        "false"
    );
    assert_eq!(c.overrides[0].attributes["tier"], "3");
    assert_eq!(c.overrides[0].attributes["beta"], "true");
}

// ---- structural problems ----

#[test]
fn unknown_keys_are_named_with_a_suggestion() {
    let text = VALID.replace("group_id =", "groupid =");
    let p = problems(&text);
    assert_eq!(keys(&p), vec!["kafka.groupid", "kafka.group_id"]);
    assert!(
        p[0].message.contains("did you mean `group_id`?"),
        "{}",
        p[0]
    );
    assert!(
        p[0].message.contains("accepted: brokers, group_id"),
        "{}",
        p[0]
    );
    assert!(p[1].message.starts_with("is required"), "{}", p[1]);

    let p = problems(&format!("{VALID}\n[metrics]\nlisten = \"x\"\n"));
    assert_eq!(keys(&p), vec!["metrics"]);
    assert!(p[0].message.starts_with("unknown section"));

    let p = problems(&format!("{VALID}\n[[overrides]]\nprice = \"1\"\n"));
    assert_eq!(keys(&p), vec!["overrides[0].price"]);
    assert!(p[0].message.contains("price_per_unit"));
}

#[test]
fn wrong_types_and_bad_enums_are_reported_with_the_key() {
    let text = edited(|t| {
        table(t, "batch").insert("max_events".into(), "many".into());
        table(t, "sink").insert("kind".into(), "billwork".into());
        table(t, "kafka").insert("session_timeout".into(), "30 parsecs".into());
    });
    let p = problems(&text);
    let k = keys(&p);
    assert!(k.contains(&"batch.max_events"), "{p:#?}");
    assert!(k.contains(&"kafka.session_timeout"), "{p:#?}");
    let kind = p.iter().find(|p| p.key == "sink.kind").unwrap();
    assert_eq!(
        kind.message,
        "\"billwork\" is not accepted; expected \"billwerk\" or \"billingrails\""
    );
}

#[test]
fn every_missing_required_key_is_reported_at_once() {
    let p = problems("");
    assert_eq!(keys(&p), vec!["kafka", "sink"]);
    let p = problems("[kafka]\n[sink]\n");
    assert_eq!(
        keys(&p),
        vec![
            "kafka.brokers",
            "kafka.group_id",
            "kafka.topics",
            "kafka.dead_letter_topic",
            "sink.kind",
            "sink.base_url",
        ],
        "{p:#?}"
    );
}

#[test]
fn a_syntax_error_gives_line_and_column_but_not_the_line() {
    let text = VALID.replace(
        "client_secret = \"${BILLWERK_CLIENT_SECRET}\"",
        &format!("client_secret = {SECRET}"),
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "");
    assert!(
        p[0].message
            .starts_with("TOML syntax error at line 12, column"),
        "{}",
        p[0]
    );
    assert!(!p[0].to_string().contains(SECRET));
}

// ---- semantic problems, one rule at a time ----

#[test]
fn kafka_rules() {
    assert_problem(
        |c| c.kafka.brokers = " ".into(),
        "kafka.brokers",
        &["is empty"],
    );
    assert_problem(
        |c| c.kafka.brokers = "a:1,,b:2".into(),
        "kafka.brokers",
        &["empty entry"],
    );
    assert_problem(
        |c| c.kafka.group_id = "".into(),
        "kafka.group_id",
        &["is empty"],
    );
    assert_problem(
        |c| c.kafka.topics.clear(),
        "kafka.topics",
        &["at least one"],
    );
    assert_problem(
        |c| c.kafka.topics.push("bad topic!".into()),
        "kafka.topics[1]",
        &["not a valid Kafka topic name"],
    );
    assert_problem(
        |c| c.kafka.topics.push("usage-events".into()),
        "kafka.topics[1]",
        &["listed twice"],
    );
    assert_problem(
        |c| c.kafka.topics = vec!["^usage-.*".into()],
        "kafka.topics[0]",
        &["matches the dead-letter topic"],
    );
    assert_problem(
        |c| c.kafka.topics = vec!["^usage-(".into()],
        "kafka.topics[0]",
        &["not a valid regex"],
    );
    assert_problem(
        |c| c.kafka.dead_letter_topic = "".into(),
        "kafka.dead_letter_topic",
        &["is empty"],
    );
    assert_problem(
        |c| c.kafka.dead_letter_topic = "usage-events".into(),
        "kafka.dead_letter_topic",
        &["\"usage-events\" is also an input topic"],
    );
    assert_problem(
        |c| c.kafka.drain_timeout = Duration::from_secs(30),
        "kafka.drain_timeout",
        &["30s", "drain must end before the group evicts this member"],
    );
    assert_problem(
        |c| c.kafka.session_timeout = Duration::from_secs(301),
        "kafka.session_timeout",
        &["5m 1s", "6s to 5m"],
    );
    assert_problem(
        |c| c.kafka.commit_interval = Duration::ZERO,
        "kafka.commit_interval",
        &["is 0"],
    );
    assert_problem(
        |c| c.kafka.stuck_after = Duration::from_millis(500),
        "kafka.stuck_after",
        &["500ms", "not longer than kafka.commit_interval (1s)"],
    );
    assert_problem(
        |c| {
            c.kafka
                .properties
                .insert("enable.auto.offset.store".into(), "true".into());
        },
        "kafka.properties.\"enable.auto.offset.store\"",
        &["meterflow sets this property itself"],
    );
    // A short session timeout also makes the default drain too long: both are reported.
    let mut c = valid();
    c.kafka.session_timeout = Duration::from_secs(5);
    assert_eq!(
        keys(&c.validate()),
        vec!["kafka.session_timeout", "kafka.drain_timeout"]
    );
}

#[test]
fn input_mapping_rules() {
    assert_problem(
        |c| c.input.id = "meta.id".into(),
        "input.id",
        &["not a JSON Pointer", "starting with `/`"],
    );
    assert_problem(
        |c| c.input.metric = "/a~2b".into(),
        "input.metric",
        &["`~` must be followed by 0"],
    );
    assert_problem(
        |c| c.input.quantity = "".into(),
        "input.quantity",
        &["every event needs"],
    );
    assert_problem(
        |c| {
            c.input.contract_id = "".into();
            c.input.contract_external_id = "".into();
        },
        "input.contract_id",
        &["both empty"],
    );
    let mut c = valid();
    c.input.contract_id = "".into();
    c.input.attributes = "".into();
    c.input.id = "/meta/event_id".into();
    assert!(c.validate().is_empty());
}

#[test]
fn batch_rules() {
    let p = {
        let mut c = valid();
        c.batch.max_events = 0;
        c.validate()
    };
    assert_eq!(keys(&p), vec!["batch.max_events"]);
    assert_problem(
        |c| c.batch.max_in_flight = 499,
        "batch.max_in_flight",
        &["499", "batch.max_events (500)"],
    );
    assert_problem(
        |c| c.batch.pause_after = Duration::from_secs(11),
        "batch.pause_after",
        &["11s", "longer than 10s", "rebalance"],
    );
    let mut c = valid();
    c.batch.pause_after = Duration::ZERO;
    assert!(c.validate().is_empty(), "0s pauses at once");
}

#[test]
fn sink_rules() {
    assert_problem(
        |c| c.sink.base_url = "ftp://x.example".into(),
        "sink.base_url",
        &["\"ftp://x.example\" is not an http(s) URL"],
    );
    assert_problem(
        |c| c.sink.base_url = "not a url".into(),
        "sink.base_url",
        &["is not a URL"],
    );
    assert_problem(
        |c| c.sink.base_url = "https://h/?a=1".into(),
        "sink.base_url",
        &["query"],
    );
    let p = only_problem(|c| c.sink.base_url = format!("https://u:{SECRET}@h"));
    assert_eq!(p.key, "sink.base_url");
    assert!(!p.message.contains(SECRET));
    assert_problem(
        |c| bw(c).client_id = String::new(),
        "sink.client_id",
        &["required for billwerk"],
    );
    assert_problem(
        |c| bw(c).client_secret = Secret::new(""),
        "sink.client_secret",
        &["required for billwerk"],
    );
    assert_problem(
        |c| bw(c).legal_entity_id = Some("".into()),
        "sink.legal_entity_id",
        &["is empty"],
    );
    assert_problem(
        |c| c.sink.concurrency = 0,
        "sink.concurrency",
        &["1 to 1024"],
    );
    assert_problem(|c| c.sink.concurrency = 1025, "sink.concurrency", &["1025"]);
    assert_problem(
        |c| c.sink.concurrency_per_contract = Some(0),
        "sink.concurrency_per_contract",
        &["1 to sink.concurrency"],
    );
    assert_problem(
        |c| c.sink.request_timeout = Duration::ZERO,
        "sink.request_timeout",
        &["is 0"],
    );
    // The bucket is an enum: a wrong one is refused as the file is read.
    let text = edited(|t| {
        let aggregate = table(table(t, "sink"), "aggregate");
        aggregate.insert("enabled".into(), true.into());
        aggregate.insert("bucket".into(), "week".into());
    });
    let p = problems(&text);
    assert_eq!(keys(&p), vec!["sink.aggregate.bucket"], "{p:#?}");
    for c in ["\"week\"", "\"hour\" or \"day\""] {
        assert!(p[0].message.contains(c), "{:?} should contain {c:?}", p[0]);
    }
}

fn billingrails() -> Config {
    let mut c = valid();
    c.sink.provider = ProviderConfig::Billingrails(BillingrailsSinkConfig {
        api_key: Secret::new(SECRET),
        billingrails: BillingrailsConfig::default(),
    });
    c.sink.base_url = "https://api.billingrails.com/v1".into();
    c.components.insert("free_text".into(), "any name".into());
    assert!(c.validate().is_empty(), "{:#?}", c.validate());
    c
}

#[test]
fn billingrails_rules() {
    let check = |edit: fn(&mut Config), key: &str, contains: &str| {
        let mut c = billingrails();
        edit(&mut c);
        let p = c.validate();
        assert_eq!(keys(&p), vec![key], "{p:#?}");
        assert!(p[0].message.contains(contains), "{}", p[0]);
    };
    check(
        |c| c.sink.billingrails_mut().unwrap().api_key = Secret::new(""),
        "sink.api_key",
        "required for billingrails",
    );
    check(
        |c| br(c).batch_size = 101,
        "sink.billingrails.batch_size",
        "1 to 100",
    );
    check(
        |c| br(c).batch_size = 0,
        "sink.billingrails.batch_size",
        "0 is out of range",
    );
    check(
        |c| br(c).batch_path = "events/batch".into(),
        "sink.billingrails.batch_path",
        "start with `/`",
    );
    check(
        |c| br(c).event_name = "{metrc}".into(),
        "sink.billingrails.event_name",
        "unknown field `{metrc}`",
    );
    check(
        |c| br(c).account_property = "".into(),
        "sink.billingrails.account_property",
        "is empty",
    );
    check(
        |c| br(c).price_property = Some("".into()),
        "sink.billingrails.price_property",
        "is empty",
    );
    check(
        |c| br(c).quantity_property = " ".into(),
        "sink.billingrails.quantity_property",
        "is empty",
    );
    check(
        |c| br(c).price_property = Some("billingrails_account_id".into()),
        "sink.billingrails.price_property",
        "already sink.billingrails.account_property",
    );
}

/// A billwerk `[sink]` without one of its required keys is refused, naming the key and what to
/// put there; so is a Billingrails one without its API key.
#[test]
fn a_provider_section_missing_its_required_key_is_refused_naming_it() {
    for (key, expected) in [
        ("client_id", "the OAuth client id of an API client"),
        ("client_secret", "the OAuth client secret"),
    ] {
        let text = edited(|t| {
            table(t, "sink").remove(key);
        });
        let p = problems(&text);
        assert_eq!(keys(&p), vec![format!("sink.{key}").as_str()], "{p:#?}");
        assert!(
            p[0].message.starts_with("is required for billwerk: ")
                && p[0].message.contains(expected),
            "{}",
            p[0]
        );
    }
    let text = edited(|t| {
        let sink = table(t, "sink");
        sink.insert("kind".into(), "billingrails".into());
        sink.insert("base_url".into(), "https://api.billingrails.com/v1".into());
    });
    let p = problems(&text);
    assert_eq!(keys(&p), vec!["sink.api_key"], "{p:#?}");
    assert!(
        p[0].message.contains("is required for billingrails"),
        "{}",
        p[0]
    );
}

/// `[sink.aggregate]` belongs to billwerk: a Billingrails config has no such key, so the
/// section is refused where it is read, naming the key.
#[test]
fn billingrails_refuses_pre_aggregation() {
    let text = edited(|t| {
        let sink = table(t, "sink");
        sink.insert("kind".into(), "billingrails".into());
        sink.insert("base_url".into(), "https://api.billingrails.com/v1".into());
        sink.insert("api_key".into(), "${BILLINGRAILS_API_KEY}".into());
        let mut aggregate = toml::Table::new();
        aggregate.insert("enabled".into(), true.into());
        sink.insert("aggregate".into(), aggregate.into());
    });
    let p = problems(&text);
    assert_eq!(keys(&p), vec!["sink.aggregate.enabled"], "{p:#?}");
    assert!(
        p[0].message.contains("pre-aggregation is for billwerk"),
        "{}",
        p[0]
    );
}

#[test]
fn rate_limit_and_retry_rules() {
    assert_problem(
        |c| c.rate_limit.window = Duration::ZERO,
        "rate_limit.window",
        &["is 0"],
    );
    assert_problem(
        |c| c.rate_limit.headroom = 0.5,
        "rate_limit.headroom",
        &["0.5 is out of range"],
    );
    assert_problem(
        |c| c.rate_limit.headroom = -0.1,
        "rate_limit.headroom",
        &["-0.1"],
    );
    assert_problem(
        |c| c.rate_limit.headroom = f64::NAN,
        "rate_limit.headroom",
        &["NaN"],
    );
    assert_problem(
        |c| c.rate_limit.limit = Some(0),
        "rate_limit.limit",
        &["is 0"],
    );
    assert_problem(
        |c| c.rate_limit.initial_rate = 0,
        "rate_limit.initial_rate",
        &["is 0"],
    );
    assert_problem(
        |c| c.rate_limit.max_pause = Duration::from_secs(30),
        "rate_limit.max_pause",
        &["30s is out of range", "rate_limit.window (1m)"],
    );
    assert_problem(
        |c| c.rate_limit.max_pause = Duration::from_secs(8 * 24 * 3600),
        "rate_limit.max_pause",
        &["8days", "at most 7d"],
    );
    assert_problem(
        |c| c.retry.initial_backoff = Duration::from_secs(60),
        "retry.initial_backoff",
        &["1m", "retry.max_backoff (30s)"],
    );
    assert_problem(
        |c| c.retry.initial_backoff = Duration::ZERO,
        "retry.initial_backoff",
        &["hot loop"],
    );
}

#[test]
fn components_rules() {
    assert_problem(
        |c| c.components.clear(),
        "components",
        &["no metric is mapped"],
    );
    assert_problem(
        |c| {
            c.components.insert("api.calls".into(), "".into());
        },
        "components.\"api.calls\"",
        &["component id is empty"],
    );
    assert_problem(
        |c| {
            c.components
                .insert("x".into(), "5ce53069443e551b9caccc6".into());
        },
        "components.x",
        &["not a billwerk ComponentId", "24 hexadecimal"],
    );
}

#[test]
fn override_and_pricing_rules_come_from_the_price_book() {
    let rule = |f: fn(&mut OverrideRule)| {
        move |c: &mut Config| {
            let mut r = OverrideRule {
                metric: Some("api_calls".into()),
                attributes: Default::default(),
                price_per_unit: None,
                name: None,
                description: None,
            };
            f(&mut r);
            c.overrides.push(r);
        }
    };
    assert_problem(
        rule(|r| r.metric = Some("api_cals".into())),
        "overrides[0].metric",
        &[
            "\"api_cals\" is not a metric in [components]",
            "api_calls, storage",
        ],
    );
    assert_problem(
        rule(|r| r.price_per_unit = Some(Decimal::new(-1, 2))),
        "overrides[0].price_per_unit",
        &["-0.01 is negative"],
    );
    assert_problem(
        rule(|r| r.description = Some("{quantity} in {region}".into())),
        "overrides[0].description",
        &["unknown field `{region}`", "{attributes.KEY}"],
    );
    assert_problem(
        rule(|r| r.description = Some("{quantity".into())),
        "overrides[0].description",
        &["unclosed `{`"],
    );
    assert_problem(
        rule(|r| r.name = Some(" ".into())),
        "overrides[0].name",
        &["is empty"],
    );
    let mut c = valid();
    c.pricing.allow_event_price = true;
    let p = c.validate();
    assert_eq!(
        keys(&p),
        vec!["pricing.event_price_min", "pricing.event_price_max"]
    );
    assert!(p[0]
        .message
        .contains("required when pricing.allow_event_price = true"));
    c.pricing.event_price_max = Some(Decimal::new(-2, 0));
    assert_eq!(
        c.validate()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>(),
        vec![
            "pricing.event_price_min: is required when pricing.allow_event_price = true: event \
             prices are accepted only within [event_price_min, event_price_max]",
            "pricing.event_price_max: -2 is negative: expected a price ≥ 0",
        ]
    );
    let mut c = valid();
    c.pricing.allow_event_price = true;
    c.pricing.event_price_min = Some(Decimal::new(5, 0));
    c.pricing.event_price_max = Some(Decimal::new(1, 0));
    let p = c.validate();
    assert_eq!(keys(&p), vec!["pricing.event_price_min"]);
    assert!(p[0]
        .message
        .contains("5 is greater than pricing.event_price_max (1)"));
}

#[test]
fn a_shadowed_override_is_reported() {
    let text = format!(
        "{VALID}
[[overrides]]
metric = \"api_calls\"
name = \"all api calls\"

[[overrides]]
metric = \"api_calls\"
attributes = {{ plan = \"enterprise\" }}
name = \"enterprise\"
"
    );
    let p = problems(&text);
    assert_eq!(keys(&p), vec!["overrides[1]"]);
    assert!(p[0].message.contains("overrides[0] comes first"));
}

#[test]
fn ledger_admin_and_log_rules() {
    assert_problem(
        |c| c.ledger.url = "mysql://db".into(),
        "ledger.url",
        &["\"mysql://db\" is not accepted", "sqlite://PATH"],
    );
    assert_problem(
        |c| c.ledger.url = "sqlite://".into(),
        "ledger.url",
        &["no file path"],
    );
    let p = only_problem(|c| c.ledger.url = format!("postgres://u:{SECRET}@/"));
    assert_eq!(p.key, "ledger.url");
    assert!(!p.message.contains(SECRET), "{p}");
    assert_problem(
        |c| c.ledger.retention = Duration::ZERO,
        "ledger.retention",
        &["is 0"],
    );
    assert_problem(
        |c| c.admin.listen = "localhost:9090".into(),
        "admin.listen",
        &["\"localhost:9090\" is not a socket address"],
    );
    assert_problem(
        |c| c.log.level = "info,=[".into(),
        "log.level",
        &["not a tracing filter"],
    );
    for ok in [
        "none",
        "sqlite://x.db",
        "postgres://u:p@db/meterflow",
        "postgresql://db/m",
    ] {
        let mut c = valid();
        c.ledger.url = ok.into();
        assert!(c.validate().is_empty(), "{ok}");
    }
    let mut c = valid();
    c.admin.listen = "".into();
    c.log.level = "meterflow=debug,rdkafka=warn".into();
    assert!(c.validate().is_empty());
}

// ---- every problem at once ----

#[test]
fn every_problem_is_reported_together() {
    let text = r#"
[kafka]
brokers = ""
group_id = "meterflow"
topics = ["usage-events"]
dead_letter_topic = "usage-events"
drain_timeout = "45s"
brokerz = "typo"

[sink]
kind = "billwerk"
base_url = "sandbox.billwerk.com"
client_secret = "${BILLWERK_CLIENT_SECRET_TYPO}"
concurrency = 0

[rate_limit]
headroom = 0.7

[components]
api_calls = "not-a-component-id"

[[overrides]]
metric = "api_call"
price_per_unit = "-1"
description = "{quantity} calls in {attributes.region"

[ledger]
url = "redis://localhost"

[admin]
listen = "localhost:9090"
"#;
    let p = problems(text);
    let rendered: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    insta::assert_snapshot!(rendered.join("\n"));
}

// ---- secrets ----

#[test]
fn secrets_never_appear_in_errors_or_debug_output() {
    let text = format!(
        r#"
[kafka]
brokers = "localhost:9092"
group_id = "g"
topics = ["t"]
dead_letter_topic = "d"
drain_timeout = "1m"
[kafka.properties]
"sasl.password" = "${{KAFKA_SASL_PASSWORD}}"
"ssl.key.password" = "{SECRET}"
[sink]
kind = "billwerk"
base_url = "https://u:{SECRET}@sandbox.billwerk.com"
client_id = "id"
client_secret = "${{BILLWERK_CLIENT_SECRET}}"
api_key = "{SECRET}"
[components]
x = "{SECRET}"
[ledger]
url = "postgres://meterflow:{SECRET}@db/"
"#
    );
    let err = Config::from_toml_str_with_env(&text, &env).unwrap_err();
    let shown = format!("{err}\n{err:?}");
    assert!(shown.contains("kafka.drain_timeout"), "{shown}");
    assert!(shown.contains("sink.base_url"), "{shown}");

    // The components value is not a secret and may be shown; every real secret must not.
    let text = text.replace(
        &format!("x = \"{SECRET}\""),
        "x = \"5ce53069443e551b9caccc64\"",
    );
    let err = Config::from_toml_str_with_env(&text, &env).unwrap_err();
    let shown = format!("{err}\n{err:?}");
    assert!(!shown.contains(SECRET), "{shown}");

    // Debug of a valid config hides them too.
    let text = text
        .replace("drain_timeout = \"1m\"", "")
        .replace(&format!("u:{SECRET}@"), "");
    let config = Config::from_toml_str_with_env(&text, &env).unwrap();
    let debug = format!("{config:?} {config:#?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("sasl.password"));
    assert_eq!(
        config.sink.billwerk().unwrap().client_secret.expose(),
        SECRET
    );
    assert_eq!(config.kafka.properties["sasl.password"], SECRET);

    // A secret of the wrong type: the value is not echoed.
    let text = VALID.replace(
        "client_secret = \"${BILLWERK_CLIENT_SECRET}\"",
        "client_secret = 987654321",
    );
    let p = problems(&text);
    assert_eq!(keys(&p), vec!["sink.client_secret"]);
    assert!(!p[0].message.contains("987654321"), "{}", p[0]);
}

#[test]
fn secret_keys_are_recognised() {
    for k in [
        "sink.client_secret",
        "sink.api_key",
        "kafka.properties.\"sasl.password\"",
        "kafka.properties.\"ssl.key.password\"",
        "kafka.properties.\"sasl.oauthbearer.client.secret\"",
        "kafka.properties.\"ssl.key.pem\"",
        "kafka.properties.\"sasl.jaas.config\"",
    ] {
        assert!(is_secret_key(k), "{k}");
    }
    for k in [
        "sink.client_id",
        "kafka.properties.\"client.id\"",
        "kafka.brokers",
    ] {
        assert!(!is_secret_key(k), "{k}");
    }
}

#[test]
fn load_reports_an_unreadable_file() {
    let err = Config::load(std::path::Path::new("/nonexistent/meterflow.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/meterflow.toml"));
}

#[test]
fn input_window_rules() {
    let c = valid();
    assert_eq!(c.input.max_future, Duration::from_secs(300));
    assert_eq!(c.input.max_age, Duration::from_secs(35 * 86_400));
    assert_eq!(c.input.max_age, c.ledger.retention);

    // "0" and 0 disable a bound; days are accepted.
    for zero in [toml::Value::from("0"), toml::Value::from(0)] {
        let text = edited(|t| {
            let input = table(t, "input");
            input.insert("max_age".into(), zero.clone());
            input.insert("max_future".into(), zero.clone());
        });
        let c = load(&text).unwrap();
        assert_eq!(c.input.max_age, Duration::ZERO);
        assert_eq!(c.input.max_future, Duration::ZERO);
    }
    let text = edited(|t| {
        table(t, "input").insert("max_age".into(), "30d".into());
    });
    assert_eq!(
        load(&text).unwrap().input.max_age,
        Duration::from_secs(30 * 86_400)
    );

    // Not a duration: the key, the value and the fix.
    for (bad, shown) in [
        (toml::Value::from("35 fortnights"), "\"35 fortnights\""),
        (toml::Value::from(35), "35 has no unit"),
        (toml::Value::from(true), "boolean"),
    ] {
        let text = edited(|t| {
            table(t, "input").insert("max_age".into(), bad.clone());
        });
        let p = problems(&text);
        assert_eq!(keys(&p), vec!["input.max_age"], "{p:#?}");
        for part in [shown, "\"35d\"", "\"0\" for no bound"] {
            assert!(p[0].message.contains(part), "{p:?} should contain {part}");
        }
    }

    assert_problem(
        |c| c.input.max_future = Duration::from_secs(32 * 86_400),
        "input.max_future",
        &["32d is out of range", "at most 31d", "\"0\" for no bound"],
    );
    assert_problem(
        |c| c.input.max_age = Duration::from_secs(600),
        "input.max_age",
        &["10m is too short", "at least 1h", "\"0\" for no bound"],
    );
    assert_problem(
        |c| c.input.max_age = Duration::from_secs(90 * 86_400),
        "input.max_age",
        &["90d is longer than ledger.retention (35d)", "billed again"],
    );
    // A longer retention, or no ledger, or no age bound: fine.
    let mut c = valid();
    c.input.max_age = Duration::from_secs(90 * 86_400);
    c.ledger.retention = Duration::from_secs(90 * 86_400);
    assert!(c.validate().is_empty());
    c.ledger.retention = Duration::from_secs(35 * 86_400);
    c.ledger.url = "none".into();
    assert!(c.validate().is_empty());
    let mut c = valid();
    c.input.max_age = Duration::ZERO;
    c.input.max_future = Duration::ZERO;
    assert!(c.validate().is_empty());
}
