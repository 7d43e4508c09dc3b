//! meterflow: Kafka usage events → billable metered usage at billwerk or Billingrails.
//!
//! The modules follow the data:
//! [`source`] (Kafka) → [`decode`] → [`pricing`] → [`batch`] → [`deliver`] (sink, rate limit,
//! retry) → [`ack`] (watermark, dead letters, ledger). [`pipeline`] wires them together.
//!
//! No panic reachable from data: outside tests, `unwrap`, `expect`, `panic!` and friends are
//! denied; the pure core (decode, batch, the pacer, the watermark) also denies unchecked
//! arithmetic and indexing. The few justified exceptions say why where they are allowed.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable
    )
)]

pub mod ack;
pub mod admin;
pub mod audit;
pub mod batch;
pub mod cli;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod demo;
pub mod dlq;
/// The provider emulators (crate `meterflow-emulator`, test equipment): for `meterflow
/// emulate`, the demo and the tests. The delivery code does not use it.
pub use meterflow_emulator as emulator;
pub mod event;
/// Fuzz targets over arbitrary bytes (run as tests; see the module).
#[doc(hidden)]
pub mod fuzz;
pub mod load;
pub mod pipeline;
pub mod pricing;
pub mod service;
pub mod signals;
pub mod source;
pub mod sync;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod text;
pub mod trace;
pub mod validate;
pub mod void;
