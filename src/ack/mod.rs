//! Acknowledgement: the contiguous offset watermark, dead letters, and the delivery ledger.

pub mod deadletter;
pub mod ledger;
pub mod watermark;
