//! SQL for the ledger, one dialect for SQLite and PostgreSQL through sqlx `Any`.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::mpsc;

use super::{from_ms, now_ms, Claim, LedgerError, Op};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS meterflow_deliveries (
        delivery_key TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        receipt TEXT,
        event_count BIGINT NOT NULL,
        first_sent_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS meterflow_deliveries_updated ON meterflow_deliveries (updated_at)",
    "CREATE TABLE IF NOT EXISTS meterflow_dead_letters (
        topic TEXT NOT NULL,
        source_partition BIGINT NOT NULL,
        source_offset BIGINT NOT NULL,
        written_at BIGINT NOT NULL,
        PRIMARY KEY (topic, source_partition, source_offset))",
    "CREATE INDEX IF NOT EXISTS meterflow_dead_letters_written ON meterflow_dead_letters (written_at)",
];

#[derive(Clone)]
pub struct LedgerStore {
    pool: AnyPool,
}

impl LedgerStore {
    /// `sqlite://PATH` (created if missing) or `postgres://...`.
    pub async fn connect(url: &str) -> Result<LedgerStore, LedgerError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains('?') && !url.contains(":memory:") {
            format!("{url}?mode=rwc")
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 4 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // FULL: a claim must survive power loss, or a re-send could double-bill.
                        conn.execute("PRAGMA journal_mode=WAL").await?;
                        conn.execute("PRAGMA synchronous=FULL").await?;
                        conn.execute("PRAGMA busy_timeout=10000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        for statement in SCHEMA {
            pool.execute(*statement).await?;
        }
        Ok(LedgerStore { pool })
    }

    /// Deletes settled entries older than `retention` (their offsets are long committed).
    pub async fn prune(&self, retention: Duration) -> Result<u64, LedgerError> {
        let cutoff = now_ms() - retention.as_millis() as i64;
        let a = sqlx::query("DELETE FROM meterflow_deliveries WHERE updated_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let b = sqlx::query("DELETE FROM meterflow_dead_letters WHERE written_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(a + b)
    }

    /// Forgets the provider's refusal of these keys, so that a replayed event is sent again
    /// instead of being dead-lettered on the ledger's word (`meterflow dlq replay`, after the
    /// cause was fixed). Only `rejected` rows go: a delivered or in-flight key stays, and with it
    /// the protection against billing twice.
    pub async fn forget_rejections(&self, keys: &[String]) -> Result<u64, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let mut forgotten = 0;
        for key in keys {
            forgotten += sqlx::query(
                "DELETE FROM meterflow_deliveries WHERE delivery_key = $1 AND state = 'rejected'",
            )
            .bind(key.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(forgotten)
    }

    /// Every delivery row, for tests and reports: (key, state, receipt).
    pub async fn deliveries(&self) -> Result<Vec<(String, String, Option<String>)>, LedgerError> {
        let rows = sqlx::query("SELECT delivery_key, state, receipt FROM meterflow_deliveries")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<Option<String>, _>(2)))
            .collect())
    }
}

/// The group-commit loop: takes every op waiting, runs them in one transaction, answers.
pub(super) async fn writer(store: LedgerStore, mut ops: mpsc::UnboundedReceiver<Op>) {
    let mut batch: Vec<Op> = Vec::with_capacity(512);
    while let Some(first) = ops.recv().await {
        batch.push(first);
        while batch.len() < 512 {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let result = apply(&store.pool, &mut batch, &mut replies).await;
        match result {
            Ok(()) => {
                for reply in replies {
                    reply.send_ok();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = replies.len(), "ledger write failed; callers retry");
                for reply in replies {
                    reply.send_err(&e);
                }
            }
        }
        batch.clear();
    }
}

/// An answer waiting for its transaction to commit.
enum Reply {
    Claim(
        tokio::sync::oneshot::Sender<Result<Claim, LedgerError>>,
        Claim,
    ),
    Touch(
        tokio::sync::oneshot::Sender<Result<Option<i64>, LedgerError>>,
        Option<i64>,
    ),
    Unit(tokio::sync::oneshot::Sender<Result<(), LedgerError>>),
    Bool(
        tokio::sync::oneshot::Sender<Result<bool, LedgerError>>,
        bool,
    ),
}

impl Reply {
    fn send_ok(self) {
        match self {
            Reply::Claim(tx, c) => drop(tx.send(Ok(c))),
            Reply::Touch(tx, t) => drop(tx.send(Ok(t))),
            Reply::Unit(tx) => drop(tx.send(Ok(()))),
            Reply::Bool(tx, b) => drop(tx.send(Ok(b))),
        }
    }

    fn send_err(self, e: &sqlx::Error) {
        let err = || LedgerError::Database(sqlx::Error::Protocol(e.to_string()));
        match self {
            Reply::Claim(tx, _) => drop(tx.send(Err(err()))),
            Reply::Touch(tx, _) => drop(tx.send(Err(err()))),
            Reply::Unit(tx) => drop(tx.send(Err(err()))),
            Reply::Bool(tx, _) => drop(tx.send(Err(err()))),
        }
    }
}

async fn apply(
    pool: &AnyPool,
    batch: &mut Vec<Op>,
    replies: &mut Vec<Reply>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let now = now_ms();
    for op in batch.drain(..) {
        match op {
            Op::Claim { key, events, reply } => {
                let inserted = sqlx::query(
                    "INSERT INTO meterflow_deliveries
                        (delivery_key, state, receipt, event_count, first_sent_at, updated_at)
                     VALUES ($1, 'sending', NULL, $2, $3, $3)
                     ON CONFLICT (delivery_key) DO NOTHING",
                )
                .bind(key.as_str())
                .bind(events as i64)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let claim = if inserted == 1 {
                    Claim::Claimed { updated_at_ms: now }
                } else {
                    let row: AnyRow = sqlx::query(
                        "SELECT state, receipt, first_sent_at, updated_at
                         FROM meterflow_deliveries WHERE delivery_key = $1",
                    )
                    .bind(key.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                    let state: String = row.get(0);
                    let receipt: Option<String> = row.get(1);
                    match state.as_str() {
                        "delivered" => Claim::Delivered {
                            receipt: receipt.unwrap_or_default(),
                        },
                        "rejected" => Claim::Rejected {
                            answer: receipt.unwrap_or_default(),
                        },
                        _ => Claim::Sending {
                            first_sent_at: from_ms(row.get(2)),
                            updated_at_ms: row.get(3),
                        },
                    }
                };
                replies.push(Reply::Claim(reply, claim));
            }
            Op::Touch {
                key,
                expected_updated_at_ms,
                reply,
            } => {
                // Strictly later than what it replaces, so two touches in one millisecond
                // still tell apart.
                let next = now.max(expected_updated_at_ms + 1);
                let moved = sqlx::query(
                    "UPDATE meterflow_deliveries SET updated_at = $1
                     WHERE delivery_key = $2 AND state = 'sending' AND updated_at = $3",
                )
                .bind(next)
                .bind(key.as_str())
                .bind(expected_updated_at_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                replies.push(Reply::Touch(reply, (moved == 1).then_some(next)));
            }
            Op::Finish {
                key,
                delivered,
                receipt,
            } => {
                sqlx::query(
                    "UPDATE meterflow_deliveries SET state = $1, receipt = $2, updated_at = $3
                     WHERE delivery_key = $4",
                )
                .bind(if delivered { "delivered" } else { "rejected" })
                .bind(receipt)
                .bind(now)
                .bind(key.as_str())
                .execute(&mut *tx)
                .await?;
            }
            Op::DeadLettered { source, reply } => {
                sqlx::query(
                    "INSERT INTO meterflow_dead_letters (topic, source_partition, source_offset, written_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(source.topic.as_str())
                .bind(i64::from(source.partition))
                .bind(source.offset)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                replies.push(Reply::Unit(reply));
            }
            Op::IsDeadLettered { source, reply } => {
                let found = sqlx::query(
                    "SELECT 1 FROM meterflow_dead_letters
                     WHERE topic = $1 AND source_partition = $2 AND source_offset = $3",
                )
                .bind(source.topic.as_str())
                .bind(i64::from(source.partition))
                .bind(source.offset)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
                replies.push(Reply::Bool(reply, found));
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use crate::event::{DeliveryKey, SourceRef};

    async fn sqlite() -> (Ledger, LedgerStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let store = LedgerStore::connect(&url).await.unwrap();
        (
            Ledger::start(store.clone(), Duration::from_secs(0)),
            store,
            dir,
        )
    }

    #[tokio::test]
    async fn claim_then_deliver_then_claim_again_is_delivered() {
        let (ledger, store, _dir) = sqlite().await;
        let k = DeliveryKey::for_event("evt_1");
        assert!(matches!(
            ledger.claim(&k, 1).await.unwrap(),
            Claim::Claimed { .. }
        ));
        match ledger.claim(&k, 1).await.unwrap() {
            Claim::Sending { .. } => {}
            other => panic!("a second claim must see the first: {other:?}"),
        }
        ledger.finish(&k, true, "usage-1".into());
        assert_eq!(
            ledger.claim(&k, 1).await.unwrap(),
            Claim::Delivered {
                receipt: "usage-1".into()
            }
        );
        assert_eq!(store.deliveries().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn forgetting_rejections_leaves_delivered_and_sending_keys_alone() {
        let (ledger, store, _dir) = sqlite().await;
        let rejected = DeliveryKey::for_event("evt_rejected");
        let delivered = DeliveryKey::for_event("evt_delivered");
        let sending = DeliveryKey::for_event("evt_sending");
        for k in [&rejected, &delivered, &sending] {
            ledger.claim(k, 1).await.unwrap();
        }
        ledger.finish(&rejected, false, "422 no such component".into());
        ledger.finish(&delivered, true, "usage-1".into());
        // `finish` is not awaited: a claim behind it in the queue sees its effect.
        assert!(matches!(
            ledger.claim(&rejected, 1).await.unwrap(),
            Claim::Rejected { .. }
        ));
        let keys: Vec<String> = [&rejected, &delivered, &sending]
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        assert_eq!(store.forget_rejections(&keys).await.unwrap(), 1);
        assert!(matches!(
            ledger.claim(&rejected, 1).await.unwrap(),
            Claim::Claimed { .. }
        ));
        assert!(matches!(
            ledger.claim(&delivered, 1).await.unwrap(),
            Claim::Delivered { .. }
        ));
        assert!(matches!(
            ledger.claim(&sending, 1).await.unwrap(),
            Claim::Sending { .. }
        ));
    }

    #[tokio::test]
    async fn touch_is_compare_and_set() {
        let (ledger, _store, _dir) = sqlite().await;
        let k = DeliveryKey::for_event("evt_2");
        ledger.claim(&k, 1).await.unwrap();
        let Claim::Sending { updated_at_ms, .. } = ledger.claim(&k, 1).await.unwrap() else {
            panic!()
        };
        let next = ledger
            .touch(&k, updated_at_ms)
            .await
            .unwrap()
            .expect("first touch wins");
        assert!(next > updated_at_ms);
        assert_eq!(
            ledger.touch(&k, updated_at_ms).await.unwrap(),
            None,
            "stale touch loses"
        );
    }

    #[tokio::test]
    async fn dead_letters_are_remembered_by_source_coordinates() {
        let (ledger, _store, _dir) = sqlite().await;
        let s = SourceRef {
            topic: "usage".into(),
            partition: 3,
            offset: 42,
        };
        assert!(!ledger.is_dead_lettered(&s).await.unwrap());
        ledger.dead_lettered(&s).await.unwrap();
        ledger.dead_lettered(&s).await.unwrap();
        assert!(ledger.is_dead_lettered(&s).await.unwrap());
    }

    #[tokio::test]
    async fn survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("l.db").display());
        let k = DeliveryKey::for_event("evt_3");
        {
            let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
            ledger.claim(&k, 1).await.unwrap();
            ledger.finish(&k, true, "u".into());
            // A claim after the finish is answered after the finish committed.
            ledger.claim(&k, 1).await.unwrap();
        }
        let ledger = Ledger::open(&url, Duration::ZERO).await.unwrap();
        assert_eq!(
            ledger.claim(&k, 1).await.unwrap(),
            Claim::Delivered {
                receipt: "u".into()
            }
        );
    }

    /// PostgreSQL runs on this machine and in CI (127.0.0.1:5432, database `test`).
    #[tokio::test]
    async fn postgres_store_behaves_the_same() {
        let url = std::env::var("METERFLOW_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let store = match LedgerStore::connect(&url).await {
            Ok(s) => s,
            Err(e) if std::env::var("CI").is_err() => {
                eprintln!("skipping: PostgreSQL not reachable at {url}: {e}");
                return;
            }
            Err(e) => panic!("PostgreSQL must be reachable in CI: {e}"),
        };
        let ledger = Ledger::start(store, Duration::from_secs(30));
        let k = DeliveryKey::for_event(&format!("pg-{}", uuid_like()));
        assert!(matches!(
            ledger.claim(&k, 1).await.unwrap(),
            Claim::Claimed { .. }
        ));
        let Claim::Sending { updated_at_ms, .. } = ledger.claim(&k, 1).await.unwrap() else {
            panic!()
        };
        assert!(ledger.touch(&k, updated_at_ms).await.unwrap().is_some());
        ledger.finish(&k, true, "r".into());
        assert_eq!(
            ledger.claim(&k, 1).await.unwrap(),
            Claim::Delivered {
                receipt: "r".into()
            }
        );
    }

    fn uuid_like() -> String {
        format!("{:x}{:x}", rand::random::<u64>(), rand::random::<u64>())
    }
}
