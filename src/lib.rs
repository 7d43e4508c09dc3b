//! meterflow: Kafka usage events → billable metered usage at billwerk or Billingrails.
//!
//! The modules follow the data:
//! [`source`] (Kafka) → [`decode`] → [`pricing`] → [`batch`] → [`deliver`] (sink, rate limit,
//! retry) → [`ack`] (watermark, dead letters, ledger). [`pipeline`] wires them together.

pub mod ack;
pub mod cli;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod emulator;
pub mod event;
pub mod pricing;
pub mod validate;
