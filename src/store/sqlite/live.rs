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

use super::{SqliteTx, NOW_SQL};
use crate::model::Task;
use crate::pipeline::{Awaiting, Stage};
use crate::store::{
    AwaitingCounts, AwaitingTask, JobReads, LeaseReads, LiveReads, LiveWrites, TaskReads, WaitFacts,
};

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

impl LiveReads for SqliteTx<'_> {
    /// The counts of the four kinds `queue`'s `awaiting` block (and `orchctl metrics`'
    /// `orchctl_awaiting_tasks{kind}`) report: one read of a table of five rows (plus the
    /// tasks another tool changed since orchctl last wrote, if any).
    fn awaiting_counts(&self) -> Result<AwaitingCounts> {
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

    /// The tasks waiting for `kind`, longest waiting first, at most `limit`.
    fn awaiting_tasks(&self, kind: Awaiting, limit: i64) -> Result<Vec<AwaitingTask>> {
        Ok(self
            .waiting(&[kind], limit)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// What task `task_id` waits for, if anything.
    fn awaiting_of(&self, task_id: i64) -> Result<Option<Awaiting>> {
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
    fn blocked_tasks(&self, limit: i64) -> Result<Vec<(i64, Vec<i64>)>> {
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
}

impl LiveWrites for SqliteTx<'_> {
    /// Brings `task_waits` up to date for the tasks the triggers marked stale, inside the
    /// caller's transaction (`Store::write` runs it before every commit). Returns how many
    /// tasks it settled; with nothing marked it costs one read of an empty table.
    fn settle_waits(&self) -> Result<usize> {
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
}

impl SqliteTx<'_> {
    /// What task `t` waits for now, from its rows (SPEC §14): nothing when it is finished
    /// or has a STOP pending; a cancelled dependency blocks it for good; a dependency not
    /// done holds it; a queued or running job, or an open deploy window, is work in
    /// progress; otherwise its stage and its stage agent's last job decide
    /// ([`pipeline::waiting_in`]).
    pub(super) fn awaiting_now(&self, t: &Task) -> Result<Option<Awaiting>> {
        if t.is_stopping() {
            return Ok(None);
        }
        let (dep_cancelled, dep_open): (bool, bool) = self
            .c
            .prepare_cached(
                "SELECT coalesce(max(dt.stage = 'cancelled'), 0), coalesce(max(dt.stage IS NOT 'done'), 0)
                 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on WHERE d.task_id = ?1",
            )?
            .query_row([t.id], |r| Ok((r.get(0)?, r.get(1)?)))
            .with_context(|| format!("reading the dependencies of task {}", t.id))?;
        let deploy_initiated = match t.original_work_item() {
            Some(wi) if t.stage == Stage::Deploy => {
                self.marker(&t.repo, wi)?.as_deref() == Some("initiated")
            }
            _ => false,
        };
        let last_stage_job = match t.stage.agent() {
            Some(agent) => self.latest_job_of(t.id, agent.as_str())?.map(|j| j.status),
            None => None,
        };
        Ok(WaitFacts {
            stage: t.stage,
            terminal_or_stopping: false,
            dep_cancelled,
            dep_open,
            active_job: self.has_active_job(t.id)?,
            deploy_initiated,
            last_stage_job,
        }
        .kind())
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
}
