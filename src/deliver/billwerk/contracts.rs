//! The product's own contract ids (`contract_external_id`) → billwerk's internal contract `Id`,
//! through `GET /api/v1/contracts?externalId=`, with a bounded cache.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// A bounded map; the oldest entry goes first when full.
pub struct ContractCache {
    capacity: usize,
    inner: Mutex<(HashMap<String, String>, VecDeque<String>)>,
}

impl ContractCache {
    pub fn new(capacity: usize) -> Self {
        ContractCache {
            capacity: capacity.max(1),
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    pub fn get(&self, external_id: &str) -> Option<String> {
        crate::sync::lock(&self.inner).0.get(external_id).cloned()
    }

    pub fn insert(&self, external_id: String, contract_id: String) {
        let mut guard = crate::sync::lock(&self.inner);
        let (map, order) = &mut *guard;
        if map.insert(external_id.clone(), contract_id).is_none() {
            order.push_back(external_id);
            while map.len() > self.capacity {
                match order.pop_front() {
                    Some(oldest) => {
                        map.remove(&oldest);
                    }
                    None => break,
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        crate::sync::lock(&self.inner).0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_oldest_beyond_capacity() {
        let c = ContractCache::new(2);
        c.insert("a".into(), "1".into());
        c.insert("b".into(), "2".into());
        c.insert("a".into(), "1".into());
        c.insert("c".into(), "3".into());
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a"), None);
        assert_eq!(c.get("c").as_deref(), Some("3"));
    }
}
