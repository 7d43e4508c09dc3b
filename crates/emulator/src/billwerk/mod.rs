//! The billwerk emulator: OAuth client credentials, metered usage (create, list, delete),
//! contract lookup by external id, billwerk's rate-limit headers, and fault injection.
//!
//! Built to `shared/reference/billing-apis.md` §1. Where billwerk leaves a behaviour
//! undocumented the emulator picks one and `docs/emulator.md` says which.

mod auth;
mod contracts;
mod handlers;
mod ledger;
pub mod timestamp;
mod usage_body;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

pub use self::contracts::SeedContract;
pub use self::ledger::BillwerkRecord;
pub use self::usage_body::ProductOverride;

use self::auth::{ClientCredentials, TokenBook};
use self::contracts::ContractBook;
use self::ledger::UsageLedger;
use super::control::Control;
use super::error::EmulatorError;
use super::faults::FaultSettings;
use super::handle::{self, EmulatedProvider, EmulatorHandle};
use super::ratelimit::RateLimitSettings;
use super::stats::{PerKey, RecordStats};
use crate::Secret;

/// A running billwerk emulator.
pub type BillwerkEmulator = EmulatorHandle<Billwerk>;

/// Everything a billwerk emulator can be told at start-up.
#[derive(Debug, Clone)]
pub struct BillwerkOptions {
    pub client_id: String,
    pub client_secret: Secret,
    /// How long an access token stays valid (`expires_in`).
    pub token_lifetime: Duration,
    /// Contracts known by id and `ExternalId`.
    pub contracts: Vec<SeedContract>,
    /// Accept usage for any well-formed contract id. `None`: yes when no contracts are seeded
    /// (demos need no seeding), no when some are (then an unknown id answers 404).
    pub accept_any_contract: Option<bool>,
    /// The component catalogue; empty = any ComponentId is accepted.
    pub components: Vec<String>,
    /// Require `X-SELECTED-LEGAL-ENTITY-ID` with this value on every `/api/v1` call.
    pub require_legal_entity: Option<String>,
    pub limit: RateLimitSettings,
    pub faults: FaultSettings,
    /// Answer at most this many records per usage-list page, whatever `take` asks for: a
    /// server may cap its pages below the documented 500, and a client must page on anyway.
    pub list_page_cap: Option<usize>,
    /// The status a deletion of billed usage answers (billwerk's is undocumented).
    pub billed_delete_status: u16,
}

impl Default for BillwerkOptions {
    fn default() -> Self {
        BillwerkOptions {
            client_id: DEFAULT_CLIENT_ID.to_string(),
            client_secret: Secret::new(DEFAULT_CLIENT_SECRET),
            token_lifetime: Duration::from_secs(3600),
            contracts: Vec::new(),
            accept_any_contract: None,
            components: Vec::new(),
            require_legal_entity: None,
            limit: RateLimitSettings::default(),
            faults: FaultSettings::default(),
            list_page_cap: None,
            billed_delete_status: 422,
        }
    }
}

pub const DEFAULT_CLIENT_ID: &str = "meterflow-emulator";
pub const DEFAULT_CLIENT_SECRET: &str = "meterflow-emulator-secret";

impl BillwerkOptions {
    /// Seeds one contract.
    pub fn with_contract(mut self, external_id: &str, id: &str) -> Self {
        self.contracts.push(SeedContract::new(external_id, id));
        self
    }

    pub fn with_limit(mut self, limit: RateLimitSettings) -> Self {
        self.limit = limit;
        self
    }

    pub fn with_faults(mut self, faults: FaultSettings) -> Self {
        self.faults = faults;
        self
    }

    /// Caps every usage-list page at `records` (see [`BillwerkOptions::list_page_cap`]).
    pub fn with_list_page_cap(mut self, records: usize) -> Self {
        self.list_page_cap = Some(records);
        self
    }

    fn validate(&self) -> Result<(), EmulatorError> {
        handle::validate_common(&self.limit, &self.faults)?;
        if self.token_lifetime.is_zero() {
            return Err(EmulatorError::invalid(
                "token_lifetime",
                "must be longer than 0 (e.g. \"1h\")",
            ));
        }
        if self.list_page_cap == Some(0) {
            return Err(EmulatorError::invalid(
                "list_page_cap",
                "must be at least 1 (a page of 0 records ends every listing)",
            ));
        }
        if !(400..=499).contains(&self.billed_delete_status) {
            return Err(EmulatorError::invalid(
                "billed_delete_status",
                format!(
                    "{} is not a 4xx status (billwerk refuses to delete billed usage)",
                    self.billed_delete_status
                ),
            ));
        }
        for contract in &self.contracts {
            if !contracts::is_contract_id(&contract.id) {
                return Err(EmulatorError::invalid(
                    "contracts",
                    format!("'{}' is not a 24-hex-character contract id", contract.id),
                ));
            }
        }
        Ok(())
    }
}

/// The emulated billwerk account.
pub struct Billwerk {
    credentials: ClientCredentials,
    tokens: TokenBook,
    contracts: ContractBook,
    accept_any_contract: bool,
    components: Option<HashSet<String>>,
    require_legal_entity: Option<String>,
    list_page_cap: Option<usize>,
    billed_delete_status: u16,
    ledger: Mutex<UsageLedger>,
}

impl Billwerk {
    fn new(options: BillwerkOptions) -> Billwerk {
        let contracts = ContractBook::new(options.contracts);
        let accept_any_contract = options.accept_any_contract.unwrap_or(contracts.is_empty());
        let id_prefix = chrono::Utc::now().timestamp() as u32;
        Billwerk {
            credentials: ClientCredentials {
                client_id: options.client_id,
                client_secret: options.client_secret,
            },
            tokens: TokenBook::new(options.token_lifetime),
            contracts,
            accept_any_contract,
            components: (!options.components.is_empty())
                .then(|| options.components.into_iter().collect()),
            require_legal_entity: options.require_legal_entity,
            list_page_cap: options.list_page_cap,
            billed_delete_status: options.billed_delete_status,
            ledger: Mutex::new(UsageLedger::new(id_prefix)),
        }
    }

    /// A valid access token, as if fetched through `POST /oauth/token/`.
    pub fn issue_token(&self) -> String {
        self.tokens.issue(Instant::now())
    }

    /// Makes every issued token answer 401 (billwerk tokens are revocable).
    pub fn revoke_tokens(&self) {
        self.tokens.revoke_all();
    }

    /// Whether usage for this (well-formed) contract id is accepted.
    fn accepts_contract(&self, contract_id: &str) -> bool {
        self.accept_any_contract || self.contracts.contains(contract_id)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, UsageLedger> {
        self.ledger.lock().expect("usage ledger lock poisoned")
    }
}

impl EmulatedProvider for Billwerk {
    type Record = BillwerkRecord;

    fn records(&self) -> Vec<BillwerkRecord> {
        self.ledger().records()
    }

    fn record_stats(&self, per_key: PerKey) -> RecordStats {
        self.ledger().stats(per_key)
    }

    fn clear(&self) {
        self.ledger().clear();
    }
}

/// What start-up found worth telling the operator (never a secret).
pub fn describe(options: &BillwerkOptions) -> String {
    let contracts = match (options.contracts.len(), options.accept_any_contract) {
        (0, Some(false)) => "no contracts seeded, none accepted".to_string(),
        (0, _) => "no contracts seeded: any well-formed contract id accepted".to_string(),
        (n, Some(true)) => format!("contracts seeded: {n}; any well-formed contract id accepted"),
        (n, _) => format!("contracts seeded: {n}; other contract ids answer 404"),
    };
    let components = match options.components.len() {
        0 => "any ComponentId accepted".to_string(),
        n => format!("components in the catalogue: {n}"),
    };
    format!(
        "client id '{}', tokens valid {}; {contracts}; {components}",
        options.client_id,
        humantime::format_duration(options.token_lifetime)
    )
}

/// Starts a billwerk emulator on `listener` (bind it to port 0 in tests).
pub async fn start(
    options: BillwerkOptions,
    listener: TcpListener,
) -> Result<BillwerkEmulator, EmulatorError> {
    options.validate()?;
    let control = Arc::new(Control::new(
        options.limit.clone(),
        options.faults.clone(),
        handlers::too_many_requests,
    ));
    let billwerk = Arc::new(Billwerk::new(options));
    let router = handlers::router(billwerk.clone(), control.clone());
    let server = super::server::spawn(listener, router)?;
    Ok(EmulatorHandle::new(server, control, billwerk))
}
