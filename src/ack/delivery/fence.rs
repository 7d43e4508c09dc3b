//! What is checked right before every POST (after the pacer and the 429 gate let it go, which
//! can take longer than any lease): that this process may still send the delivery.

use std::time::Duration;

use tokio::time::Instant;

use super::{until_ledger_answers, Ownership};
use crate::ack::ledger::Ledger;
use crate::deliver::runner::AttemptGuard;
use crate::deliver::DeliveryItem;
use crate::event::DeliveryKey;

/// - Ownership: at least one of the delivery's events' partitions is still assigned to this
///   process under the generation it was read in. When none is, the new owners redeliver them.
/// - The ledger's lease (PostgreSQL, several replicas): the key's stamp is renewed
///   (compare-and-set) unless this process renewed it less than [`FRESH_STAMP`] ago. Another
///   replica takes a key over only after the lease (request timeout + 5 s) has run out past the
///   stamp, by the database's clock; so a send that starts within `FRESH_STAMP` of a stamp
///   ends before the lease can. A replica frozen (SIGSTOP, a long pause) past its lease finds
///   its stamp replaced when it wakes, and does not send.
pub(super) struct SendFence<'a> {
    pub(super) source: &'a dyn Ownership,
    pub(super) items: &'a [DeliveryItem],
    pub(super) lease: Option<LedgerLease<'a>>,
}

/// See [`SendFence`]: how recent a stamp must be to send without renewing it.
const FRESH_STAMP: Duration = Duration::from_secs(1);

/// The lease on a claimed delivery key.
pub(super) struct LedgerLease<'a> {
    ledger: &'a Ledger,
    key: &'a DeliveryKey,
    /// The stamp, and when (this process's monotonic clock) it was asked for: never later than
    /// the moment the ledger wrote it.
    stamp: std::sync::Mutex<(i64, Instant)>,
}

impl<'a> LedgerLease<'a> {
    pub(super) fn new(
        ledger: &'a Ledger,
        key: &'a DeliveryKey,
        stamp: i64,
        asked: Instant,
    ) -> Self {
        LedgerLease {
            ledger,
            key,
            stamp: std::sync::Mutex::new((stamp, asked)),
        }
    }

    /// True while the stamp is ours: fresh, or renewed just now.
    async fn renew_if_stale(&self) -> bool {
        if self.ledger.lease().is_zero() {
            // SQLite: one replica, and one task per key in it (`Ledger::local`).
            return true;
        }
        let (expected, asked) = *crate::sync::lock(&self.stamp);
        if asked.elapsed() < FRESH_STAMP {
            return true;
        }
        let asked = Instant::now();
        let renewed = until_ledger_answers(self.key, "not sending until it answers", || {
            self.ledger.touch(self.key, expected)
        })
        .await;
        match renewed {
            Some(next) => {
                *crate::sync::lock(&self.stamp) = (next, asked);
                true
            }
            None => false,
        }
    }
}

impl SendFence<'_> {
    pub(super) fn owned(&self) -> bool {
        self.items
            .iter()
            .any(|i| self.source.owns(&i.raw.source, i.raw.generation))
    }
}

impl AttemptGuard for SendFence<'_> {
    fn may_send(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.owned() {
                return false;
            }
            match &self.lease {
                Some(lease) => lease.renew_if_stale().await,
                None => true,
            }
        })
    }
}
