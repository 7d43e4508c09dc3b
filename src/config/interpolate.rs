//! `${VAR}` interpolation of environment variables in the string values of a parsed TOML tree.
//!
//! Done on the parsed tree rather than the raw text so that a value can never break the TOML
//! syntax (a secret containing `"` stays a string) and so that a missing variable is reported
//! with the dotted key it was meant for. Variable values never appear in any message.

use super::ConfigProblem;

/// How a config reads the environment; injectable so tests need not mutate the process env.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Replaces `${VAR}`, `${VAR:-default}` and `$${` (a literal `${`) in every string value of the
/// tree. Problems are pushed with the dotted key of the string they occur in; the faulty
/// reference is replaced by an empty string so the rest of the file can still be checked.
pub fn interpolate_tree(value: &mut toml::Value, env: EnvLookup<'_>) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let mut path = String::new();
    walk(value, &mut path, env, &mut problems);
    problems
}

fn walk(
    value: &mut toml::Value,
    path: &mut String,
    env: EnvLookup<'_>,
    problems: &mut Vec<ConfigProblem>,
) {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            let (out, errs) = interpolate_str(s, env);
            *s = out;
            problems.extend(errs.into_iter().map(|message| ConfigProblem {
                key: path.clone(),
                message,
            }));
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, env, problems);
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                let len = path.len();
                push_key(path, k);
                walk(item, path, env, problems);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Appends `key` to a dotted path, quoting it when it is not a TOML bare key
/// (`kafka.properties."sasl.password"`).
pub fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        path.push_str(key);
    } else {
        path.push('"');
        for c in key.chars() {
            if c == '"' || c == '\\' {
                path.push('\\');
            }
            path.push(c);
        }
        path.push('"');
    }
}

/// Interpolates one string; returns the result and one message per faulty reference.
pub fn interpolate_str(s: &str, env: EnvLookup<'_>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut errors = Vec::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                errors.push(
                    "unterminated `${`: expected `${NAME}` or `${NAME:-default}` (write `$${` \
                     for a literal `${`)"
                        .to_string(),
                );
                rest = "";
                break;
            };
            let inner = &body[..end];
            rest = &body[end + 1..];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if !is_env_name(name) {
                errors.push(format!(
                    "`${{{}}}` is not a valid environment variable reference: expected \
                     `${{NAME}}` or `${{NAME:-default}}` with NAME made of letters, digits and \
                     `_` (write `$${{` for a literal `${{`)",
                    truncate(inner, 40)
                ));
                continue;
            }
            match (env(name), default) {
                // Shell semantics: `:-` also replaces a variable that is set but empty.
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    let hint = if name.bytes().any(|b| b.is_ascii_lowercase()) {
                        " (write `$${` for a literal `${`)"
                    } else {
                        ""
                    };
                    errors.push(format!("environment variable {name} is not set{hint}"));
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    (out, errors)
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t-value".into()),
            "EMPTY" => Some(String::new()),
            "HOST" => Some("kafka:9092".into()),
            _ => None,
        }
    }

    fn run(s: &str) -> (String, Vec<String>) {
        interpolate_str(s, &env)
    }

    #[test]
    fn replaces_variables_defaults_and_escapes() {
        assert_eq!(run("${HOST}").0, "kafka:9092");
        assert_eq!(run("a-${HOST}-b").0, "a-kafka:9092-b");
        assert_eq!(run("${MISSING:-fallback}").0, "fallback");
        assert_eq!(run("${EMPTY:-fallback}").0, "fallback");
        assert_eq!(run("${EMPTY}").0, "");
        assert_eq!(run("${HOST:-x}").0, "kafka:9092");
        assert_eq!(run("${MISSING:-}").0, "");
        assert_eq!(run("cost $${HOST} $5 $").0, "cost ${HOST} $5 $");
        assert_eq!(run("$$HOST").0, "$$HOST");
        assert_eq!(run("no dollars").0, "no dollars");
    }

    #[test]
    fn reports_missing_and_malformed_references() {
        assert_eq!(
            run("${NOPE}").1,
            vec!["environment variable NOPE is not set".to_string()]
        );
        assert!(run("${quantity}").1[0].contains("$${"));
        assert!(run("${HOST").1[0].contains("unterminated"));
        assert!(run("${}").1[0].contains("not a valid environment variable reference"));
        assert!(run("${A-b}").1[0].contains("not a valid"));
        let (out, errs) = run("${NOPE}/${HOST}");
        assert_eq!(out, "/kafka:9092");
        assert_eq!(errs.len(), 1);
    }

    #[test]
    fn tree_problems_carry_the_key_path_and_never_the_value() {
        let mut v: toml::Value = toml::from_str(
            r#"
            [sink]
            client_secret = "${NOPE_SECRET}"
            [kafka.properties]
            "sasl.password" = "${SECRET}x${NOPE2}"
            [[overrides]]
            description = "${quantity}"
            "#,
        )
        .unwrap();
        let problems = interpolate_tree(&mut v, &env);
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "kafka.properties.\"sasl.password\"",
                "overrides[0].description",
                "sink.client_secret"
            ]
        );
        assert_eq!(
            problems[2].to_string(),
            "sink.client_secret: environment variable NOPE_SECRET is not set"
        );
        for p in &problems {
            assert!(!p.to_string().contains("s3cr3t"));
        }
        assert_eq!(
            v["kafka"]["properties"]["sasl.password"].as_str(),
            Some("s3cr3t-valuex")
        );
    }
}
