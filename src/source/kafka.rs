use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::ack::watermark::{Tracked, Watermarks};
use crate::admin::status::PartitionStatus;
use crate::event::{RawMessage, SourceRef};

/// What the source needs to know beyond the librdkafka properties.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub session_timeout: Duration,
    pub drain_timeout: Duration,
    pub commit_interval: Duration,
    /// Events read but not settled; at this many the consumer stops taking messages, and
    /// pauses the partitions if that lasts.
    pub max_in_flight: usize,
    /// How long the budget may stay full before the partitions are paused.
    pub pause_after: Duration,
    /// Pass-through librdkafka properties; they win over meterflow's defaults.
    pub properties: Vec<(String, String)>,
}

/// State shared between the consumer thread, its rebalance callbacks and the acknowledger.
pub(crate) struct Shared {
    pub(crate) watermarks: Mutex<Watermarks>,
    /// Events read and not yet settled (all partitions).
    pub(crate) in_flight: AtomicUsize,
    /// While true (the sink-wide 429 gate is closed), partitions stay paused.
    pub(crate) hold: AtomicBool,
    /// The consumer loop's state, for the stalled-read check (`gaps.rs`): whether it reads
    /// nothing on purpose (held at the in-flight budget, or its partitions paused), and
    /// milliseconds after `epoch` of its last poll and last resume.
    pub(crate) paused: AtomicBool,
    pub(crate) polled_at_ms: AtomicU64,
    pub(crate) resumed_at_ms: AtomicU64,
    pub(crate) epoch: Instant,
    pub(crate) shutdown: AtomicBool,
    generation: AtomicU64,
    drain_timeout: Duration,
    /// Assigned partitions; readiness and lag metrics read it.
    pub(crate) assigned: Mutex<HashMap<(String, i32), u64>>,
    /// Bumped after every revocation, so that work for revoked partitions can stop.
    revocations: tokio::sync::watch::Sender<u64>,
    /// The broker's figures of each assigned partition as of the last progress report
    /// (`gaps.rs`, every few seconds): the same numbers as the lag gauges, for the status page.
    pub(crate) reported: Mutex<HashMap<(String, i32), ReportedOffsets>>,
}

/// A partition's committed offset and high watermark, as the brokers last answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReportedOffsets {
    /// The group's committed offset (the log start when nothing is committed yet).
    pub(crate) committed: i64,
    pub(crate) high: i64,
}

impl Shared {
    pub(crate) fn millis_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn wait_drained(&self, partitions: &[(String, i32)], deadline: Instant) -> usize {
        loop {
            let pending: usize = {
                let w = crate::sync::lock(&self.watermarks);
                partitions.iter().map(|(t, p)| w.pending_in(t, *p)).sum()
            };
            if pending == 0 || Instant::now() >= deadline {
                return pending;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub(crate) struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    /// Client-wide errors (all brokers down, authentication, ...): counted, then logged.
    fn error(&self, error: KafkaError, reason: &str) {
        count_consumer_error(&error);
        tracing::error!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut w = crate::sync::lock(&self.shared.watermarks);
                let mut assigned = crate::sync::lock(&self.shared.assigned);
                for e in tpl.elements() {
                    let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    w.assign(e.topic(), e.partition(), generation);
                    assigned.insert((e.topic().to_string(), e.partition()), generation);
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition assigned"
                    );
                }
                metrics::gauge!("meterflow_assigned_partitions").set(assigned.len() as f64);
            }
            Rebalance::Revoke(tpl) => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                self.drain_and_release(consumer, &partitions);
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }
}

impl SourceContext {
    /// Waits (bounded by the drain timeout) for the partitions' in-flight events to settle,
    /// stores and commits their final positions, and forgets them. Whatever is still unsettled
    /// at the deadline is redelivered to the next owner (the ledger keeps that from billing twice).
    fn drain_and_release(&self, consumer: &BaseConsumer<Self>, partitions: &[(String, i32)]) {
        let deadline = Instant::now() + self.shared.drain_timeout;
        let unsettled = self.shared.wait_drained(partitions, deadline);
        let mut tpl = TopicPartitionList::new();
        {
            let mut w = crate::sync::lock(&self.shared.watermarks);
            let mut assigned = crate::sync::lock(&self.shared.assigned);
            for (topic, partition) in partitions {
                if let Some(mark) = w.revoke(topic, *partition) {
                    if let Some(position) = mark.committable() {
                        let _ =
                            tpl.add_partition_offset(topic, *partition, Offset::Offset(position));
                    }
                    let abandoned = mark.pending_count();
                    if abandoned > 0 {
                        self.shared.in_flight.fetch_sub(abandoned, Ordering::AcqRel);
                    }
                }
                assigned.remove(&(topic.clone(), *partition));
                crate::sync::lock(&self.shared.reported).remove(&(topic.clone(), *partition));
                // The next owner reports this partition now; a stale value here would alert.
                for gauge in [
                    "meterflow_consumer_lag",
                    "meterflow_oldest_unsettled_seconds",
                    "meterflow_offset_gap_unverified",
                ] {
                    metrics::gauge!(gauge, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(0.0);
                }
            }
            metrics::gauge!("meterflow_assigned_partitions").set(assigned.len() as f64);
        }
        self.shared
            .revocations
            .send_modify(|n| *n = n.wrapping_add(1));
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner may redeliver (the ledger deduplicates)");
            }
        }
        tracing::info!(
            partitions = ?partitions,
            unsettled_at_deadline = unsettled,
            "partitions released"
        );
    }
}

pub type SourceConsumer = BaseConsumer<SourceContext>;

/// A running Kafka source.
pub struct KafkaSource {
    thread: Option<JoinHandle<()>>,
    /// Start positions, offset-gap verification and the progress gauges (`gaps.rs`).
    monitor: Option<JoinHandle<()>>,
    handle: SourceHandle,
}

/// What the rest of the pipeline holds: settle offsets, hold or release the partitions, stop.
#[derive(Clone)]
pub struct SourceHandle {
    shared: Arc<Shared>,
    consumer: Arc<SourceConsumer>,
}

impl KafkaSource {
    /// Joins the group and starts reading; messages arrive on the returned channel.
    pub fn start(
        options: SourceOptions,
    ) -> Result<(KafkaSource, mpsc::Receiver<RawMessage>), KafkaError> {
        let shared = Arc::new(Shared {
            watermarks: Mutex::new(Watermarks::new()),
            in_flight: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            polled_at_ms: AtomicU64::new(0),
            resumed_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            shutdown: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            drain_timeout: options.drain_timeout,
            assigned: Mutex::new(HashMap::new()),
            revocations: tokio::sync::watch::channel(0).0,
            reported: Mutex::new(HashMap::new()),
        });
        let config = consumer_config(&options);
        let consumer: SourceConsumer = config.create_with_context(SourceContext {
            shared: shared.clone(),
        })?;
        let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::channel(4096);
        let handle = SourceHandle {
            shared: shared.clone(),
            consumer: consumer.clone(),
        };
        let max_in_flight = options.max_in_flight.max(1);
        let pause_after = options.pause_after;
        let monitor = super::gaps::GapMonitor::new(
            consumer.clone(),
            shared.clone(),
            tx.clone(),
            &options.brokers,
            &options.group_id,
            &options.properties,
        );
        let (wake_tx, wake_rx) = std::sync::mpsc::sync_channel(1);
        let monitor = std::thread::Builder::new()
            .name("kafka-offsets".into())
            .spawn(move || monitor.run(wake_rx))
            .map_err(|e| KafkaError::ClientCreation(format!("cannot start a thread: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("kafka-source".into())
            .spawn(move || consume_loop(consumer, shared, tx, wake_tx, max_in_flight, pause_after))
            .map_err(|e| KafkaError::ClientCreation(format!("cannot start a thread: {e}")))?;
        Ok((
            KafkaSource {
                thread: Some(thread),
                monitor: Some(monitor),
                handle,
            },
            rx,
        ))
    }

    pub fn handle(&self) -> SourceHandle {
        self.handle.clone()
    }

    /// Stops fetching, waits up to the drain timeout for in-flight events to settle, commits
    /// the settled positions and leaves the group.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.handle.shared.shutdown.store(true, Ordering::Release);
        for t in [self.thread.take(), self.monitor.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop();
    }
}

impl SourceHandle {
    /// Settles one event: when its partition's watermark moves, the new position is stored for
    /// the next commit.
    pub fn settle(&self, source: &SourceRef, generation: u64) {
        // The store happens under the watermark lock so that two settlements racing on one
        // partition can never store positions out of order.
        let mut w = crate::sync::lock(&self.shared.watermarks);
        let Some(moved) = w.settle(&source.topic, source.partition, generation, source.offset)
        else {
            return;
        };
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(position) = moved {
            store_position(&self.consumer, &source.topic, source.partition, position);
        }
    }

    /// Partitions whose committed offset is held by something unsettled (an event, an offset
    /// gap not verified yet, a start position not known yet): where, and since when.
    pub fn pinned(&self) -> Vec<crate::admin::readiness::Pinned> {
        let w = crate::sync::lock(&self.shared.watermarks);
        w.iter()
            .filter_map(|((topic, partition), mark)| {
                mark.oldest_unsettled()
                    .map(|since| crate::admin::readiness::Pinned {
                        topic: topic.clone(),
                        partition: *partition,
                        position: mark.committable(),
                        since,
                    })
            })
            .collect()
    }

    /// Keeps the partitions paused (the sink-wide 429 gate is closed) or lets them go.
    pub fn hold(&self, hold: bool) {
        self.shared.hold.store(hold, Ordering::Release);
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Whether this process still owns the partition of `source` under the assignment
    /// `generation` (a revoked partition, even if assigned again since, is not).
    pub fn owns(&self, source: &SourceRef, generation: u64) -> bool {
        self.shared
            .assigned
            .lock()
            .map(|a| a.get(&(source.topic.clone(), source.partition)) == Some(&generation))
            .unwrap_or(false)
    }

    /// Changes after every revocation (then ask [`SourceHandle::owns`]).
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.revocations.subscribe()
    }

    pub fn assigned_partitions(&self) -> usize {
        crate::sync::lock(&self.shared.assigned).len()
    }

    /// Asks a broker for the first subscribed topic's metadata; true when one answered within
    /// `timeout`. Blocks (call it off the async workers). For `/readyz`: librdkafka reconnects
    /// quietly, so "a broker answered just now" is the reliable signal.
    ///
    /// Each answer also sets `meterflow_topic_partitions{topic}` for the subscribed topics
    /// (patterns aside): with `meterflow_assigned_partitions` summed over the group's members it
    /// shows partitions that no member owns (a broker that wedged the group), which no member's
    /// own lag can show.
    pub fn probe_broker(&self, timeout: Duration) -> bool {
        let topics: Vec<String> = self
            .consumer
            .subscription()
            .map(|s| s.elements().iter().map(|e| e.topic().to_string()).collect())
            .unwrap_or_default();
        let named: Vec<&String> = topics.iter().filter(|t| !t.starts_with('^')).collect();
        if named.is_empty() {
            let first = topics.first().map(String::as_str);
            return self.consumer.fetch_metadata(first, timeout).is_ok();
        }
        let mut answered = false;
        for topic in named {
            let Ok(metadata) = self.consumer.fetch_metadata(Some(topic), timeout) else {
                continue;
            };
            answered = true;
            if let Some(t) = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
            {
                metrics::gauge!("meterflow_topic_partitions", "topic" => topic.clone())
                    .set(t.partitions().len() as f64);
            }
        }
        answered
    }

    /// Asks the consumer thread to drain and stop (same as [`KafkaSource::shutdown`], without
    /// joining).
    pub fn request_shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
    }
}

/// The consumer's librdkafka settings: meterflow's own, then `[kafka.properties]` over them.
fn consumer_config(options: &SourceOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("group.id", &options.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Offsets are stored only when the contiguous watermark moves.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            options.commit_interval.as_millis().to_string(),
        )
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            options.session_timeout.as_millis().to_string(),
        )
        // Bound the prefetch: memory is the in-flight budget, not librdkafka's queue. The
        // queue stops fetching once it holds `queued.min.messages` (all partitions together,
        // as it is forwarded to the consumer's queue) or `queued.max.messages.kbytes`, but a
        // fetch under way still lands whole: with librdkafka's 50 MiB `fetch.max.bytes`, one
        // answer from a backlog put 12 000–32 000 messages in the queue at once, each about a
        // kilobyte of librdkafka's own bookkeeping besides its fetch buffer. 1 MiB held the
        // RSS lower still but halved the read of one-record batches from Tansu (docs/
        // benchmarks.md, "Tenth run").
        .set("fetch.max.bytes", "4194304")
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "2000")
        // Once a partition's queue is over those bounds, librdkafka puts off its next fetch by
        // this long (1 s by default): the queue then ran dry in the meantime, and batches of
        // 100 without a ledger on Tansu fell from 53 000 to 19 000 events/s at 10 000 messages.
        // At 20 ms they ran at 64 000. `[kafka.properties]` overrides all four.
        .set("fetch.queue.backoff.ms", "20")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in &options.properties {
        config.set(k, v);
    }
    // A `debug` property asks for librdkafka's debug lines (e.g. `cgrp`: group joins and
    // assignments); the warning level set above would drop them.
    if options.properties.iter().any(|(k, _)| k == "debug") {
        config.set_log_level(RDKafkaLogLevel::Debug);
    }
    config
}

/// How often a consumer held at the budget looks whether it may read again.
const HOLD_CHECK: Duration = Duration::from_millis(1);

/// Reads until shutdown, within the in-flight budget. Over the budget the loop first only
/// stops taking messages: librdkafka's prefetch stays queued, bounded by `queued.min.messages`
/// and `queued.max.messages.kbytes`. A hold longer than `pause_after` pauses the partitions
/// instead, so that the loop polls again and serves rebalance callbacks. Pausing purges each
/// partition's fetch queue (`rd_kafka_toppar_pause_resume`), and resuming fetches it again:
/// with a budget of 5 000, pausing at once ran batches of 100 at a fifth of the speed
/// (docs/benchmarks.md, "Seventh run").
fn consume_loop(
    consumer: Arc<SourceConsumer>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<RawMessage>,
    wake_monitor: std::sync::mpsc::SyncSender<()>,
    max_in_flight: usize,
    pause_after: Duration,
) {
    let resume_below = max_in_flight / 2;
    let mut paused = false;
    // When the loop last stopped taking messages at the budget, while not paused.
    let mut held_since: Option<Instant> = None;
    while !shared.shutdown.load(Ordering::Acquire) {
        let in_flight = shared.in_flight.load(Ordering::Acquire);
        let hold = shared.hold.load(Ordering::Acquire);
        if !paused && !hold && in_flight >= max_in_flight {
            let since = *held_since.get_or_insert_with(Instant::now);
            if since.elapsed() < pause_after {
                shared.paused.store(true, Ordering::Release);
                std::thread::sleep(HOLD_CHECK);
                continue;
            }
        }
        if !paused && in_flight < max_in_flight {
            // The hold is over. It is no resume: librdkafka kept fetching meanwhile, so the
            // stalled-read check's clock (`resumed_at_ms`) does not start again.
            held_since = None;
        }
        if !paused && (in_flight >= max_in_flight || hold) {
            paused = set_paused(&consumer, true);
            if paused {
                let reason = if hold {
                    "rate_limited"
                } else {
                    "in_flight_budget"
                };
                metrics::counter!("meterflow_consumer_pauses_total", "reason" => reason)
                    .increment(1);
            }
        } else if paused && in_flight <= resume_below && !hold {
            paused = !set_paused(&consumer, false);
            if !paused {
                held_since = None;
                shared
                    .resumed_at_ms
                    .store(shared.millis_now(), Ordering::Release);
            }
        } else if paused {
            // Partitions assigned while paused start paused too.
            set_paused(&consumer, true);
        }
        shared.paused.store(paused, Ordering::Release);
        shared
            .polled_at_ms
            .store(shared.millis_now(), Ordering::Release);
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Err(e)) => {
                count_consumer_error(&e);
                tracing::warn!(error = %e, "kafka consumer error");
            }
            Some(Ok(m)) => {
                let topic = m.topic();
                let partition = m.partition();
                let offset = m.offset();
                let generation = {
                    let assigned = crate::sync::lock(&shared.assigned);
                    assigned.get(&(topic.to_string(), partition)).copied()
                };
                let Some(generation) = generation else {
                    continue;
                };
                let (tracked, awaits_start) = {
                    let mut w = crate::sync::lock(&shared.watermarks);
                    match w.current(topic, partition, generation) {
                        Some(mark) => {
                            let tracked = mark.track(offset, Instant::now());
                            (tracked, mark.awaits_start().is_some())
                        }
                        None => continue,
                    }
                };
                match &tracked {
                    // Read already (librdkafka re-fetched): processing it again would only
                    // cost a ledger look-up, but it must not be counted in flight twice.
                    Tracked::Duplicate => continue,
                    Tracked::AfterGap { missing } => {
                        tracing::info!(
                            topic,
                            partition,
                            from = missing.start,
                            to = missing.end,
                            "offsets skipped by the read; holding the committed offset before them until they are verified"
                        );
                        let _ = wake_monitor.try_send(());
                    }
                    Tracked::InOrder if awaits_start => {
                        let _ = wake_monitor.try_send(());
                    }
                    Tracked::InOrder | Tracked::Filled => {}
                }
                let raw = raw_message(&m, generation);
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                metrics::counter!("meterflow_events_consumed_total", "topic" => raw.source.topic.clone()).increment(1);
                if tx.blocking_send(raw).is_err() {
                    break;
                }
            }
        }
        metrics::gauge!("meterflow_in_flight_events")
            .set(shared.in_flight.load(Ordering::Relaxed) as f64);
    }
    // Shutdown: drain everything still assigned, commit, leave the group.
    let partitions: Vec<(String, i32)> = crate::sync::lock(&shared.assigned)
        .keys()
        .cloned()
        .collect();
    consumer.context().drain_and_release(&consumer, &partitions);
    consumer.unsubscribe();
    // Serve the final rebalance callbacks of leaving the group.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        consumer.poll(Duration::from_millis(50));
    }
}

/// The message as the pipeline sees it.
pub(crate) fn raw_message(m: &BorrowedMessage<'_>, generation: u64) -> RawMessage {
    RawMessage {
        source: SourceRef {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
        },
        key: m.key().map(bytes::Bytes::copy_from_slice),
        payload: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            bytes::Bytes::copy_from_slice(h.value.unwrap_or_default()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        generation,
    }
}

/// Stores `position` as the partition's next commit (librdkafka commits it within
/// `kafka.commit_interval`).
pub(crate) fn store_position(
    consumer: &SourceConsumer,
    topic: &str,
    partition: i32,
    position: i64,
) {
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(position))
        .is_err()
    {
        return;
    }
    match consumer.store_offsets(&tpl) {
        Ok(()) => {
            metrics::gauge!("meterflow_committed_offset", "topic" => topic.to_string(), "partition" => partition.to_string())
                .set(position as f64);
        }
        // Revoked meanwhile: the new owner redelivers from its committed position.
        Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
            tracing::debug!(
                topic,
                partition,
                position,
                "offset store for a revoked partition dropped"
            );
        }
        Err(e) => tracing::warn!(topic, partition, position, error = %e, "offset store failed"),
    }
}

/// Counts an error the consumer reported, by librdkafka error code (a bounded set).
pub(crate) fn count_consumer_error(e: &KafkaError) {
    let code = e
        .rdkafka_error_code()
        .map_or_else(|| "other".to_string(), |c| format!("{c:?}"));
    metrics::counter!("meterflow_consumer_errors_total", "code" => code).increment(1);
}

fn set_paused(consumer: &SourceConsumer, pause: bool) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    if assignment.count() == 0 {
        return false;
    }
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => {
            metrics::gauge!("meterflow_partitions_paused").set(if pause {
                assignment.count() as f64
            } else {
                0.0
            });
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, pause, "pause/resume failed");
            false
        }
    }
}

impl crate::ack::delivery::Ownership for SourceHandle {
    fn owns(&self, source: &SourceRef, generation: u64) -> bool {
        SourceHandle::owns(self, source, generation)
    }
    fn settle(&self, source: &SourceRef, generation: u64) {
        SourceHandle::settle(self, source, generation)
    }
    fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        SourceHandle::revocations(self)
    }
}

impl crate::admin::readiness::PartitionView for SourceHandle {
    fn assigned_partitions(&self) -> usize {
        SourceHandle::assigned_partitions(self)
    }
    fn pinned(&self) -> Vec<crate::admin::readiness::Pinned> {
        SourceHandle::pinned(self)
    }
    fn probe_broker(&self, timeout: Duration) -> bool {
        SourceHandle::probe_broker(self, timeout)
    }
}

/// The figures of the status page (`admin::status`): committed offset and lag from the last
/// progress report, the oldest unsettled event from the watermark.
impl crate::admin::status::PartitionFigures for SourceHandle {
    /// Every assigned partition with its committed offset, lag and oldest unsettled event,
    /// sorted by topic and partition.
    fn partition_status(&self) -> Vec<PartitionStatus> {
        let oldest: HashMap<(String, i32), Option<Instant>> = {
            let w = crate::sync::lock(&self.shared.watermarks);
            w.iter()
                .map(|(k, mark)| (k.clone(), mark.oldest_unsettled()))
                .collect()
        };
        let assigned: Vec<(String, i32)> = crate::sync::lock(&self.shared.assigned)
            .keys()
            .cloned()
            .collect();
        let reported = crate::sync::lock(&self.shared.reported);
        let mut out: Vec<PartitionStatus> = assigned
            .into_iter()
            .map(|key| {
                let figures = reported.get(&key).copied();
                PartitionStatus {
                    committed: figures.map(|f| f.committed),
                    lag: figures.map(|f| f.high.saturating_sub(f.committed).max(0)),
                    oldest_unsettled: oldest.get(&key).copied().flatten(),
                    topic: key.0,
                    partition: key.1,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(properties: &[(&str, &str)]) -> SourceOptions {
        SourceOptions {
            brokers: "127.0.0.1:9092".into(),
            group_id: "g".into(),
            topics: vec!["usage".into()],
            session_timeout: Duration::from_secs(6),
            drain_timeout: Duration::from_secs(3),
            commit_interval: Duration::from_millis(200),
            max_in_flight: 5_000,
            pause_after: Duration::from_millis(500),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_prefetch_is_bounded_by_default_and_properties_win() {
        let config = consumer_config(&options(&[]));
        assert_eq!(config.get("queued.min.messages"), Some("2000"));
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("4096"));
        assert_eq!(config.get("fetch.max.bytes"), Some("4194304"));
        assert_eq!(config.get("session.timeout.ms"), Some("6000"));

        let config = consumer_config(&options(&[
            ("queued.min.messages", "50000"),
            ("fetch.wait.max.ms", "10"),
        ]));
        assert_eq!(config.get("queued.min.messages"), Some("50000"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("4096"));
    }
}
