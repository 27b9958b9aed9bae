//! The deploy window (SPEC §7): `deploy-begin` and `finalize-deploy`.
//!
//! `deploy-begin` opens the critical window right before the irreversible merge/deploy
//! step: it takes the repo's merge lease and sets the `initiated` marker, so a STOP that
//! arrives now is deferred instead of killing a half-done deploy. `finalize-deploy` closes
//! it: marker cleared, lease released, deployer job marked, then a pending deferred STOP is
//! applied as a forced full reset; otherwise success → `done`, failure → stays in `deploy`
//! with a notification.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::error::{temp_fail, Coded, ExitKind};
use crate::model::{Job, Lease, Task};
use crate::outbox::{self, EffectReport};
use crate::pipeline::{self, Agent, Stage, Trigger};
use crate::stop::{self, StopOptions};
use crate::store::{LeaseOutcome, Reader, Writer};
use crate::transitions::{self, Via};
use crate::{tasks, Ctx};

/// What `deploy-begin` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BeginNote {
    /// The merge lease was free and is now the task's.
    LeaseAcquired,
    /// The task's branch held the lease already (its deployer's claim took it).
    LeaseAlreadyHeld,
    /// A repeat: the task's window was open already; nothing changed.
    AlreadyInitiated,
}

#[derive(Debug, Clone, Serialize)]
pub struct BeginResult {
    pub ok: bool,
    pub note: BeginNote,
    pub lease: Option<Lease>,
    pub marker: String,
    pub task: Task,
}

fn refuse(message: String) -> anyhow::Error {
    Coded::new(ExitKind::Failure, message).into()
}

/// Opens the task's deploy window. Only a live task in `deploy` with no STOP pending may
/// (SPEC §7): anything else is exit 1 naming the stage or the stop, nothing changed.
pub fn begin(ctx: &Ctx, reference: &str) -> Result<BeginResult> {
    let task = tasks::resolve(ctx, reference)?;
    let (note, lease) = ctx.store.write(|w| {
        let Some(task) = w.task(task.id)? else {
            anyhow::bail!("task {} vanished", task.id);
        };
        if task.is_terminal() {
            return Err(refuse(format!(
                "{} is {}: no deploy may start",
                task.label(),
                task.stage
            )));
        }
        if task.cancel_requested_at.is_some() {
            return Err(Coded::new(
                ExitKind::Failure,
                format!(
                    "{} (in {}) has a STOP pending: the deploy must not start",
                    task.label(),
                    task.stage
                ),
            )
            .with_hint("the deployer should exit; reconcile applies the STOP")
            .into());
        }
        if task.stage != Stage::Deploy {
            return Err(refuse(format!(
                "{} is in {}: a deploy window opens only for a task in deploy",
                task.label(),
                task.stage
            )));
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
        let holds = w.lease(&task.repo)?.is_some_and(|l| l.branch == branch);
        if holds && w.marker(&task.repo, &wi)?.as_deref() == Some("initiated") {
            return Ok((BeginNote::AlreadyInitiated, w.lease(&task.repo)?));
        }
        let note = match w.acquire_lease(&task.repo, &branch, task.id)? {
            LeaseOutcome::Acquired => BeginNote::LeaseAcquired,
            LeaseOutcome::AlreadyHeld => BeginNote::LeaseAlreadyHeld,
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
        Ok((note, w.lease(&task.repo)?))
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
    pub note: FinalizeNote,
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

/// How the deploy window closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalizeNote {
    /// Deployed: the task is done.
    Done,
    /// The step failed: the task stays in deploy.
    DeployFailed,
    /// A deferred STOP was applied (the deploy failed, or its outcome is unknown).
    Cancelled,
    /// The change was deployed, then the deferred STOP was applied.
    CancelledAfterDeploy,
    /// The task was no longer in deploy: only the window was closed.
    NotInDeploy,
    AlreadyTerminal(Stage),
}

impl FinalizeNote {
    pub fn word(self) -> String {
        match self {
            FinalizeNote::Done => "done".into(),
            FinalizeNote::DeployFailed => "deploy-failed".into(),
            FinalizeNote::Cancelled => "cancelled".into(),
            FinalizeNote::CancelledAfterDeploy => "cancelled-after-deploy".into(),
            FinalizeNote::NotInDeploy => "not-in-deploy".into(),
            FinalizeNote::AlreadyTerminal(s) => format!("already-terminal:{s}"),
        }
    }
}

impl Serialize for FinalizeNote {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.word())
    }
}

/// What `finalize_tx` did.
pub struct Finalized {
    pub note: FinalizeNote,
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
    // Only this task's hold on the lease: a same-named branch of another task keeps its own.
    let lease_released = match &task.branch {
        Some(b) => w.release_lease_of(&task.repo, b, task.id)?,
        None => false,
    };
    let mut jobs = Vec::new();
    if mark_jobs {
        let status = match outcome {
            Outcome::Success => "done",
            Outcome::Failure => "failed",
        };
        for j in w.jobs_of_task_in(task.id, "running")? {
            if j.agent == Agent::Deployer.as_str()
                && w.finish_running(j.id, j.run_id, status, None)?
            {
                // Its run ends here: a deployer that is not the caller stops with it.
                crate::jobs::end_from_outside(w, ctx, &j)?;
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
            "source": Via::Cli,
        }),
    )?;
    let note = if task.is_terminal() {
        FinalizeNote::AlreadyTerminal(task.stage)
    } else if task.cancel_requested_at.is_some() {
        // The STOP waited for the irreversible step. After a successful deploy the change is
        // live: the log and the notification must not claim the stop prevented it.
        let deployed = outcome == Outcome::Success && task.stage == Stage::Deploy;
        if deployed {
            stop::full_reset_after_deploy_tx(w, &ctx.config, task)?;
            FinalizeNote::CancelledAfterDeploy
        } else {
            stop::full_reset_tx(w, &ctx.config, task, &StopOptions::deferred(task))?;
            FinalizeNote::Cancelled
        }
    } else if task.stage != Stage::Deploy {
        FinalizeNote::NotInDeploy
    } else {
        match outcome {
            Outcome::Success => {
                let m = pipeline::step(Stage::Deploy, Trigger::Deployed)
                    .context("the stage map has no move for a deploy")?;
                transitions::carry_out(w, task, m, Via::Cli, &json!({}))?;
                enqueue_done_cleanup(w, &ctx.config, task)?;
                outbox::enqueue_notification(
                    w,
                    &ctx.config,
                    task,
                    "deployed",
                    &format!("{} was deployed; the task is done.", task.label()),
                    json!({}),
                )?;
                FinalizeNote::Done
            }
            Outcome::Failure => {
                outbox::enqueue_notification(
                    w,
                    &ctx.config,
                    task,
                    "deploy_failed",
                    &format!(
                        "the deploy of {} failed; the task stays in deploy (move it to Confirm Deploy or run `orchctl confirm-deploy` to try again, or STOP it).",
                        task.label()
                    ),
                    json!({}),
                )?;
                FinalizeNote::DeployFailed
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

/// A task that is done gives its worktree and local branch back (SPEC §13): removed through
/// the outbox, the clone and its docs kept; the remote branch goes too only with
/// `ORCH_DELETE_BRANCH_ON_DONE` (it holds the work that was deployed).
fn enqueue_done_cleanup(w: &Writer, config: &crate::Config, task: &Task) -> Result<()> {
    let Some(branch) = &task.branch else {
        return Ok(());
    };
    outbox::enqueue(
        w,
        Some(task.id),
        &outbox::Effect::RemoveWorktree {
            repo: task.repo.clone(),
            branch: branch.clone(),
        },
    )?;
    if config.delete_branch_on_done {
        outbox::enqueue(
            w,
            Some(task.id),
            &outbox::Effect::DeleteRemoteBranch {
                repo: task.repo.clone(),
                branch: branch.clone(),
                commit: crate::names::validate_repo(&task.repo).ok().and_then(|()| {
                    crate::integrations::git::recorded_commit(
                        &config.repos_dir.join(&task.repo),
                        branch,
                    )
                }),
            },
        )?;
    }
    Ok(())
}

/// Whether the task has a deploy in progress: its initiated marker, or a running deployer.
fn deploy_in_progress(r: &Reader, task: &Task) -> Result<bool> {
    if let Some(wi) = task.original_work_item() {
        if r.marker(&task.repo, wi)?.as_deref() == Some("initiated") {
            return Ok(true);
        }
    }
    Ok(r.jobs_of_task_in(task.id, "running")?
        .iter()
        .any(|j| j.agent == Agent::Deployer.as_str()))
}

/// Closes the task's deploy window (SPEC §7). Without a deploy in progress it is exit 1
/// and nothing changes: a finalize can never stand in for the serial gate, nor release a
/// lease another task holds.
pub fn finalize(ctx: &Ctx, reference: &str, outcome: Outcome) -> Result<FinalizeResult> {
    let task = tasks::resolve(ctx, reference)?;
    let f = ctx.store.write(|w| {
        let current = w
            .task(task.id)?
            .with_context(|| format!("task {} vanished", task.id))?;
        if !deploy_in_progress(w, &current)? {
            return Err(Coded::new(
                ExitKind::Failure,
                format!("no deploy in progress for {} (it is in {}: no deploy-begin and no running deployer)", current.label(), current.stage),
            )
            .into());
        }
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
