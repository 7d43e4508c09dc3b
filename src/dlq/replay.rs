//! `meterflow dlq replay`: read the dead-letter topic up to where it ended when the replay
//! started, pick letters by reason / event id / time, and produce each one's original key,
//! payload and headers back to its source topic, where the running service bills it.
//!
//! Why this cannot double-bill: the service derives delivery keys from event ids, so a replayed
//! event that was in fact billed already is found in the delivery ledger (or at the provider)
//! and settled without a second send. The one ledger entry a replay must remove is a provider's
//! earlier refusal: left in place, the service would dead-letter the replayed event again on the
//! ledger's word instead of asking the provider (whose data was just fixed).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::select::{event_id_in_payload, replay_headers, Filter, LetterInfo, SeenSources};
use crate::ack::deadletter::is_consumer_only;
use crate::ack::ledger::LedgerStore;
use crate::config::Config;
use crate::event::DeliveryKey;

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub filter: Filter,
    /// Produce here instead of each letter's `meterflow.source.topic`.
    pub to: Option<String>,
    /// List what would be replayed; produce nothing, change nothing.
    pub dry_run: bool,
    /// Give up when the dead-letter topic yields nothing for this long before its end.
    pub idle_timeout: Duration,
}

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    pub dead_letter_topic: String,
    pub scanned: u64,
    /// Selected letters by reason.
    pub selected: BTreeMap<String, u64>,
    /// Letters acknowledged by the broker on their target topic, by reason.
    pub replayed: BTreeMap<String, u64>,
    /// Provider refusals removed from the delivery ledger so the events are sent again.
    pub rejections_forgotten: u64,
    /// Letters skipped because an earlier letter in the topic has the same source topic,
    /// partition and offset (the same event, dead-lettered twice).
    pub second_copies: u64,
    /// One line per letter that was selected but not replayed, and one if reading stalled.
    pub failures: Vec<String>,
}

impl ReplayReport {
    pub fn selected_total(&self) -> u64 {
        self.selected.values().sum()
    }

    pub fn replayed_total(&self) -> u64 {
        self.replayed.values().sum()
    }
}

/// Why a replay could not run at all. Per-letter problems, and a stall part-way, are in
/// [`ReplayReport::failures`], so the summary still says what was replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot set up a Kafka client: {0}; check kafka.brokers and kafka.properties")]
    Client(KafkaError),
    #[error(
        "cannot read the dead-letter topic {topic:?} from kafka.brokers: {source}; check that the \
         brokers are reachable and meterflow may describe and read the topic"
    )]
    Unreachable { topic: String, source: KafkaError },
    #[error(
        "the dead-letter topic {0:?} (kafka.dead_letter_topic) does not exist on kafka.brokers; \
         check the name against the config the service runs with"
    )]
    TopicMissing(String),
    #[error(
        "no message from the dead-letter topic for {idle:?} while partitions {unfinished:?} were \
         not read to their end; check broker health, or raise --idle-timeout"
    )]
    Stalled {
        idle: Duration,
        unfinished: Vec<i32>,
    },
    #[error(
        "ledger.url: cannot open the delivery ledger to forget earlier provider refusals: {0}; run \
         the replay where the service's ledger is reachable, with the service's config"
    )]
    Ledger(String),
}

/// A selected letter, owned, ready to produce.
struct Selected {
    event_id: Option<String>,
    coordinates: String,
    reason: String,
    target: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    forget: Vec<String>,
}

/// Letters sent to the ledger and the producer together; bounds memory on large replays.
const CHUNK: usize = 500;
/// Metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Runs a replay; `line` receives one line per selected letter (what was or would be done).
pub async fn replay(
    config: &Config,
    options: &ReplayOptions,
    mut line: impl FnMut(&str),
) -> Result<ReplayReport, ReplayError> {
    let topic = config.kafka.dead_letter_topic.clone();
    let mut report = ReplayReport {
        dead_letter_topic: topic.clone(),
        ..ReplayReport::default()
    };
    let consumer = consumer(config)?;
    // The calls below block for at most METADATA_TIMEOUT each; nothing else runs meanwhile.
    let ends = partition_ends(&consumer, &topic)?;
    let mut unfinished: HashMap<i32, i64> = ends
        .iter()
        .filter(|(_, (start, end))| start < end)
        .map(|(p, (_, end))| (*p, *end))
        .collect();
    if unfinished.is_empty() {
        tracing::info!(topic, "nothing to read: the dead-letter topic is empty");
        return Ok(report);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, (start, end)) in &ends {
        if start < end {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(*start))
                .map_err(ReplayError::Client)?;
        }
    }
    consumer.assign(&tpl).map_err(ReplayError::Client)?;

    let producer = if options.dry_run {
        None
    } else {
        Some(producer(config)?)
    };
    let mut ledger: Option<LedgerStore> = None;
    let mut chunk: Vec<Selected> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut last_progress = Instant::now();
    let mut seen = SeenSources::default();

    while !unfinished.is_empty() {
        let wait = options.idle_timeout.saturating_sub(last_progress.elapsed());
        let message = match tokio::time::timeout(wait, consumer.recv()).await {
            Err(_) => {
                // Stop reading, but finish what was selected so far: the summary must say
                // what was replayed before the stall.
                let mut stalled: Vec<i32> = unfinished.keys().copied().collect();
                stalled.sort_unstable();
                let stall = ReplayError::Stalled {
                    idle: options.idle_timeout,
                    unfinished: stalled,
                };
                report.failures.push(format!(
                    "{stall}; the letters after that point were not read (run the same command \
                     again)"
                ));
                break;
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                unfinished.remove(&p);
                continue;
            }
            Ok(Err(e)) => {
                // Transient (a broker reconnecting): librdkafka retries; the idle timeout bounds it.
                tracing::warn!(error = %e, "reading the dead-letter topic");
                continue;
            }
            Ok(Ok(m)) => m.detach(),
        };
        last_progress = Instant::now();
        let partition = message.partition();
        let offset = message.offset();
        let Some(&end) = unfinished.get(&partition) else {
            continue; // a partition already read to its end at start
        };
        if offset + 1 >= end {
            unfinished.remove(&partition);
        }
        if offset >= end {
            continue; // written after the replay started (possibly by this replay's own events)
        }
        report.scanned += 1;
        let Some(selected) = select(config, options, &topic, &message, &mut seen, &mut report)
        else {
            continue;
        };
        line(&format!(
            "{} {} reason={} event_id={} to={}",
            if options.dry_run {
                "would replay"
            } else {
                "replaying"
            },
            selected.coordinates,
            selected.reason,
            selected.event_id.as_deref().unwrap_or("-"),
            selected.target,
        ));
        *report.selected.entry(selected.reason.clone()).or_default() += 1;
        if let Some(producer) = &producer {
            chunk.push(selected);
            if chunk.len() >= CHUNK {
                send_chunk(
                    config,
                    producer,
                    &mut ledger,
                    &mut chunk,
                    &mut in_flight,
                    &mut report,
                )
                .await?;
            }
            // Bound the letters held in memory while the broker acknowledges.
            while in_flight.len() > 4 * CHUNK {
                if let Some(result) = in_flight.next().await {
                    tally(result, &mut report);
                }
            }
        }
    }
    if let Some(producer) = &producer {
        send_chunk(
            config,
            producer,
            &mut ledger,
            &mut chunk,
            &mut in_flight,
            &mut report,
        )
        .await?;
    }
    while let Some(result) = in_flight.next().await {
        tally(result, &mut report);
    }
    Ok(report)
}

type Delivered = Result<String, String>;

fn tally(result: Delivered, report: &mut ReplayReport) {
    match result {
        Ok(reason) => *report.replayed.entry(reason).or_default() += 1,
        Err(failure) => report.failures.push(failure),
    }
}

/// Forgets the chunk's provider refusals in the ledger, then hands its letters to the producer.
async fn send_chunk(
    config: &Config,
    producer: &FutureProducer,
    ledger: &mut Option<LedgerStore>,
    chunk: &mut Vec<Selected>,
    in_flight: &mut FuturesUnordered<futures::future::BoxFuture<'static, Delivered>>,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let forget: Vec<String> = chunk.iter().flat_map(|s| s.forget.clone()).collect();
    let url = config.ledger.url.trim();
    if !forget.is_empty() && !url.is_empty() && url != "none" {
        let store = match ledger {
            Some(store) => store,
            None => ledger.insert(
                LedgerStore::connect(url)
                    .await
                    .map_err(|e| ReplayError::Ledger(e.to_string()))?,
            ),
        };
        report.rejections_forgotten += store
            .forget_rejections(&forget)
            .await
            .map_err(|e| ReplayError::Ledger(e.to_string()))?;
    }
    for s in chunk.drain(..) {
        let producer = producer.clone();
        in_flight.push(Box::pin(async move {
            let mut hs = OwnedHeaders::new_with_capacity(s.headers.len());
            for (k, v) in &s.headers {
                hs = hs.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&s.target)
                .payload(s.payload.as_slice())
                .headers(hs);
            if let Some(k) = &s.key {
                record = record.key(k.as_slice());
            }
            match producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => Ok(s.reason),
                Err((e, _)) => Err(format!(
                    "{}: producing to {:?} failed: {e}",
                    s.coordinates, s.target
                )),
            }
        }));
    }
    Ok(())
}

/// The letter as a [`Selected`], when the filter picks it; a letter picked but impossible to
/// replay is recorded as a failure.
fn select(
    config: &Config,
    options: &ReplayOptions,
    topic: &str,
    message: &OwnedMessage,
    seen: &mut SeenSources,
    report: &mut ReplayReport,
) -> Option<Selected> {
    let headers: Vec<(String, Vec<u8>)> = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    let mut info = LetterInfo::from_headers(&headers, message.timestamp().to_millis());
    if info.event_id.is_none() {
        // Letters refused before pricing carry no event id header; the payload may have one.
        info.event_id =
            event_id_in_payload(message.payload().unwrap_or_default(), &config.input.id);
    }
    let coordinates = format!("{topic}/{}/{}", message.partition(), message.offset());
    if seen.is_second_copy(&info) {
        report.second_copies += 1;
        tracing::info!(
            letter = coordinates,
            source_topic = info.source_topic.as_deref().unwrap_or(""),
            source_partition = info.source_partition.as_deref().unwrap_or(""),
            source_offset = info.source_offset.as_deref().unwrap_or(""),
            "skipping a second letter for a source offset already seen in this scan"
        );
        return None;
    }
    if !options.filter.selects(&info) {
        return None;
    }
    let reason = info.reason.clone().unwrap_or_else(|| "unknown".into());
    if let Some((size, sha256)) = &info.truncated {
        *report.selected.entry(reason.clone()).or_default() += 1;
        report.failures.push(format!(
            "{coordinates}: its payload was cut to fit the dead-letter topic (original {} bytes, \
             sha256 {}); produce the original again from {}/{}/{} while the source topic retains \
             it, or from the producer",
            size.as_deref().unwrap_or("?"),
            sha256.as_deref().unwrap_or("?"),
            info.source_topic.as_deref().unwrap_or("?"),
            info.source_partition.as_deref().unwrap_or("?"),
            info.source_offset.as_deref().unwrap_or("?"),
        ));
        return None;
    }
    let target = match (&options.to, &info.source_topic) {
        (Some(to), _) => to.clone(),
        (None, Some(source)) if config.kafka.topics.contains(source) => source.clone(),
        (None, Some(source)) => {
            *report.selected.entry(reason.clone()).or_default() += 1;
            report.failures.push(format!(
                "{coordinates}: its source topic {source:?} is not in kafka.topics, so the service \
                 would not read it back; pass --to TOPIC"
            ));
            return None;
        }
        (None, None) => {
            *report.selected.entry(reason.clone()).or_default() += 1;
            report.failures.push(format!(
                "{coordinates}: no meterflow.source.topic header; pass --to TOPIC"
            ));
            return None;
        }
    };
    // The refusal to forget: the key the refused delivery had, and the key a per-event
    // delivery of this event will have.
    let mut forget: Vec<String> = info.delivery_key.iter().cloned().collect();
    if let Some(id) = &info.event_id {
        forget.push(DeliveryKey::for_event(id).as_str().to_string());
    }
    Some(Selected {
        event_id: info.event_id.clone(),
        coordinates: coordinates.clone(),
        reason,
        target,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().unwrap_or_default().to_vec(),
        headers: replay_headers(&headers, &coordinates),
        forget,
    })
}

/// Per partition: the low watermark, where reading starts, and the high watermark now, where
/// the replay stops. Always from the beginning: seeking by time (`offsets_for_times`) would be
/// faster on a long topic, but a broker that answers it wrongly (librdkafka's mock cluster says
/// "end" for every time) would make the replay skip letters without a word.
fn partition_ends(
    consumer: &StreamConsumer,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, ReplayError> {
    let unreachable = |source| ReplayError::Unreachable {
        topic: topic.to_string(),
        source,
    };
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(unreachable)?;
    let partitions: Vec<i32> = match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => return Err(ReplayError::TopicMissing(topic.to_string())),
    };
    let mut ends = BTreeMap::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, METADATA_TIMEOUT)
            .map_err(unreachable)?;
        ends.insert(*p, (low, high));
    }
    Ok(ends)
}

fn consumer(config: &Config) -> Result<StreamConsumer, ReplayError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in &config.kafka.properties {
        c.set(k, v);
    }
    // After the pass-through properties: these make the scan a read-only, one-shot pass.
    c.set("group.id", "meterflow-dlq-replay")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    c.create().map_err(ReplayError::Client)
}

fn producer(config: &Config) -> Result<FutureProducer, ReplayError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    for (k, v) in &config.kafka.properties {
        if !is_consumer_only(k) {
            c.set(k, v);
        }
    }
    c.create().map_err(ReplayError::Client)
}
