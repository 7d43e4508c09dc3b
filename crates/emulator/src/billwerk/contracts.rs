//! The contracts the emulator knows: seeded at start-up from a JSON file and/or flags, looked up
//! by billwerk's internal id (24 hex characters) or by the product's own `ExternalId`.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// One seeded contract: its billwerk id, its external id, and any other properties to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedContract {
    pub id: String,
    pub external_id: Option<String>,
    /// Further properties (e.g. `CustomerId`, `PlanId`) shown as given.
    pub other: Map<String, Value>,
}

impl SeedContract {
    pub fn new(external_id: impl Into<String>, id: impl Into<String>) -> Self {
        SeedContract {
            id: id.into(),
            external_id: Some(external_id.into()),
            other: Map::new(),
        }
    }

    /// `EXTERNAL_ID=ID` or just `ID` (the `--contract` flag).
    pub fn from_flag(text: &str) -> Result<SeedContract, String> {
        let (external_id, id) = match text.rsplit_once('=') {
            Some((external_id, id)) => (Some(external_id.to_string()), id),
            None => (None, text),
        };
        let contract = SeedContract {
            id: id.to_string(),
            external_id,
            other: Map::new(),
        };
        contract.validate()?;
        Ok(contract)
    }

    /// A JSON array of contract objects, as `GET /api/v1/contracts` answers (so a dump of a
    /// sandbox works): `Id` required, `ExternalId` optional, names case-insensitive.
    pub fn from_json_file_text(text: &str) -> Result<Vec<SeedContract>, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))?;
        let Value::Array(items) = value else {
            return Err("expected a JSON array of contract objects".to_string());
        };
        items
            .into_iter()
            .enumerate()
            .map(|(position, item)| {
                let Value::Object(mut object) = item else {
                    return Err(format!("[{position}]: expected a contract object"));
                };
                let id = take_string(&mut object, "Id")
                    .ok_or_else(|| format!("[{position}]: \"Id\" (a string) is required"))?;
                let external_id = take_string(&mut object, "ExternalId");
                let contract = SeedContract {
                    id,
                    external_id,
                    other: object,
                };
                contract
                    .validate()
                    .map_err(|problem| format!("[{position}]: {problem}"))?;
                Ok(contract)
            })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        if is_contract_id(&self.id) {
            Ok(())
        } else {
            Err(format!(
                "contract id '{}' must be 24 hex characters (e.g. 5ce53069443e551b9caccc64)",
                self.id
            ))
        }
    }

    fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("Id".into(), Value::String(self.id.clone()));
        if let Some(external_id) = &self.external_id {
            object.insert("ExternalId".into(), Value::String(external_id.clone()));
        }
        for (key, value) in &self.other {
            object.insert(key.clone(), value.clone());
        }
        Value::Object(object)
    }
}

fn take_string(object: &mut Map<String, Value>, name: &str) -> Option<String> {
    let key = object
        .keys()
        .find(|key| key.eq_ignore_ascii_case(name))?
        .clone();
    match object.remove(&key)? {
        Value::String(text) => Some(text),
        _ => None,
    }
}

/// billwerk's internal ids are 24 hex characters (MongoDB ObjectIds).
pub fn is_contract_id(text: &str) -> bool {
    text.len() == 24 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

#[derive(Debug, Default)]
pub struct ContractBook {
    contracts: Vec<SeedContract>,
    position_by_id: HashMap<String, usize>,
}

impl ContractBook {
    /// A later seed with the same id replaces the earlier one.
    pub fn new(seeds: Vec<SeedContract>) -> ContractBook {
        let mut book = ContractBook::default();
        for seed in seeds {
            let id = seed.id.to_ascii_lowercase();
            match book.position_by_id.get(&id) {
                Some(&position) => book.contracts[position] = seed,
                None => {
                    book.position_by_id.insert(id, book.contracts.len());
                    book.contracts.push(seed);
                }
            }
        }
        book
    }

    pub fn is_empty(&self) -> bool {
        self.contracts.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.position_by_id.contains_key(&id.to_ascii_lowercase())
    }

    pub fn get(&self, id: &str) -> Option<Value> {
        let position = *self.position_by_id.get(&id.to_ascii_lowercase())?;
        Some(self.contracts[position].to_json())
    }

    /// Every contract whose `ExternalId` matches exactly; all of them when `external_id` is `None`.
    pub fn find(&self, external_id: Option<&str>) -> Vec<Value> {
        self.contracts
            .iter()
            .filter(|contract| match external_id {
                Some(wanted) => contract.external_id.as_deref() == Some(wanted),
                None => true,
            })
            .map(SeedContract::to_json)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5ce53069443e551b9caccc64";

    #[test]
    fn contract_ids_are_24_hex_characters() {
        assert!(is_contract_id(ID));
        assert!(is_contract_id(&ID.to_uppercase()));
        assert!(!is_contract_id("5ce53069443e551b9caccc6"));
        assert!(!is_contract_id("5ce53069443e551b9caccc6g"));
    }

    #[test]
    fn flags_name_an_external_id_or_not() {
        let contract = SeedContract::from_flag(&format!("cust-42={ID}")).unwrap();
        assert_eq!(contract.external_id.as_deref(), Some("cust-42"));
        assert_eq!(SeedContract::from_flag(ID).unwrap().external_id, None);
        assert!(SeedContract::from_flag("cust-42=nope")
            .unwrap_err()
            .contains("24 hex"));
    }

    #[test]
    fn seed_files_keep_other_properties_and_name_the_bad_entry() {
        let text = format!(r#"[{{"id":"{ID}","externalId":"cust-1","PlanId":"p1"}}]"#);
        let book = ContractBook::new(SeedContract::from_json_file_text(&text).unwrap());
        let found = book.find(Some("cust-1"));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["Id"], ID);
        assert_eq!(found[0]["ExternalId"], "cust-1");
        assert_eq!(found[0]["PlanId"], "p1");
        assert!(book.find(Some("cust-2")).is_empty());
        assert!(book.contains(&ID.to_uppercase()));
        let bad = SeedContract::from_json_file_text(r#"[{"ExternalId":"x"}]"#).unwrap_err();
        assert!(bad.starts_with("[0]"), "{bad}");
    }
}
