//! Jobs and their runs, on SQLite: claims (the single writer makes the choice and the
//! update one atomic step), launches, outcomes and reap's guarded writes.
//!
//! Reap decides on a snapshot (a pid-less run that is too old, a pid that is gone); a
//! launcher that records its agent between that read and reap's write has made the run a
//! live, recorded one, and reap must then change nothing — so its writes are guarded on
//! the run, its status *and* its recorded process.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension, ToSql};

use super::claimable::{rules, walk};
use super::{job_row, SqliteTx, JOB_COLS, NOW_SQL};
use crate::model::Job;
use crate::store::{
    ClaimFilter, JobReads, JobWrites, Launch, LeaseWrites, LiveWrites, RunEnd, SlotClaim,
};

impl JobReads for SqliteTx<'_> {
    fn job(&self, id: i64) -> Result<Option<Job>> {
        self.c
            .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"))?
            .query_row([id], job_row)
            .optional()
            .with_context(|| format!("reading job {id}"))
    }

    fn jobs_of_task(&self, task_id: i64) -> Result<Vec<Job>> {
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
    fn jobs_of_task_in(&self, task_id: i64, status: &str) -> Result<Vec<Job>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE task_id = ?1 AND status = ?2 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map(params![task_id, status], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn has_active_job(&self, task_id: i64) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE task_id = ?1 AND status IN ('queued', 'running'))",
            )?
            .query_row([task_id], |r| r.get(0))?)
    }

    fn has_running_job(&self, task_id: i64) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE task_id = ?1 AND status = 'running')",
            )?
            .query_row([task_id], |r| r.get(0))?)
    }

    /// A queued or running job of the task, the oldest first.
    fn active_job(&self, task_id: i64) -> Result<Option<Job>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {JOB_COLS} FROM jobs
                 WHERE task_id = ?1 AND status IN ('queued', 'running') ORDER BY id LIMIT 1"
            ))?
            .query_row([task_id], job_row)
            .optional()
            .with_context(|| format!("reading the active job of task {task_id}"))
    }

    /// The task's newest job of `agent`.
    fn latest_job_of(&self, task_id: i64, agent: &str) -> Result<Option<Job>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE task_id = ?1 AND agent = ?2
                 ORDER BY id DESC LIMIT 1"
            ))?
            .query_row(params![task_id, agent], job_row)
            .optional()
            .with_context(|| format!("reading the last {agent} job of task {task_id}"))
    }

    /// Job counts by status (kept by triggers: constant time).
    fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT status, n FROM job_counts WHERE n <> 0 ORDER BY status")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The newest jobs (by id: no scan of the history).
    fn recent_jobs(&self, limit: i64) -> Result<Vec<Job>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Running jobs by agent. Reads the running jobs only (the `(status, id)` index), a
    /// set bounded by the agent slots, not by the history.
    fn running_by_agent(&self, host: Option<&str>) -> Result<Vec<(String, i64)>> {
        // A run with no host was started by another tool on this machine (one host).
        let mut stmt = self.c.prepare_cached(
            "SELECT agent, count(*) FROM jobs WHERE status = 'running' AND (?1 IS NULL OR host = ?1 OR host IS NULL) GROUP BY agent ORDER BY agent",
        )?;
        let rows = stmt
            .query_map([host], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("counting running jobs by agent")?;
        Ok(rows)
    }

    /// Every running job, oldest first, with the seconds since its run was claimed (its
    /// creation for a row another tool set running without a claim time): what reap judges
    /// a pid-less run by, read in the same statement rather than one query per run.
    fn running_jobs_aged(&self) -> Result<Vec<(Job, Option<f64>)>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLS},
                    (julianday('now') - julianday(coalesce(claimed_at, created_at))) * 86400.0
             FROM jobs WHERE status = 'running' ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], |r| Ok((job_row(r)?, r.get::<_, Option<f64>>(16)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading running jobs")?;
        Ok(rows)
    }

    /// How many queued jobs of `agent` a claim could take now (the rules of
    /// [`Writer::claim_next_job`]), counted up to `cap`: a walk of at most `cap` eligible
    /// jobs (plus the few a pending STOP or the serial gate holds back).
    fn count_eligible_queued(&self, f: &ClaimFilter, agent: &str, cap: i64) -> Result<i64> {
        let limit = if f.repo.is_some() { "?3" } else { "?2" };
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 {}{} LIMIT {limit})",
            walk(f, Some(agent)),
            rules(f, Some(agent))
        );
        let mut args: Vec<&dyn ToSql> = vec![&agent];
        if let Some(r) = &f.repo {
            args.push(r);
        }
        args.push(&cap);
        self.c
            .prepare_cached(&sql)?
            .query_row(args.as_slice(), |r| r.get(0))
            .with_context(|| format!("counting the queued {agent} jobs"))
    }

    /// Seconds since the first job in claim order (the lowest queued id) was created, or
    /// `None` when nothing is queued. One step down the `(status, id)` index.
    fn oldest_queued_job_age_secs(&self) -> Result<Option<f64>> {
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

    /// Whether run `run_id` of job `job_id` is still running, and when it finished (a
    /// Julian day) if the database knows: `None` for a job it has no row of.
    fn run_end(&self, job_id: i64, run_id: i64) -> Result<Option<RunEnd>> {
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

impl JobWrites for SqliteTx<'_> {
    fn insert_job(&self, task_id: Option<i64>, agent: &str, repo: &str) -> Result<i64> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO jobs (agent, repo, task_id, status, created_at)
                 VALUES (?1, ?2, ?3, 'queued', {NOW_SQL})"
            ))?
            .execute(params![agent, repo, task_id])
            .context("queueing a job")?;
        Ok(self.c.last_insert_rowid())
    }

    /// Cancels the task's queued (and, unless `only_queued`, running) jobs; returns them as
    /// they were before the change (pids and run ids intact, for stopping the processes).
    fn cancel_jobs_for_task(
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

    /// Takes the oldest eligible queued job (SPEC §5) and starts a new run of it. For a
    /// `deployer` under the serial gate the repo's merge lease is taken in the same
    /// transaction.
    fn claim_next_job(&self, f: &ClaimFilter, host: &str) -> Result<Option<Job>> {
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
                        pid = NULL, proc_start = NULL, finished_at = NULL, held = NULL,
                        host = ?2, boot_id = NULL
                 WHERE id = ?1 AND status = 'queued'
                 RETURNING {JOB_COLS}"
            ))?
            .query_row(params![job_id, host], job_row)
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

    /// The slots are counted inside the claim's `BEGIN IMMEDIATE` transaction, which holds
    /// the write lock from the count to the commit: no other claim fills a slot between.
    fn claim_in_slots(
        &self,
        f: &ClaimFilter,
        limits: &[(String, i64)],
        total: i64,
        host: &str,
    ) -> Result<SlotClaim> {
        // One machine's file: every run counts against this host's slots, whatever host id
        // it was recorded under.
        let running = self.running_by_agent(None)?;
        let mut out = SlotClaim { running, job: None };
        let free = out.free_agents(limits, total);
        if free.is_empty() {
            return Ok(out);
        }
        let filter = ClaimFilter {
            agents: free,
            ..f.clone()
        };
        out.job = self.claim_next_job(&filter, host)?;
        Ok(out)
    }

    fn record_launch(&self, job_id: i64, run_id: i64, launch: &Launch) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(
                "UPDATE jobs SET pid = ?3, proc_start = ?4, host = ?5, boot_id = ?6
                 WHERE id = ?1 AND run_id = ?2 AND status = 'running'",
            )?
            .execute(params![
                job_id,
                run_id,
                launch.pid,
                launch.proc_start,
                launch.host,
                launch.boot_id
            ])?;
        Ok(n == 1)
    }

    /// Ends a run as `done`, `failed` or `cancelled`; false when `run_id` is not the job's
    /// running run (stale).
    fn finish_run(
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
    fn requeue_run(&self, job_id: i64, run_id: Option<i64>, error: Option<&str>) -> Result<bool> {
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
    fn finish_running(
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

    /// Puts the judged run back in the queue; false when the job is no longer exactly the
    /// run reap judged (another run, another status, another or a newly recorded pid).
    fn requeue_judged_run(&self, judged: &Job, error: &str) -> Result<bool> {
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
    fn end_judged_run(&self, judged: &Job, status: &str, error: &str) -> Result<bool> {
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
