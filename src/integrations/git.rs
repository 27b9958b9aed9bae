//! git, run as a child process with an argument vector (never a shell), a time limit and
//! no terminal prompts (SPEC §4 "Worktree removal", the `git push --delete` fallback).
//!
//! Every call is pinned to the clone it is meant for. git finds its repository by walking
//! up from the working directory, so a clone whose `.git` is broken (an interrupted clone
//! leaves an empty folder) inside a folder that is itself in a repository would have git
//! act on *that* repository: remove its worktrees, delete its branches and push deletions
//! to its origin. [`GitClone::open`] therefore asks git, with the walk stopped at the
//! clone (`GIT_CEILING_DIRECTORIES`), which repository the clone is, and refuses unless
//! its top level is the clone itself; every later call names that repository explicitly
//! (`--git-dir`, `--work-tree`).
//!
//! The main working tree of a clone is never removed; "already gone" is success. A lock
//! file left by a git that was killed (`refs/heads/<branch>.lock`, `packed-refs.lock`)
//! would fail every later ref update of the clone with "File exists"; such a lock is
//! removed once no process holds it open and it is older than the git time limit (a git
//! orchctl runs never lives longer) — never one a running git may still own. A `git
//! worktree add` killed before it finished (its supervisor stopped mid-preparation) leaves
//! its worktree half made and locked with the reason `initializing`, which `git worktree
//! remove --force` refuses and `prune` skips: such a worktree is discarded (unlocked and
//! removed) by a caller that holds this host's preparation lock of the repo, once no
//! process holds a file of its administrative folder open — never a worktree locked for
//! any other reason.
//! Callers validate repo and branch names first (see `names`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};

use super::process::{run_limited, ChildOutput};
use super::EffectError;

fn base_env() -> HashMap<String, String> {
    [
        ("GIT_TERMINAL_PROMPT", "0"),
        ("GIT_ASKPASS", "true"),
        ("SSH_ASKPASS", "true"),
        ("LC_ALL", "C"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A clone at `$ORCH_REPOS_DIR/<repo>` that git has confirmed is a repository of its own.
#[derive(Debug, Clone)]
pub struct GitClone {
    /// The clone's folder, canonical: its main working tree.
    dir: PathBuf,
    /// Its git directory, absolute, as git reported it.
    git_dir: PathBuf,
    limit: Duration,
}

impl GitClone {
    /// The clone at `dir`: `Ok(None)` when there is no such folder; a permanent error when
    /// the folder is not the top level of a git repository of its own (git would act on
    /// another one), a retryable one when git could not be asked.
    pub fn open(dir: &Path, limit: Duration) -> Result<Option<GitClone>, EffectError> {
        if !dir.exists() {
            return Ok(None);
        }
        let refuse = |why: String| {
            EffectError::permanent(format!(
                "refused: {} is not a git clone of its own ({why}); no git command was run in it",
                dir.display()
            ))
        };
        let canonical = dir
            .canonicalize()
            .map_err(|e| EffectError::retry(format!("reading {}: {e}", dir.display())))?;
        if !canonical.is_dir() {
            return Err(refuse("not a folder".into()));
        }
        if std::fs::symlink_metadata(canonical.join(".git")).is_err() {
            return Err(refuse("it has no .git".into()));
        }
        let mut env = base_env();
        if let Some(parent) = canonical.parent() {
            env.insert(
                "GIT_CEILING_DIRECTORIES".into(),
                parent.to_string_lossy().into_owned(),
            );
        }
        let args: Vec<OsString> = ["rev-parse", "--show-toplevel", "--absolute-git-dir"]
            .iter()
            .map(OsString::from)
            .collect();
        let out = run_limited("git", &args, Some(&canonical), &env, None, limit)
            .map_err(|e| EffectError::retry(format!("{e:#}")))?;
        if !out.status.success() {
            return Err(refuse(format!("git: {}", out.stderr.trim())));
        }
        let mut lines = out.stdout.lines();
        let (Some(top), Some(git_dir)) = (lines.next(), lines.next()) else {
            return Err(refuse(format!(
                "git rev-parse said {:?}",
                out.stdout.trim()
            )));
        };
        let top = Path::new(top).canonicalize().unwrap_or_else(|_| top.into());
        if top != canonical {
            return Err(refuse(format!(
                "git resolves it to the repository at {}",
                top.display()
            )));
        }
        // Canonical, so lock paths compare equal to what /proc shows of open files.
        let git_dir = Path::new(git_dir)
            .canonicalize()
            .unwrap_or_else(|_| git_dir.into());
        Ok(Some(GitClone {
            dir: canonical,
            git_dir,
            limit,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn git(&self, args: &[&str]) -> Result<ChildOutput> {
        let mut argv: Vec<OsString> = Vec::with_capacity(args.len() + 2);
        let mut git_dir = OsString::from("--git-dir=");
        git_dir.push(&self.git_dir);
        let mut work_tree = OsString::from("--work-tree=");
        work_tree.push(&self.dir);
        argv.push(git_dir);
        argv.push(work_tree);
        argv.extend(args.iter().map(OsString::from));
        let mut env = base_env();
        if let Some(parent) = self.dir.parent() {
            env.insert(
                "GIT_CEILING_DIRECTORIES".into(),
                parent.to_string_lossy().into_owned(),
            );
        }
        run_limited("git", &argv, Some(&self.dir), &env, None, self.limit)
    }

    fn git_ok(&self, args: &[&str]) -> Result<ChildOutput> {
        let out = self.git(args)?;
        if !out.status.success() {
            bail!("git {} failed: {}", args.join(" "), out.stderr.trim());
        }
        Ok(out)
    }

    pub fn worktrees(&self) -> Result<Vec<Worktree>> {
        let out = self.git_ok(&["worktree", "list", "--porcelain"])?;
        Ok(parse_worktrees(&out.stdout))
    }

    /// Removes every linked worktree that has `refs/heads/<branch>` checked out, prunes,
    /// and deletes the local branch (unless `delete_branch` is false: a protected name). A
    /// main working tree holding the branch is a permanent refusal; git failures are
    /// retryable. A worktree an unfinished `git worktree add` left ([`Worktree::unfinished`])
    /// is discarded only while `quiesce` gives a guard — this host's preparation lock of the
    /// repo, so that no `git worktree add` of orchctl's can be running — held until the
    /// removal ends; without it the removal waits for a retry.
    pub fn remove_worktree<G>(
        &self,
        branch: &str,
        delete_branch: bool,
        quiesce: impl FnOnce() -> Option<G>,
    ) -> Result<WorktreeRemoval, EffectError> {
        let retry = |e: anyhow::Error| EffectError::retry(format!("{e:#}"));
        let full = format!("refs/heads/{branch}");
        let trees = self.worktrees().map_err(retry)?;
        if trees
            .iter()
            .any(|w| w.is_main && w.branch.as_deref() == Some(full.as_str()))
        {
            return Err(EffectError::permanent(format!(
                "refused: the main working tree of {} has {branch} checked out and is never removed",
                self.dir.display()
            )));
        }
        let mut removed = Vec::new();
        let mut unfinished = Vec::new();
        let mut quiesce = Some(quiesce);
        let mut guard = None;
        for w in trees
            .iter()
            .filter(|w| !w.is_main && w.branch.as_deref() == Some(full.as_str()))
        {
            if w.unfinished() {
                if let Some(take) = quiesce.take() {
                    guard = take();
                }
                if guard.is_none() {
                    return Err(EffectError::retry(format!(
                        "{} is locked by a `git worktree add` that has not finished, and a \
                         preparation of this repo's worktrees is under way; retried",
                        w.path.display()
                    )));
                }
                self.discard_unfinished(w)?;
                unfinished.push(w.path.clone());
                removed.push(w.path.clone());
                continue;
            }
            let path = w.path.to_string_lossy().into_owned();
            let out = self
                .git(&["worktree", "remove", "--force", &path])
                .map_err(retry)?;
            // A folder deleted by hand leaves a stale entry that prune clears below.
            if !out.status.success() && w.path.exists() {
                return Err(EffectError::retry(format!(
                    "git worktree remove {path} failed: {}",
                    out.stderr.trim()
                )));
            }
            removed.push(w.path.clone());
        }
        self.git_ok(&["worktree", "prune"]).map_err(retry)?;
        let mut branch_deleted = false;
        if delete_branch {
            let exists = self
                .git(&["show-ref", "--verify", "--quiet", &full])
                .map_err(retry)?
                .status
                .success();
            if exists {
                self.git_ok(&["branch", "-D", "--", branch])
                    .map_err(retry)?;
                branch_deleted = true;
            }
        }
        Ok(WorktreeRemoval {
            removed,
            unfinished,
            branch_deleted,
        })
    }

    /// Discards a worktree an unfinished `git worktree add` left ([`Worktree::unfinished`]):
    /// unlocks and removes it, then prunes. The caller holds this host's preparation lock
    /// of the repo. A worktree whose administrative folder a live process still holds a
    /// file of open (the checkout a killed `worktree add` started, which outlives it, holds
    /// its `index.lock`) is left for a retry.
    pub fn discard_unfinished(&self, tree: &Worktree) -> Result<(), EffectError> {
        let retry = |e: anyhow::Error| EffectError::retry(format!("{e:#}"));
        if !tree.unfinished() || tree.is_main {
            return Err(EffectError::permanent(format!(
                "{} is no worktree an unfinished `git worktree add` left",
                tree.path.display()
            )));
        }
        if let Some(admin) = self.admin_dir(&tree.path) {
            if held_open_under(&admin) {
                return Err(EffectError::retry(format!(
                    "{} is still being checked out by a `git worktree add` that was killed; retried",
                    tree.path.display()
                )));
            }
        }
        let path = tree.path.to_string_lossy().into_owned();
        self.git_ok(&["worktree", "unlock", &path]).map_err(retry)?;
        let out = self
            .git(&["worktree", "remove", "--force", &path])
            .map_err(retry)?;
        // A folder that never got made leaves an entry that prune clears below.
        if !out.status.success() && tree.path.exists() {
            return Err(EffectError::retry(format!(
                "git worktree remove {path} failed: {}",
                out.stderr.trim()
            )));
        }
        self.git_ok(&["worktree", "prune"]).map_err(retry)?;
        Ok(())
    }

    /// The administrative folder (`<git dir>/worktrees/<name>`) of the linked worktree at
    /// `path`, found by the `gitdir` file that points back at it.
    fn admin_dir(&self, path: &Path) -> Option<PathBuf> {
        let want = path.join(".git");
        let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        std::fs::read_dir(self.git_dir.join("worktrees"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|admin| {
                std::fs::read_to_string(admin.join("gitdir")).is_ok_and(|g| {
                    let g = Path::new(g.trim());
                    g == want || canonical(g) == canonical(&want)
                })
            })
            .map(|admin| canonical(&admin))
    }

    /// Whether the clone has the ref `full` (`refs/heads/<b>`, `refs/remotes/origin/<b>`).
    pub fn has_ref(&self, full: &str) -> Result<bool> {
        let out = self.git(&["show-ref", "--verify", "--quiet", full])?;
        Ok(out.status.success())
    }

    /// `git fetch <remote>`: the remote's branches as remote-tracking refs.
    pub fn fetch(&self, remote: &str) -> Result<()> {
        self.git_ok(&["fetch", "--quiet", remote]).map(|_| ())
    }

    /// Forgets linked worktrees whose folder is gone.
    pub fn prune_worktrees(&self) -> Result<()> {
        self.git_ok(&["worktree", "prune"]).map(|_| ())
    }

    /// Adds a linked worktree at `path` (absolute) with `branch` checked out, as `start`
    /// says where the branch comes from.
    pub fn add_worktree(&self, path: &Path, branch: &str, start: &WorktreeStart) -> Result<()> {
        let path = path.to_string_lossy().into_owned();
        let base;
        let args: Vec<&str> = match start {
            WorktreeStart::Local => vec!["worktree", "add", "--quiet", &path, branch],
            WorktreeStart::Remote(remote) => {
                base = format!("{remote}/{branch}");
                vec![
                    "worktree", "add", "--quiet", "--track", "-b", branch, &path, &base,
                ]
            }
            // A new branch must not track the default branch: a plain `git push` would
            // then go to it.
            WorktreeStart::New(from) => vec![
                "worktree",
                "add",
                "--quiet",
                "--no-track",
                "-b",
                branch,
                &path,
                from,
            ],
        };
        self.git_ok(&args).map(|_| ())
    }

    /// The clone's default branch: `origin/HEAD` when known, else the branch checked out in
    /// the main working tree.
    pub fn default_branch(&self) -> Option<String> {
        let answer = |args: &[&str]| {
            self.git(args)
                .ok()
                .filter(|o| o.status.success())
                .map(|o| o.stdout.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let remote = answer(&[
            "symbolic-ref",
            "--quiet",
            "--short",
            "refs/remotes/origin/HEAD",
        ]);
        if let Some(r) = remote.and_then(|r| r.strip_prefix("origin/").map(String::from)) {
            return Some(r);
        }
        answer(&["symbolic-ref", "--quiet", "--short", "HEAD"])
    }

    /// `git push <remote> --delete <branch>`. With `expect`, the deletion only happens
    /// while the remote branch still points at that commit (`--force-with-lease`): a branch
    /// that was pushed to since is left alone ([`PushDeletion::Moved`]).
    pub fn push_delete(
        &self,
        remote: &str,
        branch: &str,
        expect: Option<&str>,
    ) -> Result<PushDeletion> {
        let refspec = format!("refs/heads/{branch}");
        let lease = expect.map(|sha| format!("--force-with-lease={refspec}:{sha}"));
        let mut args = vec!["push"];
        if let Some(l) = &lease {
            args.push(l);
        }
        args.extend([remote, "--delete", &refspec]);
        let out = self.git(&args)?;
        if out.status.success() {
            return Ok(PushDeletion::Deleted);
        }
        if out.stderr.contains("remote ref does not exist") {
            return Ok(PushDeletion::AlreadyGone);
        }
        if lease.is_some() && out.stderr.contains("stale info") {
            // The lease failed: the branch is gone, or it points elsewhere now.
            let now = self.git_ok(&["ls-remote", remote, &refspec])?;
            return Ok(match now.stdout.split_whitespace().next() {
                None => PushDeletion::AlreadyGone,
                Some(sha) => PushDeletion::Moved(sha.to_string()),
            });
        }
        bail!(
            "git push {remote} --delete {branch} failed: {}",
            out.stderr.trim()
        )
    }

    /// Removes the lock files of the refs a worktree removal or a branch deletion of
    /// `branch` updates, when they are stale: no live process holds them open and they are
    /// older than the git time limit. Returns what was removed, with its age.
    pub fn recover_stale_locks(&self, branch: &str) -> Vec<StaleLock> {
        let locks = [
            format!("refs/heads/{branch}.lock"),
            format!("refs/remotes/origin/{branch}.lock"),
            "packed-refs.lock".to_string(),
        ];
        let mut removed = Vec::new();
        for rel in locks {
            let path = self.git_dir.join(&rel);
            let Some((age, identity)) = stale_age(&path, self.limit) else {
                continue;
            };
            if held_open(&path) {
                continue;
            }
            if remove_if_same(&path, identity) {
                removed.push(StaleLock {
                    path,
                    age_secs: age.as_secs(),
                });
            }
        }
        removed
    }
}

/// Where the branch of a new worktree comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorktreeStart {
    /// The local branch, which exists.
    Local,
    /// A new local branch tracking the remote's branch of the same name (`origin`).
    Remote(String),
    /// A new branch from this commit-ish (the remote's default branch), tracking nothing.
    New(String),
}

/// A lock file removed by [`GitClone::recover_stale_locks`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StaleLock {
    pub path: PathBuf,
    pub age_secs: u64,
}

/// How old the regular file at `path` is and which file it is (device, inode), when it
/// exists and is older than `limit`.
fn stale_age(path: &Path, limit: Duration) -> Option<(Duration, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    let age = SystemTime::now()
        .duration_since(meta.modified().ok()?)
        .unwrap_or_default();
    (meta.file_type().is_file() && age > limit).then_some((age, (meta.dev(), meta.ino())))
}

/// Whether any process this user can see has `path` open (`/proc/<pid>/fd`).
fn held_open(path: &Path) -> bool {
    any_open_file(|target| target == path)
}

/// Whether any process this user can see has a file under `dir` open.
fn held_open_under(dir: &Path) -> bool {
    any_open_file(|target| target.starts_with(dir))
}

/// Whether an open file descriptor of any process this user can see points at a file
/// `matches` accepts. Without /proc nothing can be proven free: then it says yes.
fn any_open_file(matches: impl Fn(&Path) -> bool) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| matches(&target)))
        {
            return true;
        }
    }
    false
}

/// Removes `path` unless it was replaced since it was judged: a new lock of a new git is
/// another file.
fn remove_if_same(path: &Path, judged: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|now| (now.dev(), now.ino()) == judged)
        && std::fs::remove_file(path).is_ok()
}

/// How a push deletion ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushDeletion {
    Deleted,
    AlreadyGone,
    /// The remote branch points at this commit, not the expected one: left alone.
    Moved(String),
}

/// The commit `branch` pointed at as far as the clone at `dir` knows, read from its ref
/// files without running git (this runs inside STOP's transaction): the remote-tracking
/// `refs/remotes/origin/<branch>` (what the agent last pushed from this clone), else the
/// local branch. `None` when the clone, the branch or a loose/packed ref is not there (a
/// reftable repository, say): the deletion then goes by the branch's name alone.
pub fn recorded_commit(dir: &Path, branch: &str) -> Option<String> {
    if crate::names::branch_problem(branch).is_some() {
        return None;
    }
    let git_dir = dir.join(".git");
    if !git_dir.join("HEAD").is_file() {
        return None;
    }
    let packed = std::fs::read_to_string(git_dir.join("packed-refs")).unwrap_or_default();
    [
        format!("refs/remotes/origin/{branch}"),
        format!("refs/heads/{branch}"),
    ]
    .iter()
    .find_map(|name| {
        let loose = std::fs::read_to_string(git_dir.join(name))
            .ok()
            .map(|t| t.trim().to_string());
        loose
            .or_else(|| {
                packed.lines().find_map(|l| {
                    let (sha, r) = l.split_once(' ')?;
                    (r.trim() == name).then(|| sha.to_string())
                })
            })
            .filter(|sha| is_object_id(sha))
    })
}

fn is_object_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One entry of `git worktree list --porcelain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worktree {
    pub path: PathBuf,
    /// `refs/heads/<name>` when a branch is checked out.
    pub branch: Option<String>,
    pub is_main: bool,
    /// The lock's reason when the worktree is locked (empty when it gives none).
    pub locked: Option<String>,
}

/// The reason `git worktree add` locks the worktree it is making with, until it is done.
pub const UNFINISHED_ADD: &str = "initializing";

impl Worktree {
    /// Whether a `git worktree add` left this worktree locked as unfinished: it is still
    /// running, or it was killed half-way (the worktree's checkout is incomplete).
    pub fn unfinished(&self) -> bool {
        self.locked.as_deref() == Some(UNFINISHED_ADD)
    }
}

pub fn parse_worktrees(porcelain: &str) -> Vec<Worktree> {
    let mut out = Vec::new();
    for block in porcelain.split("\n\n") {
        let mut path = None;
        let mut branch = None;
        let mut locked = None;
        for line in block.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(PathBuf::from(p));
            } else if let Some(b) = line.strip_prefix("branch ") {
                branch = Some(b.to_string());
            } else if line == "locked" {
                locked = Some(String::new());
            } else if let Some(r) = line.strip_prefix("locked ") {
                locked = Some(r.to_string());
            }
        }
        if let Some(path) = path {
            let is_main = out.is_empty();
            out.push(Worktree {
                path,
                branch,
                is_main,
                locked,
            });
        }
    }
    out
}

/// What worktree removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorktreeRemoval {
    pub removed: Vec<PathBuf>,
    /// Those of `removed` an unfinished `git worktree add` had left locked.
    pub unfinished: Vec<PathBuf>,
    pub branch_deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_commit_prefers_the_remote_tracking_ref_loose_or_packed() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        std::fs::create_dir_all(git.join("refs/heads/feature")).unwrap();
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        std::fs::write(git.join("refs/heads/feature/x"), format!("{a}\n")).unwrap();
        assert_eq!(recorded_commit(dir.path(), "feature/x"), Some(a.clone()));
        std::fs::write(
            git.join("packed-refs"),
            format!("# pack-refs with: peeled fully-peeled sorted\n{b} refs/remotes/origin/feature/x\n^{a}\n"),
        )
        .unwrap();
        assert_eq!(recorded_commit(dir.path(), "feature/x"), Some(b));
        assert_eq!(recorded_commit(dir.path(), "feature/none"), None);
        // Names git would refuse are never joined into a path.
        assert_eq!(recorded_commit(dir.path(), "../../etc/x"), None);
        std::fs::write(git.join("refs/heads/feature/y"), "not a sha\n").unwrap();
        assert_eq!(recorded_commit(dir.path(), "feature/y"), None);
    }

    #[test]
    fn porcelain_blocks_parse_and_the_first_is_main() {
        let text = "worktree /r/main\nHEAD abc\nbranch refs/heads/main\n\n\
                    worktree /r/wt\nHEAD def\nbranch refs/heads/feature/X-1\n\n\
                    worktree /r/detached\nHEAD 123\ndetached\n\n\
                    worktree /r/half\nHEAD 456\nbranch refs/heads/feature/X-2\nlocked initializing\n\n\
                    worktree /r/usb\nHEAD 789\nbranch refs/heads/feature/X-3\nlocked\n\n";
        let w = parse_worktrees(text);
        assert_eq!(w.len(), 5);
        assert!(w[0].is_main && !w[1].is_main);
        assert_eq!(w[1].branch.as_deref(), Some("refs/heads/feature/X-1"));
        assert_eq!(w[2].branch, None);
        assert_eq!(w[1].locked, None);
        assert!(w[3].unfinished() && w[3].locked.as_deref() == Some("initializing"));
        assert!(!w[4].unfinished() && w[4].locked.as_deref() == Some(""));
    }
}
