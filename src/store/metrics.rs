//! The reads behind `orchctl metrics` (SPEC §15).
//!
//! Each is answered by a counter table or an index made for it — the trigger-kept
//! `job_counts` / `task_counts`, the `(status, id)` index of jobs, the outbox's partial
//! index of open side effects, the small `merge_leases` table — so a scrape costs about
//! what `queue` costs however long the history or the live set grows. Read-only.

use anyhow::{Context, Result};
use rusqlite::OptionalExtension;

use super::{Reader, Store};

impl Store {
    /// Runs `f` inside one read transaction, so every statement sees the same committed
    /// state (a scrape's families must add up: a job moving from `queued` to `running`
    /// between two statements would otherwise be counted twice or not at all). In WAL
    /// mode a reader never blocks a writer.
    pub fn read_snapshot<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .context("starting a read transaction")?;
        let out = f(&Reader { c: &self.conn });
        // A read transaction has nothing to commit; ending it cannot lose anything.
        let _ = self.conn.execute_batch("COMMIT");
        out
    }
}

impl<'c> Reader<'c> {
    /// Task counts by stage (kept by triggers: constant time).
    pub fn task_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT stage, n FROM task_counts WHERE n <> 0 ORDER BY stage")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the task counters")?;
        Ok(rows)
    }

    /// How many repos have their merge lease taken (one row per held lease).
    pub fn count_leases(&self) -> Result<i64> {
        self.c
            .prepare_cached("SELECT count(*) FROM merge_leases")?
            .query_row([], |r| r.get(0))
            .context("counting merge leases")
    }

    /// Seconds since the first job in claim order (the lowest queued id) was created, or
    /// `None` when nothing is queued. One step down the `(status, id)` index.
    pub fn oldest_queued_job_age_secs(&self) -> Result<Option<f64>> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT (julianday('now') - julianday(coalesce(created_at, claimed_at))) * 86400.0
                 FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1",
            )?
            .query_row([], |r| r.get::<_, Option<f64>>(0))
            .optional()
            .context("reading the oldest queued job")?
            .flatten())
    }

    /// Running jobs by agent. Reads the running jobs only (the `(status, id)` index), a
    /// set bounded by the agent slots, not by the history.
    pub fn running_by_agent(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT agent, count(*) FROM jobs WHERE status = 'running' GROUP BY agent ORDER BY agent",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("counting running jobs by agent")?;
        Ok(rows)
    }

    /// Live tasks waiting on people, as `[approval, deploy_confirmation, failed,
    /// blocked_by_cancelled]` (SPEC §14): parked in `analysis` after a done analyst job;
    /// parked in `deploy` without a failed deployer job; the stage's latest job failed;
    /// depending on a cancelled task. Tasks with a job queued or running, or a STOP
    /// pending, wait on nobody. Driven by the live tasks' partial index, each task checked
    /// through the `(task_id, status)` index of jobs and the dependency key (`+dt.stage`
    /// keeps the planner on the task's key: the stage index holds the whole history), so
    /// the cost is the live set's, never the history's.
    pub fn metrics_awaiting_counts(&self) -> Result<[i64; 4]> {
        self.c
            .prepare_cached(
                "SELECT coalesce(sum(stage = 'analysis' AND NOT active AND last IS 'done'), 0),
                        coalesce(sum(stage = 'deploy' AND NOT active AND last IS NOT 'failed'), 0),
                        coalesce(sum(NOT active AND last IS 'failed'), 0),
                        coalesce(sum(blocked), 0)
                 FROM (
                     SELECT t.stage AS stage,
                            EXISTS(SELECT 1 FROM jobs j
                                   WHERE j.task_id = t.id AND j.status IN ('queued', 'running')) AS active,
                            (SELECT j.status FROM jobs j
                             WHERE j.task_id = t.id
                               AND j.agent = CASE t.stage WHEN 'analysis' THEN 'analyst'
                                                          WHEN 'development' THEN 'developer'
                                                          WHEN 'review' THEN 'reviewer'
                                                          WHEN 'deploy' THEN 'deployer' END
                             ORDER BY j.id DESC LIMIT 1) AS last,
                            EXISTS(SELECT 1 FROM task_deps d JOIN tasks dt ON dt.id = d.depends_on
                                   WHERE d.task_id = t.id AND +dt.stage = 'cancelled') AS blocked
                     FROM tasks t
                     WHERE t.stage NOT IN ('done', 'cancelled') AND t.cancel_requested_at IS NULL
                 )",
            )?
            .query_row([], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]))
            .context("counting the tasks that wait on people")
    }
}
