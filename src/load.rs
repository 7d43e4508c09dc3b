//! Loading a config file: `config` parses and checks what it can alone; the checks only the
//! decoder and the price book can make are theirs, passed in from here (`config::StageChecks`).
//! This module sits above `config`, `decode` and `pricing`, so that none of them depends on
//! another in a circle.

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigProblem, EnvLookup, InputMapping, StageChecks};

/// The real checks: the decoder's mapping rules, the price book, the template parser.
struct Stages;

impl StageChecks for Stages {
    fn mapping(&self, input: &InputMapping) -> Vec<ConfigProblem> {
        crate::decode::check_mapping(input)
    }

    fn prices(&self, config: &Config) -> Vec<ConfigProblem> {
        crate::pricing::PriceBook::new(config)
            .err()
            .unwrap_or_default()
    }

    fn template(&self, text: &str) -> Result<bool, String> {
        crate::pricing::Template::parse(text).map(|t| t.is_empty())
    }
}

impl Config {
    /// Reads, interpolates `${ENV}`, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] with `${VAR}`s read through `env`.
    pub fn load_with_env(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_str_with_env(&text, env)
    }

    /// Interpolates `${ENV}` from the process environment, parses and validates config text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str_with_env(text, &|name| std::env::var(name).ok())
    }

    /// Parses TOML, interpolates `${VAR}` / `${VAR:-default}` / `$${` in string values through
    /// `env`, deserializes and validates; every problem at once, none showing a secret.
    pub fn from_toml_str_with_env(text: &str, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        Config::parse_checked(text, env, &Stages)
    }

    /// Every problem at once; empty when the config can run.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        self.validate_with(&Stages)
    }
}
