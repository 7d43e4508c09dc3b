//! `meterflow demo`, the README's first command, as a user runs it: its own process, embedded
//! defaults, faults on; it must end with an exact reconciliation and exit 0.

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .arg("demo")
        .args(["--events", "3000", "--quiet", "--timeout", "90s"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("meterflow demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("OK: every valid event billed exactly once"),
        "{stdout}"
    );
    stdout
}

/// The value printed after a row's label in the reconciliation table.
fn row(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| {
            l[l.find(label).unwrap() + label.len()..]
                .split_whitespace()
                .next()
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{report}"))
}

#[test]
fn demo_reconciles_exactly_with_faults() {
    let report = demo(&[]);
    assert_eq!(row(&report, "billed twice (duplicate keys)"), 0);
    assert_eq!(row(&report, "lost"), 0);
    // One record per valid event.
    assert_eq!(
        row(&report, "usage records at billwerk"),
        row(&report, "valid")
    );
}

#[test]
fn demo_with_aggregation_sums_exactly_in_fewer_records() {
    let report = demo(&["--aggregate"]);
    assert_eq!(row(&report, "lost"), 0);
    let records = row(&report, "usage records at billwerk");
    let events = row(&report, "events summed into them");
    assert_eq!(events, row(&report, "valid"));
    assert!(
        records * 2 < events,
        "aggregation should at least halve the records: {records} records for {events} events"
    );
}
