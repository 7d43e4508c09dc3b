//! The data that flows through the pipeline, stage to stage.
//!
//! source (raw Kafka message) → decode ([`UsageEvent`]) → price ([`BillableUsage`]) →
//! batch (`deliver::Delivery`) → deliver → acknowledge.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Where a message came from: the coordinates that the offset watermark and dead letters need.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// How an event names the customer whose contract is billed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CustomerRef {
    /// billwerk's internal contract id (24 hex characters).
    ContractId(String),
    /// The product's own id for the contract, resolved through `GET /contracts?externalId=`.
    ExternalId(String),
}

/// The length of a billwerk contract id: a 12-byte object id in hexadecimal.
pub const BILLWERK_CONTRACT_ID_LEN: usize = 24;

/// Whether `id` has the shape of a billwerk contract id: exactly 24 hexadecimal characters.
/// Anything else is refused before it can become part of a request path.
pub fn is_billwerk_contract_id(id: &str) -> bool {
    id.len() == BILLWERK_CONTRACT_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A usage event after decoding and validation: every field present and well-formed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Unique per event; the idempotency anchor every delivery key derives from.
    pub id: String,
    pub customer: CustomerRef,
    pub metric: String,
    /// Exact decimal, > 0.
    pub quantity: Decimal,
    /// Normalised to UTC; becomes billwerk's `DueDate`.
    pub timestamp: DateTime<Utc>,
    /// Flat string attributes (non-string JSON values are rendered as JSON text).
    pub attributes: BTreeMap<String, String>,
    /// A price the producer put in the event; honoured only when config allows it, within bounds.
    pub price_per_unit: Option<Decimal>,
}

/// billwerk's `ProductOverride`: price and description per usage record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ProductOverride {
    pub price_per_unit: Option<Decimal>,
    pub name: Option<String>,
    pub description: Option<String>,
}

impl ProductOverride {
    pub fn is_empty(&self) -> bool {
        self.price_per_unit.is_none() && self.name.is_none() && self.description.is_none()
    }
}

/// A priced event, ready to be delivered as one usage record (or to be summed into one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillableUsage {
    pub event_id: String,
    pub customer: CustomerRef,
    pub metric: String,
    pub component_id: String,
    pub quantity: Decimal,
    pub due_date: DateTime<Utc>,
    pub product_override: Option<ProductOverride>,
    pub attributes: BTreeMap<String, String>,
}

impl BillableUsage {
    /// A digest of what the producer said (customer, metric, quantity, timestamp, attributes),
    /// not of what config made of it: an event replayed after a price rule changed is the same
    /// event. Two events with one id and different digests are an id conflict.
    pub fn content_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let customer = match &self.customer {
            CustomerRef::ContractId(c) => ("contract_id", c),
            CustomerRef::ExternalId(c) => ("external_id", c),
        };
        for part in [customer.0, customer.1.as_str(), self.metric.as_str()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let quantity = self.quantity.normalize().to_string();
        h.update((quantity.len() as u64).to_le_bytes());
        h.update(quantity.as_bytes());
        h.update(self.due_date.timestamp_micros().to_le_bytes());
        for (k, v) in &self.attributes {
            for part in [k, v] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// Why an event can never be delivered: it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: RejectReason,
    /// Human-readable detail: which field, what value, what was expected.
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

/// Machine-readable dead-letter reasons; the `as_str` form is the `meterflow.reason` header and
/// the `reason` label of `meterflow_events_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not UTF-8 JSON, or not a JSON object.
    InvalidJson,
    /// A required field is absent or empty.
    MissingField,
    /// A field has the wrong type or shape.
    InvalidField,
    /// Quantity not a decimal, zero, negative, or out of range.
    InvalidQuantity,
    /// Timestamp not RFC 3339.
    InvalidTimestamp,
    /// Timestamp older than `input.max_age` or further ahead than `input.max_future`.
    TimestampOutOfWindow,
    /// The metric has no ComponentId in `[components]`.
    UnknownMetric,
    /// The contract (or external id) does not exist at the provider.
    UnknownContract,
    /// The event carries a price and config does not allow it, or it is out of bounds.
    PriceNotAllowed,
    /// The provider answered 400/404/422 (or an equivalent permanent refusal).
    ProviderRejected,
    /// The event reuses the id of an earlier event with other contents (another customer,
    /// metric, quantity, timestamp or attributes): it is a different event, and billing it as
    /// "already delivered" would lose it.
    IdConflict,
    /// A billwerk contract id that is not 24 hexadecimal characters (it becomes part of the
    /// request path: anything else could steer the request elsewhere).
    InvalidContractId,
    /// meterflow itself failed while delivering the event (a bug: the delivery task panicked).
    /// The event may or may not have reached the provider; a replay goes through the ledger.
    InternalError,
}

impl RejectReason {
    pub const ALL: [RejectReason; 13] = [
        RejectReason::InvalidJson,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::InvalidQuantity,
        RejectReason::InvalidTimestamp,
        RejectReason::TimestampOutOfWindow,
        RejectReason::UnknownMetric,
        RejectReason::UnknownContract,
        RejectReason::PriceNotAllowed,
        RejectReason::ProviderRejected,
        RejectReason::IdConflict,
        RejectReason::InvalidContractId,
        RejectReason::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::InvalidQuantity => "invalid_quantity",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::TimestampOutOfWindow => "timestamp_out_of_window",
            RejectReason::UnknownMetric => "unknown_metric",
            RejectReason::UnknownContract => "unknown_contract",
            RejectReason::PriceNotAllowed => "price_not_allowed",
            RejectReason::ProviderRejected => "provider_rejected",
            RejectReason::IdConflict => "id_conflict",
            RejectReason::InvalidContractId => "invalid_contract_id",
            RejectReason::InternalError => "internal_error",
        }
    }

    pub fn parse(s: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A Kafka message as read: everything a dead letter must carry back.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub source: SourceRef,
    pub key: Option<bytes::Bytes>,
    pub payload: bytes::Bytes,
    pub headers: Vec<(String, bytes::Bytes)>,
    /// The assignment generation the message was read under; settlements from an older
    /// generation of a partition are ignored (the partition was revoked and maybe re-assigned).
    pub generation: u64,
}

/// A stable key for one delivery, derived from event ids only (never from batch or attempt), so
/// a retry, a restart or a rebalance re-sends under the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeliveryKey(pub String);

impl DeliveryKey {
    /// The key of a delivery that carries exactly one event.
    pub fn for_event(event_id: &str) -> DeliveryKey {
        Self::for_events(std::iter::once(event_id))
    }

    /// The key of a delivery that carries several events: order-independent.
    pub fn for_events<'a>(event_ids: impl IntoIterator<Item = &'a str>) -> DeliveryKey {
        use sha2::{Digest, Sha256};
        let mut ids: Vec<&str> = event_ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut hasher = Sha256::new();
        for id in ids {
            hasher.update((id.len() as u64).to_be_bytes());
            hasher.update(id.as_bytes());
        }
        let digest = hasher.finalize();
        DeliveryKey(format!("mf1-{}", hex::encode(&digest[..16])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeliveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `a + b` exactly, or `None` when the sum cannot be represented: it overflows (about 7.9e28),
/// or it needs more digits than rust_decimal's 96-bit mantissa holds, in which case
/// `checked_add` would silently drop the last ones (`8 + 0.1234567890123456789012345678` →
/// `8.123456789012345678901234568`). rust_decimal adds at the larger scale of its operands and
/// only lowers the scale to round, so a lower scale than the operands' means digits were lost.
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    if a.is_zero() {
        return Some(b);
    }
    if b.is_zero() {
        return Some(a);
    }
    let sum = a.checked_add(b)?;
    (sum.scale() >= a.scale().max(b.scale())).then_some(sum)
}

/// The exact sum of `quantities`, or `None` when it cannot be represented (see [`exact_add`]).
pub fn exact_sum(quantities: impl IntoIterator<Item = Decimal>) -> Option<Decimal> {
    quantities.into_iter().try_fold(Decimal::ZERO, exact_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_key_is_stable_and_order_independent() {
        let a = DeliveryKey::for_events(["evt_1", "evt_2"]);
        let b = DeliveryKey::for_events(["evt_2", "evt_1"]);
        assert_eq!(a, b);
        assert_ne!(a, DeliveryKey::for_event("evt_1"));
        assert_eq!(
            DeliveryKey::for_event("evt_1"),
            DeliveryKey::for_event("evt_1")
        );
        assert_eq!(a.as_str().len(), 4 + 32);
        // Length-prefixing keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            DeliveryKey::for_events(["ab", "c"]),
            DeliveryKey::for_events(["a", "bc"])
        );
    }

    #[test]
    fn reject_reasons_round_trip() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::parse(r.as_str()), Some(r));
        }
    }
}
