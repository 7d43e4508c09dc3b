//! The last warnings and errors meterflow logged, for the admin server's status page: a tracing layer keeps the
//! newest [`KEPT`] in a process-wide ring, each bounded to [`MAX_TEXT_CHARS`] characters with
//! credentials blanked.
//!
//! Log lines carry no secrets by design (`config::Secret` prints `***`), but an error text can
//! quote what a library put in it: an HTTP client's error names the URL it called, a URL may
//! carry `user:password@` or a query, a provider's answer may echo a header. The ring blanks
//! those shapes again before anything reaches a page, and values of fields whose names look
//! secret (`config::is_secret_key`) are never kept.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use chrono::{DateTime, Utc};
use regex::Regex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// How many entries the ring keeps.
pub const KEPT: usize = 20;
/// The longest text kept per entry.
pub const MAX_TEXT_CHARS: usize = 600;
/// The longest value kept per field.
const MAX_FIELD_CHARS: usize = 200;

/// One warning or error as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentError {
    pub at: DateTime<Utc>,
    /// `ERROR` or `WARN`.
    pub level: &'static str,
    /// The module that logged it (`meterflow::deliver::runner`).
    pub target: String,
    /// The message and its fields (`key=value`), credentials blanked, bounded.
    pub text: String,
}

/// A bounded ring of the newest entries.
#[derive(Debug, Default)]
pub struct RecentErrors {
    entries: Mutex<VecDeque<RecentError>>,
}

impl RecentErrors {
    pub const fn new() -> Self {
        RecentErrors {
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// Keeps `text` (blanked and bounded here), dropping the oldest entry beyond [`KEPT`].
    pub fn push(&self, at: DateTime<Utc>, level: &'static str, target: &str, text: &str) {
        let entry = RecentError {
            at,
            level,
            target: cut(target, 100),
            text: cut(&redact_credentials(text), MAX_TEXT_CHARS),
        };
        let mut entries = crate::sync::lock(&self.entries);
        while entries.len() >= KEPT {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// The entries, newest first.
    pub fn newest_first(&self) -> Vec<RecentError> {
        crate::sync::lock(&self.entries)
            .iter()
            .rev()
            .cloned()
            .collect()
    }
}

/// The process's ring (what the logging layer fills and the status page shows).
pub fn recent_errors() -> &'static RecentErrors {
    static RING: RecentErrors = RecentErrors::new();
    &RING
}

/// The tracing layer that copies meterflow's own warnings and errors into a ring.
pub struct RecentErrorsLayer {
    ring: &'static RecentErrors,
}

/// The layer for the process's ring.
pub fn layer() -> RecentErrorsLayer {
    RecentErrorsLayer {
        ring: recent_errors(),
    }
}

impl RecentErrorsLayer {
    /// A layer filling `ring` (tests give one of their own).
    pub fn into_ring(ring: &'static RecentErrors) -> Self {
        RecentErrorsLayer { ring }
    }
}

impl<S: Subscriber> Layer<S> for RecentErrorsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        // librdkafka's own log lines (target `rdkafka::…`) repeat what meterflow reports.
        if *meta.level() > Level::WARN || !meta.target().starts_with("meterflow") {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = if *meta.level() == Level::ERROR {
            "ERROR"
        } else {
            "WARN"
        };
        self.ring
            .push(Utc::now(), level, meta.target(), &fields.into_text());
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Fields {
    fn into_text(self) -> String {
        match (self.message.is_empty(), self.rest.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.rest,
            (false, false) => format!("{} ({})", self.message, self.rest),
        }
    }

    fn add(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = cut(value, MAX_TEXT_CHARS);
            return;
        }
        if self.rest.chars().count() > MAX_TEXT_CHARS {
            return;
        }
        if !self.rest.is_empty() {
            self.rest.push_str(", ");
        }
        let shown = if crate::config::is_secret_key(field.name()) {
            "***".to_string()
        } else {
            cut(value, MAX_FIELD_CHARS)
        };
        let _ = write!(self.rest, "{}={shown}", field.name());
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // Bounded before formatting would be better, but Debug gives no length; the text is
        // cut right after.
        let text = format!("{value:?}");
        self.add(field, &text);
    }
}

/// `s` cut to `max` characters, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", s.get(..i).unwrap_or(s)),
        None => s.to_string(),
    }
}

/// `text` with credentials blanked: a URL's `user:password@` and query, `Bearer`/`Basic`
/// tokens, and `password=…`-like pairs.
pub fn redact_credentials(text: &str) -> String {
    static PATTERNS: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        [
            // scheme://user:password@host → scheme://***@host
            (r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@", "${1}***@"),
            // a URL's query (tokens travel there) → ?***
            (r#"(?i)\b([a-z][a-z0-9+.\-]*://[^\s?#"'<>]+)\?[^\s"'<>]*"#, "${1}?***"),
            (r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]+", "${1} ***"),
            (
                r#"(?i)\b([a-z0-9_.\-]*(?:password|passwd|secret|token|api[_\-]?key|credential)[a-z0-9_.\-]*)(["']?\s*[=:]\s*["']?)[^\s"',;&)]+"#,
                "${1}${2}***",
            ),
        ]
        .into_iter()
        // Constant patterns; one that did not compile would only be skipped.
        .filter_map(|(pattern, replacement)| Some((Regex::new(pattern).ok()?, replacement)))
        .collect()
    });
    let mut out = text.to_string();
    for (pattern, replacement) in patterns {
        out = pattern.replace_all(&out, *replacement).into_owned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn every_pattern_compiles() {
        // A pattern that failed to compile would be skipped silently: prove each one works.
        assert_eq!(
            redact_credentials("https://u:p@h/x"),
            "https://***@h/x",
            "userinfo"
        );
        assert_eq!(
            redact_credentials("http://h/x?a=b"),
            "http://h/x?***",
            "query"
        );
        assert_eq!(redact_credentials("Bearer abc.def"), "Bearer ***", "bearer");
        assert_eq!(redact_credentials("api_key=xyz"), "api_key=***", "pairs");
    }

    #[test]
    fn credentials_are_blanked() {
        for (text, secret) in [
            (
                "error sending request for url (https://svc:hunter2@billwerk.example/api/v1/x)",
                "hunter2",
            ),
            (
                "error sending request for url (https://api.example/v1/ingest?api_key=sk_live_42)",
                "sk_live_42",
            ),
            (
                "header Authorization: Bearer eyJhbGciOi.payload.sig",
                "eyJhbGciOi",
            ),
            ("Basic bWV0ZXJmbG93OnNlY3JldA==", "bWV0ZXJmbG93OnNlY3JldA"),
            ("client_secret=s3cr3t&grant_type=x", "s3cr3t"),
            ("\"access_token\": \"tok_123\"", "tok_123"),
            ("sasl.password = 'pw-9'", "pw-9"),
            ("postgres://meter:pg-pass@db:5432/ledger", "pg-pass"),
        ] {
            let shown = redact_credentials(text);
            assert!(!shown.contains(secret), "{text:?} → {shown:?}");
            assert!(shown.contains("***"), "{shown:?}");
        }
        let plain = "the provider answered 503 for contract 5cd186af443e551fe8e4f5dd";
        assert_eq!(redact_credentials(plain), plain);
    }

    #[test]
    fn the_ring_keeps_the_newest_entries_bounded() {
        let ring = RecentErrors::new();
        let now = Utc::now();
        for i in 0..(KEPT + 5) {
            ring.push(now, "WARN", "meterflow::x", &format!("error {i}"));
        }
        let kept = ring.newest_first();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].text, format!("error {}", KEPT + 4));
        assert_eq!(kept[KEPT - 1].text, "error 5");
        ring.push(now, "ERROR", "meterflow::x", &"y".repeat(10_000));
        let long = &ring.newest_first()[0];
        assert_eq!(long.text.chars().count(), MAX_TEXT_CHARS + 1, "cut, with …");
    }

    #[test]
    fn the_layer_keeps_meterflow_warnings_and_errors_with_their_fields() {
        static RING: RecentErrors = RecentErrors::new();
        let subscriber = tracing_subscriber::registry().with(RecentErrorsLayer::into_ring(&RING));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept: info");
            tracing::warn!(target: "rdkafka::client", "not kept: librdkafka's own");
            tracing::warn!(partition = 3, event_id = "evt_1", "provider answered 503");
            tracing::error!(
                client_secret = "s3cr3t",
                error = %"error sending request for url (https://u:pw@h/x)",
                "token request failed"
            );
        });
        let kept = RING.newest_first();
        assert_eq!(kept.len(), 2, "{kept:#?}");
        assert_eq!(kept[0].level, "ERROR");
        assert!(!kept[0].text.contains("s3cr3t"), "{}", kept[0].text);
        assert!(!kept[0].text.contains("pw@"), "{}", kept[0].text);
        assert!(
            kept[0].text.starts_with("token request failed ("),
            "{}",
            kept[0].text
        );
        assert_eq!(kept[1].level, "WARN");
        assert_eq!(
            kept[1].text,
            "provider answered 503 (partition=3, event_id=evt_1)"
        );
        assert!(kept[1].target.starts_with("meterflow"));
    }
}
