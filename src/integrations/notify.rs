//! The operator's notify hook: `ORCH_NOTIFY_CMD` run with the event as JSON on stdin.

use std::collections::HashMap;
use std::ffi::OsString;
use std::time::Duration;

use super::process::run_limited;
use super::EffectError;

pub fn run(argv: &[String], event: &serde_json::Value, limit: Duration) -> Result<(), EffectError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(EffectError::permanent("ORCH_NOTIFY_CMD is empty"));
    };
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let body = event.to_string();
    let out = run_limited(
        program,
        &args,
        None,
        &HashMap::new(),
        Some(body.as_bytes()),
        limit,
    )
    .map_err(|e| EffectError::retry(format!("notify command: {e:#}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let tail: String = out.stderr.trim().chars().take(300).collect();
        Err(EffectError::retry(format!(
            "notify command exited with {}: {tail}",
            out.status
        )))
    }
}
