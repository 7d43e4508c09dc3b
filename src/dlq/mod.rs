//! `meterflow dlq replay`: re-drive dead-lettered events through the service after their cause
//! was fixed. [`select`] decides which letters and what the replayed message looks like (pure);
//! [`replay`] reads the dead-letter topic and produces to the source topic.

pub mod replay;
pub mod select;

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::event::RejectReason;
use replay::{ReplayOptions, ReplayReport};
use select::{parse_time, Filter};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Produce dead-lettered events back to their source topic, so the running service bills
    /// them; already-billed events are recognised by their delivery keys and not billed twice.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The service's config: brokers, topics, dead-letter topic, ledger.
    #[arg(long, short, env = "METERFLOW_CONFIG")]
    pub config: PathBuf,
    /// Replay dead letters with this reason (repeatable).
    #[arg(
        long = "reason",
        value_name = "REASON",
        value_parser = reason_parser(),
        required_unless_present = "event_ids"
    )]
    pub reasons: Vec<RejectReason>,
    /// Replay only this event (repeatable); combined with --reason, both must match.
    #[arg(long = "event-id", value_name = "ID")]
    pub event_ids: Vec<String>,
    /// Only letters dead-lettered at or after TIME: RFC 3339 (2026-11-20T00:00:00Z) or a
    /// duration before now (36h, 7d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only letters dead-lettered before TIME (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Produce to TOPIC instead of each letter's source topic.
    #[arg(long, value_name = "TOPIC")]
    pub to: Option<String>,
    /// List what would be replayed; produce nothing and leave the ledger alone.
    #[arg(long)]
    pub dry_run: bool,
    /// Fail when the dead-letter topic yields nothing for this long before its end.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

fn reason_parser() -> impl TypedValueParser<Value = RejectReason> {
    PossibleValuesParser::new(RejectReason::ALL.map(|r| r.as_str())).try_map(|s| {
        // Only the possible values reach here.
        RejectReason::parse(&s).ok_or_else(|| format!("unknown reason {s:?}"))
    })
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::Replay(args) => run_replay(args).await,
    }
}

async fn run_replay(args: ReplayArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    crate::telemetry::init_logging(&config.log);
    let now = chrono::Utc::now();
    let since = args
        .since
        .map(|t| parse_time("--since", &t, now))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let until = args
        .until
        .map(|t| parse_time("--until", &t, now))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if let (Some(s), Some(u)) = (since, until) {
        if s >= u {
            anyhow::bail!("--since {s} is not before --until {u}: no dead letter could match");
        }
    }
    if let Some(to) = &args.to {
        if !config.kafka.topics.contains(to) {
            tracing::warn!(to, "--to names a topic outside kafka.topics: this service will not read the replayed events");
        }
    }
    let options = ReplayOptions {
        filter: Filter {
            reasons: args.reasons,
            event_ids: args.event_ids.into_iter().collect(),
            since,
            until,
        },
        to: args.to,
        dry_run: args.dry_run,
        idle_timeout: args.idle_timeout,
    };
    let report = replay::replay(&config, &options, |line| println!("{line}")).await?;
    print!("{}", summary(&report, options.dry_run));
    if !report.failures.is_empty() {
        for failure in &report.failures {
            eprintln!("not replayed: {failure}");
        }
        anyhow::bail!(
            "the replay is incomplete ({} problems, listed above); fix them and run the same \
             command again: events replayed already are recognised by their delivery keys and \
             not billed twice",
            report.failures.len()
        );
    }
    Ok(())
}

/// The closing table: scanned, selected, replayed, by reason.
pub fn summary(report: &ReplayReport, dry_run: bool) -> String {
    let mut out = format!(
        "dead-letter topic {}: scanned {}, second copies skipped {}, selected {}, {} {}, problems {}\n",
        report.dead_letter_topic,
        report.scanned,
        report.second_copies,
        report.selected_total(),
        if dry_run { "would replay" } else { "replayed" },
        if dry_run {
            report.selected_total() - report.failures.len() as u64
        } else {
            report.replayed_total()
        },
        report.failures.len(),
    );
    if !report.selected.is_empty() {
        let width = report
            .selected
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(6);
        out.push_str(&format!("  {:width$}  selected  replayed\n", "reason"));
        for (reason, selected) in &report.selected {
            let replayed = report.replayed.get(reason).copied().unwrap_or(0);
            out.push_str(&format!(
                "  {reason:width$}  {selected:>8}  {replayed:>8}\n"
            ));
        }
    }
    if report.rejections_forgotten > 0 {
        out.push_str(&format!(
            "delivery ledger: forgot {} earlier provider refusals, so those events are sent again\n",
            report.rejections_forgotten
        ));
    }
    if dry_run {
        out.push_str("dry run: nothing was produced, the ledger was not changed\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_by_reason() {
        let report = ReplayReport {
            dead_letter_topic: "usage-dlq".into(),
            scanned: 120,
            selected: [
                ("unknown_metric".into(), 10),
                ("provider_rejected".into(), 2),
            ]
            .into(),
            replayed: [
                ("unknown_metric".into(), 10),
                ("provider_rejected".into(), 2),
            ]
            .into(),
            rejections_forgotten: 2,
            second_copies: 3,
            failures: Vec::new(),
        };
        assert_eq!(
            summary(&report, false),
            "dead-letter topic usage-dlq: scanned 120, second copies skipped 3, selected 12, replayed 12, problems 0\n\
             \x20 reason             selected  replayed\n\
             \x20 provider_rejected         2         2\n\
             \x20 unknown_metric           10        10\n\
             delivery ledger: forgot 2 earlier provider refusals, so those events are sent again\n"
        );
        let dry = summary(&report, true);
        assert!(dry.contains("would replay 12"), "{dry}");
        assert!(dry.ends_with("dry run: nothing was produced, the ledger was not changed\n"));
    }
}
