//! Gitea's branch API (SPEC §4 "Remote branch deletion").
//!
//! `DELETE /api/v1/repos/{owner}/{repo}/branches/{branch}`: 204 and 404 both mean gone;
//! 403 and 423 (protected, locked) are permanent; 5xx and transport errors are retried.
//! Protected names are refused by the caller before this is ever reached.

use std::time::Duration;

use super::http::{self, segment, segments};
use super::EffectError;
use crate::config::Gitea;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchDeletion {
    Deleted,
    AlreadyGone,
}

pub fn delete_branch(
    cfg: &Gitea,
    timeout: Duration,
    repo: &str,
    branch: &str,
) -> Result<BranchDeletion, EffectError> {
    let url = format!(
        "{}/api/v1/repos/{}/{}/branches/{}",
        cfg.url,
        segment(&cfg.owner),
        segment(repo),
        segments(branch)
    );
    let auth = cfg.token.as_ref().map(|t| format!("token {}", t.expose()));
    let mut headers = vec![("Accept", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let agent = http::agent(timeout);
    let answer = http::send(&agent, "DELETE", &url, &headers, None)
        .map_err(|e| EffectError::retry(format!("Gitea unreachable: {e}")))?;
    match answer.status {
        204 | 200 => Ok(BranchDeletion::Deleted),
        404 => Ok(BranchDeletion::AlreadyGone),
        403 | 423 => Err(EffectError::permanent(format!(
            "Gitea refused to delete {branch} of {repo} (HTTP {})",
            answer.status
        ))),
        s => Err(EffectError::retry(format!(
            "Gitea answered HTTP {s} deleting {branch} of {repo}"
        ))),
    }
}
