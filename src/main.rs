// No panic reachable from input (see lib.rs).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

use clap::Parser;

use meterflow::cli::{Cli, Command};
use meterflow::signals::ShutdownSignals;

/// jemalloc rather than glibc's malloc: each event allocates its decoded fields, its request
/// and its ledger rows, often on one thread and freed on another. On the peer benchmark glibc's
/// malloc and free were about a tenth of the pipeline's CPU; jemalloc cut P1's CPU per event
/// by about 45 % without a ledger and 23 % with SQLite, at about the same peak RSS (mimalloc
/// saved less and held 10–30 MiB more; docs/benchmarks.md, "Ninth run").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Before anything else: a SIGTERM during start-up (config, broker, ledger) must drain and
    // exit 0, not take the default action and kill the process. Only for the commands that
    // drain; the others keep the default action (Ctrl-C stops them at once).
    let signals = || {
        let _context = runtime.enter();
        ShutdownSignals::install()
    };
    let result = match cli.command {
        Command::Run { config } => {
            let signals = signals();
            runtime.block_on(meterflow::service::run(&config, signals))
        }
        Command::Emulate(args) => {
            let signals = signals();
            runtime.block_on(meterflow::emulator::run(args, signals.recv()))
        }
        Command::Demo(args) => runtime.block_on(meterflow::demo::run(args)),
        Command::Dlq(args) => runtime.block_on(meterflow::dlq::run(args)),
        Command::Trace(args) => {
            return ExitCode::from(runtime.block_on(meterflow::trace::run(args)))
        }
        Command::Audit(args) => {
            return ExitCode::from(runtime.block_on(meterflow::audit::run(args)))
        }
        Command::Void(args) => return ExitCode::from(runtime.block_on(meterflow::void::run(args))),
        Command::Validate { config, connect } => {
            let code = runtime.block_on(meterflow::validate::run(&config, connect));
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
