//! `meterflow emulate billwerk|billingrails`: provider emulators faithful to the documented APIs,
//! with rate limits and fault injection, for tests, the demo, benchmarks and users' staging.

/// `meterflow emulate ...` arguments.
#[derive(Debug, clap::Args)]
pub struct EmulateArgs {}

pub async fn run(args: EmulateArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!("emulator")
}
