//! Reap's writes, guarded on what reap judged: the run, its status *and* its recorded
//! process. reap decides on a snapshot (a pid-less run that is too old, a pid that is
//! gone); a launcher that records its agent between that read and reap's write has made
//! the run a live, recorded one, and reap must then change nothing — or the agent would
//! run unrecorded, out of reach of STOP.

use anyhow::{Context, Result};
use rusqlite::params;

use super::{job_row, Reader, Writer, JOB_COLS, NOW_SQL};
use crate::model::Job;

impl<'c> Reader<'c> {
    /// Every running job, oldest first, with the seconds since its run was claimed (its
    /// creation for a row another tool set running without a claim time): what reap judges
    /// a pid-less run by, read in the same statement rather than one query per run.
    pub fn running_jobs_aged(&self) -> Result<Vec<(Job, Option<f64>)>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS},
                    (julianday('now') - julianday(coalesce(claimed_at, created_at))) * 86400.0
             FROM jobs WHERE status = 'running' ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], |r| Ok((job_row(r)?, r.get::<_, Option<f64>>(14)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading running jobs")?;
        Ok(rows)
    }
}

impl<'c> Writer<'c> {
    /// Puts the judged run back in the queue; false when the job is no longer exactly the
    /// run reap judged (another run, another status, another or a newly recorded pid).
    pub fn requeue_judged_run(&self, judged: &Job, error: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(
                "UPDATE jobs SET status = 'queued', pid = NULL, proc_start = NULL, error = ?5
                 WHERE id = ?1 AND run_id IS ?2 AND status = 'running'
                   AND pid IS ?3 AND proc_start IS ?4",
            )?
            .execute(params![
                judged.id,
                judged.run_id,
                judged.pid,
                judged.proc_start,
                error
            ])?;
        Ok(n == 1)
    }

    /// Ends the judged run as `status` (`failed`, `cancelled`), with the same guard.
    pub fn end_judged_run(&self, judged: &Job, status: &str, error: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE jobs SET status = ?5, finished_at = {NOW_SQL}, error = ?6
                 WHERE id = ?1 AND run_id IS ?2 AND status = 'running'
                   AND pid IS ?3 AND proc_start IS ?4"
            ))?
            .execute(params![
                judged.id,
                judged.run_id,
                judged.pid,
                judged.proc_start,
                status,
                error
            ])?;
        Ok(n == 1)
    }
}
