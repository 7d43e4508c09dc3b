//! Concurrency permits: `sink.concurrency` requests in flight at once, and at most
//! `sink.concurrency_per_contract` of them for one contract, so that a contract whose requests
//! keep failing (5xx, 403, a lookup that never answers) retries within its share while every
//! other contract keeps its pace.
//!
//! Two sets: the delivery runner holds a request permit from its first request (or lookup)
//! to its outcome; a delivery task holds a place in the window of
//! [`DELIVERIES_PER_REQUEST`] times as many from its start (the ledger's claim) to its end
//! (its finish and dead letters). While one delivery's request is out, the next one's claim
//! is being written: the claim's wait for the group commit no longer takes a request's place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::deliver::Delivery;
use crate::event::CustomerRef;

pub struct Permits {
    all: Arc<Semaphore>,
    per_contract: usize,
    contracts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Held while a delivery runs; both permits return when it drops.
pub struct Permit<'a> {
    _all: OwnedSemaphorePermit,
    contract: Option<(String, OwnedSemaphorePermit)>,
    permits: &'a Permits,
}

/// Deliveries under way (window places) for each request permit. On P1 with the SQLite ledger
/// (docs/benchmarks.md, "Ninth run") 1 gave 6 500–7 400 events/s, 2 gave 7 600–8 400, 4 gave
/// 8 200–10 000 and 8 no more. Each claimed delivery that waits for a request permit is one a
/// crash leaves "sending", for the next start to look up at the provider: four times the
/// requests (at most 4 096 at `sink.concurrency = 1024`).
pub const DELIVERIES_PER_REQUEST: usize = 4;

impl Permits {
    /// The window of deliveries under way for `concurrency` requests in flight (and
    /// `per_contract` of one contract's): [`DELIVERIES_PER_REQUEST`] times each.
    pub fn window(concurrency: usize, per_contract: usize) -> Permits {
        Permits::new(
            concurrency.saturating_mul(DELIVERIES_PER_REQUEST),
            per_contract.saturating_mul(DELIVERIES_PER_REQUEST),
        )
    }

    pub fn new(concurrency: usize, per_contract: usize) -> Permits {
        let all = concurrency.max(1);
        Permits {
            all: Arc::new(Semaphore::new(all)),
            per_contract: per_contract.clamp(1, all),
            contracts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for the delivery's contract share first, then for a permit of the whole sink; both
    /// are handed out first come, first served. A delivery of several contracts (a Billingrails
    /// batch) takes only the sink-wide permit.
    pub async fn acquire(&self, delivery: &Delivery) -> Permit<'_> {
        let contract = match contract_of(delivery) {
            Some(contract) => {
                let share = {
                    let mut contracts = self.contracts.lock().unwrap_or_else(|e| e.into_inner());
                    contracts
                        .entry(contract.clone())
                        .or_insert_with(|| Arc::new(Semaphore::new(self.per_contract)))
                        .clone()
                };
                // Never closed: a failure to acquire cannot happen; without a permit the
                // delivery would simply not be limited by its contract.
                share.acquire_owned().await.ok().map(|p| (contract, p))
            }
            None => None,
        };
        let all = loop {
            // Never closed either; the loop only satisfies the type.
            if let Ok(p) = self.all.clone().acquire_owned().await {
                break p;
            }
        };
        Permit {
            _all: all,
            contract,
            permits: self,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let Some((contract, permit)) = self.contract.take() else {
            return;
        };
        drop(permit);
        // Forget idle contracts: the map holds only contracts with work in flight or waiting.
        let mut contracts = self
            .permits
            .contracts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(share) = contracts.get(&contract) {
            if Arc::strong_count(share) == 1
                && share.available_permits() == self.permits.per_contract
            {
                contracts.remove(&contract);
            }
        }
    }
}

fn contract_of(delivery: &Delivery) -> Option<String> {
    let mut customers = delivery.items.iter().map(|i| match &i.usage.customer {
        CustomerRef::ContractId(c) => ("id", c.as_str()),
        CustomerRef::ExternalId(c) => ("external", c.as_str()),
    });
    let first = customers.next()?;
    customers
        .all(|c| c == first)
        .then(|| format!("{}:{}", first.0, first.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::DeliveryItem;
    use crate::event::{BillableUsage, DeliveryKey, RawMessage, SourceRef};
    use std::time::Duration;

    fn delivery(contract: &str, id: &str) -> Delivery {
        let usage = BillableUsage {
            event_id: id.into(),
            customer: CustomerRef::ContractId(contract.into()),
            metric: "api_calls".into(),
            component_id: "c".into(),
            quantity: 1.into(),
            due_date: chrono::Utc::now(),
            product_override: None,
            attributes: Default::default(),
        };
        let raw = RawMessage {
            source: SourceRef {
                topic: "t".into(),
                partition: 0,
                offset: 0,
            },
            key: None,
            payload: Default::default(),
            headers: Vec::new(),
            generation: 1,
        };
        Delivery {
            key: DeliveryKey::for_event(id),
            items: vec![DeliveryItem { usage, raw }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_contract_holds_only_its_share() {
        let permits = Permits::new(8, 2);
        // A failing contract's deliveries hold their permits (they retry forever).
        let stuck: Vec<Permit<'_>> = futures::future::join_all(
            (0..2).map(|i| permits.acquire_owned_for_test(delivery("bad", &format!("b{i}")))),
        )
        .await;
        // A third one of the same contract waits ...
        let third = delivery("bad", "b3");
        let waiting = tokio::time::timeout(Duration::from_secs(1), permits.acquire(&third)).await;
        assert!(waiting.is_err(), "the contract's share is used up");
        // ... while other contracts take the rest of the sink's permits.
        let mut others = Vec::new();
        for i in 0..6 {
            let d = delivery(&format!("good{i}"), &format!("g{i}"));
            let p = tokio::time::timeout(Duration::from_secs(1), permits.acquire(&d))
                .await
                .expect("another contract is not starved");
            others.push(p);
        }
        drop(stuck);
        drop(others);
        assert!(
            crate::sync::lock(&permits.contracts).is_empty(),
            "idle contracts are forgotten"
        );
    }

    impl Permits {
        async fn acquire_owned_for_test(&self, d: Delivery) -> Permit<'_> {
            self.acquire(&d).await
        }
    }
}
