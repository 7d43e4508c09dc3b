#!/usr/bin/env python3
"""Share of meterflow's CPU per pipeline stage, from `perf script` output on standard input.

Used by `cargo bench --bench throughput -- --perf` (benches/throughput.rs), which records
`meterflow run` with `perf record -e cpu-clock --call-graph dwarf`. Each sample's stack is read
from the leaf up; the first frame inside a meterflow module names the stage, so library work
(serde_json, hyper, sqlx, the allocator, the kernel) counts for the meterflow code that asked for
it. Samples with no meterflow frame are put by thread and library: librdkafka's own threads, the
HTTP client's connection tasks, the async runtime.

Prints a Markdown table: stage, samples, share.
"""

import re
import sys
from collections import Counter

# First match wins; patterns are tried against each frame's symbol, leaf first.
MODULE_STAGES = [
    (r"^meterflow::source", "consume: Kafka source (poll, watermarks, pause/resume)"),
    (r"^meterflow::decode", "decode + validate events"),
    (r"^meterflow::pricing", "price and description overrides"),
    (r"^meterflow::batch", "batching"),
    (r"^meterflow::deliver::billingrails::payload", "build request bodies"),
    (r"^meterflow::deliver::billwerk::payload", "build request bodies"),
    (r"^meterflow::deliver::ratelimit", "pacing (rate limiter)"),
    (r"^meterflow::deliver", "deliver: send and read answers"),
    (r"^meterflow::ack::ledger", "ledger"),
    (r"^meterflow::ack", "acknowledge: offsets, dead letters"),
    (r"^meterflow::telemetry", "metrics and logs"),
    (r"^meterflow::pipeline", "pipeline glue (stage hand-offs)"),
    (r"^meterflow::", "other meterflow code"),
]

# For samples without a meterflow frame.
LIBRARY_STAGES = [
    (r"^(sqlx|libsqlite3|sqlite3|tokio_postgres)", "ledger"),
    (r"^(hyper|reqwest|h2|hyper_util|http_body|native_tls|openssl)", "HTTP client: connections"),
    (r"^(metrics|metrics_exporter_prometheus|metrics_util)", "metrics and logs"),
    (r"^rd_kafka|^rdkafka", "librdkafka: fetch, protocol, commits"),
]


def classify(comm, frames):
    for sym in frames:
        for pattern, stage in MODULE_STAGES:
            if re.match(pattern, sym):
                return stage
    for sym in frames:
        for pattern, stage in LIBRARY_STAGES:
            if re.match(pattern, sym):
                return stage
    if comm.startswith("rdk:"):
        return "librdkafka: fetch, protocol, commits"
    if any(s.startswith("tokio::") for s in frames):
        return "async runtime: scheduling, timers, I/O polling"
    return "other (kernel, allocator, unattributed)"


def samples(lines):
    comm, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            # Header: "<comm> <tid> <time>: <period> <event>:" (comm may contain spaces).
            m = re.match(r"^(.*?)\s+\d+(/\d+)?\s", line)
            comm = m.group(1) if m else line.split()[0]
            frames = []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        sym = re.sub(r"\+0x[0-9a-f]+ \(.*\)$|\s\(.*\)$", "", parts[1]).strip()
        frames.append(sym)
    if comm is not None:
        yield comm, frames


def main():
    counts = Counter()
    total = 0
    for comm, frames in samples(sys.stdin):
        counts[classify(comm, frames)] += 1
        total += 1
    if total == 0:
        print("no samples (is perf allowed to record? see /proc/sys/kernel/perf_event_paranoid)")
        sys.exit(1)
    print("| stage | samples | share of meterflow CPU |")
    print("|---|---:|---:|")
    for stage, n in counts.most_common():
        print(f"| {stage} | {n} | {100.0 * n / total:.1f} % |")
    print(f"| total | {total} | 100 % |")


if __name__ == "__main__":
    main()
