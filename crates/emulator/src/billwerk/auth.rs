//! billwerk's OAuth 2.0 client-credentials flow: `POST /oauth/token/` with HTTP Basic (or form
//! fields) and `grant_type=client_credentials`; opaque bearer tokens that expire and can be revoked.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::Secret;

/// The one client the emulator accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: Secret,
}

/// Why a token request is refused, in OAuth 2.0's words (RFC 6749 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// 400: `grant_type` missing or not `client_credentials`.
    UnsupportedGrantType,
    /// 401: no credentials, or wrong ones.
    InvalidClient,
}

impl TokenRefusal {
    pub fn code(self) -> &'static str {
        match self {
            TokenRefusal::UnsupportedGrantType => "unsupported_grant_type",
            TokenRefusal::InvalidClient => "invalid_client",
        }
    }
}

/// Checks a token request: the form body and the `Authorization` header.
pub fn check_token_request(
    credentials: &ClientCredentials,
    authorization: Option<&str>,
    form_body: &[u8],
) -> Result<(), TokenRefusal> {
    let form: HashMap<String, String> = url::form_urlencoded::parse(form_body)
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(TokenRefusal::UnsupportedGrantType);
    }
    let (client_id, client_secret) = authorization
        .and_then(basic_credentials)
        .or_else(|| {
            Some((
                form.get("client_id")?.clone(),
                form.get("client_secret")?.clone(),
            ))
        })
        .ok_or(TokenRefusal::InvalidClient)?;
    if client_id == credentials.client_id && client_secret == credentials.client_secret.expose() {
        Ok(())
    } else {
        Err(TokenRefusal::InvalidClient)
    }
}

/// `Basic base64(id:secret)`; id and secret are form-urlencoded first (RFC 6749 §2.3.1), which
/// for ordinary ids changes nothing, so both spellings are accepted.
fn basic_credentials(authorization: &str) -> Option<(String, String)> {
    let (scheme, encoded) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |text: &str| -> String {
        url::form_urlencoded::parse(format!("v={text}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

/// `Bearer <token>` → the token.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|token| !token.is_empty())
}

/// Issued tokens and when they expire.
pub struct TokenBook {
    lifetime: Duration,
    expiry_by_token: RwLock<HashMap<String, Instant>>,
}

impl TokenBook {
    pub fn new(lifetime: Duration) -> Self {
        TokenBook {
            lifetime,
            expiry_by_token: RwLock::new(HashMap::new()),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn issue(&self, now: Instant) -> String {
        let token = format!("{:032x}", rand::random::<u128>());
        let mut tokens = self.expiry_by_token.write().expect("token lock poisoned");
        tokens.retain(|_, expiry| *expiry > now);
        tokens.insert(token.clone(), now + self.lifetime);
        token
    }

    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        let tokens = self.expiry_by_token.read().expect("token lock poisoned");
        tokens.get(token).is_some_and(|expiry| *expiry > now)
    }

    /// billwerk tokens are revocable: every client must cope with a 401 mid-stream.
    pub fn revoke_all(&self) {
        self.expiry_by_token
            .write()
            .expect("token lock poisoned")
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> ClientCredentials {
        ClientCredentials {
            client_id: "id".into(),
            client_secret: Secret::new("s3cret"),
        }
    }

    fn basic(id: &str, secret: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        format!("Basic {encoded}")
    }

    #[test]
    fn accepts_basic_or_form_credentials() {
        let grant = b"grant_type=client_credentials";
        assert_eq!(
            check_token_request(&credentials(), Some(&basic("id", "s3cret")), grant),
            Ok(())
        );
        let form = b"grant_type=client_credentials&client_id=id&client_secret=s3cret";
        assert_eq!(check_token_request(&credentials(), None, form), Ok(()));
    }

    #[test]
    fn refuses_wrong_credentials_and_grants() {
        let grant = b"grant_type=client_credentials";
        assert_eq!(
            check_token_request(&credentials(), Some(&basic("id", "wrong")), grant),
            Err(TokenRefusal::InvalidClient)
        );
        assert_eq!(
            check_token_request(&credentials(), None, grant),
            Err(TokenRefusal::InvalidClient)
        );
        assert_eq!(
            check_token_request(
                &credentials(),
                Some(&basic("id", "s3cret")),
                b"grant_type=password"
            ),
            Err(TokenRefusal::UnsupportedGrantType)
        );
    }

    #[test]
    fn bearer_tokens_expire_and_can_be_revoked() {
        let book = TokenBook::new(Duration::from_secs(10));
        let now = Instant::now();
        let token = book.issue(now);
        assert_eq!(token.len(), 32);
        assert!(book.is_valid(&token, now + Duration::from_secs(9)));
        assert!(!book.is_valid(&token, now + Duration::from_secs(10)));
        assert!(!book.is_valid("unknown", now));
        book.revoke_all();
        assert!(!book.is_valid(&token, now));
    }

    #[test]
    fn reads_bearer_headers() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
