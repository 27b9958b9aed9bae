//! `orchctl task add|show|list|log`: tasks for operators who work without Plane.
//!
//! `add` validates every name before anything is written, then creates the task and the
//! first job of its stage in one transaction (a task added in `deploy` parks awaiting
//! Confirm Deploy, without a job).

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::error::{bad_input, Coded, ExitKind};
use crate::model::{Job, Lease, OutboxRow, Task, TaskEvent};
use crate::names;
use crate::pipeline::{self, Awaiting};
use crate::store::{NewTask, Writer};
use crate::Ctx;

#[derive(Debug, Clone, Default)]
pub struct AddTask {
    pub repo: String,
    pub work_item: String,
    pub plane_id: Option<String>,
    pub project_id: Option<String>,
    pub branch: Option<String>,
    pub title: Option<String>,
    pub stage: Option<String>,
    pub depends_on: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub task: Task,
    pub job: Option<Job>,
}

/// Inserts a task and the first job of its stage; used by `task add` and by Plane intake.
pub fn insert_with_job(w: &Writer, new: &NewTask, source: &str) -> Result<(i64, Option<i64>)> {
    let Some(id) = w.insert_task(new)? else {
        return Err(duplicate(w, new));
    };
    w.event(
        Some(id),
        "created",
        &json!({ "stage": new.stage, "source": source, "branch": new.branch }),
    )?;
    let job = match pipeline::entry_agent(&new.stage) {
        Some(agent) => {
            let job = w.insert_job(Some(id), agent, &new.repo)?;
            w.event(
                Some(id),
                "job_queued",
                &json!({ "job_id": job, "agent": agent }),
            )?;
            Some(job)
        }
        None => None,
    };
    Ok((id, job))
}

/// Exit 65 naming the task that already holds `new`'s work item id or Plane id.
fn duplicate(w: &Writer, new: &NewTask) -> anyhow::Error {
    let holder = w
        .task_holding_keys(new.work_item_id.as_deref(), new.plane_id.as_deref())
        .ok()
        .flatten();
    let Some(t) = holder else {
        return bad_input(format!(
            "a task already has work item {:?} or Plane id {:?}",
            new.work_item_id.as_deref().unwrap_or(""),
            new.plane_id.as_deref().unwrap_or("")
        ));
    };
    let key = if t.work_item_id.is_some() && t.work_item_id == new.work_item_id {
        format!("work item {:?}", t.work_item_id.as_deref().unwrap_or(""))
    } else {
        format!("Plane id {:?}", t.plane_id.as_deref().unwrap_or(""))
    };
    let name = match t.original_work_item() {
        Some(w) => format!("task {} ({w}, {}, repo {})", t.id, t.stage, t.repo),
        None => format!("task {} ({}, repo {})", t.id, t.stage, t.repo),
    };
    let err = Coded::new(ExitKind::DataErr, format!("{name} already has {key}"));
    let err = if t.is_terminal() {
        err
    } else {
        err.with_hint(format!(
            "`orchctl task show {}` shows it; stopping it frees its keys",
            t.id
        ))
    };
    err.into()
}

pub fn add(ctx: &Ctx, a: &AddTask) -> Result<Added> {
    names::validate_repo(&a.repo)?;
    names::validate_work_item(&a.work_item)?;
    let stage = a.stage.clone().unwrap_or_else(|| "analysis".into());
    if !pipeline::LIVE_STAGES.contains(&stage.as_str()) {
        return Err(bad_input(format!(
            "invalid stage {stage:?}: a task starts in one of {}",
            pipeline::LIVE_STAGES.join(", ")
        )));
    }
    let branch = a
        .branch
        .clone()
        .unwrap_or_else(|| names::default_branch_name(&a.work_item, a.title.as_deref()));
    names::validate_branch(&branch)?;
    for key in [&a.plane_id, &a.project_id].into_iter().flatten() {
        if key.is_empty() || key.contains('#') || key.chars().any(char::is_control) {
            return Err(bad_input(format!("invalid Plane id {key:?}")));
        }
    }
    let new = NewTask {
        plane_id: a.plane_id.clone(),
        work_item_id: Some(a.work_item.clone()),
        plane_issue_id: a.plane_id.clone(),
        project_id: a.project_id.clone(),
        repo: a.repo.clone(),
        branch: Some(branch),
        title: a.title.clone(),
        stage,
    };
    let (id, job) = ctx.store.write(|w| {
        let mut deps = Vec::new();
        for d in &a.depends_on {
            let t = w
                .find_task(d)?
                .ok_or_else(|| bad_input(format!("--depends-on {d:?}: no such task")))?;
            deps.push(t.id);
        }
        let (id, job) = insert_with_job(w, &new, "task add")?;
        for d in deps {
            if d == id {
                return Err(bad_input("a task cannot depend on itself"));
            }
            w.add_dep(id, d)?;
        }
        Ok((id, job))
    })?;
    ctx.store.read(|r| {
        Ok(Added {
            task: r.task(id)?.context("the new task vanished")?,
            job: match job {
                Some(j) => r.job(j)?,
                None => None,
            },
        })
    })
}

/// A warning when `repo` has no git clone at `$ORCH_REPOS_DIR/<repo>`: the task is added
/// all the same (the clone may come later), but agents, worktrees and STOP's branch
/// removal all work from that clone, and a typo in `--repo` would otherwise go unnoticed.
pub fn missing_clone_warning(config: &crate::Config, repo: &str) -> Option<String> {
    let clone = config.repos_dir.join(repo);
    if clone.join(".git").exists() {
        return None;
    }
    let what = if clone.is_dir() {
        "is not a git clone"
    } else {
        "does not exist"
    };
    Some(format!(
        "repo {repo:?} has no clone: {} {what} (agents, worktrees and STOP's branch removal \
         need one: git clone <url> {})",
        clone.display(),
        clone.display()
    ))
}

/// Resolves a reference or fails with a helpful error.
pub fn resolve(ctx: &Ctx, reference: &str) -> Result<Task> {
    ctx.store.read(|r| {
        if let Some(t) = r.find_task(reference)? {
            return Ok(t);
        }
        let hint = match r.find_tombstoned(reference)? {
            Some(id) => format!("task {id} had this key and was cancelled; refer to it by its id: {id}"),
            None => "use the task id, the work item id (ORCH-310) or the Plane issue id; `orchctl task list` shows them".into(),
        };
        Err(Coded::new(ExitKind::Failure, format!("no task matches {reference:?}"))
            .with_hint(hint)
            .into())
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub task: Task,
    pub jobs: Vec<Job>,
    pub depends_on: Vec<i64>,
    pub lease: Option<Lease>,
    pub deploy_marker: Option<String>,
    pub outbox: Vec<OutboxRow>,
    /// What the task waits for (SPEC §14): `approval`, `deploy_confirmation`, `retry`,
    /// `dependency`, `cancelled_dependency`, or null.
    pub awaiting: Option<&'static str>,
}

pub fn show(ctx: &Ctx, reference: &str) -> Result<TaskView> {
    let task = resolve(ctx, reference)?;
    ctx.store.read(|r| {
        let lease = r
            .lease(&task.repo)?
            .filter(|l| Some(&l.branch) == task.branch.as_ref());
        let deploy_marker = match task.original_work_item() {
            Some(wi) => r.marker(&task.repo, wi)?,
            None => None,
        };
        Ok(TaskView {
            awaiting: r.awaiting_of(task.id)?.map(Awaiting::show),
            jobs: r.jobs_of_task(task.id)?,
            depends_on: r.deps_of(task.id)?,
            outbox: r.effects_of_task(task.id)?,
            lease,
            deploy_marker,
            task,
        })
    })
}

pub fn list(ctx: &Ctx, stage: Option<&str>, repo: Option<&str>, limit: i64) -> Result<Vec<Task>> {
    ctx.store.read(|r| r.list_tasks(stage, repo, limit))
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskLog {
    pub task: Task,
    pub events: Vec<TaskEvent>,
}

pub fn log(ctx: &Ctx, reference: &str) -> Result<TaskLog> {
    let task = resolve(ctx, reference)?;
    let events = ctx.store.read(|r| r.events(task.id))?;
    Ok(TaskLog { task, events })
}
