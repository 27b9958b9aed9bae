//! Where a run's agent works (SPEC §13 "Worktrees"): the agents of `ORCH_WORKTREE_AGENTS`
//! in the task's worktree, `$ORCH_WORKTREES_DIR/<repo>/<work item>`, the others in the
//! clone `$ORCH_REPOS_DIR/<repo>`, where the `docs/work-items/<ID>/` artefacts live.
//!
//! The worktree is prepared by the run's supervisor before its agent starts: the local
//! branch if it exists (where it is already checked out in a linked worktree, that one is
//! the task's), else the remote's branch, tracked, else a new branch from the remote's
//! default branch after a fetch. Every git call goes through [`GitClone`] (pinned to the
//! clone, bounded by `ORCH_GIT_TIMEOUT_SECS`). A preparation that fails says why in one
//! line and changes nothing else: the caller fails the run with `worktree: <why>`. Removal
//! is not here: it is the outbox's (`remove_worktree`, on STOP and on `done`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::integrations::git::{GitClone, WorktreeStart};
use crate::names;

/// The working directory a run's agent gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// The task's worktree, prepared before the agent starts.
    Worktree,
    /// The repo's clone.
    Clone,
    /// The launcher's own working directory: `claim --exec` of a repo that has no clone on
    /// this host, as before worktrees were orchctl's.
    Inherited,
}

/// The clone of `repo`.
pub fn clone_dir(config: &Config, repo: &str) -> PathBuf {
    config.repos_dir.join(repo)
}

/// Where the run of `agent` works. `claim --exec` (`lenient`) keeps the launcher's folder
/// for a repo without a clone folder; `dispatch` never does (the run then fails with
/// `worktree: no clone at …`).
pub fn place_for(config: &Config, agent: &str, repo: &str, lenient: bool) -> Place {
    if lenient && (names::validate_repo(repo).is_err() || !clone_dir(config, repo).exists()) {
        return Place::Inherited;
    }
    if config.in_worktree(agent) {
        Place::Worktree
    } else {
        Place::Clone
    }
}

/// `$ORCH_WORKTREES_DIR/<repo>/<work item>`, when both names can name a folder.
pub fn worktree_path(config: &Config, repo: &str, work_item: &str) -> Result<PathBuf, String> {
    names::validate_repo(repo).map_err(|e| format!("{e:#}"))?;
    // A work item id may hold characters a folder name must not (`/`, `..`).
    names::validate_repo(work_item)
        .map_err(|_| format!("the work item id {work_item:?} cannot name a folder"))?;
    let dir =
        std::path::absolute(&config.worktrees_dir).unwrap_or_else(|_| config.worktrees_dir.clone());
    Ok(dir.join(repo).join(work_item))
}

/// The folder the agent of a run starts in: the task's worktree (prepared), the clone, or
/// none (the launcher's). `Err` says why it cannot be had.
pub fn prepare(
    config: &Config,
    place: &Place,
    repo: &str,
    work_item: Option<&str>,
    branch: Option<&str>,
) -> Result<Option<PathBuf>, String> {
    match place {
        Place::Inherited => Ok(None),
        Place::Clone => {
            names::validate_repo(repo).map_err(|e| format!("{e:#}"))?;
            let dir = clone_dir(config, repo);
            if dir.is_dir() {
                Ok(Some(dir))
            } else {
                Err(format!("no clone at {}", dir.display()))
            }
        }
        Place::Worktree => {
            let work_item = work_item.ok_or("the job's task has no work item id")?;
            let branch = branch.ok_or("the job's task has no branch")?;
            prepare_worktree(config, repo, work_item, branch).map(Some)
        }
    }
}

/// Makes (or finds) the task's worktree with `branch` checked out.
fn prepare_worktree(
    config: &Config,
    repo: &str,
    work_item: &str,
    branch: &str,
) -> Result<PathBuf, String> {
    names::validate_repo(repo).map_err(|e| format!("{e:#}"))?;
    names::validate_branch(branch).map_err(|e| format!("{e:#}"))?;
    let dir = clone_dir(config, repo);
    let clone = match GitClone::open(&dir, config.git_timeout) {
        Ok(Some(c)) => c,
        Ok(None) => return Err(format!("no clone at {}", dir.display())),
        Err(e) => return Err(e.message),
    };
    let git = |e: anyhow::Error| format!("{e:#}");
    let _lock = lock_repo(config, repo)?;
    // A git killed earlier may have left the branch's ref locked.
    clone.recover_stale_locks(branch);
    clone.prune_worktrees().map_err(git)?;
    let full = format!("refs/heads/{branch}");
    let mut trees = clone.worktrees().map_err(git)?;
    // A `git worktree add` killed before it finished (a STOP during an earlier
    // preparation) left its worktree half made and locked: with this host's preparation
    // lock held, none of orchctl's is running, so it is discarded and made anew — an agent
    // never starts in a checkout that stopped half-way.
    if let Some(t) = trees
        .iter()
        .find(|t| !t.is_main && t.unfinished() && t.branch.as_deref() == Some(full.as_str()))
    {
        clone.discard_unfinished(t).map_err(|e| e.message)?;
        trees = clone.worktrees().map_err(git)?;
    }
    if let Some(t) = trees
        .iter()
        .find(|t| t.branch.as_deref() == Some(full.as_str()))
    {
        if t.is_main {
            return Err(format!(
                "the main working tree of {} has {branch} checked out; a task's agent never works in it",
                clone.dir().display()
            ));
        }
        // The branch is checked out already: that worktree is the task's.
        return Ok(t.path.clone());
    }
    let target = worktree_path(config, repo, work_item)?;
    if let Some(t) = trees.iter().find(|t| same_path(&t.path, &target)) {
        return Err(format!(
            "{} is a worktree of {} already",
            target.display(),
            t.branch.as_deref().unwrap_or("a detached HEAD")
        ));
    }
    if target.exists() {
        return Err(format!(
            "{} exists and is not a worktree of {}",
            target.display(),
            clone.dir().display()
        ));
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let start = if clone.has_ref(&full).map_err(git)? {
        WorktreeStart::Local
    } else {
        clone.fetch("origin").map_err(git)?;
        if clone
            .has_ref(&format!("refs/remotes/origin/{branch}"))
            .map_err(git)?
        {
            WorktreeStart::Remote("origin".into())
        } else {
            let default = clone.default_branch().ok_or_else(|| {
                format!("the default branch of {repo} is unknown (no origin/HEAD, no branch checked out in the clone)")
            })?;
            let remote = format!("refs/remotes/origin/{default}");
            let from = if clone.has_ref(&remote).map_err(git)? {
                format!("origin/{default}")
            } else {
                default
            };
            WorktreeStart::New(from)
        }
    };
    clone.add_worktree(&target, branch, &start).map_err(git)?;
    Ok(target)
}

/// This host's lock on preparing `repo`'s worktrees when no preparation holds it now (not
/// waited for): while it is held, no `git worktree add` of orchctl's runs in the clone, so a
/// worktree locked as unfinished is a killed one's leftover. `None` when it is held, or
/// cannot be had.
pub fn try_lock_repo(config: &Config, repo: &str) -> Option<Flock<File>> {
    names::validate_repo(repo).ok()?;
    let file = open_repo_lock(config, repo).ok()?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

fn repo_lock_path(config: &Config, repo: &str) -> PathBuf {
    let dir =
        std::path::absolute(&config.worktrees_dir).unwrap_or_else(|_| config.worktrees_dir.clone());
    dir.join(format!("{repo}.lock"))
}

fn open_repo_lock(config: &Config, repo: &str) -> Result<File, String> {
    let path = repo_lock_path(config, repo);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// Takes this host's lock on preparing `repo`'s worktrees: two supervisors fetching or
/// adding worktrees in one clone at once would fail on git's own lock files. The lock is
/// an `flock` of `$ORCH_WORKTREES_DIR/<repo>.lock`, released when its holder exits (even
/// killed); it is waited for at most `ORCH_GIT_TIMEOUT_SECS`.
fn lock_repo(config: &Config, repo: &str) -> Result<Flock<File>, String> {
    let mut file = open_repo_lock(config, repo)?;
    let deadline = Instant::now() + config.git_timeout;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, _)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => {
                return Err(format!(
                    "another preparation of {repo}'s worktrees held {} longer than ORCH_GIT_TIMEOUT_SECS",
                    repo_lock_path(config, repo).display()
                ))
            }
        }
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    a == b || a.canonicalize().ok() == b.canonicalize().ok() && a.exists()
}
