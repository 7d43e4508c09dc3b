//! The `Idempotency-Key` request header: Billingrails caches the answer for 24 h and replays it;
//! the same key with another body answers 409, and so does a duplicate while the first request
//! is still being processed. Pure: the caller passes the clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// The longest key Billingrails accepts.
pub const MAX_KEY_LEN: usize = 180;

/// What identifies "the same request": the endpoint and the exact body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(path: &str, body: &[u8]) -> Fingerprint {
        let mut hasher = Sha256::new();
        hasher.update((path.len() as u64).to_be_bytes());
        hasher.update(path.as_bytes());
        hasher.update(body);
        Fingerprint(hasher.finalize().into())
    }
}

/// An answer kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First use of the key (or its answer expired): process the request.
    Proceed,
    /// Same key, same request, already answered.
    Replay(CachedAnswer),
    /// Same key, another body or endpoint.
    DifferentRequest,
    /// Same key while the first request is still being processed.
    InFlight,
}

enum Entry {
    InFlight(Fingerprint),
    Answered {
        fingerprint: Fingerprint,
        answer: CachedAnswer,
        expires_at: Instant,
    },
}

pub struct IdempotencyCache {
    ttl: Duration,
    entries: HashMap<String, Entry>,
    claims_since_purge: usize,
}

/// Expired answers are swept out every this many claims, so memory stays bounded.
const PURGE_EVERY: usize = 1024;

impl IdempotencyCache {
    pub fn new(ttl: Duration) -> Self {
        IdempotencyCache {
            ttl,
            entries: HashMap::new(),
            claims_since_purge: 0,
        }
    }

    pub fn claim(&mut self, key: &str, fingerprint: Fingerprint, now: Instant) -> Claim {
        self.claims_since_purge += 1;
        if self.claims_since_purge >= PURGE_EVERY {
            self.claims_since_purge = 0;
            self.entries.retain(|_, entry| match entry {
                Entry::InFlight(_) => true,
                Entry::Answered { expires_at, .. } => *expires_at > now,
            });
        }
        match self.entries.get(key) {
            Some(Entry::InFlight(first)) if *first == fingerprint => Claim::InFlight,
            Some(Entry::InFlight(_)) => Claim::DifferentRequest,
            Some(Entry::Answered {
                fingerprint: first,
                answer,
                expires_at,
            }) if *expires_at > now => {
                if *first == fingerprint {
                    Claim::Replay(answer.clone())
                } else {
                    Claim::DifferentRequest
                }
            }
            _ => {
                self.entries
                    .insert(key.to_string(), Entry::InFlight(fingerprint));
                Claim::Proceed
            }
        }
    }

    /// Keeps the answer of a claimed key for replay.
    pub fn complete(&mut self, key: &str, answer: CachedAnswer, now: Instant) {
        if let Some(entry) = self.entries.get_mut(key) {
            if let Entry::InFlight(fingerprint) = *entry {
                *entry = Entry::Answered {
                    fingerprint,
                    answer,
                    expires_at: now + self.ttl,
                };
            }
        }
    }

    /// Forgets a claimed key whose request produced no answer worth keeping.
    pub fn release(&mut self, key: &str) {
        if matches!(self.entries.get(key), Some(Entry::InFlight(_))) {
            self.entries.remove(key);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> CachedAnswer {
        CachedAnswer {
            status: 202,
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn replays_the_same_request_and_refuses_another() {
        let mut cache = IdempotencyCache::new(Duration::from_secs(60));
        let now = Instant::now();
        let request = Fingerprint::of("/v1/events/ingest", b"a");
        assert_eq!(cache.claim("k", request, now), Claim::Proceed);
        assert_eq!(cache.claim("k", request, now), Claim::InFlight);
        let other = Fingerprint::of("/v1/events/ingest", b"b");
        assert_eq!(cache.claim("k", other, now), Claim::DifferentRequest);
        cache.complete("k", answer(), now);
        assert_eq!(cache.claim("k", request, now), Claim::Replay(answer()));
        assert_eq!(cache.claim("k", other, now), Claim::DifferentRequest);
        let other_endpoint = Fingerprint::of("/v1/events/batch", b"a");
        assert_eq!(
            cache.claim("k", other_endpoint, now),
            Claim::DifferentRequest
        );
    }

    #[test]
    fn answers_expire_after_the_ttl() {
        let mut cache = IdempotencyCache::new(Duration::from_secs(60));
        let now = Instant::now();
        let request = Fingerprint::of("/p", b"a");
        assert_eq!(cache.claim("k", request, now), Claim::Proceed);
        cache.complete("k", answer(), now);
        let later = now + Duration::from_secs(60);
        assert_eq!(
            cache.claim("k", Fingerprint::of("/p", b"b"), later),
            Claim::Proceed
        );
    }

    #[test]
    fn a_released_key_can_be_used_again() {
        let mut cache = IdempotencyCache::new(Duration::from_secs(60));
        let now = Instant::now();
        let request = Fingerprint::of("/p", b"a");
        assert_eq!(cache.claim("k", request, now), Claim::Proceed);
        cache.release("k");
        assert_eq!(cache.claim("k", request, now), Claim::Proceed);
    }
}
