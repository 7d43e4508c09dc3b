//! billwerk OAuth 2.0 client credentials: `POST {host}/oauth/token/` with HTTP Basic. The
//! token's lifetime is undocumented: honour `expires_in` when present, otherwise keep it until a
//! call answers 401. Bad credentials are never retried in a loop: billwerk's security filter can
//! ban a client IP that hammers it.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::config::Secret;
use crate::deliver::http::without_url;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The provider refused the credentials: fix the config; do not retry quickly.
    #[error("billwerk refused the client credentials (HTTP {status}); check sink.client_id and sink.client_secret")]
    Refused { status: u16 },
    /// The token endpoint could not be reached or answered oddly: retry later.
    #[error("billwerk token endpoint unavailable: {0}")]
    Unavailable(String),
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
    client: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    legal_entity_id: Option<String>,
    current: Mutex<Option<Token>>,
}

/// Renew this long before the announced expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

impl TokenSource {
    pub fn new(
        client: reqwest::Client,
        base_url: &str,
        client_id: String,
        client_secret: Secret,
        legal_entity_id: Option<String>,
    ) -> Self {
        TokenSource {
            client,
            token_url: format!("{}/oauth/token/", base_url.trim_end_matches('/')),
            client_id,
            client_secret,
            legal_entity_id,
            current: Mutex::new(None),
        }
    }

    /// A valid token: the cached one, or a new one (one request at a time).
    pub async fn token(&self) -> Result<String, TokenError> {
        let mut current = self.current.lock().await;
        if let Some(t) = current.as_ref() {
            if t.expires_at
                .is_none_or(|e| Instant::now() + EXPIRY_MARGIN < e)
            {
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
        let mut request = self
            .client
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(self.client_secret.expose()))
            .form(&[("grant_type", "client_credentials")]);
        if let Some(id) = &self.legal_entity_id {
            request = request.header("X-SELECTED-LEGAL-ENTITY-ID", id);
        }
        let response = request.send().await.map_err(|e| {
            metrics::counter!("meterflow_token_refreshes_total", "result" => "error").increment(1);
            TokenError::Unavailable(without_url(&e))
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN
            || status == reqwest::StatusCode::BAD_REQUEST
        {
            metrics::counter!("meterflow_token_refreshes_total", "result" => "refused")
                .increment(1);
            return Err(TokenError::Refused {
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            metrics::counter!("meterflow_token_refreshes_total", "result" => "error").increment(1);
            return Err(TokenError::Unavailable(format!("HTTP {status}")));
        }
        let answer: TokenAnswer = response.json().await.map_err(|e| {
            metrics::counter!("meterflow_token_refreshes_total", "result" => "error").increment(1);
            TokenError::Unavailable(format!("unreadable token answer: {}", without_url(&e)))
        })?;
        let expires_at = answer
            .expires_in
            .as_ref()
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .map(|secs| Instant::now() + Duration::from_secs(secs));
        metrics::counter!("meterflow_token_refreshes_total", "result" => "ok").increment(1);
        tracing::info!(expires_in_s = ?expires_at.map(|e| e.saturating_duration_since(Instant::now()).as_secs()), "billwerk access token obtained");
        Ok(Token {
            value: answer.access_token,
            expires_at,
        })
    }
}
