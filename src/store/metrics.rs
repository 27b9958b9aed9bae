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
}
