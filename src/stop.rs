//! STOP (SPEC §3): cancel a task anywhere in the pipeline, safely.
//!
//! One transaction decides and records everything — jobs cancelled, the task terminal with
//! its keys tombstoned, the lease released, the deploy marker cleared, the audit rows and
//! the outbox rows of every side effect — and only then are the side effects run, in the
//! order: stop the agents, remove the worktree, delete the remote branch, notify. Inside a
//! critical merge/deploy window (and without `--force`) the cancel is *deferred*: only
//! queued jobs are cancelled and `cancel_requested_at` is set; the deploy finalizer (or
//! reconcile, once the window has closed) applies it later. This module never deletes a
//! task row, and never touches anything outside the branch's worktree.

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use crate::config::Config;
use crate::integrations::process;
use crate::model::Task;
use crate::outbox::{self, Effect, EffectReport};
use crate::pipeline::{self, JobStatus, Stage, Trigger};
use crate::store::{Reader, Writer};
use crate::Ctx;

/// Who asked for the stop (recorded in the log; picks the default reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Operator,
    Plane,
    Deferred,
    Reconcile,
}

impl Source {
    fn default_reason(self) -> &'static str {
        match self {
            Source::Operator => "stopped by an operator",
            Source::Plane => "Plane STOP status",
            Source::Deferred => "deferred STOP applied after the deploy window",
            Source::Reconcile => "stopped by reconcile",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StopOptions {
    pub reason: Option<String>,
    pub force: bool,
    pub source: Source,
}

impl StopOptions {
    pub fn operator(reason: Option<String>, force: bool) -> Self {
        StopOptions {
            reason,
            force,
            source: Source::Operator,
        }
    }

    /// The forced reset that applies a deferred STOP, with the reason it was given.
    pub fn deferred(task: &Task) -> Self {
        StopOptions {
            reason: task.cancel_reason.clone(),
            force: true,
            source: Source::Deferred,
        }
    }

    fn reason(&self) -> String {
        self.reason
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| self.source.default_reason().to_string())
    }
}

/// What `stop` did (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopNote {
    NoTask,
    AlreadyTerminal(Stage),
    DeferredCriticalWindow,
    DeferredAlreadyPending,
    Cancelled,
}

impl StopNote {
    pub fn word(&self) -> String {
        match self {
            StopNote::NoTask => "no-task".into(),
            StopNote::AlreadyTerminal(s) => format!("already-terminal:{s}"),
            StopNote::DeferredCriticalWindow => "deferred-critical-window".into(),
            StopNote::DeferredAlreadyPending => "deferred-already-pending".into(),
            StopNote::Cancelled => "cancelled".into(),
        }
    }
}

impl std::fmt::Display for StopNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.word())
    }
}

impl Serialize for StopNote {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.word())
    }
}

impl PartialEq<&str> for StopNote {
    fn eq(&self, other: &&str) -> bool {
        self.word() == *other
    }
}

/// The result of `orchctl stop` (SPEC §3).
#[derive(Debug, Clone, Serialize)]
pub struct StopResult {
    pub ok: bool,
    pub deferred: bool,
    /// Agent processes actually stopped (by this host).
    pub stopped: usize,
    /// Agents left to the hosts that launched them (SPEC §12): their next `dispatch`,
    /// `reap`, `reconcile` or `stop` stops them, then the worktree and branch go.
    pub remote_pending: usize,
    pub jobs_cancelled: usize,
    pub note: StopNote,
    pub task: Option<Task>,
    /// The live tasks that depend on this one (SPEC §14): a cancelled dependency blocks
    /// them for good.
    pub dependents: Vec<i64>,
    /// How each side effect ended (`pending` ones are retried by `reconcile`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<EffectReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Whether the task is inside its critical merge/deploy window: its deploy marker says
/// `initiated`, or its branch holds the repo's merge lease while one of its jobs runs.
/// A task parked in `deploy` holding the lease with nothing running is not critical.
pub fn in_critical_window(r: &Reader, task: &Task) -> Result<bool> {
    if let Some(wi) = task.original_work_item() {
        if r.marker(&task.repo, wi)?.as_deref() == Some("initiated") {
            return Ok(true);
        }
    }
    let Some(branch) = &task.branch else {
        return Ok(false);
    };
    match r.lease(&task.repo)? {
        Some(lease) if &lease.branch == branch => r.has_running_job(task.id),
        _ => Ok(false),
    }
}

/// What the transaction decided.
enum Decision {
    Declined,
    NoTask,
    Terminal(Stage),
    Deferred { first: bool, jobs_cancelled: usize },
    Reset { jobs_cancelled: usize },
}

/// Stops the task `reference` names (id, work item id or Plane issue id).
pub fn stop(ctx: &Ctx, reference: &str, opts: &StopOptions) -> Result<StopResult> {
    match ctx.store.read(|r| r.find_task(reference))? {
        Some(task) => cancel_task(ctx, task.id, opts),
        // The reference is echoed back: scrub it, in case a token was pasted by mistake.
        None => Ok(no_task(&ctx.config.scrub(reference))),
    }
}

fn no_task(reference: &str) -> StopResult {
    StopResult {
        ok: true,
        deferred: false,
        stopped: 0,
        remote_pending: 0,
        jobs_cancelled: 0,
        note: StopNote::NoTask,
        task: None,
        dependents: Vec::new(),
        effects: Vec::new(),
        warning: Some(format!("no task matches {reference:?}; nothing to stop")),
    }
}

/// Stops task `task_id` (SPEC §3 rules 1–5).
pub fn cancel_task(ctx: &Ctx, task_id: i64, opts: &StopOptions) -> Result<StopResult> {
    let result = cancel_task_if(ctx, task_id, opts, |_| Ok(true))?;
    result.ok_or_else(|| anyhow::anyhow!("the stop of task {task_id} was declined"))
}

/// [`cancel_task`], with `first` run at the start of its transaction: when `first` returns
/// false nothing is decided or written and the answer is `None`. Plane's intake records
/// its delivery this way, so that of two copies of one STOP delivery exactly one decides
/// (and reports) the stop and the other is a duplicate.
pub fn cancel_task_if(
    ctx: &Ctx,
    task_id: i64,
    opts: &StopOptions,
    mut first: impl FnMut(&Writer) -> Result<bool>,
) -> Result<Option<StopResult>> {
    let decision = ctx.store.write(|w| {
        if !first(w)? {
            return Ok(Decision::Declined);
        }
        let Some(task) = w.task(task_id)? else {
            return Ok(Decision::NoTask);
        };
        if task.is_terminal() {
            return Ok(Decision::Terminal(task.stage));
        }
        if !opts.force && in_critical_window(w, &task)? {
            return defer_tx(w, &ctx.config, &task, opts);
        }
        let jobs_cancelled = full_reset_tx(w, &ctx.config, &task, opts)?;
        Ok(Decision::Reset { jobs_cancelled })
    })?;

    let (deferred, jobs_cancelled, note) = match decision {
        Decision::Declined => return Ok(None),
        Decision::NoTask => return Ok(Some(no_task(&task_id.to_string()))),
        // A STOP killed half-way left effects pending: the repeated STOP finishes them.
        Decision::Terminal(stage) => (false, 0, StopNote::AlreadyTerminal(stage)),
        Decision::Deferred {
            first: true,
            jobs_cancelled,
        } => (true, jobs_cancelled, StopNote::DeferredCriticalWindow),
        Decision::Deferred {
            first: false,
            jobs_cancelled,
        } => (true, jobs_cancelled, StopNote::DeferredAlreadyPending),
        Decision::Reset { jobs_cancelled } => (false, jobs_cancelled, StopNote::Cancelled),
    };
    let effects = outbox::run_for_task(ctx, task_id)?;
    // Any stop also carries out what other hosts' STOPs left to this one.
    outbox::run_host_effects(ctx)?;
    let (task, dependents) = ctx
        .store
        .read(|r| Ok((r.task(task_id)?, r.dependents(task_id)?)))?;
    Ok(Some(StopResult {
        ok: true,
        deferred,
        stopped: effects.iter().filter(|e| e.stopped_an_agent()).count(),
        remote_pending: effects.iter().filter(|e| e.left_to_another_host()).count(),
        jobs_cancelled,
        note,
        task,
        dependents,
        effects,
        warning: None,
    }))
}

/// The deferred cancel: queued jobs only, `cancel_requested_at` set once, one notification.
fn defer_tx(w: &Writer, config: &Config, task: &Task, opts: &StopOptions) -> Result<Decision> {
    let reason = opts.reason();
    let cancelled = w.cancel_jobs_for_task(task.id, true, &reason)?;
    let first = w.set_cancel_requested(task.id, &reason)?;
    w.event(
        Some(task.id),
        if first {
            "cancel_deferred"
        } else {
            "cancel_deferred_repeat"
        },
        &json!({
            "reason": reason,
            "source": opts.source,
            "queued_jobs_cancelled": cancelled.iter().map(|j| j.id).collect::<Vec<_>>(),
        }),
    )?;
    if first {
        outbox::enqueue_notification(
            w,
            config,
            task,
            "cancel_deferred",
            &format!(
                "STOP received for {} during its merge/deploy window; it will be applied as soon as the deploy step finishes ({reason}).",
                task.label()
            ),
            json!({ "reason": reason, "deferred": true }),
        )?;
    }
    Ok(Decision::Deferred {
        first,
        jobs_cancelled: cancelled.len(),
    })
}

/// Applies a pending deferred STOP of `task_id` as a forced full reset (`source:
/// deferred`) when its critical window has closed, inside the caller's transaction.
/// Returns whether it did; the caller runs the outbox after commit.
pub fn apply_deferred_tx(w: &Writer, config: &Config, task_id: i64) -> Result<bool> {
    apply_deferred(w, config, task_id, false)
}

/// [`apply_deferred_tx`] right after the task's deployer reported success: the change was
/// deployed before the STOP took effect, and the log and the notification say so.
pub fn apply_deferred_after_deploy_tx(w: &Writer, config: &Config, task_id: i64) -> Result<bool> {
    apply_deferred(w, config, task_id, true)
}

fn apply_deferred(w: &Writer, config: &Config, task_id: i64, after_deploy: bool) -> Result<bool> {
    let Some(task) = w.task(task_id)? else {
        return Ok(false);
    };
    if task.is_terminal() || task.cancel_requested_at.is_none() || in_critical_window(w, &task)? {
        return Ok(false);
    }
    reset_tx(
        w,
        config,
        &task,
        &StopOptions::deferred(&task),
        after_deploy,
    )?;
    Ok(true)
}

/// The full reset's transaction (SPEC §3 4.1), usable inside any write: cancels every
/// queued/running job, makes the task `cancelled` with tombstoned keys, releases its lease,
/// clears its deploy marker, and writes the audit rows and the outbox rows of the side
/// effects. Returns the number of jobs cancelled. The caller runs the outbox after commit.
pub fn full_reset_tx(
    w: &Writer,
    config: &Config,
    task: &Task,
    opts: &StopOptions,
) -> Result<usize> {
    reset_tx(w, config, task, opts, false)
}

/// [`full_reset_tx`] of a deferred STOP applied after a successful deploy: the change is
/// live, and the log and the notification say so instead of claiming the stop prevented it.
pub fn full_reset_after_deploy_tx(w: &Writer, config: &Config, task: &Task) -> Result<usize> {
    reset_tx(w, config, task, &StopOptions::deferred(task), true)
}

fn reset_tx(
    w: &Writer,
    config: &Config,
    task: &Task,
    opts: &StopOptions,
    after_deploy: bool,
) -> Result<usize> {
    let reason = opts.reason();
    debug_assert!(
        pipeline::step(task.stage, Trigger::Stopped).is_some_and(|m| m.to == Stage::Cancelled),
        "the stage map stops a {} task",
        task.stage
    );
    let cancelled = w.cancel_jobs_for_task(task.id, false, &reason)?;
    if !w.mark_task_cancelled(task.id, &reason)? {
        return Ok(cancelled.len());
    }
    let mut lease_released = false;
    if let Some(branch) = &task.branch {
        lease_released = w.release_lease(&task.repo, branch)?;
    }
    let marker_cleared = match task.original_work_item() {
        Some(wi) => w.clear_marker(&task.repo, wi)?,
        None => false,
    };

    // Each effect with the host that must carry it out: an agent is stopped only by
    // orchctl on the host that launched it (SPEC §12), a worktree removed by the host that
    // holds it; `None` is any host.
    let mut effects: Vec<(Effect, Option<String>)> = Vec::new();
    for job in cancelled.iter().filter(|j| j.status == JobStatus::Running) {
        if let Some(pid) = job.pid {
            effects.push((
                Effect::StopProcess {
                    job_id: job.id,
                    run_id: job.run_id,
                    pid,
                    proc_start: job.proc_start,
                    boot_id: job.boot_id.clone(),
                },
                config.bind_to(job.host.as_deref()),
            ));
        }
    }
    // A run that ended while its processes live on (its deployer marked done by
    // finalize-deploy, an agent still exiting after its `complete`) is stopped too: the
    // task's agents all go, not only those of its running jobs. Only this host's processes
    // can be looked at; a run of another host that was ended from outside got a kill
    // bound to its host then (`complete`, `finalize-deploy`), which the branch deletion
    // below waits for as it waits for these.
    let jobs = w.jobs_of_task(task.id)?;
    for job in &jobs {
        let stopping = effects
            .iter()
            .any(|(e, _)| matches!(e, Effect::StopProcess { job_id, .. } if *job_id == job.id));
        if let (false, Some(pid), true) = (stopping, job.pid, config.runs_here(job)) {
            if process::liveness(pid, job.proc_start) == process::Liveness::Alive {
                effects.push((
                    Effect::StopProcess {
                        job_id: job.id,
                        run_id: job.run_id,
                        pid,
                        proc_start: job.proc_start,
                        boot_id: job.boot_id.clone(),
                    },
                    config.bind_to(job.host.as_deref()),
                ));
            }
        }
    }
    if let Some(branch) = &task.branch {
        // The worktree is where the task's agents ran: on each host that claimed one of its
        // runs (and anywhere, for a task whose runs no host recorded, or on SQLite).
        let mut hosts: Vec<Option<String>> = jobs
            .iter()
            .filter_map(|j| config.bind_to(j.host.as_deref()))
            .map(Some)
            .collect();
        hosts.sort();
        hosts.dedup();
        let elsewhere = hosts
            .iter()
            .any(|h| h.as_deref().is_some_and(|h| h != config.host_id));
        if hosts.is_empty() {
            hosts.push(None);
        }
        for host in hosts {
            effects.push((
                Effect::RemoveWorktree {
                    repo: task.repo.clone(),
                    branch: branch.clone(),
                },
                host,
            ));
        }
        effects.push((
            Effect::DeleteRemoteBranch {
                repo: task.repo.clone(),
                branch: branch.clone(),
                // What the branch points at now, so a retry never deletes later pushes.
                // Only when its agents worked here: another host's agent pushed to it, and
                // this clone's copy is as old as its last fetch — the deletion then goes by
                // the name (a live task's branch is still refused, `owner_refusal`).
                commit: if elsewhere {
                    None
                } else {
                    crate::names::validate_repo(&task.repo).ok().and_then(|()| {
                        crate::integrations::git::recorded_commit(
                            &config.repos_dir.join(&task.repo),
                            branch,
                        )
                    })
                },
            },
            None,
        ));
    }
    for (e, host) in &effects {
        outbox::enqueue_on(w, Some(task.id), e, host.as_deref())?;
    }
    let mut detail = json!({
        "reason": reason,
        "source": opts.source,
        "forced": opts.force,
        "jobs_cancelled": cancelled.iter().map(|j| j.id).collect::<Vec<_>>(),
        "lease_released": lease_released,
        "marker_cleared": marker_cleared,
        "effects": effects.iter().map(|(e, _)| e.kind()).collect::<Vec<_>>(),
    });
    let message = if after_deploy {
        detail["deployed_before_stop"] = json!(true);
        detail["note"] =
            json!("the deploy succeeded before the STOP took effect: the change is deployed");
        format!(
            "{} was deployed before its STOP took effect: the change is live. The task is now cancelled ({reason}); its worktree and branch were removed, its docs and history are kept. Revert the change if it must not stay deployed.",
            task.label()
        )
    } else {
        format!(
            "{} was stopped ({reason}). Its agents were stopped, its jobs cancelled, its worktree and branch removed; its docs and history are kept.",
            task.label()
        )
    };
    w.event(Some(task.id), "cancelled", &detail)?;
    outbox::enqueue_notification(
        w,
        config,
        task,
        "task_cancelled",
        &message,
        json!({
            "reason": reason,
            "deferred": false,
            "source": opts.source,
            "deployed_before_stop": after_deploy,
        }),
    )?;
    Ok(cancelled.len())
}
