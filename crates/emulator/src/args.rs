//! `meterflow emulate billwerk|billingrails` flags, and how they become emulator options.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::billingrails::{self, BillingrailsOptions};
use super::billwerk::{self, BillwerkOptions, SeedContract};
use super::faults::FaultSettings;
use super::ratelimit::RateLimitSettings;
use crate::Secret;

/// `meterflow emulate ...` arguments.
#[derive(Debug, clap::Args)]
pub struct EmulateArgs {
    #[command(subcommand)]
    pub provider: EmulatedProviderArgs,
}

/// Which provider to emulate.
#[derive(Debug, clap::Subcommand)]
pub enum EmulatedProviderArgs {
    /// Emulate billwerk: OAuth client credentials, metered usage, contracts, rate-limit headers.
    Billwerk(Box<BillwerkArgs>),
    /// Emulate Billingrails: API key, event ingest and batch, idempotency.
    Billingrails(Box<BillingrailsArgs>),
}

pub const CLIENT_ID_ENV: &str = "METERFLOW_EMULATOR_CLIENT_ID";
pub const CLIENT_SECRET_ENV: &str = "METERFLOW_EMULATOR_CLIENT_SECRET";
pub const API_KEY_ENV: &str = "METERFLOW_EMULATOR_API_KEY";

#[derive(Debug, clap::Args)]
pub struct BillwerkArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
    pub listen: String,
    /// OAuth client id to accept. Also $METERFLOW_EMULATOR_CLIENT_ID; default "meterflow-emulator".
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// OAuth client secret to accept. Also $METERFLOW_EMULATOR_CLIENT_SECRET (preferred: flags show
    /// in `ps`); default "meterflow-emulator-secret".
    #[arg(long, value_name = "SECRET")]
    pub client_secret: Option<String>,
    /// How long an access token is valid (`expires_in`); afterwards calls with it answer 401.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,
    /// Seed contracts from a JSON file: an array of contract objects with "Id" (24 hex) and
    /// optionally "ExternalId" and any other properties (a dump of GET /api/v1/contracts works).
    #[arg(long, value_name = "FILE")]
    pub contracts: Option<PathBuf>,
    /// Seed one contract (repeatable): EXTERNAL_ID=ID, or just ID.
    #[arg(long = "contract", value_name = "EXTERNAL_ID=ID")]
    pub contract: Vec<String>,
    /// Accept usage for any well-formed (24 hex) contract id. Default: true when no contracts are
    /// seeded, false when some are (unknown ids then answer 404).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub accept_any_contract: Option<bool>,
    /// Component catalogue (repeatable or comma-separated): other ComponentIds answer 422.
    /// Without it any ComponentId is accepted.
    #[arg(long = "component", value_name = "ID", value_delimiter = ',')]
    pub components: Vec<String>,
    /// Require the header X-SELECTED-LEGAL-ENTITY-ID: ID on every /api/v1 call (403 otherwise),
    /// as accounts with an entity hierarchy do.
    #[arg(long, value_name = "ID")]
    pub require_legal_entity: Option<String>,
    /// Answer at most N records per usage-list page, even when `take` asks for more (as a
    /// server may): clients must page until an empty page.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub list_page_cap: Option<u64>,
    /// The status a DELETE of billed usage answers (billwerk's is undocumented). Usage is
    /// billed through `POST /_emulator/billing-run` or `POST /_emulator/usage/{id}/billed`.
    #[arg(long, value_name = "STATUS", default_value_t = 422, value_parser = clap::value_parser!(u16).range(400..500))]
    pub billed_delete_status: u16,
    #[command(flatten)]
    pub limit: RateLimitArgs,
    #[command(flatten)]
    pub faults: FaultArgs,
}

#[derive(Debug, clap::Args)]
pub struct BillingrailsArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8091")]
    pub listen: String,
    /// API key to accept as `Authorization: Bearer KEY`. Also $METERFLOW_EMULATOR_API_KEY
    /// (preferred: flags show in `ps`); default "br_test_meterflow_emulator".
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Path prefix of the event endpoints: PREFIX/events/ingest and PREFIX/events/batch (the
    /// legacy PREFIX/biller/events/... paths are served too).
    #[arg(long, value_name = "PREFIX", default_value = "/v1")]
    pub path_prefix: String,
    /// Most events accepted in one batch request.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_batch: usize,
    /// How long an Idempotency-Key's answer is replayed.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,
    /// An event property every event must carry (repeatable), e.g. the meter's account
    /// mapping `billingrails_account_id`. Events without it are refused with 422.
    #[arg(long = "require-property", value_name = "NAME")]
    pub required_properties: Vec<String>,
    /// Refuse invalid batches without `details` (only type, code and message), as an error
    /// that names no event: clients must find the bad events themselves.
    #[arg(long)]
    pub no_error_details: bool,
    #[command(flatten)]
    pub limit: RateLimitArgs,
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// The rate limit (both providers).
#[derive(Debug, clap::Args)]
pub struct RateLimitArgs {
    /// Answers allowed per window, counted over every provider request (not per client);
    /// beyond it: 429. 0 = unlimited, and then no rate-limit headers are sent.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub limit: u32,
    /// Window length; windows start at emulator start + k·WINDOW.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Send no X-RateLimit-Limit / X-RateLimit-Remaining headers (as older billwerk docs describe,
    /// and as Billingrails documents).
    #[arg(long)]
    pub no_rate_limit_headers: bool,
    /// Send `Retry-After: SECONDS` (until the window ends, rounded up) on 429.
    #[arg(long)]
    pub retry_after: bool,
    /// Send `X-RateLimit-Reset: SECONDS` (until the window ends, rounded up) on every answer.
    #[arg(long)]
    pub reset_header: bool,
}

/// Fault injection (both providers); every rate is a probability from 0 to 1.
#[derive(Debug, clap::Args)]
pub struct FaultArgs {
    /// Share of usage/event requests answered 500, 502 or 503 without recording anything.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub fail_rate: f64,
    /// Delay added before provider answers (all endpoints).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Share of answers that get --latency.
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = probability)]
    pub latency_rate: f64,
    /// Share of usage/event requests that are recorded but answered only after --slow-duration
    /// (past a client's timeout: the client sees a timeout, the record exists).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub slow_rate: f64,
    /// How late a --slow-rate answer comes.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub slow_duration: Duration,
    /// Share of usage/event requests that are recorded, then answered by closing the connection
    /// without a response (the case that makes naive retries bill twice).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub drop_rate: f64,
}

fn probability(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number (expected 0 to 1, e.g. 0.05)"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{value} is not a probability (expected 0 to 1, e.g. 0.05)"
        ))
    }
}

impl RateLimitArgs {
    pub fn settings(&self) -> RateLimitSettings {
        RateLimitSettings {
            limit: self.limit,
            window: self.window,
            headers: !self.no_rate_limit_headers,
            retry_after: self.retry_after,
            reset_header: self.reset_header,
        }
    }
}

impl FaultArgs {
    pub fn settings(&self) -> FaultSettings {
        FaultSettings {
            fail_rate: self.fail_rate,
            latency: self.latency,
            latency_rate: self.latency_rate,
            slow_rate: self.slow_rate,
            slow_duration: self.slow_duration,
            drop_rate: self.drop_rate,
        }
    }
}

/// Where a credential came from, for the start-up message (never the value of a secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Flag(&'static str),
    Env(&'static str),
    BuiltInDefault,
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialSource::Flag(flag) => write!(f, "from {flag}"),
            CredentialSource::Env(name) => write!(f, "from ${name}"),
            CredentialSource::BuiltInDefault => f.write_str(
                "from the built-in default (fine locally; set one for a shared staging)",
            ),
        }
    }
}

/// Flag first, then the environment, then the default.
pub fn resolve_credential(
    flag_value: Option<&str>,
    flag: &'static str,
    env_name: &'static str,
    env: impl Fn(&str) -> Option<String>,
    default: &str,
) -> (String, CredentialSource) {
    if let Some(value) = flag_value {
        return (value.to_string(), CredentialSource::Flag(flag));
    }
    if let Some(value) = env(env_name).filter(|value| !value.is_empty()) {
        return (value, CredentialSource::Env(env_name));
    }
    (default.to_string(), CredentialSource::BuiltInDefault)
}

fn from_process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl BillwerkArgs {
    /// The options, plus one line per credential saying where it came from.
    pub fn options(&self) -> anyhow::Result<(BillwerkOptions, Vec<String>)> {
        let (client_id, id_source) = resolve_credential(
            self.client_id.as_deref(),
            "--client-id",
            CLIENT_ID_ENV,
            from_process_env,
            billwerk::DEFAULT_CLIENT_ID,
        );
        let (client_secret, secret_source) = resolve_credential(
            self.client_secret.as_deref(),
            "--client-secret",
            CLIENT_SECRET_ENV,
            from_process_env,
            billwerk::DEFAULT_CLIENT_SECRET,
        );
        let mut contracts = Vec::new();
        if let Some(path) = &self.contracts {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--contracts: cannot read {}", path.display()))?;
            contracts.extend(
                SeedContract::from_json_file_text(&text).map_err(|problem| {
                    anyhow::anyhow!("--contracts {}: {problem}", path.display())
                })?,
            );
        }
        for flag in &self.contract {
            contracts.push(
                SeedContract::from_flag(flag)
                    .map_err(|problem| anyhow::anyhow!("--contract {flag}: {problem}"))?,
            );
        }
        let options = BillwerkOptions {
            client_id,
            client_secret: Secret::new(client_secret),
            token_lifetime: self.token_lifetime,
            contracts,
            accept_any_contract: self.accept_any_contract,
            components: self.components.clone(),
            require_legal_entity: self.require_legal_entity.clone(),
            limit: self.limit.settings(),
            faults: self.faults.settings(),
            list_page_cap: self
                .list_page_cap
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            billed_delete_status: self.billed_delete_status,
        };
        let notes = vec![
            format!("client id {id_source}"),
            format!("client secret {secret_source}"),
        ];
        Ok((options, notes))
    }
}

impl BillingrailsArgs {
    /// The options, plus a line saying where the API key came from.
    pub fn options(&self) -> anyhow::Result<(BillingrailsOptions, Vec<String>)> {
        let (api_key, source) = resolve_credential(
            self.api_key.as_deref(),
            "--api-key",
            API_KEY_ENV,
            from_process_env,
            billingrails::DEFAULT_API_KEY,
        );
        let options = BillingrailsOptions {
            api_key: Secret::new(api_key),
            path_prefix: self.path_prefix.clone(),
            max_batch: self.max_batch,
            idempotency_ttl: self.idempotency_ttl,
            required_properties: self.required_properties.clone(),
            error_details: !self.no_error_details,
            limit: self.limit.settings(),
            faults: self.faults.settings(),
        };
        Ok((options, vec![format!("API key {source}")]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        emulate: EmulateArgs,
    }

    #[test]
    fn credentials_come_from_flag_then_env_then_default() {
        let env = |name: &str| (name == "SET").then(|| "from-env".to_string());
        assert_eq!(
            resolve_credential(Some("flag"), "--x", "SET", env, "d"),
            ("flag".to_string(), CredentialSource::Flag("--x"))
        );
        assert_eq!(
            resolve_credential(None, "--x", "SET", env, "d"),
            ("from-env".to_string(), CredentialSource::Env("SET"))
        );
        assert_eq!(
            resolve_credential(None, "--x", "UNSET", env, "d"),
            ("d".to_string(), CredentialSource::BuiltInDefault)
        );
    }

    #[test]
    fn billwerk_flags_become_options() {
        let cli = Cli::parse_from([
            "emulate",
            "billwerk",
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "me",
            "--token-lifetime",
            "2s",
            "--contract",
            "cust-1=5ce53069443e551b9caccc64",
            "--accept-any-contract",
            "--component",
            "a,b",
            "--limit",
            "5",
            "--window",
            "10s",
            "--retry-after",
            "--no-rate-limit-headers",
            "--drop-rate",
            "0.5",
            "--slow-duration",
            "2s",
        ]);
        let EmulatedProviderArgs::Billwerk(args) = cli.emulate.provider else {
            panic!("billwerk expected");
        };
        let (options, notes) = args.options().unwrap();
        assert_eq!(options.client_id, "me");
        assert_eq!(options.token_lifetime, Duration::from_secs(2));
        assert_eq!(options.contracts.len(), 1);
        assert_eq!(options.accept_any_contract, Some(true));
        assert_eq!(options.components, ["a", "b"]);
        assert_eq!(options.limit.limit, 5);
        assert!(!options.limit.headers);
        assert!(options.limit.retry_after);
        assert_eq!(options.faults.drop_rate, 0.5);
        assert_eq!(notes[0], "client id from --client-id");
        assert!(!notes
            .iter()
            .any(|note| note.contains("meterflow-emulator-secret")));
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused_by_the_parser() {
        let parsed = Cli::try_parse_from(["emulate", "billingrails", "--fail-rate", "2"]);
        assert!(parsed.unwrap_err().to_string().contains("probability"));
    }
}
