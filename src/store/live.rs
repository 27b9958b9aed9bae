//! Reads of live work, each through the index made for it (SPEC §10): a database with
//! 200k live tasks must answer `queue` as fast as one with 150. Every statement that
//! reads a set of live tasks names its partial index with `INDEXED BY`, so no planner
//! guess — there are no statistics: orchctl never runs ANALYZE — can pick a wider one
//! (`tasks_live` holds every live task; `tasks_cancel_pending` only those with a deferred
//! STOP). tests/plans.rs checks each plan.
//!
//! What a task waits for (SPEC §14) is kept in `task_waits` (migration 6): the lists read
//! its `task_waits_kind` index, the counts read `awaiting_counts`, and both cost the same
//! however many tasks are live. Triggers mark the tasks whose rows changed
//! (`task_waits_stale`); [`Writer::settle_waits`], run by every write transaction before
//! it commits, decides what each waits for ([`Reader::awaiting_now`], the one definition)
//! and updates the table. A task still marked at read time (another tool wrote its rows
//! with plain SQL since the last orchctl write) is decided on the fly, so a read is never
//! stale and never writes.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::{job_row, task_row, Reader, Store, Writer, JOB_COLS, NOW_SQL, TASK_COLS};
use crate::model::{Job, Task};
use crate::pipeline::{self, Awaiting, Stage};

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

impl AwaitingCounts {
    fn add(&mut self, kind: Awaiting, by: i64) {
        match kind {
            Awaiting::Approval => self.approval += by,
            Awaiting::DeployConfirmation => self.deploy_confirmation += by,
            Awaiting::Failed => self.failed += by,
            Awaiting::BlockedByCancelled => self.blocked_by_cancelled += by,
            Awaiting::Dependency => {}
        }
    }
}

/// A task marked stale: what `task_waits` says and what its rows say now.
struct Restated {
    id: i64,
    stored: Option<Awaiting>,
    now: Option<AwaitingTask>,
    kind: Option<Awaiting>,
}

/// Orders waiting tasks as the `task_waits_kind` index does within a kind.
fn by_age(a: &AwaitingTask, b: &AwaitingTask) -> std::cmp::Ordering {
    (a.since.as_deref(), a.id).cmp(&(b.since.as_deref(), b.id))
}

impl<'c> Reader<'c> {
    /// What task `t` waits for now, from its rows (SPEC §14): nothing when it is finished
    /// or has a STOP pending; a cancelled dependency blocks it for good; a dependency not
    /// done holds it; a queued or running job, or an open deploy window, is work in
    /// progress; otherwise its stage and its stage agent's last job decide
    /// ([`pipeline::waiting_in`]).
    pub fn awaiting_now(&self, t: &Task) -> Result<Option<Awaiting>> {
        if t.is_terminal() || t.cancel_requested_at.is_some() {
            return Ok(None);
        }
        let (cancelled, open): (bool, bool) = self
            .c
            .prepare_cached(
                "SELECT coalesce(max(dt.stage = 'cancelled'), 0), coalesce(max(dt.stage IS NOT 'done'), 0)
                 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on WHERE d.task_id = ?1",
            )?
            .query_row([t.id], |r| Ok((r.get(0)?, r.get(1)?)))
            .with_context(|| format!("reading the dependencies of task {}", t.id))?;
        if cancelled {
            return Ok(Some(Awaiting::BlockedByCancelled));
        }
        if open {
            return Ok(Some(Awaiting::Dependency));
        }
        if self.has_active_job(t.id)? {
            return Ok(None);
        }
        if t.stage == Stage::Deploy {
            if let Some(wi) = t.original_work_item() {
                if self.marker(&t.repo, wi)?.as_deref() == Some("initiated") {
                    return Ok(None);
                }
            }
        }
        let last = match t.stage.agent() {
            Some(agent) => self.latest_job_of(t.id, agent.as_str())?.map(|j| j.status),
            None => None,
        };
        Ok(pipeline::waiting_in(t.stage, last))
    }

    /// The tasks marked stale, restated from their rows.
    fn restated(&self) -> Result<Vec<Restated>> {
        let ids: Vec<i64> = self
            .c
            .prepare_cached("SELECT task_id FROM task_waits_stale ORDER BY task_id")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the tasks whose waits are stale")?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let stored: Option<(Awaiting, Option<String>)> = self
                .c
                .prepare_cached("SELECT kind, since FROM task_waits WHERE task_id = ?1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let task = self.task(id)?;
            let kind = match &task {
                Some(t) => self.awaiting_now(t)?,
                None => None,
            };
            let now = match (&task, kind) {
                (Some(t), Some(k)) => Some(AwaitingTask {
                    id,
                    work_item_id: t.work_item_id.clone(),
                    repo: t.repo.clone(),
                    stage: t.stage,
                    // Unchanged, it has waited since then; newly waiting, since its last
                    // change (the best a read can say).
                    since: match &stored {
                        Some((s, since)) if *s == k => since.clone(),
                        _ => t.updated_at.clone(),
                    },
                }),
                _ => None,
            };
            out.push(Restated {
                id,
                stored: stored.map(|(k, _)| k),
                now,
                kind,
            });
        }
        Ok(out)
    }

    /// The counts of the four kinds `queue`'s `awaiting` block (and `orchctl metrics`'
    /// `orchctl_awaiting_tasks{kind}`) report: one read of a table of five rows (plus the
    /// tasks another tool changed since orchctl last wrote, if any).
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
            if let Some(k) = Awaiting::parse(&kind) {
                c.add(k, n);
            }
        }
        for r in self.restated()? {
            if let Some(k) = r.stored {
                c.add(k, -1);
            }
            if let Some(k) = r.kind {
                c.add(k, 1);
            }
        }
        Ok(c)
    }

    /// The tasks waiting for one of `kinds`, in the index's order (by kind in the order
    /// given, then longest waiting first), at most `limit`.
    fn waiting(&self, kinds: &[Awaiting], limit: i64) -> Result<Vec<(Awaiting, AwaitingTask)>> {
        let restated = self.restated()?;
        let mut out = Vec::new();
        for &kind in kinds {
            let mut stmt = self.c.prepare_cached(
                "SELECT task_id, work_item_id, repo, stage, since FROM task_waits INDEXED BY task_waits_kind
                 WHERE kind = ?1 ORDER BY since, task_id LIMIT ?2",
            )?;
            // Stale rows are replaced by their restatement below.
            let mut rows: Vec<AwaitingTask> = stmt
                .query_map(params![kind, limit + restated.len() as i64], |r| {
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
            if !restated.is_empty() {
                rows.retain(|t| !restated.iter().any(|r| r.id == t.id));
                rows.extend(
                    restated
                        .iter()
                        .filter(|r| r.kind == Some(kind))
                        .filter_map(|r| r.now.clone()),
                );
                rows.sort_by(by_age);
            }
            rows.truncate(limit.max(0) as usize);
            out.extend(rows.into_iter().map(|t| (kind, t)));
        }
        out.truncate(limit.max(0) as usize);
        Ok(out)
    }

    /// The tasks waiting for `kind`, longest waiting first, at most `limit`.
    pub fn awaiting_tasks(&self, kind: Awaiting, limit: i64) -> Result<Vec<AwaitingTask>> {
        Ok(self
            .waiting(&[kind], limit)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// What task `task_id` waits for, if anything.
    pub fn awaiting_of(&self, task_id: i64) -> Result<Option<Awaiting>> {
        let stale: bool = self
            .c
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM task_waits_stale WHERE task_id = ?1)")?
            .query_row([task_id], |r| r.get(0))?;
        if stale {
            return match self.task(task_id)? {
                Some(t) => self.awaiting_now(&t),
                None => Ok(None),
            };
        }
        self.c
            .prepare_cached("SELECT kind FROM task_waits WHERE task_id = ?1")?
            .query_row([task_id], |r| r.get::<_, Awaiting>(0))
            .optional()
            .with_context(|| format!("reading what task {task_id} waits for"))
    }

    /// Live tasks whose dependencies are not all done, with the ones they wait on: those
    /// blocked for good by a cancelled dependency first, then the longest waiting, read
    /// from `task_waits` in its index's order so the read stops after `limit` entries
    /// however many tasks wait.
    pub fn blocked_tasks(&self, limit: i64) -> Result<Vec<(i64, Vec<i64>)>> {
        let tasks = self.waiting(&[Awaiting::BlockedByCancelled, Awaiting::Dependency], limit)?;
        let mut stmt = self.c.prepare_cached(
            "SELECT d.depends_on FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
             WHERE d.task_id = ?1 AND dt.stage IS NOT 'done' ORDER BY d.depends_on",
        )?;
        let mut out = Vec::with_capacity(tasks.len());
        for (_, t) in tasks {
            let on = stmt
                .query_map([t.id], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()
                .context("listing the dependencies a task waits on")?;
            out.push((t.id, on));
        }
        Ok(out)
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

impl Store {
    /// Settles, in a write transaction of its own, the tasks whose rows other tools
    /// changed since orchctl last wrote (a bulk load, a seed test's plain SQL); returns how
    /// many. `orchctl migrate` runs it; any other write command settles them as well.
    pub fn settle_waits(&self) -> Result<usize> {
        let any: bool = self
            .conn
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM task_waits_stale)")?
            .query_row([], |r| r.get(0))
            .context("reading the tasks whose waits are stale")?;
        if !any {
            return Ok(0);
        }
        self.write(|w| w.settle_waits())
    }
}

impl<'c> Writer<'c> {
    /// Brings `task_waits` up to date for the tasks the triggers marked stale, inside the
    /// caller's transaction (`Store::write` runs it before every commit). Returns how many
    /// tasks it settled; with nothing marked it costs one read of an empty table.
    pub fn settle_waits(&self) -> Result<usize> {
        let ids: Vec<i64> = self
            .c
            .prepare_cached("SELECT task_id FROM task_waits_stale ORDER BY task_id")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the tasks whose waits are stale")?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut forget = self
            .c
            .prepare_cached("DELETE FROM task_waits WHERE task_id = ?1")?;
        let mut put = self.c.prepare_cached(&format!(
            "INSERT INTO task_waits (task_id, kind, since, work_item_id, repo, stage)
             VALUES (?1, ?2, {NOW_SQL}, ?3, ?4, ?5)
             ON CONFLICT(task_id) DO UPDATE SET
                 since = CASE WHEN kind IS excluded.kind THEN since ELSE excluded.since END,
                 kind = excluded.kind, work_item_id = excluded.work_item_id,
                 repo = excluded.repo, stage = excluded.stage
             WHERE kind IS NOT excluded.kind OR stage IS NOT excluded.stage
                OR work_item_id IS NOT excluded.work_item_id OR repo IS NOT excluded.repo"
        ))?;
        let mut settled = self
            .c
            .prepare_cached("DELETE FROM task_waits_stale WHERE task_id = ?1")?;
        for &id in &ids {
            let task = self.task(id)?;
            let kind = match &task {
                Some(t) => self.awaiting_now(t)?,
                None => None,
            };
            let blocked = matches!(
                kind,
                Some(Awaiting::Dependency | Awaiting::BlockedByCancelled)
            );
            match (task, kind) {
                (Some(t), Some(k)) => {
                    put.execute(params![id, k, t.work_item_id, t.repo, t.stage])?;
                }
                _ => {
                    forget.execute([id])?;
                }
            }
            // A dependency holds the task's queued jobs out of the claim's walk.
            self.hold_queued_jobs(id, blocked)?;
            settled.execute([id])?;
        }
        Ok(ids.len())
    }

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
