//! The emulated rate limit: a fixed window counted over every provider answer.
//!
//! billwerk documents `X-RateLimit-Limit` / `X-RateLimit-Remaining` and a 429 beyond the limit, but
//! not the window, nor any reset header or `Retry-After` (older docs say no headers were sent at
//! all). Billingrails documents a token bucket per client IP and no headers. So the window, the
//! limit and every header variant are settings, changeable while running because real limits change.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How the emulator limits and which rate-limit headers it sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSettings {
    /// Answers allowed per window; 0 = unlimited (and then no rate-limit headers at all).
    pub limit: u32,
    /// The window length; windows start at the emulator's start (or the last limit change) + k·window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Send `X-RateLimit-Limit` and `X-RateLimit-Remaining` on every answer (billwerk does).
    pub headers: bool,
    /// Send `Retry-After: <seconds until the window ends, rounded up>` on 429.
    pub retry_after: bool,
    /// Send `X-RateLimit-Reset: <seconds until the window ends, rounded up>` on every answer.
    pub reset_header: bool,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            limit: 0,
            window: Duration::from_secs(60),
            headers: true,
            retry_after: false,
            reset_header: false,
        }
    }
}

impl RateLimitSettings {
    /// A limit of `limit` answers per `window`, with the default header variant.
    pub fn per_window(limit: u32, window: Duration) -> Self {
        RateLimitSettings {
            limit,
            window,
            ..RateLimitSettings::default()
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.limit == 0
    }

    /// Rejects a limit with a zero window, which could never reset.
    pub fn validate(&self) -> Result<(), String> {
        if self.limit > 0 && self.window.is_zero() {
            return Err(format!(
                "window must be longer than 0 when limit is {} (e.g. \"60s\")",
                self.limit
            ));
        }
        Ok(())
    }
}

/// The verdict on one answer, with what the headers should say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub admitted: bool,
    pub limit: u32,
    /// Answers left in this window after this one (0 when refused).
    pub remaining: u32,
    /// Time until the current window ends.
    pub resets_in: Duration,
}

impl Admission {
    /// Whole seconds until the window ends, rounded up: what `Retry-After` and
    /// `X-RateLimit-Reset` carry.
    pub fn resets_in_whole_seconds(&self) -> u64 {
        let secs = self.resets_in.as_secs();
        if self.resets_in.subsec_nanos() > 0 {
            secs + 1
        } else {
            secs
        }
    }
}

/// What one window saw: the ground truth a pacing benchmark measures against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowTally {
    /// When the window began.
    pub started: Instant,
    /// Its length (the setting; a limit change may have ended it early, see `ended_early`).
    pub length: Duration,
    pub limit: u32,
    /// Answers counted against the limit.
    pub admitted: u32,
    /// Answers refused with 429.
    pub refused: u32,
    /// When each refusal came, from the window's start (the first [`REFUSALS_KEPT`]).
    pub refused_at: Vec<Duration>,
    /// A limit change ended the window before its time.
    pub ended_early: bool,
}

/// Refusal times kept per window: enough to see a storm, bounded if a client hammers.
pub const REFUSALS_KEPT: usize = 1000;
/// Windows kept in the history (only windows that saw answers are kept).
const WINDOWS_KEPT: usize = 100_000;

/// A fixed-window counter. Pure: the caller passes the clock.
#[derive(Debug, Clone)]
pub struct FixedWindow {
    limit: u32,
    window: Duration,
    anchor: Instant,
    window_index: u128,
    used: u32,
    refused: u32,
    refused_at: Vec<Duration>,
    /// Earlier windows that saw answers, oldest first.
    history: VecDeque<WindowTally>,
}

impl FixedWindow {
    /// Windows are `[anchor + k·window, anchor + (k+1)·window)`.
    pub fn new(limit: u32, window: Duration, anchor: Instant) -> Self {
        FixedWindow {
            limit,
            window,
            anchor,
            window_index: 0,
            used: 0,
            refused: 0,
            refused_at: Vec::new(),
            history: VecDeque::new(),
        }
    }

    /// The current window's tally so far.
    fn current_tally(&self) -> WindowTally {
        let offset = self.window.as_nanos() * self.window_index;
        WindowTally {
            started: self.anchor + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX)),
            length: self.window,
            limit: self.limit,
            admitted: self.used,
            refused: self.refused,
            refused_at: self.refused_at.clone(),
            ended_early: false,
        }
    }

    /// Moves the current window into the history (if it saw anything) and empties it.
    fn close_current(&mut self, ended_early: bool) {
        if self.used > 0 || self.refused > 0 {
            let mut tally = self.current_tally();
            tally.ended_early = ended_early;
            if self.history.len() == WINDOWS_KEPT {
                self.history.pop_front();
            }
            self.history.push_back(tally);
        }
        self.used = 0;
        self.refused = 0;
        self.refused_at.clear();
    }

    /// Every window that saw answers, oldest first, the current one last (if it saw any).
    pub fn tallies(&self) -> Vec<WindowTally> {
        let mut all: Vec<WindowTally> = self.history.iter().cloned().collect();
        if self.used > 0 || self.refused > 0 {
            all.push(self.current_tally());
        }
        all
    }

    /// A new limit from `now` on: a fresh window that keeps this one's history.
    pub fn replaced(mut self, limit: u32, window: Duration, now: Instant) -> FixedWindow {
        self.roll_to(now);
        self.close_current(true);
        FixedWindow {
            history: std::mem::take(&mut self.history),
            ..FixedWindow::new(limit, window, now)
        }
    }

    fn roll_to(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.anchor);
        let window_nanos = self.window.as_nanos().max(1);
        let index = elapsed.as_nanos() / window_nanos;
        if index != self.window_index {
            self.close_current(false);
            self.window_index = index;
        }
        let window_end_nanos = (index + 1) * window_nanos;
        let resets_in_nanos = window_end_nanos - elapsed.as_nanos();
        Duration::from_nanos(u64::try_from(resets_in_nanos).unwrap_or(u64::MAX))
    }

    /// Counts one answer if the window has room.
    pub fn admit(&mut self, now: Instant) -> Admission {
        let resets_in = self.roll_to(now);
        let admitted = self.used < self.limit;
        if admitted {
            self.used += 1;
        } else {
            self.refused += 1;
            if self.refused_at.len() < REFUSALS_KEPT {
                self.refused_at.push(self.window.saturating_sub(resets_in));
            }
        }
        Admission {
            admitted,
            limit: self.limit,
            remaining: self.limit - self.used,
            resets_in,
        }
    }

    /// The state of the current window without counting anything.
    pub fn peek(&mut self, now: Instant) -> Admission {
        let resets_in = self.roll_to(now);
        Admission {
            admitted: self.used < self.limit,
            limit: self.limit,
            remaining: self.limit - self.used,
            resets_in,
        }
    }
}

/// The shared limiter: settings readable without a lock, the counter behind a short one that is
/// only taken when a limit is set (so an unlimited benchmark never contends on it).
pub struct RateLimiter {
    settings: ArcSwap<RateLimitSettings>,
    window: Mutex<FixedWindow>,
}

impl RateLimiter {
    pub fn new(settings: RateLimitSettings, now: Instant) -> Self {
        let window = FixedWindow::new(settings.limit, settings.window, now);
        RateLimiter {
            settings: ArcSwap::from_pointee(settings),
            window: Mutex::new(window),
        }
    }

    pub fn settings(&self) -> Arc<RateLimitSettings> {
        self.settings.load_full()
    }

    /// Replaces the settings and starts a fresh window at `now` (the history stays).
    pub fn replace(&self, settings: RateLimitSettings, now: Instant) {
        let mut window = self.window.lock().expect("rate-limit lock poisoned");
        let old = std::mem::replace(&mut *window, FixedWindow::new(0, settings.window, now));
        *window = old.replaced(settings.limit, settings.window, now);
        self.settings.store(Arc::new(settings));
    }

    /// Every window that saw answers, oldest first (empty while unlimited).
    pub fn tallies(&self) -> Vec<WindowTally> {
        self.window
            .lock()
            .expect("rate-limit lock poisoned")
            .tallies()
    }

    /// `None` when unlimited.
    pub fn admit(&self, now: Instant) -> Option<Admission> {
        if self.settings.load().is_unlimited() {
            return None;
        }
        Some(
            self.window
                .lock()
                .expect("rate-limit lock poisoned")
                .admit(now),
        )
    }

    /// `None` when unlimited.
    pub fn peek(&self, now: Instant) -> Option<Admission> {
        if self.settings.load().is_unlimited() {
            return None;
        }
        Some(
            self.window
                .lock()
                .expect("rate-limit lock poisoned")
                .peek(now),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_then_refuses_until_the_window_ends() {
        let start = Instant::now();
        let mut window = FixedWindow::new(2, Duration::from_secs(10), start);
        let first = window.admit(start + Duration::from_secs(1));
        assert!(first.admitted);
        assert_eq!(first.remaining, 1);
        assert_eq!(first.resets_in, Duration::from_secs(9));
        assert_eq!(window.admit(start + Duration::from_secs(2)).remaining, 0);
        let refused = window.admit(start + Duration::from_millis(9_500));
        assert!(!refused.admitted);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.resets_in_whole_seconds(), 1);
        let next = window.admit(start + Duration::from_secs(10));
        assert!(next.admitted, "a new window starts at anchor + window");
        assert_eq!(next.remaining, 1);
        assert_eq!(next.resets_in, Duration::from_secs(10));
    }

    #[test]
    fn windows_are_aligned_to_the_anchor_not_to_the_first_request() {
        let start = Instant::now();
        let mut window = FixedWindow::new(1, Duration::from_secs(10), start);
        // First request late in window 2: the window still ends at anchor + 30 s.
        let admission = window.admit(start + Duration::from_secs(27));
        assert!(admission.admitted);
        assert_eq!(admission.resets_in, Duration::from_secs(3));
        assert!(!window.admit(start + Duration::from_secs(29)).admitted);
        assert!(window.admit(start + Duration::from_secs(30)).admitted);
    }

    #[test]
    fn peek_does_not_count() {
        let start = Instant::now();
        let mut window = FixedWindow::new(1, Duration::from_secs(1), start);
        assert_eq!(window.peek(start).remaining, 1);
        assert_eq!(window.peek(start).remaining, 1);
        assert_eq!(window.admit(start).remaining, 0);
    }

    #[test]
    fn limiter_is_transparent_when_unlimited_and_restarts_its_window_on_change() {
        let start = Instant::now();
        let limiter = RateLimiter::new(RateLimitSettings::default(), start);
        assert_eq!(limiter.admit(start), None);
        limiter.replace(
            RateLimitSettings::per_window(1, Duration::from_secs(60)),
            start,
        );
        assert!(limiter.admit(start).unwrap().admitted);
        assert!(!limiter.admit(start).unwrap().admitted);
        let later = start + Duration::from_secs(5);
        limiter.replace(
            RateLimitSettings::per_window(1, Duration::from_secs(60)),
            later,
        );
        let fresh = limiter.admit(later).unwrap();
        assert!(fresh.admitted);
        assert_eq!(fresh.resets_in, Duration::from_secs(60));
    }

    #[test]
    fn tallies_count_each_window_and_survive_a_limit_change() {
        let start = Instant::now();
        let limiter = RateLimiter::new(
            RateLimitSettings::per_window(2, Duration::from_secs(1)),
            start,
        );
        let at = |ms| start + Duration::from_millis(ms);
        for ms in [10, 20, 30, 40] {
            limiter.admit(at(ms));
        }
        // Window 1 sees nothing; window 2 one answer.
        limiter.admit(at(2_100));
        limiter.replace(
            RateLimitSettings::per_window(1, Duration::from_secs(1)),
            at(2_500),
        );
        limiter.admit(at(2_600));
        let tallies = limiter.tallies();
        assert_eq!(tallies.len(), 3, "{tallies:?}");
        assert_eq!(tallies[0].started, start);
        assert_eq!((tallies[0].admitted, tallies[0].refused), (2, 2));
        assert_eq!(
            tallies[0].refused_at,
            vec![Duration::from_millis(30), Duration::from_millis(40)]
        );
        assert_eq!(tallies[1].started, at(2_000));
        assert!(tallies[1].ended_early);
        assert_eq!(tallies[1].admitted, 1);
        assert_eq!(tallies[2].started, at(2_500));
        assert_eq!((tallies[2].limit, tallies[2].admitted), (1, 1));
        assert!(!tallies[2].ended_early);
    }

    #[test]
    fn zero_window_with_a_limit_is_rejected() {
        let settings = RateLimitSettings::per_window(5, Duration::ZERO);
        assert!(settings.validate().unwrap_err().contains("window"));
        assert!(RateLimitSettings::default().validate().is_ok());
    }

    #[test]
    fn whole_seconds_round_up() {
        let admission = |resets_in| Admission {
            admitted: true,
            limit: 1,
            remaining: 0,
            resets_in,
        };
        assert_eq!(
            admission(Duration::from_millis(1)).resets_in_whole_seconds(),
            1
        );
        assert_eq!(
            admission(Duration::from_secs(2)).resets_in_whole_seconds(),
            2
        );
        assert_eq!(
            admission(Duration::from_millis(2_001)).resets_in_whole_seconds(),
            3
        );
    }
}
