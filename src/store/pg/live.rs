//! What live tasks wait for (SPEC §14), on PostgreSQL: read from the tasks' rows when asked,
//! one statement for every live task, and decided by [`WaitFacts::kind`] — the one
//! definition SQLite's kept table follows too. Nothing is kept, so nothing can go stale
//! when another tool writes rows with plain SQL, and no write pays for it; a read costs
//! one pass over the live tasks (through `tasks_live`), not over the history.

use anyhow::{Context, Result};
use postgres::Row;

use super::{params, PgTx, Typed};
use crate::pipeline::{Awaiting, JobStatus, Stage};
use crate::store::{AwaitingCounts, AwaitingTask, LiveReads, LiveWrites, WaitFacts};

/// A live task with what decides what it waits for.
struct Waiting {
    task: AwaitingTask,
    kind: Option<Awaiting>,
}

/// `CASE t.stage WHEN 'analysis' THEN 'analyst' … END`: each stage's agent, from the stage
/// map.
fn stage_agent_sql() -> String {
    let mut sql = String::from("CASE t.stage");
    for s in Stage::ALL {
        if let Some(a) = s.agent() {
            sql.push_str(&format!(" WHEN '{}' THEN '{}'", s.as_str(), a.as_str()));
        }
    }
    sql.push_str(" END");
    sql
}

fn facts_sql(filter: &str) -> String {
    format!(
        "SELECT t.id, t.work_item_id, t.repo, t.stage, t.updated_at,
                t.cancel_requested_at IS NOT NULL,
                EXISTS(SELECT 1 FROM task_deps d JOIN tasks dt ON dt.id = d.depends_on
                       WHERE d.task_id = t.id AND dt.stage = 'cancelled'),
                EXISTS(SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                       WHERE d.task_id = t.id AND dt.stage IS DISTINCT FROM 'done'),
                EXISTS(SELECT 1 FROM jobs j WHERE j.task_id = t.id AND j.status IN ('queued', 'running')),
                EXISTS(SELECT 1 FROM deploy_markers m
                       WHERE m.repo = t.repo AND m.work_item_id = split_part(t.work_item_id, '#cancelled-', 1)
                         AND m.state = 'initiated'),
                lj.status, lj.finished_at,
                (SELECT max(dt.cancelled_at) FROM task_deps d JOIN tasks dt ON dt.id = d.depends_on
                 WHERE d.task_id = t.id AND dt.stage = 'cancelled')
         FROM tasks t
         LEFT JOIN LATERAL (
             SELECT j.status, j.finished_at FROM jobs j
             WHERE j.task_id = t.id AND j.agent = {}
             ORDER BY j.id DESC LIMIT 1) lj ON true
         WHERE t.stage NOT IN ('done', 'cancelled'){filter}
         ORDER BY t.id",
        stage_agent_sql()
    )
}

fn waiting_of(r: &Row) -> Result<Waiting> {
    let stage: Stage = super::word(r, 3)?;
    let last: Option<String> = r.try_get(10)?;
    let last_stage_job = last
        .map(|s| s.parse::<JobStatus>().map_err(|e| anyhow::anyhow!("{e}")))
        .transpose()?;
    let facts = WaitFacts {
        stage,
        terminal_or_stopping: stage.is_terminal() || r.try_get::<_, bool>(5)?,
        dep_cancelled: r.try_get(6)?,
        dep_open: r.try_get(7)?,
        active_job: r.try_get(8)?,
        deploy_initiated: r.try_get(9)?,
        last_stage_job,
    };
    let kind = facts.kind();
    let updated: Option<String> = r.try_get(4)?;
    let finished: Option<String> = r.try_get(11)?;
    let dep_cancelled_at: Option<String> = r.try_get(12)?;
    // Since when: the change that made it wait (a dependency's cancel; its stage agent's
    // last run ending, or its last move).
    let since = match kind {
        Some(Awaiting::BlockedByCancelled) => dep_cancelled_at.or(updated),
        _ => updated.max(finished),
    };
    Ok(Waiting {
        task: AwaitingTask {
            id: r.try_get(0)?,
            work_item_id: r.try_get(1)?,
            repo: r.try_get(2)?,
            stage,
            since,
        },
        kind,
    })
}

impl PgTx<'_> {
    fn waiting(&self, filter: &str, params: &[Typed<'_>]) -> Result<Vec<Waiting>> {
        self.rows(&facts_sql(filter), params)
            .context("reading what the live tasks wait for")?
            .iter()
            .map(waiting_of)
            .collect()
    }

    /// The tasks waiting for one of `kinds`: by kind in the order given, then longest
    /// waiting first, at most `limit`.
    fn waiting_for(&self, kinds: &[Awaiting], limit: i64) -> Result<Vec<AwaitingTask>> {
        let all = self.waiting("", params![])?;
        let mut out = Vec::new();
        for &kind in kinds {
            let mut these: Vec<AwaitingTask> = all
                .iter()
                .filter(|w| w.kind == Some(kind))
                .map(|w| w.task.clone())
                .collect();
            these.sort_by(|a, b| (a.since.as_deref(), a.id).cmp(&(b.since.as_deref(), b.id)));
            out.extend(these);
        }
        out.truncate(limit.max(0) as usize);
        Ok(out)
    }
}

impl LiveReads for PgTx<'_> {
    fn awaiting_counts(&self) -> Result<AwaitingCounts> {
        let mut c = AwaitingCounts::default();
        for w in self.waiting("", params![])? {
            if let Some(k) = w.kind {
                c.add(k, 1);
            }
        }
        Ok(c)
    }

    fn awaiting_tasks(&self, kind: Awaiting, limit: i64) -> Result<Vec<AwaitingTask>> {
        self.waiting_for(&[kind], limit)
    }

    fn awaiting_of(&self, task_id: i64) -> Result<Option<Awaiting>> {
        Ok(self
            .waiting(" AND t.id = $1", params![task_id])?
            .into_iter()
            .next()
            .and_then(|w| w.kind))
    }

    fn blocked_tasks(&self, limit: i64) -> Result<Vec<(i64, Vec<i64>)>> {
        let tasks =
            self.waiting_for(&[Awaiting::BlockedByCancelled, Awaiting::Dependency], limit)?;
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            let on = self
                .rows(
                    "SELECT d.depends_on FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                     WHERE d.task_id = $1 AND dt.stage IS DISTINCT FROM 'done' ORDER BY d.depends_on",
                    params![t.id],
                )
                .context("listing the dependencies a task waits on")?
                .iter()
                .map(|r| Ok(r.try_get(0)?))
                .collect::<Result<Vec<i64>>>()?;
            out.push((t.id, on));
        }
        Ok(out)
    }
}

impl LiveWrites for PgTx<'_> {
    /// Nothing is kept on PostgreSQL: nothing to settle.
    fn settle_waits(&self) -> Result<usize> {
        Ok(0)
    }
}
