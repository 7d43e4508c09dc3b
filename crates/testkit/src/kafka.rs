//! Kafka from the tests' side: producing events, reading a topic (the dead letters) back,
//! committed offsets, topics on a real broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// librdkafka's in-process mock cluster (one broker) with `topics` (name, partitions) created,
/// and its bootstrap servers. Drop clients before the cluster.
pub fn mock_cluster(
    topics: &[(&str, i32)],
) -> (MockCluster<'static, DefaultProducerContext>, String) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for (topic, partitions) in topics {
        cluster
            .create_topic(topic, *partitions, 1)
            .expect("mock topic");
    }
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

/// A dead letter as read back from the topic.
#[derive(Debug, Clone)]
pub struct ReadDeadLetter {
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl ReadDeadLetter {
    pub fn reason(&self) -> &str {
        self.headers
            .get("meterflow.reason")
            .map(String::as_str)
            .unwrap_or("")
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Produces payloads round-robin over `partitions`, waiting for each acknowledgement batch.
pub async fn produce(brokers: &str, topic: &str, partitions: i32, payloads: &[Vec<u8>]) {
    let p = producer(brokers);
    let keys: Vec<String> = (0..payloads.len()).map(|i| format!("k{i}")).collect();
    // `send_result` enqueues at once; `send` only when its future is polled, so awaiting sends
    // one after another costs a linger wait per message.
    for (c, (chunk, keys)) in payloads.chunks(5000).zip(keys.chunks(5000)).enumerate() {
        let mut pending = Vec::with_capacity(chunk.len());
        for (i, (payload, key)) in chunk.iter().zip(keys).enumerate() {
            let record = FutureRecord::to(topic)
                .payload(payload)
                .key(key)
                .partition(((c * 5000 + i) % partitions as usize) as i32);
            match p.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => panic!("cannot enqueue: {e}"),
            }
        }
        for f in pending {
            f.await
                .expect("delivery reported")
                .expect("produce acknowledged");
        }
    }
}

/// Reads every message of `topic` from the beginning until `expected` are read or `timeout`.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<ReadDeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(hs) = m.headers() {
                for h in hs.iter() {
                    headers.insert(
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(ReadDeadLetter {
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Committed offsets of `group` on `topic`, summed over partitions.
pub fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(0).max(0))
        .sum()
}

/// Creates topics on a real broker through the admin API.
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("create topic {t}: {e}");
            }
        }
    }
}
