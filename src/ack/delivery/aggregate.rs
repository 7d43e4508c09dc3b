//! Pre-aggregated deliveries (billwerk `[sink.aggregate]`) and the ledger.
//!
//! An aggregate's delivery key derives from its set of event ids, and after a restart the
//! batches — hence the aggregates — are cut differently, so the key alone cannot tell that an
//! event was already billed inside another sum. The ledger therefore maps every event to the
//! aggregate it was sent in (written in the same transaction as the aggregate's claim), and
//! before an aggregate is sent its events are looked up. Events that an earlier aggregate
//! carried are settled through it:
//!
//! - delivered → already delivered, not sent again;
//! - rejected → dead-lettered as refused earlier (once: the ledger remembers dead letters);
//! - sending (outcome unknown) → take its lease over and ask the provider for *that* key
//!   (billwerk: the key in `Memo`). Found → it is delivered, and so are all its events. Not
//!   found → it never landed: it is marked abandoned, its events are freed and aggregated anew.
//!
//! Whatever is left is claimed again as a new aggregate. docs/delivery-semantics.md, "Aggregation
//! and the ledger", has the whole protocol and its races.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::ack::ledger::{AggregateClaim, Claim, EarlierAggregate, EventContent, Ledger};
use crate::deliver::retry::Backoff;
use crate::deliver::{Delivery, DeliveryItem, ItemOutcome, Reconciled};
use crate::event::{DeliveryKey, RejectReason, Rejection};

use super::{
    content, id_conflict, origins, until_ledger_answers, waited_for_lease, AfterClaim,
    LedgeredDelivery, TAKEN_OVER_POLL,
};

/// Two writers mapped some of the same events at once (several replicas on PostgreSQL): ask
/// again after.
const CONTENDED_POLL: Duration = Duration::from_millis(20);

/// How an aggregate's claim and send ended.
enum Ledgered {
    /// One outcome per item; `None` when another owner took the delivery over.
    Outcomes(Option<Vec<ItemOutcome>>),
    /// Some of its events were sent earlier in these aggregates; nothing sent.
    Earlier(Vec<EarlierAggregate>),
    /// These events (their per-event keys) reuse an id recorded earlier with other contents;
    /// nothing was claimed or sent.
    IdConflict(Vec<EventContent>),
}

impl LedgeredDelivery {
    pub(super) async fn deliver_aggregate(&self, ledger: &Ledger, delivery: &Delivery) {
        let items = &delivery.items;
        let n = items.len();
        // The same event id twice (a producer that retried) is billed once: a later copy gets
        // the first one's outcome, and is never summed.
        let mut copy_of: Vec<Option<usize>> = vec![None; n];
        // The same id with other contents is another event: both are claimed, and the ledger
        // tells which one the id belongs to (the other is an id conflict).
        let digests: Vec<String> = items.iter().map(|i| i.usage.content_digest()).collect();
        let mut first_copy: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            match first_copy.get(&(item.usage.event_id.as_str(), digests[i].as_str())) {
                Some(&first) => copy_of[i] = Some(first),
                None => {
                    first_copy.insert((&item.usage.event_id, &digests[i]), i);
                }
            }
        }
        let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; n];
        // The aggregate finally sent (its key and items), if any.
        let mut sent: Option<(DeliveryKey, Vec<usize>)> = None;
        let mut backoff = Backoff::new(self.runner.retry());
        loop {
            let open: Vec<usize> = (0..n)
                .filter(|&i| copy_of[i].is_none() && outcomes[i].is_none())
                .collect();
            if open.is_empty() {
                break;
            }
            let current = Delivery {
                key: DeliveryKey::for_events(
                    open.iter().map(|&i| items[i].usage.event_id.as_str()),
                ),
                items: open.iter().map(|&i| items[i].clone()).collect(),
            };
            let key = current.key.clone();
            let turn = ledger.local(&key).await;
            let ledgered = self.claim_and_send_aggregate(ledger, &current).await;
            drop(turn);
            match ledgered {
                Ledgered::IdConflict(conflicts) => {
                    for &i in &open {
                        if conflicts.contains(&content(&items[i])) {
                            outcomes[i] = Some(ItemOutcome::DeadLetter {
                                rejection: id_conflict(),
                                provider_answer: None,
                            });
                        }
                    }
                }
                // Revoked: the new owners redeliver these events.
                Ledgered::Outcomes(None) if !self.owns_any(items) => break,
                // Another replica took it over while some of its events are still ours: claim
                // again; the ledger answers with that replica's outcome (or its lease).
                Ledgered::Outcomes(None) => {
                    tokio::time::sleep(TAKEN_OVER_POLL).await;
                }
                Ledgered::Outcomes(Some(got)) => {
                    for (&i, outcome) in open.iter().zip(got) {
                        outcomes[i] = Some(outcome);
                    }
                    sent = Some((key, open));
                    break;
                }
                Ledgered::Earlier(earlier) => {
                    for aggregate in earlier {
                        self.settle_through_earlier(
                            ledger,
                            aggregate,
                            items,
                            &open,
                            &mut outcomes,
                            &mut backoff,
                        )
                        .await;
                    }
                }
            }
        }
        for i in 0..n {
            if let Some(first) = copy_of[i] {
                outcomes[i] = outcomes[first].clone().map(|o| match o {
                    ItemOutcome::Delivered { receipt }
                    | ItemOutcome::AlreadyDelivered { receipt } => {
                        ItemOutcome::AlreadyDelivered { receipt }
                    }
                    dead @ ItemOutcome::DeadLetter { .. } => dead,
                });
            }
        }

        // Dead letters (and counts) first; then the sent aggregate's final state, which must
        // never hide an item that still owed its dead letter; then the offsets.
        let sent_items: HashSet<usize> = sent.iter().flat_map(|(_, s)| s.clone()).collect();
        let final_state = match &sent {
            Some((key, indexes)) => {
                self.report(
                    key,
                    indexes
                        .iter()
                        .filter_map(|&i| Some((&items[i], outcomes[i].clone()?))),
                )
                .await
            }
            None => None,
        };
        let others = (0..n).filter(|i| !sent_items.contains(i));
        let key_of_others = &delivery.key;
        self.report(
            key_of_others,
            others.filter_map(|i| Some((&items[i], outcomes[i].clone()?))),
        )
        .await;
        if let (Some((key, _)), Some((delivered, receipt))) = (&sent, final_state) {
            ledger.finish(key, delivered, receipt);
        }
        for (item, outcome) in items.iter().zip(&outcomes) {
            if outcome.is_some() {
                self.source.settle(&item.raw.source, item.raw.generation);
            }
        }
    }

    /// Claims the aggregate's key and maps its events to it (checking their contents against
    /// their ids), then acts on the ledger's answer.
    async fn claim_and_send_aggregate(&self, ledger: &Ledger, delivery: &Delivery) -> Ledgered {
        let event_keys: Vec<DeliveryKey> = delivery
            .items
            .iter()
            .map(|i| DeliveryKey::for_event(&i.usage.event_id))
            .collect();
        let origins = origins(&delivery.items);
        loop {
            let asked = Instant::now();
            let claimed =
                until_ledger_answers(&delivery.key, "not sending until it answers", || {
                    ledger.claim_aggregate_checked(
                        &delivery.key,
                        event_keys.clone(),
                        origins.clone(),
                    )
                })
                .await;
            let claim = match claimed {
                AggregateClaim::Own(claim) => claim,
                AggregateClaim::IdConflict(keys) => return Ledgered::IdConflict(keys),
                AggregateClaim::Earlier(earlier) => return Ledgered::Earlier(earlier),
                AggregateClaim::Contended => {
                    tokio::time::sleep(CONTENDED_POLL).await;
                    continue;
                }
            };
            match self.act_on_claim(ledger, delivery, claim, asked).await {
                AfterClaim::Again => continue,
                AfterClaim::Outcomes(outcomes) => return Ledgered::Outcomes(outcomes),
            }
        }
    }

    /// Gives the events of `open` that `earlier` carried the outcome it had, or — when its
    /// outcome is unknown — finds it out at the provider (and frees the events when the
    /// provider never got it). Leaves them open when it has to wait; the caller claims again.
    async fn settle_through_earlier(
        &self,
        ledger: &Ledger,
        earlier: EarlierAggregate,
        items: &[DeliveryItem],
        open: &[usize],
        outcomes: &mut [Option<ItemOutcome>],
        backoff: &mut Backoff,
    ) {
        let carried_keys: HashSet<&str> = earlier.event_keys.iter().map(|k| k.as_str()).collect();
        let carried: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| {
                carried_keys.contains(DeliveryKey::for_event(&items[i].usage.event_id).as_str())
            })
            .collect();
        if carried.is_empty() {
            return;
        }
        let key = &earlier.key;
        if waited_for_lease(&earlier.state, ledger).await {
            // Another replica may still be sending it.
            return;
        }
        match earlier.state {
            Claim::Delivered { receipt } => {
                metrics::counter!("meterflow_events_deduplicated_total", "source" => "ledger")
                    .increment(carried.len() as u64);
                tracing::info!(delivery_key = %key, events = carried.len(), "events already delivered in an earlier aggregate; not sending them again");
                for i in carried {
                    outcomes[i] = Some(ItemOutcome::AlreadyDelivered {
                        receipt: receipt.clone(),
                    });
                }
            }
            Claim::Voided { receipt } => {
                tracing::info!(delivery_key = %key, %receipt, events = carried.len(), "events of an aggregate voided by `meterflow void`: settled without billing them again");
                for i in carried {
                    outcomes[i] = Some(ItemOutcome::AlreadyDelivered {
                        receipt: receipt.clone(),
                    });
                }
            }
            Claim::Rejected { answer } => {
                let rejection = Rejection::new(
                    RejectReason::ProviderRejected,
                    format!("refused earlier by the provider in aggregate {key}: {answer}"),
                );
                for i in carried {
                    outcomes[i] = Some(ItemOutcome::DeadLetter {
                        rejection: rejection.clone(),
                        provider_answer: Some(answer.clone()),
                    });
                }
            }
            Claim::Sending {
                first_sent_at,
                updated_at_ms,
                ..
            } => {
                // A task of this process may be sending it right now: let it finish first.
                let Some(_turn) = ledger.try_local(key) else {
                    ledger.until_local_free(key).await;
                    return;
                };
                self.reconcile_earlier(
                    ledger,
                    key,
                    first_sent_at,
                    updated_at_ms,
                    carried.iter().map(|&i| items[i].clone()).collect(),
                    |receipt| {
                        for &i in &carried {
                            outcomes[i] = Some(ItemOutcome::AlreadyDelivered {
                                receipt: receipt.clone(),
                            });
                        }
                    },
                    backoff,
                )
                .await;
            }
            Claim::Claimed { .. } => {}
        }
    }

    /// The earlier aggregate `key` is "sending": wait out its owner's lease, take it over, and
    /// ask the provider. Found → it is delivered (`found` settles our events). Not found → it
    /// never landed: abandoned, its events free for a new aggregate.
    #[allow(clippy::too_many_arguments)]
    async fn reconcile_earlier(
        &self,
        ledger: &Ledger,
        key: &DeliveryKey,
        first_sent_at: chrono::DateTime<chrono::Utc>,
        updated_at_ms: i64,
        carried: Vec<DeliveryItem>,
        found: impl FnOnce(String),
        backoff: &mut Backoff,
    ) {
        let Ok(Some(ours_since)) = ledger.touch(key, updated_at_ms).await else {
            return;
        };
        tracing::info!(delivery_key = %key, %first_sent_at, events = carried.len(), "events were sent earlier in an aggregate whose outcome is unknown; looking for it at the provider");
        let probe = Delivery {
            key: key.clone(),
            items: carried,
        };
        match self.runner.reconcile(&probe, first_sent_at).await {
            Ok(Reconciled::Found { receipt }) => {
                metrics::counter!("meterflow_reconciliations_total", "result" => "found")
                    .increment(1);
                metrics::counter!("meterflow_events_deduplicated_total", "source" => "reconciliation")
                    .increment(probe.items.len() as u64);
                tracing::info!(delivery_key = %key, %receipt, "the earlier aggregate was delivered; its events are settled without re-sending");
                ledger.finish(key, true, receipt.clone());
                found(receipt);
            }
            Ok(Reconciled::NotFound) => {
                metrics::counter!("meterflow_reconciliations_total", "result" => "not_found")
                    .increment(1);
                let abandoned =
                    until_ledger_answers(key, "not abandoning until it answers", || {
                        ledger.abandon(key, ours_since)
                    })
                    .await;
                if abandoned {
                    tracing::info!(delivery_key = %key, "the earlier aggregate never reached the provider: abandoned; its events are aggregated anew")
                }
            }
            Err(detail) => {
                metrics::counter!("meterflow_reconciliations_total", "result" => "error")
                    .increment(1);
                let wait = backoff.next_delay();
                tracing::warn!(delivery_key = %key, %detail, retry_in_ms = wait.as_millis() as u64, "reconciliation of an earlier aggregate failed; will look again");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
