//! The schema as an append-only list of migrations, versioned by `PRAGMA user_version`.
//!
//! Never edit or remove an entry: a database in the field has already run it. Add a new
//! function at the end of [`MIGRATIONS`]. Every migration is additive and idempotent
//! (`IF NOT EXISTS`, columns added only when missing), so a database made by the Python
//! predecessor — tables present, `user_version` 0, some columns missing — is brought up
//! to date instead of being rejected.

use anyhow::{Context, Result};
use rusqlite::Connection;

type Migration = fn(&Connection) -> Result<()>;

/// Index `i` brings a database from version `i` to version `i + 1`.
pub const MIGRATIONS: &[Migration] = &[
    m1_base,
    m2_job_counts,
    m3_live_tasks,
    m4_task_counts,
    m5_live_branches,
    m6_awaiting,
    super::claimable::m7_claimable,
    m8_hosts,
];

/// The schema version this binary writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

const NOW: &str = "(strftime('%Y-%m-%dT%H:%M:%fZ','now'))";

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(1)?;
        if name == column {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Adds `column` to `table` when missing. `ALTER TABLE ADD COLUMN` only takes constant
/// defaults, so time columns added this way start NULL; the store always writes them.
pub(super) fn ensure_column(
    conn: &Connection,
    table: &str,
    column: &str,
    decl: &str,
) -> Result<()> {
    if !has_column(conn, table, column)? {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
            .with_context(|| format!("adding column {table}.{column}"))?;
    }
    Ok(())
}

fn m1_base(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "
        CREATE TABLE IF NOT EXISTS tasks (
            id INTEGER PRIMARY KEY,
            plane_id TEXT UNIQUE,
            work_item_id TEXT UNIQUE,
            plane_issue_id TEXT,
            project_id TEXT,
            repo TEXT NOT NULL,
            branch TEXT,
            title TEXT,
            stage TEXT NOT NULL DEFAULT 'analysis',
            created_at TEXT DEFAULT {NOW},
            updated_at TEXT DEFAULT {NOW},
            cancelled_at TEXT,
            cancel_requested_at TEXT,
            cancel_reason TEXT
        );
        CREATE TABLE IF NOT EXISTS jobs (
            id INTEGER PRIMARY KEY,
            agent TEXT NOT NULL,
            repo TEXT NOT NULL,
            task_id INTEGER REFERENCES tasks(id),
            status TEXT NOT NULL DEFAULT 'queued',
            pid INTEGER,
            proc_start INTEGER,
            run_id INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 2,
            created_at TEXT DEFAULT {NOW},
            claimed_at TEXT,
            finished_at TEXT,
            error TEXT
        );
        CREATE TABLE IF NOT EXISTS task_deps (
            task_id INTEGER NOT NULL REFERENCES tasks(id),
            depends_on INTEGER NOT NULL REFERENCES tasks(id),
            PRIMARY KEY (task_id, depends_on)
        );
        CREATE TABLE IF NOT EXISTS task_events (
            id INTEGER PRIMARY KEY,
            task_id INTEGER REFERENCES tasks(id),
            at TEXT NOT NULL DEFAULT {NOW},
            kind TEXT NOT NULL,
            detail TEXT
        );
        CREATE TABLE IF NOT EXISTS merge_leases (
            repo TEXT PRIMARY KEY,
            branch TEXT NOT NULL,
            task_id INTEGER,
            acquired_at TEXT NOT NULL DEFAULT {NOW}
        );
        CREATE TABLE IF NOT EXISTS deploy_markers (
            repo TEXT NOT NULL,
            work_item_id TEXT NOT NULL,
            state TEXT NOT NULL,
            task_id INTEGER,
            set_at TEXT NOT NULL DEFAULT {NOW},
            PRIMARY KEY (repo, work_item_id)
        );
        CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY,
            task_id INTEGER REFERENCES tasks(id),
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            result TEXT,
            next_attempt_at TEXT,
            claimed_pid INTEGER,
            claimed_start INTEGER,
            claimed_until TEXT,
            created_at TEXT NOT NULL DEFAULT {NOW},
            updated_at TEXT
        );
        CREATE TABLE IF NOT EXISTS plane_deliveries (
            body_sha256 TEXT PRIMARY KEY,
            delivery_id TEXT,
            event TEXT,
            action TEXT,
            task_id INTEGER,
            received_at TEXT NOT NULL DEFAULT {NOW}
        );
        CREATE TABLE IF NOT EXISTS plane_states (
            project_id TEXT NOT NULL,
            state_id TEXT NOT NULL,
            name TEXT NOT NULL,
            state_group TEXT,
            fetched_at TEXT NOT NULL DEFAULT {NOW},
            PRIMARY KEY (project_id, state_id)
        );
        CREATE TABLE IF NOT EXISTS plane_projects (
            project_id TEXT PRIMARY KEY,
            identifier TEXT NOT NULL,
            fetched_at TEXT NOT NULL DEFAULT {NOW}
        );
        "
    ))
    .context("creating the base tables")?;

    // A predecessor's database may have the tables with fewer columns.
    for (column, decl) in [
        ("plane_id", "TEXT"),
        ("work_item_id", "TEXT"),
        ("plane_issue_id", "TEXT"),
        ("project_id", "TEXT"),
        ("branch", "TEXT"),
        ("title", "TEXT"),
        ("stage", "TEXT NOT NULL DEFAULT 'analysis'"),
        ("created_at", "TEXT"),
        ("updated_at", "TEXT"),
        ("cancelled_at", "TEXT"),
        ("cancel_requested_at", "TEXT"),
        ("cancel_reason", "TEXT"),
    ] {
        ensure_column(conn, "tasks", column, decl)?;
    }
    for (column, decl) in [
        ("task_id", "INTEGER REFERENCES tasks(id)"),
        ("status", "TEXT NOT NULL DEFAULT 'queued'"),
        ("pid", "INTEGER"),
        ("proc_start", "INTEGER"),
        ("run_id", "INTEGER"),
        ("attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("max_attempts", "INTEGER NOT NULL DEFAULT 2"),
        ("created_at", "TEXT"),
        ("claimed_at", "TEXT"),
        ("finished_at", "TEXT"),
        ("error", "TEXT"),
    ] {
        ensure_column(conn, "jobs", column, decl)?;
    }

    conn.execute_batch(
        "
        -- claim: the oldest queued job; reap: every running job; queue: counts.
        CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs(status, id);
        -- stop/complete: the jobs of one task.
        CREATE INDEX IF NOT EXISTS jobs_task_status ON jobs(task_id, status);
        -- claim: max(run_id) + 1 without a scan.
        CREATE INDEX IF NOT EXISTS jobs_run_id ON jobs(run_id);
        CREATE INDEX IF NOT EXISTS tasks_plane_issue ON tasks(plane_issue_id);
        CREATE INDEX IF NOT EXISTS tasks_stage ON tasks(stage);
        CREATE INDEX IF NOT EXISTS tasks_cancelled_at ON tasks(cancelled_at)
            WHERE cancelled_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS tasks_cancel_pending ON tasks(id)
            WHERE cancel_requested_at IS NOT NULL AND stage NOT IN ('done', 'cancelled');
        CREATE INDEX IF NOT EXISTS task_deps_depends_on ON task_deps(depends_on);
        CREATE INDEX IF NOT EXISTS task_events_task ON task_events(task_id, id);
        CREATE INDEX IF NOT EXISTS outbox_task ON outbox(task_id, id);
        CREATE INDEX IF NOT EXISTS outbox_status ON outbox(status, id)
            WHERE status <> 'done';
        ",
    )
    .context("creating indexes")?;
    Ok(())
}

/// Job counts by status kept by triggers, so `queue` answers in constant time however long
/// the history grows (a `GROUP BY status` over a million jobs is a full index scan).
fn m2_job_counts(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "
        CREATE TABLE IF NOT EXISTS job_counts (
            status TEXT PRIMARY KEY,
            n INTEGER NOT NULL
        ) WITHOUT ROWID;
        DELETE FROM job_counts;
        INSERT INTO job_counts(status, n) SELECT status, count(*) FROM jobs GROUP BY status;
        CREATE TRIGGER IF NOT EXISTS job_counts_insert AFTER INSERT ON jobs BEGIN
            INSERT INTO job_counts(status, n) VALUES (NEW.status, 1)
                ON CONFLICT(status) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER IF NOT EXISTS job_counts_delete AFTER DELETE ON jobs BEGIN
            UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
        END;
        CREATE TRIGGER IF NOT EXISTS job_counts_update AFTER UPDATE OF status ON jobs
            WHEN OLD.status IS NOT NEW.status BEGIN
            UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
            INSERT INTO job_counts(status, n) VALUES (NEW.status, 1)
                ON CONFLICT(status) DO UPDATE SET n = n + 1;
        END;
        ",
    )
    .context("creating the job counters")?;
    Ok(())
}

/// The live tasks (not `done` or `cancelled`) as their own small index, so the queries that
/// look at live work only (`queue`'s blocked tasks, `reconcile`'s pass) stay as fast with
/// years of finished tasks as with none. A query uses it when it states the same condition.
fn m3_live_tasks(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS tasks_live ON tasks(id) WHERE stage NOT IN ('done', 'cancelled');",
    )
    .context("creating the index of live tasks")?;
    Ok(())
}

/// Task counts by stage kept by triggers, like `job_counts`: `queue`'s cancelled count and
/// `reconcile`'s count of terminal tasks would otherwise read an index entry per finished
/// task, a cost that grows with every task ever run.
fn m4_task_counts(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "
        CREATE TABLE IF NOT EXISTS task_counts (
            stage TEXT PRIMARY KEY,
            n INTEGER NOT NULL
        ) WITHOUT ROWID;
        DELETE FROM task_counts;
        INSERT INTO task_counts(stage, n) SELECT stage, count(*) FROM tasks GROUP BY stage;
        CREATE TRIGGER IF NOT EXISTS task_counts_insert AFTER INSERT ON tasks BEGIN
            INSERT INTO task_counts(stage, n) VALUES (NEW.stage, 1)
                ON CONFLICT(stage) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER IF NOT EXISTS task_counts_delete AFTER DELETE ON tasks BEGIN
            UPDATE task_counts SET n = n - 1 WHERE stage = OLD.stage;
        END;
        CREATE TRIGGER IF NOT EXISTS task_counts_update AFTER UPDATE OF stage ON tasks
            WHEN OLD.stage IS NOT NEW.stage BEGIN
            UPDATE task_counts SET n = n - 1 WHERE stage = OLD.stage;
            INSERT INTO task_counts(stage, n) VALUES (NEW.stage, 1)
                ON CONFLICT(stage) DO UPDATE SET n = n + 1;
        END;
        ",
    )
    .context("creating the task counters")?;
    Ok(())
}

/// The branches of live tasks, so that a side effect about to touch a branch (a worktree
/// removal, a remote deletion) can ask in one index probe whether a live task owns it now.
fn m5_live_branches(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS tasks_live_branch ON tasks(repo, branch)
             WHERE stage NOT IN ('done', 'cancelled');",
    )
    .context("creating the index of live tasks' branches")?;
    Ok(())
}

/// What a task waits for (SPEC §14), kept in a table of its own: `task_waits` holds one
/// row per waiting task (its kind, since when, and the fields `queue` lists) with an
/// index by kind and age, and `awaiting_counts` the per-kind counts, so `queue`'s
/// `awaiting` block and `orchctl metrics` cost the same with 200k live tasks as with 150.
/// (A table, not columns of `tasks`: the block reads nothing else, so it stays readable
/// when `tasks` is not, SPEC §8.)
///
/// Which kind is decided in Rust (`store/live.rs`, from the stage map), not by triggers:
/// a trigger is compiled into every statement that fires it, and a trigger computing the
/// kind made each `claim` compile about 800 more instructions (1.4 ms). The triggers here
/// only mark a task as stale — whatever writes its jobs, stage, dependencies or deploy
/// marker, orchctl or plain SQL — and every orchctl write transaction settles the stale
/// tasks before it commits; reads treat a task still marked (written by another tool
/// since) as its rows say. A claim or a requeue (one active status to the other) changes
/// nothing a task waits for and marks nothing.
fn m6_awaiting(conn: &Connection) -> Result<()> {
    // Only a live task can start or stop waiting: a finished task's row went when it
    // finished (its stage change marked it), so the history a bulk load writes marks
    // nothing.
    let mark = |id: &str| {
        format!(
            "INSERT OR IGNORE INTO task_waits_stale (task_id)
                 SELECT t.id FROM tasks t WHERE t.id = {id} AND t.stage NOT IN ('done', 'cancelled');"
        )
    };
    conn.execute_batch(&format!(
        "
        CREATE TABLE IF NOT EXISTS task_waits (
            task_id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            since TEXT NOT NULL,
            work_item_id TEXT,
            repo TEXT NOT NULL,
            stage TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS task_waits_kind ON task_waits(kind, since, task_id);
        CREATE TABLE IF NOT EXISTS awaiting_counts (
            kind TEXT PRIMARY KEY,
            n INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS task_waits_stale (task_id INTEGER PRIMARY KEY);
        -- Every live task is settled by the migration's own transaction.
        INSERT OR IGNORE INTO task_waits_stale (task_id)
            SELECT id FROM tasks WHERE stage NOT IN ('done', 'cancelled');

        CREATE TRIGGER IF NOT EXISTS task_waits_insert AFTER INSERT ON task_waits BEGIN
            INSERT INTO awaiting_counts(kind, n) VALUES (NEW.kind, 1)
                ON CONFLICT(kind) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER IF NOT EXISTS task_waits_delete AFTER DELETE ON task_waits BEGIN
            UPDATE awaiting_counts SET n = n - 1 WHERE kind = OLD.kind;
        END;
        CREATE TRIGGER IF NOT EXISTS task_waits_update AFTER UPDATE OF kind ON task_waits
            WHEN OLD.kind IS NOT NEW.kind BEGIN
            UPDATE awaiting_counts SET n = n - 1 WHERE kind = OLD.kind;
            INSERT INTO awaiting_counts(kind, n) VALUES (NEW.kind, 1)
                ON CONFLICT(kind) DO UPDATE SET n = n + 1;
        END;

        CREATE TRIGGER IF NOT EXISTS waits_job_insert AFTER INSERT ON jobs
            WHEN NEW.task_id IS NOT NULL BEGIN {job_new} END;
        CREATE TRIGGER IF NOT EXISTS waits_job_status AFTER UPDATE OF status ON jobs
            WHEN NEW.task_id IS NOT NULL AND OLD.status IS NOT NEW.status
             AND NOT (OLD.status IN ('queued', 'running') AND NEW.status IN ('queued', 'running'))
            BEGIN {job_new} END;
        CREATE TRIGGER IF NOT EXISTS waits_job_delete AFTER DELETE ON jobs
            WHEN OLD.task_id IS NOT NULL BEGIN {job_old} END;
        CREATE TRIGGER IF NOT EXISTS waits_task_insert AFTER INSERT ON tasks BEGIN {task_new} END;
        CREATE TRIGGER IF NOT EXISTS waits_task_update
            AFTER UPDATE OF stage, cancel_requested_at, work_item_id, repo ON tasks BEGIN
            INSERT OR IGNORE INTO task_waits_stale (task_id) VALUES (NEW.id);
            -- A dependency finished or was cancelled: its dependents wait differently now.
            INSERT OR IGNORE INTO task_waits_stale (task_id)
                SELECT d.task_id FROM task_deps d JOIN tasks t ON t.id = d.task_id
                WHERE d.depends_on = NEW.id AND OLD.stage IS NOT NEW.stage
                  AND t.stage NOT IN ('done', 'cancelled');
        END;
        CREATE TRIGGER IF NOT EXISTS waits_task_delete AFTER DELETE ON tasks BEGIN
            INSERT OR IGNORE INTO task_waits_stale (task_id) VALUES (OLD.id);
        END;
        CREATE TRIGGER IF NOT EXISTS waits_dep_insert AFTER INSERT ON task_deps BEGIN {dep_new} END;
        CREATE TRIGGER IF NOT EXISTS waits_dep_delete AFTER DELETE ON task_deps BEGIN {dep_old} END;
        CREATE TRIGGER IF NOT EXISTS waits_marker_insert AFTER INSERT ON deploy_markers BEGIN
            INSERT OR IGNORE INTO task_waits_stale (task_id)
                SELECT t.id FROM tasks t
                WHERE t.work_item_id = NEW.work_item_id AND t.repo = NEW.repo;
        END;
        CREATE TRIGGER IF NOT EXISTS waits_marker_update AFTER UPDATE ON deploy_markers BEGIN
            INSERT OR IGNORE INTO task_waits_stale (task_id)
                SELECT t.id FROM tasks t
                WHERE t.work_item_id = NEW.work_item_id AND t.repo = NEW.repo;
        END;
        CREATE TRIGGER IF NOT EXISTS waits_marker_delete AFTER DELETE ON deploy_markers BEGIN
            INSERT OR IGNORE INTO task_waits_stale (task_id)
                SELECT t.id FROM tasks t
                WHERE t.work_item_id = OLD.work_item_id AND t.repo = OLD.repo;
        END;
        ",
        job_new = mark("NEW.task_id"),
        job_old = mark("OLD.task_id"),
        task_new = mark("NEW.id"),
        dep_new = mark("NEW.task_id"),
        dep_old = mark("OLD.task_id"),
    ))
    .context("creating what tasks wait for (task_waits)")?;
    Ok(())
}

/// Hosts (SPEC §12): the host and boot a run was launched on, the host an effect is bound
/// to (an agent's kill, a worktree's removal: only that machine can carry them out) and the
/// host that claimed an effect for execution, and the hosts seen. `outbox_bound` holds the
/// pending effects bound to a host, so a host finds its own in one probe however long the
/// outbox grows.
fn m8_hosts(conn: &Connection) -> Result<()> {
    ensure_column(conn, "jobs", "host", "TEXT")?;
    ensure_column(conn, "jobs", "boot_id", "TEXT")?;
    ensure_column(conn, "outbox", "host", "TEXT")?;
    ensure_column(conn, "outbox", "claimed_host", "TEXT")?;
    conn.execute_batch(&format!(
        "
        CREATE TABLE IF NOT EXISTS hosts (
            id TEXT PRIMARY KEY,
            boot_id TEXT,
            first_seen_at TEXT NOT NULL DEFAULT {NOW},
            last_seen_at TEXT NOT NULL DEFAULT {NOW},
            dead_since TEXT
        );
        CREATE INDEX IF NOT EXISTS outbox_bound ON outbox(host, id)
            WHERE status = 'pending' AND host IS NOT NULL;
        "
    ))
    .context("creating the hosts")?;
    Ok(())
}
