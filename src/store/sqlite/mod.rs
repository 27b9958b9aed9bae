//! The SQLite backend (SPEC §2): one file, opened with its pragmas (WAL, foreign keys,
//! busy timeout, `synchronous=FULL`), migrated in one transaction, refused untouched when
//! a newer binary wrote it. Every write is one `BEGIN IMMEDIATE` transaction: SQLite's
//! single writer is what makes each compound method of the seam atomic here (a claim's
//! choice and update, a run id of `max + 1`, a lease's check and insert). Timestamps are
//! the database clock's, as ISO-8601 text with milliseconds.
//!
//! Each aggregate of the seam is implemented in a file of its own on [`SqliteTx`].

mod claimable;
mod fallback;
mod hosts;
mod jobs;
mod leases;
mod live;
mod outbox;
mod plane;
pub mod schema;
mod tasks;
mod vocab;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, Row};
use serde_json::Value;

use super::{Error as StoreError, LiveWrites, MigrateReport, Reader, Writer};
use crate::model::{Job, Lease, OutboxRow, Task};

pub const NOW_SQL: &str = "strftime('%Y-%m-%dT%H:%M:%fZ','now')";

pub(super) const TASK_COLS: &str =
    "id, plane_id, work_item_id, plane_issue_id, project_id, repo, branch, \
    title, stage, created_at, updated_at, cancelled_at, cancel_requested_at, cancel_reason";
pub(super) const JOB_COLS: &str =
    "id, agent, repo, task_id, status, pid, proc_start, run_id, attempts, \
    max_attempts, created_at, claimed_at, finished_at, error, host, boot_id";
pub(super) const OUTBOX_COLS: &str =
    "id, task_id, kind, payload, status, attempts, last_error, result, \
    next_attempt_at, created_at, claimed_pid, claimed_start, claimed_until, claimed_host, host";

pub(super) fn task_row(r: &Row) -> rusqlite::Result<Task> {
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

pub(super) fn job_row(r: &Row) -> rusqlite::Result<Job> {
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
        host: r.get(14)?,
        boot_id: r.get(15)?,
    })
}

pub(super) fn json_col(text: Option<String>) -> Value {
    match text {
        Some(t) => serde_json::from_str(&t).unwrap_or(Value::String(t)),
        None => Value::Null,
    }
}

pub(super) fn outbox_row(r: &Row) -> rusqlite::Result<OutboxRow> {
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
        claimed_host: r.get(13)?,
        host: r.get(14)?,
    })
}

pub(super) fn lease_row(r: &Row) -> rusqlite::Result<Lease> {
    Ok(Lease {
        repo: r.get(0)?,
        branch: r.get(1)?,
        task_id: r.get(2)?,
        acquired_at: r.get(3)?,
    })
}

/// One connection's view inside a read or a write: what the seam's traits are implemented
/// on. The store hands it out as a [`Reader`] outside a transaction and as a [`Writer`]
/// only inside `BEGIN IMMEDIATE`.
pub struct SqliteTx<'c> {
    c: &'c Connection,
}

/// Marks a failure that decides an exit code with its [`StoreError`]: a database still
/// busy or locked past the busy timeout, a unique key taken.
fn classify(err: anyhow::Error) -> anyhow::Error {
    if StoreError::of(&err).is_some() {
        return err;
    }
    let kind = err
        .chain()
        .find_map(|c| match c.downcast_ref::<rusqlite::Error>() {
            Some(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked => {
                    Some(StoreError::Busy)
                }
                rusqlite::ErrorCode::ConstraintViolation
                    if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                        || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                {
                    Some(StoreError::Conflict)
                }
                _ => None,
            },
            _ => None,
        });
    match kind {
        Some(k) => err.context(k),
        None => err,
    }
}

/// An open SQLite database.
pub struct SqliteStore {
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

impl SqliteStore {
    /// Opens (creating when missing) and migrates the database at `path`.
    pub fn open(path: &Path, busy_timeout_ms: u64) -> Result<SqliteStore> {
        SqliteStore::open_inner(path, busy_timeout_ms).map_err(classify)
    }

    fn open_inner(path: &Path, busy_timeout_ms: u64) -> Result<SqliteStore> {
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
        let mut store = SqliteStore {
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
            return Err(anyhow::Error::new(StoreError::NewerSchema {
                found: version,
                known: schema::current_version(),
            })
            .context(format!("database {}", self.path.display())));
        }
        Ok(())
    }

    /// Applies every pending migration in one transaction; a failure rolls back whole.
    pub fn migrate(&self) -> Result<MigrateReport> {
        self.transaction(|tx| {
            let from =
                tx.c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?;
            self.check_not_newer(from)?;
            for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(from as usize) {
                m(tx.c).with_context(|| format!("migration {} failed", i + 1))?;
            }
            let to = schema::current_version();
            tx.c.pragma_update(None, "user_version", to)?;
            Ok(MigrateReport { from, to })
        })
        .map_err(classify)
    }

    /// Runs `f` outside any explicit transaction (each statement sees a committed state).
    pub fn read<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        f(&SqliteTx { c: &self.conn }).map_err(classify)
    }

    /// Runs `f` inside one read transaction, so every statement sees the same committed
    /// state (a scrape's families must add up: a job moving from `queued` to `running`
    /// between two statements would otherwise be counted twice or not at all). In WAL
    /// mode a reader never blocks a writer.
    pub fn read_snapshot<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .context("starting a read transaction")
            .map_err(classify)?;
        let out = f(&SqliteTx { c: &self.conn });
        // A read transaction has nothing to commit; ending it cannot lose anything.
        let _ = self.conn.execute_batch("COMMIT");
        out.map_err(classify)
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction: committed when `f` returns `Ok`,
    /// rolled back otherwise. SQLite's single writer never makes a transaction lose a
    /// race, so `f` runs once.
    pub fn write<T>(&self, mut f: impl FnMut(&Writer) -> Result<T>) -> Result<T> {
        self.transaction(|tx| {
            let v = f(tx)?;
            // What tasks wait for follows every change in the same transaction.
            tx.settle_waits()?;
            Ok(v)
        })
        .map_err(classify)
    }

    fn transaction<T>(&self, f: impl FnOnce(&SqliteTx) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .context("starting a write transaction")?;
        match f(&SqliteTx { c: &self.conn }) {
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

    /// Runs `f` in a write transaction that is always rolled back: what a change would do,
    /// seen with the locks and the rules of the real one (`dispatch --dry-run`). Atomicity:
    /// nothing `f` writes is ever committed.
    pub fn write_rolled_back<T>(&self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .context("starting a write transaction")
            .map_err(classify)?;
        let out = f(&SqliteTx { c: &self.conn });
        let _ = self.conn.execute_batch("ROLLBACK");
        out.map_err(classify)
    }

    /// Settles, in a write transaction of its own, the tasks whose rows other tools
    /// changed since orchctl last wrote (a bulk load, a seed test's plain SQL); returns how
    /// many. `orchctl migrate` runs it; any other write command settles them as well.
    pub fn settle_waits(&self) -> Result<usize> {
        let any: bool = self
            .conn
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM task_waits_stale)")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .context("reading the tasks whose waits are stale")
            .map_err(classify)?;
        if !any {
            return Ok(0);
        }
        self.write(|w| w.settle_waits())
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

    /// The raw connection, for the query-plan tests and the benchmark (never the domain).
    #[doc(hidden)]
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
