//! The queued jobs a claim can take, as an index of their own (SPEC §10: with 200k live
//! tasks and 100k queued jobs, `claim` and `dispatch` cost what they cost with 150).
//!
//! A claim takes the oldest eligible queued job. Walking the queued jobs in id order and
//! testing each one's dependencies costs one probe per job that waits on a dependency —
//! and a pipeline's blocked jobs pile up at the head of the queue, since they are the
//! oldest (4 % of the live set in the benchmark: 8 000 probes, 20 ms, per claim). So a
//! queued job whose task waits on a dependency is marked `held` (migration 7): the
//! partial indexes `jobs_claimable` and `jobs_claimable_agent` hold only the queued jobs
//! that are not, and the claim walks them instead. `held` is only ever a hint that keeps
//! a job out of the walk: the claim still tests every rule, so a job marked too little is
//! merely tested, and one is never marked while it could run — it is set and cleared by
//! the step that settles what tasks wait for ([`super::Writer::settle_waits`]), which
//! every write runs before it commits and a claim runs first (a task whose dependency
//! another tool finished is settled before the claim looks). A claimed job is unmarked.
//! With `ORCH_TASK_DEPS` off, dependencies hold nothing back, and the walk is the plain
//! one over all queued jobs.

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension, ToSql};

use super::SqliteTx;
use crate::store::ClaimFilter;

/// Migration 7: `jobs.held`, its two partial indexes, and the jobs held as of now.
pub(super) fn m7_claimable(conn: &Connection) -> Result<()> {
    super::schema::ensure_column(conn, "jobs", "held", "INTEGER")?;
    conn.execute_batch(
        "
        CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs(status, id)
            WHERE status = 'queued' AND held IS NULL;
        CREATE INDEX IF NOT EXISTS jobs_claimable_agent ON jobs(status, agent, id)
            WHERE status = 'queued' AND held IS NULL;
        UPDATE jobs SET held = 1
         WHERE status = 'queued' AND held IS NULL
           AND EXISTS (SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                       WHERE d.task_id = jobs.task_id AND dt.stage IS NOT 'done');
        ",
    )
    .context("creating the index of claimable jobs")?;
    Ok(())
}

/// The eligibility rules of a claim after `FROM jobs j LEFT JOIN tasks t`, and their
/// arguments (the agent, when one is given, first).
pub(super) fn rules(f: &ClaimFilter, agent: Option<&str>) -> String {
    let mut sql = String::from(
        " AND (j.task_id IS NULL OR (t.stage NOT IN ('done', 'cancelled')
                                    AND t.cancel_requested_at IS NULL))",
    );
    if f.task_deps {
        sql.push_str(
            " AND NOT EXISTS (SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                              WHERE d.task_id = j.task_id AND dt.stage IS NOT 'done')",
        );
    }
    if f.serial_gate {
        sql.push_str(
            " AND (j.agent <> 'deployer' OR NOT EXISTS (
                    SELECT 1 FROM merge_leases l WHERE l.repo = j.repo AND l.branch IS NOT t.branch))",
        );
    }
    if agent.is_some() {
        sql.push_str(" AND j.agent = ?1");
    }
    if f.repo.is_some() {
        sql.push_str(if agent.is_some() {
            " AND j.repo = ?2"
        } else {
            " AND j.repo = ?1"
        });
    }
    sql
}

/// The walk over queued jobs a claim makes, for one agent or all.
pub(super) fn walk(f: &ClaimFilter, agent: Option<&str>) -> &'static str {
    match (f.task_deps, agent.is_some()) {
        (true, true) => {
            "FROM jobs j INDEXED BY jobs_claimable_agent LEFT JOIN tasks t ON t.id = j.task_id
             WHERE j.status = 'queued' AND j.held IS NULL"
        }
        (true, false) => {
            "FROM jobs j INDEXED BY jobs_claimable LEFT JOIN tasks t ON t.id = j.task_id
             WHERE j.status = 'queued' AND j.held IS NULL"
        }
        // Nothing is held back without dependencies: every queued job is walked.
        (false, _) => "FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id WHERE j.status = 'queued'",
    }
}

impl SqliteTx<'_> {
    /// The oldest job `f` lets a claim take, with its task's branch: one walk of the
    /// claimable jobs per agent asked for (each in id order, stopping at the first
    /// eligible one), or one walk of them all.
    pub(super) fn oldest_claimable(
        &self,
        f: &ClaimFilter,
    ) -> Result<Option<(i64, Option<String>)>> {
        let agents: Vec<Option<&str>> = if f.agents.is_empty() {
            vec![None]
        } else {
            f.agents.iter().map(|a| Some(a.as_str())).collect()
        };
        let mut best: Option<(i64, Option<String>)> = None;
        for agent in agents {
            let sql = format!(
                "SELECT j.id, t.branch {}{} ORDER BY j.id LIMIT 1",
                walk(f, agent),
                rules(f, agent)
            );
            let mut args: Vec<&dyn ToSql> = Vec::new();
            if let Some(a) = &agent {
                args.push(a);
            }
            if let Some(r) = &f.repo {
                args.push(r);
            }
            let found: Option<(i64, Option<String>)> = self
                .c
                .prepare_cached(&sql)?
                .query_row(args.as_slice(), |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .context("choosing a job to claim")?;
            if let Some(job) = found {
                if best.as_ref().is_none_or(|(id, _)| job.0 < *id) {
                    best = Some(job);
                }
            }
        }
        Ok(best)
    }

    /// Marks the task's queued jobs held (its task waits on a dependency) or not, inside
    /// the caller's transaction (the settling of what tasks wait for).
    pub(super) fn hold_queued_jobs(&self, task_id: i64, held: bool) -> Result<()> {
        self.c
            .prepare_cached(
                "UPDATE jobs SET held = ?2
                 WHERE task_id = ?1 AND status = 'queued' AND held IS NOT ?2",
            )?
            .execute(params![task_id, held.then_some(1)])
            .context("marking the jobs a dependency holds back")?;
        Ok(())
    }
}
