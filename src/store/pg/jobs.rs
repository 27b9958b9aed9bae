//! Jobs and their runs on PostgreSQL: claims that never wait for each other, launches,
//! outcomes and reap's guarded writes.
//!
//! A claim locks only the job it takes (`FOR UPDATE OF j SKIP LOCKED`): a job another
//! claimer holds is passed over, never waited for, so N claimers on any number of hosts
//! never take the same job and never see "nothing" while an unlocked eligible job is
//! queued. The task is not locked: a STOP deciding about it meanwhile cancels the job
//! through a statement that waits for the claim's commit and then finds the job running
//! (its launch is then refused and its supervisor killed) — the outcomes of a claim and a
//! STOP run one after the other.

use anyhow::{Context, Result};

use super::{job_row, p, params, PgTx, Typed, JOB_COLS};
use crate::model::Job;
use crate::store::{
    ClaimFilter, JobReads, JobWrites, Launch, LeaseOutcome, LeaseWrites, RunEnd, SlotClaim,
};

/// The eligibility rules of a claim (SPEC §5) after `FROM jobs j LEFT JOIN tasks t`, with
/// `$1` the agents (or NULL for any), `$2` the repo (or NULL) and `$3` the job ids passed
/// over in this claim.
fn rules(f: &ClaimFilter) -> String {
    let mut sql = String::from(
        "j.status = 'queued'
         AND ($1::text[] IS NULL OR j.agent = ANY($1))
         AND ($2::text IS NULL OR j.repo = $2)
         AND j.id <> ALL($3)
         AND (j.task_id IS NULL OR (t.stage NOT IN ('done', 'cancelled')
                                    AND t.cancel_requested_at IS NULL))",
    );
    if f.task_deps {
        sql.push_str(
            " AND NOT EXISTS (SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                              WHERE d.task_id = j.task_id AND dt.stage IS DISTINCT FROM 'done')",
        );
    }
    if f.serial_gate {
        sql.push_str(
            " AND (j.agent <> 'deployer' OR NOT EXISTS (
                    SELECT 1 FROM merge_leases l
                    WHERE l.repo = j.repo AND l.branch IS DISTINCT FROM t.branch))",
        );
    }
    sql
}

impl PgTx<'_> {
    fn jobs(&self, sql: &str, params: &[Typed<'_>]) -> Result<Vec<Job>> {
        self.rows(sql, params)?.iter().map(job_row).collect()
    }

    fn job_opt(&self, sql: &str, params: &[Typed<'_>]) -> Result<Option<Job>> {
        self.opt(sql, params)?.as_ref().map(job_row).transpose()
    }

    fn bool_of(&self, sql: &str, params: &[Typed<'_>]) -> Result<bool> {
        Ok(self.one(sql, params)?.try_get(0)?)
    }

    /// The oldest job `f` lets a claim take, locked for this transaction; `skip` are jobs
    /// this claim has passed over already.
    fn pick(&self, f: &ClaimFilter, skip: &[i64]) -> Result<Option<Picked>> {
        let agents: Option<Vec<String>> = (!f.agents.is_empty()).then(|| f.agents.clone());
        let skip = skip.to_vec();
        let row = self
            .opt(
                &format!(
                    "SELECT j.id, t.branch, j.agent, j.repo, j.task_id
                     FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id
                     WHERE {}
                     ORDER BY j.id LIMIT 1
                     FOR UPDATE OF j SKIP LOCKED",
                    rules(f)
                ),
                &[agents_param(&agents), p(&f.repo), p(&skip)],
            )
            .context("choosing a job to claim")?;
        row.map(|r| {
            Ok(Picked {
                id: r.try_get(0)?,
                branch: r.try_get(1)?,
                agent: r.try_get(2)?,
                repo: r.try_get(3)?,
                task_id: r.try_get(4)?,
            })
        })
        .transpose()
    }
}

/// A job a claim chose, with what the serial gate needs to know of it.
struct Picked {
    id: i64,
    branch: Option<String>,
    agent: String,
    repo: String,
    task_id: Option<i64>,
}

fn agents_param(agents: &Option<Vec<String>>) -> Typed<'_> {
    (agents, postgres::types::Type::TEXT_ARRAY)
}

impl JobReads for PgTx<'_> {
    fn job(&self, id: i64) -> Result<Option<Job>> {
        if self.write {
            // Task before job, as every write locks them: the job's task first.
            if let Some(row) = self.opt("SELECT task_id FROM jobs WHERE id = $1", params![id])? {
                if let Some(task) = row.try_get::<_, Option<i64>>(0)? {
                    self.exec(
                        "SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE",
                        params![task],
                    )?;
                }
            }
        }
        self.job_opt(
            &format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1{}", self.lock()),
            params![id],
        )
        .with_context(|| format!("reading job {id}"))
    }

    fn jobs_of_task(&self, task_id: i64) -> Result<Vec<Job>> {
        self.jobs(
            &format!("SELECT {JOB_COLS} FROM jobs WHERE task_id = $1 ORDER BY id"),
            params![task_id],
        )
        .with_context(|| format!("reading the jobs of task {task_id}"))
    }

    fn jobs_of_task_in(&self, task_id: i64, status: &str) -> Result<Vec<Job>> {
        self.jobs(
            &format!("SELECT {JOB_COLS} FROM jobs WHERE task_id = $1 AND status = $2 ORDER BY id"),
            params![task_id, status],
        )
    }

    fn has_active_job(&self, task_id: i64) -> Result<bool> {
        self.bool_of(
            "SELECT EXISTS(SELECT 1 FROM jobs WHERE task_id = $1 AND status IN ('queued', 'running'))",
            params![task_id],
        )
    }

    fn has_running_job(&self, task_id: i64) -> Result<bool> {
        self.bool_of(
            "SELECT EXISTS(SELECT 1 FROM jobs WHERE task_id = $1 AND status = 'running')",
            params![task_id],
        )
    }

    fn active_job(&self, task_id: i64) -> Result<Option<Job>> {
        self.job_opt(
            &format!(
                "SELECT {JOB_COLS} FROM jobs
                 WHERE task_id = $1 AND status IN ('queued', 'running') ORDER BY id LIMIT 1"
            ),
            params![task_id],
        )
        .with_context(|| format!("reading the active job of task {task_id}"))
    }

    fn latest_job_of(&self, task_id: i64, agent: &str) -> Result<Option<Job>> {
        self.job_opt(
            &format!(
                "SELECT {JOB_COLS} FROM jobs WHERE task_id = $1 AND agent = $2
                 ORDER BY id DESC LIMIT 1"
            ),
            params![task_id, agent],
        )
        .with_context(|| format!("reading the last {agent} job of task {task_id}"))
    }

    fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        self.rows(
            "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status",
            params![],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>>>()
        .context("counting jobs by status")
    }

    fn recent_jobs(&self, limit: i64) -> Result<Vec<Job>> {
        self.jobs(
            &format!("SELECT {JOB_COLS} FROM jobs ORDER BY id DESC LIMIT $1"),
            params![limit],
        )
    }

    fn running_by_agent(&self, host: Option<&str>) -> Result<Vec<(String, i64)>> {
        // A run with no host was started by another tool on the host asking.
        self.rows(
            "SELECT agent, count(*) FROM jobs
             WHERE status = 'running' AND ($1::text IS NULL OR host = $1 OR host IS NULL)
             GROUP BY agent ORDER BY agent",
            params![host],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>>>()
        .context("counting running jobs by agent")
    }

    fn running_jobs_aged(&self) -> Result<Vec<(Job, Option<f64>)>> {
        self.rows(
            &format!(
                "SELECT {JOB_COLS}, orch_age(coalesce(claimed_at, created_at))
                 FROM jobs WHERE status = 'running' ORDER BY id"
            ),
            params![],
        )
        .context("reading running jobs")?
        .iter()
        .map(|r| Ok((job_row(r)?, r.try_get(16)?)))
        .collect()
    }

    fn count_eligible_queued(&self, f: &ClaimFilter, agent: &str, cap: i64) -> Result<i64> {
        let agents = Some(vec![agent.to_string()]);
        let none: Vec<i64> = Vec::new();
        Ok(self
            .one(
                &format!(
                    "SELECT count(*) FROM (SELECT 1 FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id
                     WHERE {} LIMIT $4) s",
                    rules(f)
                ),
                &[agents_param(&agents), p(&f.repo), p(&none), p(&cap)],
            )
            .with_context(|| format!("counting the queued {agent} jobs"))?
            .try_get(0)?)
    }

    fn oldest_queued_job_age_secs(&self) -> Result<Option<f64>> {
        Ok(self
            .opt(
                "SELECT orch_age(coalesce(created_at, claimed_at))
                 FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1",
                params![],
            )
            .context("reading the oldest queued job")?
            .map(|r| r.try_get::<_, Option<f64>>(0))
            .transpose()?
            .flatten())
    }

    fn run_end(&self, job_id: i64, run_id: i64) -> Result<Option<RunEnd>> {
        self.opt(
            "SELECT status = 'running' AND run_id IS NOT DISTINCT FROM $2,
                    CASE WHEN run_id IS NOT DISTINCT FROM $2 THEN orch_julian(finished_at) END
             FROM jobs WHERE id = $1",
            params![job_id, run_id],
        )
        .with_context(|| format!("reading job {job_id}"))?
        .map(|r| {
            Ok(RunEnd {
                running: r.try_get(0)?,
                finished: r.try_get(1)?,
            })
        })
        .transpose()
    }
}

impl JobWrites for PgTx<'_> {
    fn insert_job(&self, task_id: Option<i64>, agent: &str, repo: &str) -> Result<i64> {
        Ok(self
            .one(
                "INSERT INTO jobs (agent, repo, task_id, status, created_at)
                 VALUES ($1, $2, $3, 'queued', orch_now()) RETURNING id",
                params![agent, repo, task_id],
            )
            .context("queueing a job")?
            .try_get(0)?)
    }

    fn cancel_jobs_for_task(
        &self,
        task_id: i64,
        only_queued: bool,
        reason: &str,
    ) -> Result<Vec<Job>> {
        let statuses: Vec<String> = if only_queued {
            vec!["queued".into()]
        } else {
            vec!["queued".into(), "running".into()]
        };
        // One statement: the rows are locked as they are found (a concurrent claim's job is
        // waited for, then seen as the running job it became), and each is returned with
        // the status it had.
        let cols = JOB_COLS
            .split(", ")
            .map(|c| {
                if matches!(c, "status" | "finished_at" | "error") {
                    format!("before.{c}")
                } else {
                    format!("j.{c}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut jobs = self
            .jobs(
                &format!(
                    "WITH before AS (
                         SELECT id, status, finished_at, error FROM jobs
                         WHERE task_id = $1 AND status = ANY($2) ORDER BY id FOR UPDATE)
                     UPDATE jobs j SET status = 'cancelled', finished_at = orch_now(),
                            error = coalesce(j.error, $3)
                     FROM before WHERE j.id = before.id AND j.status = ANY($2)
                     RETURNING {cols}"
                ),
                params![task_id, statuses, reason],
            )
            .with_context(|| format!("cancelling the jobs of task {task_id}"))?;
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    fn claim_next_job(&self, f: &ClaimFilter, host: &str) -> Result<Option<Job>> {
        let mut passed_over: Vec<i64> = Vec::new();
        loop {
            let Some(job) = self.pick(f, &passed_over)? else {
                return Ok(None);
            };
            if let (true, "deployer", Some(task_id), Some(branch)) =
                (f.serial_gate, job.agent.as_str(), job.task_id, &job.branch)
            {
                // The lease is taken before the job: a lease another branch took since the
                // choice leaves the job queued for the next claim.
                if let LeaseOutcome::HeldBy(_) = self.acquire_lease(&job.repo, branch, task_id)? {
                    passed_over.push(job.id);
                    continue;
                }
            }
            let job_id = job.id;
            return self
                .job_opt(
                    &format!(
                        "UPDATE jobs SET status = 'running', run_id = nextval('run_ids'),
                                attempts = attempts + 1, claimed_at = orch_now(),
                                pid = NULL, proc_start = NULL, finished_at = NULL,
                                host = $2, boot_id = NULL
                         WHERE id = $1 AND status = 'queued'
                         RETURNING {JOB_COLS}"
                    ),
                    params![job_id, host],
                )
                .context("claiming a job");
        }
    }

    fn claim_in_slots(
        &self,
        f: &ClaimFilter,
        limits: &[(String, i64)],
        total: i64,
        host: &str,
    ) -> Result<SlotClaim> {
        // Slot-bounded claims of one host run one at a time: the count below sees every run
        // another dispatch of this host started, committed before this lock was granted.
        self.exec(
            &format!(
                "SELECT pg_advisory_xact_lock({}, hashtext($1))",
                super::schema::SLOTS_LOCK
            ),
            params![host],
        )?;
        let running = self.running_by_agent(Some(host))?;
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
        Ok(self.exec(
            "UPDATE jobs SET pid = $3, proc_start = $4, host = $5, boot_id = $6
             WHERE id = $1 AND run_id = $2 AND status = 'running'",
            params![
                job_id,
                run_id,
                launch.pid,
                launch.proc_start,
                launch.host,
                launch.boot_id
            ],
        )? == 1)
    }

    fn finish_run(
        &self,
        job_id: i64,
        run_id: i64,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool> {
        Ok(self.exec(
            "UPDATE jobs SET status = $3, finished_at = orch_now(), error = $4
             WHERE id = $1 AND run_id = $2 AND status = 'running'",
            params![job_id, run_id, status, error],
        )? == 1)
    }

    fn requeue_run(&self, job_id: i64, run_id: Option<i64>, error: Option<&str>) -> Result<bool> {
        Ok(self.exec(
            "UPDATE jobs SET status = 'queued', pid = NULL, proc_start = NULL, error = $3
             WHERE id = $1 AND run_id IS NOT DISTINCT FROM $2 AND status = 'running'",
            params![job_id, run_id, error],
        )? == 1)
    }

    fn finish_running(
        &self,
        job_id: i64,
        run_id: Option<i64>,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool> {
        Ok(self.exec(
            "UPDATE jobs SET status = $3, finished_at = orch_now(), error = $4
             WHERE id = $1 AND run_id IS NOT DISTINCT FROM $2 AND status = 'running'",
            params![job_id, run_id, status, error],
        )? == 1)
    }

    fn requeue_judged_run(&self, judged: &Job, error: &str) -> Result<bool> {
        Ok(self.exec(
            "UPDATE jobs SET status = 'queued', pid = NULL, proc_start = NULL, error = $5
             WHERE id = $1 AND run_id IS NOT DISTINCT FROM $2 AND status = 'running'
               AND pid IS NOT DISTINCT FROM $3 AND proc_start IS NOT DISTINCT FROM $4",
            params![
                judged.id,
                judged.run_id,
                judged.pid,
                judged.proc_start,
                error
            ],
        )? == 1)
    }

    fn end_judged_run(&self, judged: &Job, status: &str, error: &str) -> Result<bool> {
        Ok(self.exec(
            "UPDATE jobs SET status = $5, finished_at = orch_now(), error = $6
             WHERE id = $1 AND run_id IS NOT DISTINCT FROM $2 AND status = 'running'
               AND pid IS NOT DISTINCT FROM $3 AND proc_start IS NOT DISTINCT FROM $4",
            params![
                judged.id,
                judged.run_id,
                judged.pid,
                judged.proc_start,
                status,
                error
            ],
        )? == 1)
    }
}
