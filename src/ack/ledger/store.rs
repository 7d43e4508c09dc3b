//! SQL for the ledger, one dialect for SQLite and PostgreSQL through sqlx `Any` (on SQLite, a
//! statement's `$1, $2, ...` are sent as `?`: [`for_backend`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Executor, Row};
use tokio::sync::mpsc;

use super::dead_letters::{self, DeadLetterClaim};
use super::{
    from_ms, AggregateClaim, Checked, Claim, EarlierAggregate, LedgerClock, LedgerError, Op,
};
use crate::event::DeliveryKey;

mod digests;
mod group;
use group::{record_origins, Group};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS meterflow_deliveries (
        delivery_key TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        receipt TEXT,
        event_count BIGINT NOT NULL,
        first_sent_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS meterflow_deliveries_updated ON meterflow_deliveries (updated_at)",
    // `meterflow trace --usage-id` and `meterflow void --usage-id` find a delivery by record id.
    "CREATE INDEX IF NOT EXISTS meterflow_deliveries_receipt ON meterflow_deliveries (receipt)",
    "CREATE TABLE IF NOT EXISTS meterflow_dead_letters (
        topic TEXT NOT NULL,
        source_partition BIGINT NOT NULL,
        source_offset BIGINT NOT NULL,
        written_at BIGINT NOT NULL,
        PRIMARY KEY (topic, source_partition, source_offset))",
    "CREATE INDEX IF NOT EXISTS meterflow_dead_letters_written ON meterflow_dead_letters (written_at)",
    // Which aggregate each event was sent in (pre-aggregation): an event belongs to at most one
    // live aggregate, whatever batches look like after a restart.
    "CREATE TABLE IF NOT EXISTS meterflow_event_deliveries (
        event_key TEXT PRIMARY KEY,
        delivery_key TEXT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS meterflow_event_deliveries_delivery ON meterflow_event_deliveries (delivery_key)",
    "CREATE INDEX IF NOT EXISTS meterflow_event_deliveries_updated ON meterflow_event_deliveries (updated_at)",
    // What each event id carried when first claimed, as earlier builds kept it: their rows are
    // still checked until retention prunes them (`store::digests`). New claims keep the digest
    // in the origin row; earlier builds running beside this one (a rolling upgrade) still
    // write here.
    "CREATE TABLE IF NOT EXISTS meterflow_event_contents (
        event_key TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS meterflow_event_contents_updated ON meterflow_event_contents (updated_at)",
    // Each event's id, source coordinates, contract reference and claimant, written with its
    // claim: the ledger's other tables know events only by digests of their ids, which
    // `meterflow trace --usage-id` cannot turn back into ids, nor `meterflow void` into a contract.
    // Its `digest` (an added column) is what the id keeps: a second, different event reusing
    // the id is dead-lettered (`id_conflict`) instead of being settled as "already delivered".
    "CREATE TABLE IF NOT EXISTS meterflow_event_origins (
        event_id TEXT PRIMARY KEY,
        delivery_key TEXT NOT NULL,
        topic TEXT NOT NULL,
        source_partition BIGINT NOT NULL,
        source_offset BIGINT NOT NULL,
        customer TEXT NOT NULL,
        component_id TEXT NOT NULL,
        quantity TEXT NOT NULL,
        claimed_by TEXT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS meterflow_event_origins_delivery ON meterflow_event_origins (delivery_key)",
    "CREATE INDEX IF NOT EXISTS meterflow_event_origins_updated ON meterflow_event_origins (updated_at)",
    // `meterflow void`: which usage record was deleted at the provider, and whether the events
    // may be billed again (`rebill` 1: the delivery's entry was removed too).
    "CREATE TABLE IF NOT EXISTS meterflow_voids (
        delivery_key TEXT NOT NULL,
        usage_id TEXT NOT NULL,
        contract_id TEXT NOT NULL,
        event_count BIGINT NOT NULL,
        rebill BIGINT NOT NULL,
        voided_at BIGINT NOT NULL,
        PRIMARY KEY (delivery_key, usage_id))",
];

/// Columns added to tables of an earlier release: (table, column, SQL type). Added where
/// missing, so an existing ledger is migrated in place; rows from before read them as NULL.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // When the delivery was accepted (`updated_at` moves on with later writes).
    ("meterflow_deliveries", "delivered_at", "BIGINT"),
    // What `meterflow trace` shows of a dead letter.
    ("meterflow_dead_letters", "event_id", "TEXT"),
    ("meterflow_dead_letters", "reason", "TEXT"),
    ("meterflow_dead_letters", "detail", "TEXT"),
    ("meterflow_dead_letters", "dlq_partition", "BIGINT"),
    ("meterflow_dead_letters", "dlq_offset", "BIGINT"),
    // The content digest an event id keeps (earlier builds kept it in `meterflow_event_contents`).
    ("meterflow_event_origins", "digest", "TEXT"),
];

/// Statements that need the added columns.
const AFTER_COLUMNS: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS meterflow_dead_letters_event ON meterflow_dead_letters (event_id)",
];

/// Rows per statement when a claim names many events (3 parameters a row; SQLite allows 32766).
const CHUNK: usize = 300;

#[derive(Clone)]
pub struct LedgerStore {
    pub(super) pool: AnyPool,
    /// What a SQLite ledger stamps leases with (PostgreSQL uses the database's clock).
    pub(super) clock: LedgerClock,
    pub(super) sqlite: bool,
    /// Whether `meterflow_event_contents` (where earlier builds kept digests) held rows at
    /// start-up or at the last prune: while it does, every claim's ids are looked up there too.
    pub(super) legacy_contents: Arc<AtomicBool>,
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
        let pool = pool_options(sqlite, if sqlite { 1 } else { 4 })
            .connect(&url)
            .await?;
        set_up_schema(&pool, sqlite).await?;
        let store = LedgerStore {
            pool,
            clock: LedgerClock::Wall,
            sqlite,
            legacy_contents: Arc::new(AtomicBool::new(true)),
        };
        store.check_legacy_contents().await?;
        Ok(store)
    }

    /// For the writer of a PostgreSQL ledger on a thread of its own: a pool of one connection,
    /// opened by that thread's runtime when first used (a connection belongs to the runtime
    /// that opened it). A SQLite store is shared as it is: one connection, and `:memory:`
    /// databases are per connection.
    pub(super) fn for_writer_thread(&self) -> LedgerStore {
        if self.sqlite {
            return self.clone();
        }
        let options = (*self.pool.connect_options()).clone();
        LedgerStore {
            pool: pool_options(false, 1).connect_lazy_with(options),
            clock: self.clock,
            sqlite: false,
            legacy_contents: self.legacy_contents.clone(),
        }
    }

    /// Looks again whether the table of digests of earlier builds holds any row.
    async fn check_legacy_contents(&self) -> Result<(), sqlx::Error> {
        let any = sqlx::query("SELECT 1 FROM meterflow_event_contents LIMIT 1")
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        self.legacy_contents.store(any, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn legacy(&self) -> bool {
        self.legacy_contents.load(Ordering::Relaxed)
    }

    /// Stamps leases with `clock` (SQLite; see [`LedgerClock`]).
    pub fn with_clock(mut self, clock: LedgerClock) -> LedgerStore {
        self.clock = clock;
        self
    }

    /// [`LedgerStore::connect`] for the commands that read a service's ledger (`meterflow
    /// trace`, `void`, `audit`): a missing SQLite file is an error rather than a new, empty
    /// ledger that would answer "unknown" to everything.
    pub async fn connect_existing(url: &str) -> Result<LedgerStore, String> {
        let shown = crate::config::redact_url(url);
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or(path);
            if !path.contains(":memory:") && !std::path::Path::new(path).exists() {
                return Err(format!(
                    "ledger.url {shown}: no ledger at {path:?} (is this the service's config, \
                     run from the service's working directory?)"
                ));
            }
        }
        LedgerStore::connect(url)
            .await
            .map_err(|e| format!("ledger.url {shown}: cannot open the delivery ledger: {e}"))
    }

    /// Deletes entries last updated before `cutoff` (ms since the epoch). Age alone does not
    /// make an entry safe to delete: `crate::ack::retention` decides the cutoff.
    pub async fn prune_before(&self, cutoff: i64) -> Result<u64, LedgerError> {
        // (table, its time column). Dead-letter intents: one is deleted when its letter is
        // recorded, and one left by a crash is resolved by the look-up when its event is read
        // again; one older than the cutoff belongs to an offset the committed offsets have
        // passed, which nothing reads again.
        const PRUNED: &[(&str, &str)] = &[
            ("meterflow_deliveries", "updated_at"),
            ("meterflow_dead_letters", "written_at"),
            ("meterflow_event_deliveries", "updated_at"),
            ("meterflow_event_contents", "updated_at"),
            ("meterflow_dead_letter_intents", "updated_at"),
            ("meterflow_event_origins", "updated_at"),
        ];
        let mut pruned = 0;
        for (table, stamp) in PRUNED {
            pruned += sqlx::query(&format!("DELETE FROM {table} WHERE {stamp} < $1"))
                .bind(cutoff)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        self.check_legacy_contents().await?;
        Ok(pruned)
    }

    /// The aggregate each event key is mapped to, for tests and reports.
    pub async fn event_deliveries(&self) -> Result<Vec<(String, String)>, LedgerError> {
        let rows = sqlx::query("SELECT event_key, delivery_key FROM meterflow_event_deliveries")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Forgets the provider's refusal of these keys, so that a replayed event is sent again
    /// instead of being dead-lettered on the ledger's word (`meterflow dlq replay`, after the
    /// cause was fixed). Only `rejected` rows go: a delivered or in-flight key stays, and with it
    /// the protection against billing twice.
    ///
    /// A per-event key also forgets the refused aggregate that event is mapped to. A letter
    /// names the key of the delivery that dead-lettered it, and that is not always the
    /// aggregate that was refused: an event read again (a producer's re-send, a restart before
    /// the commit) and settled through the earlier, refused aggregate carries its new key. The
    /// refused aggregate's mappings go with it, so its other events are free again too.
    pub async fn forget_rejections(&self, keys: &[String]) -> Result<u64, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let mut forgotten = 0;
        for key in keys {
            let refused_aggregates: Vec<String> = sqlx::query(
                "SELECT m.delivery_key FROM meterflow_event_deliveries m
                 JOIN meterflow_deliveries d ON d.delivery_key = m.delivery_key
                 WHERE m.event_key = $1 AND d.state = 'rejected'",
            )
            .bind(key.as_str())
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
            for delivery in refused_aggregates.iter().chain(std::iter::once(key)) {
                let gone = sqlx::query(
                    "DELETE FROM meterflow_deliveries WHERE delivery_key = $1 AND state = 'rejected'",
                )
                .bind(delivery.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if gone > 0 {
                    sqlx::query("DELETE FROM meterflow_event_deliveries WHERE delivery_key = $1")
                        .bind(delivery.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                forgotten += gone;
            }
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

/// How ledger connections are opened and pooled.
fn pool_options(sqlite: bool, connections: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    // FULL: a claim must survive power loss, or a re-send could double-bill.
                    conn.execute("PRAGMA journal_mode=WAL").await?;
                    conn.execute("PRAGMA synchronous=FULL").await?;
                    conn.execute("PRAGMA busy_timeout=10000").await?;
                    // Statement journals in memory: a multi-row upsert inside the group's
                    // transaction journals each page it changes, and in a temporary file that
                    // was a pwrite per page (7 % of meterflow's CPU on P1).
                    conn.execute("PRAGMA temp_store=MEMORY").await?;
                    // A checkpoint copies each page the WAL holds back into the database
                    // once, however often it was rewritten since. Every ledger key is a
                    // random digest, so each commit dirties a page per index per event; at
                    // SQLite's default (1 000 pages) the same index pages were copied back
                    // again and again. 10 000 pages (a WAL of about 40 MiB) cut SQLite's
                    // CPU per event by about a fifth (docs/benchmarks.md, "Fifth run").
                    conn.execute("PRAGMA wal_autocheckpoint=10000").await?;
                } else {
                    // A prepared statement's generic plan is made once, against the table as it
                    // was then: planned on an empty ledger, a group's multi-row join scanned the
                    // whole table on every run after (485 µs of PostgreSQL CPU per event at
                    // 50 000 rows). Plan each run against the table as it is.
                    conn.execute("SET plan_cache_mode = force_custom_plan")
                        .await?;
                }
                Ok(())
            })
        })
}

/// Creates the tables and indexes that are missing.
///
/// On PostgreSQL, under a transaction-scoped advisory lock: concurrent `CREATE TABLE IF NOT
/// EXISTS` on a fresh database races on the catalogue ("duplicate key value violates unique
/// constraint pg_type_typname_nsp_index"), so two replicas starting together would see one of
/// them fail. One statement per transaction: `CREATE INDEX IF NOT EXISTS` locks its table
/// even when the index exists, and a transaction that kept one table's lock while waiting for
/// the next deadlocked with a running replica's writes (which touch several tables).
async fn set_up_schema(pool: &AnyPool, sqlite: bool) -> Result<(), sqlx::Error> {
    for statement in SCHEMA.iter().chain(dead_letters::SCHEMA) {
        let mut tx = pool.begin().await?;
        if !sqlite {
            tx.execute(sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK))
                .await?;
        }
        tx.execute(*statement).await?;
        tx.commit().await?;
    }
    for (table, column, kind) in ADDED_COLUMNS {
        add_column(pool, sqlite, table, column, kind).await?;
    }
    for statement in AFTER_COLUMNS {
        let mut tx = pool.begin().await?;
        if !sqlite {
            tx.execute(sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK))
                .await?;
        }
        tx.execute(*statement).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Adds `table.column` unless it exists, in a transaction of its own. The column is looked up
/// first, so a ledger already migrated takes no table lock at start-up (an `ALTER TABLE`
/// waits for every running transaction on the table, and queues everything after it). On
/// PostgreSQL the `ALTER` runs under the schema lock with `IF NOT EXISTS`; SQLite has no `IF
/// NOT EXISTS` there, so an `ALTER` that fails because another process (the service beside a
/// `meterflow trace`) added the column meanwhile counts as done.
async fn add_column(
    pool: &AnyPool,
    sqlite: bool,
    table: &str,
    column: &str,
    kind: &str,
) -> Result<(), sqlx::Error> {
    let exists = || async {
        let lookup = if sqlite {
            "SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2"
        } else {
            "SELECT CAST(COUNT(*) AS BIGINT) FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
        };
        let row = sqlx::query(lookup)
            .bind(table)
            .bind(column)
            .fetch_one(pool)
            .await?;
        Ok::<bool, sqlx::Error>(row.try_get::<i64, _>(0)? > 0)
    };
    if exists().await? {
        return Ok(());
    }
    if !sqlite {
        let mut tx = pool.begin().await?;
        tx.execute(sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK))
            .await?;
        tx.execute(
            format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}").as_str(),
        )
        .await?;
        tx.commit().await?;
        return Ok(());
    }
    match pool
        .execute(format!("ALTER TABLE {table} ADD COLUMN {column} {kind}").as_str())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            if exists().await? {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

/// The advisory lock key meterflow's schema set-up takes on PostgreSQL (any constant; this one
/// is "mfschema" in ASCII).
const SCHEMA_LOCK: i64 = 0x6d66_7363_6865_6d61;

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
        let hold = store.clock.hold();
        let result = apply(&store, &mut batch, &mut replies).await;
        drop(hold);
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
        tokio::sync::oneshot::Sender<Result<Checked<Claim>, LedgerError>>,
        Checked<Claim>,
    ),
    Touch(
        tokio::sync::oneshot::Sender<Result<Option<i64>, LedgerError>>,
        Option<i64>,
    ),
    Aggregate(
        tokio::sync::oneshot::Sender<Result<AggregateClaim, LedgerError>>,
        AggregateClaim,
    ),
    Unit(tokio::sync::oneshot::Sender<Result<(), LedgerError>>),
    Bool(
        tokio::sync::oneshot::Sender<Result<bool, LedgerError>>,
        bool,
    ),
    DeadLetter(
        tokio::sync::oneshot::Sender<Result<DeadLetterClaim, LedgerError>>,
        DeadLetterClaim,
    ),
}

impl Reply {
    fn send_ok(self) {
        match self {
            Reply::Claim(tx, c) => drop(tx.send(Ok(c))),
            Reply::Touch(tx, t) => drop(tx.send(Ok(t))),
            Reply::Aggregate(tx, a) => drop(tx.send(Ok(a))),
            Reply::Unit(tx) => drop(tx.send(Ok(()))),
            Reply::Bool(tx, b) => drop(tx.send(Ok(b))),
            Reply::DeadLetter(tx, c) => drop(tx.send(Ok(c))),
        }
    }

    fn send_err(self, e: &sqlx::Error) {
        let err = || LedgerError::Database(sqlx::Error::Protocol(e.to_string()));
        match self {
            Reply::Claim(tx, _) => drop(tx.send(Err(err()))),
            Reply::Touch(tx, _) => drop(tx.send(Err(err()))),
            Reply::Aggregate(tx, _) => drop(tx.send(Err(err()))),
            Reply::Unit(tx) => drop(tx.send(Err(err()))),
            Reply::Bool(tx, _) => drop(tx.send(Err(err()))),
            Reply::DeadLetter(tx, _) => drop(tx.send(Err(err()))),
        }
    }
}

async fn apply(
    store: &LedgerStore,
    batch: &mut Vec<Op>,
    replies: &mut Vec<Reply>,
) -> Result<(), sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    let now = ledger_clock(&mut tx, store.clock).await?;
    let legacy = store.legacy();
    let mut group = Group::default();
    for op in batch.drain(..) {
        let Some(op) = group.take(op) else {
            continue;
        };
        group.run(&mut tx, now, legacy, replies).await?;
        let Some(op) = group.take(op) else {
            continue;
        };
        apply_one(&mut tx, op, now, legacy, replies).await?;
    }
    group.run(&mut tx, now, legacy, replies).await?;
    tx.commit().await?;
    Ok(())
}

/// An op that does not run in a [`Group`].
async fn apply_one(
    tx: &mut AnyConnection,
    op: Op,
    now: i64,
    legacy: bool,
    replies: &mut Vec<Reply>,
) -> Result<(), sqlx::Error> {
    match op {
        // An empty group takes any claim or finish, so these never come here; were one to,
        // it runs alone (and were even that refused, its caller's answer is dropped: the
        // caller sees the writer as stopped and asks again).
        op @ (Op::Claim { .. } | Op::Finish { .. }) => {
            let mut alone = Group::default();
            if alone.take(op).is_none() {
                alone.run(tx, now, legacy, replies).await?;
            }
        }
        Op::ClaimAggregate {
            key,
            event_keys,
            origins,
            reply,
        } => {
            let ids: Vec<&str> = digests::firsts(&origins, |o| o)
                .map(|o| o.event_id.as_str())
                .collect();
            let recorded = digests::recorded(tx, &ids, legacy).await?;
            let conflicts = digests::conflicts(&origins.iter().collect::<Vec<_>>(), &recorded);
            let claim = if conflicts.is_empty() {
                claim_aggregate(tx, &key, event_keys, now).await?
            } else {
                AggregateClaim::IdConflict(conflicts)
            };
            if matches!(claim, AggregateClaim::Own(_)) {
                let origins: Vec<_> = origins.iter().map(|o| (&key, o)).collect();
                record_origins(tx, &origins, now).await?;
            }
            replies.push(Reply::Aggregate(reply, claim));
        }
        Op::Abandon {
            key,
            expected_updated_at_ms,
            reply,
        } => {
            let moved = sqlx::query(
                "UPDATE meterflow_deliveries SET state = 'abandoned', updated_at = $1
                     WHERE delivery_key = $2 AND state = 'sending' AND updated_at = $3",
            )
            .bind(now.max(expected_updated_at_ms + 1))
            .bind(key.as_str())
            .bind(expected_updated_at_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if moved {
                sqlx::query("DELETE FROM meterflow_event_deliveries WHERE delivery_key = $1")
                    .bind(key.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            replies.push(Reply::Bool(reply, moved));
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
        Op::DeadLettered {
            source,
            record,
            reply,
        } => {
            dead_letters::written(tx, &source, record.as_ref(), now).await?;
            replies.push(Reply::Unit(reply));
        }
        Op::ClaimDeadLetter {
            source,
            dlq_partition,
            floor,
            reply,
        } => {
            let claim = dead_letters::claim(tx, &source, dlq_partition, floor, now).await?;
            replies.push(Reply::DeadLetter(reply, claim));
        }
        Op::TouchDeadLetter {
            source,
            expected_updated_at_ms,
            reply,
        } => {
            let next = dead_letters::touch(tx, &source, expected_updated_at_ms, now).await?;
            replies.push(Reply::Touch(reply, next));
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
    Ok(())
}

/// The clock lease stamps are written and compared with: the database's on PostgreSQL (shared
/// by every replica, so no replica's clock skew can end another's lease early), this process's
/// on SQLite (one replica only).
async fn ledger_clock(conn: &mut AnyConnection, clock: LedgerClock) -> Result<i64, sqlx::Error> {
    if conn.backend_name() == "PostgreSQL" {
        let row =
            sqlx::query("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)")
                .fetch_one(&mut *conn)
                .await?;
        return row.try_get::<i64, _>(0);
    }
    Ok(clock.now_ms())
}

/// Inserts the key as "sending" (then it is ours: `Claimed`, and `true`), or reads what the
/// ledger has for it.
async fn claim_row(
    conn: &mut AnyConnection,
    key: &DeliveryKey,
    events: usize,
    now: i64,
) -> Result<(Claim, bool), sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO meterflow_deliveries
            (delivery_key, state, receipt, event_count, first_sent_at, updated_at)
         VALUES ($1, 'sending', NULL, $2, $3, $3)
         ON CONFLICT (delivery_key) DO NOTHING",
    )
    .bind(key.as_str())
    .bind(events as i64)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok((Claim::Claimed { updated_at_ms: now }, true));
    }
    let row: AnyRow = sqlx::query(
        "SELECT state, receipt, first_sent_at, updated_at
         FROM meterflow_deliveries WHERE delivery_key = $1",
    )
    .bind(key.as_str())
    .fetch_one(&mut *conn)
    .await?;
    let state: String = row.get(0);
    let receipt: Option<String> = row.get(1);
    Ok((
        row_claim(&state, receipt, row.get(2), row.get(3), now),
        false,
    ))
}

fn row_claim(
    state: &str,
    receipt: Option<String>,
    first_sent_at: i64,
    updated_at: i64,
    now: i64,
) -> Claim {
    match state {
        "delivered" => Claim::Delivered {
            receipt: receipt.unwrap_or_default(),
        },
        "rejected" => Claim::Rejected {
            answer: receipt.unwrap_or_default(),
        },
        "voided" => Claim::Voided {
            receipt: receipt.unwrap_or_default(),
        },
        _ => Claim::Sending {
            first_sent_at: from_ms(first_sent_at),
            updated_at_ms: updated_at,
            ledger_now_ms: now,
        },
    }
}

/// Who claims in this process, for `meterflow trace`'s "in flight" answer: host and process id.
fn claimant() -> &'static str {
    static CLAIMANT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLAIMANT.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| crate::decode::truncate_chars(h.trim(), 100))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_string());
        format!("{host} pid {}", std::process::id())
    })
}

/// `$first, $first+1, ...`: `n` placeholders.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sql` as the connection's database binds it fastest. SQLite finds a numbered parameter's
/// name by walking a list of all of them, and sqlx asks for the name of every parameter it
/// binds, so binding a statement of n `$N` parameters took n²/2 steps: with a group's
/// multi-row inserts (up to 1 408 parameters), 41 % of meterflow's CPU on batches of 100
/// (docs/benchmarks.md, "Eighth run"). Anonymous `?` parameters need no walk. On SQLite, when
/// `$1, $2, ...` each appear once and in that order, they become `?`; any other statement, and
/// every statement on PostgreSQL, keeps its `$N`.
pub(super) fn for_backend(conn: &AnyConnection, sql: String) -> String {
    if !is_sqlite(conn) {
        return sql;
    }
    anonymous(&sql).unwrap_or(sql)
}

/// Whether `conn` is a SQLite connection (sqlx's name for the backend).
pub(super) fn is_sqlite(conn: &AnyConnection) -> bool {
    conn.backend_name() == "SQLite"
}

/// `sql` with `?` for `$1, $2, ...`, if each appears once and in that order.
pub(super) fn anonymous(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut next = 1usize;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        if rest[at + 1..at + 1 + digits].parse::<usize>().ok()? != next {
            return None;
        }
        out.push('?');
        next += 1;
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Some(out)
}

/// The aggregate claim, inside the group transaction:
///
/// 1. Look up the events' mappings. Events mapped to another live aggregate (delivered,
///    rejected or sending) → answer `Earlier` and write nothing: the caller settles them
///    through that aggregate first. Mappings to an abandoned or pruned aggregate are stale and
///    deleted.
/// 2. Claim the key's row as for a single delivery (an abandoned row of the same key — the same
///    events, never received by the provider — starts over).
/// 3. Map every event to the key (`ON CONFLICT DO NOTHING`) and check that all of them now
///    belong to it. If not, another writer mapped some of them after step 1 (only possible with
///    several replicas on PostgreSQL): undo what this claim wrote and answer `Contended`.
async fn claim_aggregate(
    conn: &mut AnyConnection,
    key: &DeliveryKey,
    mut event_keys: Vec<DeliveryKey>,
    now: i64,
) -> Result<AggregateClaim, sqlx::Error> {
    event_keys.sort_unstable();
    event_keys.dedup();
    let n = event_keys.len();

    // 1. Who holds these events already?
    let mut mine: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut earlier: std::collections::BTreeMap<String, EarlierAggregate> = Default::default();
    let mut stale: Vec<(String, String)> = Vec::new();
    for chunk in event_keys.chunks(CHUNK) {
        let sql = format!(
            "SELECT m.event_key, m.delivery_key, d.state, d.receipt, d.first_sent_at, d.updated_at
             FROM meterflow_event_deliveries m
             LEFT JOIN meterflow_deliveries d ON d.delivery_key = m.delivery_key
             WHERE m.event_key IN ({})",
            placeholders(1, chunk.len())
        );
        let sql = for_backend(conn, sql);
        let mut query = sqlx::query(&sql);
        for k in chunk {
            query = query.bind(k.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let event: String = row.get(0);
            let delivery: String = row.get(1);
            if delivery == key.as_str() {
                mine.insert(event);
                continue;
            }
            let state: Option<String> = row.get(2);
            match state.as_deref() {
                Some(state @ ("delivered" | "rejected" | "sending" | "voided")) => {
                    let claim = row_claim(
                        state,
                        row.get(3),
                        row.get::<Option<i64>, _>(4).unwrap_or(now),
                        row.get::<Option<i64>, _>(5).unwrap_or(now),
                        now,
                    );
                    earlier
                        .entry(delivery.clone())
                        .or_insert_with(|| EarlierAggregate {
                            key: DeliveryKey(delivery),
                            state: claim,
                            event_keys: Vec::new(),
                        })
                        .event_keys
                        .push(DeliveryKey(event));
                }
                // Abandoned (the provider never had it) or pruned: the event is free.
                _ => stale.push((event, delivery)),
            }
        }
    }
    if !earlier.is_empty() {
        return Ok(AggregateClaim::Earlier(earlier.into_values().collect()));
    }
    for (event, delivery) in &stale {
        sqlx::query(
            "DELETE FROM meterflow_event_deliveries WHERE event_key = $1 AND delivery_key = $2",
        )
        .bind(event.as_str())
        .bind(delivery.as_str())
        .execute(&mut *conn)
        .await?;
    }

    // 2. The aggregate's own row.
    sqlx::query("DELETE FROM meterflow_deliveries WHERE delivery_key = $1 AND state = 'abandoned'")
        .bind(key.as_str())
        .execute(&mut *conn)
        .await?;
    let (claim, fresh) = claim_row(conn, key, n, now).await?;

    // 3. Map the events; every one must end up ours.
    let unmapped: Vec<&DeliveryKey> = event_keys
        .iter()
        .filter(|k| !mine.contains(k.as_str()))
        .collect();
    let mut inserted: Vec<String> = Vec::new();
    for chunk in unmapped.chunks(CHUNK) {
        let rows = (0..chunk.len())
            .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO meterflow_event_deliveries (event_key, delivery_key, updated_at)
             VALUES {rows} ON CONFLICT (event_key) DO NOTHING RETURNING event_key"
        );
        let sql = for_backend(conn, sql);
        let mut query = sqlx::query(&sql);
        for k in chunk {
            query = query.bind(k.as_str()).bind(key.as_str()).bind(now);
        }
        for row in query.fetch_all(&mut *conn).await? {
            inserted.push(row.get(0));
        }
    }
    let mut mapped = 0usize;
    for chunk in event_keys.chunks(CHUNK) {
        let sql = format!(
            "SELECT COUNT(*) FROM meterflow_event_deliveries
             WHERE delivery_key = $1 AND event_key IN ({})",
            placeholders(2, chunk.len())
        );
        let sql = for_backend(conn, sql);
        let mut query = sqlx::query(&sql).bind(key.as_str());
        for k in chunk {
            query = query.bind(k.as_str());
        }
        mapped += query.fetch_one(&mut *conn).await?.get::<i64, _>(0) as usize;
    }
    if mapped == n {
        return Ok(AggregateClaim::Own(claim));
    }
    // Undo exactly what this claim wrote; the caller claims again and then sees who won.
    for chunk in inserted.chunks(CHUNK) {
        let sql = format!(
            "DELETE FROM meterflow_event_deliveries WHERE delivery_key = $1 AND event_key IN ({})",
            placeholders(2, chunk.len())
        );
        let sql = for_backend(conn, sql);
        let mut query = sqlx::query(&sql).bind(key.as_str());
        for k in chunk {
            query = query.bind(k.as_str());
        }
        query.execute(&mut *conn).await?;
    }
    if fresh {
        sqlx::query("DELETE FROM meterflow_deliveries WHERE delivery_key = $1")
            .bind(key.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok(AggregateClaim::Contended)
}

#[cfg(test)]
mod tests {
    use super::super::scratch::ScratchDatabase;
    use super::super::*;
    use super::{anonymous, claim_aggregate};
    use crate::ack::ledger::now_ms;
    use crate::event::{DeliveryKey, SourceRef};
    use sqlx::Row;

    #[test]
    fn numbered_parameters_in_order_become_anonymous_and_any_other_stay() {
        let insert = "INSERT INTO t VALUES ($1, 'x', $2), ($3, NULL, $4) RETURNING k";
        assert_eq!(
            anonymous(insert).as_deref(),
            Some("INSERT INTO t VALUES (?, 'x', ?), (?, NULL, ?) RETURNING k")
        );
        let many = (1..=12)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(anonymous(&many), Some(["?"; 12].join(",")));
        assert_eq!(anonymous("SELECT 1").as_deref(), Some("SELECT 1"));
        // A parameter used twice, out of order, or not numbered: binding by position would
        // give the wrong values, so the statement keeps its `$N`.
        assert_eq!(anonymous("SELECT $1, $1"), None);
        assert_eq!(anonymous("SELECT $2, $1"), None);
        assert_eq!(anonymous("SELECT $1, $3"), None);
        assert_eq!(anonymous("SELECT $name"), None);
        assert_eq!(anonymous("SELECT $"), None);
    }

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
    async fn forgetting_an_events_rejection_forgets_the_aggregate_it_was_refused_in() {
        let (ledger, store, _dir) = sqlite().await;
        let events: Vec<DeliveryKey> = ["evt_a", "evt_b", "evt_c"]
            .iter()
            .map(|id| DeliveryKey::for_event(id))
            .collect();
        let refused = DeliveryKey::for_events(["evt_a", "evt_b", "evt_c"]);
        assert!(matches!(
            ledger
                .claim_aggregate(&refused, events.clone())
                .await
                .unwrap(),
            AggregateClaim::Own(Claim::Claimed { .. })
        ));
        ledger.finish(&refused, false, "404 no such contract".into());
        // evt_b read again alone: settled through the refused aggregate, and dead-lettered
        // under its own new key, which is all its letter names.
        let again = DeliveryKey::for_events(["evt_b"]);
        assert!(matches!(
            ledger
                .claim_aggregate(&again, vec![events[1].clone()])
                .await
                .unwrap(),
            AggregateClaim::Earlier(_)
        ));
        let letter_keys = vec![again.as_str().to_string(), events[1].as_str().to_string()];
        assert_eq!(store.forget_rejections(&letter_keys).await.unwrap(), 1);
        // Replayed, it is claimed afresh instead of being refused again on the ledger's word,
        // and so are the refused aggregate's other events.
        assert!(matches!(
            ledger
                .claim_aggregate(&again, vec![events[1].clone()])
                .await
                .unwrap(),
            AggregateClaim::Own(Claim::Claimed { .. })
        ));
        let rest = DeliveryKey::for_events(["evt_a", "evt_c"]);
        assert!(matches!(
            ledger
                .claim_aggregate(&rest, vec![events[0].clone(), events[2].clone()])
                .await
                .unwrap(),
            AggregateClaim::Own(Claim::Claimed { .. })
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
        ledger.dead_lettered(&s, None).await.unwrap();
        ledger.dead_lettered(&s, None).await.unwrap();
        assert!(ledger.is_dead_lettered(&s).await.unwrap());
    }

    fn origin(id: &str, digest: &str) -> EventOrigin {
        EventOrigin {
            event_id: id.into(),
            source: SourceRef {
                topic: "usage".into(),
                partition: 1,
                offset: 9,
            },
            customer: "contract:c1".into(),
            component_id: "api_calls".into(),
            quantity: rust_decimal::Decimal::ONE,
            digest: digest.into(),
        }
    }

    /// A ledger of an earlier build kept digests in `meterflow_event_contents` and origin rows
    /// without one: both still decide an id conflict, for single and aggregate claims, until
    /// retention prunes them.
    async fn digests_of_earlier_builds_still_decide(url: &str) {
        let store = LedgerStore::connect(url).await.unwrap();
        assert!(
            !store.legacy(),
            "a new ledger has no digests of earlier builds"
        );
        for (id, digest) in [("evt_kept", "d1"), ("evt_origin", "d1"), ("evt_agg", "d1")] {
            sqlx::query(
                "INSERT INTO meterflow_event_contents (event_key, digest, updated_at)
                 VALUES ($1, $2, 1000)",
            )
            .bind(DeliveryKey::for_event(id).0)
            .bind(digest)
            .execute(&store.pool)
            .await
            .unwrap();
        }
        // An origin row written before the digest column existed.
        sqlx::query(
            "INSERT INTO meterflow_event_origins (event_id, delivery_key, topic,
                source_partition, source_offset, customer, component_id, quantity, claimed_by,
                updated_at)
             VALUES ('evt_origin', $1, 'usage', 0, 1, 'contract:c1', 'api_calls', '1', 'old', 1000)",
        )
        .bind(DeliveryKey::for_event("evt_origin").0)
        .execute(&store.pool)
        .await
        .unwrap();
        drop(store);

        let store = LedgerStore::connect(url).await.unwrap();
        assert!(store.legacy());
        let ledger = Ledger::start(store.clone(), Duration::from_secs(30));
        for id in ["evt_kept", "evt_origin"] {
            let key = DeliveryKey::for_event(id);
            let lost = ledger
                .claim_checked(&key, 1, vec![origin(id, "d2")])
                .await
                .unwrap()
                .expect_err("another event reusing the id");
            assert_eq!(lost[0].event_key, key);
            assert_eq!(lost[0].digest, "d2");
            let claim = ledger
                .claim_checked(&key, 1, vec![origin(id, "d1")])
                .await
                .unwrap();
            assert!(
                matches!(claim, Ok(Claim::Claimed { .. })),
                "{id}: {claim:?}"
            );
        }
        let agg = DeliveryKey::for_events(["evt_agg", "evt_new"]);
        let events = vec![
            DeliveryKey::for_event("evt_agg"),
            DeliveryKey::for_event("evt_new"),
        ];
        let answer = ledger
            .claim_aggregate_checked(
                &agg,
                events.clone(),
                vec![origin("evt_agg", "d2"), origin("evt_new", "d1")],
            )
            .await
            .unwrap();
        let AggregateClaim::IdConflict(lost) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].event_key, DeliveryKey::for_event("evt_agg"));
        // A refused claim records nothing: evt_new is free to carry other contents.
        let answer = ledger
            .claim_aggregate_checked(
                &agg,
                events,
                vec![origin("evt_agg", "d1"), origin("evt_new", "d3")],
            )
            .await
            .unwrap();
        assert!(
            matches!(answer, AggregateClaim::Own(Claim::Claimed { .. })),
            "{answer:?}"
        );

        // The digests now live in the origin rows; pruning the old table ends the look-ups.
        let row =
            sqlx::query("SELECT digest FROM meterflow_event_origins WHERE event_id = 'evt_new'")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(row.get::<String, _>(0), "d3");
        sqlx::query("DELETE FROM meterflow_event_contents")
            .execute(&store.pool)
            .await
            .unwrap();
        store.prune_before(0).await.unwrap();
        assert!(!store.legacy());
        let key = DeliveryKey::for_event("evt_kept");
        let lost = ledger
            .claim_checked(&key, 1, vec![origin("evt_kept", "d2")])
            .await
            .unwrap()
            .expect_err("the origin row keeps the digest");
        assert_eq!(lost[0].digest, "d2");
    }

    #[tokio::test]
    async fn digests_of_earlier_builds_still_decide_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        digests_of_earlier_builds_still_decide(&url).await;
    }

    #[tokio::test]
    async fn digests_of_earlier_builds_still_decide_on_postgres() {
        let Some(db) = ScratchDatabase::for_test().await else {
            return;
        };
        digests_of_earlier_builds_still_decide(&db.url).await;
    }

    /// The rewrite hangs on the name sqlx gives each backend: were it to change, SQLite would
    /// silently go back to binding `$N` (quadratic) and PostgreSQL would get `?` (an error).
    #[tokio::test]
    async fn only_a_sqlite_connection_gets_anonymous_parameters() {
        let sql = || "SELECT $1, $2".to_string();
        let (_ledger, store, _dir) = sqlite().await;
        let mut conn = store.pool.acquire().await.unwrap();
        assert_eq!(super::for_backend(&conn, sql()), "SELECT ?, ?");
        let row = sqlx::query(&super::for_backend(&conn, sql()))
            .bind(1_i64)
            .bind(2_i64)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!((row.get::<i64, _>(0), row.get::<i64, _>(1)), (1, 2));
        let Some(db) = ScratchDatabase::for_test().await else {
            return;
        };
        let store = LedgerStore::connect(&db.url).await.unwrap();
        let conn = store.pool.acquire().await.unwrap();
        assert_eq!(super::for_backend(&conn, sql()), sql());
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

    /// PostgreSQL runs on this machine and in CI (127.0.0.1:5432); each test creates a
    /// database of its own there and drops it afterwards.
    #[tokio::test]
    async fn postgres_store_behaves_the_same() {
        let Some(db) = ScratchDatabase::for_test().await else {
            return;
        };
        let store = LedgerStore::connect(&db.url).await.unwrap();
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

    /// Replicas starting together against a new database: without the schema lock, the
    /// concurrent `CREATE TABLE IF NOT EXISTS` fail on PostgreSQL's catalogue for some of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_replicas_opening_a_fresh_database_at_once_all_start() {
        for _round in 0..3 {
            let Some(db) = ScratchDatabase::for_test().await else {
                return;
            };
            let opens = (0..8).map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { LedgerStore::connect(&url).await.map(|_| ()) })
            });
            for open in futures::future::join_all(opens).await {
                open.unwrap().expect("every replica opens the ledger");
            }
        }
    }

    fn events(ids: &[&str]) -> Vec<DeliveryKey> {
        ids.iter().map(|id| DeliveryKey::for_event(id)).collect()
    }

    fn aggregate(ids: &[&str]) -> DeliveryKey {
        DeliveryKey::for_events(ids.iter().copied())
    }

    #[tokio::test]
    async fn an_aggregate_claim_maps_every_event_or_names_the_earlier_aggregates() {
        let (ledger, store, _dir) = sqlite().await;
        let k1 = aggregate(&["a", "b"]);
        let claim = ledger
            .claim_aggregate(&k1, events(&["a", "b", "a"]))
            .await
            .unwrap();
        let AggregateClaim::Own(Claim::Claimed { updated_at_ms }) = claim else {
            panic!("{claim:?}")
        };
        assert_eq!(store.event_deliveries().await.unwrap().len(), 2);

        // The same aggregate again (a retry): its own state.
        assert!(matches!(
            ledger
                .claim_aggregate(&k1, events(&["b", "a"]))
                .await
                .unwrap(),
            AggregateClaim::Own(Claim::Sending { .. })
        ));

        // A differently cut aggregate sharing "b": nothing written, k1 named with "b".
        let k2 = aggregate(&["b", "c"]);
        let AggregateClaim::Earlier(earlier) = ledger
            .claim_aggregate(&k2, events(&["b", "c"]))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(earlier.len(), 1);
        assert_eq!(earlier[0].key, k1);
        assert_eq!(earlier[0].event_keys, events(&["b"]));
        assert!(matches!(
            earlier[0].state,
            Claim::Sending { updated_at_ms: u, .. } if u == updated_at_ms
        ));
        assert_eq!(store.deliveries().await.unwrap().len(), 1, "no row for k2");
        assert_eq!(store.event_deliveries().await.unwrap().len(), 2);

        // Abandoned (the provider never had k1): its events are free, k2 takes "b".
        assert!(
            !ledger.abandon(&k1, updated_at_ms - 1).await.unwrap(),
            "stale"
        );
        assert!(ledger.abandon(&k1, updated_at_ms).await.unwrap());
        assert!(matches!(
            ledger
                .claim_aggregate(&k2, events(&["b", "c"]))
                .await
                .unwrap(),
            AggregateClaim::Own(Claim::Claimed { .. })
        ));
        let mut mapped = store.event_deliveries().await.unwrap();
        mapped.sort();
        let mut want = vec![
            (DeliveryKey::for_event("b").0, k2.0.clone()),
            (DeliveryKey::for_event("c").0, k2.0.clone()),
        ];
        want.sort();
        assert_eq!(mapped, want);
        // The abandoned k1, rebuilt with exactly its events, starts over.
        assert!(matches!(
            ledger.claim_aggregate(&k1, events(&["a"])).await.unwrap(),
            AggregateClaim::Own(Claim::Claimed { .. })
        ));

        // Delivered aggregates are named as delivered.
        ledger.finish(&k2, true, "usage-2".into());
        let AggregateClaim::Earlier(earlier) = ledger
            .claim_aggregate(&aggregate(&["c", "d"]), events(&["c", "d"]))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            earlier[0].state,
            Claim::Delivered {
                receipt: "usage-2".into()
            }
        );
    }

    #[tokio::test]
    async fn mappings_of_pruned_aggregates_are_stale() {
        let (ledger, store, _dir) = sqlite().await;
        let k1 = aggregate(&["x", "y"]);
        ledger
            .claim_aggregate(&k1, events(&["x", "y"]))
            .await
            .unwrap();
        sqlx::query("DELETE FROM meterflow_deliveries")
            .execute(&store.pool)
            .await
            .unwrap();
        let k2 = aggregate(&["y", "z"]);
        assert!(matches!(
            ledger
                .claim_aggregate(&k2, events(&["y", "z"]))
                .await
                .unwrap(),
            AggregateClaim::Own(Claim::Claimed { .. })
        ));
    }

    /// Two replicas claim overlapping aggregates at once (PostgreSQL, READ COMMITTED): the
    /// second's look-up runs before the first commits, so only the mapping insert can tell; it
    /// must undo its writes and answer `Contended`, and the next claim names the winner.
    #[tokio::test]
    async fn postgres_concurrent_overlapping_claims_leave_one_owner_per_event() {
        let Some(db) = ScratchDatabase::for_test().await else {
            return;
        };
        let store = LedgerStore::connect(&db.url).await.unwrap();
        let run = uuid_like();
        let id = |s: &str| format!("{run}-{s}");
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let k1 = aggregate(&[&a, &b]);
        let k2 = aggregate(&[&b, &c]);

        let mut first = store.pool.begin().await.unwrap();
        let claim = claim_aggregate(&mut first, &k1, events(&[&a, &b]), now_ms())
            .await
            .unwrap();
        assert!(matches!(claim, AggregateClaim::Own(Claim::Claimed { .. })));
        let pool = store.pool.clone();
        let (k2c, bc) = (k2.clone(), events(&[&b, &c]));
        let second = tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let claim = claim_aggregate(&mut tx, &k2c, bc, now_ms()).await.unwrap();
            tx.commit().await.unwrap();
            claim
        });
        // Let the second block on the first's uncommitted mapping of `b`.
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.commit().await.unwrap();
        assert_eq!(second.await.unwrap(), AggregateClaim::Contended);

        let ledger = Ledger::start(store.clone(), Duration::from_secs(30));
        let AggregateClaim::Earlier(earlier) = ledger
            .claim_aggregate(&k2, events(&[&b, &c]))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(earlier[0].key, k1);
        let owners: Vec<(String, String)> = store
            .event_deliveries()
            .await
            .unwrap()
            .into_iter()
            .filter(|(e, _)| events(&[&a, &b, &c]).iter().any(|k| k.0 == *e))
            .collect();
        assert_eq!(
            owners.len(),
            2,
            "a and b mapped to k1, c not mapped: {owners:?}"
        );
        assert!(owners.iter().all(|(_, d)| *d == k1.0));
        let rows = store.deliveries().await.unwrap();
        assert!(!rows.iter().any(|(k, _, _)| *k == k2.0), "k2's row undone");
    }

    fn uuid_like() -> String {
        format!("{:x}{:x}", rand::random::<u64>(), rand::random::<u64>())
    }
}
