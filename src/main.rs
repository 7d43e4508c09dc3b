use clap::Parser;

use meterflow::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Emulate(args) => runtime.block_on(meterflow::emulator::run(args)),
        Command::Validate { config, connect } => {
            let code = runtime.block_on(meterflow::validate::run(&config, connect));
            std::process::exit(code)
        }
        Command::Run { .. } => {
            anyhow::bail!("not yet implemented")
        }
    }
}
