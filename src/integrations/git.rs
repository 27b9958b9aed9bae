//! git, run as a child process with an argument vector (never a shell), a time limit and
//! no terminal prompts (SPEC §4 "Worktree removal", the `git push --delete` fallback).
//!
//! The main working tree of a clone is never removed; "already gone" is success.
//! Callers validate repo and branch names first (see `names`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use super::process::{run_limited, ChildOutput};
use super::EffectError;

fn git(clone: &Path, args: &[&str], limit: Duration) -> Result<ChildOutput> {
    let mut argv: Vec<OsString> = vec!["-C".into(), clone.as_os_str().to_owned()];
    argv.extend(args.iter().map(OsString::from));
    let env: HashMap<String, String> = [
        ("GIT_TERMINAL_PROMPT", "0"),
        ("GIT_ASKPASS", "true"),
        ("SSH_ASKPASS", "true"),
        ("LC_ALL", "C"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    run_limited("git", &argv, None, &env, None, limit)
}

fn git_ok(clone: &Path, args: &[&str], limit: Duration) -> Result<ChildOutput> {
    let out = git(clone, args, limit)?;
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), out.stderr.trim());
    }
    Ok(out)
}

/// One entry of `git worktree list --porcelain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worktree {
    pub path: PathBuf,
    /// `refs/heads/<name>` when a branch is checked out.
    pub branch: Option<String>,
    pub is_main: bool,
}

pub fn parse_worktrees(porcelain: &str) -> Vec<Worktree> {
    let mut out = Vec::new();
    for block in porcelain.split("\n\n") {
        let mut path = None;
        let mut branch = None;
        for line in block.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(PathBuf::from(p));
            } else if let Some(b) = line.strip_prefix("branch ") {
                branch = Some(b.to_string());
            }
        }
        if let Some(path) = path {
            let is_main = out.is_empty();
            out.push(Worktree {
                path,
                branch,
                is_main,
            });
        }
    }
    out
}

pub fn worktrees(clone: &Path, limit: Duration) -> Result<Vec<Worktree>> {
    let out = git_ok(clone, &["worktree", "list", "--porcelain"], limit)?;
    Ok(parse_worktrees(&out.stdout))
}

/// What worktree removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorktreeRemoval {
    pub removed: Vec<PathBuf>,
    pub branch_deleted: bool,
}

/// Removes every linked worktree that has `refs/heads/<branch>` checked out, prunes, and
/// deletes the local branch (unless `delete_branch` is false: a protected name). A main
/// working tree holding the branch is a permanent refusal; git failures are retryable.
pub fn remove_worktree(
    clone: &Path,
    branch: &str,
    delete_branch: bool,
    limit: Duration,
) -> Result<WorktreeRemoval, EffectError> {
    let retry = |e: anyhow::Error| EffectError::retry(format!("{e:#}"));
    let full = format!("refs/heads/{branch}");
    let trees = worktrees(clone, limit).map_err(retry)?;
    if trees
        .iter()
        .any(|w| w.is_main && w.branch.as_deref() == Some(full.as_str()))
    {
        return Err(EffectError::permanent(format!(
            "refused: the main working tree of {} has {branch} checked out and is never removed",
            clone.display()
        )));
    }
    let mut removed = Vec::new();
    for w in trees
        .iter()
        .filter(|w| !w.is_main && w.branch.as_deref() == Some(full.as_str()))
    {
        let path = w.path.to_string_lossy().into_owned();
        let out = git(clone, &["worktree", "remove", "--force", &path], limit).map_err(retry)?;
        // A folder deleted by hand leaves a stale entry that prune clears below.
        if !out.status.success() && w.path.exists() {
            return Err(EffectError::retry(format!(
                "git worktree remove {path} failed: {}",
                out.stderr.trim()
            )));
        }
        removed.push(w.path.clone());
    }
    git_ok(clone, &["worktree", "prune"], limit).map_err(retry)?;
    let mut branch_deleted = false;
    if delete_branch {
        let exists = git(clone, &["show-ref", "--verify", "--quiet", &full], limit)
            .map_err(retry)?
            .status
            .success();
        if exists {
            git_ok(clone, &["branch", "-D", "--", branch], limit).map_err(retry)?;
            branch_deleted = true;
        }
    }
    Ok(WorktreeRemoval {
        removed,
        branch_deleted,
    })
}

/// The clone's default branch: `origin/HEAD` when known, else the branch checked out in
/// the main working tree.
pub fn default_branch(clone: &Path, limit: Duration) -> Option<String> {
    let remote = git(
        clone,
        &[
            "symbolic-ref",
            "--quiet",
            "--short",
            "refs/remotes/origin/HEAD",
        ],
        limit,
    )
    .ok()
    .filter(|o| o.status.success())
    .map(|o| o.stdout.trim().to_string());
    if let Some(r) = remote.and_then(|r| r.strip_prefix("origin/").map(String::from)) {
        return Some(r);
    }
    git(
        clone,
        &["symbolic-ref", "--quiet", "--short", "HEAD"],
        limit,
    )
    .ok()
    .filter(|o| o.status.success())
    .map(|o| o.stdout.trim().to_string())
    .filter(|s| !s.is_empty())
}

/// `git push origin --delete <branch>`; true when deleted, false when it was already gone.
pub fn push_delete(clone: &Path, remote: &str, branch: &str, limit: Duration) -> Result<bool> {
    let refspec = format!("refs/heads/{branch}");
    let out = git(clone, &["push", remote, "--delete", &refspec], limit)?;
    if out.status.success() {
        return Ok(true);
    }
    if out.stderr.contains("remote ref does not exist") {
        return Ok(false);
    }
    bail!(
        "git push {remote} --delete {branch} failed: {}",
        out.stderr.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porcelain_blocks_parse_and_the_first_is_main() {
        let text = "worktree /r/main\nHEAD abc\nbranch refs/heads/main\n\n\
                    worktree /r/wt\nHEAD def\nbranch refs/heads/feature/X-1\n\n\
                    worktree /r/detached\nHEAD 123\ndetached\n\n";
        let w = parse_worktrees(text);
        assert_eq!(w.len(), 3);
        assert!(w[0].is_main && !w[1].is_main);
        assert_eq!(w[1].branch.as_deref(), Some("refs/heads/feature/X-1"));
        assert_eq!(w[2].branch, None);
    }
}
