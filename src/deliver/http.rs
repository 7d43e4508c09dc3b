//! HTTP plumbing every sink shares: the pooled client, rate-limit headers, transport failures,
//! request metrics, and short error texts without URLs.

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

/// Reads `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds) and
/// `Retry-After` (seconds or an HTTP date).
pub(crate) fn rate_signals(headers: &reqwest::header::HeaderMap) -> RateSignals {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .map(Duration::from_secs_f64)
                .or_else(|| {
                    DateTime::parse_from_rfc2822(s.trim()).ok().map(|at| {
                        (at.with_timezone(&Utc) - Utc::now())
                            .to_std()
                            .unwrap_or_default()
                    })
                })
        });
    let reset_after = number("x-ratelimit-reset").map(|n| {
        // Some servers send an epoch timestamp instead of seconds-until.
        if n > 1_000_000_000.0 {
            Duration::from_secs_f64((n - Utc::now().timestamp() as f64).max(0.0))
        } else {
            Duration::from_secs_f64(n)
        }
    });
    RateSignals {
        limit: number("x-ratelimit-limit").map(|n| n as u32),
        remaining: number("x-ratelimit-remaining").map(|n| n as u32),
        reset_after,
        retry_after,
        sent_at: None,
    }
}

pub(crate) fn record_request(
    sink: &'static str,
    endpoint: &'static str,
    result: &Result<reqwest::Response, reqwest::Error>,
    elapsed: Duration,
) {
    let class = match result {
        Ok(r) => match r.status().as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        Err(_) => "error",
    };
    metrics::counter!("meterflow_requests_total", "sink" => sink, "endpoint" => endpoint, "status_class" => class)
        .increment(1);
    metrics::histogram!("meterflow_request_duration_seconds", "sink" => sink, "endpoint" => endpoint)
        .record(elapsed.as_secs_f64());
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
}
