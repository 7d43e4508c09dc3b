//! Opening the service's ledger from `[ledger]`, with its lease and its pruner.

use std::time::Duration;

use super::{Ledger, LedgerStore};
use crate::config::Config;

/// How long a replica leaves another's "sending" claim alone: no time on SQLite (one replica,
/// so a "sending" entry can only be a dead process's), one request timeout plus a margin on
/// PostgreSQL.
pub fn lease_for(config: &Config) -> Duration {
    if config.ledger.url.trim().starts_with("sqlite:") {
        Duration::ZERO
    } else {
        config.sink.request_timeout + Duration::from_secs(5)
    }
}

/// `[ledger] url`: SQLite (single replica: no lease needed, a "sending" entry can only be a
/// dead process's), PostgreSQL (several replicas: leave another owner's claim alone for one
/// request timeout plus a margin), or `none`.
pub async fn open_for(config: &Config) -> anyhow::Result<Option<Ledger>> {
    let url = config.ledger.url.trim();
    if url.is_empty() || url == "none" {
        tracing::warn!("delivery ledger disabled: a crash after a delivery may bill it twice");
        return Ok(None);
    }
    let lease = lease_for(config);
    let store = LedgerStore::connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("ledger.url: cannot open the delivery ledger: {e}"))?;
    // Pruned hourly, never past what the group has committed (`ack/retention.rs`).
    crate::ack::retention::spawn_pruner(
        store.clone(),
        config.ledger.retention,
        crate::ack::retention::KafkaGroupOffsets::new(&config.kafka)?,
        Duration::from_secs(3600),
    );
    Ok(Some(Ledger::start(store, lease)))
}
