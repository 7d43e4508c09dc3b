//! `meterflow emulate billwerk|billingrails`: provider emulators faithful to the documented APIs,
//! with rate limits and fault injection, for tests, the demo, benchmarks and users' staging.
//!
//! Its own crate: test equipment, which meterflow's delivery code never depends on (the
//! `meterflow` crate re-exports it as `meterflow::emulator` for its subcommand, the demo and
//! the tests).
//!
//! In-process use (tests, demo, benchmarks):
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use meterflow_emulator::billwerk::{self, BillwerkOptions};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let emulator = billwerk::start(BillwerkOptions::default(), listener).await?;
//! let base_url = emulator.base_url(); // point the sink here
//! // ... run the client ...
//! assert_eq!(emulator.stats().duplicate_keys, 0);
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Layout: [`billwerk`] and [`billingrails`] hold each provider's endpoints; what they share is
//! here: the [`ratelimit`], the [`faults`], the counters ([`stats`]), the `/_emulator` inspection
//! API (`inspect`), the server that can drop a connection without answering (`server`), and the
//! in-process handle ([`EmulatorHandle`]).

// Its `expect`s concern its own locks and serializations, never request input, which is parsed
// into 4xx answers.
#![deny(
    clippy::panic,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]
#![cfg_attr(test, allow(clippy::panic, clippy::unreachable))]

mod args;
pub mod billingrails;
pub mod billwerk;
mod control;
mod error;
pub mod faults;
mod handle;
mod inspect;
pub mod ratelimit;
mod secret;
mod server;
pub mod stats;

pub use self::args::{
    BillingrailsArgs, BillwerkArgs, EmulateArgs, EmulatedProviderArgs, FaultArgs, RateLimitArgs,
};
pub use self::error::EmulatorError;
pub use self::faults::FaultSettings;
pub use self::handle::{EmulatedProvider, EmulatorHandle, LimitStatus};
pub use self::ratelimit::RateLimitSettings;
pub use self::secret::Secret;
pub use self::stats::EmulatorStats;

use anyhow::Context;
use tokio::net::TcpListener;

/// Runs the emulator the command line asked for until `shutdown` resolves (`meterflow
/// emulate`: Ctrl-C or SIGTERM).
pub async fn run(
    args: EmulateArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    match args.provider {
        EmulatedProviderArgs::Billwerk(args) => {
            let (options, credential_notes) = args.options()?;
            let description = billwerk::describe(&options);
            let listener = bind(&args.listen).await?;
            let emulator = billwerk::start(options, listener).await?;
            announce("billwerk", &emulator, &credential_notes, &description);
            shutdown.await;
            emulator.shutdown().await;
        }
        EmulatedProviderArgs::Billingrails(args) => {
            let (options, credential_notes) = args.options()?;
            let description = billingrails::describe(&options);
            let listener = bind(&args.listen).await?;
            let emulator = billingrails::start(options, listener).await?;
            announce("Billingrails", &emulator, &credential_notes, &description);
            shutdown.await;
            emulator.shutdown().await;
        }
    }
    eprintln!("emulator stopped");
    Ok(())
}

async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}: cannot listen there"))
}

fn announce<P: EmulatedProvider>(
    provider: &str,
    emulator: &EmulatorHandle<P>,
    credential_notes: &[String],
    description: &str,
) {
    let limit = emulator.limit().settings;
    let faults = emulator.faults();
    eprintln!("{provider} emulator listening on {}", emulator.base_url());
    for note in credential_notes {
        eprintln!("  {note}");
    }
    eprintln!("  {description}");
    if limit.is_unlimited() {
        eprintln!("  rate limit: none");
    } else {
        eprintln!(
            "  rate limit: {} per {} (headers: {}, Retry-After: {}, X-RateLimit-Reset: {})",
            limit.limit,
            humantime::format_duration(limit.window),
            limit.headers,
            limit.retry_after,
            limit.reset_header
        );
    }
    if faults != FaultSettings::default() {
        eprintln!(
            "  faults: fail {} · drop {} · slow {} ({}) · latency {} for {}",
            faults.fail_rate,
            faults.drop_rate,
            faults.slow_rate,
            humantime::format_duration(faults.slow_duration),
            humantime::format_duration(faults.latency),
            faults.latency_rate
        );
    }
    eprintln!(
        "  inspection (test-only, no auth): {}/_emulator/stats, /_emulator/records, /_emulator/limit, /_emulator/faults, /_emulator/reset",
        emulator.base_url()
    );
}
