//! Gitea's repository and branch API (SPEC §4 "Remote branch deletion").
//!
//! `DELETE /api/v1/repos/{owner}/{repo}/branches/{branch}`: 204 and 404 both mean gone;
//! 403 and 423 (protected, locked) are permanent; 5xx, redirects and transport errors are
//! retried. Before a deletion the caller may read the repo's `default_branch` (`GET
//! /repos/{owner}/{repo}`, when no clone on this host knows it) and the commit the branch
//! points at (`GET …/branches/{branch}`), so that it refuses the default branch and leaves
//! alone a branch that was pushed to since it was meant to go. A 404 on either read means
//! there is nothing to protect (no such repo, no such branch); the DELETE then answers
//! for itself. Gitea has no conditional delete: between the read and the DELETE the
//! branch could still move (a live task's branch is refused before, by the outbox).

use std::time::Duration;

use serde_json::Value;

use super::http::{self, segment, segments, Answer};
use super::EffectError;
use crate::config::Gitea;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchDeletion {
    Deleted,
    AlreadyGone,
}

pub struct GiteaClient<'a> {
    cfg: &'a Gitea,
    agent: ureq::Agent,
}

impl<'a> GiteaClient<'a> {
    pub fn new(cfg: &'a Gitea, timeout: Duration) -> Self {
        GiteaClient {
            cfg,
            agent: http::agent(timeout),
        }
    }

    fn repo_url(&self, repo: &str) -> String {
        format!(
            "{}/api/v1/repos/{}/{}",
            self.cfg.url,
            segment(&self.cfg.owner),
            segment(repo)
        )
    }

    fn send(&self, method: &str, url: &str) -> Result<Answer, EffectError> {
        let auth = self
            .cfg
            .token
            .as_ref()
            .map(|t| format!("token {}", t.expose()));
        let mut headers = vec![("Accept", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        http::send(&self.agent, method, url, &headers, None)
            .map_err(|e| EffectError::retry(format!("Gitea unreachable: {e}")))
    }

    /// A JSON object from a GET; `None` on 404.
    fn get_object(&self, url: &str, what: &str) -> Result<Option<Value>, EffectError> {
        let answer = self.send("GET", url)?;
        match answer.status {
            200 => match serde_json::from_str::<Value>(&answer.body) {
                Ok(v @ Value::Object(_)) => Ok(Some(v)),
                _ => Err(EffectError::retry(format!(
                    "Gitea answered HTTP 200 for {what} with something that is not its JSON object"
                ))),
            },
            404 => Ok(None),
            s => Err(unexpected(&answer, s, &format!("for {what}"))),
        }
    }

    /// The repo's default branch; `None` when Gitea has no such repo (404).
    pub fn default_branch(&self, repo: &str) -> Result<Option<String>, EffectError> {
        let what = format!("repo {}/{repo}", self.cfg.owner);
        let Some(v) = self.get_object(&self.repo_url(repo), &what)? else {
            return Ok(None);
        };
        match v.get("default_branch").and_then(Value::as_str) {
            Some(b) if !b.is_empty() => Ok(Some(b.to_string())),
            _ => Err(EffectError::retry(format!(
                "Gitea's answer for {what} names no default_branch"
            ))),
        }
    }

    /// The commit `branch` points at; `None` when the branch does not exist (404).
    pub fn branch_commit(&self, repo: &str, branch: &str) -> Result<Option<String>, EffectError> {
        let url = format!("{}/branches/{}", self.repo_url(repo), segments(branch));
        let what = format!("branch {branch} of {repo}");
        let Some(v) = self.get_object(&url, &what)? else {
            return Ok(None);
        };
        match v.pointer("/commit/id").and_then(Value::as_str) {
            Some(sha) if !sha.is_empty() => Ok(Some(sha.to_string())),
            _ => Err(EffectError::retry(format!(
                "Gitea's answer for {what} names no commit"
            ))),
        }
    }

    pub fn delete_branch(&self, repo: &str, branch: &str) -> Result<BranchDeletion, EffectError> {
        let url = format!("{}/branches/{}", self.repo_url(repo), segments(branch));
        let answer = self.send("DELETE", &url)?;
        match answer.status {
            204 | 200 => Ok(BranchDeletion::Deleted),
            404 => Ok(BranchDeletion::AlreadyGone),
            403 | 423 => Err(EffectError::permanent(format!(
                "Gitea refused to delete {branch} of {repo} (HTTP {})",
                answer.status
            ))),
            s => Err(unexpected(
                &answer,
                s,
                &format!("deleting {branch} of {repo}"),
            )),
        }
    }
}

/// A status the caller has no meaning for: retried (a redirect is never followed, and its
/// 200 elsewhere would prove nothing about this request).
fn unexpected(answer: &Answer, status: u16, what: &str) -> EffectError {
    let redirect = if answer.is_redirect() {
        " (a redirect, not followed)"
    } else {
        ""
    };
    EffectError::retry(format!("Gitea answered HTTP {status}{redirect} {what}"))
}
