//! The deploy window (SPEC §7): `deploy-begin` and `finalize-deploy`.
//!
//! `deploy-begin` opens the critical window right before the irreversible merge/deploy
//! step: it takes the repo's merge lease and sets the `initiated` marker, so a STOP that
//! arrives now is deferred instead of killing a half-done deploy. `finalize-deploy` closes
//! it: marker cleared, lease released, deployer job marked, then a pending deferred STOP is
//! applied as a forced full reset; otherwise success → `done`, failure → stays in `deploy`
//! with a notification.

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use crate::error::{temp_fail, Coded, ExitKind};
use crate::model::{Job, Lease, Task};
use crate::outbox::{self, EffectReport};
use crate::stop::{self, StopOptions};
use crate::store::{LeaseOutcome, Writer};
use crate::{tasks, Ctx};

#[derive(Debug, Clone, Serialize)]
pub struct BeginResult {
    pub ok: bool,
    pub note: String,
    pub lease: Option<Lease>,
    pub marker: String,
    pub task: Task,
}

pub fn begin(ctx: &Ctx, reference: &str) -> Result<BeginResult> {
    let task = tasks::resolve(ctx, reference)?;
    let (note, lease) = ctx.store.write(|w| {
        let Some(task) = w.task(task.id)? else {
            anyhow::bail!("task {} vanished", task.id);
        };
        if task.is_terminal() {
            return Err(Coded::new(
                ExitKind::Failure,
                format!("{} is {}: no deploy may start", task.label(), task.stage),
            )
            .into());
        }
        if task.cancel_requested_at.is_some() {
            return Err(Coded::new(
                ExitKind::Failure,
                format!(
                    "{} has a STOP pending: the deploy must not start",
                    task.label()
                ),
            )
            .with_hint("the deployer should exit; reconcile applies the STOP")
            .into());
        }
        let branch = task
            .branch
            .clone()
            .ok_or_else(|| crate::error::bad_input(format!("{} has no branch", task.label())))?;
        let wi = task
            .original_work_item()
            .ok_or_else(|| {
                crate::error::bad_input(format!("{} has no work item id", task.label()))
            })?
            .to_string();
        let note = match w.acquire_lease(&task.repo, &branch, task.id)? {
            LeaseOutcome::Acquired => "lease-acquired",
            LeaseOutcome::AlreadyHeld => "lease-already-held",
            LeaseOutcome::HeldBy(l) => {
                return Err(temp_fail(format!(
                    "the merge lease of {} is held by branch {} (task {})",
                    task.repo,
                    l.branch,
                    l.task_id
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into())
                )))
            }
        };
        w.set_marker(&task.repo, &wi, "initiated", task.id)?;
        w.event(
            Some(task.id),
            "deploy_initiated",
            &json!({ "repo": task.repo, "branch": branch, "lease": note }),
        )?;
        Ok((note.to_string(), w.lease(&task.repo)?))
    })?;
    Ok(BeginResult {
        ok: true,
        note,
        lease,
        marker: "initiated".into(),
        task: ctx.store.read(|r| r.task(task.id))?.unwrap_or(task),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalizeResult {
    pub ok: bool,
    pub outcome: Outcome,
    /// `done`, `deploy-failed`, `cancelled` (a deferred STOP applied), `not-in-deploy` or
    /// `already-terminal:<stage>`.
    pub note: String,
    pub lease_released: bool,
    pub marker_cleared: bool,
    pub jobs: Vec<Job>,
    pub task: Option<Task>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<EffectReport>,
    /// Agent processes stopped by an applied deferred STOP.
    pub stopped: usize,
}

/// After a deployer's last attempt failed, frees the repo's merge lease held by the task's
/// branch, so the repo's other deployers are not blocked until someone acts — unless a
/// deploy is `initiated`: its outcome is unknown and a person closes the window with
/// `finalize-deploy`.
pub fn release_lease_after_failed_deployer(w: &Writer, task: &Task) -> Result<bool> {
    if let Some(wi) = task.original_work_item() {
        if w.marker(&task.repo, wi)?.as_deref() == Some("initiated") {
            return Ok(false);
        }
    }
    let Some(branch) = &task.branch else {
        return Ok(false);
    };
    let released = w.release_lease(&task.repo, branch)?;
    if released {
        w.event(
            Some(task.id),
            "lease_released",
            &json!({ "repo": task.repo, "branch": branch, "why": "the deployer failed its last attempt" }),
        )?;
    }
    Ok(released)
}

/// What `finalize_tx` did.
pub struct Finalized {
    pub note: String,
    pub lease_released: bool,
    pub marker_cleared: bool,
    pub jobs: Vec<Job>,
}

/// The finalizer's transaction, shared with `complete` of a deployer job. With
/// `mark_jobs`, the task's running deployer jobs are ended as the outcome says.
pub fn finalize_tx(
    w: &Writer,
    ctx: &Ctx,
    task: &Task,
    outcome: Outcome,
    mark_jobs: bool,
) -> Result<Finalized> {
    let marker_cleared = match task.original_work_item() {
        Some(wi) => w.clear_marker(&task.repo, wi)?,
        None => false,
    };
    let lease_released = match &task.branch {
        Some(b) => w.release_lease(&task.repo, b)?,
        None => false,
    };
    let mut jobs = Vec::new();
    if mark_jobs {
        let status = match outcome {
            Outcome::Success => "done",
            Outcome::Failure => "failed",
        };
        for j in w.jobs_of_task_in(task.id, "running")? {
            if j.agent == "deployer" && w.finish_running(j.id, j.run_id, status, None)? {
                jobs.push(w.job(j.id)?.unwrap_or(j));
            }
        }
    }
    w.event(
        Some(task.id),
        "deploy_finalized",
        &json!({
            "outcome": outcome,
            "lease_released": lease_released,
            "marker_cleared": marker_cleared,
            "jobs": jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        }),
    )?;
    let note = if task.is_terminal() {
        format!("already-terminal:{}", task.stage)
    } else if task.cancel_requested_at.is_some() {
        stop::full_reset_tx(w, &ctx.config, task, &StopOptions::deferred(task))?;
        "cancelled".into()
    } else if task.stage != "deploy" {
        "not-in-deploy".into()
    } else {
        match outcome {
            Outcome::Success => {
                w.set_stage(task.id, "deploy", "done")?;
                w.event(
                    Some(task.id),
                    "stage_changed",
                    &json!({ "from": "deploy", "to": "done" }),
                )?;
                outbox::enqueue_notification(
                    w,
                    &ctx.config,
                    task,
                    "deployed",
                    &format!("{} was deployed; the task is done.", task.label()),
                    json!({}),
                )?;
                "done".into()
            }
            Outcome::Failure => {
                outbox::enqueue_notification(
                    w,
                    &ctx.config,
                    task,
                    "deploy_failed",
                    &format!(
                        "the deploy of {} failed; the task stays in deploy (move it to Confirm Deploy to retry, or STOP it).",
                        task.label()
                    ),
                    json!({}),
                )?;
                "deploy-failed".into()
            }
        }
    };
    Ok(Finalized {
        note,
        lease_released,
        marker_cleared,
        jobs,
    })
}

pub fn finalize(ctx: &Ctx, reference: &str, outcome: Outcome) -> Result<FinalizeResult> {
    let task = tasks::resolve(ctx, reference)?;
    let f = ctx.store.write(|w| {
        let current = w.task(task.id)?.unwrap_or_else(|| task.clone());
        finalize_tx(w, ctx, &current, outcome, true)
    })?;
    let effects = outbox::run_for_task(ctx, task.id)?;
    Ok(FinalizeResult {
        ok: true,
        outcome,
        note: f.note,
        lease_released: f.lease_released,
        marker_cleared: f.marker_cleared,
        jobs: f.jobs,
        stopped: effects.iter().filter(|e| e.stopped_an_agent()).count(),
        effects,
        task: ctx.store.read(|r| r.task(task.id))?,
    })
}
