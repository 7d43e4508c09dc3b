//! Acknowledgement: the exactly-once delivery protocol, the contiguous offset watermark, dead
//! letters, the delivery ledger and its retention.

pub mod deadletter;
pub mod delivery;
pub mod ledger;
pub mod retention;
pub mod watermark;
