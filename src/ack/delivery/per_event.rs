//! Deliveries under one key each: billwerk's one record per event, Billingrails' batches.

use tokio::time::Instant;

use crate::ack::ledger::{EventContent, Ledger};
use crate::deliver::{Delivery, DeliveryItem, ItemOutcome};
use crate::event::DeliveryKey;

use super::{
    content, id_conflict, origins, until_ledger_answers, AfterClaim, LedgeredDelivery, SendFence,
    TAKEN_OVER_POLL,
};

impl LedgeredDelivery {
    pub(super) async fn deliver_per_event(&self, delivery: &Delivery) {
        let key = &delivery.key;
        let items = &delivery.items;
        let delivering = async {
            loop {
                let outcomes = match &self.ledger {
                    None => {
                        let fence = SendFence {
                            source: &*self.source,
                            items: &delivery.items,
                            lease: None,
                        };
                        self.runner.deliver(delivery, None, &fence).await
                    }
                    Some(ledger) => {
                        // One task per key in this process (a partition revoked and re-assigned can
                        // bring the same events back while the first task still runs).
                        let _turn = ledger.local(key).await;
                        match self.claim_and_send(ledger, delivery).await {
                            Ok(outcomes) => outcomes,
                            Err(conflicts) => break Err(conflicts),
                        }
                    }
                };
                match outcomes {
                    Some(outcomes) => break Ok(Some(outcomes)),
                    // Revoked: the new owners redeliver these events.
                    None if !self.owns_any(items) => break Ok(None),
                    // Another replica took the key over while some of its events are still ours:
                    // claim again; the ledger answers with that replica's outcome (or its lease).
                    None => tokio::time::sleep(TAKEN_OVER_POLL).await,
                }
            }
        };
        // A revoked partition's work stops where it is (waiting for the pacer, the gate, a
        // backoff, or a request); its events stay unsettled and the new owner redelivers them.
        let outcomes = tokio::select! {
            outcomes = delivering => outcomes,
            () = self.revoked(items) => {
                metrics::counter!("meterflow_deliveries_cancelled_total", "reason" => "revoked").increment(1);
                tracing::info!(delivery_key = %key, events = items.len(), "partition revoked: delivery cancelled; the new owner redelivers its events");
                return;
            }
        };
        let outcomes = match outcomes {
            Ok(Some(outcomes)) => outcomes,
            Ok(None) => return,
            Err(conflicts) => return self.deliver_without_conflicts(delivery, &conflicts).await,
        };
        let final_state = self
            .report(key, items.iter().zip(outcomes.iter().cloned()))
            .await;
        // Written after every dead letter of the delivery is durable: a "delivered" entry must
        // never hide an item that still owed its dead letter.
        if let (Some(ledger), Some((delivered, receipt))) = (&self.ledger, final_state) {
            ledger.finish(key, delivered, receipt);
        }
        for item in items {
            self.source.settle(&item.raw.source, item.raw.generation);
        }
    }

    /// Claims the key (checking the events' contents against their ids), then acts on the
    /// ledger's answer. `Err`: these events reuse an id recorded earlier with other contents;
    /// nothing was claimed or sent.
    async fn claim_and_send(
        &self,
        ledger: &Ledger,
        delivery: &Delivery,
    ) -> Result<Option<Vec<ItemOutcome>>, Vec<EventContent>> {
        let n = delivery.items.len();
        let origins = origins(&delivery.items);
        loop {
            let asked = Instant::now();
            let claim = until_ledger_answers(&delivery.key, "not sending until it answers", || {
                ledger.claim_checked(&delivery.key, n, origins.clone())
            })
            .await?;
            match self.act_on_claim(ledger, delivery, claim, asked).await {
                AfterClaim::Again => continue,
                AfterClaim::Outcomes(outcomes) => return Ok(outcomes),
            }
        }
    }

    /// Dead-letters (`id_conflict`) the items that reuse an earlier event's id with other
    /// contents, and delivers the rest under the key of what is left.
    async fn deliver_without_conflicts(&self, delivery: &Delivery, conflicts: &[EventContent]) {
        let (bad, good): (Vec<DeliveryItem>, Vec<DeliveryItem>) = delivery
            .items
            .iter()
            .cloned()
            .partition(|i| conflicts.contains(&content(i)));
        let rejection = id_conflict();
        self.report(
            &delivery.key,
            bad.iter().map(|i| {
                (
                    i,
                    ItemOutcome::DeadLetter {
                        rejection: rejection.clone(),
                        provider_answer: None,
                    },
                )
            }),
        )
        .await;
        for item in &bad {
            self.source.settle(&item.raw.source, item.raw.generation);
        }
        if !good.is_empty() {
            let rest = Delivery {
                key: DeliveryKey::for_events(good.iter().map(|i| i.usage.event_id.as_str())),
                items: good,
            };
            Box::pin(self.deliver_per_event(&rest)).await;
        }
    }
}
