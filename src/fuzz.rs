//! Fuzz targets: everything a producer or a provider sends, as arbitrary bytes, through the code
//! that reads it. Each target returns `Err` with the broken invariant instead of panicking, so a
//! panic anywhere below is itself the finding.
//!
//! They run as ordinary tests (proptest over arbitrary bytes and mutations of the seed corpus in
//! `fuzz/corpus/<target>/`, below): cargo-fuzz needs a nightly toolchain, which a fresh machine
//! does not have. More cases: `METERFLOW_FUZZ_CASES=200000 cargo test --lib fuzz::`.
//!
//! - [`decode_event`]: the event decoder (billwerk and Billingrails rules), then what a decoded
//!   event reaches: the aggregation sum, the usage body, the request path and query.
//! - [`rate_headers`]: `Retry-After`, `X-RateLimit-*` through the header reader, the pace model,
//!   the limiter and its gate.
//! - [`billwerk_answer`]: billwerk's answers: classification, error message, contract lookup,
//!   created record, usage page.
//! - [`billingrails_answer`]: Billingrails' answers: classification, named events, reasons.
//! - [`token_answer`]: billwerk's token answer.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::StatusCode;

use crate::batch::{self, Bucket, Grouping};
use crate::config::{InputMapping, RateLimitConfig, SinkKind};
use crate::decode::EventDecoder;
use crate::deliver::billwerk::payload::usage_body;
use crate::deliver::billwerk::{api_url, error_message, field, ContractView};
use crate::deliver::http::{rate_signals_at, MAX_HEADER_COUNT, MAX_HEADER_WAIT};
use crate::deliver::ratelimit::{PaceModel, RateLimiter, MAX_PACE, MIN_PACE};
use crate::deliver::{Delivery, DeliveryItem};
use crate::event::{is_billwerk_contract_id, BillableUsage, CustomerRef, RawMessage, SourceRef};

/// A status code in 100 ..= 599 from two bytes (big-endian: `\x01\xad` is 429).
fn status(bytes: &[u8]) -> StatusCode {
    let n = match bytes {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        [a] => u16::from(*a),
        [] => 200,
    };
    let n = if (100..=599).contains(&n) {
        n
    } else {
        100 + n % 500
    };
    StatusCode::from_u16(n).unwrap_or(StatusCode::OK)
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

/// The event decoder, and what a decoded event reaches.
pub fn decode_event(bytes: &[u8]) -> Result<(), String> {
    let billwerk = EventDecoder::for_sink(InputMapping::default(), SinkKind::Billwerk);
    let billingrails = EventDecoder::for_sink(InputMapping::default(), SinkKind::Billingrails);
    let _ = billingrails.decode(bytes);
    let event = match billwerk.decode(bytes) {
        Ok(event) => event,
        Err(rejection) => {
            return check(!rejection.detail.is_empty(), || {
                format!("a rejection without detail: {rejection:?}")
            })
        }
    };
    check(event.quantity > rust_decimal::Decimal::ZERO, || {
        format!("quantity {} accepted", event.quantity)
    })?;
    check(
        event.id.chars().count() <= crate::decode::MAX_ID_CHARS,
        || "an overlong id accepted".into(),
    )?;
    let api = url::Url::parse("https://billwerk.example/api/v1").map_err(|e| e.to_string())?;
    match &event.customer {
        CustomerRef::ContractId(id) => {
            check(is_billwerk_contract_id(id), || {
                format!("contract id {id:?} accepted")
            })?;
            let url = api_url(&api, &["contracts", id, "usage"]);
            check(
                url.path() == format!("/api/v1/contracts/{id}/usage") && url.query().is_none(),
                || format!("contract id {id:?} changed the path: {url}"),
            )?;
        }
        CustomerRef::ExternalId(external) => {
            let request = reqwest::Client::new()
                .get(api_url(&api, &["contracts"]))
                .query(&[("externalId", external.as_str())])
                .build()
                .map_err(|e| format!("lookup request for {external:?}: {e}"))?;
            let pairs: Vec<(String, String)> = request
                .url()
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            check(
                request.url().path() == "/api/v1/contracts"
                    && pairs == [("externalId".to_string(), external.clone())],
                || {
                    format!(
                        "external id {external:?} escaped its value: {}",
                        request.url()
                    )
                },
            )?;
        }
    }
    // Two copies of it, and a large and a very precise neighbour, summed: never a rounded sum.
    let item = |id: &str, quantity| DeliveryItem {
        usage: BillableUsage {
            event_id: id.to_string(),
            customer: event.customer.clone(),
            metric: event.metric.clone(),
            component_id: "5ce53069443e551b9caccc64".into(),
            quantity,
            due_date: event.timestamp,
            product_override: None,
            attributes: event.attributes.clone(),
        },
        raw: RawMessage {
            source: SourceRef {
                topic: "usage".into(),
                partition: 0,
                offset: 0,
            },
            key: None,
            payload: bytes::Bytes::new(),
            headers: Vec::new(),
            generation: 0,
        },
    };
    let large = rust_decimal::Decimal::from_str("50000000000000000000000000000")
        .map_err(|e| e.to_string())?;
    let precise = rust_decimal::Decimal::from_str("0.1234567890123456789012345678")
        .map_err(|e| e.to_string())?;
    let items = vec![
        item("a", event.quantity),
        item("b", event.quantity),
        item("c", large),
        item("d", precise),
    ];
    let deliveries = batch::group(
        items,
        Grouping::Aggregate {
            bucket: Bucket::Hour,
        },
    );
    check(
        deliveries.iter().map(|d| d.items.len()).sum::<usize>() == 4,
        || "an event lost in aggregation".into(),
    )?;
    for delivery in &deliveries {
        check(
            batch::delivered_quantity(delivery).is_some() && usage_body(delivery).is_some(),
            || {
                format!(
                    "an aggregate whose sum cannot be made: {:?}",
                    quantities(delivery)
                )
            },
        )?;
    }
    Ok(())
}

fn quantities(delivery: &Delivery) -> Vec<String> {
    delivery
        .items
        .iter()
        .map(|i| i.usage.quantity.to_string())
        .collect()
}

const RATE_HEADERS: [&str; 4] = [
    "retry-after",
    "x-ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
];

/// Rate-limit headers: the first byte says whether the answer was a 429, the rest are up to four
/// lines, the values of `Retry-After`, `X-RateLimit-Reset`, `-Limit` and `-Remaining`.
pub fn rate_headers(bytes: &[u8]) -> Result<(), String> {
    let (throttled, rest) = match bytes.split_first() {
        Some((first, rest)) => (first % 2 == 1, rest),
        None => (false, bytes),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in RATE_HEADERS.iter().zip(rest.split(|b| *b == b'\n')) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(*name, value);
        }
    }
    let now: DateTime<Utc> = Utc
        .with_ymd_and_hms(2026, 11, 20, 10, 15, 0)
        .single()
        .unwrap_or_default();
    let signals = rate_signals_at(&headers, now);
    for wait in [signals.retry_after, signals.reset_after]
        .into_iter()
        .flatten()
    {
        check(wait <= MAX_HEADER_WAIT, || format!("a wait of {wait:?}"))?;
    }
    for count in [signals.limit, signals.remaining].into_iter().flatten() {
        check(count <= MAX_HEADER_COUNT, || format!("a count of {count}"))?;
    }
    let config = RateLimitConfig {
        window: Duration::from_millis(1 + u64::from(rest.first().copied().unwrap_or(0)) * 100),
        max_pause: Duration::from_secs(60),
        ..RateLimitConfig::default()
    };
    let mut model = PaceModel::new(&config);
    let t0 = std::time::Instant::now();
    for step in 0..3u32 {
        let now = t0 + Duration::from_millis(u64::from(step) * 7);
        model.observe_answer(&signals, throttled, Some(now), now);
        let (pause, _) = model.throttle_pause(&signals, now);
        check(pause <= config.max_pause, || {
            format!("a pause of {pause:?}")
        })?;
        if let crate::deliver::ratelimit::Pace::WaitUntil(end) = model.pace(now) {
            let wait = end.saturating_duration_since(now);
            check(wait <= config.max_pause, || {
                format!("a window wait of {wait:?}")
            })?;
        }
    }
    let limiter = RateLimiter::new(&config);
    limiter.observe(&signals, throttled);
    limiter.observe(&signals, false);
    let rate = limiter.rate();
    check((MIN_PACE..=MAX_PACE).contains(&rate), || {
        format!("a pace of {rate}")
    })?;
    if let Some(until) = *limiter.gate().subscribe().borrow() {
        let wait = until.saturating_duration_since(tokio::time::Instant::now());
        check(wait <= config.max_pause, || {
            format!("the gate closed for {wait:?}")
        })?;
    }
    Ok(())
}

/// billwerk's answers: two bytes of status, then the body.
pub fn billwerk_answer(bytes: &[u8]) -> Result<(), String> {
    let status = status(bytes);
    let body_bytes = bytes.get(2..).unwrap_or_default();
    let body = String::from_utf8_lossy(body_bytes);
    let _ = crate::deliver::billwerk::classify_failure(status, &body);
    let message = error_message(&body);
    check(message.len() <= body.len().max(300), || {
        "an error message longer than its body".into()
    })?;
    if let Ok(found) = serde_json::from_slice::<Vec<ContractView>>(body_bytes) {
        for contract in found {
            let _ = is_billwerk_contract_id(&contract.id);
        }
    }
    if let Ok(page) = serde_json::from_slice::<Vec<serde_json::Value>>(body_bytes) {
        for record in &page {
            let _ = field(record, "Memo").is_some_and(|m| m.contains("mf1-"));
            let _ = field(record, "Id");
        }
    }
    let _ = serde_json::from_slice::<serde_json::Value>(body_bytes)
        .ok()
        .and_then(|v| field(&v, "Id").map(str::to_string));
    Ok(())
}

/// Billingrails' answers: two bytes of status, then the body.
pub fn billingrails_answer(bytes: &[u8]) -> Result<(), String> {
    use crate::deliver::billingrails::answer::{classify, Answer};
    let status = status(bytes);
    let body = String::from_utf8_lossy(bytes.get(2..).unwrap_or_default());
    if let Answer::Refused(refusal) = classify(status, &body) {
        for len in [0, 1, 7, 100] {
            let named = refusal.named_events(len);
            check(named.keys().all(|&i| i < len), || {
                format!("an event index beyond a batch of {len}: {named:?}")
            })?;
            for said in named.values() {
                let _ = refusal.reason_for(said);
            }
        }
        let _ = refusal.reason();
        check(refusal.provider_answer.len() <= 2000 + 4, || {
            "an untruncated provider answer".into()
        })?;
    }
    Ok(())
}

/// billwerk's token answer.
pub fn token_answer(bytes: &[u8]) -> Result<(), String> {
    use crate::deliver::billwerk::parse_token_answer;
    if let Ok((token, lifetime)) = parse_token_answer(bytes) {
        check(
            HeaderValue::from_str(&format!("Bearer {token}")).is_ok(),
            || format!("a token that cannot be a header: {token:?}"),
        )?;
        if let Some(lifetime) = lifetime {
            check(
                lifetime <= crate::deliver::billwerk::MAX_TOKEN_LIFETIME
                    && std::time::Instant::now().checked_add(lifetime).is_some(),
                || format!("a token lifetime of {lifetime:?}"),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    type Target = fn(&[u8]) -> Result<(), String>;

    fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                (path, bytes)
            })
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        seeds
    }

    fn cases() -> u32 {
        std::env::var("METERFLOW_FUZZ_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000)
    }

    /// An edit of a seed: overwrite, insert or delete a byte, or cut the tail.
    #[derive(Debug, Clone)]
    enum Edit {
        Set(usize, u8),
        Insert(usize, u8),
        Delete(usize),
        Cut(usize),
        /// Splice in an interesting token.
        Token(usize, usize),
    }

    const TOKENS: &[&[u8]] = &[
        b"100000000000000000000",
        b"1e308",
        b"-1",
        b"NaN",
        b"18446744073709551615",
        b"79228162514264337593543950336",
        b"0.00000000000000000000000000001",
        b"/../",
        b"?x=",
        b"%2F",
        b"\"",
        b"\\u0000",
        b"null",
        b"[]",
        b"{}",
        b"Fri, 31 Dec 9999 23:59:59 GMT",
        b"events[4294967296]",
        b"\xff\xfe",
    ];

    fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for edit in edits {
            let len = bytes.len();
            match *edit {
                Edit::Set(i, b) if len > 0 => bytes[i % len] = b,
                Edit::Insert(i, b) => bytes.insert(i % (len + 1), b),
                Edit::Delete(i) if len > 0 => {
                    bytes.remove(i % len);
                }
                Edit::Cut(i) => bytes.truncate(i % (len + 1)),
                Edit::Token(i, t) => {
                    let at = i % (len + 1);
                    let token = TOKENS[t % TOKENS.len()];
                    bytes.splice(at..at, token.iter().copied());
                }
                _ => {}
            }
        }
        bytes
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<usize>().prop_map(Edit::Delete),
            any::<usize>().prop_map(Edit::Cut),
            (any::<usize>(), any::<usize>()).prop_map(|(i, t)| Edit::Token(i, t)),
        ]
    }

    /// Every seed as is, then arbitrary bytes and mutated seeds.
    fn fuzz(name: &str, target: Target) {
        let seeds = corpus(name);
        for (path, bytes) in &seeds {
            if let Err(broken) = target(bytes) {
                panic!("{}: {broken}", path.display());
            }
        }
        let inputs = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            (0..seeds.len(), proptest::collection::vec(edit(), 1..8))
                .prop_map(move |(seed, edits)| apply(seeds[seed].1.clone(), &edits)),
        ];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: cases(),
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let result = runner.run(&inputs, |bytes| {
            target(&bytes).map_err(|broken| {
                TestCaseError::fail(format!(
                    "{broken} (input: {:?})",
                    String::from_utf8_lossy(&bytes)
                ))
            })
        });
        if let Err(e) = result {
            panic!("fuzz target {name}: {e}");
        }
    }

    #[test]
    fn fuzz_decode_event() {
        fuzz("decode_event", decode_event);
    }

    #[test]
    fn fuzz_rate_headers() {
        fuzz("rate_headers", rate_headers);
    }

    #[test]
    fn fuzz_billwerk_answer() {
        fuzz("billwerk_answer", billwerk_answer);
    }

    #[test]
    fn fuzz_billingrails_answer() {
        fuzz("billingrails_answer", billingrails_answer);
    }

    #[test]
    fn fuzz_token_answer() {
        fuzz("token_answer", token_answer);
    }
}
