//! A string that never shows itself in logs, metrics or error messages.

use serde::Deserialize;

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself: only for the request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// True for config keys whose values must never be printed: the sink's credentials and
/// librdkafka properties that carry passwords, keys or tokens (`kafka.properties."sasl.password"`).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k == "sink.client_secret" || k == "sink.api_key" {
        return true;
    }
    let last = k.rsplit_once("properties.").map_or(k.as_str(), |(_, l)| l);
    [
        "password",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
        "jaas",
        "oauthbearer.config",
        ".pem",
        "private",
    ]
    .iter()
    .any(|word| last.contains(word))
}

/// `key = value` for a librdkafka property, with the value hidden when the key is secret.
pub fn redact_property<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_key(&format!("kafka.properties.{key}")) {
        "***"
    } else {
        value
    }
}
