//! The tests' configs: meterflow pointed at an emulator, paced for tests (short timeouts and
//! batch waits, a 1 s rate-limit window), with the tests' component ids and one override rule.
//! Built with [`ConfigBuilder`]; a test changes what it needs with the builder's setters.

use std::time::Duration;

use meterflow::config::builder::{ConfigBuilder, Override};
use meterflow::emulator::{billingrails, billwerk};
use rust_decimal::Decimal;

/// The Kafka and pacing settings both presets share.
fn common(brokers: &str, group: &str, topic: &str, dlq: &str, ledger_url: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .brokers(brokers)
        .group_id(group)
        .topic(topic)
        .dead_letter_topic(dlq)
        .session_timeout(Duration::from_secs(6))
        .drain_timeout(Duration::from_secs(3))
        .commit_interval(Duration::from_millis(200))
        .kafka_property("fetch.wait.max.ms", "10")
        // The tests' events carry fixed timestamps (2026-11-20) and assert the due dates the
        // provider got: no age bound, or they would be dead-lettered once those dates are 35
        // days old.
        .max_age(Duration::ZERO)
        .max_events(200)
        .max_wait(Duration::from_millis(20))
        .rate_window(Duration::from_secs(1))
        .backoff(Duration::from_millis(20), Duration::from_millis(500))
        .ledger_url(ledger_url)
        .admin_listen("")
}

/// The override rule of both presets: enterprise API calls at 0.0015, with a description.
pub fn enterprise_api_calls() -> Override {
    Override::metric("api_calls")
        .attribute("plan", "enterprise")
        .price_per_unit(Decimal::new(15, 4))
        .description("{quantity} API calls in {attributes.region}")
}

/// A meterflow config for a billwerk emulator at `base_url` (its default credentials).
pub fn billwerk_config(
    brokers: &str,
    group: &str,
    topic: &str,
    dlq: &str,
    base_url: &str,
    ledger_url: &str,
) -> ConfigBuilder {
    common(brokers, group, topic, dlq, ledger_url)
        .billwerk(
            base_url,
            billwerk::DEFAULT_CLIENT_ID,
            billwerk::DEFAULT_CLIENT_SECRET,
        )
        .concurrency(16)
        .request_timeout(Duration::from_secs(2))
        .component("api_calls", "5ce53069443e551b9caccc64")
        .component("storage_gb", "5ce53069443e551b9caccc65")
        .rule(enterprise_api_calls().name("API calls (enterprise)"))
}

/// A meterflow config for a Billingrails emulator at `base_url` (its `/v1` prefix included; its
/// default API key), with a rate limit assumed (5 000 per window) and prices and descriptions
/// carried as event properties.
pub fn billingrails_config(
    brokers: &str,
    group: &str,
    topic: &str,
    dlq: &str,
    base_url: &str,
    ledger_url: &str,
) -> ConfigBuilder {
    common(brokers, group, topic, dlq, ledger_url)
        .billingrails(base_url, billingrails::DEFAULT_API_KEY)
        .concurrency(8)
        .request_timeout(Duration::from_secs(2))
        .billingrails_batch_size(100)
        .billingrails_account_property("billingrails_account_id")
        .billingrails_event_name("{metric}")
        .billingrails_price_property("unit_price")
        .billingrails_description_property("description")
        .rate_limit(Some(5000))
        .component("api_calls", "api_calls")
        .component("storage_gb", "storage_gb")
        .rule(enterprise_api_calls())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A preset the loader refused would fail every test that uses it; this says so first.
    #[test]
    fn the_presets_are_configs_the_loader_accepts() {
        let billwerk = billwerk_config("127.0.0.1:9", "g", "t", "d", "http://127.0.0.1:1", "none")
            .build()
            .unwrap();
        assert_eq!(billwerk.kafka.topics, ["t"]);
        assert_eq!(billwerk.input.max_age, Duration::ZERO);
        assert_eq!(billwerk.overrides.len(), 1);
        let billingrails = billingrails_config(
            "127.0.0.1:9",
            "g",
            "t",
            "d",
            "http://127.0.0.1:1/v1",
            "sqlite::memory:",
        )
        .build()
        .unwrap();
        assert_eq!(billingrails.rate_limit.limit, Some(5000));
        assert_eq!(billingrails.ledger.url, "sqlite::memory:");
    }
}
