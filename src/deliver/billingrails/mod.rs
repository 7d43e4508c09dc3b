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
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use self::answer::{Answer, Refusal};
use self::bisect::Bisection;
use self::payload::EventMapper;
use crate::admin::Readiness;
use crate::config::{Secret, SinkConfig};
use crate::deliver::http::{http_client, rate_signals, record_request, transport_failure};
use crate::deliver::ratelimit::RateLimiter;
use crate::deliver::{Attempt, Delivery, RateSignals, Reconciled, RetryCause, Sink};
use crate::event::{RejectReason, Rejection};

pub struct BillingrailsSink {
    client: reqwest::Client,
    api_key: Secret,
    ingest_url: String,
    batch_url: String,
    ingest_path: String,
    batch_path: String,
    mapper: EventMapper,
    /// Paces the extra requests of a bisection (the runner paces the first one).
    limiter: Arc<RateLimiter>,
    readiness: Arc<Readiness>,
}

/// One answer, with what the rate limiter should learn from it.
struct Sent {
    answer: Answer,
    signals: RateSignals,
    /// The request's `Idempotency-Key`: the receipt when the answer carries no request id.
    request_key: String,
}

impl BillingrailsSink {
    pub fn new(config: &SinkConfig, limiter: Arc<RateLimiter>) -> anyhow::Result<Self> {
        let api_key = config
            .api_key
            .clone()
            .filter(|k| !k.expose().is_empty())
            .ok_or_else(|| anyhow::anyhow!("sink.api_key is required for billingrails"))?;
        let br = &config.billingrails;
        let base = config.base_url.trim_end_matches('/');
        Ok(BillingrailsSink {
            client: http_client(config)?,
            api_key,
            ingest_url: format!("{base}{}", br.ingest_path),
            batch_url: format!("{base}{}", br.batch_path),
            ingest_path: br.ingest_path.clone(),
            batch_path: br.batch_path.clone(),
            mapper: EventMapper::new(br).map_err(|e| anyhow::anyhow!(e))?,
            limiter,
            readiness: Arc::default(),
        })
    }

    /// Reports every answer from Billingrails to `readiness` (what `/readyz` checks).
    pub fn with_readiness(mut self, readiness: Arc<Readiness>) -> Self {
        self.readiness = readiness;
        self
    }

    /// One request carrying the events at `part` (indexes into `events`): the ingest endpoint
    /// for one event, the batch endpoint for more.
    async fn post(&self, events: &[Vec<u8>], part: &[usize]) -> Sent {
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
        let started = Instant::now();
        let result = self
            .client
            .post(url)
            .bearer_auth(self.api_key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &request_key)
            .body(body)
            .send()
            .await;
        record_request("billingrails", endpoint, &result, started.elapsed());
        if result.is_ok() {
            self.readiness.provider_answered();
        }
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                return Sent {
                    answer: Answer::Retry(transport_failure(&e)),
                    signals: RateSignals::default(),
                    request_key,
                }
            }
        };
        let signals = rate_signals(response.headers());
        let status = response.status();
        let text = match response.text().await {
            Ok(t) => t,
            // The status arrived but the body did not: the events may be queued.
            Err(e) => {
                return Sent {
                    answer: Answer::Retry(transport_failure(&e)),
                    signals,
                    request_key,
                }
            }
        };
        Sent {
            answer: answer::classify(status, &text),
            signals,
            request_key,
        }
    }

    async fn send_inner(&self, delivery: &Delivery) -> (Attempt, RateSignals) {
        let n = delivery.items.len();
        if n == 0 {
            return (
                Attempt::Accepted {
                    receipt: String::new(),
                },
                RateSignals::default(),
            );
        }
        let events: Vec<Vec<u8>> = delivery
            .items
            .iter()
            .map(|item| self.mapper.event_bytes(&item.usage))
            .collect();
        let all: Vec<usize> = (0..n).collect();
        let sent = self.post(&events, &all).await;
        let refusal = match sent.answer {
            Answer::Accepted { receipt } => {
                let receipt = receipt.unwrap_or(sent.request_key);
                return (Attempt::Accepted { receipt }, sent.signals);
            }
            Answer::Retry(attempt) => return (attempt, sent.signals),
            Answer::Refused(refusal) => refusal,
        };
        if n == 1 {
            return (
                Attempt::Rejected {
                    items: vec![(0, rejection(refusal.reason()))],
                    provider_answer: refusal.provider_answer,
                },
                sent.signals,
            );
        }
        let named = refusal.named_events(n);
        if !named.is_empty() {
            // The runner dead-letters these and re-sends the rest under the same delivery key.
            let items = named
                .into_iter()
                .map(|(i, said)| (i, rejection(refusal.reason_for(&said))))
                .collect();
            return (
                Attempt::Rejected {
                    items,
                    provider_answer: refusal.provider_answer,
                },
                sent.signals,
            );
        }
        tracing::info!(
            delivery_key = %delivery.key,
            events = n,
            status = refusal.status,
            "Billingrails refused the batch without naming events; bisecting to find them"
        );
        self.bisect(&events, refusal, sent.signals).await
    }

    /// Sends halves of the refused batch until every event is either queued or refused alone.
    /// Returns what the runner needs: the refused events (it re-sends the rest, which
    /// Billingrails deduplicates by event key), `Accepted` when none was refused, or the retry
    /// that interrupted the search when nothing was learnt yet (the runner backs off and sends
    /// the whole batch again; parts already queued come back as replays).
    async fn bisect(
        &self,
        events: &[Vec<u8>],
        first: Refusal,
        first_signals: RateSignals,
    ) -> (Attempt, RateSignals) {
        let mut search = Bisection::new((0..events.len()).collect());
        // Signals of every answer but the last go to the limiter here; the last one is returned
        // for the runner to observe, so no answer is counted twice.
        // `first_signals` answer the runner's own request: it knows when that one left.
        let mut unobserved: Option<RateSignals> = Some(first_signals);
        let mut last_answer = first.provider_answer;
        let mut receipt = String::new();
        while let Some(part) = search.next_part() {
            if let Some(signals) = unobserved.take() {
                self.observe(&signals, false);
            }
            self.limiter.until_ready().await;
            let sent_at = tokio::time::Instant::now();
            let sent = self.post(events, &part).await;
            let signals = RateSignals {
                sent_at: Some(sent_at),
                ..sent.signals
            };
            match sent.answer {
                Answer::Accepted { receipt: r } => {
                    receipt = r.unwrap_or(sent.request_key);
                    search.accepted(part);
                    unobserved = Some(signals);
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
                    unobserved = Some(signals);
                }
                Answer::Retry(attempt) => {
                    if search.refused_so_far().is_empty() {
                        return (attempt, signals);
                    }
                    // Keep what was found; the runner re-sends the rest (its next attempt is
                    // paced, and a 429 closed the gate through these signals).
                    let throttled = matches!(
                        attempt,
                        Attempt::Retry {
                            cause: RetryCause::Throttled,
                            ..
                        }
                    );
                    self.observe(&signals, throttled);
                    return (self.refused(search, last_answer), RateSignals::default());
                }
            }
        }
        let signals = unobserved.unwrap_or_default();
        if search.refused_so_far().is_empty() {
            // The refusal was about the request, not an event (e.g. too large): all queued now.
            return (Attempt::Accepted { receipt }, signals);
        }
        (self.refused(search, last_answer), signals)
    }

    /// Feeds one answer of the bisection to the limiter, dated by when its request left.
    fn observe(&self, signals: &RateSignals, throttled: bool) {
        match signals.sent_at {
            Some(sent_at) => self.limiter.observe_sent(signals, throttled, sent_at),
            None => self.limiter.observe(signals, throttled),
        }
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

    fn send<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, (Attempt, RateSignals)> {
        Box::pin(self.send_inner(delivery))
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
