//! Errors that carry an exit code (SPEC §9).
//!
//! Domain code raises a [`Coded`] error when the caller must be able to tell the failure
//! apart (bad input, busy database, bad signature, bad configuration); everything else is a
//! plain `anyhow` error and exits 1. `main` is the only place that turns an error into an
//! exit code, through [`exit_code`]. Messages never contain secrets: callers build them
//! from names and ids, never from tokens.

use std::fmt;

/// The exit codes of SPEC §9.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Failure = 1,
    Usage = 2,
    NothingToClaim = 3,
    DataErr = 65,
    TempFail = 75,
    NoPerm = 77,
    Config = 78,
}

impl ExitKind {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An error whose exit code is part of the contract.
#[derive(Debug)]
pub struct Coded {
    pub kind: ExitKind,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

impl Coded {
    pub fn new(kind: ExitKind, message: impl Into<String>) -> Self {
        Coded {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Bad input data (exit 65).
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    Coded::new(ExitKind::DataErr, message).into()
}

/// A temporary condition, safe to retry (exit 75).
pub fn temp_fail(message: impl Into<String>) -> anyhow::Error {
    Coded::new(ExitKind::TempFail, message).into()
}

/// Signature missing or wrong (exit 77).
pub fn no_perm(message: impl Into<String>) -> anyhow::Error {
    Coded::new(ExitKind::NoPerm, message).into()
}

/// Bad configuration, or a database newer than this binary (exit 78).
pub fn config_err(message: impl Into<String>) -> anyhow::Error {
    Coded::new(ExitKind::Config, message).into()
}

/// Walks the cause chain: the first [`Coded`] decides; then a store failure that carries a
/// code (a database busy past its timeout, a conflict: temporary; a schema newer than this
/// binary: configuration) — the store attaches it, whatever its backend.
pub fn exit_kind(err: &anyhow::Error) -> ExitKind {
    // A context layer is found by anyhow's own downcast, a cause by a walk of the chain.
    if let Some(coded) = err.downcast_ref::<Coded>() {
        return coded.kind;
    }
    for cause in err.chain() {
        if let Some(coded) = cause.downcast_ref::<Coded>() {
            return coded.kind;
        }
    }
    match crate::store::Error::of(err) {
        Some(crate::store::Error::Busy | crate::store::Error::Conflict) => ExitKind::TempFail,
        Some(crate::store::Error::NewerSchema { .. }) => ExitKind::Config,
        None => ExitKind::Failure,
    }
}

/// The hint of the first [`Coded`] in the chain, or a generic one for a busy database.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    for cause in err.chain() {
        if let Some(coded) = cause.downcast_ref::<Coded>() {
            return coded.hint.clone();
        }
    }
    if exit_kind(err) == ExitKind::TempFail {
        return Some("the database stayed busy past ORCH_BUSY_TIMEOUT_MS; retry".into());
    }
    None
}
