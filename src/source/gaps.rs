//! Offset-gap verification and the per-partition progress gauges, on a thread of their own
//! beside the consumer loop.
//!
//! A read that jumps over offsets leaves a [`Gap`] in the partition's watermark, and so does a
//! first record past the committed offset. The position may not pass a gap until this thread has
//! re-read it: with a separate consumer (no group membership, never commits) assigned at an
//! *anchor* before the gap, it reads up to the record after the gap. The re-read counts only if
//! the broker answered it from the anchor itself — its first record is the anchor, or the anchor
//! is the log start offset. Tansu 0.6's memory storage answers a fetch that starts inside a
//! record batch with the next batch: a re-read from inside the batch would "confirm" the jump,
//! so such an answer is not trusted and the anchor moves back (to a record the broker did return
//! before the gap, else twice as far back each time) until a fetch starts where it was asked to.
//! Then:
//! - records of the gap that it returns are handed to the pipeline like any other (each read
//!   once: a duplicate of an offset already read is dropped by the watermark);
//! - offsets of the gap it does not return are absent on the broker (compaction, transaction
//!   markers, aborted transactions under `read_committed`): they stop holding the position and
//!   count in `meterflow_offset_gaps_total{cause="absent"}`;
//! - offsets below the log start offset were deleted by retention before anyone read them:
//!   `cause="retention"`, logged as an error (those events are lost upstream of meterflow).
//!
//! A gap no re-read could settle keeps holding the partition's committed offset; it is retried
//! with backoff and shows in `meterflow_offset_gap_unverified` (alert
//! `MeterflowOffsetGapUnverified`). See docs/delivery-semantics.md for what is and is not
//! verified.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::kafka::{raw_message, store_position, Shared, SourceConsumer};
use crate::ack::watermark::{Gap, Tracked};
use crate::event::RawMessage;

/// How long one re-read may take before the attempt counts as failed.
const REREAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a re-read waits for its first record. A broker holding records from the anchor on
/// answers within a fetch; one that skipped to a batch that does not exist yet never does.
const FIRST_RECORD_WAIT: Duration = Duration::from_secs(1);
/// A tail re-read ends when no further record came for this long.
const TAIL_QUIET: Duration = Duration::from_millis(500);
/// Fetches per verification before giving up for now (each moves the anchor back).
const MAX_ANCHORS: usize = 40;
/// Broker look-ups (committed offset, watermarks).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry backoff for a gap that could not be verified: doubles up to the maximum.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often the lag and age gauges are refreshed.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// A partition that is neither paused nor read from for this long while the broker has records
/// past what was read is re-read from there: a fetch answered with "the next batch" when there
/// is none yet returns nothing, and the records of the last batch would wait unseen.
const STALLED_AFTER: Duration = Duration::from_secs(2);
/// Records one such re-read hands over at most (the in-flight budget is the consumer's).
const TAIL_MAX_RECORDS: usize = 5_000;
/// A stalled read whose re-read found nothing is checked again after twice as long each time,
/// up to this: a broker that hides records (or a re-read that came back empty on a loaded
/// machine) cannot hold a partition for longer, and an idle partition costs one re-read per
/// this long.
const TAIL_RECHECK_MAX: Duration = Duration::from_secs(300);

/// What a verification concluded about one gap.
#[derive(Debug, Default)]
struct Verified {
    /// Records of the gap the broker returned.
    recovered: Vec<RawMessage>,
    /// Offsets of the gap the broker holds nothing at.
    absent: Vec<Range<i64>>,
    /// Offsets of the gap below the log start offset (deleted by retention).
    below_log_start: Option<Range<i64>>,
    /// Fetches it took.
    fetches: usize,
}

/// The partitions' start positions, their gaps and their gauges.
pub(crate) struct GapMonitor {
    consumer: Arc<SourceConsumer>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<RawMessage>,
    verifier_config: ClientConfig,
    verifier: Option<BaseConsumer>,
    /// With no committed offset the consumer starts at the log start (`auto.offset.reset`
    /// earliest, meterflow's default); otherwise at the end, where there is nothing to check.
    reset_to_earliest: bool,
    /// Per partition: the gap being retried, how often it failed, and when to try again.
    retries: HashMap<(String, i32), Retry>,
    /// Per partition: the stalled read last checked, and when to check it again.
    tails: HashMap<(String, i32), TailCheck>,
    last_report: Option<Instant>,
}

/// The last stalled-read check of a partition: where the read stood, how many checks found
/// nothing there, and when the next one is due.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TailCheck {
    generation: u64,
    next: i64,
    empty_checks: u32,
    due: Instant,
}

impl TailCheck {
    /// After `empty_checks` checks found nothing: [`STALLED_AFTER`] × 2^n, at most
    /// [`TAIL_RECHECK_MAX`].
    fn backoff(empty_checks: u32) -> Duration {
        STALLED_AFTER
            .saturating_mul(1u32.checked_shl(empty_checks.min(16)).unwrap_or(u32::MAX))
            .min(TAIL_RECHECK_MAX)
    }
}

#[derive(Debug, Clone)]
struct Retry {
    generation: u64,
    gap_start: i64,
    failures: u32,
    next_try: Instant,
}

impl GapMonitor {
    pub(crate) fn new(
        consumer: Arc<SourceConsumer>,
        shared: Arc<Shared>,
        tx: mpsc::Sender<RawMessage>,
        brokers: &str,
        group_id: &str,
        properties: &[(String, String)],
    ) -> GapMonitor {
        let mut config = ClientConfig::new();
        // The user's TLS/SASL and isolation settings apply to the re-read too.
        for (k, v) in properties {
            config.set(k, v);
        }
        config
            .set("bootstrap.servers", brokers)
            // Never joins the group (assign only) and never commits.
            .set("group.id", format!("{group_id}.gap-check"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100")
            .set_log_level(RDKafkaLogLevel::Warning);
        config.remove("group.instance.id");
        let reset_to_earliest = !properties.iter().any(|(k, v)| {
            k == "auto.offset.reset" && matches!(v.as_str(), "latest" | "largest" | "end")
        });
        GapMonitor {
            consumer,
            shared,
            tx,
            verifier_config: config,
            verifier: None,
            reset_to_earliest,
            retries: HashMap::new(),
            tails: HashMap::new(),
            last_report: None,
        }
    }

    /// Runs until shutdown; `wake` is signalled when the consumer saw a jump or a first record.
    pub(crate) fn run(mut self, wake: std::sync::mpsc::Receiver<()>) {
        while !self.shared.shutdown.load(Ordering::Acquire) {
            let _ = wake.recv_timeout(Duration::from_millis(250));
            self.learn_starts();
            self.verify_due_gaps();
            self.read_stalled_tails();
            if self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                self.last_report = Some(Instant::now());
                self.report();
            }
        }
    }

    /// Partitions that read before their start position was known: look the committed offset
    /// up, so that a first record past it becomes a gap.
    fn learn_starts(&mut self) {
        let waiting: Vec<((String, i32), u64, i64)> = {
            let w = crate::sync::lock(&self.shared.watermarks);
            w.iter_generations()
                .filter_map(|(k, g, w)| w.awaits_start().map(|first| (k.clone(), g, first)))
                .collect()
        };
        for ((topic, partition), generation, first) in waiting {
            let start = match self.start_position(&topic, partition) {
                Ok(Some(start)) => start,
                // Reads start at the end of the partition: the first record is the start.
                Ok(None) => first,
                Err(e) => {
                    tracing::warn!(topic, partition, error = %e, "cannot look up the committed offset; the partition commits nothing until it can");
                    continue;
                }
            };
            let mut w = crate::sync::lock(&self.shared.watermarks);
            let Some(mark) = w.current(&topic, partition, generation) else {
                continue;
            };
            if let Some(missing) = mark.learn_start(start) {
                tracing::info!(
                    topic,
                    partition,
                    committed = start,
                    first_read = first,
                    missing = missing.end - missing.start,
                    "the first record read is past the committed offset; verifying the gap before committing past it"
                );
            }
            if let Some(position) = mark.advance() {
                store_position(&self.consumer, &topic, partition, position);
            }
        }
    }

    /// The committed offset, or with none the log start (`None`: reads start at the end).
    fn start_position(&self, topic: &str, partition: i32) -> Result<Option<i64>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = self.consumer.committed_offsets(tpl, LOOKUP_TIMEOUT)?;
        let offset = committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
            .unwrap_or(Offset::Invalid);
        match offset {
            Offset::Offset(o) if o >= 0 => Ok(Some(o)),
            _ if self.reset_to_earliest => {
                let (low, _) = self
                    .consumer
                    .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)?;
                Ok(Some(low))
            }
            _ => Ok(None),
        }
    }

    fn verify_due_gaps(&mut self) {
        let gaps: Vec<((String, i32), u64, Gap)> = {
            let w = crate::sync::lock(&self.shared.watermarks);
            w.iter_generations()
                .filter_map(|(k, g, w)| w.first_gap().map(|gap| (k.clone(), g, gap)))
                .collect()
        };
        let now = Instant::now();
        for ((topic, partition), generation, gap) in gaps {
            if self.shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let key = (topic.clone(), partition);
            if let Some(r) = self.retries.get(&key) {
                if r.generation == generation && r.gap_start == gap.start && now < r.next_try {
                    continue;
                }
            }
            match self.verify(&topic, partition, generation, gap.start..gap.end, false) {
                Ok(verified) => {
                    self.retries.remove(&key);
                    metrics::gauge!("meterflow_offset_gap_unverified", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(0.0);
                    self.apply(&topic, partition, generation, gap, verified);
                }
                Err(why) => {
                    let failures = match self.retries.get(&key) {
                        Some(r) if r.generation == generation && r.gap_start == gap.start => {
                            r.failures.saturating_add(1)
                        }
                        _ => 1,
                    };
                    let backoff = RETRY_FIRST
                        .saturating_mul(1u32 << failures.saturating_sub(1).min(6))
                        .min(RETRY_MAX);
                    tracing::warn!(
                        topic,
                        partition,
                        gap_start = gap.start,
                        gap_end = gap.end,
                        failures,
                        retry_in_s = backoff.as_secs(),
                        reason = %why,
                        "offset gap not verified: the committed offset stays before it (the partition is held) until a re-read settles it"
                    );
                    metrics::gauge!("meterflow_offset_gap_unverified", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set((gap.end - gap.start) as f64);
                    self.retries.insert(
                        key,
                        Retry {
                            generation,
                            gap_start: gap.start,
                            failures,
                            next_try: Instant::now() + backoff,
                        },
                    );
                }
            }
        }
    }

    /// Partitions that are not paused and read nothing for [`STALLED_AFTER`] while the broker
    /// holds records past the last one read: re-read from there (from a trusted anchor, like a
    /// gap) and hand the records over. With a consumer that is merely slow the re-read only
    /// finds records the consumer then reads too: the watermark drops those duplicates.
    fn read_stalled_tails(&mut self) {
        let now_ms = self.shared.millis_now();
        let polled = self.shared.polled_at_ms.load(Ordering::Acquire);
        // Paused (in-flight budget, 429 gate) or blocked handing messages over: not stalled.
        if self.shared.paused.load(Ordering::Acquire) || now_ms.saturating_sub(polled) > 500 {
            tracing::trace!(
                paused = self.shared.paused.load(Ordering::Acquire),
                in_flight = self.shared.in_flight.load(Ordering::Acquire),
                since_poll_ms = now_ms.saturating_sub(polled),
                "stalled-read check skipped"
            );
            return;
        }
        let resumed_ms = self.shared.resumed_at_ms.load(Ordering::Acquire);
        let resumed = self.shared.epoch + Duration::from_millis(resumed_ms);
        let now = Instant::now();
        let idle: Vec<((String, i32), u64, i64)> = {
            let w = crate::sync::lock(&self.shared.watermarks);
            w.iter_generations()
                .filter_map(|(k, g, w)| {
                    let (next, last_read) = w.read_up_to()?;
                    let quiet_since = last_read.max(resumed);
                    (now.saturating_duration_since(quiet_since) >= STALLED_AFTER)
                        .then(|| (k.clone(), g, next))
                })
                .collect()
        };
        for ((topic, partition), generation, next) in idle {
            if self.shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            // Checked again with backoff while the position does not move: a check that found
            // nothing is no proof (see below), and a partition must not stay held on its word.
            let key = (topic.clone(), partition);
            let empty_checks = match self.tails.get(&key) {
                Some(c) if c.generation == generation && c.next == next => {
                    if now < c.due {
                        continue;
                    }
                    c.empty_checks
                }
                _ => 0,
            };
            self.tails.insert(
                key.clone(),
                TailCheck {
                    generation,
                    next,
                    empty_checks: empty_checks.saturating_add(1),
                    due: now + TailCheck::backoff(empty_checks.saturating_add(1)),
                },
            );
            // Caught up by the broker's own account: on the first check only, nothing to
            // re-read yet. Only a first: Tansu's memory storage reports the last batch's base
            // offset + 1 as its high watermark, so a read paused one record into the last batch
            // stands exactly at the "high watermark" with the rest of the batch unread (it
            // pinned two partitions in CI when the first check was the only one).
            if empty_checks == 0 {
                if let Ok((_, high)) =
                    self.consumer
                        .fetch_watermarks(&topic, partition, Duration::from_millis(500))
                {
                    if high == next {
                        continue;
                    }
                }
            }
            match self.verify(&topic, partition, generation, next..i64::MAX, true) {
                Ok(verified) if !verified.recovered.is_empty() => {
                    tracing::info!(
                        topic,
                        partition,
                        read_up_to = next,
                        recovered = verified.recovered.len(),
                        "the read stalled before records the broker holds; re-read them"
                    );
                    let gap = Gap {
                        start: next,
                        end: next,
                        since: now,
                    };
                    self.apply(&topic, partition, generation, gap, verified);
                }
                Ok(v) => {
                    tracing::trace!(
                        topic,
                        partition,
                        next,
                        fetches = v.fetches,
                        "stalled-read check found nothing"
                    )
                }
                Err(why) => {
                    // Checked again at the next quiet spell.
                    self.tails.remove(&key);
                    tracing::debug!(topic, partition, reason = %why, "stalled-read check failed")
                }
            }
        }
    }

    /// Re-reads `range` from a trusted anchor: [`verify_range`] with this partition's log
    /// start and the re-read consumer.
    fn verify(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        range: Range<i64>,
        tail: bool,
    ) -> Result<Verified, String> {
        let (low, _) = self
            .consumer
            .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)
            .map_err(|e| format!("cannot read the partition's watermarks: {e}"))?;
        let wanted = range.clone();
        verify_range(low, range, tail, |anchor, at_log_start, from| {
            self.reread(
                topic,
                partition,
                generation,
                anchor,
                at_log_start,
                from..wanted.end,
                tail,
            )
        })
    }

    /// Reads from `anchor` until the record at or after `range.end` (a tail read: until the
    /// end of the log, or [`TAIL_MAX_RECORDS`]). Stops after the first record when that is not
    /// the anchor and the anchor is not the log start (the caller then moves the anchor).
    #[allow(clippy::too_many_arguments)]
    fn reread(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        anchor: i64,
        at_log_start: bool,
        range: Range<i64>,
        tail: bool,
    ) -> Result<ReRead, String> {
        if self.verifier.is_none() {
            let consumer: BaseConsumer = self
                .verifier_config
                .create()
                .map_err(|e| format!("cannot create the re-read consumer: {e}"))?;
            self.verifier = Some(consumer);
        }
        let Some(verifier) = self.verifier.as_ref() else {
            return Err("no re-read consumer".into());
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(anchor))
            .map_err(|e| e.to_string())?;
        verifier
            .assign(&tpl)
            .map_err(|e| format!("cannot assign the re-read consumer: {e}"))?;
        let started = Instant::now();
        let deadline = started + REREAD_TIMEOUT;
        let mut read = ReRead::default();
        let mut last_record = started;
        let result = loop {
            if read.first.is_none() && started.elapsed() >= FIRST_RECORD_WAIT {
                // Nothing from the anchor on: the caller decides what that means.
                break Ok(());
            }
            if tail && read.first.is_some() && last_record.elapsed() >= TAIL_QUIET {
                // A tail read ends where the broker has nothing more for now.
                break Ok(());
            }
            if Instant::now() >= deadline {
                if tail {
                    break Ok(());
                }
                break Err(format!(
                    "a re-read from offset {anchor} did not reach offset {} within {} s",
                    range.end,
                    REREAD_TIMEOUT.as_secs()
                ));
            }
            if self.shared.shutdown.load(Ordering::Acquire) {
                break Err("shutting down".into());
            }
            match verifier.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => {
                    // For a gap the log ends before the record read after it: something is
                    // wrong (truncation?), not a confirmation. For a tail, the end.
                    read.reached_end = tail;
                    break Ok(());
                }
                Some(Err(e)) => {
                    crate::source::kafka::count_consumer_error(&e);
                    tracing::debug!(error = %e, "re-read consumer error");
                }
                Some(Ok(m)) => {
                    if m.topic() != topic || m.partition() != partition || m.offset() < anchor {
                        continue;
                    }
                    let o = m.offset();
                    last_record = Instant::now();
                    if read.first.is_none() {
                        read.first = Some(o);
                        if o != anchor && !at_log_start {
                            // Not answered from the anchor: the caller moves it.
                            break Ok(());
                        }
                    }
                    if o >= range.end {
                        read.reached_end = true;
                        break Ok(());
                    }
                    if o >= range.start {
                        read.records.push(raw_message(&m, generation));
                        if tail && read.records.len() >= TAIL_MAX_RECORDS {
                            break Ok(());
                        }
                    }
                }
            }
        };
        let _ = verifier.unassign();
        result.map(|()| read)
    }

    /// Hands the recovered records to the pipeline and lets the watermark pass what is absent.
    fn apply(&mut self, topic: &str, partition: i32, generation: u64, gap: Gap, v: Verified) {
        let labels = || {
            [
                ("topic", topic.to_string()),
                ("partition", partition.to_string()),
            ]
        };
        let mut to_send = Vec::with_capacity(v.recovered.len());
        {
            let mut w = crate::sync::lock(&self.shared.watermarks);
            let Some(mark) = w.current(topic, partition, generation) else {
                return;
            };
            let now = Instant::now();
            for m in v.recovered {
                // Filled for a gap; in order for a stalled read; a duplicate if the consumer
                // read it meanwhile.
                if mark.track(m.source.offset, now) != Tracked::Duplicate {
                    to_send.push(m);
                }
            }
            if let Some(below) = v.below_log_start.clone() {
                if mark.confirm_absent(below.clone()) > 0 {
                    metrics::counter!("meterflow_offset_gaps_total", "topic" => topic.to_string(), "partition" => partition.to_string(), "cause" => "retention")
                        .increment(1);
                    tracing::error!(
                        topic,
                        partition,
                        from = below.start,
                        to = below.end,
                        "offsets deleted by the topic's retention before meterflow read them: \
                         those events were never billed; raise the topic's retention.ms above \
                         the longest outage you expect"
                    );
                }
            }
            for range in &v.absent {
                if mark.confirm_absent(range.clone()) > 0 {
                    metrics::counter!("meterflow_offset_gaps_total", "topic" => topic.to_string(), "partition" => partition.to_string(), "cause" => "absent")
                        .increment(1);
                }
            }
            self.shared
                .in_flight
                .fetch_add(to_send.len(), Ordering::AcqRel);
            if let Some(position) = mark.advance() {
                store_position(&self.consumer, topic, partition, position);
            }
        }
        let absent: i64 = v.absent.iter().map(|r| r.end - r.start).sum();
        if !to_send.is_empty() {
            metrics::counter!("meterflow_offset_gap_recovered_total", &labels())
                .increment(to_send.len() as u64);
        }
        tracing::info!(
            topic,
            partition,
            gap_start = gap.start,
            gap_end = gap.end,
            recovered = to_send.len(),
            absent,
            fetches = v.fetches,
            "offset gap verified"
        );
        for m in to_send {
            metrics::counter!("meterflow_events_consumed_total", "topic" => m.source.topic.clone())
                .increment(1);
            if self.tx.blocking_send(m).is_err() {
                return;
            }
        }
    }

    /// Per assigned partition: lag of the committed offset behind the high watermark, and the
    /// age of the oldest unsettled event.
    fn report(&self) {
        let parts: Vec<((String, i32), Option<Instant>)> = {
            let w = crate::sync::lock(&self.shared.watermarks);
            w.iter()
                .map(|(k, w)| (k.clone(), w.oldest_unsettled()))
                .collect()
        };
        if parts.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _) in &parts {
            tpl.add_partition(topic, *partition);
        }
        let committed = self.consumer.committed_offsets(tpl, LOOKUP_TIMEOUT).ok();
        let now = Instant::now();
        for ((topic, partition), oldest) in &parts {
            let age = oldest.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
            metrics::gauge!("meterflow_oldest_unsettled_seconds", "topic" => topic.clone(), "partition" => partition.to_string())
                .set(age);
            let Ok((low, high)) =
                self.consumer
                    .fetch_watermarks(topic, *partition, Duration::from_millis(500))
            else {
                continue;
            };
            let Some(committed) = committed.as_ref() else {
                continue;
            };
            let position = committed
                .find_partition(topic, *partition)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                // Nothing committed yet: everything from the log start is behind.
                .unwrap_or(low);
            metrics::gauge!("meterflow_consumer_lag", "topic" => topic.clone(), "partition" => partition.to_string())
                .set((high - position).max(0) as f64);
            // Only while still assigned: a revoke meanwhile forgot the partition.
            if crate::sync::lock(&self.shared.assigned).contains_key(&(topic.clone(), *partition)) {
                crate::sync::lock(&self.shared.reported).insert(
                    (topic.clone(), *partition),
                    super::kafka::ReportedOffsets {
                        committed: position,
                        high,
                    },
                );
            }
        }
    }
}

/// Re-reads `range` from a trusted anchor (see the module comment), through
/// `reread(anchor, anchor is the log start, first offset of interest)`; `low` is the log start
/// offset. Pure: the fetches are the caller's. For a gap, `range.end` is the record read after
/// the jump, and every offset of the range is either returned or found absent. For a stalled
/// read (`tail`, `range.end` unbounded) the records the broker has from `range.start` on (at
/// most [`TAIL_MAX_RECORDS`]) are returned and nothing is concluded about the others.
fn verify_range(
    low: i64,
    range: Range<i64>,
    tail: bool,
    mut reread: impl FnMut(i64, bool, i64) -> Result<ReRead, String>,
) -> Result<Verified, String> {
    let mut verified = Verified::default();
    let mut start = range.start;
    if start < low && !tail {
        let below = start..low.min(range.end);
        start = below.end;
        verified.below_log_start = Some(below);
    }
    if start >= range.end {
        return Ok(verified);
    }
    let mut anchor = (start - 1).max(low);
    let mut lowest_tried = anchor;
    let mut tried = BTreeSet::new();
    for _ in 0..MAX_ANCHORS {
        tried.insert(anchor);
        lowest_tried = lowest_tried.min(anchor);
        verified.fetches += 1;
        let read = reread(anchor, anchor == low, start)?;
        // No record at all: the broker holds nothing from the anchor on (then the anchor,
        // a record read before, is gone: trusted only at the log start), or it skipped to a
        // next batch that does not exist yet (Tansu): move back like for a skip.
        let first = match read.first {
            Some(first) => first,
            None if anchor == low && tail => return Ok(verified),
            None if anchor == low => {
                return Err(format!("a re-read from offset {anchor} returned no record"))
            }
            None => i64::MAX,
        };
        if first == anchor || (anchor == low && first >= low) {
            if tail {
                verified.recovered = read.records;
                return Ok(verified);
            }
            if !read.reached_end {
                return Err(format!(
                    "a re-read from offset {anchor} ended before offset {}",
                    range.end
                ));
            }
            let mut next = start;
            for m in &read.records {
                let o = m.source.offset;
                if o > next {
                    verified.absent.push(next..o);
                }
                next = o + 1;
            }
            if next < range.end {
                verified.absent.push(next..range.end);
            }
            verified.recovered = read.records;
            return Ok(verified);
        }
        // The broker did not answer from the anchor: it skipped it too.
        anchor = if first < start && !tried.contains(&first) {
            // A record it does hold before the range: ask from there.
            first
        } else {
            let back = (start - lowest_tried).saturating_mul(4).max(2);
            (start.saturating_sub(back)).max(low)
        };
        if tried.contains(&anchor) {
            break;
        }
    }
    Err(format!(
        "no fetch from before offset {start} was answered from where it started ({} tried)",
        tried.len()
    ))
}

#[derive(Debug, Default)]
struct ReRead {
    first: Option<i64>,
    /// Records of the gap, in offset order.
    records: Vec<RawMessage>,
    /// The read got to the record after the gap.
    reached_end: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourceRef;
    use std::collections::BTreeSet;

    /// A partition's log as a broker serves it: the records it holds, in batches.
    struct Broker {
        records: BTreeSet<i64>,
        batch_bases: BTreeSet<i64>,
        /// Tansu 0.6 memory storage: a fetch from inside a batch is answered from the next one.
        skips_to_next_batch: bool,
        fetches: Vec<i64>,
    }

    impl Broker {
        fn new(records: impl IntoIterator<Item = i64>, batch: i64, skips: bool) -> Broker {
            let records: BTreeSet<i64> = records.into_iter().collect();
            let batch_bases = records
                .iter()
                .map(|o| o - o % batch)
                .map(|b| *records.range(b..).next().unwrap())
                .collect();
            Broker {
                records,
                batch_bases,
                skips_to_next_batch: skips,
                fetches: Vec::new(),
            }
        }

        fn read(
            &mut self,
            anchor: i64,
            at_log_start: bool,
            from: i64,
            end: i64,
            tail: bool,
        ) -> ReRead {
            self.fetches.push(anchor);
            let start = if self.skips_to_next_batch {
                match self.batch_bases.range(anchor..).next() {
                    Some(b) => *b,
                    None => return ReRead::default(),
                }
            } else {
                anchor
            };
            let mut read = ReRead::default();
            for &o in self.records.range(start..) {
                if read.first.is_none() {
                    read.first = Some(o);
                    if o != anchor && !at_log_start {
                        return read;
                    }
                }
                if o >= end {
                    read.reached_end = true;
                    return read;
                }
                if o >= from {
                    read.records.push(RawMessage {
                        source: SourceRef {
                            topic: "t".into(),
                            partition: 0,
                            offset: o,
                        },
                        key: None,
                        payload: bytes::Bytes::new(),
                        headers: Vec::new(),
                        generation: 1,
                    });
                }
            }
            read.reached_end = tail;
            read
        }
    }

    fn run(
        broker: &mut Broker,
        low: i64,
        range: Range<i64>,
        tail: bool,
    ) -> Result<Verified, String> {
        let end = range.end;
        verify_range(low, range, tail, |anchor, at_log_start, from| {
            Ok(broker.read(anchor, at_log_start, from, end, tail))
        })
    }

    fn offsets(v: &Verified) -> Vec<i64> {
        v.recovered.iter().map(|m| m.source.offset).collect()
    }

    /// Issue 11's jump (1885 → 4384 with batches of 2 500): a re-read from 1884 is answered
    /// from 2500, which proves nothing; the anchor moves back until a fetch is answered from
    /// where it started, and the whole gap comes back. Nothing is declared absent.
    #[test]
    fn a_skip_to_the_next_batch_is_not_taken_for_a_confirmation() {
        let mut broker = Broker::new(0..10_000, 2_500, true);
        let v = run(&mut broker, 0, 1885..4384, false).unwrap();
        assert!(v.absent.is_empty(), "{:?}", v.absent);
        assert_eq!(offsets(&v), (1885..4384).collect::<Vec<_>>());
        assert!(broker.fetches.len() > 1, "{:?}", broker.fetches);
        assert_eq!(broker.fetches[0], 1884, "first from the last record read");
    }

    /// Compaction: 10..20 are gone. A fetch from 9 is answered with 9, then 20: absent.
    #[test]
    fn a_real_gap_is_confirmed_by_a_read_answered_from_its_anchor() {
        let mut broker = Broker::new((0..10).chain(20..30), 100, false);
        let v = run(&mut broker, 0, 10..20, false).unwrap();
        assert_eq!(v.absent, vec![10..20]);
        assert!(v.recovered.is_empty());
        assert_eq!(broker.fetches, vec![9]);
        // Part absent, part there (a broker that skipped in its first answer only).
        let mut broker = Broker::new((0..12).chain(15..30), 100, false);
        let v = run(&mut broker, 0, 10..20, false).unwrap();
        assert_eq!(offsets(&v), vec![10, 11, 15, 16, 17, 18, 19]);
        assert_eq!(v.absent, vec![12..15]);
    }

    /// The record before the gap was compacted away too: the anchor moves back to one the
    /// broker does return.
    #[test]
    fn a_missing_anchor_moves_back() {
        let mut broker = Broker::new((0..5).chain(20..30), 100, false);
        let v = run(&mut broker, 0, 10..20, false).unwrap();
        assert_eq!(v.absent, vec![10..20]);
        assert_eq!(broker.fetches.first(), Some(&9));
        // Even with every record before the gap gone, the log start is trusted.
        let mut broker = Broker::new(20..30, 100, false);
        let v = run(&mut broker, 0, 10..20, false).unwrap();
        assert_eq!(v.absent, vec![10..20]);
    }

    /// A broker whose answers never start where they were asked confirms nothing: the gap stays
    /// unverified and keeps holding the position.
    #[test]
    fn a_broker_that_never_answers_from_the_anchor_confirms_nothing() {
        // Answers every fetch with nothing (no batch starts at or after any anchor).
        let mut broker = Broker::new(0..5000, 5000, true);
        broker.batch_bases.clear();
        let err = run(&mut broker, 0, 1885..4384, false).unwrap_err();
        assert!(err.contains("returned no record"), "{err}");
        // Batches at 0 and 4384 only: the anchor walks back to the log start, which is trusted,
        // and there the whole batch comes back.
        let mut broker = Broker::new(0..5000, 4384, true);
        let v = run(&mut broker, 0, 1885..4384, false).unwrap();
        assert_eq!(offsets(&v), (1885..4384).collect::<Vec<_>>());
        assert!(broker.fetches.len() <= MAX_ANCHORS);
    }

    /// The documented limit: an answer from the log start offset is trusted, so a broker that
    /// reports a log start inside a batch and then skips that batch is believed.
    #[test]
    fn the_limit_a_log_start_inside_a_skipped_batch_is_believed() {
        let mut broker = Broker::new(0..5000, 4384, true);
        let v = run(&mut broker, 1000, 1885..4384, false).unwrap();
        assert_eq!(v.absent, vec![1885..4384]);
    }

    #[test]
    fn offsets_below_the_log_start_are_reported_apart() {
        let mut broker = Broker::new(100..200, 1000, false);
        let v = run(&mut broker, 100, 50..150, false).unwrap();
        assert_eq!(v.below_log_start, Some(50..100));
        assert_eq!(offsets(&v), (100..150).collect::<Vec<_>>());
        assert!(v.absent.is_empty());
    }

    /// Tansu answers a fetch from inside the last batch with nothing: the stalled read finds
    /// the rest of that batch by moving the anchor back.
    #[test]
    fn a_stalled_read_is_checked_again_ever_more_rarely_up_to_five_minutes() {
        let waits: Vec<u64> = (0..12).map(|n| TailCheck::backoff(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300]);
        assert_eq!(TailCheck::backoff(u32::MAX), TAIL_RECHECK_MAX);
    }

    #[test]
    fn a_stalled_tail_is_read_from_a_trusted_anchor() {
        let mut broker = Broker::new(0..10_000, 1_250, true);
        let v = run(&mut broker, 0, 9151..i64::MAX, true).unwrap();
        assert_eq!(offsets(&v), (9151..10_000).collect::<Vec<_>>());
        // Caught up for real: nothing.
        let mut broker = Broker::new(0..10_000, 1_250, false);
        let v = run(&mut broker, 0, 10_000..i64::MAX, true).unwrap();
        assert!(v.recovered.is_empty());
    }
}
