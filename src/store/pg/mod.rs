//! The PostgreSQL backend (SPEC §12): one database shared by every agent host.
//!
//! Every command holds one connection (a Unix socket or TCP, TLS by `sslmode`). Reads run
//! statement by statement; every write is one READ COMMITTED transaction in which nothing
//! leans on a single writer:
//! - a transaction that reads a task in order to change it locks that task's row first
//!   (`FOR NO KEY UPDATE`; a job read for a write locks its task before the job), so two
//!   commands deciding about one task never interleave, and rows are locked task before
//!   job;
//! - a claim walks the queue with `FOR UPDATE OF j SKIP LOCKED` and locks no task (it reads
//!   the task without a lock, `peek_task`), so claimers never wait for each other or for a
//!   STOP and never take the same job; a STOP's cancel waits for the claim's commit and then
//!   finds the job running; the run id comes from the sequence `run_ids`;
//! - a lease, a task's keys and a delivery's record are `INSERT … ON CONFLICT DO NOTHING`:
//!   of two concurrent writers of one key exactly one inserts, the other waits for it and
//!   then sees the row;
//! - slot-bounded claims of one host are serialised by a transaction-scoped advisory lock;
//! - a transaction that loses a deadlock or a serialization race is rolled back and run
//!   again whole (a few times, then exit 75).
//!
//! All timestamps come from the database clock (`orch_now()`), as the same ISO-8601 text
//! SQLite stores, so JSON output is identical on both backends. Lock and statement waits
//! are bounded by `ORCH_BUSY_TIMEOUT_MS` (exit 75 past it). Statements are sent with their
//! parameter types (`query_typed`): one round trip each, no prepare.

mod hosts;
mod jobs;
mod leases;
mod live;
mod outbox;
mod plane;
mod schema;
mod tasks;

use std::cell::RefCell;
use std::time::Duration;

use anyhow::{Context, Result};
use postgres::types::{ToSql, Type};
use postgres::{Client, IsolationLevel, Row, Transaction};

use super::{Error as StoreError, Reader, Writer};
use crate::error::config_err;
use crate::model::{Job, Lease, OutboxRow, Task};

/// How many times a transaction that lost a deadlock or a serialization race is run again.
const WRITE_ATTEMPTS: u32 = 6;

/// An open PostgreSQL database.
pub struct PgStore {
    client: RefCell<Client>,
    /// The database, for people (no password).
    describe: String,
    opened_version: i64,
    created: bool,
}

/// The connection as a read sees it (statement by statement) or inside a transaction.
enum Conn<'a> {
    Client(&'a mut Client),
    Tx(Transaction<'a>),
}

/// One connection's view inside a read or a write: what the seam's traits are implemented
/// on. `write` is set only inside a write transaction, where reads of a task lock it.
pub struct PgTx<'a> {
    conn: RefCell<Conn<'a>>,
    write: bool,
}

/// A statement parameter with the PostgreSQL type it is sent as.
pub(super) trait Param: ToSql + Sync {
    const TYPE: Type;
}

impl Param for i64 {
    const TYPE: Type = Type::INT8;
}
impl Param for Option<i64> {
    const TYPE: Type = Type::INT8;
}
impl Param for f64 {
    const TYPE: Type = Type::FLOAT8;
}
impl Param for bool {
    const TYPE: Type = Type::BOOL;
}
impl Param for &str {
    const TYPE: Type = Type::TEXT;
}
impl Param for String {
    const TYPE: Type = Type::TEXT;
}
impl Param for Option<&str> {
    const TYPE: Type = Type::TEXT;
}
impl Param for Option<String> {
    const TYPE: Type = Type::TEXT;
}
impl Param for Vec<String> {
    const TYPE: Type = Type::TEXT_ARRAY;
}
impl Param for Vec<i64> {
    const TYPE: Type = Type::INT8_ARRAY;
}

pub(super) type Typed<'p> = (&'p (dyn ToSql + Sync), Type);

pub(super) fn p<T: Param>(v: &T) -> Typed<'_> {
    (v, T::TYPE)
}

/// The parameters of a statement, each with its type: `params![a, b]`.
macro_rules! params {
    () => { &[] as &[$crate::store::pg::Typed<'_>] };
    ($($v:expr),+ $(,)?) => { &[$($crate::store::pg::p(&$v)),+] as &[$crate::store::pg::Typed<'_>] };
}
pub(super) use params;

pub(super) const TASK_COLS: &str =
    "id, plane_id, work_item_id, plane_issue_id, project_id, repo, branch, \
    title, stage, created_at, updated_at, cancelled_at, cancel_requested_at, cancel_reason";
pub(super) const JOB_COLS: &str =
    "id, agent, repo, task_id, status, pid, proc_start, run_id, attempts, \
    max_attempts, created_at, claimed_at, finished_at, error, host, boot_id";
pub(super) const OUTBOX_COLS: &str =
    "id, task_id, kind, payload, status, attempts, last_error, result, \
    next_attempt_at, created_at, claimed_pid, claimed_start, claimed_until, claimed_host, host";

/// A stage, status or other word of the pipeline read from a text column.
pub(super) fn word<T: std::str::FromStr>(row: &Row, i: usize) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.try_get(i)?;
    text.parse::<T>()
        .map_err(|e| anyhow::anyhow!("column {i}: {e}"))
}

pub(super) fn task_row(r: &Row) -> Result<Task> {
    Ok(Task {
        id: r.try_get(0)?,
        plane_id: r.try_get(1)?,
        work_item_id: r.try_get(2)?,
        plane_issue_id: r.try_get(3)?,
        project_id: r.try_get(4)?,
        repo: r.try_get(5)?,
        branch: r.try_get(6)?,
        title: r.try_get(7)?,
        stage: word(r, 8)?,
        created_at: r.try_get(9)?,
        updated_at: r.try_get(10)?,
        cancelled_at: r.try_get(11)?,
        cancel_requested_at: r.try_get(12)?,
        cancel_reason: r.try_get(13)?,
    })
}

pub(super) fn job_row(r: &Row) -> Result<Job> {
    Ok(Job {
        id: r.try_get(0)?,
        agent: r.try_get(1)?,
        repo: r.try_get(2)?,
        task_id: r.try_get(3)?,
        status: word(r, 4)?,
        pid: r.try_get(5)?,
        proc_start: r.try_get(6)?,
        run_id: r.try_get(7)?,
        attempts: r.try_get(8)?,
        max_attempts: r.try_get(9)?,
        created_at: r.try_get(10)?,
        claimed_at: r.try_get(11)?,
        finished_at: r.try_get(12)?,
        error: r.try_get(13)?,
        host: r.try_get(14)?,
        boot_id: r.try_get(15)?,
    })
}

pub(super) fn json_col(text: Option<String>) -> serde_json::Value {
    match text {
        Some(t) => serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)),
        None => serde_json::Value::Null,
    }
}

pub(super) fn outbox_row(r: &Row) -> Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.try_get(0)?,
        task_id: r.try_get(1)?,
        kind: r.try_get(2)?,
        payload: json_col(r.try_get(3)?),
        status: r.try_get(4)?,
        attempts: r.try_get(5)?,
        last_error: r.try_get(6)?,
        result: r.try_get(7)?,
        next_attempt_at: r.try_get(8)?,
        created_at: r.try_get(9)?,
        claimed_pid: r.try_get(10)?,
        claimed_start: r.try_get(11)?,
        claimed_until: r.try_get(12)?,
        claimed_host: r.try_get(13)?,
        host: r.try_get(14)?,
    })
}

pub(super) fn lease_row(r: &Row) -> Result<Lease> {
    Ok(Lease {
        repo: r.try_get(0)?,
        branch: r.try_get(1)?,
        task_id: r.try_get(2)?,
        acquired_at: r.try_get(3)?,
    })
}

impl PgTx<'_> {
    /// Runs `sql` and returns its rows.
    pub(super) fn rows(&self, sql: &str, params: &[Typed<'_>]) -> Result<Vec<Row>> {
        let mut conn = self.conn.borrow_mut();
        let out = match &mut *conn {
            Conn::Client(c) => c.query_typed(sql, params),
            Conn::Tx(t) => t.query_typed(sql, params),
        };
        Ok(out?)
    }

    /// Runs `sql` and returns its first row, if any.
    pub(super) fn opt(&self, sql: &str, params: &[Typed<'_>]) -> Result<Option<Row>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }

    /// Runs `sql`, which returns exactly one row.
    pub(super) fn one(&self, sql: &str, params: &[Typed<'_>]) -> Result<Row> {
        self.opt(sql, params)?
            .context("a statement that returns one row returned none")
    }

    /// Runs `sql` and returns how many rows it changed.
    pub(super) fn exec(&self, sql: &str, params: &[Typed<'_>]) -> Result<u64> {
        let mut conn = self.conn.borrow_mut();
        // `execute` would prepare first (a round trip more): the typed query reports the
        // rows it changed through its command tag, which `query_typed_raw` gives.
        let out = match &mut *conn {
            Conn::Client(c) => c
                .query_typed_raw(sql, params.iter().cloned())
                .and_then(drain),
            Conn::Tx(t) => t
                .query_typed_raw(sql, params.iter().cloned())
                .and_then(drain),
        };
        Ok(out?)
    }

    /// `" FOR NO KEY UPDATE"` inside a write transaction (a read there is made to decide a
    /// change: the row is locked until the commit), nothing in a read. Not `FOR UPDATE`:
    /// the foreign-key checks of rows other transactions insert for the task (a claim's
    /// audit row, a launch's) take a key-share lock, which this one lets through, so a
    /// claim holding a job never waits behind a STOP that waits for that job.
    pub(super) fn lock(&self) -> &'static str {
        if self.write {
            " FOR NO KEY UPDATE"
        } else {
            ""
        }
    }
}

/// Reads a typed query's rows to the end and returns how many rows it changed.
fn drain(mut rows: postgres::RowIter<'_>) -> Result<u64, postgres::Error> {
    use fallible_iterator::FallibleIterator;
    while rows.next()?.is_some() {}
    Ok(rows.rows_affected().unwrap_or(0))
}

/// The SQLSTATE of a PostgreSQL error in `err`'s chain.
fn sqlstate(err: &anyhow::Error) -> Option<&postgres::error::SqlState> {
    err.chain()
        .find_map(|c| c.downcast_ref::<postgres::Error>())
        .and_then(|e| e.code())
}

/// Whether running the transaction again may succeed: it lost a deadlock or a
/// serialization race.
fn retryable(err: &anyhow::Error) -> bool {
    use postgres::error::SqlState;
    matches!(
        sqlstate(err),
        Some(s) if *s == SqlState::T_R_SERIALIZATION_FAILURE || *s == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// Marks a failure that decides an exit code with its [`StoreError`].
fn classify(err: anyhow::Error) -> anyhow::Error {
    use postgres::error::SqlState;
    if StoreError::of(&err).is_some() {
        return err;
    }
    let pg = err
        .chain()
        .find_map(|c| c.downcast_ref::<postgres::Error>());
    // Text PostgreSQL cannot store (a NUL byte) is bad input, as SQLite's refusals are.
    if let Some(s) = pg.and_then(|e| e.code()) {
        if *s == SqlState::CHARACTER_NOT_IN_REPERTOIRE || *s == SqlState::UNTRANSLATABLE_CHARACTER {
            return err.context(crate::error::Coded::new(
                crate::error::ExitKind::DataErr,
                "text with a NUL byte cannot be stored in PostgreSQL",
            ));
        }
    }
    let kind = match pg.and_then(|e| e.code()) {
        Some(s)
            if *s == SqlState::LOCK_NOT_AVAILABLE
                || *s == SqlState::QUERY_CANCELED
                || *s == SqlState::T_R_SERIALIZATION_FAILURE
                || *s == SqlState::T_R_DEADLOCK_DETECTED
                || *s == SqlState::TOO_MANY_CONNECTIONS
                || *s == SqlState::CANNOT_CONNECT_NOW
                || *s == SqlState::ADMIN_SHUTDOWN =>
        {
            Some(StoreError::Busy)
        }
        Some(s) if *s == SqlState::UNIQUE_VIOLATION => Some(StoreError::Conflict),
        Some(_) => None,
        // No SQLSTATE: the server could not be reached or the connection broke (temporary);
        // anything else — a configuration the client refuses, a value of another type — is
        // not a reason to retry.
        None if pg.is_some_and(unreachable) => Some(StoreError::Busy),
        None => None,
    };
    match kind {
        Some(k) => err.context(k),
        None => err,
    }
}

/// Whether a client error says the server could not be reached, or the connection broke.
fn unreachable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The URL as the client library reads it, and whether the server's certificate must be
/// verified: `sslmode=verify-full` (and `verify-ca`) are libpq's, which the library does not
/// parse — they are taken out here and mean `require` plus a verified certificate.
fn parse_url(url: &str) -> Result<(postgres::Config, bool, Option<String>)> {
    // Only the URL forms: libpq's key/value form would carry a password where the scrubbing
    // of outputs and of the agents' environment does not look for one.
    let url = url.trim();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(config_err(
            "ORCH_DB_URL / --db-url must be a postgres:// or postgresql:// URL",
        ));
    }
    let mut verify = false;
    let mut root_cert = None;
    let cleaned = match url.split_once('?') {
        Some((base, query)) => {
            let mut kept = Vec::new();
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("sslmode", "verify-full" | "verify-ca")) => {
                        verify = true;
                        kept.push("sslmode=require".to_string());
                    }
                    Some(("sslrootcert", file)) => {
                        root_cert = Some(
                            percent_encoding::percent_decode_str(file)
                                .decode_utf8_lossy()
                                .into_owned(),
                        );
                    }
                    _ => kept.push(kv.to_string()),
                }
            }
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        None => url.to_string(),
    };
    // Never echo the URL: it may hold a password.
    let config = cleaned.parse::<postgres::Config>().map_err(|e| {
        config_err(format!(
            "ORCH_DB_URL / --db-url is not a PostgreSQL URL libpq would read ({})",
            crate::config::scrub_text(
                &crate::config::url_passwords(url)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
                &e.to_string()
            )
        ))
    })?;
    Ok((config, verify, root_cert))
}

/// The database, for people: `postgresql://user@host:port/db`, never a password.
fn describe(config: &postgres::Config) -> String {
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or("");
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(postgres::config::Host::Unix(p)) => {
            format!("postgresql://{user}@/{db}?host={}", p.display())
        }
        Some(postgres::config::Host::Tcp(h)) => format!("postgresql://{user}@{h}:{port}/{db}"),
        None => format!("postgresql://{user}@localhost:{port}/{db}"),
    }
}

impl PgStore {
    /// Connects to the database `url` names, refuses one written by a newer orchctl without
    /// writing anything, applies pending migrations, and records this host as seen.
    pub fn open(
        url: &str,
        password: Option<&str>,
        busy_timeout_ms: u64,
        host: &str,
        boot_id: Option<&str>,
    ) -> Result<PgStore> {
        let (mut config, verify, root_cert) = parse_url(url)?;
        if config.get_password().is_none() {
            if let Some(pw) = password {
                config.password(pw);
            }
        }
        if config.get_user().is_none() {
            // libpq's default: the operating system user.
            if let Some(u) = std::env::var_os("USER").and_then(|u| u.into_string().ok()) {
                config.user(&u);
            }
        }
        // Waits for a lock or a statement are bounded like SQLite's busy timeout (0 would
        // mean "forever" here: the shortest wait stands in for it).
        let wait = busy_timeout_ms.max(1);
        let options = format!(
            "{} -c lock_timeout={wait} -c statement_timeout={} -c idle_in_transaction_session_timeout=0 -c TimeZone=UTC",
            config.get_options().unwrap_or(""),
            // A statement may wait for locks up to the timeout, then work: twice that.
            wait.saturating_mul(2)
        );
        config.options(options.trim());
        config.application_name("orchctl");
        config.connect_timeout(Duration::from_millis(busy_timeout_ms.clamp(1000, 30_000)));
        let describe = describe(&config);
        let client = connect(&config, verify, root_cert.as_deref()).map_err(|e| {
            let e = classify(e);
            auth_or_missing(e, &describe)
        })?;
        let mut store = PgStore {
            client: RefCell::new(client),
            describe,
            opened_version: 0,
            created: false,
        };
        let version = store.schema_version()?;
        store.opened_version = version;
        if version > schema::current_version() {
            return Err(anyhow::Error::new(StoreError::NewerSchema {
                found: version,
                known: schema::current_version(),
            })
            .context(format!("database {}", store.describe)));
        }
        if version < schema::current_version() {
            store.migrate()?;
            store.created = version == 0;
        }
        store.heartbeat(host, boot_id)?;
        Ok(store)
    }

    /// The schema version the database has (0 before the first migration).
    pub fn schema_version(&self) -> Result<i64> {
        let mut client = self.client.borrow_mut();
        let rows = match client.simple_query("SELECT version FROM orchctl_schema") {
            Ok(rows) => rows,
            // No schema yet: a new database.
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => {
                return Ok(0)
            }
            Err(e) => {
                return Err(classify(anyhow::Error::new(e)))
                    .with_context(|| format!("reading the schema version of {}", self.describe))
            }
        };
        let version = rows.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<i64>().ok()),
            _ => None,
        });
        Ok(version.unwrap_or(0))
    }

    fn migrate(&self) -> Result<()> {
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction()?;
        // One migrator at a time: the others wait, then find the schema current.
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({});",
            schema::MIGRATION_LOCK
        ))?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('orchctl_schema') IS NOT NULL", &[])?
            .get(0);
        let from: i64 = if exists {
            tx.query_opt("SELECT version FROM orchctl_schema", &[])?
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
        } else {
            0
        };
        if from > schema::current_version() {
            return Err(anyhow::Error::new(StoreError::NewerSchema {
                found: from,
                known: schema::current_version(),
            })
            .context(format!("database {}", self.describe)));
        }
        for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(from as usize) {
            tx.batch_execute(m)
                .with_context(|| format!("PostgreSQL migration {} failed", i + 1))?;
        }
        tx.execute(
            "UPDATE orchctl_schema SET version = $1",
            &[&schema::current_version()],
        )?;
        tx.commit().context("committing the migrations")?;
        Ok(())
    }

    /// Records that `host` (booted as `boot_id`) is alive now, by the database clock: the
    /// heartbeat another host's `reconcile` judges dead hosts by (SPEC §12). A host judged
    /// dead that is seen again is alive again.
    ///
    /// A host judged dead that is seen again gets back the kills that failed because of
    /// the judgement: the agents of tasks stopped meanwhile may still run here, and this
    /// command's (or the next) outbox run stops them.
    fn heartbeat(&self, host: &str, boot_id: Option<&str>) -> Result<()> {
        let mut client = self.client.borrow_mut();
        let rows = client
            .query_typed(
                "WITH before AS (SELECT dead_since FROM hosts WHERE id = $1)
                 INSERT INTO hosts (id, boot_id, first_seen_at, last_seen_at)
                 VALUES ($1, $2, orch_now(), orch_now())
                 ON CONFLICT (id) DO UPDATE SET last_seen_at = excluded.last_seen_at,
                     boot_id = excluded.boot_id, dead_since = NULL
                 RETURNING (SELECT dead_since FROM before)",
                &[(&host, Type::TEXT), (&boot_id, Type::TEXT)],
            )
            .map_err(|e| classify(anyhow::Error::new(e)))
            .context("recording this host as seen")?;
        let was_dead = rows
            .first()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_some();
        if was_dead {
            client
                .query_typed(
                    "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = NULL,
                            last_error = last_error || '; the host was seen again: retried',
                            updated_at = orch_now()
                     WHERE host = $1 AND status = 'failed' AND kind = 'stop_process'
                       AND last_error LIKE '%judged dead%'",
                    &[(&host, Type::TEXT)],
                )
                .map_err(|e| classify(anyhow::Error::new(e)))
                .context("taking back the kills of a host seen again")?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    pub fn created(&self) -> bool {
        self.created
    }

    pub fn opened_version(&self) -> i64 {
        self.opened_version
    }

    /// Runs `f` statement by statement (each sees the latest committed state).
    pub fn read<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        let mut client = self.client.borrow_mut();
        let tx = PgTx {
            conn: RefCell::new(Conn::Client(&mut client)),
            write: false,
        };
        f(&tx).map_err(classify)
    }

    /// Runs `f` in one read-only REPEATABLE READ transaction: every statement sees the same
    /// snapshot.
    pub fn read_snapshot<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        let mut client = self.client.borrow_mut();
        let t = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(|e| classify(anyhow::Error::new(e)))?;
        let tx = PgTx {
            conn: RefCell::new(Conn::Tx(t)),
            write: false,
        };
        let out = f(&tx);
        drop(tx);
        out.map_err(classify)
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`; a transaction that lost
    /// a deadlock or a serialization race is run again whole.
    pub fn write<T>(&self, mut f: impl FnMut(&Writer) -> Result<T>) -> Result<T> {
        let mut client = self.client.borrow_mut();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let t = client
                .transaction()
                .map_err(|e| classify(anyhow::Error::new(e)))?;
            let tx = PgTx {
                conn: RefCell::new(Conn::Tx(t)),
                write: true,
            };
            let out = f(&tx);
            let Conn::Tx(t) = tx.conn.into_inner() else {
                unreachable!("a write runs in a transaction")
            };
            let out = out.and_then(|v| {
                t.commit().context("committing")?;
                Ok(v)
            });
            match out {
                Err(e) if retryable(&e) && attempt < WRITE_ATTEMPTS => {
                    // The rollback happened with the transaction; a short, growing pause lets
                    // the winner finish first.
                    std::thread::sleep(Duration::from_millis(5 * u64::from(attempt)));
                }
                other => return other.map_err(classify),
            }
        }
    }

    /// Runs `f` in a write transaction that is always rolled back.
    pub fn write_rolled_back<T>(&self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        let mut client = self.client.borrow_mut();
        let t = client
            .transaction()
            .map_err(|e| classify(anyhow::Error::new(e)))?;
        let tx = PgTx {
            conn: RefCell::new(Conn::Tx(t)),
            write: true,
        };
        let out = f(&tx);
        // Dropping the transaction rolls it back.
        drop(tx);
        out.map_err(classify)
    }

    /// What tasks wait for is read from their rows on PostgreSQL: nothing to settle.
    pub fn settle_waits(&self) -> Result<usize> {
        Ok(0)
    }
}

/// An authentication failure or a database that does not exist is bad configuration
/// (exit 78), not a reason to retry.
fn auth_or_missing(err: anyhow::Error, describe: &str) -> anyhow::Error {
    use postgres::error::SqlState;
    match sqlstate(&err) {
        Some(s)
            if *s == SqlState::INVALID_PASSWORD
                || *s == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            config_err(format!(
                "PostgreSQL refused the credentials for {describe} (check ORCH_DB_URL and ORCH_DB_PASSWORD)"
            ))
        }
        Some(s) if *s == SqlState::INVALID_CATALOG_NAME => {
            config_err(format!("{describe}: no such PostgreSQL database"))
        }
        // Refused before any SQL (a password the server wants and was not given, a
        // certificate that does not verify): configuration, not a busy server.
        None if StoreError::of(&err).is_none() => config_err(format!(
            "connecting to {describe}: {}",
            err.chain().last().map(|c| c.to_string()).unwrap_or_default()
        )),
        _ => err.context(format!("connecting to {describe}")),
    }
}

/// Connects without TLS, with TLS as libpq's `prefer`/`require` do (encrypted, the
/// certificate not checked), or with a verified certificate and host name (`verify-full`:
/// the roots of `sslrootcert`, else the webpki roots).
fn connect(config: &postgres::Config, verify: bool, root_cert: Option<&str>) -> Result<Client> {
    use postgres::config::SslMode;
    if config.get_ssl_mode() == SslMode::Disable
        || config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, postgres::config::Host::Unix(_)))
    {
        return Ok(config.connect(postgres::NoTls)?);
    }
    let tls = tls::client_config(verify, root_cert)?;
    Ok(config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))?)
}

mod tls;
