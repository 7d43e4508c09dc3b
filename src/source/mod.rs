//! The Kafka source: a consumer-group member on its own thread that reads messages in
//! per-partition order, tracks every read offset in the [`crate::ack::watermark`], pauses its
//! partitions when in-flight work reaches the budget, and drains revoked partitions before
//! giving them up.

mod gaps;
mod kafka;

pub use kafka::{KafkaSource, SourceHandle, SourceOptions};

use crate::ack::delivery::Ownership;
use crate::admin::readiness::PartitionView;
use crate::admin::status::PartitionFigures;

/// What the pipeline holds of a running source, besides the channel its messages arrive on.
/// [`KafkaSource`] is the service's; the pipeline's own tests run one in memory.
pub trait Source: Send + 'static {
    type Control: SourceControl;
    fn control(&self) -> Self::Control;
    /// Stops reading, lets in-flight events settle (bounded by the drain timeout), commits
    /// what is settled and leaves the group; the message channel closes. Blocks: the pipeline
    /// calls it on a blocking thread.
    fn shutdown(self);
}

/// What the stages do with a running source: the protocol's [`Ownership`] (owns, settle,
/// revocations), what readiness and the status page read, and holding every partition while
/// the provider's 429 gate is closed.
pub trait SourceControl: Ownership + PartitionView + PartitionFigures {
    fn hold(&self, closed: bool);
}

impl Source for KafkaSource {
    type Control = SourceHandle;
    fn control(&self) -> SourceHandle {
        self.handle()
    }
    fn shutdown(self) {
        KafkaSource::shutdown(self)
    }
}

impl SourceControl for SourceHandle {
    fn hold(&self, closed: bool) {
        SourceHandle::hold(self, closed)
    }
}
