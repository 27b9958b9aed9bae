//! Carrying out the stage map's moves ([`pipeline::MOVES`]) — the one implementation
//! behind `complete`, Plane's Approved / Rejected / Confirm Deploy (`event`), the operator
//! commands `approve`, `reject`, `confirm-deploy` and `retry` (SPEC §14), and
//! `finalize-deploy`'s move to `done`.
//!
//! [`decide`] checks a person's move against the task as it is inside the caller's write
//! transaction and either refuses it (a [`Refusal`], nothing written) or carries it out
//! ([`carry_out`]): queued jobs of the stage it leaves superseded, a lease released when
//! the task leaves `deploy` for earlier work, the stage moved under a guard, the next
//! agent's job queued, and the audit rows, each saying where the move came from
//! (`source`: `cli` or `plane`). Plane and the command line differ only in what they do
//! with the answer: `event` records an ignored delivery, a command exits 1 with one line.
//! The kill switch is not consulted: it governs Plane's STOP, and an operator acts.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Coded, ExitKind};
use crate::model::{Job, Task};
use crate::outbox::{self, Effect, EffectReport};
use crate::pipeline::{self, Agent, JobStatus, Move, Stage, Trigger};
use crate::store::{Reader, Writer};
use crate::{stop, tasks, Ctx};

/// Where a move came from, as the audit trail says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// An `orchctl` command (an operator, or an agent's `complete`).
    Cli,
    /// A Plane webhook delivery.
    Plane,
}

/// Why a person's move does not apply to the task now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Terminal(Stage),
    StopPending(Stage),
    WrongStage(Stage),
    /// A job of the task is still queued or running.
    JobActive(Stage, Box<Job>),
    /// A deployer runs or a deploy is initiated: the deploy window is open.
    DeployWindowOpen,
    /// `retry`: the stage's last job did not fail.
    NothingFailed {
        stage: Stage,
        agent: Agent,
        last: Option<JobStatus>,
    },
}

impl Refusal {
    /// The note of an `event` that this refusal turned into a no-op (`terminal:done`,
    /// `stop-pending`, `approved-in:review`, `job-active`, `rejected-in:deploy-busy`).
    pub fn note(&self, on: Trigger) -> String {
        match self {
            Refusal::Terminal(s) => format!("terminal:{s}"),
            Refusal::StopPending(_) => "stop-pending".into(),
            Refusal::WrongStage(s) => format!("{}-in:{s}", on.word()),
            Refusal::JobActive(..) => "job-active".into(),
            Refusal::DeployWindowOpen => format!("{}-in:deploy-busy", on.word()),
            Refusal::NothingFailed { .. } => "nothing-failed".into(),
        }
    }

    /// One line for an operator, naming the task's stage (or the pending stop).
    pub fn message(&self, task: &Task, on: Trigger) -> String {
        let name = task.label();
        let cmd = on.command();
        match self {
            Refusal::Terminal(s) => {
                format!("{name} is {s}: a finished task never changes again ({cmd} does not apply)")
            }
            Refusal::StopPending(s) => format!(
                "{name} (in {s}) has a STOP pending: {cmd} does not apply; the stop is applied when its deploy window closes"
            ),
            Refusal::WrongStage(s) => {
                let stages: Vec<String> = pipeline::stages_for(on)
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                format!(
                    "{name} is in {s}: {cmd} applies to a task in {}",
                    or_list(&stages)
                )
            }
            Refusal::JobActive(s, job) => format!(
                "{name} is in {s} with its {} job {} still {}: {cmd} applies once it has finished",
                job.agent, job.id, job.status
            ),
            Refusal::DeployWindowOpen => format!(
                "{name} is in deploy with its deploy window open (a deployer runs or deploy-begin was called): {cmd} waits for finalize-deploy"
            ),
            Refusal::NothingFailed { stage, agent, last } => match last {
                Some(st) => format!(
                    "{name} is in {stage} and its last {agent} job is {st}, not failed: retry applies to a stage whose last job failed"
                ),
                None => format!(
                    "{name} is in {stage} and has no {agent} job: retry applies to a stage whose last job failed"
                ),
            },
        }
    }
}

fn or_list(items: &[String]) -> String {
    match items {
        [] => "no stage".into(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// What a move did.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    pub from: Stage,
    pub to: Stage,
    /// The job queued on arrival, and its agent.
    pub job: Option<i64>,
    pub agent: Option<Agent>,
    /// Queued jobs of the stage it left, cancelled.
    pub superseded: Vec<i64>,
}

/// Whether a person's move `on` applies to `task` now (SPEC §14's preconditions, the same
/// for Plane and the command line).
pub fn check(r: &Reader, task: &Task, on: Trigger) -> Result<Result<&'static Move, Refusal>> {
    if task.is_terminal() {
        return Ok(Err(Refusal::Terminal(task.stage)));
    }
    if task.cancel_requested_at.is_some() {
        return Ok(Err(Refusal::StopPending(task.stage)));
    }
    let Some(m) = pipeline::step(task.stage, on) else {
        return Ok(Err(Refusal::WrongStage(task.stage)));
    };
    if task.stage == Stage::Deploy
        && ((on == Trigger::Rejected && r.has_running_job(task.id)?)
            || stop::in_critical_window(r, task)?)
    {
        return Ok(Err(Refusal::DeployWindowOpen));
    }
    // SPEC §14: a job of its stage still queued or running — a Confirm Deploy's deployer
    // that has not started included — leaves the task where it is.
    if let Some(job) = r.active_job(task.id)? {
        return Ok(Err(Refusal::JobActive(task.stage, Box::new(job))));
    }
    if on == Trigger::Retry {
        let agent = task
            .stage
            .agent()
            .context("a live stage without an agent")?;
        let last = r.latest_job_of(task.id, agent.as_str())?.map(|j| j.status);
        if last != Some(JobStatus::Failed) {
            return Ok(Err(Refusal::NothingFailed {
                stage: task.stage,
                agent,
                last,
            }));
        }
    }
    Ok(Ok(m))
}

/// [`check`], then [`carry_out`] when the move applies.
pub fn decide(
    w: &Writer,
    task: &Task,
    on: Trigger,
    via: Via,
    detail: &Value,
) -> Result<Result<Moved, Refusal>> {
    match check(w, task, on)? {
        Err(refusal) => Ok(Err(refusal)),
        Ok(m) => Ok(Ok(carry_out(w, task, m, via, detail)?)),
    }
}

/// Carries out move `m` on `task` inside the caller's transaction, writing the audit rows
/// (with `source` and the fields of `detail`). The caller has checked that it applies.
pub fn carry_out(w: &Writer, task: &Task, m: &Move, via: Via, detail: &Value) -> Result<Moved> {
    debug_assert_eq!(m.from, task.stage);
    let with = |base: Value| -> Value {
        let mut v = base;
        if let (Value::Object(o), Value::Object(extra)) = (&mut v, detail) {
            for (k, x) in extra {
                o.entry(k.clone()).or_insert_with(|| x.clone());
            }
        }
        v
    };
    let mut superseded = Vec::new();
    if m.from != m.to && m.on.is_by_people() {
        // The same words whoever asked (the audit row says who): twin rows stay equal.
        let why = format!("superseded: {}", m.on.word());
        superseded = w
            .cancel_jobs_for_task(task.id, true, &why)?
            .into_iter()
            .map(|j| j.id)
            .collect();
    }
    // Back to earlier work from deploy: the merge lease its branch may hold is not needed.
    if m.from == Stage::Deploy && !m.to.is_terminal() && m.to != Stage::Deploy {
        if let Some(branch) = &task.branch {
            if w.release_lease_of(&task.repo, branch, task.id)? {
                w.event(
                    Some(task.id),
                    "lease_released",
                    &with(json!({ "repo": task.repo, "branch": branch, "why": format!("the task left deploy ({})", m.on.word()), "source": via })),
                )?;
            }
        }
    }
    if m.from != m.to {
        if !w.set_stage(task.id, m.from, m.to)? {
            anyhow::bail!(
                "{} moved while it was being changed; nothing was done, retry",
                task.label()
            );
        }
        let mut d = json!({ "from": m.from, "to": m.to, "source": via });
        if !superseded.is_empty() {
            d["queued_jobs_cancelled"] = json!(superseded);
        }
        w.event(Some(task.id), "stage_changed", &with(d))?;
    }
    let job = match m.queue {
        Some(agent) => {
            let id = w.insert_job(Some(task.id), agent.as_str(), &task.repo)?;
            w.event(
                Some(task.id),
                "job_queued",
                &with(json!({ "job_id": id, "agent": agent, "source": via })),
            )?;
            Some(id)
        }
        None => None,
    };
    if let Some(waits) = m.parks {
        w.event(
            Some(task.id),
            "parked",
            &with(json!({ "stage": m.to, "awaiting": waits.describe(), "source": via })),
        )?;
    }
    Ok(Moved {
        from: m.from,
        to: m.to,
        job,
        agent: m.queue,
        superseded,
    })
}

// ---------------------------------------------------------------------------- commands

/// The note of an operator command's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OperatorNote {
    #[serde(rename = "approved")]
    Approved,
    #[serde(rename = "rejected")]
    Rejected,
    #[serde(rename = "confirm-deploy")]
    ConfirmDeploy,
    /// `retry`: a new job for the stage's agent.
    #[serde(rename = "requeued")]
    Requeued,
}

impl OperatorNote {
    fn of(on: Trigger) -> OperatorNote {
        match on {
            Trigger::Approved => OperatorNote::Approved,
            Trigger::Rejected => OperatorNote::Rejected,
            Trigger::ConfirmDeploy => OperatorNote::ConfirmDeploy,
            _ => OperatorNote::Requeued,
        }
    }
}

/// The result of `approve`, `reject`, `confirm-deploy` and `retry` (SPEC §14).
#[derive(Debug, Clone, Serialize)]
pub struct OperatorResult {
    pub ok: bool,
    pub note: OperatorNote,
    pub task: Task,
    /// The job queued, or null.
    pub job: Option<Job>,
    /// The Plane comment saying what the operator did, when there is one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<EffectReport>,
}

/// An operator's move `on` for the task `reference` names: the move Plane's state would
/// make, or exit 1 with one line and nothing changed. `reason` (reject) is recorded.
pub fn operate(
    ctx: &Ctx,
    reference: &str,
    on: Trigger,
    reason: Option<&str>,
) -> Result<OperatorResult> {
    debug_assert!(on.is_by_people());
    let task = tasks::resolve(ctx, reference)?;
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    let (moved, comment) = ctx.store.write(|w| {
        let task = w
            .task(task.id)?
            .with_context(|| format!("task {} vanished", task.id))?;
        let mut detail = json!({ "action": on.command() });
        if let Some(r) = reason {
            detail["reason"] = json!(r);
        }
        let moved = match decide(w, &task, on, Via::Cli, &detail)? {
            Ok(moved) => moved,
            Err(refusal) => {
                return Err(Coded::new(ExitKind::Failure, refusal.message(&task, on)).into())
            }
        };
        // Plane shows what happened to its issue (a Plane move needs no comment: a person
        // made it there).
        let issue = task.original_plane_issue();
        let comment = match (issue, &ctx.config.plane) {
            (Some(issue), Some(_)) => {
                let message = comment_text(&task, on, &moved, reason);
                outbox::enqueue(
                    w,
                    Some(task.id),
                    &Effect::plane_comment(
                        task.project_id.clone(),
                        Some(issue.to_string()),
                        &message,
                    ),
                )?;
                true
            }
            _ => false,
        };
        Ok((moved, comment))
    })?;
    let effects = if comment {
        outbox::run_for_task(ctx, task.id)?
    } else {
        Vec::new()
    };
    ctx.store.read(|r| {
        Ok(OperatorResult {
            ok: true,
            note: OperatorNote::of(on),
            task: r
                .task(task.id)?
                .with_context(|| format!("task {} vanished", task.id))?,
            job: match moved.job {
                Some(j) => r.job(j)?,
                None => None,
            },
            effects,
        })
    })
}

/// What the Plane comment says an operator did.
fn comment_text(task: &Task, on: Trigger, moved: &Moved, reason: Option<&str>) -> String {
    let what = match on {
        Trigger::Approved => "approved",
        Trigger::Rejected => "rejected",
        Trigger::ConfirmDeploy => "confirmed the deploy of",
        _ => "retried the failed stage of",
    };
    let mut s = format!(
        "an operator {what} {} with `orchctl {}`",
        task.label(),
        on.command()
    );
    if let Some(r) = reason {
        s.push_str(&format!(" ({r})"));
    }
    if moved.from != moved.to {
        s.push_str(&format!("; it moved from {} to {}", moved.from, moved.to));
    } else {
        s.push_str(&format!("; it stays in {}", moved.to));
    }
    if let (Some(_), Some(agent)) = (moved.job, moved.agent) {
        s.push_str(&format!(" and a {agent} job is queued"));
    }
    s.push('.');
    s
}
