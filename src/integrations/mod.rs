//! The edges to the outside world: processes, git, Gitea, Plane, the notify hook.
//!
//! Nothing here touches the database; the outbox decides what to run and records how it
//! ended. Failures come back as [`EffectError`], which says whether retrying can help.

pub mod git;
pub mod gitea;
pub mod http;
pub mod notify;
pub mod plane;
pub mod process;

/// A side effect that did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectError {
    /// Retrying cannot help (a refusal, a 403, a protected branch).
    pub permanent: bool,
    pub message: String,
    /// The earliest sensible retry, in seconds, when the other side said so (429).
    pub retry_after_secs: Option<i64>,
}

impl EffectError {
    pub fn retry(message: impl Into<String>) -> Self {
        EffectError {
            permanent: false,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        EffectError {
            permanent: true,
            message: message.into(),
            retry_after_secs: None,
        }
    }
}

impl std::fmt::Display for EffectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
