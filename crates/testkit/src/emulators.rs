//! The provider emulators on a fresh loopback port.

use meterflow::emulator::billingrails::{self, BillingrailsEmulator, BillingrailsOptions};
use meterflow::emulator::billwerk::{self, BillwerkEmulator, BillwerkOptions};

/// A billwerk emulator on 127.0.0.1, port 0 (`base_url()` says which port).
pub async fn billwerk_emulator(options: BillwerkOptions) -> BillwerkEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    billwerk::start(options, listener)
        .await
        .expect("the billwerk emulator starts")
}

/// A Billingrails emulator on 127.0.0.1, port 0 (`base_url()` says which port; the API is under
/// `/v1`).
pub async fn billingrails_emulator(options: BillingrailsOptions) -> BillingrailsEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    billingrails::start(options, listener)
        .await
        .expect("the Billingrails emulator starts")
}
