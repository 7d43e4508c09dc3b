//! The Kafka source: a consumer-group member on its own thread that reads messages in
//! per-partition order, tracks every read offset in the [`crate::ack::watermark`], pauses its
//! partitions when in-flight work reaches the budget, and drains revoked partitions before
//! giving them up.

mod gaps;
mod kafka;

pub use kafka::{KafkaSource, SourceHandle, SourceOptions};
