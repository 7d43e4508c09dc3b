//! The timestamp window (`[input] max_future`, `max_age`): an event stamped too far ahead of
//! this process's clock, or older than the bound when it is read, is dead-lettered with reason
//! `timestamp_out_of_window` instead of becoming a billwerk `DueDate` in another billing period.
//! Pure: the caller passes `now`.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

use crate::config::InputMapping;
use crate::event::{RejectReason, Rejection};
use crate::text::compact_duration;

/// The accepted range of event timestamps relative to the time an event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampWindow {
    /// Zero: no bound.
    pub max_future: Duration,
    /// Zero: no bound.
    pub max_age: Duration,
}

impl TimestampWindow {
    pub fn from_config(input: &InputMapping) -> Self {
        TimestampWindow {
            max_future: input.max_future,
            max_age: input.max_age,
        }
    }

    /// No bound at all.
    pub fn unbounded() -> Self {
        TimestampWindow {
            max_future: Duration::ZERO,
            max_age: Duration::ZERO,
        }
    }

    /// Whether `timestamp` is inside the window as of `now`; the rejection names the bound
    /// crossed. A bound too large for the calendar (beyond year 262 143) bounds nothing.
    pub fn check(&self, timestamp: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), Rejection> {
        if !self.max_age.is_zero() {
            if let Some(oldest) = offset(now, self.max_age, Direction::Back) {
                if timestamp < oldest {
                    let age = now.signed_duration_since(timestamp);
                    return Err(Rejection::new(
                        RejectReason::TimestampOutOfWindow,
                        format!(
                            "timestamp {} is older than input.max_age ({}): it was {} old when \
                             read at {}; billwerk would bill it in a later period than it \
                             belongs to. Raise input.max_age (or set it to \"0\") and replay \
                             to bill it anyway",
                            rfc3339(timestamp),
                            compact_duration(self.max_age),
                            human_delta(age),
                            rfc3339(now),
                        ),
                    ));
                }
            }
        }
        if !self.max_future.is_zero() {
            if let Some(latest) = offset(now, self.max_future, Direction::Ahead) {
                if timestamp > latest {
                    let ahead = timestamp.signed_duration_since(now);
                    return Err(Rejection::new(
                        RejectReason::TimestampOutOfWindow,
                        format!(
                            "timestamp {} is more than input.max_future ({}) ahead: it was {} \
                             ahead of this process's clock when read at {}; check the \
                             producer's clock (and this host's)",
                            rfc3339(timestamp),
                            compact_duration(self.max_future),
                            human_delta(ahead),
                            rfc3339(now),
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

enum Direction {
    Back,
    Ahead,
}

fn offset(now: DateTime<Utc>, by: Duration, direction: Direction) -> Option<DateTime<Utc>> {
    let by = TimeDelta::from_std(by).ok()?;
    match direction {
        Direction::Back => now.checked_sub_signed(by),
        Direction::Ahead => now.checked_add_signed(by),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn human_delta(d: TimeDelta) -> String {
    compact_duration(d.to_std().unwrap_or(Duration::ZERO))
}
