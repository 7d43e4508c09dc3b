//! TOML text → [`Config`], collecting every structural problem (syntax, unknown keys, wrong
//! types, missing required keys) instead of stopping at the first.
//!
//! serde stops at the first error, so deserialization is retried: an unknown or ill-typed key is
//! reported and removed from the tree, a missing required key is reported and replaced by a
//! placeholder, and deserialization runs again until it succeeds or cannot make progress.

use serde_path_to_error::Segment;

use super::interpolate::push_key;
use super::secret::is_secret_key;
use super::{Config, ConfigProblem};

/// The result of the structural pass.
pub(super) struct Parsed {
    pub config: Option<Config>,
    pub problems: Vec<ConfigProblem>,
    /// Keys under which semantic problems would only repeat (or guess at) a structural one.
    pub suppressed: Vec<String>,
}

/// Parses TOML text into a table, or the one syntax problem (with line and column, never the
/// offending line itself: it may hold a secret).
pub(super) fn parse_toml(text: &str) -> Result<toml::Value, ConfigProblem> {
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => Ok(toml::Value::Table(table)),
        Err(e) => {
            let location = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            Err(ConfigProblem {
                key: String::new(),
                message: format!(
                    "TOML syntax error{location}: {}",
                    e.message().trim_end().replace('\n', "; ")
                ),
            })
        }
    }
}

/// librdkafka properties and override attribute values are strings, but people write
/// `"fetch.min.bytes" = 1` and `{ tier = 3 }`: integers and booleans there become their text
/// (events' numeric attributes are compared as their JSON text too).
pub(super) fn stringify_scalars(tree: &mut toml::Value) {
    fn stringify(table: Option<&mut toml::Value>) {
        let Some(toml::Value::Table(t)) = table else {
            return;
        };
        for (_, v) in t.iter_mut() {
            match v {
                toml::Value::Integer(i) => *v = toml::Value::String(i.to_string()),
                toml::Value::Boolean(b) => *v = toml::Value::String(b.to_string()),
                _ => {}
            }
        }
    }
    stringify(tree.get_mut("kafka").and_then(|k| k.get_mut("properties")));
    if let Some(toml::Value::Array(rules)) = tree.get_mut("overrides") {
        for rule in rules {
            stringify(rule.get_mut("attributes"));
        }
    }
}

/// Deserializes the (interpolated) tree, collecting every structural problem.
pub(super) fn deserialize(mut tree: toml::Value) -> Parsed {
    let mut problems: Vec<ConfigProblem> = Vec::new();
    let mut suppressed: Vec<String> = Vec::new();
    let mut silenced: Vec<String> = Vec::new();
    // Each round fixes one key, so the number of keys bounds the rounds; 200 is plenty.
    for _ in 0..200 {
        let err = match serde_path_to_error::deserialize::<_, Config>(tree.clone()) {
            Ok(config) => {
                return Parsed {
                    config: Some(config),
                    problems,
                    suppressed,
                }
            }
            Err(err) => err,
        };
        let segments: Vec<Seg> = err
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Map { key } => Some(Seg::Key(key.clone())),
                Segment::Seq { index } => Some(Seg::Index(*index)),
                Segment::Enum { .. } | Segment::Unknown => None,
            })
            .collect();
        let message = err.into_inner().message().to_string();
        match classify(&message) {
            Kind::UnknownField { field, expected } => {
                let mut segs = segments;
                if segs.last() != Some(&Seg::Key(field.clone())) {
                    segs.push(Seg::Key(field.clone()));
                }
                let key = dotted(&segs);
                problems.push(ConfigProblem {
                    key,
                    message: unknown_key_message(&field, &expected, segs.len() == 1),
                });
                if !remove(&mut tree, &segs) {
                    break;
                }
            }
            Kind::MissingField { field } => {
                let mut segs = segments;
                segs.push(Seg::Key(field));
                let key = dotted(&segs);
                // A missing section is one problem, not one per key inside it.
                let already = problems.iter().any(|p| p.key == key)
                    || silenced.iter().any(|s| key.starts_with(&format!("{s}.")));
                if !already {
                    problems.push(ConfigProblem {
                        key: key.clone(),
                        message: format!("is required: {}", required_hint(&key)),
                    });
                }
                suppressed.push(key.clone());
                match placeholder(&key) {
                    Some((value, also_suppress)) => {
                        if value.is_table() {
                            silenced.push(key.clone());
                        }
                        suppressed.extend(also_suppress.iter().map(|s| s.to_string()));
                        if !insert(&mut tree, &segs, value) {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            Kind::Keyed { below, message } => {
                // A section's own check (e.g. `[sink.aggregate]` for Billingrails): reported at
                // its key, which is then removed so the section can be read without it.
                let mut segs = segments;
                segs.extend(below.split('.').map(|k| Seg::Key(k.to_string())));
                let key = dotted(&segs);
                problems.push(ConfigProblem {
                    key: key.clone(),
                    message,
                });
                suppressed.push(key);
                if !remove(&mut tree, &segs) {
                    break;
                }
            }
            Kind::Other => {
                let key = dotted(&segments);
                problems.push(ConfigProblem {
                    message: value_message(&key, &message),
                    key: key.clone(),
                });
                suppressed.push(key);
                // A removed optional key takes its default; a removed required key comes back
                // as "missing" above and is then not reported twice.
                if !matches!(segments.last(), Some(Seg::Key(_))) || !remove(&mut tree, &segments) {
                    break;
                }
            }
        }
    }
    Parsed {
        config: None,
        problems,
        suppressed,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn dotted(segs: &[Seg]) -> String {
    let mut key = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => push_key(&mut key, k),
            Seg::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    key
}

fn navigate<'a>(tree: &'a mut toml::Value, segs: &[Seg]) -> Option<&'a mut toml::Value> {
    let mut v = tree;
    for s in segs {
        v = match (s, v) {
            (Seg::Key(k), toml::Value::Table(t)) => t.get_mut(k)?,
            (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

fn remove(tree: &mut toml::Value, segs: &[Seg]) -> bool {
    let Some((Seg::Key(last), parent)) = segs.split_last() else {
        return false;
    };
    match navigate(tree, parent) {
        Some(toml::Value::Table(t)) => t.remove(last).is_some(),
        _ => false,
    }
}

fn insert(tree: &mut toml::Value, segs: &[Seg], value: toml::Value) -> bool {
    let Some((Seg::Key(last), parent)) = segs.split_last() else {
        return false;
    };
    match navigate(tree, parent) {
        Some(toml::Value::Table(t)) => {
            t.insert(last.clone(), value);
            true
        }
        _ => false,
    }
}

enum Kind {
    UnknownField {
        field: String,
        expected: Vec<String>,
    },
    MissingField {
        field: String,
    },
    /// A [`KeyedProblem`](super::KeyedProblem): `below` is the key under the failing section.
    Keyed {
        below: String,
        message: String,
    },
    Other,
}

/// Reads serde's standard messages: "unknown field `x`, expected one of `a`, `b`",
/// "missing field `x`".
fn classify(message: &str) -> Kind {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            return Kind::UnknownField {
                field: field.to_string(),
                expected: backticked(tail),
            };
        }
    }
    if let Some(rest) = message.strip_prefix(super::KEYED_PREFIX) {
        if let Some((below, message)) = rest.split_once("`: ") {
            return Kind::Keyed {
                below: below.to_string(),
                message: message.to_string(),
            };
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((field, _)) = rest.split_once('`') {
            return Kind::MissingField {
                field: field.to_string(),
            };
        }
    }
    Kind::Other
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, w)| w.to_string())
        .collect()
}

fn unknown_key_message(field: &str, expected: &[String], top_level: bool) -> String {
    let what = if top_level { "section" } else { "key" };
    let mut message = format!("unknown {what}");
    if let Some(best) = did_you_mean(field, expected) {
        message.push_str(&format!(" (did you mean `{best}`?)"));
    }
    if expected.is_empty() {
        message.push_str("; this table takes no keys");
    } else {
        message.push_str(&format!("; accepted: {}", expected.join(", ")));
    }
    message
}

/// The accepted name closest to a misspelt one, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(typo: &str, candidates: &'a [String]) -> Option<&'a str> {
    let typo_lower = typo.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (levenshtein(&typo_lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.chars().count().max(typo.chars().count()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A type or value error from serde, made to read well; secret values are blanked out.
fn value_message(key: &str, message: &str) -> String {
    let mut m = message.to_string();
    if let Some(rest) = m.strip_prefix("unknown variant `") {
        if let Some((variant, tail)) = rest.split_once('`') {
            let accepted = backticked(tail);
            m = format!(
                "{variant:?} is not accepted; expected {}",
                accepted
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            );
        }
    }
    if m.ends_with("expected a duration") {
        m.push_str(" like \"30s\", \"1m 30s\" or \"500ms\"");
        if key == "input.max_age" || key == "input.max_future" {
            m.push_str(" (\"35d\" for days), or \"0\" for no bound");
        }
    }
    if is_secret_key(key) {
        m = redact_quoted(&m);
    }
    m
}

/// Blanks everything between backticks or double quotes.
fn redact_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut inside: Option<char> = None;
    for c in s.chars() {
        match inside {
            Some(q) if c == q => {
                out.push_str("***");
                out.push(c);
                inside = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    inside = Some(c);
                }
            }
        }
    }
    if inside.is_some() {
        out.push_str("***");
    }
    out
}

/// What a required key expects, for "is required" messages.
fn required_hint(key: &str) -> &'static str {
    match key {
        "kafka" => "the [kafka] section: brokers, group_id, topics, dead_letter_topic",
        "kafka.brokers" => "comma-separated bootstrap servers, e.g. \"localhost:9092\"",
        "kafka.group_id" => "the consumer group id, e.g. \"meterflow\"",
        "kafka.topics" => "the input topics, e.g. [\"usage-events\"]",
        "kafka.dead_letter_topic" => {
            "the topic for events that can never be delivered, e.g. \"usage-events-dlq\""
        }
        "sink" => "the [sink] section: kind, base_url and credentials",
        "sink.kind" => "\"billwerk\" or \"billingrails\"",
        "sink.base_url" => "the provider's base URL, e.g. \"https://sandbox.billwerk.com\"",
        _ => "see docs/configuration.md",
    }
}

/// A stand-in for a missing required key so the rest of the file can still be checked, and the
/// key prefixes whose semantic checks would only guess once the stand-in is used.
fn placeholder(key: &str) -> Option<(toml::Value, &'static [&'static str])> {
    let s = |v: &str| toml::Value::String(v.to_string());
    Some(match key {
        "kafka" | "sink" => (toml::Value::Table(Default::default()), &[]),
        "kafka.brokers" | "kafka.group_id" | "kafka.dead_letter_topic" | "sink.base_url" => {
            (s(""), &[])
        }
        "kafka.topics" => (toml::Value::Array(Vec::new()), &[]),
        "sink.kind" => (s("billwerk"), &["sink", "components"]),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        let c: Vec<String> = ["brokers", "group_id", "topics", "dead_letter_topic"]
            .map(String::from)
            .to_vec();
        assert_eq!(did_you_mean("brokerz", &c), Some("brokers"));
        assert_eq!(did_you_mean("topic", &c), Some("topics"));
        assert_eq!(
            did_you_mean("deadletter_topic", &c),
            Some("dead_letter_topic")
        );
        assert_eq!(did_you_mean("groupid", &c), Some("group_id"));
        assert_eq!(did_you_mean("Brokers", &c), Some("brokers"));
        assert_eq!(did_you_mean("zzz", &c), None);
        assert_eq!(did_you_mean("session", &c), None);
    }

    #[test]
    fn redaction_blanks_quoted_values() {
        assert_eq!(
            redact_quoted("invalid type: integer `12345`, expected a string"),
            "invalid type: integer `***`, expected a string"
        );
        assert_eq!(redact_quoted("x \"abc"), "x \"***");
    }
}
