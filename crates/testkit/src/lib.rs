//! meterflow's test kit, shared by the integration tests and the benchmarks: Kafka clusters
//! (librdkafka's mock cluster, a Tansu broker process), producing events, reading dead letters
//! back, `meterflow run` processes killed and restarted, waiting helpers, the emulators on fresh
//! ports, and configs pointing at an emulator (built with the product's
//! [`ConfigBuilder`](meterflow::config::builder::ConfigBuilder), re-exported here).
//!
//! Test equipment: it may panic on what a test cannot go on without (`unwrap`, `expect`).
//! Tests use it as `use meterflow_testkit as common;`.

mod configs;
mod emulators;
mod kafka;
mod metrics;
mod process;
mod tansu;
mod wait;

pub use configs::{billingrails_config, billwerk_config, enterprise_api_calls};
pub use emulators::{billingrails_emulator, billwerk_emulator};
pub use kafka::{
    committed_total, create_topics, mock_cluster, produce, producer, read_topic, ReadDeadLetter,
};
pub use meterflow::config::builder::{Bucket, ConfigBuilder, Override};
pub use metrics::{metric_value, metrics_handle};
pub use process::{kill_and_restart, Meterflow};
pub use tansu::{require_tansu, Tansu};
pub use wait::{stop_pipeline, wait_until};

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
