//! The Billingrails sink: batches of up to 100 events to `POST {base_url}{batch_path}` (a single
//! event to `{ingest_path}`), Bearer API key, a per-event `idempotency_key` and a per-request
//! `Idempotency-Key` (billing-apis.md §2).
//!
//! Billingrails deduplicates events by their `idempotency_key`, so re-sending an event is always
//! safe: after an unknown outcome [`BillingrailsSink::reconcile`] answers `NotFound` and the
//! re-send under the same keys *is* the reconciliation. A batch is all-or-nothing: when it is
//! refused, the events named in `details` are dead-lettered and the rest re-sent by the runner;
//! when the answer names none, the sink bisects the batch itself to find them.

pub(crate) mod answer;
mod bisect;
pub mod payload;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use self::answer::{Answer, Refusal};
use self::bisect::Bisection;
use self::payload::EventMapper;
use crate::config::{ProviderConfig, Secret, SinkConfig};
use crate::deliver::client::{ProviderClient, ProviderHealth, Turn};
use crate::deliver::http::http_client;
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::{Attempt, Delivery, Reconciled, Sink};
use crate::event::{RejectReason, Rejection};

pub struct BillingrailsSink {
    /// Every request goes through it (the runner paces the first of an attempt, the client
    /// the extra requests of a bisection).
    client: ProviderClient,
    api_key: Secret,
    ingest_url: String,
    batch_url: String,
    ingest_path: String,
    batch_path: String,
    mapper: EventMapper,
}

/// One answer classified.
struct Sent {
    answer: Answer,
    /// The request's `Idempotency-Key`: the receipt when the answer carries no request id.
    request_key: String,
}

impl BillingrailsSink {
    pub fn new(config: &SinkConfig, limiter: Arc<RateLimiter>) -> anyhow::Result<Self> {
        let ProviderConfig::Billingrails(provider) = &config.provider else {
            anyhow::bail!(
                "sink.kind is {:?}: a Billingrails sink needs kind = \"billingrails\"",
                config.kind().name()
            );
        };
        let br = &provider.billingrails;
        let base = config.base_url.trim_end_matches('/');
        Ok(BillingrailsSink {
            client: ProviderClient::new("billingrails", http_client(config)?, limiter),
            api_key: provider.api_key.clone(),
            ingest_url: format!("{base}{}", br.ingest_path),
            batch_url: format!("{base}{}", br.batch_path),
            ingest_path: br.ingest_path.clone(),
            batch_path: br.batch_path.clone(),
            mapper: EventMapper::new(br).map_err(|e| anyhow::anyhow!(e))?,
        })
    }

    /// Reports every answer from Billingrails to `health` (what `/readyz` checks).
    pub fn with_health(mut self, health: Arc<dyn ProviderHealth>) -> Self {
        self.client = self.client.with_health(health);
        self
    }

    /// One request carrying the events at `part` (indexes into `events`): the ingest endpoint
    /// for one event, the batch endpoint for more. In `turn` when given, else after its own.
    async fn post(&self, events: &[Vec<u8>], part: &[usize], turn: Option<Turn>) -> Sent {
        let (endpoint, url, path, body) = match part {
            [one] => (
                "ingest",
                &self.ingest_url,
                &self.ingest_path,
                events[*one].clone(),
            ),
            _ => (
                "batch",
                &self.batch_url,
                &self.batch_path,
                payload::batch_body(part.iter().map(|&i| events[i].as_slice())),
            ),
        };
        let request_key = payload::request_key(path, &body);
        let request = self
            .client
            .http()
            .post(url)
            .bearer_auth(self.api_key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &request_key)
            .body(body);
        let turn = match turn {
            Some(turn) => turn,
            None => self.client.turn().await,
        };
        let answer = match self.client.send_in_turn(turn, endpoint, request).await {
            Ok(answer) => answer::classify(answer.status, &answer.body),
            // No answer, or a status without its body (the events may be queued): retry.
            Err(failure) => Answer::Retry(failure.attempt()),
        };
        Sent {
            answer,
            request_key,
        }
    }

    async fn send_inner(&self, delivery: &Delivery, turn: Turn) -> Attempt {
        let n = delivery.items.len();
        if n == 0 {
            return Attempt::Accepted {
                receipt: String::new(),
            };
        }
        let events: Vec<Vec<u8>> = delivery
            .items
            .iter()
            .map(|item| self.mapper.event_bytes(&item.usage))
            .collect();
        let all: Vec<usize> = (0..n).collect();
        let sent = self.post(&events, &all, Some(turn)).await;
        let refusal = match sent.answer {
            Answer::Accepted { receipt } => {
                let receipt = receipt.unwrap_or(sent.request_key);
                return Attempt::Accepted { receipt };
            }
            Answer::Retry(attempt) => return attempt,
            Answer::Refused(refusal) => refusal,
        };
        if n == 1 {
            return Attempt::Rejected {
                items: vec![(0, rejection(refusal.reason()))],
                provider_answer: refusal.provider_answer,
            };
        }
        let named = refusal.named_events(n);
        if !named.is_empty() {
            // The runner dead-letters these and re-sends the rest under the same delivery key.
            let items = named
                .into_iter()
                .map(|(i, said)| (i, rejection(refusal.reason_for(&said))))
                .collect();
            return Attempt::Rejected {
                items,
                provider_answer: refusal.provider_answer,
            };
        }
        tracing::info!(
            delivery_key = %delivery.key,
            events = n,
            status = refusal.status,
            "Billingrails refused the batch without naming events; bisecting to find them"
        );
        self.bisect(&events, refusal).await
    }

    /// Sends halves of the refused batch until every event is either queued or refused alone.
    /// Returns what the runner needs: the refused events (it re-sends the rest, which
    /// Billingrails deduplicates by event key), `Accepted` when none was refused, or the retry
    /// that interrupted the search when nothing was learnt yet (the runner backs off and sends
    /// the whole batch again; parts already queued come back as replays). Each part takes its
    /// own turn in the pace; the client feeds every answer to the limiter.
    async fn bisect(&self, events: &[Vec<u8>], first: Refusal) -> Attempt {
        let mut search = Bisection::new((0..events.len()).collect());
        let mut last_answer = first.provider_answer;
        let mut receipt = String::new();
        while let Some(part) = search.next_part() {
            let sent = self.post(events, &part, None).await;
            match sent.answer {
                Answer::Accepted { receipt: r } => {
                    receipt = r.unwrap_or(sent.request_key);
                    search.accepted(part);
                }
                Answer::Refused(refusal) => {
                    let named = refusal.named_events(part.len());
                    if part.len() > 1 && !named.is_empty() {
                        let named = named
                            .into_iter()
                            .map(|(i, said)| (i, refusal.reason_for(&said)))
                            .collect();
                        search.refused_named(part, named);
                    } else {
                        search.refused(part, || refusal.reason());
                    }
                    last_answer = refusal.provider_answer;
                }
                Answer::Retry(attempt) => {
                    if search.refused_so_far().is_empty() {
                        return attempt;
                    }
                    // Keep what was found; the runner re-sends the rest (its next attempt is
                    // paced, and a 429 closed the gate in the client).
                    return self.refused(search, last_answer);
                }
            }
        }
        if search.refused_so_far().is_empty() {
            // The refusal was about the request, not an event (e.g. too large): all queued now.
            return Attempt::Accepted { receipt };
        }
        self.refused(search, last_answer)
    }

    fn refused(&self, search: Bisection, provider_answer: String) -> Attempt {
        Attempt::Rejected {
            items: search
                .into_refused()
                .into_iter()
                .map(|(i, reason)| (i, rejection(reason)))
                .collect(),
            provider_answer,
        }
    }
}

fn rejection(detail: String) -> Rejection {
    Rejection::new(RejectReason::ProviderRejected, detail)
}

impl Sink for BillingrailsSink {
    fn name(&self) -> &'static str {
        "billingrails"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery, turn: Turn) -> BoxFuture<'a, Attempt> {
        Box::pin(self.send_inner(delivery, turn))
    }

    /// Billingrails stores an event once per `idempotency_key`, however often it is sent, and
    /// offers no look-up of ingested events. So nothing is looked up: `NotFound` tells the
    /// runner to send again under the same keys, and that re-send is the reconciliation.
    fn reconcile<'a>(
        &'a self,
        _delivery: &'a Delivery,
        _sent_since: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Reconciled, String>> {
        Box::pin(async { Ok(Reconciled::NotFound) })
    }
}
