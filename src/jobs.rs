//! The end of a run: `orchctl complete` and `orchctl reap` (SPEC §5), and the pipeline's
//! stage moves that a finished job causes (SPEC §1).
//!
//! Every change is guarded by the run it belongs to (`WHERE id = ? AND run_id = ? AND
//! status = 'running'`): a late `complete` from a stopped or reaped agent changes nothing
//! (`stale-run`), and `reap` racing `complete` cannot both win. Cancelled jobs are never
//! revived. A deferred STOP whose window closes because its job finished is applied here.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::deploy::{self, FinalizeNote, Outcome as DeployOutcome};
use crate::error::{Coded, ExitKind};
use crate::integrations::process::{self, Liveness};
use crate::model::{Job, Task};
use crate::outbox::{self, EffectReport};
use crate::pipeline::{self, Agent, JobStatus, Stage, Trigger};
use crate::stop;
use crate::store::Writer;
use crate::transitions::{self, Via};
use crate::Ctx;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Success,
    Failure(Option<String>),
}

/// What `complete` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompleteNote {
    /// The task moved to the next stage.
    Advanced,
    /// The task stays, awaiting people (Approved / Rejected).
    Parked,
    /// The job is done; the task did not move (or the deploy finished it).
    Done,
    Requeued,
    Failed,
    /// A deferred STOP was applied.
    Cancelled,
    /// The deployer's success was the deploy's, then a deferred STOP was applied.
    CancelledAfterDeploy,
    /// The deploy step's outcome left the task in deploy.
    DeployFailed,
    /// A stale run id or a finished job: nothing changed.
    StaleRun,
}

impl PartialEq<&str> for CompleteNote {
    fn eq(&self, other: &&str) -> bool {
        serde_json::to_value(self).is_ok_and(|v| v == *other)
    }
}

impl From<FinalizeNote> for CompleteNote {
    fn from(n: FinalizeNote) -> CompleteNote {
        match n {
            FinalizeNote::Done | FinalizeNote::NotInDeploy | FinalizeNote::AlreadyTerminal(_) => {
                CompleteNote::Done
            }
            FinalizeNote::DeployFailed => CompleteNote::DeployFailed,
            FinalizeNote::Cancelled => CompleteNote::Cancelled,
            FinalizeNote::CancelledAfterDeploy => CompleteNote::CancelledAfterDeploy,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompleteResult {
    pub ok: bool,
    pub note: CompleteNote,
    pub job: Option<Job>,
    pub task: Option<Task>,
    pub next_job: Option<Job>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<EffectReport>,
}

/// Records the outcome of run `run_id` of job `job_id`.
pub fn complete(
    ctx: &Ctx,
    job_id: i64,
    run_id: i64,
    outcome: &RunOutcome,
) -> Result<CompleteResult> {
    let (note, next_job, task_id) = ctx.store.write(|w| {
        let job = w.job(job_id)?.ok_or_else(|| {
            anyhow::Error::from(Coded::new(ExitKind::Failure, format!("no job {job_id}")))
        })?;
        if job.status != JobStatus::Running || job.run_id != Some(run_id) {
            return Ok((CompleteNote::StaleRun, None, job.task_id));
        }
        let task = match job.task_id {
            Some(t) => w.task(t)?,
            None => None,
        };
        let stopping = task.as_ref().is_some_and(Task::is_stopping);
        end_from_outside(w, ctx, &job)?;
        let mut next_job = None;
        let note = match outcome {
            RunOutcome::Success => {
                w.finish_run(job.id, run_id, "done", None)?;
                w.event(job.task_id, "job_done", &json!({ "job_id": job.id, "run_id": run_id, "agent": job.agent }))?;
                match &task {
                    Some(t) if !stopping => {
                        let (note, next) = advance(w, ctx, t, &job)?;
                        next_job = next;
                        note
                    }
                    _ => CompleteNote::Done,
                }
            }
            RunOutcome::Failure(error) => {
                let error = error.clone().unwrap_or_else(|| "the agent reported a failure".into());
                if !stopping && job.attempts < job.max_attempts {
                    w.requeue_run(job.id, Some(run_id), Some(&error))?;
                    w.event(job.task_id, "job_requeued", &json!({ "job_id": job.id, "run_id": run_id, "error": error, "attempts": job.attempts }))?;
                    CompleteNote::Requeued
                } else {
                    w.finish_run(job.id, run_id, "failed", Some(&error))?;
                    w.event(job.task_id, "job_failed", &json!({ "job_id": job.id, "run_id": run_id, "error": error, "attempts": job.attempts }))?;
                    if let (Some(t), false) = (&task, stopping) {
                        if job.agent == Agent::Deployer.as_str() {
                            deploy::release_lease_after_failed_deployer(w, t)?;
                        }
                        outbox::enqueue_notification(
                            w,
                            &ctx.config,
                            t,
                            "job_failed",
                            &format!(
                                "the {} job of {} failed after {} attempt(s): {error}. The task stays in {}.",
                                job.agent,
                                t.label(),
                                job.attempts,
                                t.stage
                            ),
                            json!({ "job_id": job.id, "agent": job.agent }),
                        )?;
                    }
                    CompleteNote::Failed
                }
            }
        };
        // A deployer that succeeded has deployed, whatever STOP was waiting for it.
        let deployed = *outcome == RunOutcome::Success
            && job.agent == Agent::Deployer.as_str()
            && task.as_ref().is_some_and(|t| t.stage == Stage::Deploy);
        let note = match job.task_id {
            Some(t) if deployed && stop::apply_deferred_after_deploy_tx(w, &ctx.config, t)? => {
                CompleteNote::CancelledAfterDeploy
            }
            Some(t) if stop::apply_deferred_tx(w, &ctx.config, t)? => CompleteNote::Cancelled,
            _ => note,
        };
        Ok((note, next_job, job.task_id))
    })?;
    let effects = match task_id {
        Some(t) if note != CompleteNote::StaleRun => outbox::run_for_task(ctx, t)?,
        _ => Vec::new(),
    };
    ctx.store.read(|r| {
        Ok(CompleteResult {
            ok: true,
            note,
            job: r.job(job_id)?,
            task: match task_id {
                Some(t) => r.task(t)?,
                None => None,
            },
            next_job: match next_job {
                Some(j) => r.job(j)?,
                None => None,
            },
            effects,
        })
    })
}

/// Moves the task on after a successful job, as the stage map says (SPEC §1): returns
/// the note and the job queued.
fn advance(w: &Writer, ctx: &Ctx, task: &Task, job: &Job) -> Result<(CompleteNote, Option<i64>)> {
    let unchanged = |why: &str| -> Result<(CompleteNote, Option<i64>)> {
        w.event(
            Some(task.id),
            "stage_unchanged",
            &json!({ "why": why, "agent": job.agent, "stage": task.stage }),
        )?;
        Ok((CompleteNote::Done, None))
    };
    if task.stage.agent().map(Agent::as_str) != Some(job.agent.as_str()) {
        return unchanged("the job's agent does not work the task's stage");
    }
    let on = Trigger::for_job_success(task.stage);
    if on == Trigger::Deployed {
        let f = deploy::finalize_tx(w, ctx, task, DeployOutcome::Success, false)?;
        return Ok((f.note.into(), None));
    }
    let Some(m) = pipeline::step(task.stage, on) else {
        return unchanged("the stage map has no move for this job's success");
    };
    let moved = transitions::carry_out(w, task, m, Via::Cli, &json!({ "job_id": job.id }))?;
    let note = if moved.from != moved.to {
        CompleteNote::Advanced
    } else {
        CompleteNote::Parked
    };
    Ok((note, moved.job))
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReapOptions {
    pub dry_run: bool,
    pub recover: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReapedJob {
    pub job_id: i64,
    pub run_id: Option<i64>,
    pub task_id: Option<i64>,
    pub reason: String,
    /// `requeued`, `failed` or `cancelled` (or what it would be, with `--dry-run`).
    pub action: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReapReport {
    pub dry_run: bool,
    pub checked: usize,
    pub alive: usize,
    pub requeued: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub jobs: Vec<ReapedJob>,
}

/// An outcome recorded from outside a run (an operator's `complete`, a CI script's
/// `finalize-deploy`) while its supervisor still lives ends the run's processes too: a
/// requeue forgets its pid, and an agent working on after its run ended would be out of
/// every STOP's reach. The agent's own report (from inside its supervisor's session) is
/// followed by its exit, and the supervisor ends what is left. A run of another host cannot
/// be looked at from here: its host is asked to stop it (and finds it gone if it ended
/// meanwhile), and whatever waits for the task's agents waits for that.
pub fn end_from_outside(w: &Writer, ctx: &Ctx, job: &Job) -> Result<()> {
    let (Some(pid), Some(t)) = (job.pid, job.task_id) else {
        return Ok(());
    };
    let outside = if ctx.config.runs_here(job) {
        process::liveness(pid, job.proc_start) == Liveness::Alive
            && !process::inside_session_of(pid)
    } else {
        true
    };
    if !outside {
        return Ok(());
    }
    outbox::enqueue_on(
        w,
        Some(t),
        &outbox::Effect::StopProcess {
            job_id: job.id,
            run_id: job.run_id,
            pid,
            proc_start: job.proc_start,
            boot_id: job.boot_id.clone(),
        },
        ctx.config.bind_to(job.host.as_deref()).as_deref(),
    )?;
    w.event(
        Some(t),
        "run_ended_from_outside",
        &json!({ "job_id": job.id, "run_id": job.run_id, "pid": pid, "why": "its outcome was recorded from outside the run while its processes lived: they are stopped" }),
    )?;
    Ok(())
}

/// Why a running job is considered dead, or `None` while it lives.
fn death(ctx: &Ctx, job: &Job, age: Option<f64>, recover: bool) -> Result<Option<String>> {
    if recover {
        return Ok(Some(
            "recovery: every running job is dead after a reboot".into(),
        ));
    }
    let age = || -> Result<Option<f64>> { Ok(age) };
    let timeout = Duration::from_secs(ctx.config.claim_timeout_secs.max(0) as u64).as_secs_f64();
    // A pid of an earlier boot of this host names nothing that runs now.
    if let (Some(pid), Some(then), Some(now)) = (job.pid, &job.boot_id, process::boot_id()) {
        if *then != now {
            return Ok(Some(format!(
                "agent pid {pid} was launched before this host rebooted"
            )));
        }
    }
    match job.pid {
        Some(pid) => match process::liveness(pid, job.proc_start) {
            Liveness::Alive => Ok(None),
            Liveness::Gone => Ok(Some(format!("agent pid {pid} is gone"))),
            Liveness::Recycled => Ok(Some(format!("pid {pid} belongs to another process now"))),
            // The pid runs but cannot be proven ours: only age can tell.
            Liveness::Unverified => match age()? {
                Some(a) if a <= timeout => Ok(None),
                _ => Ok(Some(format!(
                    "pid {pid} unverifiable and the run is older than ORCH_CLAIM_TIMEOUT_SECS"
                ))),
            },
        },
        None => match age()? {
            Some(a) if a <= timeout => Ok(None),
            Some(a) => Ok(Some(format!(
                "no agent pid and no complete after {a:.0}s (ORCH_CLAIM_TIMEOUT_SECS={})",
                ctx.config.claim_timeout_secs
            ))),
            None => Ok(Some("no agent pid and no claim or creation time".into())),
        },
    }
}

/// Ends a dead run with an unknown outcome: `cancelled` when its task is terminal or has a
/// STOP pending, else `queued` again while attempts remain, else `failed`. `job` is the
/// run as reap judged it: the write only lands while the job is still that run with that
/// recorded process (a launcher may have recorded its agent since).
pub fn reap_unknown_outcome(w: &Writer, job: &Job, reason: &str) -> Result<Option<String>> {
    let task = match job.task_id {
        Some(t) => w.task(t)?,
        None => None,
    };
    let stopping = task.as_ref().is_some_and(Task::is_stopping);
    let (action, changed) = if stopping {
        ("cancelled", w.end_judged_run(job, "cancelled", reason)?)
    } else if job.attempts < job.max_attempts {
        ("requeued", w.requeue_judged_run(job, reason)?)
    } else {
        ("failed", w.end_judged_run(job, "failed", reason)?)
    };
    if !changed {
        return Ok(None);
    }
    w.event(
        job.task_id,
        &format!("job_reaped_{action}"),
        &json!({ "job_id": job.id, "run_id": job.run_id, "reason": reason }),
    )?;
    if let (Some(t), "failed", "deployer") = (&task, action, job.agent.as_str()) {
        deploy::release_lease_after_failed_deployer(w, t)?;
    }
    Ok(Some(action.into()))
}

/// Whether this host's reap judges `job` (SPEC §12): a run with a recorded process only on
/// the host that launched it (its pid means nothing elsewhere); a pid-less run, judged by
/// age, on any host — except at boot (`--recover`), which is about this host's runs only.
fn judged_here(ctx: &Ctx, job: &Job, recover: bool) -> bool {
    if job.pid.is_some() || recover {
        ctx.config.runs_here(job)
    } else {
        true
    }
}

pub fn reap(ctx: &Ctx, opts: ReapOptions) -> Result<ReapReport> {
    // Kills other hosts' STOPs left to this one, first: their runs end here.
    if !opts.dry_run {
        outbox::run_host_effects(ctx)?;
    }
    let running: Vec<(Job, Option<f64>)> = ctx
        .store
        .read(|r| r.running_jobs_aged())?
        .into_iter()
        .filter(|(job, _)| judged_here(ctx, job, opts.recover))
        .collect();
    let mut report = ReapReport {
        dry_run: opts.dry_run,
        checked: running.len(),
        ..Default::default()
    };
    let mut dead = Vec::new();
    for (job, age) in running {
        match death(ctx, &job, age, opts.recover)? {
            None => report.alive += 1,
            Some(reason) => dead.push((job, reason)),
        }
    }
    if dead.is_empty() {
        return Ok(report);
    }
    let outcomes: Vec<(Job, String, Option<String>, bool)> = if opts.dry_run {
        ctx.store.read(|r| {
            dead.into_iter()
                .map(|(job, reason)| {
                    let task = match job.task_id {
                        Some(t) => r.task(t)?,
                        None => None,
                    };
                    let stopping = task.as_ref().is_some_and(Task::is_stopping);
                    let action = if stopping {
                        "cancelled"
                    } else if job.attempts < job.max_attempts {
                        "requeued"
                    } else {
                        "failed"
                    };
                    Ok((job, reason, Some(action.to_string()), false))
                })
                .collect()
        })?
    } else {
        ctx.store.write(|w| {
            let mut out = Vec::new();
            for (job, reason) in dead.iter().cloned() {
                let action = reap_unknown_outcome(w, &job, &reason)?;
                let applied = match job.task_id {
                    Some(t) => stop::apply_deferred_tx(w, &ctx.config, t)?,
                    None => false,
                };
                out.push((job, reason, action, applied));
            }
            Ok(out)
        })?
    };
    let mut touched = Vec::new();
    for (job, reason, action, deferred_applied) in outcomes {
        if let (true, Some(t)) = (deferred_applied, job.task_id) {
            touched.push(t);
        }
        let Some(action) = action else { continue };
        match action.as_str() {
            "requeued" => report.requeued += 1,
            "failed" => report.failed += 1,
            _ => report.cancelled += 1,
        }
        report.jobs.push(ReapedJob {
            job_id: job.id,
            run_id: job.run_id,
            task_id: job.task_id,
            reason,
            action,
        });
    }
    // A deferred STOP applied because its running job died: run its side effects now.
    touched.sort_unstable();
    touched.dedup();
    for t in touched {
        outbox::run_for_task(ctx, t).with_context(|| format!("side effects of task {t}"))?;
    }
    Ok(report)
}

/// Boot-time recovery: every running job is dead (`reap --recover`); returns how many
/// were changed. Cancelled jobs are never touched.
pub fn requeue_running_jobs(ctx: &Ctx) -> Result<usize> {
    let r = reap(
        ctx,
        ReapOptions {
            dry_run: false,
            recover: true,
        },
    )?;
    Ok(r.requeued + r.failed + r.cancelled)
}
