//! `meterflow audit` (billwerk): one contract's usage at billwerk over a period, set against
//! the ledger — records carrying a meterflow delivery key the ledger does not know, ledger
//! deliveries whose record is missing at billwerk, delivery keys billed more than once, and
//! the exact quantity per component on both sides.
//!
//! Exit codes: 0 both sides agree, 1 something is missing, unknown or double, 2 error (also
//! for Billingrails, which has no listing endpoint).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::Args;
use rust_decimal::Decimal;
use serde_json::json;

use crate::ack::ledger::trace::LedgerDelivery;
use crate::config::{Config, SinkKind};
use crate::deliver::billwerk::{BillwerkSink, ListedUsage};
use crate::deliver::ratelimit::RateLimiter;
use crate::event::is_billwerk_contract_id;
use crate::trace::{open_ledger, shown};

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The service's config (sink credentials, rate limit, ledger).
    #[arg(long, short, env = "METERFLOW_CONFIG")]
    pub config: PathBuf,
    /// billwerk's contract id (24 hexadecimal characters).
    #[arg(long, value_name = "ID")]
    pub contract: String,
    /// Start of the period (usage created at or after): RFC 3339, or a duration before now (7d).
    #[arg(long, value_name = "TIME")]
    pub from: String,
    /// End of the period (usage created before), same forms.
    #[arg(long, value_name = "TIME")]
    pub until: String,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

pub const AGREE: u8 = 0;
pub const DIFFER: u8 = 1;
pub const ERROR: u8 = 2;

/// How far beyond the period billwerk's listing is read: billwerk stamps creation with its
/// clock, the ledger with meterflow's, and a record near an edge must not look missing.
const CLOCK_MARGIN: chrono::Duration = chrono::Duration::minutes(10);

pub async fn run(args: AuditArgs) -> u8 {
    match audit(&args).await {
        Ok((code, out)) => {
            print!("{out}");
            code
        }
        Err(message) => {
            eprintln!("error: {message}");
            ERROR
        }
    }
}

/// A meterflow delivery key inside a Memo (`mf1-` and 32 hexadecimal characters).
pub fn delivery_key_in(memo: &str) -> Option<&str> {
    let start = memo.find("mf1-")?;
    let key = memo.get(start..start.checked_add(36)?)?;
    key.get(4..)
        .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|_| key)
}

/// What the audit found (pure: computed from the listing and the ledger's rows).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub records: usize,
    pub keyed_records: usize,
    pub ledger_deliveries: usize,
    /// Records in the period with a meterflow key the ledger has no delivery for (or another
    /// record id for): (record id, key, what the ledger says).
    pub unknown: Vec<(String, String, String)>,
    /// Ledger deliveries in the period whose record is not at billwerk: (key, record id).
    pub missing: Vec<(String, String)>,
    /// Keys on more than one record: key → record ids.
    pub doubled: BTreeMap<String, Vec<String>>,
    /// Component → (billwerk total, ledger total).
    pub totals: BTreeMap<String, (Decimal, Decimal)>,
    /// Records whose quantity could not be read exactly.
    pub unreadable_quantities: Vec<String>,
    /// Deliveries in the period (to any contract) recorded before the ledger kept events'
    /// contracts and quantities: not attributable, so not in the ledger's side.
    pub unattributed_deliveries: i64,
}

impl Findings {
    pub fn agree(&self) -> bool {
        self.unknown.is_empty()
            && self.missing.is_empty()
            && self.doubled.is_empty()
            && self.unreadable_quantities.is_empty()
            && self.totals.values().all(|(b, l)| b == l)
    }
}

/// `listing` covers the period plus the clock margin; `in_period` tells the period's own
/// records; `ledger` is the ledger's deliveries to the contract in the period; `known` is the
/// ledger's state and record id for every key found in the listing.
pub fn compare(
    listing: &[ListedUsage],
    in_period: impl Fn(&ListedUsage) -> bool,
    ledger: &[LedgerDelivery],
    known: &BTreeMap<String, (String, Option<String>)>,
) -> Findings {
    let mut f = Findings::default();
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in listing {
        if let Some(key) = r.memo.as_deref().and_then(delivery_key_in) {
            by_key.entry(key).or_default().push(&r.id);
        }
    }
    for (key, ids) in &by_key {
        if ids.len() > 1 {
            f.doubled
                .insert(key.to_string(), ids.iter().map(|s| s.to_string()).collect());
        }
    }
    let ids: BTreeSet<&str> = listing.iter().map(|r| r.id.as_str()).collect();
    for r in listing.iter().filter(|r| in_period(r)) {
        f.records = f.records.saturating_add(1);
        match r.quantity {
            Some(q) => {
                let total = f.totals.entry(r.component_id.clone()).or_default();
                total.0 = total.0.checked_add(q).unwrap_or(total.0);
            }
            None => f.unreadable_quantities.push(r.id.clone()),
        }
        let Some(key) = r.memo.as_deref().and_then(delivery_key_in) else {
            continue;
        };
        f.keyed_records = f.keyed_records.saturating_add(1);
        let verdict = match known.get(key) {
            None => Some("the ledger has no delivery with this key".to_string()),
            Some((state, receipt)) if state != "delivered" => {
                Some(format!("the ledger has it as {state} (record {receipt:?})"))
            }
            Some((_, receipt)) if receipt.as_deref() != Some(r.id.as_str()) => Some(format!(
                "the ledger has another record for this key ({})",
                receipt.as_deref().unwrap_or("none")
            )),
            Some(_) => None,
        };
        if let Some(v) = verdict {
            f.unknown.push((r.id.clone(), key.to_string(), v));
        }
    }
    f.ledger_deliveries = ledger.len();
    for d in ledger {
        if !ids.contains(d.receipt.as_str()) {
            f.missing.push((d.delivery_key.clone(), d.receipt.clone()));
        }
        for (component, q) in &d.quantities {
            let total = f.totals.entry(component.clone()).or_default();
            total.1 = total.1.checked_add(*q).unwrap_or(total.1);
        }
    }
    f
}

async fn audit(args: &AuditArgs) -> Result<(u8, String), String> {
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    if config.sink.kind() != SinkKind::Billwerk {
        return Err(
            "meterflow audit works with billwerk only: Billingrails has no endpoint \
                    that lists ingested events, so there is nothing to set the ledger against"
                .to_string(),
        );
    }
    if !is_billwerk_contract_id(&args.contract) {
        return Err(format!(
            "--contract {:?} is not a billwerk contract id: expected exactly 24 hexadecimal \
             characters",
            crate::decode::truncate_chars(&args.contract, 100)
        ));
    }
    let now = Utc::now();
    let from = crate::dlq::select::parse_time("--from", &args.from, now)?;
    let until = crate::dlq::select::parse_time("--until", &args.until, now)?;
    if from >= until {
        return Err(format!("--from {from} is not before --until {until}"));
    }
    let contract = args.contract.to_ascii_lowercase();
    let store = open_ledger(&config).await?;
    let limiter = std::sync::Arc::new(RateLimiter::new(&config.rate_limit).for_sink("billwerk"));
    let sink = BillwerkSink::new(&config.sink, limiter).map_err(|e| e.to_string())?;

    let external = sink.external_id_of(&contract).await?;
    let listing = sink
        .list_usage(&contract, from - CLOCK_MARGIN, until + CLOCK_MARGIN)
        .await?;
    let mut customers = vec![format!("contract:{contract}")];
    if let Some(e) = &external {
        customers.push(format!("external:{e}"));
    }
    let ledger = store
        .deliveries_to(
            &customers,
            from.timestamp_millis(),
            until.timestamp_millis(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let keys: Vec<String> = listing
        .iter()
        .filter_map(|r| r.memo.as_deref().and_then(delivery_key_in))
        .map(str::to_string)
        .collect();
    let known = store
        .delivery_states(&keys)
        .await
        .map_err(|e| e.to_string())?;
    let in_period = |r: &ListedUsage| r.transferred_at.is_none_or(|t| from <= t && t < until);
    let mut findings = compare(&listing, in_period, &ledger, &known);
    findings.unattributed_deliveries = store
        .unattributed_deliveries(from.timestamp_millis(), until.timestamp_millis())
        .await
        .map_err(|e| e.to_string())?;
    let code = if findings.agree() { AGREE } else { DIFFER };
    let out = if args.json {
        format!("{}\n", findings_json(&contract, from, until, &findings))
    } else {
        findings_text(&contract, external.as_deref(), from, until, &findings)
    };
    Ok((code, out))
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn findings_text(
    contract: &str,
    external: Option<&str>,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    f: &Findings,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let named = external
        .map(|e| format!(" (ExternalId {e:?})"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "audit of contract {contract}{named}, usage created {} to {}",
        time(from),
        time(until)
    );
    let _ = writeln!(
        out,
        "  billwerk: {} records, {} with a meterflow delivery key; ledger: {} deliveries",
        f.records, f.keyed_records, f.ledger_deliveries
    );
    let _ = writeln!(
        out,
        "  {:<26} {:>20} {:>20}",
        "component", "billwerk", "ledger"
    );
    for (component, (b, l)) in &f.totals {
        let mark = if b == l { "" } else { "  DIFFERS" };
        let _ = writeln!(out, "  {:<26} {b:>20} {l:>20}{mark}", shown(component));
    }
    let _ = writeln!(
        out,
        "  records with a meterflow key the ledger does not know: {}",
        f.unknown.len()
    );
    for (id, key, why) in &f.unknown {
        let _ = writeln!(out, "    {} {key}: {}", shown(id), shown(why));
    }
    let _ = writeln!(
        out,
        "  ledger deliveries missing at billwerk: {}",
        f.missing.len()
    );
    for (key, id) in &f.missing {
        let _ = writeln!(out, "    {key}: record {}", shown(id));
    }
    let _ = writeln!(
        out,
        "  delivery keys billed more than once: {}",
        f.doubled.len()
    );
    for (key, ids) in &f.doubled {
        let _ = writeln!(out, "    {key}: records {}", shown(&ids.join(", ")));
    }
    if !f.unreadable_quantities.is_empty() {
        let _ = writeln!(
            out,
            "  records whose Quantity is not an exact decimal: {}",
            shown(&f.unreadable_quantities.join(", "))
        );
    }
    if f.unattributed_deliveries > 0 {
        let _ = writeln!(
            out,
            "  note: {} deliveries in the period (to any contract) were recorded before the \
             ledger kept contracts and quantities; they are not in the ledger's side",
            f.unattributed_deliveries
        );
    }
    let _ = writeln!(
        out,
        "{}",
        if f.agree() {
            "OK: billwerk and the ledger agree"
        } else {
            "DIFFERENT: see above"
        }
    );
    out
}

fn findings_json(
    contract: &str,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    f: &Findings,
) -> String {
    json!({
        "contract": contract,
        "from": time(from),
        "until": time(until),
        "agree": f.agree(),
        "records": f.records,
        "records_with_delivery_key": f.keyed_records,
        "ledger_deliveries": f.ledger_deliveries,
        "unknown_to_ledger": f.unknown.iter().map(|(id, key, why)| json!({"usage_id": id, "delivery_key": key, "why": why})).collect::<Vec<_>>(),
        "missing_at_billwerk": f.missing.iter().map(|(key, id)| json!({"delivery_key": key, "usage_id": id})).collect::<Vec<_>>(),
        "billed_more_than_once": f.doubled.iter().map(|(key, ids)| json!({"delivery_key": key, "usage_ids": ids})).collect::<Vec<_>>(),
        "totals": f.totals.iter().map(|(c, (b, l))| json!({"component_id": c, "billwerk": b.to_string(), "ledger": l.to_string()})).collect::<Vec<_>>(),
        "unreadable_quantities": f.unreadable_quantities,
        "unattributed_deliveries": f.unattributed_deliveries,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, memo: Option<&str>, q: i64) -> ListedUsage {
        ListedUsage {
            id: id.into(),
            component_id: "c1".into(),
            quantity: Some(Decimal::new(q, 1)),
            memo: memo.map(str::to_string),
            transferred_at: None,
        }
    }

    const K1: &str = "mf1-0123456789abcdef0123456789abcdef";
    const K2: &str = "mf1-fedcba9876543210fedcba9876543210";
    const K3: &str = "mf1-00000000000000000000000000000003";

    #[test]
    fn keys_are_found_inside_memos_and_bounded() {
        assert_eq!(delivery_key_in(&format!("note {K1} tail")), Some(K1));
        assert_eq!(delivery_key_in("mf1-short"), None);
        assert_eq!(
            delivery_key_in("mf1-zz23456789abcdef0123456789abcdef"),
            None
        );
        assert_eq!(delivery_key_in("héllo mf1-é"), None);
    }

    #[test]
    fn unknown_missing_double_and_totals_are_told_apart() {
        let listing = vec![
            record("r1", Some(K1), 15),
            record("r2", Some(K2), 10),
            record("r3", Some(K2), 10),
            record("r4", None, 5),
            record("r5", Some(K3), 1),
        ];
        let ledger = vec![
            LedgerDelivery {
                delivery_key: K1.into(),
                receipt: "r1".into(),
                quantities: vec![("c1".into(), Decimal::new(15, 1))],
            },
            LedgerDelivery {
                delivery_key: K2.into(),
                receipt: "r2".into(),
                quantities: vec![("c1".into(), Decimal::new(10, 1))],
            },
            LedgerDelivery {
                delivery_key: "mf1-gone".into(),
                receipt: "r9".into(),
                quantities: vec![("c1".into(), Decimal::new(7, 1))],
            },
        ];
        let mut known = BTreeMap::new();
        known.insert(
            K1.to_string(),
            ("delivered".to_string(), Some("r1".to_string())),
        );
        known.insert(
            K2.to_string(),
            ("delivered".to_string(), Some("r2".to_string())),
        );
        let f = compare(&listing, |_| true, &ledger, &known);
        assert_eq!(f.records, 5);
        assert_eq!(f.keyed_records, 4);
        assert_eq!(
            f.unknown.iter().map(|u| u.0.as_str()).collect::<Vec<_>>(),
            vec!["r3", "r5"],
            "r3 is K2's second record, K3 is not in the ledger"
        );
        assert_eq!(f.missing, vec![("mf1-gone".to_string(), "r9".to_string())]);
        assert_eq!(f.doubled.get(K2).map(Vec::len), Some(2));
        assert_eq!(f.totals["c1"], (Decimal::new(41, 1), Decimal::new(32, 1)));
        assert!(!f.agree());

        let clean = compare(&listing[..2], |_| true, &ledger[..2], &known);
        assert!(clean.agree(), "{clean:?}");
    }
}
