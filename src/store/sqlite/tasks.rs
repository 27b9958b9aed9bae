//! Tasks, their dependencies and their audit trail, on SQLite.
//!
//! Reads of live sets name the partial index made for them (`INDEXED BY`): orchctl never
//! runs ANALYZE, and without statistics the planner could pick a wider one. Counts come
//! from the trigger-kept `task_counts` (constant time however long the history).

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::{json_col, task_row, SqliteTx, NOW_SQL, TASK_COLS};
use crate::model::{Task, TaskEvent};
use crate::pipeline::Stage;
use crate::store::{NewTask, TaskReads, TaskWrites};

impl TaskReads for SqliteTx<'_> {
    fn peek_task(&self, id: i64) -> Result<Option<Task>> {
        // One writer at a time: nothing to lock.
        self.task(id)
    }

    fn task(&self, id: i64) -> Result<Option<Task>> {
        self.c
            .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))?
            .query_row([id], task_row)
            .optional()
            .with_context(|| format!("reading task {id}"))
    }

    /// Resolves a task reference: numeric id, work item id or Plane issue id. Tombstoned
    /// keys carry a suffix and so no longer match.
    fn find_task(&self, reference: &str) -> Result<Option<Task>> {
        let reference = reference.trim();
        if let Ok(id) = reference.parse::<i64>() {
            return self.task(id);
        }
        self.c
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE work_item_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_issue_id = ?1
                     LIMIT 1)"
            ))?
            .query_row([reference], task_row)
            .optional()
            .with_context(|| format!("looking up task {reference:?}"))
    }

    /// The task mirroring Plane issue `issue_id` (by `plane_id`, else `plane_issue_id`).
    /// Unlike [`Reader::find_task`] a number is never read as a task id: a payload cannot
    /// name an arbitrary task. Tombstoned keys no longer match.
    fn find_task_by_plane_issue(&self, issue_id: &str) -> Result<Option<Task>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE plane_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_issue_id = ?1
                     LIMIT 1)"
            ))?
            .query_row([issue_id], task_row)
            .optional()
            .with_context(|| format!("looking up the task of Plane issue {issue_id:?}"))
    }

    /// The id of a cancelled task whose tombstoned key was `reference` (for a hint: the
    /// key itself no longer resolves).
    fn find_tombstoned(&self, reference: &str) -> Result<Option<i64>> {
        // A range on the unique indexes: `<key>#cancelled-` up to `<key>#cancelled.`.
        self.c
            .prepare_cached(
                "SELECT id FROM tasks WHERE work_item_id >= ?1 || '#cancelled-' AND work_item_id < ?1 || '#cancelled.'
                 UNION ALL
                 SELECT id FROM tasks WHERE plane_id >= ?1 || '#cancelled-' AND plane_id < ?1 || '#cancelled.'
                 ORDER BY id DESC LIMIT 1",
            )?
            .query_row([reference.trim()], |r| r.get(0))
            .optional()
            .context("looking up cancelled tasks")
    }

    /// The task whose `work_item_id` is `work_item_id` or whose `plane_id` is `plane_id`
    /// (the work item first). Tombstoned keys carry a suffix and so never match.
    fn task_holding_keys(
        &self,
        work_item_id: Option<&str>,
        plane_id: Option<&str>,
    ) -> Result<Option<Task>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE work_item_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_id = ?2
                     LIMIT 1)"
            ))?
            .query_row(params![work_item_id, plane_id], task_row)
            .optional()
            .context("looking up the task holding a key")
    }

    /// A live task other than `except` whose branch is `branch` of `repo` (through the
    /// partial index of live tasks' branches: the cost follows the live set, not history).
    fn live_task_on_branch(
        &self,
        repo: &str,
        branch: &str,
        except: Option<i64>,
    ) -> Result<Option<i64>> {
        self.c
            .prepare_cached(
                "SELECT id FROM tasks
                 WHERE repo = ?1 AND branch = ?2 AND stage NOT IN ('done', 'cancelled')
                   AND id IS NOT ?3
                 LIMIT 1",
            )?
            .query_row(params![repo, branch, except], |r| r.get(0))
            .optional()
            .with_context(|| format!("looking up the live task on branch {branch} of {repo}"))
    }

    fn list_tasks(&self, stage: Option<&str>, repo: Option<&str>, limit: i64) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks
             WHERE (?1 IS NULL OR stage = ?1) AND (?2 IS NULL OR repo = ?2)
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(params![stage, repo, limit], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("listing tasks")?;
        Ok(rows)
    }

    /// Live tasks (not terminal), oldest first.
    fn live_tasks(&self) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE stage NOT IN ('done', 'cancelled') ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn events(&self, task_id: i64) -> Result<Vec<TaskEvent>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT id, task_id, at, kind, detail FROM task_events WHERE task_id = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map([task_id], |r| {
                Ok(TaskEvent {
                    id: r.get(0)?,
                    task_id: r.get(1)?,
                    at: r.get(2)?,
                    kind: r.get(3)?,
                    detail: json_col(r.get(4)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("reading the log of task {task_id}"))?;
        Ok(rows)
    }

    fn deps_of(&self, task_id: i64) -> Result<Vec<i64>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT depends_on FROM task_deps WHERE task_id = ?1 ORDER BY depends_on",
        )?;
        let rows = stmt
            .query_map([task_id], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        Ok(rows)
    }

    /// The live tasks that depend on `task_id`.
    fn dependents(&self, task_id: i64) -> Result<Vec<i64>> {
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

    /// Whether any task dependency was ever recorded.
    fn has_deps(&self) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM task_deps)")?
            .query_row([], |r| r.get(0))?)
    }

    /// Tasks that are `done` or `cancelled` (kept by triggers: constant time).
    fn count_terminal_tasks(&self) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT coalesce(sum(n), 0) FROM task_counts WHERE stage IN ('done', 'cancelled')",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// Tasks in `stage` (kept by triggers: constant time).
    fn count_tasks_in_stage(&self, stage: &str) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached("SELECT coalesce((SELECT n FROM task_counts WHERE stage = ?1), 0)")?
            .query_row([stage], |r| r.get(0))?)
    }

    /// Task counts by stage (kept by triggers: constant time).
    fn task_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT stage, n FROM task_counts WHERE n <> 0 ORDER BY stage")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the task counters")?;
        Ok(rows)
    }

    /// The most recently cancelled tasks.
    fn recent_cancelled(&self, limit: i64) -> Result<Vec<Task>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE cancelled_at IS NOT NULL
             ORDER BY cancelled_at DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], task_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Live tasks with a deferred cancel waiting to be applied.
    fn pending_cancels(&self) -> Result<Vec<Task>> {
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
    fn count_pending_cancels(&self) -> Result<i64> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT count(*) FROM tasks INDEXED BY tasks_cancel_pending
                 WHERE cancel_requested_at IS NOT NULL AND stage NOT IN ('done', 'cancelled')",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// The database clock's now minus `days` days, as a Julian day number.
    fn julian_days_ago(&self, days: f64) -> Result<f64> {
        self.c
            .prepare_cached("SELECT julianday('now') - ?1")?
            .query_row([days], |r| r.get(0))
            .context("reading the database clock")
    }
}

impl TaskWrites for SqliteTx<'_> {
    /// Appends one row to the task's audit trail.
    fn event(&self, task_id: Option<i64>, kind: &str, detail: &Value) -> Result<()> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO task_events (task_id, at, kind, detail) VALUES (?1, {NOW_SQL}, ?2, ?3)"
            ))?
            .execute(params![task_id, kind, detail.to_string()])
            .with_context(|| format!("recording event {kind}"))?;
        Ok(())
    }

    fn insert_task(&self, t: &NewTask) -> Result<Option<i64>> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO tasks (plane_id, work_item_id, plane_issue_id, project_id, repo, branch,
                                    title, stage, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, {NOW_SQL}, {NOW_SQL})
                 ON CONFLICT DO NOTHING RETURNING id"
            ))?
            .query_row(
                params![
                    t.plane_id,
                    t.work_item_id,
                    t.plane_issue_id,
                    t.project_id,
                    t.repo,
                    t.branch,
                    t.title,
                    t.stage
                ],
                |r| r.get(0),
            )
            .optional()
            .context("inserting a task")
    }

    fn add_dep(&self, task_id: i64, depends_on: i64) -> Result<()> {
        self.c
            .prepare_cached(
                "INSERT OR IGNORE INTO task_deps (task_id, depends_on) VALUES (?1, ?2)",
            )?
            .execute([task_id, depends_on])
            .context("recording a dependency")?;
        Ok(())
    }

    /// Moves a live task from `from` to `to`; false when it was not in `from` any more.
    fn set_stage(&self, task_id: i64, from: Stage, to: Stage) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE tasks SET stage = ?3, updated_at = {NOW_SQL}
                 WHERE id = ?1 AND stage = ?2 AND stage NOT IN ('done', 'cancelled')"
            ))?
            .execute(params![task_id, from, to])?;
        Ok(n == 1)
    }

    /// Makes the task terminal `cancelled` and tombstones its keys (`<key>#cancelled-<id>`).
    /// False when it was already terminal.
    fn mark_task_cancelled(&self, task_id: i64, reason: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE tasks SET stage = 'cancelled', cancelled_at = {NOW_SQL},
                        updated_at = {NOW_SQL}, cancel_reason = ?2,
                        plane_id = CASE WHEN plane_id IS NULL OR instr(plane_id, '#cancelled-') > 0
                                        THEN plane_id ELSE plane_id || '#cancelled-' || id END,
                        work_item_id = CASE WHEN work_item_id IS NULL OR instr(work_item_id, '#cancelled-') > 0
                                        THEN work_item_id ELSE work_item_id || '#cancelled-' || id END,
                        plane_issue_id = CASE WHEN plane_issue_id IS NULL OR instr(plane_issue_id, '#cancelled-') > 0
                                        THEN plane_issue_id ELSE plane_issue_id || '#cancelled-' || id END
                 WHERE id = ?1 AND stage NOT IN ('done', 'cancelled')"
            ))?
            .execute(params![task_id, reason])?;
        Ok(n == 1)
    }

    /// Records a deferred cancel; false when one was already pending or the task is terminal.
    fn set_cancel_requested(&self, task_id: i64, reason: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE tasks SET cancel_requested_at = {NOW_SQL}, cancel_reason = ?2,
                        updated_at = {NOW_SQL}
                 WHERE id = ?1 AND cancel_requested_at IS NULL AND stage NOT IN ('done', 'cancelled')"
            ))?
            .execute(params![task_id, reason])?;
        Ok(n == 1)
    }
}
