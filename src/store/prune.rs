//! The reads and deletes behind `orchctl prune` (SPEC §15).
//!
//! Only two kinds of rows are ever deleted: handled-delivery hashes and `done` outbox rows
//! of tasks that have been terminal for a while. Tasks, jobs and the audit trail are never
//! touched. Candidates are walked in key order from a cursor, a bounded batch per call, so
//! a first prune of a year of history is many short transactions instead of one long
//! write lock, and no batch reads again what an earlier one has passed.
//!
//! Times are compared as Julian day numbers from the database clock (`julianday`), which
//! also reads the space-separated timestamps that plain-SQL inserts may carry.

use anyhow::{Context, Result};
use rusqlite::params;

use super::{Reader, Writer};

impl<'c> Reader<'c> {
    /// The database clock's now minus `days` days, as a Julian day number.
    pub fn julian_days_ago(&self, days: f64) -> Result<f64> {
        self.c
            .prepare_cached("SELECT julianday('now') - ?1")?
            .query_row([days], |r| r.get(0))
            .context("reading the database clock")
    }

    /// Up to `limit` handled deliveries received before `cutoff` (a Julian day), with a
    /// rowid above `after`, in rowid order.
    pub fn old_deliveries(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT rowid FROM plane_deliveries
             WHERE rowid > ?2 AND julianday(received_at) < ?1
             ORDER BY rowid LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![cutoff, after, limit], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .context("reading old deliveries")?;
        Ok(rows)
    }

    /// Up to `limit` `done` outbox rows with an id above `after` whose task has been
    /// terminal since before `cutoff` (a Julian day): cancelled at `cancelled_at`, done at
    /// its last update (nothing changes a terminal task again).
    pub fn old_done_effects(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>> {
        // CROSS JOIN keeps the outbox as the outer loop, walked by id from the cursor.
        let mut stmt = self.c.prepare_cached(
            "SELECT o.id FROM outbox o CROSS JOIN tasks t ON t.id = o.task_id
             WHERE o.id > ?2 AND o.status = 'done' AND t.stage IN ('done', 'cancelled')
               AND julianday(coalesce(t.cancelled_at, t.updated_at, t.created_at)) < ?1
             ORDER BY o.id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![cutoff, after, limit], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .context("reading old side effects")?;
        Ok(rows)
    }

    /// Whether run `run_id` of job `job_id` is still running, and when it finished (a
    /// Julian day) if the database knows: `None` for a job it has no row of.
    pub fn run_end(&self, job_id: i64, run_id: i64) -> Result<Option<RunEnd>> {
        use rusqlite::OptionalExtension;
        self.c
            .prepare_cached(
                "SELECT status = 'running' AND run_id IS ?2,
                        CASE WHEN run_id IS ?2 THEN julianday(finished_at) END
                 FROM jobs WHERE id = ?1",
            )?
            .query_row(params![job_id, run_id], |r| {
                Ok(RunEnd {
                    running: r.get(0)?,
                    finished: r.get(1)?,
                })
            })
            .optional()
            .with_context(|| format!("reading job {job_id}"))
    }
}

/// What the database says about one run of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunEnd {
    /// The job's current run is this one and it is running.
    pub running: bool,
    /// When this run finished (a Julian day), when it is the job's latest run and ended.
    pub finished: Option<f64>,
}

impl<'c> Writer<'c> {
    /// Deletes the given handled-delivery rows; returns how many were deleted.
    pub fn delete_deliveries(&self, rowids: &[i64]) -> Result<usize> {
        let mut stmt = self
            .c
            .prepare_cached("DELETE FROM plane_deliveries WHERE rowid = ?1")?;
        let mut n = 0;
        for id in rowids {
            n += stmt.execute([id])?;
        }
        Ok(n)
    }

    /// Deletes the given outbox rows, each only while still `done` (a row that is not is
    /// kept whatever the caller saw).
    pub fn delete_done_effects(&self, ids: &[i64]) -> Result<usize> {
        let mut stmt = self
            .c
            .prepare_cached("DELETE FROM outbox WHERE id = ?1 AND status = 'done'")?;
        let mut n = 0;
        for id in ids {
            n += stmt.execute([id])?;
        }
        Ok(n)
    }
}
