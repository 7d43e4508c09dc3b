//! Realistic usage events for the demo and benchmarks: several contracts (by billwerk id and by
//! the product's external id), metrics with their own quantity shapes, attributes, and a share of
//! invalid events of every kind.

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// billwerk contract ids and the external ids some products use instead.
pub const CONTRACTS: [(&str, &str); 6] = [
    ("acme-prod", "5cd186af443e551fe8e4f5d0"),
    ("globex", "5cd186af443e551fe8e4f5d1"),
    ("initech", "5cd186af443e551fe8e4f5d2"),
    ("umbrella", "5cd186af443e551fe8e4f5d3"),
    ("hooli", "5cd186af443e551fe8e4f5d4"),
    ("stark", "5cd186af443e551fe8e4f5d5"),
];

/// metric → billwerk ComponentId.
pub const COMPONENTS: [(&str, &str); 3] = [
    ("api_calls", "5ce53069443e551b9caccc60"),
    ("storage_gb", "5ce53069443e551b9caccc61"),
    ("seats", "5ce53069443e551b9caccc62"),
];

const REGIONS: [&str; 3] = ["eu-west-1", "us-east-1", "ap-south-1"];
const PLANS: [&str; 3] = ["starter", "growth", "enterprise"];

/// What an invalid event was made to fail with (its expected dead-letter reason).
pub const INVALID_KINDS: [&str; 5] = [
    "invalid_json",
    "invalid_quantity",
    "unknown_metric",
    "invalid_timestamp",
    "unknown_contract",
];

/// One generated event: its bytes, and the reason it must be dead-lettered for (if invalid).
pub struct Generated {
    pub payload: Vec<u8>,
    pub invalid: Option<&'static str>,
}

pub struct EventGenerator {
    rng: StdRng,
    next: u64,
    invalid_share: f64,
    run: String,
    now: DateTime<Utc>,
}

impl EventGenerator {
    pub fn new(seed: u64, invalid_share: f64, now: DateTime<Utc>) -> Self {
        EventGenerator {
            rng: StdRng::seed_from_u64(seed),
            next: 0,
            invalid_share,
            run: format!("{seed:x}"),
            now,
        }
    }

    pub fn next_event(&mut self) -> Generated {
        self.next += 1;
        let id = format!("evt_{}_{:08}", self.run, self.next);
        let (external, contract) = CONTRACTS[self.rng.random_range(0..CONTRACTS.len())];
        let (metric, _) = COMPONENTS[self.rng.random_range(0..COMPONENTS.len())];
        let quantity = match metric {
            "api_calls" => json!(self.rng.random_range(1..500)),
            "storage_gb" => json!(format!(
                "{}.{:03}",
                self.rng.random_range(0..50),
                self.rng.random_range(1..1000)
            )),
            _ => json!(self.rng.random_range(1..20)),
        };
        let timestamp = (self.now - Duration::seconds(self.rng.random_range(0..3600)))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut event = json!({
            "id": id,
            "metric": metric,
            "quantity": quantity,
            "timestamp": timestamp,
            "attributes": {
                "plan": PLANS[self.rng.random_range(0..PLANS.len())],
                "region": REGIONS[self.rng.random_range(0..REGIONS.len())],
            }
        });
        if self.rng.random_bool(0.5) {
            event["contract_id"] = json!(contract);
        } else {
            event["contract_external_id"] = json!(external);
        }
        if !self.rng.random_bool(self.invalid_share.clamp(0.0, 1.0)) {
            return Generated {
                payload: event.to_string().into_bytes(),
                invalid: None,
            };
        }
        let kind = INVALID_KINDS[self.rng.random_range(0..INVALID_KINDS.len())];
        match kind {
            "invalid_json" => {
                let mut bytes = event.to_string().into_bytes();
                bytes.truncate(bytes.len() / 2);
                return Generated {
                    payload: bytes,
                    invalid: Some(kind),
                };
            }
            "invalid_quantity" => event["quantity"] = json!("0"),
            "unknown_metric" => event["metric"] = json!("teleportations"),
            "invalid_timestamp" => event["timestamp"] = json!("last tuesday"),
            _ => {
                if let Some(fields) = event.as_object_mut() {
                    fields.remove("contract_id");
                }
                event["contract_external_id"] = json!("no-such-customer");
            }
        }
        Generated {
            payload: event.to_string().into_bytes(),
            invalid: Some(kind),
        }
    }
}
