//! [`UsageEvent`] → [`BillableUsage`]: metric → ComponentId, then the first matching override
//! rule sets price, name and a templated description. Pure: no I/O, no clock.

use crate::config::Config;
use crate::config::ConfigProblem;
use crate::event::{BillableUsage, Rejection, UsageEvent};

/// Compiled pricing rules; built once at startup, checked then.
#[derive(Debug, Clone)]
pub struct PriceBook {}

impl PriceBook {
    /// Compiles `[components]`, `[pricing]` and `[[overrides]]`; every problem at once.
    pub fn new(config: &Config) -> Result<PriceBook, Vec<ConfigProblem>> {
        let _ = config;
        todo!("pricing")
    }

    pub fn price(&self, event: UsageEvent) -> Result<BillableUsage, Rejection> {
        let _ = event;
        todo!("pricing")
    }
}
