//! meterflow: Kafka usage events → billable metered usage at billwerk or Billingrails.
//!
//! The modules follow the data:
//! [`source`] (Kafka) → [`decode`] → [`pricing`] → [`batch`] → [`deliver`] (sink, rate limit,
//! retry) → [`ack`] (watermark, dead letters, ledger). [`pipeline`] wires them together.

pub mod ack;
pub mod admin;
pub mod batch;
pub mod cli;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod demo;
pub mod dlq;
pub mod emulator;
pub mod event;
pub mod pipeline;
pub mod pricing;
pub mod service;
pub mod signals;
pub mod source;
pub mod telemetry;
pub mod validate;
