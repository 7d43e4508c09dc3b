//! The Billingrails emulator: API-key auth, event ingest and all-or-nothing batches, per-event
//! deduplication, the `Idempotency-Key` header, the documented error and 429 bodies.
//!
//! Built to `shared/reference/billing-apis.md` §2.

mod event_log;
mod events;
mod handlers;
mod idempotency;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

pub use self::event_log::BillingrailsEvent;
pub use self::events::FieldProblem;

use self::event_log::EventLog;
use self::events::EventRules;
use self::idempotency::IdempotencyCache;
use super::control::Control;
use super::error::EmulatorError;
use super::faults::FaultSettings;
use super::handle::{self, EmulatedProvider, EmulatorHandle};
use super::ratelimit::RateLimitSettings;
use super::stats::{PerKey, RecordStats};
use crate::Secret;

/// A running Billingrails emulator.
pub type BillingrailsEmulator = EmulatorHandle<Billingrails>;

pub const DEFAULT_API_KEY: &str = "br_test_meterflow_emulator";

/// Everything a Billingrails emulator can be told at start-up.
#[derive(Debug, Clone)]
pub struct BillingrailsOptions {
    pub api_key: Secret,
    /// `/v1` serves `/v1/events/ingest`, `/v1/events/batch` and the legacy
    /// `/v1/biller/events/...`.
    pub path_prefix: String,
    /// Most events in one batch (Billingrails: 100).
    pub max_batch: usize,
    /// How long an `Idempotency-Key` answer is replayed (Billingrails: 24 h).
    pub idempotency_ttl: Duration,
    /// Properties every event must carry (the meter's account mapping).
    pub required_properties: Vec<String>,
    /// Name the refused fields in `details` (the documented shape). `false` answers with
    /// type, code and message only, to test clients that must find the bad events themselves.
    pub error_details: bool,
    pub limit: RateLimitSettings,
    pub faults: FaultSettings,
}

impl Default for BillingrailsOptions {
    fn default() -> Self {
        BillingrailsOptions {
            api_key: Secret::new(DEFAULT_API_KEY),
            path_prefix: "/v1".to_string(),
            max_batch: 100,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            required_properties: Vec::new(),
            error_details: true,
            limit: RateLimitSettings::default(),
            faults: FaultSettings::default(),
        }
    }
}

impl BillingrailsOptions {
    pub fn with_limit(mut self, limit: RateLimitSettings) -> Self {
        self.limit = limit;
        self
    }

    pub fn with_faults(mut self, faults: FaultSettings) -> Self {
        self.faults = faults;
        self
    }

    /// `"v1/"` → `"/v1"`, `"/"` → `""`.
    fn normalized_prefix(&self) -> Result<String, EmulatorError> {
        let trimmed = self.path_prefix.trim().trim_matches('/');
        if trimmed.contains(['{', '}', '?', '#', ' ']) {
            return Err(EmulatorError::invalid(
                "path_prefix",
                format!("'{}' is not a plain path such as /v1", self.path_prefix),
            ));
        }
        Ok(if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        })
    }

    fn validate(&self) -> Result<(), EmulatorError> {
        handle::validate_common(&self.limit, &self.faults)?;
        self.normalized_prefix()?;
        if self.max_batch == 0 {
            return Err(EmulatorError::invalid(
                "max_batch",
                "must be at least 1 (Billingrails: 100)",
            ));
        }
        if self.api_key.expose().is_empty() {
            return Err(EmulatorError::invalid("api_key", "must not be empty"));
        }
        Ok(())
    }
}

/// The emulated Billingrails account.
pub struct Billingrails {
    api_key: Secret,
    rules: EventRules,
    error_details: bool,
    log: Mutex<EventLog>,
    idempotency: Mutex<IdempotencyCache>,
}

impl Billingrails {
    fn log(&self) -> std::sync::MutexGuard<'_, EventLog> {
        self.log.lock().expect("event log lock poisoned")
    }

    fn idempotency(&self) -> std::sync::MutexGuard<'_, IdempotencyCache> {
        self.idempotency.lock().expect("idempotency lock poisoned")
    }
}

impl EmulatedProvider for Billingrails {
    type Record = BillingrailsEvent;

    fn records(&self) -> Vec<BillingrailsEvent> {
        self.log().events()
    }

    fn record_stats(&self, per_key: PerKey) -> RecordStats {
        self.log().stats(per_key)
    }

    fn clear(&self) {
        self.log().clear();
        self.idempotency().clear();
    }
}

/// What start-up found worth telling the operator (never a secret).
pub fn describe(options: &BillingrailsOptions) -> String {
    let prefix = options.normalized_prefix().unwrap_or_default();
    format!(
        "events at {prefix}/events/ingest and {prefix}/events/batch (≤ {} events; legacy {prefix}/biller/events/...); Idempotency-Key answers kept {}",
        options.max_batch,
        humantime::format_duration(options.idempotency_ttl)
    )
}

/// Starts a Billingrails emulator on `listener` (bind it to port 0 in tests).
pub async fn start(
    options: BillingrailsOptions,
    listener: TcpListener,
) -> Result<BillingrailsEmulator, EmulatorError> {
    options.validate()?;
    let prefix = options.normalized_prefix()?;
    let control = Arc::new(Control::new(
        options.limit.clone(),
        options.faults.clone(),
        handlers::too_many_requests,
    ));
    let billingrails = Arc::new(Billingrails {
        api_key: options.api_key,
        rules: EventRules {
            required_properties: options.required_properties,
            max_batch: options.max_batch,
        },
        error_details: options.error_details,
        log: Mutex::new(EventLog::default()),
        idempotency: Mutex::new(IdempotencyCache::new(options.idempotency_ttl)),
    });
    let router = handlers::router(&prefix, billingrails.clone(), control.clone());
    let server = super::server::spawn(listener, router)?;
    Ok(EmulatorHandle::new(server, control, billingrails))
}
