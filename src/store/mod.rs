//! The SQLite store: the only module that speaks SQL (SPEC §2, §12).
//!
//! [`Store::open`] sets the pragmas (WAL, foreign keys, busy timeout, `synchronous=FULL`),
//! refuses a database written by a newer binary without touching it, and applies pending
//! migrations in one transaction. Reads go through a [`Reader`]; every write goes through
//! [`Store::write`], one `BEGIN IMMEDIATE` transaction whose [`Writer`] offers guarded
//! updates (`… WHERE status = 'running' AND run_id = ?`) so a late writer can never
//! overwrite a newer truth. Timestamps and ids are produced here, never by callers.

mod branches;
mod claimable;
mod dispatch;
mod fallback;
mod keys;
mod live;
mod metrics;
mod prune;
mod reap;
pub mod schema;
mod vocab;

pub use live::{AwaitingCounts, AwaitingTask};

pub use prune::RunEnd;

pub use dispatch::SlotClaim;

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use serde_json::Value;

use crate::error::config_err;
use crate::model::{Job, Lease, OutboxRow, Task, TaskEvent};
use crate::pipeline::Stage;

/// ISO-8601 UTC with milliseconds; the same text format everywhere so strings compare.
pub const NOW_SQL: &str = "strftime('%Y-%m-%dT%H:%M:%fZ','now')";

const TASK_COLS: &str = "id, plane_id, work_item_id, plane_issue_id, project_id, repo, branch, \
    title, stage, created_at, updated_at, cancelled_at, cancel_requested_at, cancel_reason";
const JOB_COLS: &str = "id, agent, repo, task_id, status, pid, proc_start, run_id, attempts, \
    max_attempts, created_at, claimed_at, finished_at, error";
const OUTBOX_COLS: &str = "id, task_id, kind, payload, status, attempts, last_error, result, \
    next_attempt_at, created_at, claimed_pid, claimed_start, claimed_until";

fn task_row(r: &Row) -> rusqlite::Result<Task> {
    Ok(Task {
        id: r.get(0)?,
        plane_id: r.get(1)?,
        work_item_id: r.get(2)?,
        plane_issue_id: r.get(3)?,
        project_id: r.get(4)?,
        repo: r.get(5)?,
        branch: r.get(6)?,
        title: r.get(7)?,
        stage: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        cancelled_at: r.get(11)?,
        cancel_requested_at: r.get(12)?,
        cancel_reason: r.get(13)?,
    })
}

fn job_row(r: &Row) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        agent: r.get(1)?,
        repo: r.get(2)?,
        task_id: r.get(3)?,
        status: r.get(4)?,
        pid: r.get(5)?,
        proc_start: r.get(6)?,
        run_id: r.get(7)?,
        attempts: r.get(8)?,
        max_attempts: r.get(9)?,
        created_at: r.get(10)?,
        claimed_at: r.get(11)?,
        finished_at: r.get(12)?,
        error: r.get(13)?,
    })
}

fn json_col(text: Option<String>) -> Value {
    match text {
        Some(t) => serde_json::from_str(&t).unwrap_or(Value::String(t)),
        None => Value::Null,
    }
}

fn outbox_row(r: &Row) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.get(0)?,
        task_id: r.get(1)?,
        kind: r.get(2)?,
        payload: json_col(r.get(3)?),
        status: r.get(4)?,
        attempts: r.get(5)?,
        last_error: r.get(6)?,
        result: r.get(7)?,
        next_attempt_at: r.get(8)?,
        created_at: r.get(9)?,
        claimed_pid: r.get(10)?,
        claimed_start: r.get(11)?,
        claimed_until: r.get(12)?,
    })
}

fn lease_row(r: &Row) -> rusqlite::Result<Lease> {
    Ok(Lease {
        repo: r.get(0)?,
        branch: r.get(1)?,
        task_id: r.get(2)?,
        acquired_at: r.get(3)?,
    })
}

/// An open database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The schema version the file had when opened (before migrations).
    opened_version: i64,
    /// Whether this open created the file (SPEC §15: a new database is announced).
    created: bool,
    busy_timeout: Duration,
}

/// The write-ahead log is folded back into the database after a commit that leaves it
/// larger than this. Opening rebuilds the log's index by reading the log, so a short log
/// keeps every command's start cheap; a long one makes checkpoints (two fsyncs) rarer.
const WAL_CHECKPOINT_BYTES: u64 = 1 << 20;

impl Store {
    /// Opens (creating when missing) and migrates the database at `path`.
    pub fn open(path: &Path, busy_timeout_ms: u64) -> Result<Store> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the folder {}", parent.display()))?;
        }
        // Asked before SQLite creates it, so a mistyped path can be announced.
        let created = matches!(path.try_exists(), Ok(false));
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening the database {}", path.display()))?;
        conn.busy_timeout(Duration::from_millis(busy_timeout_ms))?;
        // Each command is a short process, and by default the last connection to close
        // folds the write-ahead log into the database and deletes it: every write command
        // would then pay for a checkpoint (a database fsync) and for re-creating the log
        // (a header and a directory fsync) on top of its commit. Leaving the log in place
        // makes a command's commit its only fsync; `write` folds the log back once it has
        // grown (see `checkpoint_if_large`). Durability is the commit's fsync either way.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        // Room for every statement of the busiest commands (stop, reconcile), so no
        // statement is parsed twice in one process (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(64);
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            opened_version: 0,
            created,
            busy_timeout: Duration::from_millis(busy_timeout_ms),
        };
        // Read the version before any pragma that could write, so a database from a newer
        // binary is refused untouched.
        let version = store.user_version()?;
        store.opened_version = version;
        store.check_not_newer(version)?;
        store
            .conn
            .execute_batch("PRAGMA foreign_keys=ON; PRAGMA synchronous=FULL;")
            .context("setting pragmas")?;
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .with_context(|| format!("switching {} to WAL mode", path.display()))?;
        if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
            anyhow::bail!(
                "{} could not be put in WAL mode (got {mode})",
                path.display()
            );
        }
        // The common case costs one pragma read: no transaction when already current.
        if version < schema::current_version() {
            store.migrate()?;
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the database file did not exist before this open (it was created).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The schema version the file had before this process migrated it.
    pub fn opened_version(&self) -> i64 {
        self.opened_version
    }

    pub fn user_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .with_context(|| format!("reading the schema version of {}", self.path.display()))
    }

    fn check_not_newer(&self, version: i64) -> Result<()> {
        if version > schema::current_version() {
            return Err(config_err(format!(
                "database {} has schema version {version}, newer than this orchctl knows ({}); \
                 refusing to touch it",
                self.path.display(),
                schema::current_version()
            )));
        }
        Ok(())
    }

    /// Applies every pending migration in one transaction; a failure rolls back whole.
    pub fn migrate(&self) -> Result<MigrateReport> {
        self.write(|w| {
            let from =
                w.c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?;
            self.check_not_newer(from)?;
            for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(from as usize) {
                m(w.c).with_context(|| format!("migration {} failed", i + 1))?;
            }
            let to = schema::current_version();
            w.c.pragma_update(None, "user_version", to)?;
            Ok(MigrateReport { from, to })
        })
    }

    /// Runs `f` outside any explicit transaction (each statement sees a committed state).
    pub fn read<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        f(&Reader { c: &self.conn })
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction: committed when `f` returns `Ok`,
    /// rolled back otherwise.
    pub fn write<T>(&self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .context("starting a write transaction")?;
        let w = Writer {
            r: Reader { c: &self.conn },
        };
        // What tasks wait for follows every change in the same transaction.
        match f(&w).and_then(|v| w.settle_waits().map(|_| v)) {
            Ok(v) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => {
                    self.checkpoint_if_large();
                    Ok(v)
                }
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(anyhow::Error::new(e).context("committing"))
                }
            },
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Folds a large write-ahead log into the database and truncates it. SQLite's own
    /// auto-checkpoint cannot keep the log short here: a process that opens the database
    /// alone rebuilds the log's index from the log and so forgets that an earlier process
    /// had already checkpointed it, and only a restart of the log makes it short again.
    /// Never waits: with another connection busy, the checkpoint gives up and a later
    /// commit tries again. The commit has succeeded whatever happens here.
    fn checkpoint_if_large(&self) {
        let Some(db) = self.conn.path().filter(|p| !p.is_empty()) else {
            return;
        };
        let wal_len = std::fs::metadata(format!("{db}-wal")).map_or(0, |m| m.len());
        if wal_len <= WAL_CHECKPOINT_BYTES {
            return;
        }
        let _ = self.conn.busy_timeout(Duration::ZERO);
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        let _ = self.conn.busy_timeout(self.busy_timeout);
    }

    /// The raw connection, for the benchmark's query-plan checks and for tests.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The SQL text of every statement this connection holds prepared: after a command,
    /// every query the store ran for it (they all go through the statement cache). With
    /// [`Store::explain`] this lets the query-plan tests check exactly the SQL in use.
    pub fn prepared_sql(&self) -> Vec<String> {
        let mut out = Vec::new();
        // SAFETY: the handle is valid while `self.conn` lives and nothing else uses this
        // connection meanwhile (`Connection` is not `Sync`); `sqlite3_sql` returns text owned
        // by the statement, copied out before the next call can finalize anything.
        unsafe {
            let db = self.conn.handle();
            let mut stmt = rusqlite::ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
            while !stmt.is_null() {
                let text = rusqlite::ffi::sqlite3_sql(stmt);
                if !text.is_null() {
                    out.push(
                        std::ffi::CStr::from_ptr(text)
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
                stmt = rusqlite::ffi::sqlite3_next_stmt(db, stmt);
            }
        }
        out.sort();
        out
    }

    /// `EXPLAIN QUERY PLAN` of `sql` on this database, one line per step, the programs
    /// of the triggers it fires included.
    pub fn explain(&self, sql: &str) -> Result<Vec<String>> {
        let trig = DbConfig::SQLITE_DBCONFIG_TRIGGER_EQP;
        let before = self.conn.db_config(trig)?;
        self.conn.set_db_config(trig, true)?;
        let plan = self
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .and_then(|mut stmt| {
                // Parameters stay unbound: a plan is made before any value is known.
                let mut rows = stmt.raw_query();
                let mut lines = Vec::new();
                while let Some(row) = rows.next()? {
                    lines.push(row.get::<_, String>(3)?);
                }
                Ok(lines)
            });
        self.conn.set_db_config(trig, before)?;
        plan.with_context(|| format!("explaining {sql}"))
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq)]
pub struct MigrateReport {
    pub from: i64,
    pub to: i64,
}

/// Read-only queries.
pub struct Reader<'c> {
    c: &'c Connection,
}

/// Writes, inside a `BEGIN IMMEDIATE` transaction. Derefs to [`Reader`].
pub struct Writer<'c> {
    r: Reader<'c>,
}

impl<'c> Deref for Writer<'c> {
    type Target = Reader<'c>;
    fn deref(&self) -> &Reader<'c> {
        &self.r
    }
}

/// What a new task is made of.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub plane_id: Option<String>,
    pub work_item_id: Option<String>,
    pub plane_issue_id: Option<String>,
    pub project_id: Option<String>,
    pub repo: String,
    pub branch: Option<String>,
    pub title: Option<String>,
    pub stage: String,
}

/// Which queued jobs a claimer will take.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    pub agents: Vec<String>,
    pub repo: Option<String>,
    pub task_deps: bool,
    pub serial_gate: bool,
}

/// The outcome of asking for a repo's merge lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    Acquired,
    AlreadyHeld,
    HeldBy(Lease),
}

/// How a claimed side effect ended.
#[derive(Debug, Clone)]
pub enum EffectEnd {
    Done { result: String },
    Retry { error: String, delay_secs: i64 },
    Failed { error: String },
}

impl<'c> Reader<'c> {
    pub fn task(&self, id: i64) -> Result<Option<Task>> {
        self.c
            .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))?
            .query_row([id], task_row)
            .optional()
            .with_context(|| format!("reading task {id}"))
    }

    /// Resolves a task reference: numeric id, work item id or Plane issue id. Tombstoned
    /// keys carry a suffix and so no longer match.
    pub fn find_task(&self, reference: &str) -> Result<Option<Task>> {
        let reference = reference.trim();
        if let Ok(id) = reference.parse::<i64>() {
            return self.task(id);
        }
        self.c
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE work_item_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_issue_id = ?1
                     LIMIT 1)"
            ))?
            .query_row([reference], task_row)
            .optional()
            .with_context(|| format!("looking up task {reference:?}"))
    }

    /// The task mirroring Plane issue `issue_id` (by `plane_id`, else `plane_issue_id`).
    /// Unlike [`Reader::find_task`] a number is never read as a task id: a payload cannot
    /// name an arbitrary task. Tombstoned keys no longer match.
    pub fn find_task_by_plane_issue(&self, issue_id: &str) -> Result<Option<Task>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE plane_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_issue_id = ?1
                     LIMIT 1)"
            ))?
            .query_row([issue_id], task_row)
            .optional()
            .with_context(|| format!("looking up the task of Plane issue {issue_id:?}"))
    }

    /// The id of a cancelled task whose tombstoned key was `reference` (for a hint: the
    /// key itself no longer resolves).
    pub fn find_tombstoned(&self, reference: &str) -> Result<Option<i64>> {
        // A range on the unique indexes: `<key>#cancelled-` up to `<key>#cancelled.`.
        self.c
            .prepare_cached(
                "SELECT id FROM tasks WHERE work_item_id >= ?1 || '#cancelled-' AND work_item_id < ?1 || '#cancelled.'
                 UNION ALL
                 SELECT id FROM tasks WHERE plane_id >= ?1 || '#cancelled-' AND plane_id < ?1 || '#cancelled.'
                 ORDER BY id DESC LIMIT 1",
            )?
            .query_row([reference.trim()], |r| r.get(0))
            .optional()
            .context("looking up cancelled tasks")
    }

    pub fn list_tasks(
        &self,
        stage: Option<&str>,
        repo: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks
             WHERE (?1 IS NULL OR stage = ?1) AND (?2 IS NULL OR repo = ?2)
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(params![stage, repo, limit], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("listing tasks")?;
        Ok(rows)
    }

    pub fn events(&self, task_id: i64) -> Result<Vec<TaskEvent>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT id, task_id, at, kind, detail FROM task_events WHERE task_id = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map([task_id], |r| {
                Ok(TaskEvent {
                    id: r.get(0)?,
                    task_id: r.get(1)?,
                    at: r.get(2)?,
                    kind: r.get(3)?,
                    detail: json_col(r.get(4)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("reading the log of task {task_id}"))?;
        Ok(rows)
    }

    pub fn job(&self, id: i64) -> Result<Option<Job>> {
        self.c
            .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"))?
            .query_row([id], job_row)
            .optional()
            .with_context(|| format!("reading job {id}"))
    }

    pub fn jobs_of_task(&self, task_id: i64) -> Result<Vec<Job>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE task_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([task_id], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("reading the jobs of task {task_id}"))?;
        Ok(rows)
    }

    /// The task's jobs in one status (uses the `(task_id, status)` index).
    pub fn jobs_of_task_in(&self, task_id: i64, status: &str) -> Result<Vec<Job>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE task_id = ?1 AND status = ?2 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map(params![task_id, status], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn has_active_job(&self, task_id: i64) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE task_id = ?1 AND status IN ('queued', 'running'))",
            )?
            .query_row([task_id], |r| r.get(0))?)
    }

    pub fn has_running_job(&self, task_id: i64) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE task_id = ?1 AND status = 'running')",
            )?
            .query_row([task_id], |r| r.get(0))?)
    }

    /// Every running job, oldest first.
    pub fn running_jobs(&self) -> Result<Vec<Job>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE status = 'running' ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading running jobs")?;
        Ok(rows)
    }

    /// Seconds since a job was claimed (None when it has no claim time). A row set
    /// `running` by another tool (the seed's plain SQL) may carry no `claimed_at`: its
    /// `created_at` is then the best bound on when the run began.
    pub fn seconds_since_claim(&self, job_id: i64) -> Result<Option<f64>> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT (julianday('now') - julianday(coalesce(claimed_at, created_at))) * 86400.0
                 FROM jobs WHERE id = ?1",
            )?
            .query_row([job_id], |r| r.get::<_, Option<f64>>(0))
            .optional()?
            .flatten())
    }

    pub fn lease(&self, repo: &str) -> Result<Option<Lease>> {
        self.c
            .prepare_cached(
                "SELECT repo, branch, task_id, acquired_at FROM merge_leases WHERE repo = ?1",
            )?
            .query_row([repo], lease_row)
            .optional()
            .with_context(|| format!("reading the merge lease of {repo}"))
    }

    pub fn leases(&self) -> Result<Vec<Lease>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT repo, branch, task_id, acquired_at FROM merge_leases ORDER BY repo",
        )?;
        let rows = stmt
            .query_map([], lease_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Leases whose holder is missing or terminal (reconcile frees them).
    pub fn orphaned_leases(&self) -> Result<Vec<Lease>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT l.repo, l.branch, l.task_id, l.acquired_at FROM merge_leases l
             LEFT JOIN tasks t ON t.id = l.task_id
             WHERE t.id IS NULL OR t.stage IN ('done', 'cancelled')
             ORDER BY l.repo",
        )?;
        let rows = stmt
            .query_map([], lease_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The deploy marker state for a work item of a repo (`initiated`), if any.
    pub fn marker(&self, repo: &str, work_item_id: &str) -> Result<Option<String>> {
        self.c
            .prepare_cached(
                "SELECT state FROM deploy_markers WHERE repo = ?1 AND work_item_id = ?2",
            )?
            .query_row([repo, work_item_id], |r| r.get(0))
            .optional()
            .context("reading a deploy marker")
    }

    pub fn deps_of(&self, task_id: i64) -> Result<Vec<i64>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT depends_on FROM task_deps WHERE task_id = ?1 ORDER BY depends_on",
        )?;
        let rows = stmt
            .query_map([task_id], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        Ok(rows)
    }

    /// Live tasks (not terminal), oldest first.
    pub fn live_tasks(&self) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE stage NOT IN ('done', 'cancelled') ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Tasks that are `done` or `cancelled` (kept by triggers: constant time).
    pub fn count_terminal_tasks(&self) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT coalesce(sum(n), 0) FROM task_counts WHERE stage IN ('done', 'cancelled')",
            )?
            .query_row([], |r| r.get(0))?)
    }

    pub fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>> {
        self.c
            .prepare_cached(&format!("SELECT {OUTBOX_COLS} FROM outbox WHERE id = ?1"))?
            .query_row([id], outbox_row)
            .optional()
            .context("reading an outbox row")
    }

    /// The task's side effects still waiting, in the order they were written.
    pub fn pending_effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox WHERE task_id = ?1 AND status = 'pending' ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([task_id], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox WHERE task_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([task_id], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Pending side effects whose retry time has come, oldest first.
    pub fn due_effects(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        // `status <> 'done'` repeats the condition of the partial index `outbox_status`:
        // SQLite uses a partial index only when the query states its condition, and
        // without it this reads the whole outbox (one row per side effect ever run).
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox
             WHERE status = 'pending' AND status <> 'done'
               AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW_SQL})
             ORDER BY id LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Side effects not done (pending or failed), newest first.
    pub fn open_effects(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        // `status <> 'done'` repeats the partial index's condition so the planner may use
        // it: otherwise this scans every side effect ever run.
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox
             WHERE status IN ('pending', 'failed') AND status <> 'done'
             ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// How many side effects are `pending` or `failed` (never counts `done`).
    pub fn count_effects(&self, status: &str) -> Result<i64> {
        Ok(self
            .c
            // See open_effects: a bound status alone cannot use the partial index.
            .prepare_cached("SELECT count(*) FROM outbox WHERE status = ?1 AND status <> 'done'")?
            .query_row([status], |r| r.get(0))?)
    }

    /// Job counts by status (kept by triggers: constant time).
    pub fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT status, n FROM job_counts WHERE n <> 0 ORDER BY status")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The newest jobs (by id: no scan of the history).
    pub fn recent_jobs(&self, limit: i64) -> Result<Vec<Job>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Whether the task has a `pending` effect of `kind` written before row `before`.
    pub fn pending_effect_before(&self, task_id: i64, kind: &str, before: i64) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM outbox
                  WHERE task_id = ?1 AND id < ?3 AND kind = ?2 AND status = 'pending')",
            )?
            .query_row(params![task_id, kind, before], |r| r.get(0))?)
    }

    /// Whether any task dependency was ever recorded.
    pub fn has_deps(&self) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM task_deps)")?
            .query_row([], |r| r.get(0))?)
    }

    /// Tasks in `stage` (kept by triggers: constant time).
    pub fn count_tasks_in_stage(&self, stage: &str) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached("SELECT coalesce((SELECT n FROM task_counts WHERE stage = ?1), 0)")?
            .query_row([stage], |r| r.get(0))?)
    }

    /// The most recently cancelled tasks.
    pub fn recent_cancelled(&self, limit: i64) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE cancelled_at IS NOT NULL
             ORDER BY cancelled_at DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Whether a Plane delivery body (by SHA-256) was handled already.
    pub fn delivery_seen(&self, body_sha256: &str) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM plane_deliveries WHERE body_sha256 = ?1)")?
            .query_row([body_sha256], |r| r.get(0))?)
    }

    /// A cached Plane state name.
    pub fn plane_state_name(&self, project_id: &str, state_id: &str) -> Result<Option<String>> {
        self.c
            .prepare_cached(
                "SELECT name FROM plane_states WHERE project_id = ?1 AND state_id = ?2",
            )?
            .query_row([project_id, state_id], |r| r.get(0))
            .optional()
            .context("reading the Plane state cache")
    }

    /// Whether any state of the project is cached.
    pub fn plane_states_cached(&self, project_id: &str) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM plane_states WHERE project_id = ?1)")?
            .query_row([project_id], |r| r.get(0))?)
    }

    pub fn plane_project_identifier(&self, project_id: &str) -> Result<Option<String>> {
        self.c
            .prepare_cached("SELECT identifier FROM plane_projects WHERE project_id = ?1")?
            .query_row([project_id], |r| r.get(0))
            .optional()
            .context("reading the Plane project cache")
    }
}

impl<'c> Writer<'c> {
    /// Appends one row to the task's audit trail.
    pub fn event(&self, task_id: Option<i64>, kind: &str, detail: &Value) -> Result<()> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO task_events (task_id, at, kind, detail) VALUES (?1, {NOW_SQL}, ?2, ?3)"
            ))?
            .execute(params![task_id, kind, detail.to_string()])
            .with_context(|| format!("recording event {kind}"))?;
        Ok(())
    }

    pub fn insert_task(&self, t: &NewTask) -> Result<i64> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO tasks (plane_id, work_item_id, plane_issue_id, project_id, repo, branch,
                                    title, stage, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, {NOW_SQL}, {NOW_SQL})"
            ))?
            .execute(params![
                t.plane_id,
                t.work_item_id,
                t.plane_issue_id,
                t.project_id,
                t.repo,
                t.branch,
                t.title,
                t.stage
            ])?;
        Ok(self.c.last_insert_rowid())
    }

    pub fn add_dep(&self, task_id: i64, depends_on: i64) -> Result<()> {
        self.c
            .prepare_cached(
                "INSERT OR IGNORE INTO task_deps (task_id, depends_on) VALUES (?1, ?2)",
            )?
            .execute([task_id, depends_on])
            .context("recording a dependency")?;
        Ok(())
    }

    pub fn insert_job(&self, task_id: Option<i64>, agent: &str, repo: &str) -> Result<i64> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO jobs (agent, repo, task_id, status, created_at)
                 VALUES (?1, ?2, ?3, 'queued', {NOW_SQL})"
            ))?
            .execute(params![agent, repo, task_id])
            .context("queueing a job")?;
        Ok(self.c.last_insert_rowid())
    }

    /// Moves a live task from `from` to `to`; false when it was not in `from` any more.
    pub fn set_stage(&self, task_id: i64, from: Stage, to: Stage) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE tasks SET stage = ?3, updated_at = {NOW_SQL}
                 WHERE id = ?1 AND stage = ?2 AND stage NOT IN ('done', 'cancelled')"
            ))?
            .execute(params![task_id, from, to])?;
        Ok(n == 1)
    }

    /// Cancels the task's queued (and, unless `only_queued`, running) jobs; returns them as
    /// they were before the change (pids and run ids intact, for stopping the processes).
    pub fn cancel_jobs_for_task(
        &self,
        task_id: i64,
        only_queued: bool,
        reason: &str,
    ) -> Result<Vec<Job>> {
        let statuses: &[&str] = if only_queued {
            &["queued"]
        } else {
            &["queued", "running"]
        };
        let mut cancelled: Vec<Job> = Vec::new();
        for status in statuses {
            cancelled.extend(self.jobs_of_task_in(task_id, status)?);
        }
        let mut upd = self.c.prepare_cached(&format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = {NOW_SQL},
                    error = coalesce(error, ?3)
             WHERE id = ?1 AND status = ?2"
        ))?;
        let mut done = Vec::with_capacity(cancelled.len());
        for j in cancelled {
            if upd.execute(params![j.id, j.status, reason])? == 1 {
                done.push(j);
            }
        }
        done.sort_by_key(|j| j.id);
        Ok(done)
    }

    /// Makes the task terminal `cancelled` and tombstones its keys (`<key>#cancelled-<id>`).
    /// False when it was already terminal.
    pub fn mark_task_cancelled(&self, task_id: i64, reason: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE tasks SET stage = 'cancelled', cancelled_at = {NOW_SQL},
                        updated_at = {NOW_SQL}, cancel_reason = ?2,
                        plane_id = CASE WHEN plane_id IS NULL OR instr(plane_id, '#cancelled-') > 0
                                        THEN plane_id ELSE plane_id || '#cancelled-' || id END,
                        work_item_id = CASE WHEN work_item_id IS NULL OR instr(work_item_id, '#cancelled-') > 0
                                        THEN work_item_id ELSE work_item_id || '#cancelled-' || id END,
                        plane_issue_id = CASE WHEN plane_issue_id IS NULL OR instr(plane_issue_id, '#cancelled-') > 0
                                        THEN plane_issue_id ELSE plane_issue_id || '#cancelled-' || id END
                 WHERE id = ?1 AND stage NOT IN ('done', 'cancelled')"
            ))?
            .execute(params![task_id, reason])?;
        Ok(n == 1)
    }

    /// Records a deferred cancel; false when one was already pending or the task is terminal.
    pub fn set_cancel_requested(&self, task_id: i64, reason: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE tasks SET cancel_requested_at = {NOW_SQL}, cancel_reason = ?2,
                        updated_at = {NOW_SQL}
                 WHERE id = ?1 AND cancel_requested_at IS NULL AND stage NOT IN ('done', 'cancelled')"
            ))?
            .execute(params![task_id, reason])?;
        Ok(n == 1)
    }

    /// Takes the repo's merge lease for `branch` when free.
    pub fn acquire_lease(&self, repo: &str, branch: &str, task_id: i64) -> Result<LeaseOutcome> {
        if let Some(l) = self.lease(repo)? {
            return Ok(if l.branch == branch {
                LeaseOutcome::AlreadyHeld
            } else {
                LeaseOutcome::HeldBy(l)
            });
        }
        self.c
            .prepare_cached(&format!(
                "INSERT INTO merge_leases (repo, branch, task_id, acquired_at)
                 VALUES (?1, ?2, ?3, {NOW_SQL})"
            ))?
            .execute(params![repo, branch, task_id])
            .with_context(|| format!("taking the merge lease of {repo}"))?;
        Ok(LeaseOutcome::Acquired)
    }

    /// Releases the repo's lease if `branch` holds it.
    pub fn release_lease(&self, repo: &str, branch: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached("DELETE FROM merge_leases WHERE repo = ?1 AND branch = ?2")?
            .execute([repo, branch])?;
        Ok(n == 1)
    }

    pub fn set_marker(
        &self,
        repo: &str,
        work_item_id: &str,
        state: &str,
        task_id: i64,
    ) -> Result<()> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO deploy_markers (repo, work_item_id, state, task_id, set_at)
                 VALUES (?1, ?2, ?3, ?4, {NOW_SQL})
                 ON CONFLICT(repo, work_item_id) DO UPDATE SET state = excluded.state,
                     task_id = excluded.task_id, set_at = excluded.set_at"
            ))?
            .execute(params![repo, work_item_id, state, task_id])
            .context("setting a deploy marker")?;
        Ok(())
    }

    pub fn clear_marker(&self, repo: &str, work_item_id: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached("DELETE FROM deploy_markers WHERE repo = ?1 AND work_item_id = ?2")?
            .execute([repo, work_item_id])?;
        Ok(n == 1)
    }

    /// Takes the oldest eligible queued job (SPEC §5) and starts a new run of it. For a
    /// `deployer` under the serial gate the repo's merge lease is taken in the same
    /// transaction.
    pub fn claim_next_job(&self, f: &ClaimFilter) -> Result<Option<Job>> {
        // What tasks wait for, settled first: another tool may have finished a dependency
        // since orchctl last wrote (the claimable index, store/claimable.rs).
        if f.task_deps {
            self.settle_waits()?;
        }
        let picked = self.oldest_claimable(f)?;
        let Some((job_id, branch)) = picked else {
            return Ok(None);
        };
        let job = self
            .c
            .prepare_cached(&format!(
                "UPDATE jobs SET status = 'running',
                        run_id = (SELECT coalesce(max(run_id), 0) + 1 FROM jobs),
                        attempts = attempts + 1, claimed_at = {NOW_SQL},
                        pid = NULL, proc_start = NULL, finished_at = NULL, held = NULL
                 WHERE id = ?1 AND status = 'queued'
                 RETURNING {JOB_COLS}"
            ))?
            .query_row([job_id], job_row)
            .optional()
            .context("claiming a job")?;
        if let (Some(j), true, Some(branch)) = (&job, f.serial_gate, branch) {
            if j.agent == "deployer" {
                if let Some(task_id) = j.task_id {
                    self.acquire_lease(&j.repo, &branch, task_id)?;
                }
            }
        }
        Ok(job)
    }

    /// Records the launched agent of a run; false when the run is no longer running.
    pub fn record_launch(
        &self,
        job_id: i64,
        run_id: i64,
        pid: i64,
        proc_start: i64,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(
                "UPDATE jobs SET pid = ?3, proc_start = ?4
                 WHERE id = ?1 AND run_id = ?2 AND status = 'running'",
            )?
            .execute(params![job_id, run_id, pid, proc_start])?;
        Ok(n == 1)
    }

    /// Ends a run as `done`, `failed` or `cancelled`; false when `run_id` is not the job's
    /// running run (stale).
    pub fn finish_run(
        &self,
        job_id: i64,
        run_id: i64,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE jobs SET status = ?3, finished_at = {NOW_SQL}, error = ?4
                 WHERE id = ?1 AND run_id = ?2 AND status = 'running'"
            ))?
            .execute(params![job_id, run_id, status, error])?;
        Ok(n == 1)
    }

    /// Puts a run's job back in the queue for another attempt (guarded like `finish_run`).
    pub fn requeue_run(
        &self,
        job_id: i64,
        run_id: Option<i64>,
        error: Option<&str>,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(
                "UPDATE jobs SET status = 'queued', pid = NULL, proc_start = NULL, error = ?3
                 WHERE id = ?1 AND run_id IS ?2 AND status = 'running'",
            )?
            .execute(params![job_id, run_id, error])?;
        Ok(n == 1)
    }

    /// Ends a running job whose run id may be unknown (rows written by other tools).
    pub fn finish_running(
        &self,
        job_id: i64,
        run_id: Option<i64>,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE jobs SET status = ?3, finished_at = {NOW_SQL}, error = ?4
                 WHERE id = ?1 AND run_id IS ?2 AND status = 'running'"
            ))?
            .execute(params![job_id, run_id, status, error])?;
        Ok(n == 1)
    }

    /// Writes a side effect to the outbox (executed after the commit).
    pub fn enqueue_effect(&self, task_id: Option<i64>, kind: &str, payload: &Value) -> Result<i64> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO outbox (task_id, kind, payload, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'pending', {NOW_SQL}, {NOW_SQL})"
            ))?
            .execute(params![task_id, kind, payload.to_string()])
            .with_context(|| format!("writing side effect {kind}"))?;
        Ok(self.c.last_insert_rowid())
    }

    /// Takes a pending side effect for execution by `owner` (pid, start time) for at most
    /// `lease_secs`. Guarded on the claim that was observed, so two processes never run the
    /// same effect at once; a crashed owner's claim is taken over by the caller.
    pub fn claim_effect(
        &self,
        id: i64,
        observed: (Option<i64>, Option<i64>),
        owner: (i64, i64),
        lease_secs: i64,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE outbox SET claimed_pid = ?4, claimed_start = ?5,
                        claimed_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || ?6 || ' seconds'),
                        attempts = attempts + 1, updated_at = {NOW_SQL}
                 WHERE id = ?1 AND status = 'pending'
                   AND ((claimed_pid IS ?2 AND claimed_start IS ?3) OR claimed_until < {NOW_SQL})"
            ))?
            .execute(params![id, observed.0, observed.1, owner.0, owner.1, lease_secs])?;
        Ok(n == 1)
    }

    /// Records how an effect claimed by `owner` ended.
    pub fn finish_effect(&self, id: i64, owner: (i64, i64), end: &EffectEnd) -> Result<bool> {
        let (status, result, error, delay): (&str, Option<&str>, Option<&str>, Option<i64>) =
            match end {
                EffectEnd::Done { result } => ("done", Some(result), None, None),
                EffectEnd::Retry { error, delay_secs } => {
                    ("pending", None, Some(error), Some(*delay_secs))
                }
                EffectEnd::Failed { error } => ("failed", None, Some(error), None),
            };
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE outbox SET status = ?4, result = coalesce(?5, result), last_error = ?6,
                        next_attempt_at = CASE WHEN ?7 IS NULL THEN NULL
                            ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || ?7 || ' seconds') END,
                        claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                        updated_at = {NOW_SQL}
                 WHERE id = ?1 AND claimed_pid = ?2 AND claimed_start = ?3"
            ))?
            .execute(params![id, owner.0, owner.1, status, result, error, delay])?;
        Ok(n == 1)
    }

    /// Marks a pending effect failed without running it (attempts exhausted).
    pub fn fail_effect(&self, id: i64, error: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE outbox SET status = 'failed', last_error = ?2, updated_at = {NOW_SQL},
                        claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL
                 WHERE id = ?1 AND status = 'pending'"
            ))?
            .execute(params![id, error])?;
        Ok(n == 1)
    }

    /// Remembers a handled Plane delivery; false when the body was handled before.
    pub fn record_delivery(
        &self,
        body_sha256: &str,
        delivery_id: Option<&str>,
        event: Option<&str>,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "INSERT OR IGNORE INTO plane_deliveries (body_sha256, delivery_id, event, action, task_id, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, {NOW_SQL})"
            ))?
            .execute(params![body_sha256, delivery_id, event, action, task_id])?;
        Ok(n == 1)
    }

    /// Replaces the cached states of a Plane project.
    pub fn cache_plane_states(
        &self,
        project_id: &str,
        states: &[(String, String, Option<String>)],
    ) -> Result<()> {
        self.c
            .prepare_cached("DELETE FROM plane_states WHERE project_id = ?1")?
            .execute([project_id])?;
        let mut ins = self.c.prepare_cached(&format!(
            "INSERT OR REPLACE INTO plane_states (project_id, state_id, name, state_group, fetched_at)
             VALUES (?1, ?2, ?3, ?4, {NOW_SQL})"
        ))?;
        for (id, name, group) in states {
            ins.execute(params![project_id, id, name, group])?;
        }
        Ok(())
    }

    pub fn cache_plane_project(&self, project_id: &str, identifier: &str) -> Result<()> {
        self.c
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO plane_projects (project_id, identifier, fetched_at)
                 VALUES (?1, ?2, {NOW_SQL})"
            ))?
            .execute([project_id, identifier])?;
        Ok(())
    }
}
