//! Reads of live work, each through the index made for it (SPEC §10): a database with
//! 200k live tasks must answer `queue` as fast as one with 150. Every statement that
//! reads a set of live tasks names its partial index with `INDEXED BY`, so no planner
//! guess — there are no statistics: orchctl never runs ANALYZE — can pick a wider one
//! (`tasks_live` holds every live task; `tasks_cancel_pending` only those with a deferred
//! STOP). tests/plans.rs checks each plan.
//!
//! What a task waits for (SPEC §14) is kept in `task_waits` by triggers (migration 5):
//! the lists read its `task_waits_kind` index, the counts read `awaiting_counts`, and both
//! cost the same however many tasks are live.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::{job_row, task_row, Reader, Writer, JOB_COLS, TASK_COLS};
use crate::model::{Job, Task};
use crate::pipeline::Awaiting;

/// One task waiting on people: the row of `queue`'s `awaiting` lists.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AwaitingTask {
    pub id: i64,
    pub work_item_id: Option<String>,
    pub repo: String,
    pub stage: crate::pipeline::Stage,
    /// When it started waiting.
    pub since: Option<String>,
}

/// How many live tasks wait, by kind (kept by triggers: constant time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AwaitingCounts {
    pub approval: i64,
    pub deploy_confirmation: i64,
    pub failed: i64,
    pub blocked_by_cancelled: i64,
}

impl AwaitingCounts {
    pub fn get(&self, kind: Awaiting) -> i64 {
        match kind {
            Awaiting::Approval => self.approval,
            Awaiting::DeployConfirmation => self.deploy_confirmation,
            Awaiting::Failed => self.failed,
            Awaiting::BlockedByCancelled => self.blocked_by_cancelled,
            Awaiting::Dependency => 0,
        }
    }
}

impl<'c> Reader<'c> {
    /// The counts of the four kinds `queue`'s `awaiting` block (and `orchctl metrics`'
    /// `orchctl_awaiting_tasks{kind}`) report: one read of a table of five rows.
    pub fn awaiting_counts(&self) -> Result<AwaitingCounts> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT kind, n FROM awaiting_counts WHERE n <> 0")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the awaiting counts")?;
        let mut c = AwaitingCounts::default();
        for (kind, n) in rows {
            match Awaiting::parse(&kind) {
                Some(Awaiting::Approval) => c.approval = n,
                Some(Awaiting::DeployConfirmation) => c.deploy_confirmation = n,
                Some(Awaiting::Failed) => c.failed = n,
                Some(Awaiting::BlockedByCancelled) => c.blocked_by_cancelled = n,
                Some(Awaiting::Dependency) | None => {}
            }
        }
        Ok(c)
    }

    /// The count of one kind (`dependency` included).
    pub fn awaiting_count(&self, kind: Awaiting) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached("SELECT coalesce((SELECT n FROM awaiting_counts WHERE kind = ?1), 0)")?
            .query_row([kind], |r| r.get(0))?)
    }

    /// The tasks waiting for `kind`, longest waiting first, at most `limit`.
    pub fn awaiting_tasks(&self, kind: Awaiting, limit: i64) -> Result<Vec<AwaitingTask>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT task_id, work_item_id, repo, stage, since FROM task_waits INDEXED BY task_waits_kind
             WHERE kind = ?1 ORDER BY since, task_id LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![kind, limit], |r| {
                Ok(AwaitingTask {
                    id: r.get(0)?,
                    work_item_id: r.get(1)?,
                    repo: r.get(2)?,
                    stage: r.get(3)?,
                    since: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("listing the tasks awaiting {kind}"))?;
        Ok(rows)
    }

    /// What task `task_id` waits for, if anything.
    pub fn awaiting_of(&self, task_id: i64) -> Result<Option<Awaiting>> {
        self.c
            .prepare_cached("SELECT kind FROM task_waits WHERE task_id = ?1")?
            .query_row([task_id], |r| r.get::<_, Awaiting>(0))
            .optional()
            .with_context(|| format!("reading what task {task_id} waits for"))
    }

    /// Live tasks whose dependencies are not all done, with the ones they wait on: the
    /// tasks awaiting a dependency, read from `task_waits` in its index's order (those
    /// blocked for good by a cancelled dependency first, then the longest waiting), so
    /// the read stops after `limit` entries however many tasks wait.
    pub fn blocked_tasks(&self, limit: i64) -> Result<Vec<(i64, Vec<i64>)>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT w.task_id, (SELECT group_concat(d.depends_on) FROM task_deps d
                                 LEFT JOIN tasks dt ON dt.id = d.depends_on
                                 WHERE d.task_id = w.task_id AND dt.stage IS NOT 'done')
             FROM task_waits w INDEXED BY task_waits_kind
             WHERE w.kind IN ('blocked_by_cancelled', 'dependency')
             ORDER BY w.kind, w.since, w.task_id LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([limit], |r| {
                let id: i64 = r.get(0)?;
                let list: Option<String> = r.get(1)?;
                let on = list
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.parse().ok())
                    .collect();
                Ok((id, on))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("listing the tasks blocked by dependencies")?;
        Ok(rows)
    }

    /// Live tasks with a deferred cancel waiting to be applied.
    pub fn pending_cancels(&self) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks INDEXED BY tasks_cancel_pending
             WHERE cancel_requested_at IS NOT NULL AND stage NOT IN ('done', 'cancelled')
             ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the pending deferred stops")?;
        Ok(rows)
    }

    /// How many deferred cancels wait to be applied.
    pub fn count_pending_cancels(&self) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT count(*) FROM tasks INDEXED BY tasks_cancel_pending
                 WHERE cancel_requested_at IS NOT NULL AND stage NOT IN ('done', 'cancelled')",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// The live tasks that depend on `task_id`.
    pub fn dependents(&self, task_id: i64) -> Result<Vec<i64>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT t.id FROM task_deps d JOIN tasks t ON t.id = d.task_id
             WHERE d.depends_on = ?1 AND t.stage NOT IN ('done', 'cancelled')
             ORDER BY t.id",
        )?;
        let rows = stmt
            .query_map([task_id], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .with_context(|| format!("reading the tasks that depend on task {task_id}"))?;
        Ok(rows)
    }

    /// A queued or running job of the task, the oldest first.
    pub fn active_job(&self, task_id: i64) -> Result<Option<Job>> {
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
    pub fn latest_job_of(&self, task_id: i64, agent: &str) -> Result<Option<Job>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE task_id = ?1 AND agent = ?2
                 ORDER BY id DESC LIMIT 1"
            ))?
            .query_row(params![task_id, agent], job_row)
            .optional()
            .with_context(|| format!("reading the last {agent} job of task {task_id}"))
    }
}

impl<'c> Writer<'c> {
    /// Releases the repo's lease if `branch` holds it for this task (or for no recorded
    /// task): a finalizer never frees a lease another task holds on a same-named branch.
    pub fn release_lease_of(&self, repo: &str, branch: &str, task_id: i64) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(
                "DELETE FROM merge_leases WHERE repo = ?1 AND branch = ?2
                 AND (task_id IS NULL OR task_id = ?3)",
            )?
            .execute(params![repo, branch, task_id])?;
        Ok(n == 1)
    }
}
