//! What the dead-letter writer relies on from the broker (issue 16, candidate "the producer's
//! own retries across a broker restart"): Tansu 0.6 with SQLite storage keeps one copy of each
//! message an idempotent producer sends, when the broker is killed (SIGKILL) with requests in
//! flight and started again. Tansu checks the producer's sequence numbers in its storage and
//! answers a retried batch with DUPLICATE_SEQUENCE_NUMBER, which librdkafka takes as delivered.

use meterflow_testkit as common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_keeps_one_copy_across_broker_kills() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = common::require_tansu(dir.path()) else {
        return;
    };
    let brokers = broker.brokers();
    common::create_topics(&brokers, &[("t", 1)]).await;
    // The dead-letter writer's settings.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let n = 10_000;
    let mut pending = Vec::new();
    let mut kills = 0;
    for i in 0..n {
        let payload = format!("m{i}");
        loop {
            match producer.send_result(FutureRecord::<(), _>::to("t").payload(&payload)) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        if i % 2000 == 1999 {
            // A burst is on the wire: kill the broker under it, start it again.
            tokio::time::sleep(Duration::from_millis(3 * (kills + 1))).await;
            broker.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            broker.restart();
            kills += 1;
        }
    }
    let mut errors: HashMap<String, usize> = HashMap::new();
    for delivery in pending {
        if let Err((e, _)) = delivery.await.unwrap() {
            *errors.entry(e.to_string()).or_default() += 1;
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks("t", 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("t", 0, rdkafka::Offset::Offset(low))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while read < high - low && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            read += 1;
            *copies
                .entry(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
                .or_default() += 1;
        }
    }
    let duplicates: usize = copies.values().map(|c| c - 1).sum();
    let missing = (0..n)
        .filter(|i| !copies.contains_key(&format!("m{i}")))
        .count();
    println!(
        "idempotent producer, {kills} broker kills: {n} sent, {read} in the topic, duplicates \
         {duplicates}, missing {missing}, delivery errors {errors:?}"
    );
    assert_eq!(errors, HashMap::new(), "every send acknowledged");
    assert_eq!((duplicates, missing), (0, 0), "one copy of each");
}
