//! The command line: `run`, `validate`, `demo`, `emulate`, `dlq replay`, `trace`, `void`, `audit`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "meterflow",
    version,
    about = "Kafka usage events → billable metered usage"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Run {
        #[arg(long, short, env = "METERFLOW_CONFIG")]
        config: PathBuf,
    },
    /// Check a config file and exit non-zero with one line per problem.
    Validate {
        #[arg(long, short, env = "METERFLOW_CONFIG")]
        config: PathBuf,
        /// Also check that the brokers and the provider answer.
        #[arg(long)]
        connect: bool,
    },
    /// The whole pipeline on embedded defaults: in-process Kafka, the billwerk emulator,
    /// generated events; ends with a reconciliation table.
    Demo(crate::demo::DemoArgs),
    /// Run a provider emulator.
    Emulate(crate::emulator::EmulateArgs),
    /// Work with the dead-letter topic: `dlq replay`.
    Dlq(crate::dlq::DlqArgs),
    /// One event's state from the ledger, or the events summed into a usage record
    /// (exit 0 found, 1 unknown, 2 error).
    Trace(crate::trace::TraceArgs),
    /// Delete an unbilled usage record meterflow delivered to billwerk, and record the void.
    Void(crate::void::VoidArgs),
    /// Set a contract's usage at billwerk over a period against the ledger (exit 1 when
    /// something is missing or billed twice).
    Audit(crate::audit::AuditArgs),
}
