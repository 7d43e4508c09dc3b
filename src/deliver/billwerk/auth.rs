//! billwerk OAuth 2.0 client credentials: `POST {host}/oauth/token/` with HTTP Basic. The
//! token's lifetime is undocumented: honour `expires_in` when present, otherwise keep it until a
//! call answers 401. Bad credentials are never retried in a loop: billwerk's security filter can
//! ban a client IP that hammers it.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::config::{BillwerkConfig, Secret};
use crate::deliver::client::{Failure, ProviderClient};
use crate::deliver::events::TokenRefreshed;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The provider refused the credentials: fix the config; do not retry quickly.
    #[error("billwerk refused the client credentials (HTTP {status}); check sink.client_id and sink.client_secret")]
    Refused { status: u16 },
    /// The token endpoint answered, but not with a token: retry later.
    #[error("billwerk token endpoint unavailable: {0}")]
    Unavailable(String),
    /// No HTTP answer at all (DNS, connection, TLS, timeout): retry later.
    #[error("billwerk token endpoint unreachable: {0}")]
    Unreachable(String),
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    expires_at: Option<Instant>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// A cached bearer token, renewed before expiry and on demand after a 401.
pub struct TokenSource {
    /// The sink's client: token requests are recorded like any request, outside the pace.
    pub(super) client: ProviderClient,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    legal_entity_id: Option<String>,
    current: Mutex<Option<Token>>,
}

/// Renew this long before the announced expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// The longest a token is kept, whatever `expires_in` says: a value near u64::MAX overflowed
/// `Instant` (a panic). Renewing a long-lived token once a day costs one request.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl TokenSource {
    pub fn new(client: ProviderClient, base_url: &str, config: &BillwerkConfig) -> Self {
        TokenSource {
            client,
            token_url: format!("{}/oauth/token/", base_url.trim_end_matches('/')),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            legal_entity_id: config.legal_entity_id.clone(),
            current: Mutex::new(None),
        }
    }

    /// A valid token: the cached one, or a new one (one request at a time).
    pub async fn token(&self) -> Result<String, TokenError> {
        let mut current = self.current.lock().await;
        if let Some(t) = current.as_ref() {
            if t.expires_at.is_none_or(|e| {
                Instant::now()
                    .checked_add(EXPIRY_MARGIN)
                    .is_some_and(|soon| soon < e)
            }) {
                return Ok(t.value.clone());
            }
        }
        let token = self.fetch().await?;
        let value = token.value.clone();
        *current = Some(token);
        Ok(value)
    }

    /// Drops `rejected` (a call answered 401 with it) so the next `token()` fetches a new one;
    /// a token already replaced by a concurrent caller is kept.
    pub async fn invalidate(&self, rejected: &str) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|t| t.value == rejected) {
            *current = None;
        }
    }

    async fn fetch(&self) -> Result<Token, TokenError> {
        let fetched = self.ask().await;
        let event = match &fetched {
            Ok(token) => TokenRefreshed::Ok {
                expires_in: token.lifetime,
            },
            Err(TokenError::Refused { status }) => TokenRefreshed::Refused { status: *status },
            Err(e) => TokenRefreshed::Error {
                detail: e.to_string(),
            },
        };
        event.emit();
        fetched.map(|t| Token {
            expires_at: t.lifetime.and_then(|l| Instant::now().checked_add(l)),
            value: t.value,
        })
    }

    async fn ask(&self) -> Result<Fetched, TokenError> {
        let mut request = self
            .client
            .http()
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(self.client_secret.expose()))
            .form(&[("grant_type", "client_credentials")]);
        if let Some(id) = &self.legal_entity_id {
            request = request.header("X-SELECTED-LEGAL-ENTITY-ID", id);
        }
        let answer = match self.client.send_unpaced("token", request).await {
            Ok(answer) => answer,
            Err(Failure::NoAnswer(e)) => {
                return Err(TokenError::Unreachable(Failure::NoAnswer(e).detail()))
            }
            Err(lost @ Failure::BodyLost { .. }) => {
                return Err(TokenError::Unavailable(format!(
                    "unreadable token answer: {}",
                    lost.detail()
                )))
            }
        };
        let status = answer.status;
        if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN
            || status == reqwest::StatusCode::BAD_REQUEST
        {
            return Err(TokenError::Refused {
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(TokenError::Unavailable(format!("HTTP {status}")));
        }
        let (value, lifetime) =
            parse_token_answer(answer.body.as_bytes()).map_err(TokenError::Unavailable)?;
        Ok(Fetched { value, lifetime })
    }
}

/// A token as answered, before its expiry is dated.
struct Fetched {
    value: String,
    lifetime: Option<Duration>,
}

/// The token and its lifetime from a token answer `{"access_token", "expires_in"?}`. Pure.
/// `expires_in` (seconds, a number or a numeric string) is bounded to [`MAX_TOKEN_LIFETIME`];
/// a missing or unreadable one means "until a call answers 401". A token that cannot travel in
/// an `Authorization` header (empty, control characters, non-ASCII) is refused here rather than
/// failing every request later.
pub fn parse_token_answer(body: &[u8]) -> Result<(String, Option<Duration>), String> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|e| format!("unreadable token answer: {e}"))?;
    let token = answer.access_token;
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the token answer's access_token ({} bytes) is empty or has characters an \
             Authorization header cannot carry",
            token.len()
        ));
    }
    let lifetime = answer
        .expires_in
        .as_ref()
        .and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_str().parse::<f64>().ok(),
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        })
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map(|secs| {
            Duration::try_from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
                .unwrap_or(MAX_TOKEN_LIFETIME)
        });
    Ok((token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, problem 3: `expires_in` near u64::MAX overflowed `Instant` (a panic).
    #[test]
    fn token_lifetimes_are_bounded() {
        let parse = |body: &str| parse_token_answer(body.as_bytes());
        for huge in [
            r#"{"access_token":"t","expires_in":18446744073709551615}"#,
            r#"{"access_token":"t","expires_in":"18446744073709551615"}"#,
            r#"{"access_token":"t","expires_in":1e308}"#,
            r#"{"access_token":"t","expires_in":99999999999999999999999999999}"#,
        ] {
            assert_eq!(
                parse(huge),
                Ok(("t".into(), Some(MAX_TOKEN_LIFETIME))),
                "{huge}"
            );
            let (_, lifetime) = parse(huge).unwrap();
            assert!(Instant::now().checked_add(lifetime.unwrap()).is_some());
        }
        assert_eq!(
            parse(r#"{"access_token":"t","expires_in":3600}"#),
            Ok(("t".into(), Some(Duration::from_secs(3600))))
        );
        assert_eq!(
            parse(r#"{"access_token":"t","expires_in":"90.5"}"#),
            Ok(("t".into(), Some(Duration::from_secs_f64(90.5))))
        );
        for none in [
            r#"{"access_token":"t"}"#,
            r#"{"access_token":"t","expires_in":-5}"#,
            r#"{"access_token":"t","expires_in":"soon"}"#,
            r#"{"access_token":"t","expires_in":null}"#,
            r#"{"access_token":"t","expires_in":[1]}"#,
        ] {
            assert_eq!(parse(none), Ok(("t".into(), None)), "{none}");
        }
        for bad in [
            r#"{"access_token":""}"#,
            r#"{"access_token":"a\r\nX-Evil: 1"}"#,
            r#"{"access_token":"tök"}"#,
            r#"{"expires_in":5}"#,
            "not json",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
