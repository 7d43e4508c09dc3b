//! One statement per kind for a whole group of claims and finishes.
//!
//! The writer takes every op waiting and runs them in one transaction. Run one by one, a claim
//! is two statements (its origins with their digests, the key's row) and a finish one more,
//! each a round trip to the database (SQLite's own thread, or PostgreSQL's socket): with 64
//! deliveries in flight that was 192 statements a transaction. A [`Group`] gathers consecutive
//! claims and finishes that touch disjoint rows (no delivery key or event id twice) and runs
//! each kind as one multi-row statement per piece of up to [`MAX_ROWS`] rows. Ops on disjoint
//! rows commute, so the outcome is the one running them in order would give; an op that
//! shares a row with the group closes it first.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use sqlx::{AnyConnection, Row};
use tokio::sync::oneshot;

use super::{claimant, digests, for_backend, is_sqlite, row_claim, Reply};
use crate::ack::ledger::{Checked, Claim, EventContent, EventOrigin, LedgerError, Op};
use crate::event::DeliveryKey;

/// Rows per statement at most (11 parameters a row for origins: well under SQLite's 32 766
/// and PostgreSQL's 65 535).
const MAX_ROWS: usize = 128;

struct PendingClaim {
    key: DeliveryKey,
    events: usize,
    origins: Vec<EventOrigin>,
    reply: oneshot::Sender<Result<Checked<Claim>, LedgerError>>,
}

struct PendingFinish {
    key: DeliveryKey,
    delivered: bool,
    receipt: String,
}

/// Claims and finishes waiting to run together (see the module's text).
#[derive(Default)]
pub(super) struct Group {
    claims: Vec<PendingClaim>,
    finishes: Vec<PendingFinish>,
    keys: HashSet<String>,
    event_ids: HashSet<String>,
}

impl Group {
    /// Takes a claim or a finish whose rows are not in the group yet; gives back any other op,
    /// and one that shares a row with the group (run the group, then offer it again).
    pub(super) fn take(&mut self, op: Op) -> Option<Op> {
        match op {
            Op::Claim {
                key,
                events,
                origins,
                reply,
            } => {
                let fits = !self.keys.contains(key.as_str())
                    && origins
                        .iter()
                        .all(|o| !self.event_ids.contains(o.event_id.as_str()));
                if !fits {
                    return Some(Op::Claim {
                        key,
                        events,
                        origins,
                        reply,
                    });
                }
                self.keys.insert(key.0.clone());
                self.event_ids
                    .extend(origins.iter().map(|o| o.event_id.clone()));
                self.claims.push(PendingClaim {
                    key,
                    events,
                    origins,
                    reply,
                });
                None
            }
            Op::Finish {
                key,
                delivered,
                receipt,
            } => {
                if !self.keys.insert(key.0.clone()) {
                    return Some(Op::Finish {
                        key,
                        delivered,
                        receipt,
                    });
                }
                self.finishes.push(PendingFinish {
                    key,
                    delivered,
                    receipt,
                });
                None
            }
            other => Some(other),
        }
    }

    /// Runs what the group holds (answers go to `replies`, sent once the transaction commits)
    /// and empties it.
    pub(super) async fn run(
        &mut self,
        conn: &mut AnyConnection,
        now: i64,
        legacy: bool,
        replies: &mut Vec<Reply>,
    ) -> Result<(), sqlx::Error> {
        if !self.claims.is_empty() {
            claim_all(conn, std::mem::take(&mut self.claims), now, legacy, replies).await?;
        }
        if !self.finishes.is_empty() {
            finish_all(conn, &std::mem::take(&mut self.finishes), now).await?;
        }
        self.keys.clear();
        self.event_ids.clear();
        Ok(())
    }
}

/// The claims of a group. Every claim's origins are inserted where their ids are new (one
/// statement; with the digest, that records the content the id keeps); the ids that were
/// there already are read back and checked. A claim with a conflicting content takes its new
/// origins out again and is answered with the conflicts. Every other claim inserts its key's
/// row (one statement), reads the rows that were there already (one more, only if some were),
/// and moves known origins recorded under another key to its own.
async fn claim_all(
    conn: &mut AnyConnection,
    claims: Vec<PendingClaim>,
    now: i64,
    legacy: bool,
    replies: &mut Vec<Reply>,
) -> Result<(), sqlx::Error> {
    let all: Vec<(&DeliveryKey, &EventOrigin)> = claims
        .iter()
        .flat_map(|c| c.origins.iter().map(move |o| (&c.key, o)))
        .collect();
    let firsts: Vec<&(&DeliveryKey, &EventOrigin)> = digests::firsts(&all, |(_, o)| o).collect();
    let new_ids = insert_origins(conn, &firsts, now).await?;
    let (fresh, known): (Vec<&str>, Vec<&str>) = firsts
        .iter()
        .map(|(_, o)| o.event_id.as_str())
        .partition(|id| new_ids.contains(*id));
    let mut recorded = if known.is_empty() {
        Default::default()
    } else {
        digests::recorded(conn, &known, legacy).await?
    };
    if legacy {
        recorded.extend(digests::legacy_digests(conn, &fresh).await?);
    }
    // Each claim's conflicts, in order (none: the claim goes ahead).
    let conflicts: Vec<Vec<EventContent>> = claims
        .iter()
        .map(|c| digests::conflicts(&c.origins.iter().collect::<Vec<_>>(), &recorded))
        .collect();
    let refused = |i: usize| !conflicts[i].is_empty();
    let taken_back: Vec<&str> = (0..claims.len())
        .filter(|&i| refused(i))
        .flat_map(|i| claims[i].origins.iter().map(|o| o.event_id.as_str()))
        .filter(|id| new_ids.contains(*id))
        .collect();
    take_back_origins(conn, &taken_back).await?;
    let clear_claims: Vec<&PendingClaim> = (0..claims.len())
        .filter(|&i| !refused(i))
        .map(|i| &claims[i])
        .collect();
    let known: Vec<(&DeliveryKey, &EventOrigin)> = clear_claims
        .iter()
        .flat_map(|c| {
            digests::firsts(&c.origins, |o| o)
                .filter(|o| !new_ids.contains(o.event_id.as_str()))
                .map(move |o| (&c.key, o))
        })
        .collect();
    if !known.is_empty() {
        record_origins(conn, &known, now).await?;
    }
    let inserted = if clear_claims.is_empty() {
        HashSet::new()
    } else {
        insert_rows(conn, &clear_claims, now).await?
    };
    let known_keys: Vec<&DeliveryKey> = clear_claims
        .iter()
        .map(|c| &c.key)
        .filter(|k| !inserted.contains(k.as_str()))
        .collect();
    let mut rows = read_rows(conn, &known_keys, now).await?;
    for (claim, mine) in claims.into_iter().zip(conflicts) {
        if !mine.is_empty() {
            replies.push(Reply::Claim(claim.reply, Err(mine)));
            continue;
        }
        let answer = if inserted.contains(claim.key.as_str()) {
            Claim::Claimed { updated_at_ms: now }
        } else {
            // Not inserted, so the row was there when the insert ran; it cannot have gone
            // since inside this transaction unless another replica pruned it: run again.
            rows.remove(claim.key.as_str())
                .ok_or(sqlx::Error::RowNotFound)?
        };
        replies.push(Reply::Claim(claim.reply, Ok(answer)));
    }
    Ok(())
}

/// Inserts the origins whose ids are not recorded yet, each under the key it is claimed with;
/// returns the ids inserted.
async fn insert_origins(
    conn: &mut AnyConnection,
    origins: &[&(&DeliveryKey, &EventOrigin)],
    now: i64,
) -> Result<HashSet<String>, sqlx::Error> {
    let mut inserted = HashSet::with_capacity(origins.len());
    for piece in pieces(origins) {
        let sql = statement(conn, Kind::InsertOrigins, piece.len());
        let mut query = sqlx::query(sql);
        for (key, o) in piece {
            query = bind_origin(query, key, o, now);
        }
        for row in query.fetch_all(&mut *conn).await? {
            inserted.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(inserted)
}

/// Deletes origins this transaction inserted for a claim that was then refused.
async fn take_back_origins(conn: &mut AnyConnection, ids: &[&str]) -> Result<(), sqlx::Error> {
    for piece in pieces(ids) {
        let sql = statement(conn, Kind::DeleteOrigins, piece.len());
        let mut query = sqlx::query(sql);
        for id in piece {
            query = query.bind(*id);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

fn bind_origin<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    key: &'q DeliveryKey,
    o: &'q EventOrigin,
    now: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(o.event_id.as_str())
        .bind(key.as_str())
        .bind(o.source.topic.as_str())
        .bind(i64::from(o.source.partition))
        .bind(o.source.offset)
        .bind(o.customer.as_str())
        .bind(o.component_id.as_str())
        .bind(o.quantity.to_string())
        .bind(claimant())
        .bind(now)
        .bind(o.digest.as_str())
}

/// Inserts each claim's key as "sending"; returns the keys inserted (the others were there).
async fn insert_rows(
    conn: &mut AnyConnection,
    claims: &[&PendingClaim],
    now: i64,
) -> Result<HashSet<String>, sqlx::Error> {
    let mut inserted = HashSet::with_capacity(claims.len());
    for piece in pieces(claims) {
        let sql = statement(conn, Kind::InsertRows, piece.len());
        let mut query = sqlx::query(sql);
        for c in piece {
            query = query
                .bind(c.key.as_str())
                .bind(i64::try_from(c.events).unwrap_or(i64::MAX))
                .bind(now)
                .bind(now);
        }
        for row in query.fetch_all(&mut *conn).await? {
            inserted.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(inserted)
}

/// What the ledger has for keys that were there already, as claim answers.
async fn read_rows(
    conn: &mut AnyConnection,
    keys: &[&DeliveryKey],
    now: i64,
) -> Result<HashMap<String, Claim>, sqlx::Error> {
    let mut rows = HashMap::with_capacity(keys.len());
    for piece in pieces(keys) {
        let sql = statement(conn, Kind::ReadRows, piece.len());
        let mut query = sqlx::query(sql);
        for k in piece {
            query = query.bind(k.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let state: String = row.try_get(1)?;
            let claim = row_claim(
                &state,
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
                now,
            );
            rows.insert(row.try_get::<String, _>(0)?, claim);
        }
    }
    Ok(rows)
}

/// Records where each event came from, under the key it is claimed with, for events whose ids
/// may be recorded already. An event already recorded under the same key keeps its first
/// coordinates (a producer's retry is a second copy of it); one recorded under another key (an
/// aggregate cut anew) moves to this one. An id keeps the digest it was first recorded with,
/// and an id named twice keeps its first origin.
pub(super) async fn record_origins(
    conn: &mut AnyConnection,
    origins: &[(&DeliveryKey, &EventOrigin)],
    now: i64,
) -> Result<(), sqlx::Error> {
    let unique: Vec<&(&DeliveryKey, &EventOrigin)> = digests::firsts(origins, |(_, o)| o).collect();
    for piece in pieces(&unique) {
        let sql = statement(conn, Kind::RecordOrigins, piece.len());
        let mut query = sqlx::query(sql);
        for (key, o) in piece {
            query = bind_origin(query, key, o, now);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Records final outcomes. A voided entry stays voided: a copy of its events settled
/// meanwhile (as not billed again) must not turn it back into "delivered".
async fn finish_all(
    conn: &mut AnyConnection,
    finishes: &[PendingFinish],
    now: i64,
) -> Result<(), sqlx::Error> {
    for piece in pieces(finishes) {
        let sql = statement(conn, Kind::Finish, piece.len());
        let mut query = sqlx::query(sql);
        for f in piece {
            query = query
                .bind(f.key.as_str())
                .bind(if f.delivered { "delivered" } else { "rejected" })
                .bind(f.receipt.as_str())
                .bind(now);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// `items` in pieces whose lengths are powers of two up to [`MAX_ROWS`], so that each kind of
/// statement has at most eight texts (each prepared once per connection and kept).
fn pieces<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(MAX_ROWS);
        let n = 1 << (usize::BITS - 1 - n.leading_zeros());
        let (piece, after) = rest.split_at(n);
        rest = after;
        Some(piece)
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    InsertRows,
    ReadRows,
    InsertOrigins,
    RecordOrigins,
    DeleteOrigins,
    Finish,
}

/// The text of `kind` for `rows` rows in the connection's dialect ([`for_backend`]), made once
/// per process (`rows` is a power of two up to [`MAX_ROWS`], so there are at most 48 texts a
/// dialect).
fn statement(conn: &AnyConnection, kind: Kind, rows: usize) -> &'static str {
    /// (SQLite or not, kind, rows) → text.
    type Texts = HashMap<(bool, Kind, usize), &'static str>;
    static TEXTS: OnceLock<Mutex<Texts>> = OnceLock::new();
    let mut texts = crate::sync::lock(TEXTS.get_or_init(Default::default));
    texts
        .entry((is_sqlite(conn), kind, rows))
        .or_insert_with(|| Box::leak(for_backend(conn, text(kind, rows)).into_boxed_str()))
}

/// The columns an origin row is written with, in [`bind_origin`]'s order.
const ORIGIN_COLUMNS: &str = "event_id, delivery_key, topic, source_partition, source_offset, \
    customer, component_id, quantity, claimed_by, updated_at, digest";

fn text(kind: Kind, rows: usize) -> String {
    let origin_row = |p: usize| {
        let row = (1..=11)
            .map(|j| format!("${}", p + j))
            .collect::<Vec<_>>()
            .join(", ");
        format!("({row})")
    };
    let values = |per_row: usize, row: &dyn Fn(usize) -> String| {
        (0..rows)
            .map(|i| row(per_row * i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match kind {
        Kind::InsertRows => format!(
            "INSERT INTO meterflow_deliveries
                (delivery_key, state, receipt, event_count, first_sent_at, updated_at)
             VALUES {}
             ON CONFLICT (delivery_key) DO NOTHING RETURNING delivery_key",
            // first_sent_at and updated_at are bound apart: each parameter used once keeps
            // the statement's parameters in order ([`for_backend`]).
            values(4, &|p| format!(
                "(${}, 'sending', NULL, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4
            ))
        ),
        Kind::ReadRows => format!(
            "SELECT delivery_key, state, receipt, first_sent_at, updated_at
             FROM meterflow_deliveries WHERE delivery_key IN ({})",
            values(1, &|p| format!("${}", p + 1))
        ),
        Kind::InsertOrigins => format!(
            "INSERT INTO meterflow_event_origins ({ORIGIN_COLUMNS}) VALUES {}
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            values(11, &origin_row)
        ),
        Kind::RecordOrigins => format!(
            "INSERT INTO meterflow_event_origins ({ORIGIN_COLUMNS}) VALUES {}
             ON CONFLICT (event_id) DO UPDATE SET delivery_key = excluded.delivery_key,
                topic = excluded.topic, source_partition = excluded.source_partition,
                source_offset = excluded.source_offset, customer = excluded.customer,
                component_id = excluded.component_id, quantity = excluded.quantity,
                claimed_by = excluded.claimed_by, updated_at = excluded.updated_at,
                digest = COALESCE(meterflow_event_origins.digest, excluded.digest)
             WHERE meterflow_event_origins.delivery_key <> excluded.delivery_key",
            values(11, &origin_row)
        ),
        Kind::DeleteOrigins => format!(
            "DELETE FROM meterflow_event_origins WHERE event_id IN ({})",
            values(1, &|p| format!("${}", p + 1))
        ),
        // `VALUES` names its columns column1, column2, ... in both SQLite and PostgreSQL.
        Kind::Finish => format!(
            "UPDATE meterflow_deliveries SET state = v.column2, receipt = v.column3,
                updated_at = v.column4,
                delivered_at = COALESCE(meterflow_deliveries.delivered_at,
                    CASE WHEN v.column2 = 'delivered' THEN v.column4 END)
             FROM (VALUES {}) AS v
             WHERE meterflow_deliveries.delivery_key = v.column1
               AND meterflow_deliveries.state <> 'voided'",
            values(4, &|p| format!(
                "(${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4
            ))
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::future::{join_all, BoxFuture, FutureExt};

    use super::pieces;
    use crate::ack::ledger::scratch::ScratchDatabase;
    use crate::ack::ledger::{Checked, Claim, EventOrigin, Ledger, LedgerError, LedgerStore};
    use crate::event::{DeliveryKey, SourceRef};

    type Answer = Result<Checked<Claim>, LedgerError>;

    fn claim<'a>(ledger: &'a Ledger, id: &str, digest: &str) -> BoxFuture<'a, Option<Answer>> {
        let key = DeliveryKey::for_event(id);
        let origins = vec![EventOrigin {
            event_id: id.to_string(),
            source: SourceRef {
                topic: "usage".into(),
                partition: 0,
                offset: 7,
            },
            customer: "contract:c1".into(),
            component_id: "api_calls".into(),
            quantity: rust_decimal::Decimal::ONE,
            digest: digest.to_string(),
        }];
        async move { Some(ledger.claim_checked(&key, 1, origins).await) }.boxed()
    }

    fn finish<'a>(ledger: &'a Ledger, id: &str, receipt: &str) -> BoxFuture<'a, Option<Answer>> {
        let key = DeliveryKey::for_event(id);
        let receipt = receipt.to_string();
        async move {
            ledger.finish(&key, true, receipt);
            None
        }
        .boxed()
    }

    /// Every op below is sent before the writer runs (a current-thread runtime polls each
    /// future once before the writer's task), so they share one transaction; the answers
    /// must be those of running them one by one.
    async fn answers_as_one_by_one(ledger: Ledger, store: LedgerStore, tag: &str) {
        let id = |name: &str| format!("{tag}-{name}");
        // Before: `done` delivered, `open` sending, `taken`'s id recorded with digest d1.
        for name in ["done", "open", "taken"] {
            claim(&ledger, &id(name), "d1")
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
        ledger.finish(
            &DeliveryKey::for_event(&id("done")),
            true,
            "usage-done".into(),
        );

        let many: Vec<String> = (0..130).map(|i| id(&format!("many-{i}"))).collect();
        let mut ops: Vec<BoxFuture<'_, Option<Answer>>> = vec![
            claim(&ledger, &id("done"), "d1"),
            claim(&ledger, &id("open"), "d1"),
            claim(&ledger, &id("taken"), "d2"),
            claim(&ledger, &id("new"), "d1"),
            claim(&ledger, &id("new"), "d1"),
            finish(&ledger, &id("new"), "usage-new"),
            claim(&ledger, &id("new"), "d1"),
            claim(&ledger, &id("other"), "d1"),
            claim(&ledger, &id("other"), "d2"),
        ];
        ops.extend(many.iter().map(|m| claim(&ledger, m, "d1")));
        let answers: Vec<Option<Answer>> = join_all(ops).await;
        let answers: Vec<Option<Checked<Claim>>> = answers
            .into_iter()
            .map(|a| a.map(|a| a.expect("the ledger answers")))
            .collect();

        assert_eq!(
            answers[0],
            Some(Ok(Claim::Delivered {
                receipt: "usage-done".into()
            }))
        );
        assert!(
            matches!(answers[1], Some(Ok(Claim::Sending { .. }))),
            "{:?}",
            answers[1]
        );
        let Some(Err(conflicts)) = &answers[2] else {
            panic!("{:?}", answers[2])
        };
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].digest, "d2");
        assert!(
            matches!(answers[3], Some(Ok(Claim::Claimed { .. }))),
            "{:?}",
            answers[3]
        );
        assert!(
            matches!(answers[4], Some(Ok(Claim::Sending { .. }))),
            "{:?}",
            answers[4]
        );
        assert_eq!(answers[5], None);
        assert_eq!(
            answers[6],
            Some(Ok(Claim::Delivered {
                receipt: "usage-new".into()
            }))
        );
        assert!(
            matches!(answers[7], Some(Ok(Claim::Claimed { .. }))),
            "{:?}",
            answers[7]
        );
        // The same id with other contents, later in the same batch: a conflict, not a claim.
        assert!(
            matches!(&answers[8], Some(Err(c)) if c[0].digest == "d2"),
            "{:?}",
            answers[8]
        );
        for (i, a) in answers[9..].iter().enumerate() {
            assert!(
                matches!(a, Some(Ok(Claim::Claimed { .. }))),
                "many-{i}: {a:?}"
            );
        }

        let record = store.trace_event(&many[129]).await.unwrap();
        let origin = record.origin.expect("origin recorded with the claim");
        assert_eq!(origin.delivery_key, DeliveryKey::for_event(&many[129]).0);
        assert_eq!((origin.partition, origin.offset), (0, 7));
        let delivery = store
            .trace_event(&id("new"))
            .await
            .unwrap()
            .delivery
            .expect("delivery entry");
        assert_eq!(delivery.state, "delivered");
        assert!(delivery.delivered_at_ms.is_some());
        // `taken` was not claimed again: its row is still the first claim's.
        let taken = store
            .trace_event(&id("taken"))
            .await
            .unwrap()
            .delivery
            .unwrap();
        assert_eq!(taken.state, "sending");
    }

    #[tokio::test]
    async fn a_group_answers_as_its_ops_one_by_one_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let store = LedgerStore::connect(&url).await.unwrap();
        let ledger = Ledger::start(store.clone(), Duration::ZERO);
        answers_as_one_by_one(ledger, store, "s").await;
    }

    #[tokio::test]
    async fn a_group_answers_as_its_ops_one_by_one_on_postgres() {
        let Some(db) = ScratchDatabase::for_test().await else {
            return;
        };
        let store = LedgerStore::connect(&db.url).await.unwrap();
        let ledger = Ledger::start(store.clone(), Duration::from_secs(30));
        answers_as_one_by_one(ledger, store, "p").await;
    }

    /// Every group statement binds fast on SQLite: each of its parameters used once, in order
    /// (a statement that reused one would silently keep `$N`, and binding it is quadratic).
    #[test]
    fn every_group_statement_takes_anonymous_parameters_on_sqlite() {
        use super::{text, Kind};
        for kind in [
            Kind::InsertRows,
            Kind::ReadRows,
            Kind::InsertOrigins,
            Kind::RecordOrigins,
            Kind::DeleteOrigins,
            Kind::Finish,
        ] {
            for rows in [1, 2, 64, super::MAX_ROWS] {
                let sql = text(kind, rows);
                let anonymous = super::super::anonymous(&sql).unwrap_or_else(|| {
                    panic!("a parameter is reused or out of order for {rows} rows: {sql}")
                });
                assert!(!anonymous.contains('$'), "{anonymous}");
                assert_eq!(
                    anonymous.matches('?').count(),
                    sql.matches('$').count(),
                    "{sql}"
                );
            }
        }
    }

    #[test]
    fn pieces_are_powers_of_two_up_to_the_maximum_and_cover_everything() {
        for n in [0usize, 1, 2, 3, 7, 64, 100, 128, 129, 300, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let lens: Vec<usize> = pieces(&items).map(<[usize]>::len).collect();
            assert_eq!(lens.iter().sum::<usize>(), n, "{n}: {lens:?}");
            assert!(
                lens.iter()
                    .all(|l| l.is_power_of_two() && *l <= super::MAX_ROWS),
                "{n}: {lens:?}"
            );
            let flat: Vec<usize> = pieces(&items).flatten().copied().collect();
            assert_eq!(flat, items);
        }
        assert_eq!(
            pieces(&[0u8; 100]).map(<[u8]>::len).collect::<Vec<_>>(),
            [64, 32, 4]
        );
    }
}
