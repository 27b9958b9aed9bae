//! Tasks, their dependencies and their audit trail, on PostgreSQL. Inside a write, a read
//! of a task locks its row (`FOR UPDATE`): the transaction decides about that task, and no
//! other may decide about it until the commit.

use anyhow::{Context, Result};
use serde_json::Value;

use super::{json_col, params, task_row, PgTx, TASK_COLS};
use crate::model::{Task, TaskEvent};
use crate::pipeline::Stage;
use crate::store::{NewTask, TaskReads, TaskWrites};

impl PgTx<'_> {
    fn tasks(&self, sql: &str, params: &[super::Typed<'_>]) -> Result<Vec<Task>> {
        self.rows(sql, params)?.iter().map(task_row).collect()
    }

    fn task_opt(&self, sql: &str, params: &[super::Typed<'_>]) -> Result<Option<Task>> {
        self.opt(sql, params)?.as_ref().map(task_row).transpose()
    }

    fn ids(&self, sql: &str, params: &[super::Typed<'_>]) -> Result<Vec<i64>> {
        self.rows(sql, params)?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    fn count(&self, sql: &str, params: &[super::Typed<'_>]) -> Result<i64> {
        Ok(self.one(sql, params)?.try_get(0)?)
    }
}

impl TaskReads for PgTx<'_> {
    fn peek_task(&self, id: i64) -> Result<Option<Task>> {
        self.task_opt(
            &format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1"),
            params![id],
        )
        .with_context(|| format!("reading task {id}"))
    }

    fn task(&self, id: i64) -> Result<Option<Task>> {
        self.task_opt(
            &format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1{}", self.lock()),
            params![id],
        )
        .with_context(|| format!("reading task {id}"))
    }

    fn find_task(&self, reference: &str) -> Result<Option<Task>> {
        let reference = reference.trim();
        // PostgreSQL text cannot hold a NUL: no stored key has one.
        if reference.contains('\0') {
            return Ok(None);
        }
        if let Ok(id) = reference.parse::<i64>() {
            return self.task(id);
        }
        self.task_opt(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE work_item_id = $1
                     UNION ALL SELECT id FROM tasks WHERE plane_id = $1
                     UNION ALL SELECT id FROM tasks WHERE plane_issue_id = $1
                     LIMIT 1){}",
                self.lock()
            ),
            params![reference],
        )
        .with_context(|| format!("looking up task {reference:?}"))
    }

    fn find_task_by_plane_issue(&self, issue_id: &str) -> Result<Option<Task>> {
        if issue_id.contains('\0') {
            return Ok(None);
        }
        self.task_opt(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE plane_id = $1
                     UNION ALL SELECT id FROM tasks WHERE plane_issue_id = $1
                     LIMIT 1){}",
                self.lock()
            ),
            params![issue_id],
        )
        .with_context(|| format!("looking up the task of Plane issue {issue_id:?}"))
    }

    fn find_tombstoned(&self, reference: &str) -> Result<Option<i64>> {
        if reference.contains('\0') {
            return Ok(None);
        }
        Ok(self
            .ids(
                "SELECT id FROM tasks
                 WHERE starts_with(work_item_id, $1 || '#cancelled-')
                    OR starts_with(plane_id, $1 || '#cancelled-')
                 ORDER BY id DESC LIMIT 1",
                params![reference.trim()],
            )
            .context("looking up cancelled tasks")?
            .into_iter()
            .next())
    }

    fn task_holding_keys(
        &self,
        work_item_id: Option<&str>,
        plane_id: Option<&str>,
    ) -> Result<Option<Task>> {
        self.task_opt(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE work_item_id = $1
                     UNION ALL SELECT id FROM tasks WHERE plane_id = $2
                     LIMIT 1)"
            ),
            params![work_item_id, plane_id],
        )
        .context("looking up the task holding a key")
    }

    fn live_task_on_branch(
        &self,
        repo: &str,
        branch: &str,
        except: Option<i64>,
    ) -> Result<Option<i64>> {
        Ok(self
            .ids(
                "SELECT id FROM tasks
                 WHERE repo = $1 AND branch = $2 AND stage NOT IN ('done', 'cancelled')
                   AND id IS DISTINCT FROM $3
                 LIMIT 1",
                params![repo, branch, except],
            )
            .with_context(|| format!("looking up the live task on branch {branch} of {repo}"))?
            .into_iter()
            .next())
    }

    fn list_tasks(&self, stage: Option<&str>, repo: Option<&str>, limit: i64) -> Result<Vec<Task>> {
        self.tasks(
            &format!(
                "SELECT {TASK_COLS} FROM tasks
                 WHERE ($1::text IS NULL OR stage = $1) AND ($2::text IS NULL OR repo = $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            params![stage, repo, limit],
        )
        .context("listing tasks")
    }

    fn live_tasks(&self) -> Result<Vec<Task>> {
        self.tasks(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE stage NOT IN ('done', 'cancelled') ORDER BY id"
            ),
            params![],
        )
        .context("reading the live tasks")
    }

    fn events(&self, task_id: i64) -> Result<Vec<TaskEvent>> {
        self.rows(
            "SELECT id, task_id, at, kind, detail FROM task_events WHERE task_id = $1 ORDER BY id",
            params![task_id],
        )?
        .iter()
        .map(|r| {
            Ok(TaskEvent {
                id: r.try_get(0)?,
                task_id: r.try_get(1)?,
                at: r.try_get(2)?,
                kind: r.try_get(3)?,
                detail: json_col(r.try_get(4)?),
            })
        })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("reading the log of task {task_id}"))
    }

    fn deps_of(&self, task_id: i64) -> Result<Vec<i64>> {
        self.ids(
            "SELECT depends_on FROM task_deps WHERE task_id = $1 ORDER BY depends_on",
            params![task_id],
        )
    }

    fn dependents(&self, task_id: i64) -> Result<Vec<i64>> {
        self.ids(
            "SELECT t.id FROM task_deps d JOIN tasks t ON t.id = d.task_id
             WHERE d.depends_on = $1 AND t.stage NOT IN ('done', 'cancelled')
             ORDER BY t.id",
            params![task_id],
        )
        .with_context(|| format!("reading the tasks that depend on task {task_id}"))
    }

    fn has_deps(&self) -> Result<bool> {
        Ok(self
            .one("SELECT EXISTS(SELECT 1 FROM task_deps)", params![])?
            .try_get(0)?)
    }

    fn count_terminal_tasks(&self) -> Result<i64> {
        self.count(
            "SELECT count(*) FROM tasks WHERE stage IN ('done', 'cancelled')",
            params![],
        )
    }

    fn count_tasks_in_stage(&self, stage: &str) -> Result<i64> {
        self.count(
            "SELECT count(*) FROM tasks WHERE stage = $1",
            params![stage],
        )
    }

    fn task_counts(&self) -> Result<Vec<(String, i64)>> {
        self.rows(
            "SELECT stage, count(*) FROM tasks GROUP BY stage ORDER BY stage",
            params![],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>>>()
        .context("counting tasks by stage")
    }

    fn recent_cancelled(&self, limit: i64) -> Result<Vec<Task>> {
        self.tasks(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE cancelled_at IS NOT NULL
                 ORDER BY cancelled_at DESC LIMIT $1"
            ),
            params![limit],
        )
    }

    fn pending_cancels(&self) -> Result<Vec<Task>> {
        self.tasks(
            &format!(
                "SELECT {TASK_COLS} FROM tasks
                 WHERE cancel_requested_at IS NOT NULL AND stage NOT IN ('done', 'cancelled')
                 ORDER BY id"
            ),
            params![],
        )
        .context("reading the pending deferred stops")
    }

    fn count_pending_cancels(&self) -> Result<i64> {
        self.count(
            "SELECT count(*) FROM tasks
             WHERE cancel_requested_at IS NOT NULL AND stage NOT IN ('done', 'cancelled')",
            params![],
        )
    }

    fn julian_days_ago(&self, days: f64) -> Result<f64> {
        Ok(self
            .one("SELECT orch_julian(orch_now()) - $1", params![days])
            .context("reading the database clock")?
            .try_get(0)?)
    }
}

impl TaskWrites for PgTx<'_> {
    fn event(&self, task_id: Option<i64>, kind: &str, detail: &Value) -> Result<()> {
        self.exec(
            "INSERT INTO task_events (task_id, at, kind, detail) VALUES ($1, orch_now(), $2, $3)",
            params![task_id, kind, detail.to_string()],
        )
        .with_context(|| format!("recording event {kind}"))?;
        Ok(())
    }

    fn insert_task(&self, t: &NewTask) -> Result<Option<i64>> {
        Ok(self
            .ids(
                "INSERT INTO tasks (plane_id, work_item_id, plane_issue_id, project_id, repo, branch,
                                    title, stage, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, orch_now(), orch_now())
                 ON CONFLICT DO NOTHING RETURNING id",
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
            )
            .context("inserting a task")?
            .into_iter()
            .next())
    }

    fn add_dep(&self, task_id: i64, depends_on: i64) -> Result<()> {
        self.exec(
            "INSERT INTO task_deps (task_id, depends_on) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            params![task_id, depends_on],
        )
        .context("recording a dependency")?;
        Ok(())
    }

    fn set_stage(&self, task_id: i64, from: Stage, to: Stage) -> Result<bool> {
        Ok(self.exec(
            "UPDATE tasks SET stage = $3, updated_at = orch_now()
             WHERE id = $1 AND stage = $2 AND stage NOT IN ('done', 'cancelled')",
            params![task_id, from.as_str(), to.as_str()],
        )? == 1)
    }

    fn mark_task_cancelled(&self, task_id: i64, reason: &str) -> Result<bool> {
        Ok(self.exec(
            "UPDATE tasks SET stage = 'cancelled', cancelled_at = orch_now(),
                    updated_at = orch_now(), cancel_reason = $2,
                    plane_id = CASE WHEN plane_id IS NULL OR strpos(plane_id, '#cancelled-') > 0
                                    THEN plane_id ELSE plane_id || '#cancelled-' || id END,
                    work_item_id = CASE WHEN work_item_id IS NULL OR strpos(work_item_id, '#cancelled-') > 0
                                    THEN work_item_id ELSE work_item_id || '#cancelled-' || id END,
                    plane_issue_id = CASE WHEN plane_issue_id IS NULL OR strpos(plane_issue_id, '#cancelled-') > 0
                                    THEN plane_issue_id ELSE plane_issue_id || '#cancelled-' || id END
             WHERE id = $1 AND stage NOT IN ('done', 'cancelled')",
            params![task_id, reason],
        )? == 1)
    }

    fn set_cancel_requested(&self, task_id: i64, reason: &str) -> Result<bool> {
        Ok(self.exec(
            "UPDATE tasks SET cancel_requested_at = orch_now(), cancel_reason = $2,
                    updated_at = orch_now()
             WHERE id = $1 AND cancel_requested_at IS NULL AND stage NOT IN ('done', 'cancelled')",
            params![task_id, reason],
        )? == 1)
    }
}
