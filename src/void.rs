//! `meterflow void`: deletes an unbilled usage record that meterflow delivered to billwerk and
//! records the void in the ledger, so that a redelivery or a replay of its events does not bill
//! them again (unless `--rebill`).
//!
//! Exit codes: 0 voided (or, with `--dry-run`, voidable), 1 not voided (unknown, not delivered,
//! already voided, refused by billwerk, `--yes` missing), 2 error.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use crate::ack::ledger::trace::DeliveryEntry;
use crate::config::{Config, SinkKind};
use crate::deliver::billwerk::{BillwerkSink, Deletion};
use crate::deliver::ratelimit::RateLimiter;
use crate::event::{is_billwerk_contract_id, CustomerRef};
use crate::trace::{check_event_id, check_usage_id, open_ledger, shown};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["event_id", "usage_id"])))]
pub struct VoidArgs {
    /// The service's config (sink credentials, rate limit, ledger).
    #[arg(long, short, env = "METERFLOW_CONFIG")]
    pub config: PathBuf,
    /// Void the usage record this event was delivered in (for an aggregate: the whole record).
    #[arg(long, value_name = "ID")]
    pub event_id: Option<String>,
    /// Void this usage record (billwerk's usage id).
    #[arg(long, value_name = "ID")]
    pub usage_id: Option<String>,
    /// The billwerk contract id, for deliveries the ledger recorded without their contract
    /// (before it kept them); otherwise it must match the ledger's.
    #[arg(long, value_name = "ID")]
    pub contract: Option<String>,
    /// Say what would be deleted; call nothing, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm voiding a record that sums several events.
    #[arg(long)]
    pub yes: bool,
    /// Let the events be billed again when they are redelivered (the ledger forgets the
    /// delivery instead of marking it voided).
    #[arg(long)]
    pub rebill: bool,
}

pub const VOIDED: u8 = 0;
pub const NOT_VOIDED: u8 = 1;
pub const ERROR: u8 = 2;

pub async fn run(args: VoidArgs) -> u8 {
    match void(&args).await {
        Ok((code, message)) => {
            print!("{message}");
            code
        }
        Err(message) => {
            eprintln!("error: {message}");
            ERROR
        }
    }
}

/// The delivery to void, as the ledger has it.
struct Target {
    delivery: DeliveryEntry,
    /// `contract:<id>` / `external:<id>`, when recorded.
    customer: Option<String>,
    what: String,
}

async fn void(args: &VoidArgs) -> Result<(u8, String), String> {
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    if config.sink.kind() != SinkKind::Billwerk {
        return Err(
            "meterflow void works with billwerk only: Billingrails has no endpoint to \
                    delete ingested events (correct them in Billingrails)"
                .to_string(),
        );
    }
    if let Some(c) = &args.contract {
        if !is_billwerk_contract_id(c) {
            return Err(format!(
                "--contract {:?} is not a billwerk contract id: expected exactly 24 hexadecimal \
                 characters",
                crate::decode::truncate_chars(c, 100)
            ));
        }
    }
    let store = open_ledger(&config).await?;
    let target = match (&args.event_id, &args.usage_id) {
        (Some(id), _) => {
            check_event_id(id)?;
            let record = store.trace_event(id).await.map_err(|e| e.to_string())?;
            let Some(delivery) = record.delivery else {
                return Ok((
                    NOT_VOIDED,
                    format!(
                        "event {id}: the ledger has no delivery of it (meterflow trace {id} \
                         says more); nothing voided\n"
                    ),
                ));
            };
            Target {
                delivery,
                customer: record.origin.map(|o| o.customer),
                what: format!("event {id}"),
            }
        }
        (None, Some(usage_id)) => {
            check_usage_id(SinkKind::Billwerk, usage_id)?;
            let record = store
                .usage_record(usage_id)
                .await
                .map_err(|e| e.to_string())?;
            let Some(delivery) = record.as_ref().and_then(|r| r.delivery.clone()) else {
                let why = if record.is_some() {
                    "voided earlier with --rebill"
                } else {
                    "not a record meterflow delivered, or pruned from the ledger"
                };
                return Ok((
                    NOT_VOIDED,
                    format!("usage record {usage_id}: {why}; nothing voided\n"),
                ));
            };
            Target {
                delivery,
                customer: record.and_then(|r| r.customer),
                what: format!("usage record {usage_id}"),
            }
        }
        (None, None) => return Err("give --event-id or --usage-id".to_string()),
    };
    let d = &target.delivery;
    match d.state.as_str() {
        "delivered" => {}
        "voided" => {
            return Ok((
                NOT_VOIDED,
                format!(
                    "{}: already voided (usage record {}); nothing to do\n",
                    target.what,
                    d.receipt.as_deref().unwrap_or("?")
                ),
            ))
        }
        "rejected" => {
            return Ok((
                NOT_VOIDED,
                format!(
                    "{}: refused by billwerk when delivered, so never billed; nothing to void\n",
                    target.what
                ),
            ))
        }
        _ => {
            return Ok((
                NOT_VOIDED,
                format!(
                    "{}: still being delivered (delivery key {}); void it once it is delivered\n",
                    target.what, d.delivery_key
                ),
            ))
        }
    }
    let usage_id = d.receipt.clone().unwrap_or_default();
    if !is_billwerk_contract_id(&usage_id) {
        return Err(format!(
            "the ledger's record id for delivery {} is {:?}, not a billwerk usage id; not \
             deleting anything",
            d.delivery_key,
            crate::decode::truncate_chars(&usage_id, 100)
        ));
    }
    let customer = customer_ref(target.customer.as_deref(), args.contract.as_deref())?;
    let events = d.event_count;
    let prefix = if args.usage_id.is_some() {
        String::new()
    } else {
        format!("{}: ", target.what)
    };
    let mut out = format!(
        "{prefix}usage record {usage_id} of {}, {} (delivery key {})\n",
        describe(&customer),
        if events == 1 {
            "1 event".to_string()
        } else {
            format!("an aggregate summing {events} events")
        },
        d.delivery_key
    );
    if events > 1 && !args.yes && !args.dry_run {
        out.push_str(&format!(
            "voiding removes the whole record, all {events} events (meterflow trace --usage-id \
             {usage_id} lists them); run again with --yes to void it\n"
        ));
        return Ok((NOT_VOIDED, out));
    }
    if args.dry_run {
        out.push_str(&format!(
            "dry run: would delete it at billwerk and mark it voided in the ledger ({}); \
             nothing was called or changed\n",
            after_void(args.rebill)
        ));
        return Ok((VOIDED, out));
    }

    let limiter = std::sync::Arc::new(RateLimiter::new(&config.rate_limit).for_sink("billwerk"));
    let sink = BillwerkSink::new(&config.sink, limiter).map_err(|e| e.to_string())?;
    let contract_id = sink.contract_id(&customer).await?;
    if let Some(given) = &args.contract {
        if !given.eq_ignore_ascii_case(&contract_id) {
            return Err(format!(
                "--contract {given} differs from the contract the ledger's events name \
                 ({contract_id}); not deleting"
            ));
        }
    }
    let deletion = sink.delete_usage(&contract_id, &usage_id).await?;
    match deletion {
        Deletion::Deleted
        | Deletion::NotFound {
            after_unknown: true,
            ..
        } => {}
        Deletion::NotFound { message, .. } => {
            out.push_str(&format!(
                "billwerk has no usage record {usage_id} under contract {contract_id} ({}): \
                 deleted by hand already? The ledger is unchanged\n",
                shown(&message)
            ));
            return Ok((NOT_VOIDED, out));
        }
        Deletion::Refused {
            status,
            message,
            billed,
        } => {
            let verdict = if billed {
                "the usage is already billed".to_string()
            } else {
                "billwerk deletes usage only while it is unbilled; if it is already billed".into()
            };
            out.push_str(&format!(
                "billwerk refused to delete usage record {usage_id} (HTTP {status}: {}): \
                 {verdict}, a correction is a credit in billwerk (on the invoice), not a void. \
                 The ledger is unchanged\n",
                shown(&message)
            ));
            return Ok((NOT_VOIDED, out));
        }
    }
    let changed = store
        .record_void(
            &d.delivery_key,
            &usage_id,
            &contract_id,
            events,
            args.rebill,
        )
        .await
        .map_err(|e| {
            format!(
                "usage record {usage_id} was deleted at billwerk, but the ledger could not record \
                 the void ({e}): run the same command again (billwerk then answers 404 and the \
                 void is recorded)"
            )
        })?;
    if !changed {
        out.push_str("note: the ledger entry changed meanwhile; the void is recorded\n");
    }
    out.push_str(&format!(
        "voided: deleted at billwerk and recorded in the ledger; {}\n",
        after_void(args.rebill)
    ));
    Ok((VOIDED, out))
}

fn after_void(rebill: bool) -> &'static str {
    if rebill {
        "--rebill: the ledger forgets the delivery, so its events are billed again if they are \
         redelivered"
    } else {
        "a redelivery or dlq replay of its events does not bill them again"
    }
}

fn describe(customer: &CustomerRef) -> String {
    match customer {
        CustomerRef::ContractId(id) => format!("contract {id}"),
        CustomerRef::ExternalId(e) => format!("the contract with ExternalId {:?}", shown(e)),
    }
}

/// The contract reference recorded with the events (`contract:` / `external:`), or `--contract`.
fn customer_ref(recorded: Option<&str>, given: Option<&str>) -> Result<CustomerRef, String> {
    let recorded = match recorded {
        Some(r) => Some(if let Some(id) = r.strip_prefix("contract:") {
            CustomerRef::ContractId(id.to_string())
        } else if let Some(e) = r.strip_prefix("external:") {
            CustomerRef::ExternalId(e.to_string())
        } else {
            return Err(format!(
                "the ledger's contract reference {r:?} is unreadable"
            ));
        }),
        None => None,
    };
    match (recorded, given) {
        (Some(CustomerRef::ContractId(id)), Some(g)) if !id.eq_ignore_ascii_case(g) => {
            Err(format!(
                "--contract {g} differs from the contract the ledger recorded ({id}); not deleting"
            ))
        }
        (Some(r), _) => Ok(r),
        (None, Some(g)) => Ok(CustomerRef::ContractId(g.to_string())),
        (None, None) => Err(
            "the ledger holds no contract for this delivery (delivered before meterflow recorded \
             contracts): give --contract ID"
                .to_string(),
        ),
    }
}
