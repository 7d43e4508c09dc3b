//! Why an emulator could not start or refused a setting.

/// Start-up and settings errors: each names the option, the value and what would be accepted.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("invalid {option}: {problem}")]
    InvalidOption {
        option: &'static str,
        problem: String,
    },
    #[error("cannot read {path}: {problem}")]
    SeedFile { path: String, problem: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl EmulatorError {
    pub fn invalid(option: &'static str, problem: impl Into<String>) -> Self {
        EmulatorError::InvalidOption {
            option,
            problem: problem.into(),
        }
    }
}
