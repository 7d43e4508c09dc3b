//! `meterflow emulate billwerk` through real HTTP on 127.0.0.1: every documented behaviour,
//! the rate-limit variants and the fault modes.

use std::time::{Duration, Instant};

use meterflow::emulator::billwerk::{self, BillwerkEmulator, BillwerkOptions};
use meterflow::emulator::{FaultSettings, RateLimitSettings};
use reqwest::StatusCode;
use serde_json::{json, Value};

const CONTRACT: &str = "5ce53069443e551b9caccc64";
const OTHER_CONTRACT: &str = "5ce53069443e551b9caccc65";
const COMPONENT: &str = "5ce53069443e551b9cacc000";

async fn start(options: BillwerkOptions) -> BillwerkEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    billwerk::start(options, listener).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A token through the documented flow: HTTP Basic, form body, trailing slash.
async fn fetch_token(emulator: &BillwerkEmulator) -> String {
    let options = BillwerkOptions::default();
    let response = client()
        .post(format!("{}/oauth/token/", emulator.base_url()))
        .basic_auth(&options.client_id, Some(options.client_secret.expose()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

fn usage_url(emulator: &BillwerkEmulator, contract: &str) -> String {
    format!("{}/api/v1/contracts/{contract}/usage", emulator.base_url())
}

async fn post_usage(
    emulator: &BillwerkEmulator,
    token: &str,
    contract: &str,
    body: Value,
) -> reqwest::Response {
    client()
        .post(usage_url(emulator, contract))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn usage(memo: &str) -> Value {
    json!({ "ComponentId": COMPONENT, "Quantity": 1, "Memo": memo })
}

async fn message_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["Message"].as_str().unwrap().to_string()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

fn is_billwerk_timestamp(text: &str) -> bool {
    let pattern = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{7}Z$").unwrap();
    pattern.is_match(text)
}

// ---- OAuth ----

#[tokio::test]
async fn token_flow_accepts_basic_and_form_credentials_with_and_without_slash() {
    let emulator = start(BillwerkOptions {
        token_lifetime: Duration::from_secs(90),
        ..BillwerkOptions::default()
    })
    .await;
    let options = BillwerkOptions::default();
    let basic = client()
        .post(format!("{}/oauth/token/", emulator.base_url()))
        .basic_auth(&options.client_id, Some(options.client_secret.expose()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::OK);
    let body: Value = basic.json().await.unwrap();
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 90);
    assert!(!body["access_token"].as_str().unwrap().is_empty());

    let form = client()
        .post(format!("{}/oauth/token", emulator.base_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", options.client_id.as_str()),
            ("client_secret", options.client_secret.expose()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), StatusCode::OK);
    let token: Value = form.json().await.unwrap();
    let token = token["access_token"].as_str().unwrap();
    let created = post_usage(&emulator, token, CONTRACT, usage("m")).await;
    assert_eq!(created.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn wrong_credentials_and_grants_are_refused() {
    let emulator = start(BillwerkOptions::default()).await;
    let options = BillwerkOptions::default();
    let wrong = client()
        .post(format!("{}/oauth/token/", emulator.base_url()))
        .basic_auth(&options.client_id, Some("not-the-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");

    let anonymous = client()
        .post(format!("{}/oauth/token/", emulator.base_url()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let password_grant = client()
        .post(format!("{}/oauth/token/", emulator.base_url()))
        .basic_auth(&options.client_id, Some(options.client_secret.expose()))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(password_grant.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn expired_unknown_missing_and_revoked_tokens_answer_401() {
    let emulator = start(BillwerkOptions {
        token_lifetime: Duration::from_secs(1),
        ..BillwerkOptions::default()
    })
    .await;
    let token = fetch_token(&emulator).await;
    assert_eq!(
        post_usage(&emulator, &token, CONTRACT, usage("a"))
            .await
            .status(),
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = post_usage(&emulator, &token, CONTRACT, usage("b")).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&expired, "www-authenticate"), Some("Bearer"));

    let unknown = post_usage(&emulator, "not-a-token", CONTRACT, usage("c")).await;
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    let missing = client()
        .post(usage_url(&emulator, CONTRACT))
        .json(&usage("d"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);

    let fresh = fetch_token(&emulator).await;
    let revoke = client()
        .delete(format!("{}/_emulator/tokens", emulator.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    let revoked = post_usage(&emulator, &fresh, CONTRACT, usage("e")).await;
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        emulator.records().len(),
        1,
        "only the first usage was stored"
    );
}

// ---- creating usage ----

#[tokio::test]
async fn created_usage_echoes_the_stored_record_in_billwerk_format() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = fetch_token(&emulator).await;
    // Raw text, so the exact decimal spelling reaches the server.
    let body = r#"{ "ComponentId": "5ce53069443e551b9cacc000", "Quantity": 1.50,
        "DueDate": "2019-05-21T06:11:34.12Z", "Memo": "mf1-0001",
        "ProductOverride": { "PricePerUnit": 100.0001, "Name": "MeteredUsage2.0",
                             "Description": "Hey, I'm an overridden metered usage" } }"#;
    let response = client()
        .post(usage_url(&emulator, CONTRACT))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#""Quantity":1.50"#),
        "exact decimal echoed: {text}"
    );
    assert!(text.contains(r#""PricePerUnit":100.0001"#), "{text}");
    let echo: Value = serde_json::from_str(&text).unwrap();
    let id = echo["Id"].as_str().unwrap();
    assert_eq!(id.len(), 24);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(echo["ContractId"], CONTRACT);
    assert_eq!(echo["ComponentId"], COMPONENT);
    assert_eq!(echo["DueDate"], "2019-05-21T06:11:34.1200000Z");
    assert!(
        is_billwerk_timestamp(echo["TransferredAt"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(echo["Memo"], "mf1-0001");
    assert_eq!(echo["Key"], "");
    assert_eq!(echo["ProductOverride"]["Name"], "MeteredUsage2.0");

    let records = emulator.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, id);
    assert_eq!(records[0].quantity.to_string(), "1.50");
    assert_eq!(
        records[0]
            .product_override
            .as_ref()
            .unwrap()
            .price_per_unit
            .unwrap()
            .to_string(),
        "100.0001"
    );
}

#[tokio::test]
async fn property_names_are_case_insensitive_and_due_date_defaults_to_transfer_time() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = fetch_token(&emulator).await;
    let response = post_usage(
        &emulator,
        &token,
        CONTRACT,
        json!({ "componentId": COMPONENT, "QUANTITY": "2.5", "memo": "lower" }),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["ComponentId"], COMPONENT);
    assert_eq!(echo["Quantity"].to_string(), "2.5");
    assert_eq!(echo["Memo"], "lower");
    assert_eq!(echo["DueDate"], echo["TransferredAt"]);
    assert!(echo.get("ProductOverride").is_none());
}

#[tokio::test]
async fn invalid_usage_is_refused_with_the_field_named_and_nothing_stored() {
    let emulator = start(BillwerkOptions {
        components: vec![COMPONENT.to_string()],
        ..BillwerkOptions::default()
    })
    .await;
    let token = fetch_token(&emulator).await;

    let not_json = client()
        .post(usage_url(&emulator, CONTRACT))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"ComponentId\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);

    let cases = [
        (json!({ "Quantity": 1 }), "ComponentId"),
        (
            json!({ "ComponentId": "5ce53069443e551b9cacc999", "Quantity": 1 }),
            "ComponentId",
        ),
        (
            json!({ "ComponentId": COMPONENT, "Quantity": "a lot" }),
            "Quantity",
        ),
        (
            json!({ "ComponentId": COMPONENT, "Quantity": 1, "DueDate": "next tuesday" }),
            "DueDate",
        ),
        (
            json!({ "ComponentId": COMPONENT, "Quantity": 1, "ProductOverride": { "PricePerUnit": "free" } }),
            "PricePerUnit",
        ),
    ];
    for (body, field) in cases {
        let response = post_usage(&emulator, &token, CONTRACT, body.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        let message = message_of(response).await;
        assert!(message.contains(field), "{body} → {message}");
    }

    let malformed = post_usage(&emulator, &token, "not-a-contract-id", usage("m")).await;
    assert_eq!(malformed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message_of(malformed).await.contains("ContractId"));

    assert!(emulator.records().is_empty());
    let stats = emulator.stats();
    assert_eq!(stats.answers(400), 1);
    assert_eq!(stats.answers(422), 6);
}

#[tokio::test]
async fn seeded_contracts_make_unknown_contract_ids_404_unless_any_is_accepted() {
    let seeded = start(BillwerkOptions::default().with_contract("cust-1", CONTRACT)).await;
    let token = fetch_token(&seeded).await;
    assert_eq!(
        post_usage(&seeded, &token, CONTRACT, usage("a"))
            .await
            .status(),
        StatusCode::CREATED
    );
    let unknown = post_usage(&seeded, &token, OTHER_CONTRACT, usage("b")).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(message_of(unknown).await.contains(OTHER_CONTRACT));

    let open = start(BillwerkOptions {
        accept_any_contract: Some(true),
        ..BillwerkOptions::default().with_contract("cust-1", CONTRACT)
    })
    .await;
    let token = fetch_token(&open).await;
    assert_eq!(
        post_usage(&open, &token, OTHER_CONTRACT, usage("b"))
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn legal_entity_header_is_required_when_configured() {
    let emulator = start(BillwerkOptions {
        require_legal_entity: Some("entity-7".into()),
        ..BillwerkOptions::default()
    })
    .await;
    let token = fetch_token(&emulator).await;
    let without = post_usage(&emulator, &token, CONTRACT, usage("a")).await;
    assert_eq!(without.status(), StatusCode::FORBIDDEN);
    assert!(message_of(without)
        .await
        .contains("X-SELECTED-LEGAL-ENTITY-ID"));
    let with = client()
        .post(usage_url(&emulator, CONTRACT))
        .bearer_auth(&token)
        .header("X-SELECTED-LEGAL-ENTITY-ID", "entity-7")
        .json(&usage("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), StatusCode::CREATED);
}

// ---- listing, deleting, contracts ----

#[tokio::test]
async fn listing_pages_by_cursor_and_filters_on_creation_time() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = fetch_token(&emulator).await;
    let mut ids = Vec::new();
    for memo in ["1", "2", "3"] {
        let echo: Value = post_usage(&emulator, &token, CONTRACT, usage(memo))
            .await
            .json()
            .await
            .unwrap();
        ids.push(echo["Id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let echo: Value = post_usage(&emulator, &token, CONTRACT, usage("4"))
        .await
        .json()
        .await
        .unwrap();
    ids.push(echo["Id"].as_str().unwrap().to_string());
    post_usage(&emulator, &token, OTHER_CONTRACT, usage("elsewhere")).await;

    let list = |query: String| {
        let url = format!("{}?{query}", usage_url(&emulator, CONTRACT));
        let token = token.clone();
        async move {
            let response = client().get(url).bearer_auth(token).send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    };
    let memos = |body: &Value| -> Vec<String> {
        body.as_array()
            .unwrap()
            .iter()
            .map(|record| record["Memo"].as_str().unwrap().to_string())
            .collect()
    };

    let (status, all) = list(String::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(memos(&all), ["1", "2", "3", "4"]);
    assert!(is_billwerk_timestamp(
        all[0]["TransferredAt"].as_str().unwrap()
    ));

    let (_, first_page) = list("take=2".into()).await;
    assert_eq!(memos(&first_page), ["1", "2"]);
    let (_, second_page) = list(format!("from={}&take=2", ids[1])).await;
    assert_eq!(memos(&second_page), ["3", "4"]);

    let stamp = between.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (_, after) = list(format!("fromDateTime={stamp}")).await;
    assert_eq!(memos(&after), ["4"]);
    let (_, before) = list(format!("untilDateTime={stamp}")).await;
    assert_eq!(memos(&before), ["1", "2", "3"]);

    let (status, _) = list("take=501".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unbilled_usage_can_be_deleted_once() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = fetch_token(&emulator).await;
    let echo: Value = post_usage(&emulator, &token, CONTRACT, usage("gone"))
        .await
        .json()
        .await
        .unwrap();
    let url = format!(
        "{}/{}",
        usage_url(&emulator, CONTRACT),
        echo["Id"].as_str().unwrap()
    );
    let deleted = client()
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let again = client()
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    assert!(emulator.records().is_empty());
    let listed: Value = client()
        .get(usage_url(&emulator, CONTRACT))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!([]));
    assert_eq!(emulator.stats().records, 0);
}

/// billwerk deletes only unbilled usage. After a billing run (or one record marked billed)
/// the DELETE is refused with the configured status and a `Message` saying so, and the record
/// stays; usage created after the run is unbilled again.
#[tokio::test]
async fn billed_usage_cannot_be_deleted() {
    let emulator = start(BillwerkOptions {
        billed_delete_status: 409,
        ..BillwerkOptions::default()
    })
    .await;
    let token = fetch_token(&emulator).await;
    let mut ids = Vec::new();
    for memo in ["billed-1", "billed-2"] {
        let echo: Value = post_usage(&emulator, &token, CONTRACT, usage(memo))
            .await
            .json()
            .await
            .unwrap();
        ids.push(echo["Id"].as_str().unwrap().to_string());
    }
    let control = |path: String| {
        client()
            .post(format!("{}{path}", emulator.base_url()))
            .send()
    };
    let marked = control(format!("/_emulator/usage/{}/billed", ids[0]))
        .await
        .unwrap();
    assert_eq!(marked.status(), StatusCode::NO_CONTENT);
    let unknown = control("/_emulator/usage/ffffffff0000000000000009/billed".into())
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let delete = |id: &str| {
        client()
            .delete(format!("{}/{id}", usage_url(&emulator, CONTRACT)))
            .bearer_auth(&token)
            .send()
    };
    let refused = delete(&ids[0]).await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["Message"].as_str().unwrap().contains("already billed"),
        "{body}"
    );

    let run: Value = control("/_emulator/billing-run".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["billed"], 1, "the one not billed yet");
    assert_eq!(
        delete(&ids[1]).await.unwrap().status(),
        StatusCode::CONFLICT
    );
    assert_eq!(emulator.records().len(), 2);
    assert!(emulator.records().iter().all(|r| r.billed));

    let echo: Value = post_usage(&emulator, &token, CONTRACT, usage("after-the-run"))
        .await
        .json()
        .await
        .unwrap();
    let after = delete(echo["Id"].as_str().unwrap()).await.unwrap();
    assert_eq!(after.status(), StatusCode::NO_CONTENT);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(
        billwerk::start(
            BillwerkOptions {
                billed_delete_status: 204,
                ..BillwerkOptions::default()
            },
            listener
        )
        .await
        .is_err(),
        "a refusal must be a 4xx"
    );
}

#[tokio::test]
async fn contracts_are_found_by_external_id_from_flags_and_files() {
    let file_seeds = billwerk::SeedContract::from_json_file_text(&format!(
        r#"[{{"Id":"{OTHER_CONTRACT}","ExternalId":"cust-2","PlanId":"plan-9"}}]"#
    ))
    .unwrap();
    let mut options = BillwerkOptions::default().with_contract("cust-1", CONTRACT);
    options.contracts.extend(file_seeds);
    let emulator = start(options).await;
    let token = fetch_token(&emulator).await;
    let find = |external_id: &str| {
        let url = format!(
            "{}/api/v1/contracts?externalId={external_id}",
            emulator.base_url()
        );
        let token = token.clone();
        async move {
            let response = client().get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()
        }
    };
    let found = find("cust-1").await;
    assert_eq!(found, json!([{ "Id": CONTRACT, "ExternalId": "cust-1" }]));
    let from_file = find("cust-2").await;
    assert_eq!(from_file[0]["Id"], OTHER_CONTRACT);
    assert_eq!(from_file[0]["PlanId"], "plan-9");
    assert_eq!(find("nobody").await, json!([]));

    let by_id = client()
        .get(format!(
            "{}/api/v1/contracts/{CONTRACT}",
            emulator.base_url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(by_id.status(), StatusCode::OK);
    assert_eq!(by_id.json::<Value>().await.unwrap()["ExternalId"], "cust-1");
    let unknown = client()
        .get(format!(
            "{}/api/v1/contracts/5ce53069443e551b9caccfff",
            emulator.base_url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    let anonymous = client()
        .get(format!(
            "{}/api/v1/contracts?externalId=cust-1",
            emulator.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unknown_endpoints_answer_404_with_a_message() {
    let emulator = start(BillwerkOptions::default()).await;
    let response = client()
        .get(format!("{}/api/v1/nothing-here", emulator.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(message_of(response).await.contains("nothing-here"));
}

// ---- rate limit ----

#[tokio::test]
async fn rate_limit_headers_count_down_and_429_beyond_the_limit() {
    let emulator = start(
        BillwerkOptions::default()
            .with_limit(RateLimitSettings::per_window(3, Duration::from_secs(60))),
    )
    .await;
    let token = fetch_token(&emulator).await; // the token request counts too: 2 left
    let first = post_usage(&emulator, &token, CONTRACT, usage("a")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(header(&first, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&first, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(header(&first, "retry-after"), None);
    assert_eq!(header(&first, "x-ratelimit-reset"), None);
    let second = post_usage(&emulator, &token, CONTRACT, usage("b")).await;
    assert_eq!(header(&second, "x-ratelimit-remaining"), Some("0"));
    let refused = post_usage(&emulator, &token, CONTRACT, usage("c")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&refused, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&refused, "retry-after"),
        None,
        "not sent unless asked for"
    );
    assert!(!message_of(refused).await.is_empty());

    assert_eq!(
        emulator.records().len(),
        2,
        "a refused request stores nothing"
    );
    // Inspection is neither limited nor decorated.
    let stats = client()
        .get(format!("{}/_emulator/stats", emulator.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), StatusCode::OK);
    assert_eq!(header(&stats, "x-ratelimit-limit"), None);
    let stats: Value = stats.json().await.unwrap();
    assert_eq!(stats["rate_limited"], 1);
    assert_eq!(stats["answers_by_status"]["429"], 1);
    assert_eq!(stats["answers_by_status"]["201"], 2);
}

#[tokio::test]
async fn retry_after_and_reset_headers_follow_the_window_which_then_reopens() {
    let emulator = start(BillwerkOptions::default().with_limit(RateLimitSettings {
        limit: 1,
        window: Duration::from_secs(2),
        headers: true,
        retry_after: true,
        reset_header: true,
    }))
    .await;
    let token = emulator.provider().issue_token(); // in-process: does not use up the window
                                                   // A fresh window now, however long start-up took.
    emulator.set_limit(emulator.limit().settings).unwrap();
    let admitted = post_usage(&emulator, &token, CONTRACT, usage("a")).await;
    assert_eq!(admitted.status(), StatusCode::CREATED);
    let reset: u64 = header(&admitted, "x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&reset), "reset {reset}");
    assert_eq!(header(&admitted, "retry-after"), None, "only on 429");

    let refused = post_usage(&emulator, &token, CONTRACT, usage("b")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "retry-after {retry_after}");
    assert!(header(&refused, "x-ratelimit-reset").is_some());

    let window_end = emulator.limit().resets_in_ms.unwrap();
    tokio::time::sleep(Duration::from_millis(window_end + 50)).await;
    let next_window = post_usage(&emulator, &token, CONTRACT, usage("c")).await;
    assert_eq!(next_window.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn header_free_variant_still_limits() {
    let emulator = start(BillwerkOptions::default().with_limit(RateLimitSettings {
        headers: false,
        ..RateLimitSettings::per_window(1, Duration::from_secs(60))
    }))
    .await;
    let token = emulator.provider().issue_token();
    let admitted = post_usage(&emulator, &token, CONTRACT, usage("a")).await;
    assert_eq!(admitted.status(), StatusCode::CREATED);
    assert_eq!(header(&admitted, "x-ratelimit-limit"), None);
    assert_eq!(header(&admitted, "x-ratelimit-remaining"), None);
    let refused = post_usage(&emulator, &token, CONTRACT, usage("b")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "x-ratelimit-remaining"), None);
}

#[tokio::test]
async fn unlimited_sends_no_rate_limit_headers() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = fetch_token(&emulator).await;
    let response = post_usage(&emulator, &token, CONTRACT, usage("a")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header(&response, "x-ratelimit-limit"), None);
}

#[tokio::test]
async fn the_limit_changes_while_running() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = emulator.provider().issue_token();
    let limit_url = format!("{}/_emulator/limit", emulator.base_url());
    let set = client()
        .put(&limit_url)
        .json(&json!({ "limit": 2, "window": "10s" }))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), StatusCode::OK);
    let status: Value = client()
        .get(&limit_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["limit"], 2);
    assert_eq!(status["window"], "10s");
    assert_eq!(status["remaining"], 2);
    assert!(status["resets_in_ms"].as_u64().unwrap() <= 10_000);

    for memo in ["a", "b"] {
        let response = post_usage(&emulator, &token, CONTRACT, usage(memo)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let refused = post_usage(&emulator, &token, CONTRACT, usage("c")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(emulator.limit().remaining, Some(0));

    // Raising the limit starts a fresh window at once.
    emulator
        .set_limit(RateLimitSettings::per_window(5, Duration::from_secs(10)))
        .unwrap();
    let admitted = post_usage(&emulator, &token, CONTRACT, usage("d")).await;
    assert_eq!(admitted.status(), StatusCode::CREATED);
    assert_eq!(header(&admitted, "x-ratelimit-remaining"), Some("4"));

    let invalid = client()
        .put(&limit_url)
        .json(&json!({ "limit": 2, "window": "0s" }))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    let off = client()
        .put(&limit_url)
        .json(&json!({ "limit": 0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), StatusCode::OK);
    let unlimited = post_usage(&emulator, &token, CONTRACT, usage("e")).await;
    assert_eq!(unlimited.status(), StatusCode::CREATED);
    assert_eq!(header(&unlimited, "x-ratelimit-limit"), None);
}

// ---- faults ----

#[tokio::test]
async fn failures_answer_5xx_and_store_nothing() {
    let emulator = start(BillwerkOptions::default().with_faults(FaultSettings {
        fail_rate: 1.0,
        ..FaultSettings::default()
    }))
    .await;
    let token = fetch_token(&emulator).await;
    for memo in ["a", "b", "c", "d", "e", "f"] {
        let status = post_usage(&emulator, &token, CONTRACT, usage(memo))
            .await
            .status();
        assert!([500, 502, 503].contains(&status.as_u16()), "got {status}");
    }
    assert!(emulator.records().is_empty());
    assert_eq!(emulator.stats().faults_injected.fail, 6);
}

#[tokio::test]
async fn slow_answers_time_the_client_out_but_the_usage_is_stored() {
    let emulator = start(BillwerkOptions::default().with_faults(FaultSettings {
        slow_rate: 1.0,
        slow_duration: Duration::from_secs(2),
        ..FaultSettings::default()
    }))
    .await;
    let token = fetch_token(&emulator).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let error = impatient
        .post(usage_url(&emulator, CONTRACT))
        .bearer_auth(&token)
        .json(&usage("slow-1"))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    let records = emulator.records();
    assert_eq!(records.len(), 1, "stored although the client saw a timeout");
    assert_eq!(records[0].memo.as_deref(), Some("slow-1"));
    assert_eq!(emulator.stats().faults_injected.slow, 1);
}

#[tokio::test]
async fn dropped_connections_store_the_usage_and_give_no_status() {
    let emulator = start(BillwerkOptions::default().with_faults(FaultSettings {
        drop_rate: 1.0,
        ..FaultSettings::default()
    }))
    .await;
    let token = fetch_token(&emulator).await;
    let error = client()
        .post(usage_url(&emulator, CONTRACT))
        .bearer_auth(&token)
        .json(&usage("mf1-dropped"))
        .send()
        .await
        .unwrap_err();
    assert!(!error.is_timeout(), "{error:?}");
    assert!(
        error.status().is_none(),
        "no answer, so no status: {error:?}"
    );
    assert!(error.is_request() || error.is_connect(), "{error:?}");
    assert_eq!(
        emulator.records().len(),
        1,
        "stored before the connection was dropped"
    );

    // The naive retry bills twice, and the emulator says so.
    emulator.set_faults(FaultSettings::default()).unwrap();
    let retry = post_usage(&emulator, &token, CONTRACT, usage("mf1-dropped")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    let stats = emulator.stats();
    assert_eq!(stats.records, 2);
    assert_eq!(stats.duplicate_keys, 1);
    assert_eq!(stats.records_per_delivery_key["mf1-dropped"], 2);
    assert_eq!(stats.faults_injected.drop, 1);
    assert_eq!(
        stats.answers(201),
        1,
        "the dropped request had no answer to count"
    );
}

#[tokio::test]
async fn latency_delays_answers_and_faults_change_while_running() {
    let emulator = start(BillwerkOptions::default()).await;
    let token = emulator.provider().issue_token();
    let faults_url = format!("{}/_emulator/faults", emulator.base_url());
    let set = client()
        .put(&faults_url)
        .json(&json!({ "latency": "300ms" }))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), StatusCode::OK);
    let started = Instant::now();
    let response = post_usage(&emulator, &token, CONTRACT, usage("late")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(emulator.stats().faults_injected.latency, 1);

    let shown: Value = client()
        .get(&faults_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["latency"], "300ms");
    assert_eq!(shown["drop_rate"], 0.0);
    let invalid = client()
        .put(&faults_url)
        .json(&json!({ "drop_rate": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
}

// ---- inspection ----

#[tokio::test]
async fn inspection_shows_records_and_stats_and_reset_clears_them() {
    let emulator = start(
        BillwerkOptions::default()
            .with_limit(RateLimitSettings::per_window(100, Duration::from_secs(60))),
    )
    .await;
    let token = fetch_token(&emulator).await;
    post_usage(
        &emulator,
        &token,
        CONTRACT,
        json!({ "ComponentId": COMPONENT, "Quantity": "0.0001", "Memo": "k1",
                "DueDate": "2026-03-01T00:00:00Z", "ProductOverride": { "PricePerUnit": "1.10" } }),
    )
    .await;
    post_usage(&emulator, &token, CONTRACT, usage("k1")).await;
    post_usage(&emulator, &token, CONTRACT, usage("k2")).await;
    post_usage(&emulator, &token, "bad", usage("k3")).await;

    let base = emulator.base_url();
    let records: Value = client()
        .get(format!("{base}/_emulator/records"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &records[0];
    assert_eq!(first["contract_id"], CONTRACT);
    assert_eq!(first["component_id"], COMPONENT);
    assert_eq!(first["quantity"], "0.0001");
    assert_eq!(first["memo"], "k1");
    assert_eq!(first["product_override"]["price_per_unit"], "1.10");
    assert!(first["due_date"]
        .as_str()
        .unwrap()
        .starts_with("2026-03-01T00:00:00"));
    assert!(first["created_at"].is_string());

    let stats: Value = client()
        .get(format!("{base}/_emulator/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["records"], 3);
    assert_eq!(stats["delivery_keys"], 2);
    assert_eq!(stats["duplicate_keys"], 1);
    assert_eq!(stats["records_per_delivery_key"]["k1"], 2);
    assert_eq!(stats["answers_by_status"]["200"], 1, "the token");
    assert_eq!(stats["answers_by_status"]["201"], 3);
    assert_eq!(stats["answers_by_status"]["422"], 1);
    let compact: Value = client()
        .get(format!("{base}/_emulator/stats?per_key=false"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(compact["records_per_delivery_key"], json!({}));
    assert_eq!(compact["duplicate_keys"], 1);

    emulator
        .set_limit(RateLimitSettings::per_window(1, Duration::from_secs(60)))
        .unwrap();
    let reset = client()
        .post(format!("{base}/_emulator/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert!(emulator.records().is_empty());
    let stats = emulator.stats();
    assert_eq!(stats.records, 0);
    assert!(stats.answers_by_status.is_empty());
    assert_eq!(
        emulator.limit().settings.limit,
        100,
        "back to the start-up limit"
    );
    assert_eq!(emulator.limit().remaining, Some(100));
    // Tokens survive a reset: a running client keeps working.
    let after = post_usage(&emulator, &token, CONTRACT, usage("k1")).await;
    assert_eq!(after.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let emulator = start(BillwerkOptions::default()).await;
    let url = format!("{}/_emulator/stats", emulator.base_url());
    assert!(client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
    emulator.shutdown().await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(&url).send().await.is_err());
}

// ---- the command line ----

#[tokio::test]
async fn the_command_says_where_credentials_came_from_never_the_secret_and_stops_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let contracts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        contracts.path(),
        format!(r#"[{{"Id":"{CONTRACT}","ExternalId":"cust-cli"}}]"#),
    )
    .unwrap();
    let secret = "cli-secret-that-must-not-be-printed";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args([
            "emulate",
            "billwerk",
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "cli-client",
        ])
        .arg("--contracts")
        .arg(contracts.path())
        .env("METERFLOW_EMULATOR_CLIENT_SECRET", secret)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            let done = line.contains("inspection");
            banner.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the start-up banner within 20 s");
    let banner = banner.join("\n");
    assert!(banner.contains("client id from --client-id"), "{banner}");
    assert!(
        banner.contains("client secret from $METERFLOW_EMULATOR_CLIENT_SECRET"),
        "{banner}"
    );
    assert!(banner.contains("contracts seeded: 1"), "{banner}");
    assert!(!banner.contains(secret), "the secret was printed: {banner}");
    let base_url = banner
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap()
        .to_string();

    let token = client()
        .post(format!("{base_url}/oauth/token/"))
        .basic_auth("cli-client", Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), StatusCode::OK);
    let token: Value = token.json().await.unwrap();
    let found: Value = client()
        .get(format!("{base_url}/api/v1/contracts?externalId=cust-cli"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found[0]["Id"], CONTRACT);

    let pid = child.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
