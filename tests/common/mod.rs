//! The test harness: a temp dir per test with its own database, repos and logs, the real
//! `orchctl` binary run with a cleaned environment, real agent processes that are always
//! killed (whole group) when the test ends, and real git repositories.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchctl::{Config, Ctx};
use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_orchctl");

/// One test's world.
pub struct Env {
    pub dir: TempDir,
    pub db: PathBuf,
    pub repos: PathBuf,
    pub logs: PathBuf,
    vars: BTreeMap<String, String>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("orchctl-test-")
            .tempdir()
            .unwrap();
        let db = dir.path().join("state/orch.db");
        let repos = dir.path().join("repos");
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&repos).unwrap();
        let mut vars = BTreeMap::new();
        for (k, v) in [
            ("ORCH_DB_PATH", db.to_str().unwrap()),
            ("ORCH_REPOS_DIR", repos.to_str().unwrap()),
            ("ORCH_LOG_DIR", logs.to_str().unwrap()),
            ("HOME", dir.path().to_str().unwrap()),
            ("XDG_STATE_HOME", dir.path().join("xdg").to_str().unwrap()),
            ("TZ", "UTC"),
            ("PATH", &std::env::var("PATH").unwrap_or_default()),
            // Short grace periods keep tests fast; backoff 0 lets reconcile retry at once.
            ("ORCH_STOP_GRACE_SECS", "3"),
            ("ORCH_OUTBOX_BACKOFF_SECS", "0"),
            ("ORCH_HTTP_TIMEOUT_SECS", "5"),
            ("ORCH_GIT_TIMEOUT_SECS", "20"),
        ] {
            vars.insert(k.to_string(), v.to_string());
        }
        Env {
            dir,
            db,
            repos,
            logs,
            vars,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    pub fn unset(&mut self, key: &str) -> &mut Self {
        self.vars.remove(key);
        self
    }

    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// The binary with exactly this test's environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear().envs(&self.vars).stdin(Stdio::null());
        c
    }

    /// Runs orchctl with `args`, asserts exit 0, parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "orchctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "orchctl {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs orchctl and returns (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs orchctl with `stdin` as input.
    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn config(&self) -> Config {
        let vars = self.vars.clone();
        Config::from_lookup(&move |k| vars.get(k).cloned()).unwrap()
    }

    /// The library's context on this test's database and configuration.
    pub fn ctx(&self) -> Ctx {
        Ctx::open(&self.db, self.config()).unwrap()
    }

    /// A plain SQLite connection, for seed-style inserts with plain SQL.
    pub fn sql(&self) -> rusqlite::Connection {
        // Opening through the library first creates and migrates the file.
        drop(self.ctx());
        let c = rusqlite::Connection::open(&self.db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// The seed's `_make_task`: a task inserted with plain SQL.
    pub fn make_task(
        &self,
        plane_id: &str,
        work_item: &str,
        stage: &str,
        branch: Option<&str>,
    ) -> i64 {
        self.make_task_in(plane_id, work_item, stage, "orchestrator", branch)
    }

    pub fn make_task_in(
        &self,
        plane_id: &str,
        work_item: &str,
        stage: &str,
        repo: &str,
        branch: Option<&str>,
    ) -> i64 {
        let branch = branch
            .map(String::from)
            .unwrap_or_else(|| format!("feature/{work_item}-slug"));
        let c = self.sql();
        c.execute(
            "INSERT INTO tasks (plane_id, work_item_id, repo, branch, stage, plane_issue_id, title)
             VALUES (?1, ?2, ?3, ?4, ?5, ?1, ?2)",
            rusqlite::params![plane_id, work_item, repo, branch, stage],
        )
        .unwrap();
        c.last_insert_rowid()
    }

    /// The seed's `_make_job`.
    pub fn make_job(
        &self,
        task_id: i64,
        status: &str,
        pid: Option<i64>,
        run_id: Option<i64>,
    ) -> i64 {
        self.make_job_full(task_id, "developer", status, pid, None, run_id, 1, 2)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn make_job_full(
        &self,
        task_id: i64,
        agent: &str,
        status: &str,
        pid: Option<i64>,
        proc_start: Option<i64>,
        run_id: Option<i64>,
        attempts: i64,
        max_attempts: i64,
    ) -> i64 {
        let c = self.sql();
        c.execute(
            "INSERT INTO jobs (agent, repo, task_id, status, pid, proc_start, run_id, attempts, max_attempts, claimed_at)
             VALUES (?1, 'orchestrator', ?2, ?3, ?4, ?5, ?6, ?7, ?8,
                     CASE WHEN ?3 = 'running' THEN strftime('%Y-%m-%dT%H:%M:%fZ','now') END)",
            rusqlite::params![agent, task_id, status, pid, proc_start, run_id, attempts, max_attempts],
        )
        .unwrap();
        c.last_insert_rowid()
    }

    pub fn job_status(&self, job_id: i64) -> String {
        self.sql()
            .query_row("SELECT status FROM jobs WHERE id = ?1", [job_id], |r| {
                r.get(0)
            })
            .unwrap()
    }

    pub fn task(&self, task_id: i64) -> orchctl::model::Task {
        self.ctx().store.read(|r| r.task(task_id)).unwrap().unwrap()
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.sql().query_row(sql, [], |r| r.get(0)).unwrap()
    }
}

/// A real agent process in its own session and process group, killed (whole group) and
/// reaped when dropped, even when the test fails.
pub struct Agent {
    child: Child,
    pub pid: i64,
    pub start: i64,
}

impl Agent {
    pub fn spawn(script: &str) -> Agent {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap();
        let pid = child.id() as i64;
        let start = orchctl::integrations::process::stat(pid).unwrap().start;
        let agent = Agent { child, pid, start };
        // Let `sh` start its children so the group is complete before the test acts.
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.group().len() < expected_members(script) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        agent
    }

    /// Live (non-zombie) members of the agent's process group.
    pub fn group(&self) -> Vec<i32> {
        group_members(self.pid as i32)
    }

    /// Waits (bounded) until no member of the group is alive.
    pub fn wait_gone(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.group().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.group().is_empty()
    }
}

/// `sh -c 'a & b'` has the shell plus one process per command, give or take an exec.
fn expected_members(script: &str) -> usize {
    script.matches("sleep").count().max(1)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Live members of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()) else {
            continue;
        };
        if let Some(s) = orchctl::integrations::process::stat(pid) {
            if s.pgrp == pgid && !s.exited() {
                out.push(s.pid);
            }
        }
    }
    out
}

/// Whether `pid` is alive (not gone, not a zombie).
pub fn alive(pid: i32) -> bool {
    orchctl::integrations::process::stat(pid as i64)
        .map(|s| !s.exited())
        .unwrap_or(false)
}

/// Kills a whole process group when dropped (for agents that orchctl launched).
pub struct GroupGuard(pub i64);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0 > 1 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bare remote, a clone at `$ORCH_REPOS_DIR/<name>` on `main`, and helpers to make
/// feature branches with worktrees.
pub struct GitRepo {
    pub bare: PathBuf,
    pub clone: PathBuf,
}

impl GitRepo {
    pub fn new(env: &Env, name: &str) -> GitRepo {
        let bare = env.path().join("remotes").join(format!("{name}.git"));
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-q", "-b", "main"]);
        let clone = env.repos.join(name);
        let out = Command::new("git")
            .args(["clone", "-q"])
            .arg(&bare)
            .arg(&clone)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        git(&clone, &["checkout", "-q", "-b", "main"]);
        std::fs::write(clone.join("README.md"), "hello\n").unwrap();
        git(&clone, &["add", "."]);
        git(&clone, &["commit", "-q", "-m", "init"]);
        git(&clone, &["push", "-q", "origin", "main"]);
        git(&clone, &["remote", "set-head", "origin", "main"]);
        GitRepo { bare, clone }
    }

    /// A branch with a worktree under `<tmp>/worktrees`, one commit, pushed to the remote.
    pub fn feature(&self, env: &Env, branch: &str) -> PathBuf {
        let wt = env.path().join("worktrees").join(branch.replace('/', "_"));
        git(
            &self.clone,
            &[
                "worktree",
                "add",
                "-q",
                "-b",
                branch,
                wt.to_str().unwrap(),
                "main",
            ],
        );
        std::fs::write(wt.join("work.txt"), "agent work\n").unwrap();
        git(&wt, &["add", "."]);
        git(&wt, &["commit", "-q", "-m", "work"]);
        git(&wt, &["push", "-q", "origin", branch]);
        wt
    }

    pub fn local_branches(&self) -> String {
        git(
            &self.clone,
            &["branch", "--list", "--format=%(refname:short)"],
        )
    }

    pub fn remote_branches(&self) -> String {
        git(
            &self.bare,
            &["branch", "--list", "--format=%(refname:short)"],
        )
    }

    pub fn worktree_list(&self) -> String {
        git(&self.clone, &["worktree", "list", "--porcelain"])
    }
}

/// Kills, when dropped, the process group of every run recorded in the test's database
/// (supervisors lead their run's group), and every group that `dispatch` passes started
/// meanwhile: agents the test itself never saw must not outlive it either.
pub struct RecordedRuns {
    db: PathBuf,
}

impl RecordedRuns {
    pub fn new(env: &Env) -> RecordedRuns {
        RecordedRuns { db: env.db.clone() }
    }

    fn groups(&self) -> Vec<i64> {
        let Ok(c) = rusqlite::Connection::open(&self.db) else {
            return Vec::new();
        };
        let _ = c.busy_timeout(Duration::from_secs(5));
        let Ok(mut stmt) = c.prepare("SELECT DISTINCT pid FROM jobs WHERE pid > 1") else {
            return Vec::new();
        };
        stmt.query_map([], |r| r.get(0))
            .map(|rows| rows.flatten().collect())
            .unwrap_or_default()
    }
}

impl Drop for RecordedRuns {
    fn drop(&mut self) {
        // Twice: a supervisor's dispatch pass may launch one more run while the first
        // round is being killed.
        for _ in 0..2 {
            for pgid in self.groups() {
                // Only groups that the recorded pid still leads.
                let leads = orchctl::integrations::process::stat(pgid)
                    .is_some_and(|s| s.pgrp as i64 == pgid);
                if leads || !group_members(pgid as i32).is_empty() {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
