//! HTTP plumbing every sink shares: the pooled client, rate-limit headers, transport failures,
//! and short error texts without URLs (the requests themselves go through `client.rs`).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::SinkConfig;
use crate::deliver::{Attempt, RateSignals, RetryCause};

/// A request that got no HTTP answer. Only a failed connect proves nothing was sent; anything
/// later (timeout, reset) may have been recorded.
pub(crate) fn transport_failure(e: &reqwest::Error) -> Attempt {
    let detail = without_url(e);
    if e.is_connect() {
        Attempt::Retry {
            cause: RetryCause::Connection,
            outcome_unknown: false,
            detail,
        }
    } else if e.is_timeout() {
        Attempt::Retry {
            cause: RetryCause::Timeout,
            outcome_unknown: true,
            detail,
        }
    } else {
        Attempt::Retry {
            cause: RetryCause::Connection,
            outcome_unknown: true,
            detail,
        }
    }
}

/// The longest wait any header can ask for, whatever it says (`Retry-After`,
/// `X-RateLimit-Reset`): a larger value is taken as this bound. The rate limiter lowers it further
/// to `rate_limit.max_pause`. Bounded here so that no header can overflow a `Duration` or an
/// `Instant` (`Retry-After: 100000000000000000000` panicked).
pub const MAX_HEADER_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The largest `X-RateLimit-Limit` / `-Remaining` taken as sent (larger ones are this bound).
pub const MAX_HEADER_COUNT: u32 = 1_000_000_000;

/// An `X-RateLimit-Reset` above this is an epoch time in seconds, not seconds from now.
const EPOCH_SECONDS_FROM: f64 = 1_000_000_000.0;
/// ... and above this, an epoch time in milliseconds.
const EPOCH_MILLIS_FROM: f64 = 100_000_000_000.0;

/// Reads `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds, or an
/// epoch time in seconds or milliseconds) and `Retry-After` (seconds or an HTTP date), each
/// bounded (see [`rate_signals_at`]).
pub(crate) fn rate_signals(headers: &reqwest::header::HeaderMap) -> RateSignals {
    rate_signals_at(headers, Utc::now())
}

/// [`rate_signals`] at wall-clock time `now` (for dates in headers). Pure. Bounds: counts are
/// whole numbers in 0 ..= [`MAX_HEADER_COUNT`]; waits lie in 0 ..= [`MAX_HEADER_WAIT`]; a value
/// that is not a finite non-negative number (or a date) is ignored, as if the header were absent.
pub fn rate_signals_at(headers: &reqwest::header::HeaderMap, now: DateTime<Utc>) -> RateSignals {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let number = |name: &str| {
        text(name)
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    let count = |name: &str| number(name).map(|n| n.min(f64::from(MAX_HEADER_COUNT)) as u32);
    let retry_after = text("retry-after").and_then(|s| match s.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Some(bounded_wait(n)),
        Ok(_) => None,
        Err(_) => DateTime::parse_from_rfc2822(s)
            .ok()
            .map(|at| wait_until(at.with_timezone(&Utc), now)),
    });
    let now_s = now.timestamp_millis() as f64 / 1000.0;
    let reset_after = number("x-ratelimit-reset").map(|n| {
        // Some servers send an epoch time (seconds, or milliseconds) instead of seconds-until.
        if n > EPOCH_MILLIS_FROM {
            bounded_wait(n / 1000.0 - now_s)
        } else if n > EPOCH_SECONDS_FROM {
            bounded_wait(n - now_s)
        } else {
            bounded_wait(n)
        }
    });
    RateSignals {
        limit: count("x-ratelimit-limit"),
        remaining: count("x-ratelimit-remaining"),
        reset_after,
        retry_after,
    }
}

/// `secs` as a wait in 0 ..= [`MAX_HEADER_WAIT`] (negative: 0).
fn bounded_wait(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs.min(MAX_HEADER_WAIT.as_secs_f64()))
        .unwrap_or(MAX_HEADER_WAIT)
        .min(MAX_HEADER_WAIT)
}

/// The wait from `now` until `at`, in 0 ..= [`MAX_HEADER_WAIT`].
fn wait_until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    at.signed_duration_since(now)
        .to_std()
        .unwrap_or_default()
        .min(MAX_HEADER_WAIT)
}

/// A pooled keep-alive client with the configured timeout.
pub(crate) fn http_client(config: &SinkConfig) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
        .pool_max_idle_per_host(config.concurrency.max(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("meterflow/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// reqwest errors print the URL; ours carry no secrets, but keep messages short and uniform.
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<provider>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn reads_rate_limit_headers() {
        let mut h = HeaderMap::new();
        h.insert("X-RateLimit-Limit", HeaderValue::from_static("10000"));
        h.insert("X-RateLimit-Remaining", HeaderValue::from_static("9954"));
        h.insert("Retry-After", HeaderValue::from_static("2"));
        h.insert("X-RateLimit-Reset", HeaderValue::from_static("30"));
        let s = rate_signals(&h);
        assert_eq!(s.limit, Some(10000));
        assert_eq!(s.remaining, Some(9954));
        assert_eq!(s.retry_after, Some(Duration::from_secs(2)));
        assert_eq!(s.reset_after, Some(Duration::from_secs(30)));
        assert_eq!(rate_signals(&HeaderMap::new()), RateSignals::default());
    }

    fn signals(pairs: &[(&'static str, &str)], now: DateTime<Utc>) -> RateSignals {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        rate_signals_at(&h, now)
    }

    /// Issue 11, problem 3: `Retry-After: 100000000000000000000` panicked (Duration overflow);
    /// an epoch-millisecond reset closed the gate for decades; a huge limit made the pacer's
    /// quota panic. Every header is bounded.
    #[test]
    fn absurd_headers_are_bounded() {
        let now = DateTime::parse_from_rfc3339("2026-11-20T10:15:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let s = signals(
            &[
                ("Retry-After", "100000000000000000000"),
                ("X-RateLimit-Reset", "1e300"),
                ("X-RateLimit-Limit", "100000000000000000000"),
                ("X-RateLimit-Remaining", "4294967296"),
            ],
            now,
        );
        assert_eq!(s.retry_after, Some(MAX_HEADER_WAIT));
        assert_eq!(s.reset_after, Some(MAX_HEADER_WAIT));
        assert_eq!(s.limit, Some(MAX_HEADER_COUNT));
        assert_eq!(s.remaining, Some(MAX_HEADER_COUNT));
        // Epoch times, in seconds and in milliseconds, 30 s ahead.
        let epoch_s = (now.timestamp() + 30).to_string();
        let epoch_ms = (now.timestamp_millis() + 30_000).to_string();
        for reset in [epoch_s.as_str(), epoch_ms.as_str()] {
            let s = signals(&[("X-RateLimit-Reset", reset)], now);
            assert_eq!(s.reset_after, Some(Duration::from_secs(30)), "{reset}");
        }
        // An epoch time in the past is no wait at all.
        let past = (now.timestamp_millis() - 5_000).to_string();
        assert_eq!(
            signals(&[("X-RateLimit-Reset", &past)], now).reset_after,
            Some(Duration::ZERO)
        );
        // HTTP dates: ahead, far ahead, past.
        let date = |d: &str| signals(&[("Retry-After", d)], now).retry_after;
        assert_eq!(
            date("Fri, 20 Nov 2026 10:15:07 GMT"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(date("Fri, 31 Dec 9999 23:59:59 GMT"), Some(MAX_HEADER_WAIT));
        assert_eq!(date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        // Not numbers: ignored, as if absent.
        for junk in ["-1", "NaN", "inf", "-inf", "1e999", "soon", "", "0x10"] {
            let s = signals(
                &[
                    ("Retry-After", junk),
                    ("X-RateLimit-Reset", junk),
                    ("X-RateLimit-Limit", junk),
                    ("X-RateLimit-Remaining", junk),
                ],
                now,
            );
            assert_eq!(s, RateSignals::default(), "{junk:?}");
        }
        // Fractions are kept for waits, cut for counts.
        let s = signals(
            &[("Retry-After", "0.25"), ("X-RateLimit-Limit", "99.9")],
            now,
        );
        assert_eq!(s.retry_after, Some(Duration::from_millis(250)));
        assert_eq!(s.limit, Some(99));
    }
}
