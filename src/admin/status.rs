//! The status page at the admin server's `/`: one self-refreshing HTML page, rendered here,
//! with no script, no build step and nothing fetched from elsewhere. It shows what the pipeline
//! already knows — no bookkeeping of its own beyond two bounded windows:
//! - per assigned partition: the committed offset and lag the source's progress report asked the
//!   brokers for (the figures of `meterflow_consumer_lag`), and the age of the oldest unsettled
//!   event from the watermark (`meterflow_oldest_unsettled_seconds`);
//! - the pacer: pace, quota limit and remaining, and whether the sink-wide gate is closed, until
//!   when (the rate limiter's [`PacerView`]);
//! - dead letters by reason over the last hour ([`DeadLetterWindow`], 60 one-minute buckets);
//! - the last warnings and errors logged ([`crate::telemetry::recent_errors`]).
//!
//! The source and the rate limiter are read through two traits ([`PartitionFigures`],
//! [`PacerView`]): `admin` stays below `source` (DEVELOPERS.md, module directions). `admin` sits
//! above `deliver`: `PacerView` is implemented here for `deliver`'s `RateLimiter`, and
//! `Readiness` implements `deliver`'s `ProviderHealth`; `deliver` knows nothing of `admin`.
//!
//! Everything that came from outside (topics, reasons, error texts with event ids or provider
//! answers) is HTML-escaped; error texts have credentials blanked before they are kept.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

use super::readiness::{Readiness, ReadinessReport};
use crate::telemetry::recent_errors::RecentError;

/// How long the dead-letter counts look back, in buckets of [`BUCKET`].
const BUCKETS: u64 = 60;
const BUCKET: Duration = Duration::from_secs(60);
/// The page reloads itself this often (seconds).
pub const REFRESH_SECONDS: u32 = 5;

/// One assigned partition as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset at the brokers (`None` until the first report).
    pub committed: Option<i64>,
    /// Records behind the committed offset (`meterflow_consumer_lag`).
    pub lag: Option<i64>,
    /// Since when the oldest unsettled event (or unverified gap) holds the partition.
    pub oldest_unsettled: Option<Instant>,
}

/// What the page reads off the source (the Kafka source implements it).
pub trait PartitionFigures: Send + Sync + 'static {
    /// Every assigned partition, sorted by topic and partition.
    fn partition_status(&self) -> Vec<PartitionStatus>;
}

pub use crate::deliver::ratelimit::PacerSnapshot;

/// What the page reads off the rate limiter (`deliver::ratelimit::RateLimiter` implements it).
pub trait PacerView: Send + Sync + 'static {
    fn pacer_snapshot(&self) -> PacerSnapshot;
}

impl PacerView for crate::deliver::ratelimit::RateLimiter {
    fn pacer_snapshot(&self) -> PacerSnapshot {
        self.snapshot()
    }
}

/// What the page reads: set by the pipeline while it runs.
#[derive(Default)]
pub struct StatusBoard {
    /// `None` until the pipeline's source started.
    partitions: Mutex<Option<Vec<PartitionStatus>>>,
    pacer: Mutex<Option<Arc<dyn PacerView>>>,
    dead_letters: Mutex<DeadLetterWindow>,
}

// By hand: the pacer is a trait object.
impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard")
            .field("partitions", &self.partitions)
            .field(
                "pacer",
                &crate::sync::lock(&self.pacer)
                    .as_ref()
                    .map(|l| l.pacer_snapshot()),
            )
            .field("dead_letters", &self.dead_letters)
            .finish()
    }
}

impl StatusBoard {
    pub fn new() -> Self {
        StatusBoard::default()
    }

    /// The partitions as the source sees them now ([`PartitionFigures::partition_status`]).
    pub fn set_partitions(&self, partitions: Vec<PartitionStatus>) {
        *crate::sync::lock(&self.partitions) = Some(partitions);
    }

    /// The pipeline's pacer; the page reads it at each request.
    pub fn set_pacer(&self, limiter: Arc<dyn PacerView>) {
        *crate::sync::lock(&self.pacer) = Some(limiter);
    }

    /// One dead letter was written (or found written) with this reason.
    pub fn dead_lettered(&self, reason: &'static str) {
        crate::sync::lock(&self.dead_letters).record(reason, Instant::now());
    }

    /// Everything the page shows, as of now.
    pub fn view(&self, readiness: &Readiness, errors: Vec<RecentError>) -> StatusView {
        let now = Instant::now();
        let wall = Utc::now();
        let partitions = crate::sync::lock(&self.partitions).clone().map(|ps| {
            ps.into_iter()
                .map(|p| PartitionRow {
                    oldest_unsettled: p.oldest_unsettled.map(|t| now.saturating_duration_since(t)),
                    topic: p.topic,
                    partition: p.partition,
                    committed: p.committed,
                    lag: p.lag,
                })
                .collect()
        });
        let pacer = crate::sync::lock(&self.pacer).as_ref().map(|l| {
            PacerRow::from_snapshot(l.pacer_snapshot(), tokio::time::Instant::now(), wall)
        });
        StatusView {
            at: wall,
            readiness: readiness.report_at(now),
            partitions,
            pacer,
            dead_letters: crate::sync::lock(&self.dead_letters).counts(now),
            errors,
        }
    }
}

/// How often [`watch`] copies the partitions from the source.
const PARTITIONS_EVERY: Duration = Duration::from_secs(1);

/// Keeps the board's partitions fresh from the source until aborted.
pub fn watch(
    board: Arc<StatusBoard>,
    source: impl PartitionFigures,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PARTITIONS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            board.set_partitions(source.partition_status());
        }
    })
}

/// Dead letters per reason in one-minute buckets over the last hour: at most 60 buckets of at
/// most one count per reason (reasons are the fixed `RejectReason` names). Pure: times are given.
#[derive(Debug, Default)]
pub struct DeadLetterWindow {
    epoch: Option<Instant>,
    /// (bucket number since `epoch`, counts), oldest first.
    buckets: VecDeque<(u64, BTreeMap<&'static str, u64>)>,
}

impl DeadLetterWindow {
    fn bucket(&mut self, at: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(at);
        let elapsed = at.saturating_duration_since(epoch).as_secs();
        elapsed / BUCKET.as_secs()
    }

    pub fn record(&mut self, reason: &'static str, at: Instant) {
        let bucket = self.bucket(at);
        match self.buckets.back_mut() {
            Some((b, counts)) if *b == bucket => {
                let n = counts.entry(reason).or_default();
                *n = n.saturating_add(1);
            }
            // A clock that went back (it cannot: `Instant` is monotonic) counts in the newest.
            Some((b, counts)) if *b > bucket => {
                let n = counts.entry(reason).or_default();
                *n = n.saturating_add(1);
            }
            _ => self
                .buckets
                .push_back((bucket, BTreeMap::from([(reason, 1)]))),
        }
        self.expire(bucket);
    }

    /// Counts per reason over the last hour as of `now`.
    pub fn counts(&mut self, now: Instant) -> BTreeMap<&'static str, u64> {
        let bucket = self.bucket(now);
        self.expire(bucket);
        let mut out: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (_, counts) in &self.buckets {
            for (reason, n) in counts {
                let total = out.entry(reason).or_default();
                *total = total.saturating_add(*n);
            }
        }
        out
    }

    fn expire(&mut self, current: u64) {
        while self
            .buckets
            .front()
            .is_some_and(|(b, _)| b.saturating_add(BUCKETS) <= current)
        {
            self.buckets.pop_front();
        }
    }
}

/// What the page shows, computed once per request.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub at: DateTime<Utc>,
    pub readiness: ReadinessReport,
    /// `None`: the pipeline has not started its source (yet).
    pub partitions: Option<Vec<PartitionRow>>,
    pub pacer: Option<PacerRow>,
    pub dead_letters: BTreeMap<&'static str, u64>,
    /// Newest first.
    pub errors: Vec<RecentError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRow {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub lag: Option<i64>,
    pub oldest_unsettled: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PacerRow {
    /// Requests per second.
    pub pace: f64,
    pub limit: Option<u32>,
    pub remaining: Option<u32>,
    /// The gate is closed until then (wall clock), and for this long still.
    pub gate_closed: Option<(DateTime<Utc>, Duration)>,
}

impl PacerRow {
    fn from_snapshot(s: PacerSnapshot, now: tokio::time::Instant, wall: DateTime<Utc>) -> Self {
        let gate_closed = s.gate_closed_until.map(|until| {
            let left = until.saturating_duration_since(now);
            let at = chrono::TimeDelta::from_std(left)
                .ok()
                .and_then(|d| wall.checked_add_signed(d))
                .unwrap_or(wall);
            (at, left)
        });
        PacerRow {
            pace: s.pace,
            limit: s.limit,
            remaining: s.remaining,
            gate_closed,
        }
    }
}

/// Text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1} s", d.as_secs_f64()),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "—".to_string(), |v| v.to_string())
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{background:#1d2330;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
main{padding:16px 24px;display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
section{background:#fff;border:1px solid #d9dee7;border-radius:6px;padding:12px 16px}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceff4;vertical-align:top}
th{font-weight:600;color:#4a5468}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#16794c;font-weight:600}.bad{color:#b42318;font-weight:600}
.muted{color:#6b7588}
.err td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-word}
.err td:nth-child(-n+3){white-space:nowrap;word-break:normal}
.wide{grid-column:1/-1}
";

/// The whole page. Pure: everything it shows is in `view`.
pub fn render(view: &StatusView) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let at = view.at.to_rfc3339_opts(SecondsFormat::Secs, true);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>meterflow status</title><style>{STYLE}</style></head><body>\n<header>\
         <h1>meterflow</h1><span>version {}</span>",
        escape(env!("CARGO_PKG_VERSION"))
    );
    let (class, word) = if view.readiness.ready {
        ("ok", "ready")
    } else {
        ("bad", "not ready")
    };
    let _ = write!(
        h,
        "<span id=\"ready\" class=\"{class}\">{word}</span><span class=\"muted\">as of {at} \
         · refreshes every {REFRESH_SECONDS} s · <a style=\"color:#9fc3ff\" href=\"/readyz\">/readyz</a> \
         · <a style=\"color:#9fc3ff\" href=\"/metrics\">/metrics</a></span></header>\n<main>\n"
    );
    partitions(&mut h, view);
    pacer(&mut h, view);
    readiness(&mut h, &view.readiness);
    dead_letters(&mut h, view);
    errors(&mut h, view);
    h.push_str("</main></body></html>\n");
    h
}

fn partitions(h: &mut String, view: &StatusView) {
    h.push_str("<section id=\"partitions\" class=\"wide\"><h2>Partitions</h2>");
    match &view.partitions {
        None => h.push_str("<p class=\"muted\">The pipeline has not started reading yet.</p>"),
        Some(rows) if rows.is_empty() => h.push_str(
            "<p class=\"muted\">No partitions assigned: the group has not assigned any yet, or \
             there are more replicas than partitions.</p>",
        ),
        Some(rows) => {
            h.push_str(
                "<table><tr><th>topic</th><th>partition</th><th>committed offset</th>\
                 <th>lag (records)</th><th>oldest unsettled event</th></tr>",
            );
            for r in rows {
                let _ = write!(
                    h,
                    "<tr class=\"partition\"><td>{}</td><td class=\"n\">{}</td>\
                     <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    escape(&r.topic),
                    r.partition,
                    or_dash(r.committed),
                    or_dash(r.lag),
                    r.oldest_unsettled.map_or_else(|| "none".to_string(), age),
                );
            }
            h.push_str(
                "</table><p class=\"muted\">Committed offset and lag as the brokers last \
                 answered (every 5 s); the oldest unsettled event holds the committed offset \
                 until it is delivered or dead-lettered.</p>",
            );
        }
    }
    h.push_str("</section>\n");
}

fn pacer(h: &mut String, view: &StatusView) {
    h.push_str("<section id=\"pacer\"><h2>Pacer</h2>");
    match &view.pacer {
        None => h.push_str("<p class=\"muted\">The pipeline has not started its sink yet.</p>"),
        Some(p) => {
            let quota = match (p.remaining, p.limit) {
                (Some(r), Some(l)) => format!("{r} of {l}"),
                (Some(r), None) => r.to_string(),
                (None, Some(l)) => format!("not reported yet (limit {l})"),
                (None, None) => "not reported by the provider yet".into(),
            };
            let gate = match p.gate_closed {
                None => "<span class=\"ok\">open</span>".to_string(),
                Some((until, left)) => format!(
                    "<span class=\"bad\">closed</span> until {} (in {})",
                    until.to_rfc3339_opts(SecondsFormat::Millis, true),
                    age(left)
                ),
            };
            let _ = write!(
                h,
                "<table><tr><th>pace</th><td id=\"pace\" class=\"n\">{:.1} requests/s</td></tr>\
                 <tr><th>quota remaining</th><td id=\"quota\" class=\"n\">{quota}</td></tr>\
                 <tr><th>gate</th><td id=\"gate\">{gate}</td></tr></table>",
                p.pace
            );
        }
    }
    h.push_str("</section>\n");
}

fn readiness(h: &mut String, report: &ReadinessReport) {
    h.push_str("<section id=\"checks\"><h2>Readiness checks</h2><table>");
    for (name, check) in report.checks.named() {
        let (class, word) = if check.ok {
            ("ok", "ok")
        } else {
            ("bad", "failing")
        };
        let _ = write!(
            h,
            "<tr><th>{name}</th><td class=\"{class}\">{word}</td><td>{}</td></tr>",
            escape(&check.detail)
        );
    }
    h.push_str("</table></section>\n");
}

fn dead_letters(h: &mut String, view: &StatusView) {
    h.push_str("<section id=\"dead-letters\"><h2>Dead letters, last hour</h2>");
    if view.dead_letters.is_empty() {
        h.push_str("<p class=\"muted\">None.</p>");
    } else {
        h.push_str("<table><tr><th>reason</th><th>letters</th></tr>");
        for (reason, n) in &view.dead_letters {
            let _ = write!(
                h,
                "<tr class=\"dead-letter\"><td>{}</td><td class=\"n\">{n}</td></tr>",
                escape(reason)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>\n");
}

fn errors(h: &mut String, view: &StatusView) {
    let _ = write!(
        h,
        "<section id=\"errors\" class=\"wide\"><h2>Last errors and warnings (newest first, at \
         most {})</h2>",
        crate::telemetry::recent_errors::KEPT
    );
    if view.errors.is_empty() {
        h.push_str("<p class=\"muted\">None logged.</p>");
    } else {
        h.push_str(
            "<table class=\"err\"><tr><th>time</th><th>level</th><th>where</th><th>what</th></tr>",
        );
        for e in &view.errors {
            let _ = write!(
                h,
                "<tr class=\"error\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.at.to_rfc3339_opts(SecondsFormat::Millis, true),
                escape(e.level),
                escape(&e.target),
                escape(&e.text)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> StatusView {
        StatusView {
            at: DateTime::parse_from_rfc3339("2026-12-01T16:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            readiness: Readiness::new().report(),
            partitions: None,
            pacer: None,
            dead_letters: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    fn error(text: &str) -> RecentError {
        RecentError {
            at: Utc::now(),
            level: "ERROR",
            target: "meterflow::deliver::runner".into(),
            text: text.into(),
        }
    }

    #[test]
    fn a_script_in_an_error_text_is_escaped() {
        let mut v = view();
        v.errors = vec![error(
            "provider answered 422: <script>alert('x')</script> for event \"evt_<b>\" & more",
        )];
        let page = render(&v);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
        assert!(
            page.contains(
                "provider answered 422: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; for \
                 event &quot;evt_&lt;b&gt;&quot; &amp; more"
            ),
            "{page}"
        );
    }

    #[test]
    fn topics_and_reasons_are_escaped_too() {
        let mut v = view();
        v.partitions = Some(vec![PartitionRow {
            topic: "usage<img src=x>".into(),
            partition: 0,
            committed: Some(1),
            lag: Some(0),
            oldest_unsettled: None,
        }]);
        v.dead_letters = BTreeMap::from([("<i>reason</i>", 2)]);
        let page = render(&v);
        assert!(!page.contains("<img") && !page.contains("<i>"), "{page}");
        assert!(page.contains("usage&lt;img src=x&gt;"));
        assert!(page.contains("&lt;i&gt;reason&lt;/i&gt;"));
    }

    #[test]
    fn the_page_shows_partitions_pacer_dead_letters_and_refreshes_itself() {
        let mut v = view();
        v.partitions = Some(vec![
            PartitionRow {
                topic: "usage".into(),
                partition: 0,
                committed: Some(1234),
                lag: Some(56),
                oldest_unsettled: Some(Duration::from_millis(2500)),
            },
            PartitionRow {
                topic: "usage".into(),
                partition: 1,
                committed: None,
                lag: None,
                oldest_unsettled: None,
            },
        ]);
        v.pacer = Some(PacerRow {
            pace: 83.25,
            limit: Some(5000),
            remaining: Some(4100),
            gate_closed: Some((
                DateTime::parse_from_rfc3339("2026-12-01T16:00:01.500Z")
                    .unwrap()
                    .with_timezone(&Utc),
                Duration::from_millis(1500),
            )),
        });
        v.dead_letters = BTreeMap::from([("invalid_json", 3), ("timestamp_out_of_window", 1)]);
        let page = render(&v);
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        for part in [
            "<tr class=\"partition\"><td>usage</td><td class=\"n\">0</td><td class=\"n\">1234</td>\
             <td class=\"n\">56</td><td class=\"n\">2.5 s</td></tr>",
            "<tr class=\"partition\"><td>usage</td><td class=\"n\">1</td><td class=\"n\">—</td>\
             <td class=\"n\">—</td><td class=\"n\">none</td></tr>",
            "<td id=\"pace\" class=\"n\">83.2 requests/s</td>",
            "<td id=\"quota\" class=\"n\">4100 of 5000</td>",
            "<span class=\"bad\">closed</span> until 2026-12-01T16:00:01.500Z (in 1.5 s)",
            "<td>invalid_json</td><td class=\"n\">3</td>",
            "<td>timestamp_out_of_window</td><td class=\"n\">1</td>",
            "not ready",
        ] {
            assert!(page.contains(part), "missing {part:?} in\n{page}");
        }
        // Nothing fetched from elsewhere, nothing run.
        for absent in ["<script", "<link", "src=", "http://", "https://", "@import"] {
            assert!(!page.contains(absent), "{absent} in\n{page}");
        }
        v.pacer = Some(PacerRow {
            gate_closed: None,
            remaining: None,
            limit: None,
            pace: 10.0,
        });
        let page = render(&v);
        assert!(page.contains("<td id=\"gate\"><span class=\"ok\">open</span></td>"));
        assert!(page.contains("not reported by the provider yet"));
    }

    #[test]
    fn before_the_pipeline_starts_the_page_says_so() {
        let page = render(&view());
        assert!(page.contains("has not started reading yet"));
        assert!(page.contains("has not started its sink yet"));
        assert!(page.contains("None logged."));
    }

    #[test]
    fn dead_letters_count_over_the_last_hour_only() {
        let t0 = Instant::now();
        let min = |m: u64| t0 + Duration::from_secs(60 * m);
        let mut w = DeadLetterWindow::default();
        w.record("invalid_json", t0);
        w.record("invalid_json", min(10));
        w.record("unknown_metric", min(30));
        assert_eq!(
            w.counts(min(30)),
            BTreeMap::from([("invalid_json", 2), ("unknown_metric", 1)])
        );
        // An hour after the first: it no longer counts.
        assert_eq!(
            w.counts(min(60)),
            BTreeMap::from([("invalid_json", 1), ("unknown_metric", 1)])
        );
        assert_eq!(w.counts(min(95)), BTreeMap::new());
        assert!(w.buckets.is_empty(), "expired buckets are dropped");
    }

    #[test]
    fn the_window_stays_bounded_under_a_steady_stream() {
        let t0 = Instant::now();
        let mut w = DeadLetterWindow::default();
        for s in 0..(3 * 3600) {
            let at = t0 + Duration::from_secs(s);
            for reason in crate::event::RejectReason::ALL {
                w.record(reason.as_str(), at);
            }
        }
        assert!(w.buckets.len() <= BUCKETS as usize, "{}", w.buckets.len());
        let now = t0 + Duration::from_secs(3 * 3600 - 1);
        let counts = w.counts(now);
        assert_eq!(counts.len(), crate::event::RejectReason::ALL.len());
        // 59 full minutes plus the current one (all 60 s of it here).
        assert_eq!(counts["invalid_json"], 3600);
    }

    struct FixedPacer(PacerSnapshot);

    impl PacerView for FixedPacer {
        fn pacer_snapshot(&self) -> PacerSnapshot {
            self.0
        }
    }

    #[test]
    fn the_board_reads_the_pacer_and_counts_dead_letters() {
        let board = StatusBoard::new();
        let now = tokio::time::Instant::now();
        board.set_pacer(Arc::new(FixedPacer(PacerSnapshot {
            pace: 12.5,
            limit: Some(600),
            remaining: Some(7),
            gate_closed_until: Some(now + Duration::from_secs(30)),
        })));
        board.dead_lettered("invalid_json");
        board.set_partitions(vec![PartitionStatus {
            topic: "usage".into(),
            partition: 2,
            committed: Some(7),
            lag: Some(3),
            oldest_unsettled: Some(Instant::now()),
        }]);
        let v = board.view(&Readiness::new(), Vec::new());
        let pacer = v.pacer.unwrap();
        assert_eq!(
            (pacer.pace, pacer.limit, pacer.remaining),
            (12.5, Some(600), Some(7))
        );
        let (until, left) = pacer.gate_closed.unwrap();
        assert!(
            left <= Duration::from_secs(30) && left > Duration::from_secs(29),
            "{left:?}"
        );
        assert!(until > v.at, "{until} after {}", v.at);
        assert_eq!(v.dead_letters, BTreeMap::from([("invalid_json", 1)]));
        let p = &v.partitions.unwrap()[0];
        assert_eq!((p.partition, p.committed, p.lag), (2, Some(7), Some(3)));
        assert!(p.oldest_unsettled.is_some());
    }
}
