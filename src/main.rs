// No panic reachable from input (see lib.rs).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

use clap::Parser;

use meterflow::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Demo(args) => runtime.block_on(meterflow::demo::run(args)),
        Command::Emulate(args) => runtime.block_on(meterflow::emulator::run(args)),
        Command::Dlq(args) => runtime.block_on(meterflow::dlq::run(args)),
        Command::Run { config } => runtime.block_on(meterflow::service::run(&config)),
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
