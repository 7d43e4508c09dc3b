//! A replica that starts while another one is busy on the same PostgreSQL ledger: its schema
//! set-up (every `CREATE ... IF NOT EXISTS`) must neither fail nor make the busy replica's
//! transactions fail. Seen in the two-replica failure test: "cannot open the delivery ledger:
//! deadlock detected" when the schema set-up ran as one transaction that kept each table's
//! lock while it waited for the next.

use std::time::{Duration, Instant};

use sqlx::{Connection, Row};

use meterflow::ack::ledger::scratch::ScratchDatabase;
use meterflow::ack::ledger::Ledger;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_beside_a_busy_one_opens_the_ledger_without_deadlock() {
    let Some(database) = ScratchDatabase::for_test().await else {
        return;
    };
    let lease = Duration::from_secs(6);
    // The first replica created the schema.
    Ledger::open(&database.url, lease).await.unwrap();

    // The busy replica: a transaction that has written a dead letter and will next write a
    // delivery (the group-commit writer's transactions touch several tables).
    let mut busy = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut busy).await.unwrap();
    sqlx::query(
        "INSERT INTO meterflow_dead_letters (topic, source_partition, source_offset, written_at) \
         VALUES ('usage', 0, 1, 0)",
    )
    .execute(&mut busy)
    .await
    .unwrap();

    // The second replica starts; its schema set-up reaches the dead-letter table and waits.
    let url = database.url.clone();
    let starting = tokio::spawn(async move { Ledger::open(&url, lease).await.map(|_| ()) });
    let mut observer = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query("SELECT count(*) FROM pg_locks WHERE NOT granted")
            .fetch_one(&mut observer)
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline && !starting.is_finished(),
            "the starting replica's schema set-up waits for the busy transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The busy transaction goes on to another table, and commits.
    let written = sqlx::query(
        "INSERT INTO meterflow_deliveries \
         (delivery_key, state, receipt, event_count, first_sent_at, updated_at) \
         VALUES ('mf1-busy', 'sending', NULL, 1, 0, 0)",
    )
    .execute(&mut busy)
    .await;
    let committed = match written {
        Ok(_) => sqlx::query("COMMIT").execute(&mut busy).await.map(|_| ()),
        Err(e) => Err(e),
    };
    let opened = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the starting replica opens the ledger in time")
        .unwrap();
    assert!(
        committed.is_ok(),
        "the busy replica's transaction was not aborted: {committed:?}"
    );
    assert!(
        opened.is_ok(),
        "the starting replica opened the ledger: {opened:?}"
    );
    drop(database);
}
