//! The billwerk sink: one usage record per request, `POST /api/v1/contracts/{id}/usage`, the
//! delivery key stamped into `Memo`. billwerk has no idempotency: after an unknown outcome the
//! runner asks [`BillwerkSink::reconcile`] to look for the key before anything is re-sent.

mod auth;
mod contracts;
mod corrections;
pub mod payload;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use reqwest::StatusCode;
use serde::Deserialize;

pub(crate) use auth::{parse_token_answer, MAX_TOKEN_LIFETIME};
pub use auth::{TokenError, TokenSource};
use contracts::ContractCache;
pub use corrections::{Deletion, ListedUsage};

use crate::config::{ProviderConfig, RateLimitConfig, SinkConfig};
use crate::deliver::client::{Answer, Failure, ProviderClient, ProviderHealth, Turn};
use crate::deliver::http::{http_client, truncate, without_url};
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::{Attempt, Delivery, Reconciled, RetryCause, Sink};
use crate::event::{is_billwerk_contract_id, CustomerRef, RejectReason, Rejection};

/// How far before the first send a reconciliation looks: billwerk filters on its own creation
/// time, and its clock and ours differ.
const RECONCILE_CLOCK_MARGIN: chrono::Duration = chrono::Duration::minutes(10);
/// billwerk's page size limit for listing usage.
const LIST_PAGE: usize = 500;

pub struct BillwerkSink {
    /// Every request goes through it, the token requests too.
    client: ProviderClient,
    /// `{base_url}/api/v1`; paths below it are built segment by segment ([`api_url`]).
    api: url::Url,
    legal_entity_id: Option<String>,
    tokens: TokenSource,
    contracts: ContractCache,
}

/// One contract of billwerk's `GET /contracts?externalId=` answer: only its id matters.
#[derive(Deserialize)]
pub(crate) struct ContractView {
    #[serde(alias = "id", alias = "ID")]
    #[serde(rename = "Id")]
    pub(crate) id: String,
}

/// How a contract reference resolved.
enum Contract {
    Id(String),
    Unknown(Rejection),
}

/// Asks billwerk for a token with the sink's own token code — the same request and the same
/// checks of the answer — within `timeout`: for `meterflow validate --connect`.
pub async fn check_credentials(config: &SinkConfig, timeout: Duration) -> Result<(), TokenError> {
    let ProviderConfig::Billwerk(billwerk) = &config.provider else {
        return Err(TokenError::Unavailable(
            "the config's sink is not a billwerk sink: no token to ask for".into(),
        ));
    };
    if billwerk.client_id.trim().is_empty() || billwerk.client_secret.expose().is_empty() {
        return Err(TokenError::Unavailable(
            "the config has no sink.client_id or sink.client_secret to ask with".into(),
        ));
    }
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| TokenError::Unreachable(without_url(&e)))?;
    // The token endpoint is outside the pace: this limiter is never waited on.
    let limiter = Arc::new(RateLimiter::new(&RateLimitConfig::default()).for_sink("billwerk"));
    TokenSource::new(
        ProviderClient::new("billwerk", http, limiter),
        &config.base_url,
        billwerk,
    )
    .token()
    .await
    .map(|_| ())
}

impl BillwerkSink {
    pub fn new(config: &SinkConfig, limiter: Arc<RateLimiter>) -> anyhow::Result<Self> {
        let ProviderConfig::Billwerk(billwerk) = &config.provider else {
            anyhow::bail!(
                "sink.kind is {:?}: a billwerk sink needs kind = \"billwerk\"",
                config.kind().name()
            );
        };
        let client = ProviderClient::new("billwerk", http_client(config)?, limiter);
        let base = config.base_url.trim_end_matches('/').to_string();
        let api = url::Url::parse(&format!("{base}/api/v1"))
            .ok()
            .filter(|u| !u.cannot_be_a_base() && matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "sink.base_url {base:?} is not an http(s) URL: expected e.g. \
                     \"https://sandbox.billwerk.com\""
                )
            })?;
        Ok(BillwerkSink {
            tokens: TokenSource::new(client.clone(), &base, billwerk),
            client,
            api,
            legal_entity_id: billwerk.legal_entity_id.clone(),
            contracts: ContractCache::new(billwerk.contract_cache_size),
        })
    }

    /// Every HTTP answer (any status) refreshes `/readyz`'s "provider reachable" check.
    pub fn with_health(mut self, health: Arc<dyn ProviderHealth>) -> Self {
        self.client = self.client.with_health(health);
        self.tokens.client = self.client.clone();
        self
    }

    /// A request with the bearer token and legal-entity header, in `turn` if given (else after
    /// its own). On 401 the token is renewed once and the request sent again, in a turn of its
    /// own; a second 401 is the caller's to back off from.
    async fn call(
        &self,
        endpoint: &'static str,
        turn: Option<Turn>,
        build: impl Fn(&reqwest::Client, &url::Url) -> reqwest::RequestBuilder,
    ) -> Result<Answer, CallError> {
        let mut turn = Some(match turn {
            Some(turn) => turn,
            None => self.client.turn().await,
        });
        let mut renewed = false;
        loop {
            let token = self.tokens.token().await.map_err(CallError::Token)?;
            let mut request = build(self.client.http(), &self.api).bearer_auth(&token);
            if let Some(id) = &self.legal_entity_id {
                request = request.header("X-SELECTED-LEGAL-ENTITY-ID", id);
            }
            let turn = match turn.take() {
                Some(turn) => turn,
                None => self.client.turn().await,
            };
            let answer = self
                .client
                .send_in_turn(turn, endpoint, request)
                .await
                .map_err(CallError::Transport)?;
            if answer.status == StatusCode::UNAUTHORIZED && !renewed {
                self.tokens.invalidate(&token).await;
                renewed = true;
                continue;
            }
            return Ok(answer);
        }
    }

    async fn resolve(&self, customer: &CustomerRef) -> Result<Contract, Attempt> {
        let external_id = match customer {
            // Checked at decode too; here it guards the path whatever built the event.
            CustomerRef::ContractId(id) if is_billwerk_contract_id(id) => {
                return Ok(Contract::Id(id.clone()))
            }
            CustomerRef::ContractId(id) => {
                return Ok(Contract::Unknown(Rejection::new(
                    RejectReason::InvalidContractId,
                    format!(
                        "contract_id {:?} is not a billwerk contract id: expected exactly 24 \
                         hexadecimal characters",
                        crate::decode::truncate_chars(id, 100)
                    ),
                )))
            }
            CustomerRef::ExternalId(e) => e,
        };
        if let Some(id) = self.contracts.get(external_id) {
            return Ok(Contract::Id(id));
        }
        let answer = self
            .call("contracts", None, |c, api| {
                // reqwest percent-encodes query values: `&`, `#`, `/` stay inside the value.
                c.get(api_url(api, &["contracts"]))
                    .query(&[("externalId", external_id.as_str())])
            })
            .await
            .map_err(CallError::into_attempt)?;
        if !answer.status.is_success() {
            return Err(classify_failure(answer.status, &answer.body));
        }
        let found: Vec<ContractView> =
            serde_json::from_str(&answer.body).map_err(|e| Attempt::Retry {
                cause: RetryCause::ServerError,
                outcome_unknown: false,
                detail: format!("unreadable contract lookup answer: {e}"),
            })?;
        match found.as_slice() {
            [one] if !is_billwerk_contract_id(&one.id) => Ok(Contract::Unknown(Rejection::new(
                RejectReason::InvalidContractId,
                format!(
                    "billwerk's contract lookup for ExternalId {external_id:?} answered the id \
                     {:?}, which is not 24 hexadecimal characters; not using it in a request path",
                    crate::decode::truncate_chars(&one.id, 100)
                ),
            ))),
            [one] => {
                self.contracts.insert(external_id.clone(), one.id.clone());
                Ok(Contract::Id(one.id.clone()))
            }
            [] => Ok(Contract::Unknown(Rejection::new(
                RejectReason::UnknownContract,
                format!("no billwerk contract has ExternalId {external_id:?}"),
            ))),
            many => Ok(Contract::Unknown(Rejection::new(
                RejectReason::UnknownContract,
                format!(
                    "{} billwerk contracts have ExternalId {external_id:?}; cannot choose",
                    many.len()
                ),
            ))),
        }
    }

    async fn send_inner(&self, delivery: &Delivery, turn: Turn) -> Attempt {
        let Some(first) = delivery.items.first() else {
            return Attempt::Accepted {
                receipt: String::new(),
            };
        };
        let contract = match self.resolve(&first.usage.customer).await {
            Ok(Contract::Id(id)) => id,
            Ok(Contract::Unknown(rejection)) => {
                return reject_all(delivery, rejection, String::new())
            }
            Err(failure) => return failure,
        };
        let Some(body) = payload::usage_body(delivery) else {
            // Unreachable through `batch::group`, which never makes such a sum; refused rather
            // than rounded if it ever were.
            return reject_all(
                delivery,
                Rejection::new(
                    RejectReason::InvalidQuantity,
                    format!(
                        "the quantities of these {} events cannot be summed exactly (the sum \
                         exceeds the decimal range or needs more than 28 significant digits)",
                        delivery.items.len()
                    ),
                ),
                String::new(),
            );
        };
        let answer = self
            .call("usage", Some(turn), |c, api| {
                c.post(api_url(api, &["contracts", &contract, "usage"]))
                    .json(&body)
            })
            .await;
        // No answer, or a status without its body: billwerk may have recorded the usage.
        let Answer { status, body, .. } = match answer {
            Ok(answer) => answer,
            Err(e) => return e.into_attempt(),
        };
        if status.is_success() {
            #[derive(Deserialize)]
            struct Created {
                #[serde(rename = "Id", alias = "id")]
                id: Option<String>,
            }
            let receipt = serde_json::from_str::<Created>(&body)
                .ok()
                .and_then(|c| c.id)
                .unwrap_or_default();
            return Attempt::Accepted { receipt };
        }
        match classify_failure(status, &body) {
            Attempt::Rejected { items, .. } if items.is_empty() => {
                let reason = if status == StatusCode::NOT_FOUND {
                    RejectReason::UnknownContract
                } else {
                    RejectReason::ProviderRejected
                };
                let message = error_message(&body);
                reject_all(
                    delivery,
                    Rejection::new(reason, format!("billwerk answered {status}: {message}")),
                    format!("{} {}", status.as_u16(), truncate(&body, 2000)),
                )
            }
            other => other,
        }
    }

    async fn reconcile_inner(
        &self,
        delivery: &Delivery,
        sent_since: DateTime<Utc>,
    ) -> Result<Reconciled, String> {
        let Some(first) = delivery.items.first() else {
            return Ok(Reconciled::NotFound);
        };
        let contract = match self.resolve(&first.usage.customer).await {
            Ok(Contract::Id(id)) => id,
            Ok(Contract::Unknown(_)) => return Ok(Reconciled::NotFound),
            Err(attempt) => return Err(format!("contract lookup failed: {attempt:?}")),
        };
        let from_date = payload::billwerk_timestamp(sent_since - RECONCILE_CLOCK_MARGIN);
        let key = delivery.key.as_str();
        let mut found: Option<String> = None;
        let listed = self
            .page_usage(&contract, Some(from_date), None, |page| {
                for record in page {
                    if field(record, "Memo").is_some_and(|m| m.contains(key)) {
                        found = Some(field(record, "Id").unwrap_or_default().to_string());
                        return Visit::Stop;
                    }
                }
                Visit::More
            })
            .await
            .map_err(|e| {
                format!("{e}; not re-sending until a later look-up reads the listing to its end")
            })?;
        match (found, listed) {
            (Some(receipt), _) => Ok(Reconciled::Found { receipt }),
            // No such contract: billwerk holds no usage under it, so the earlier send cannot
            // have been recorded. (Retrying the look-up would pin the partition for good; the
            // re-send then answers 404 too and the event is dead-lettered with the answer.)
            (None, Listed::NoSuchContract) => Ok(Reconciled::NotFound),
            // "Not found" re-sends the usage: said only after the whole listing was read.
            (None, Listed::Complete) | (None, Listed::Stopped) => Ok(Reconciled::NotFound),
        }
    }

    /// Pages through `contract`'s usage created from `from_date` (until `until_date`, if given)
    /// with billwerk's cursor, each request through the client (paced), handing every page to
    /// `visit` until it says stop or an empty page ends the listing. A server may cap its
    /// pages below `take`: only an empty page ends it. A cursor that does not advance, or a
    /// listing longer than [`MAX_LIST_PAGES`] pages, is an error, never "the end".
    pub(crate) async fn page_usage(
        &self,
        contract: &str,
        from_date: Option<String>,
        until_date: Option<String>,
        mut visit: impl FnMut(&[serde_json::Value]) -> Visit,
    ) -> Result<Listed, String> {
        let mut cursor: Option<String> = None;
        let mut pages = 0_usize;
        let mut throttles = 0_usize;
        loop {
            let cursor_now = cursor.clone();
            let answer = self
                .call("usage_list", None, |c, api| {
                    let mut q: Vec<(&str, String)> = vec![("take", LIST_PAGE.to_string())];
                    if let Some(from) = &from_date {
                        q.push(("fromDateTime", from.clone()));
                    }
                    if let Some(until) = &until_date {
                        q.push(("untilDateTime", until.clone()));
                    }
                    if let Some(from) = &cursor_now {
                        q.push(("from", from.clone()));
                    }
                    c.get(api_url(api, &["contracts", contract, "usage"]))
                        .query(&q)
                })
                .await
                .map_err(|e| format!("{:?}", e.into_attempt()))?;
            let status = answer.status;
            // The client closed the limiter's gate: ask for the same page again once it opens.
            if status == StatusCode::TOO_MANY_REQUESTS && throttles < MAX_THROTTLED_PAGES {
                throttles = throttles.saturating_add(1);
                continue;
            }
            if status == StatusCode::NOT_FOUND && cursor_now.is_none() {
                return Ok(Listed::NoSuchContract);
            }
            if !status.is_success() {
                return Err(format!("listing usage answered {status}"));
            }
            let page: Vec<serde_json::Value> = serde_json::from_str(&answer.body)
                .map_err(|e| format!("unreadable usage list: {e}"))?;
            let Some(last) = page.last() else {
                return Ok(Listed::Complete);
            };
            if let Visit::Stop = visit(&page) {
                return Ok(Listed::Stopped);
            }
            let next = field(last, "Id").map(str::to_string);
            if next.is_none() || next == cursor {
                return Err(format!(
                    "listing usage of contract {contract}: the paging cursor did not advance \
                     (last record id {})",
                    next.as_deref().unwrap_or("missing")
                ));
            }
            pages = pages.saturating_add(1);
            if pages >= MAX_LIST_PAGES {
                return Err(format!(
                    "listing usage of contract {contract}: no end after {pages} pages"
                ));
            }
            cursor = next;
            throttles = 0;
        }
    }
}

/// What a page visitor wants next.
pub(crate) enum Visit {
    More,
    Stop,
}

/// How a listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listed {
    /// Read to the empty page.
    Complete,
    /// The visitor stopped it.
    Stopped,
    /// billwerk answered 404 to the first page: it knows no such contract.
    NoSuchContract,
}

/// A bound on pages per listing, so a server whose listing never ends cannot hold a delivery
/// (or an audit) forever.
const MAX_LIST_PAGES: usize = 2000;
/// 429s in a row for one page before a listing gives up (each waits for the limiter's gate).
const MAX_THROTTLED_PAGES: usize = 20;

impl Sink for BillwerkSink {
    fn name(&self) -> &'static str {
        "billwerk"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery, turn: Turn) -> BoxFuture<'a, Attempt> {
        Box::pin(self.send_inner(delivery, turn))
    }

    fn reconcile<'a>(
        &'a self,
        delivery: &'a Delivery,
        sent_since: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Reconciled, String>> {
        Box::pin(self.reconcile_inner(delivery, sent_since))
    }
}

/// `api` with `segments` appended, each percent-encoded as one path segment: a `/`, `?`, `#` or
/// `%` inside a segment is encoded, never part of the path's structure (`.` and `..` segments
/// are dropped by `url`; contract ids are checked to be hex before they get here anyway).
pub(crate) fn api_url(api: &url::Url, segments: &[&str]) -> url::Url {
    let mut url = api.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Why a call produced no answer to classify.
#[derive(Debug)]
enum CallError {
    Token(TokenError),
    Transport(Failure),
}

impl CallError {
    fn into_attempt(self) -> Attempt {
        match self {
            CallError::Token(TokenError::Refused { status }) => Attempt::Retry {
                cause: RetryCause::Unauthorized,
                outcome_unknown: false,
                detail: format!("token request refused (HTTP {status}): check sink.client_id / sink.client_secret"),
            },
            CallError::Token(TokenError::Unavailable(detail) | TokenError::Unreachable(detail)) => Attempt::Retry {
                cause: RetryCause::Connection,
                outcome_unknown: false,
                detail,
            },
            CallError::Transport(failure) => failure.attempt(),
        }
    }
}

/// A non-2xx answer. Permanent refusals come back as `Rejected` with no items named (the caller
/// names them); everything that may succeed later as `Retry`.
pub(crate) fn classify_failure(status: StatusCode, body: &str) -> Attempt {
    let detail = format!("HTTP {status}: {}", truncate(body, 300));
    match status.as_u16() {
        429 => Attempt::Retry {
            cause: RetryCause::Throttled,
            outcome_unknown: false,
            detail,
        },
        401 => Attempt::Retry {
            cause: RetryCause::Unauthorized,
            outcome_unknown: false,
            detail,
        },
        403 => Attempt::Retry {
            cause: RetryCause::Forbidden,
            outcome_unknown: false,
            detail,
        },
        408 => Attempt::Retry {
            cause: RetryCause::Timeout,
            outcome_unknown: true,
            detail,
        },
        409 => Attempt::Retry {
            cause: RetryCause::Conflict,
            outcome_unknown: true,
            detail,
        },
        // A 5xx may come after the record was written: look before re-sending.
        500..=599 => Attempt::Retry {
            cause: RetryCause::ServerError,
            outcome_unknown: true,
            detail,
        },
        _ => Attempt::Rejected {
            items: Vec::new(),
            provider_answer: format!("{} {}", status.as_u16(), truncate(body, 2000)),
        },
    }
}

fn reject_all(delivery: &Delivery, rejection: Rejection, provider_answer: String) -> Attempt {
    Attempt::Rejected {
        items: (0..delivery.items.len())
            .map(|i| (i, rejection.clone()))
            .collect(),
        provider_answer,
    }
}

/// billwerk's error body shape is undocumented: take `Message` when present, else the raw text.
pub(crate) fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| field(&v, "Message").map(str::to_string))
        .unwrap_or_else(|| truncate(body, 300).to_string())
}

/// A string field by case-insensitive name.
pub(crate) fn field<'v>(value: &'v serde_json::Value, name: &str) -> Option<&'v str> {
    value
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers_by_what_to_do() {
        let retry = |s: u16| match classify_failure(StatusCode::from_u16(s).unwrap(), "") {
            Attempt::Retry {
                cause,
                outcome_unknown,
                ..
            } => Some((cause, outcome_unknown)),
            _ => None,
        };
        assert_eq!(retry(429), Some((RetryCause::Throttled, false)));
        assert_eq!(retry(500), Some((RetryCause::ServerError, true)));
        assert_eq!(retry(503), Some((RetryCause::ServerError, true)));
        assert_eq!(retry(401), Some((RetryCause::Unauthorized, false)));
        assert_eq!(retry(403), Some((RetryCause::Forbidden, false)));
        for permanent in [400, 404, 422] {
            assert_eq!(retry(permanent), None, "{permanent} must dead-letter");
        }
    }

    /// Issue 11, problem 2: ids are path segments, never path text; external ids are encoded
    /// query values.
    #[test]
    fn event_values_cannot_change_the_request_path() {
        let api = url::Url::parse("https://billwerk.example/api/v1").unwrap();
        let hostile = "5cd186af443e551fe8e4f5d0/../../../../oauth/token/?x=";
        let url = api_url(&api, &["contracts", hostile, "usage"]);
        assert_eq!(url.host_str(), Some("billwerk.example"));
        assert_eq!(
            url.path(),
            "/api/v1/contracts/5cd186af443e551fe8e4f5d0%2F..%2F..%2F..%2F..%2Foauth%2Ftoken%2F%3Fx=/usage"
        );
        assert_eq!(url.query(), None);
        let client = reqwest::Client::new();
        let lookup = client
            .get(api_url(&api, &["contracts"]))
            .query(&[("externalId", "acme&take=1#/../x y")])
            .build()
            .unwrap();
        assert_eq!(lookup.url().path(), "/api/v1/contracts");
        assert_eq!(
            lookup.url().query(),
            Some("externalId=acme%26take%3D1%23%2F..%2Fx+y")
        );
        // A base URL with a trailing path keeps it.
        let nested = url::Url::parse("https://h/tenant/api/v1").unwrap();
        assert_eq!(
            api_url(&nested, &["contracts", "5cd186af443e551fe8e4f5dd", "usage"]).path(),
            "/tenant/api/v1/contracts/5cd186af443e551fe8e4f5dd/usage"
        );
    }

    #[test]
    fn error_message_prefers_message_key() {
        assert_eq!(
            error_message(r#"{"Message":"ComponentId is unknown"}"#),
            "ComponentId is unknown"
        );
        assert_eq!(error_message("plain"), "plain");
    }
}
