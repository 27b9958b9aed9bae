//! The test harness: a temp dir per test with its own database, repos and logs, the real
//! `orchctl` binary run with a cleaned environment, real agent processes that are always
//! killed (whole group) when the test ends, and real git repositories.
//!
//! The backend of a whole run is chosen by `ORCH_TEST_BACKEND`: `sqlite` (the default) or
//! `postgres`. [`Env::new`] follows it: on PostgreSQL each test gets its own database on
//! the run's cluster (`pg.rs`) and orchctl runs with `ORCH_DB_URL` set (and `ORCH_DB_PATH`
//! too: the URL wins, and no SQLite file may appear). Tests about one backend by nature use
//! [`Env::sqlite`] / [`Env::postgres`]; the SQLite-only ones carry `sqlite_only` in their
//! name, which the PostgreSQL pass of `scripts/test` skips. The tests reach the database
//! through [`TestDb`] (`env.db()`), whose SQL is written once for both.

#![allow(dead_code)]

pub mod db;
pub mod pg;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use orchctl::{Config, Ctx, DbTarget};
use serde_json::Value;
use tempfile::TempDir;

pub use db::{now_ts, ts_in, Busy, Target, TestDb};

pub const BIN: &str = env!("CARGO_BIN_EXE_orchctl");

/// The variable that picks the backend of a whole test run.
pub const BACKEND_VAR: &str = "ORCH_TEST_BACKEND";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The backend of this run: `ORCH_TEST_BACKEND` (`sqlite`, the default, or `postgres`).
pub fn backend() -> Backend {
    match std::env::var(BACKEND_VAR).as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
        Ok("postgres") | Ok("postgresql") => Backend::Postgres,
        Ok(other) => panic!("{BACKEND_VAR}={other:?}: expected sqlite or postgres"),
    }
}

/// The clock cluster has one clock: the tests that move it take turns.
static CLOCK_TURN: Mutex<()> = Mutex::new(());

/// What "nothing changed" compares: the logical dump on either backend, plus the file's
/// bytes (and its journals') on SQLite.
#[derive(Clone, PartialEq)]
pub struct Snapshot {
    pub dump: String,
    pub files: Option<Vec<(String, Vec<u8>)>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Option<Vec<(&str, usize)>> = self
            .files
            .as_ref()
            .map(|v| v.iter().map(|(n, b)| (n.as_str(), b.len())).collect());
        write!(f, "files {sizes:?}\n{}", self.dump)
    }
}

/// One test's world.
pub struct Env {
    pub dir: TempDir,
    /// The SQLite file (set as ORCH_DB_PATH on either backend).
    pub db: PathBuf,
    pub repos: PathBuf,
    pub logs: PathBuf,
    vars: BTreeMap<String, String>,
    backend: Backend,
    pg: Option<pg::PgDatabase>,
    /// Held by a PostgreSQL test that moves the clock cluster's clock.
    clock_turn: Option<MutexGuard<'static, ()>>,
    /// The library has opened (and migrated) the database once: [`Env::db`] need not again.
    migrated: AtomicBool,
}

impl Env {
    /// A test's world on this run's backend (`ORCH_TEST_BACKEND`).
    pub fn new() -> Env {
        Env::with_backend(backend(), false)
    }

    /// On SQLite whatever the run's backend: for tests about SQLite by nature (name them
    /// `sqlite_only_…` so the PostgreSQL pass skips them).
    pub fn sqlite() -> Env {
        Env::with_backend(Backend::Sqlite, false)
    }

    /// On PostgreSQL whatever the run's backend.
    pub fn postgres() -> Env {
        Env::with_backend(Backend::Postgres, false)
    }

    /// On this run's backend, for a test that moves the clock with Debian's `faketime`
    /// ([`Env::set_db_clock`]): on PostgreSQL the clock that counts is the server's, so the
    /// database is on the clock cluster, and such tests take turns.
    pub fn clocked() -> Env {
        Env::with_backend(backend(), true)
    }

    /// On PostgreSQL's clock cluster whatever the run's backend.
    pub fn postgres_clocked() -> Env {
        Env::with_backend(Backend::Postgres, true)
    }

    fn with_backend(backend: Backend, clocked: bool) -> Env {
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
        let (pg, clock_turn) = match backend {
            Backend::Sqlite => (None, None),
            Backend::Postgres => {
                let (cluster, turn) = if clocked {
                    let turn = CLOCK_TURN.lock().unwrap_or_else(|e| e.into_inner());
                    let cluster = pg::clock_cluster();
                    cluster.set_clock("+0");
                    (cluster, Some(turn))
                } else {
                    (pg::cluster(), None)
                };
                let database = cluster.create_database();
                vars.insert("ORCH_DB_URL".into(), database.url());
                (Some(database), turn)
            }
        };
        Env {
            dir,
            db,
            repos,
            logs,
            vars,
            backend,
            pg,
            clock_turn,
            migrated: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// This test's PostgreSQL database (panics on SQLite).
    pub fn pg(&self) -> &pg::PgDatabase {
        self.pg
            .as_ref()
            .expect("this test's database is SQLite, not PostgreSQL")
    }

    /// The database URL orchctl is given (`ORCH_DB_URL`), on PostgreSQL.
    pub fn db_url(&self) -> Option<String> {
        self.pg.as_ref().map(pg::PgDatabase::url)
    }

    /// On PostgreSQL, makes orchctl connect as the role that needs a password
    /// ([`pg::SECRET_ROLE`]): the password in `ORCH_DB_URL` (`in_url`), or only in
    /// `ORCH_DB_PASSWORD`. Returns the password, for "it never appears" checks. The
    /// harness's own connections stay the superuser's.
    pub fn use_password_role(&mut self, in_url: bool) -> &'static str {
        let d = self.pg();
        let (url, variable) = if in_url {
            (d.password_url(), None)
        } else {
            (d.password_role_url(), Some(pg::SECRET_PASSWORD))
        };
        self.set("ORCH_DB_URL", &url);
        match variable {
            Some(p) => self.set("ORCH_DB_PASSWORD", p),
            None => self.unset("ORCH_DB_PASSWORD"),
        };
        pg::SECRET_PASSWORD
    }

    /// Where the harness's own connections go.
    pub fn target(&self) -> Target {
        match &self.pg {
            Some(d) => Target::Postgres(d.url()),
            None => Target::Sqlite(self.db.clone()),
        }
    }

    /// What the library opens.
    pub fn db_target(&self) -> DbTarget {
        match &self.pg {
            Some(d) => DbTarget::Postgres(d.url()),
            None => DbTarget::Sqlite(self.db.clone()),
        }
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

    /// Moves the database's clock for what runs next (libfaketime's spec, as given to
    /// `faketime -f`: `+10d`, `2030-01-01 00:00:00`, `+0` for the real time). On SQLite
    /// the clock is orchctl's own, which `faketime` moves: nothing to do here.
    pub fn set_db_clock(&self, spec: &str) {
        if let Some(d) = &self.pg {
            assert!(
                d.cluster.is_clocked(),
                "a test that moves the clock makes its world with Env::clocked()"
            );
            d.cluster.set_clock(spec);
        }
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
        let ctx = Ctx::open_target(&self.db_target(), self.config())
            .unwrap_or_else(|e| panic!("opening {:?}: {e:#}", self.db_target()));
        self.migrated.store(true, Ordering::Relaxed);
        ctx
    }

    /// A plain connection to the test's database, for seed-style SQL; the database is
    /// created and migrated through the library first (once: polling a count in a loop
    /// does not open the library each time).
    pub fn db(&self) -> TestDb {
        if !self.migrated.load(Ordering::Relaxed) {
            drop(self.ctx());
        }
        self.db_raw()
    }

    /// A plain connection to the test's database as it is (not migrated; on SQLite,
    /// opening creates an empty file).
    pub fn db_raw(&self) -> TestDb {
        TestDb::open(&self.target())
    }

    /// Whether orchctl created the database: SQLite's file exists; PostgreSQL's database
    /// (which the harness creates empty) has a table.
    pub fn database_created(&self) -> bool {
        match self.backend {
            Backend::Sqlite => self.db.exists(),
            Backend::Postgres => !self.db_raw().tables().is_empty(),
        }
    }

    /// The database held busy by another client until the guard is dropped.
    pub fn hold_busy(&self) -> Busy {
        if !self.migrated.load(Ordering::Relaxed) {
            drop(self.ctx());
        }
        self.hold_busy_raw()
    }

    /// [`Env::hold_busy`] on the database as it is (not migrated first).
    pub fn hold_busy_raw(&self) -> Busy {
        Busy::hold(&self.target())
    }

    /// Every row of every table, the schema and its version, as text (see [`TestDb::dump`]).
    pub fn dump(&self) -> String {
        self.db_raw().dump()
    }

    /// The state for "nothing changed" checks, taken with no connection of the harness
    /// left open: the logical dump, and on SQLite the file's bytes (the dump's connection
    /// is the last to close, so the write-ahead log is checkpointed first).
    pub fn snapshot(&self) -> Snapshot {
        let dump = self.db_raw().dump();
        let files = match self.backend {
            Backend::Sqlite => Some(db::sqlite_files(&self.db)),
            Backend::Postgres => None,
        };
        Snapshot { dump, files }
    }

    /// Asserts the database is what `before` recorded (the dump names the difference).
    pub fn assert_unchanged(&self, before: &Snapshot, what: &str) {
        let now = self.snapshot();
        assert_eq!(
            now.dump, before.dump,
            "{what}: the database content changed"
        );
        assert!(
            now.files == before.files,
            "{what}: the database file changed"
        );
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
        self.db().insert(
            "INSERT INTO tasks (plane_id, work_item_id, repo, branch, stage, plane_issue_id, title)
             VALUES (?1, ?2, ?3, ?4, ?5, ?1, ?2)",
            (plane_id, work_item, repo, branch, stage),
        )
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
        let claimed_at = (status == "running").then(now_ts);
        self.db().insert(
            "INSERT INTO jobs (agent, repo, task_id, status, pid, proc_start, run_id, attempts, max_attempts, claimed_at)
             VALUES (?1, 'orchestrator', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            (agent, task_id, status, pid, proc_start, run_id, attempts, max_attempts, claimed_at),
        )
    }

    pub fn job_status(&self, job_id: i64) -> String {
        self.db()
            .value("SELECT status FROM jobs WHERE id = ?1", [job_id])
    }

    pub fn task(&self, task_id: i64) -> orchctl::model::Task {
        self.ctx().store.read(|r| r.task(task_id)).unwrap().unwrap()
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().count(sql)
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

impl Drop for Env {
    /// SPEC §12: with `ORCH_DB_URL` set the URL wins, so no SQLite file may appear — checked
    /// after every PostgreSQL test that left a URL set.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if self.pg.is_some() && self.vars.contains_key("ORCH_DB_URL") && self.db.exists() {
            panic!(
                "orchctl created the SQLite file {} although ORCH_DB_URL was set \
                 (SPEC §12: the URL wins)",
                self.db.display()
            );
        }
    }
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
    target: Target,
}

impl RecordedRuns {
    pub fn new(env: &Env) -> RecordedRuns {
        RecordedRuns {
            target: env.target(),
        }
    }

    fn groups(&self) -> Vec<i64> {
        let Ok(db) = TestDb::try_open(&self.target) else {
            return Vec::new();
        };
        db.try_rows("SELECT DISTINCT pid FROM jobs WHERE pid > 1", ())
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| r.get::<Option<i64>>(0))
                    .collect()
            })
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
