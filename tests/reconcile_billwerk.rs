//! billwerk reconciliation (the look-up before a re-send) over real HTTP: it pages through the
//! contract's usage until an empty page, whatever size the server gives its pages, and a server
//! whose cursor stalls or never ends makes it fail (the runner looks again later) instead of
//! answering "not there", which would re-send and bill twice.

use meterflow_testkit as common;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use meterflow::config::RateLimitConfig;
use meterflow::deliver::billwerk::BillwerkSink;
use meterflow::deliver::client::Turn;
use meterflow::deliver::ratelimit::RateLimiter;
use meterflow::deliver::{Attempt, Delivery, DeliveryItem, Reconciled, Sink};
use meterflow::emulator::billwerk::{self, BillwerkOptions};
use meterflow::event::{BillableUsage, CustomerRef, DeliveryKey, RawMessage, SourceRef};

const CONTRACT: &str = "5cd186af443e551fe8e4f5c1";

fn sink(base_url: &str) -> BillwerkSink {
    let config = common::billwerk_config(
        "127.0.0.1:9",
        "g",
        "usage",
        "dlq",
        base_url,
        "sqlite::memory:",
    )
    .build()
    .expect("test config parses");
    let limiter = Arc::new(RateLimiter::new(&config.rate_limit).for_sink("billwerk"));
    BillwerkSink::new(&config.sink, limiter).expect("sink")
}

fn delivery(event_id: &str) -> Delivery {
    Delivery {
        key: DeliveryKey::for_event(event_id),
        items: vec![DeliveryItem {
            usage: BillableUsage {
                event_id: event_id.to_string(),
                customer: CustomerRef::ContractId(CONTRACT.to_string()),
                metric: "api_calls".into(),
                component_id: "5ce53069443e551b9caccc64".into(),
                quantity: Decimal::from_str("1.5").unwrap(),
                due_date: Utc.with_ymd_and_hms(2026, 11, 20, 10, 0, 0).unwrap(),
                product_override: None,
                attributes: Default::default(),
            },
            raw: RawMessage {
                source: SourceRef {
                    topic: "usage".into(),
                    partition: 0,
                    offset: 0,
                },
                key: None,
                payload: Default::default(),
                headers: vec![],
                generation: 1,
            },
        }],
    }
}

async fn reconcile(sink: &BillwerkSink, event_id: &str) -> Result<Reconciled, String> {
    let since = Utc::now() - chrono::Duration::minutes(1);
    tokio::time::timeout(
        Duration::from_secs(60),
        sink.reconcile(&delivery(event_id), since),
    )
    .await
    .expect("reconciliation ends")
}

/// A contract with 1 200 records on a server that answers pages of 100 although 500 were asked
/// for: the key of the 1 101st record is found, and a key that is not there is reported absent
/// only after the empty page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_pages_past_short_pages_until_an_empty_one() {
    let emulator =
        common::billwerk_emulator(BillwerkOptions::default().with_list_page_cap(100)).await;
    let sink = sink(&emulator.base_url());
    // The runner takes each delivery request's turn; here a pace that never makes them wait.
    let unhurried = RateLimiter::new(&RateLimitConfig {
        initial_rate: 1_000_000,
        ..RateLimitConfig::default()
    });
    let mut receipts = Vec::new();
    for i in 0..1200 {
        let turn = Turn::wait(&unhurried).await;
        match sink.send(&delivery(&format!("paging_{i}")), turn).await {
            Attempt::Accepted { receipt } => receipts.push(receipt),
            other => panic!("record {i} not created: {other:?}"),
        }
    }
    assert_eq!(emulator.records().len(), 1200);

    for (i, expected) in [
        (1100, &receipts[1100]),
        (1199, &receipts[1199]),
        (0, &receipts[0]),
    ] {
        match reconcile(&sink, &format!("paging_{i}")).await {
            Ok(Reconciled::Found { receipt }) => assert_eq!(&receipt, expected, "record {i}"),
            other => panic!("record {i} (beyond the first short page) not found: {other:?}"),
        }
    }
    assert!(
        matches!(
            reconcile(&sink, "never_sent").await,
            Ok(Reconciled::NotFound)
        ),
        "a key that is not there is reported absent"
    );
}

/// A stand-in for billwerk whose usage list answers `page(cursor)` to every request.
async fn scripted_billwerk(
    page: impl Fn(Option<String>) -> serde_json::Value + Clone + Send + Sync + 'static,
) -> (String, Arc<AtomicU64>) {
    let lists = Arc::new(AtomicU64::new(0));
    let counted = lists.clone();
    let app = axum::Router::new()
        .route(
            "/oauth/token/",
            post(|| async {
                axum::Json(json!({"access_token": "t", "token_type": "bearer", "expires_in": 3600}))
            }),
        )
        .route(
            "/api/v1/contracts/{id}/usage",
            get(
                move |axum::extract::Query(q): axum::extract::Query<
                    std::collections::HashMap<String, String>,
                >| {
                    let page = page.clone();
                    let counted = counted.clone();
                    async move {
                        counted.fetch_add(1, Ordering::Relaxed);
                        axum::Json(page(q.get("from").cloned()))
                    }
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, lists)
}

/// A server that ignores the cursor answers the same page forever: the search ends with an
/// error (the runner looks again later, nothing is re-sent), not with "not found".
#[tokio::test]
async fn reconciliation_fails_when_the_cursor_does_not_advance() {
    let (base, lists) = scripted_billwerk(
        |_| json!([{"Id": "6b0ed54300000000000000a1", "Memo": "mf1-someone-else"}]),
    )
    .await;
    let result = reconcile(&sink(&base), "stalled").await;
    let detail = result.expect_err("a cursor that does not advance is an error, not 'absent'");
    assert!(detail.contains("did not advance"), "{detail}");
    assert_eq!(
        lists.load(Ordering::Relaxed),
        2,
        "stops at the first repeat"
    );
}

/// A server whose pages never end: the search stops at its page bound with an error.
#[tokio::test]
async fn reconciliation_fails_after_its_page_bound() {
    let (base, lists) = scripted_billwerk(|from| {
        let next = from
            .and_then(|f| u64::from_str_radix(&f, 16).ok())
            .map_or(1, |n| n + 1);
        json!([{"Id": format!("{next:024x}"), "Memo": "mf1-someone-else"}])
    })
    .await;
    let result = reconcile(&sink(&base), "endless").await;
    let detail = result.expect_err("an endless listing is an error, not 'absent'");
    assert!(detail.contains("pages"), "{detail}");
    assert!(lists.load(Ordering::Relaxed) > 1);
}

/// A contract billwerk does not know answers the listing with 404: nothing can be recorded
/// under it, so the look-up says "not there" (the re-send is then refused and dead-lettered)
/// instead of failing forever and pinning the partition.
#[tokio::test]
async fn an_unknown_contract_is_not_there_rather_than_a_look_up_that_never_ends() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Seeded with another contract only: every other id answers 404.
    let emulator = billwerk::start(
        BillwerkOptions::default().with_contract("someone-else", "5cd186af443e551fe8e4f5ff"),
        listener,
    )
    .await
    .unwrap();
    let sink = sink(&emulator.base_url());
    assert_eq!(
        reconcile(&sink, "evt_unknown_contract").await,
        Ok(Reconciled::NotFound)
    );
}
