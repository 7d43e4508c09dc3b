//! Hot-path cost of decode + price per event: `cargo bench --bench decode_price`.
//! Prints nanoseconds per event for typical payloads (the DESIGN.md example shape, with
//! attributes, an override rule that renders a description).

use std::hint::black_box;
use std::time::Instant;

use meterflow::config::Config;
use meterflow::decode::EventDecoder;
use meterflow::pricing::PriceBook;

fn main() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/meterflow.toml"),
    )
    .unwrap();
    let config =
        Config::from_toml_str_with_env(&text, &|_| Some("bench-secret".to_string())).unwrap();
    let decoder = EventDecoder::for_sink(config.input.clone(), config.sink.kind());
    let book = PriceBook::new(&config).unwrap();

    let plans = ["enterprise", "startup", "free"];
    let regions = ["eu-west-1", "us-east-1", "ap-south-1"];
    let payloads: Vec<Vec<u8>> = (0..1024)
        .map(|i| {
            format!(
                r#"{{"id":"evt_01JD3Q6W4F{i:06}","contract_id":"5cd186af443e551fe8e4f5dd","metric":"api_calls","quantity":"{}.{}","timestamp":"2026-11-20T10:15:{:02}+01:00","attributes":{{"plan":"{}","region":"{}","sdk":"rust/1.2.3"}}}}"#,
                i % 97 + 1,
                i % 10,
                i % 60,
                plans[i % 3],
                regions[i % 3],
            )
            .into_bytes()
        })
        .collect();
    let avg_len = payloads.iter().map(Vec::len).sum::<usize>() / payloads.len();

    let rounds = 500_000;
    for (label, with_price) in [("decode", false), ("decode + price", true)] {
        // Warm up, then measure.
        for p in payloads.iter().take(1000) {
            let e = decoder.decode(p).unwrap();
            black_box(book.price(e).unwrap());
        }
        let start = Instant::now();
        for i in 0..rounds {
            let e = decoder
                .decode(black_box(&payloads[i % payloads.len()]))
                .unwrap();
            if with_price {
                black_box(book.price(e).unwrap());
            } else {
                black_box(e);
            }
        }
        let per_event = start.elapsed().as_nanos() as f64 / rounds as f64;
        println!(
            "{label:>15}: {per_event:7.0} ns/event ({:.0} events/s on one core, {avg_len}-byte payloads)",
            1e9 / per_event
        );
    }
}
