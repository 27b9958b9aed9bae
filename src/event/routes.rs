//! What each Plane state does to a task (SPEC §6): STOP goes through `stop` (kill switch
//! and scope permitting); To Analyse is the only way a pipeline starts, and never
//! relaunches a mid-pipeline task while the gate is on; Approved, Rejected and Confirm
//! Deploy are the stage map's moves, decided by `transitions` exactly as the operator
//! commands decide them. Each decision and the record of the delivery are one transaction.

use anyhow::Result;
use serde_json::{json, Value};

use super::payload::{opt_str, plane_key, req_i64, StateChange};
use super::{
    apply, event_client, plane_failure, record_only, EventAction, EventNote, EventResult, Meta,
    Outcome,
};
use crate::config::Config;
use crate::error::{bad_input, config_err, temp_fail};
use crate::model::Task;
use crate::names;
use crate::outbox::{self, Effect};
use crate::pipeline::{Agent, Stage, Trigger};
use crate::stop::{self, Source, StopOptions};
use crate::store::{NewTask, Writer};
use crate::tasks;
use crate::transitions::{self, Via};
use crate::Ctx;

pub(super) fn stop(
    ctx: &Ctx,
    meta: &Meta,
    mut out: EventResult,
    change: &StateChange,
) -> Result<EventResult> {
    if !ctx.config.stop_enabled {
        return record_only(
            ctx,
            meta,
            out,
            EventAction::Ignored,
            EventNote::StopDisabled,
            None,
        );
    }
    let Some(task) = ctx
        .store
        .read(|r| r.find_task_by_plane_issue(&change.issue_id))?
    else {
        // Unknown task: a no-op, never an error.
        return record_only(ctx, meta, out, EventAction::Stop, EventNote::NoTask, None);
    };
    if !ctx.config.stop_applies(&task.repo) {
        let note = EventNote::StopDisabled;
        return record_only(ctx, meta, out, EventAction::Ignored, note, Some(task));
    }
    let opts = StopOptions {
        reason: None,
        force: false,
        source: Source::Plane,
    };
    // The delivery is recorded in the stop's own transaction: of two copies of this body
    // handled at once exactly one decides the stop, the other is a duplicate. The stop's
    // side effects are outbox rows of that same commit, so a crash after it loses nothing:
    // reconcile (or an operator's `orchctl stop`) runs what is left.
    let Some(result) = stop::cancel_task_if(ctx, task.id, &opts, |w| {
        meta.record(w, EventAction::Stop, Some(task.id))
    })?
    else {
        out.action = EventAction::Duplicate;
        return Ok(out);
    };
    out.action = EventAction::Stop;
    out.note = Some(EventNote::Stop(result.note.clone()));
    out.task = result.task.clone();
    out.stop = Some(result);
    Ok(out)
}

// ---------------------------------------------------------------------------- To Analyse

pub(super) fn to_analyse(
    ctx: &Ctx,
    meta: &Meta,
    out: EventResult,
    payload: &Value,
    change: &StateChange,
) -> Result<EventResult> {
    let known = ctx
        .store
        .read(|r| r.find_task_by_plane_issue(&change.issue_id))?;
    // Everything a new pipeline needs is gathered (and Plane asked) before the transaction.
    let prepared = match known {
        None => Some(prepare_pipeline(ctx, meta, payload, change)?),
        Some(_) => None,
    };
    let state = out.state.clone();
    apply(ctx, meta, out, |w| {
        match w.find_task_by_plane_issue(&change.issue_id)? {
            None => {
                let new = prepared.as_ref().ok_or_else(|| {
                    temp_fail(format!(
                        "the task of Plane issue {} changed while the delivery was handled; retry",
                        change.issue_id
                    ))
                })?;
                start_pipeline(w, new, state.as_deref())
            }
            Some(task) => to_analyse_existing(w, &ctx.config, &task, change, state.as_deref()),
        }
    })
}

/// Everything a new task for this issue needs, validated.
fn prepare_pipeline(
    ctx: &Ctx,
    meta: &Meta,
    payload: &Value,
    change: &StateChange,
) -> Result<NewTask> {
    let project = plane_key(payload, "data.project")?;
    let sequence = req_i64(payload, "data.sequence_id")?;
    if sequence <= 0 {
        // Plane numbers work items from 1; `ORCH--3` would be a key nobody can type.
        return Err(bad_input(format!(
            "malformed Plane delivery: `data.sequence_id` must be a positive integer, got {sequence}"
        )));
    }
    let title = opt_str(payload, "data.name")?
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let repo = ctx.config.repo_for_project(project).ok_or_else(|| {
        config_err(format!(
            "no repo for Plane project {project}: set ORCH_REPO_MAP ({project}=<repo>) or ORCH_DEFAULT_REPO"
        ))
    })?;
    names::validate_repo(repo)
        .map_err(|e| config_err(format!("ORCH_REPO_MAP / ORCH_DEFAULT_REPO: {e:#}")))?;
    let ident = project_identifier(ctx, meta, project)?;
    let work_item = format!("{ident}-{sequence}");
    names::validate_work_item(&work_item)?;
    let branch = names::default_branch_name(&work_item, title);
    names::validate_branch(&branch)?;
    Ok(NewTask {
        plane_id: Some(change.issue_id.clone()),
        work_item_id: Some(work_item),
        plane_issue_id: Some(change.issue_id.clone()),
        project_id: Some(project.to_string()),
        repo: repo.to_string(),
        branch: Some(branch),
        title: title.map(String::from),
        stage: "analysis".into(),
    })
}

/// The project's identifier (`ORCH` in `ORCH-310`): `ORCH_PROJECT_IDENTIFIERS` (an
/// operator's explicit word, and no request), else the cache, else Plane's project API.
fn project_identifier(ctx: &Ctx, meta: &Meta, project: &str) -> Result<String> {
    if let Some((_, ident)) = ctx
        .config
        .project_identifiers
        .iter()
        .find(|(p, _)| p == project)
    {
        return Ok(ident.clone());
    }
    if let Some(ident) = ctx.store.read(|r| r.plane_project_identifier(project))? {
        return Ok(ident);
    }
    let plane = ctx.config.plane.as_ref().ok_or_else(|| {
        config_err(format!(
            "no identifier for Plane project {project}: set ORCH_PROJECT_IDENTIFIERS ({project}=<IDENT>) or ORCH_PLANE_URL"
        ))
    })?;
    let ident = event_client(ctx, plane, meta)
        .project_identifier(project)
        .map_err(|e| plane_failure(&ctx.config, e, &format!("reading Plane project {project}")))?;
    ctx.store
        .write(|w| w.cache_plane_project(project, &ident))?;
    Ok(ident)
}

/// The only entry point of a pipeline: the task in `analysis` and its analyst job.
fn start_pipeline(w: &Writer, new: &NewTask, state: Option<&str>) -> Result<Outcome> {
    let (id, job) = tasks::insert_with_job(w, new, "plane")?;
    w.event(
        Some(id),
        "pipeline_started",
        &json!({ "plane_issue_id": new.plane_issue_id, "work_item_id": new.work_item_id, "state": state }),
    )?;
    Ok(Outcome {
        action: EventAction::StartPipeline,
        note: EventNote::Created,
        task_id: Some(id),
        job_id: job,
        effects: false,
    })
}

fn queue_job(w: &Writer, task: &Task, agent: &str, detail: Value) -> Result<i64> {
    let id = w.insert_job(Some(task.id), agent, &task.repo)?;
    let mut d = json!({ "job_id": id, "agent": agent, "source": "plane" });
    if let (Value::Object(m), Value::Object(x)) = (&mut d, detail) {
        m.extend(x);
    }
    w.event(Some(task.id), "job_queued", &d)?;
    Ok(id)
}

/// Why a live task takes no transition: terminal, or a STOP is pending.
fn inert(task: &Task) -> Option<Outcome> {
    if task.is_terminal() {
        return Some(Outcome::ignored(
            EventNote::Terminal(task.stage),
            Some(task.id),
        ));
    }
    if task.cancel_requested_at.is_some() {
        return Some(Outcome::ignored(EventNote::StopPending, Some(task.id)));
    }
    None
}

fn to_analyse_existing(
    w: &Writer,
    config: &Config,
    task: &Task,
    change: &StateChange,
    state: Option<&str>,
) -> Result<Outcome> {
    if let Some(o) = inert(task) {
        return Ok(o);
    }
    if task.stage == Stage::Analysis {
        if w.has_active_job(task.id)? {
            return Ok(Outcome::ignored(EventNote::JobActive, Some(task.id)));
        }
        let job = queue_job(
            w,
            task,
            "analyst",
            json!({ "state": state, "why": "analysis resumed" }),
        )?;
        return Ok(Outcome::queued(
            EventNote::AnalystRelaunched,
            task.id,
            Some(job),
        ));
    }
    let Some(agent) = task.stage.agent().map(Agent::as_str) else {
        return Ok(Outcome::ignored(
            EventNote::NoAgent(task.stage),
            Some(task.id),
        ));
    };
    if !config.stop_applies(&task.repo) {
        // Kill switch off (or repo out of scope): the predecessor's behaviour.
        let job = queue_job(
            w,
            task,
            agent,
            json!({ "state": state, "why": "legacy relaunch (kill switch off)" }),
        )?;
        return Ok(Outcome::queued(
            EventNote::LegacyRelaunch,
            task.id,
            Some(job),
        ));
    }
    // The relaunch hole: a second agent on a branch already past analysis.
    let message = format!(
        "{} is in {}; moving it to {} does not start a new {agent} job, because that would run a second agent on work already past analysis. To start over, move it to {} first (which cancels it), then to {}.",
        task.label(),
        task.stage,
        config.states.to_analyse,
        config.states.stop,
        config.states.to_analyse
    );
    outbox::enqueue(
        w,
        Some(task.id),
        &Effect::plane_comment(
            task.project_id
                .clone()
                .or_else(|| change.project_id.clone()),
            task.original_plane_issue()
                .map(String::from)
                .or_else(|| Some(change.issue_id.clone())),
            &message,
        ),
    )?;
    w.event(
        Some(task.id),
        "relaunch_refused",
        &json!({ "stage": task.stage, "state": state, "agent": agent }),
    )?;
    Ok(Outcome {
        action: EventAction::Refused,
        note: EventNote::MidPipeline,
        task_id: Some(task.id),
        job_id: None,
        effects: true,
    })
}

// ---------------------------------------------------------------------------- transitions

/// Approved, Rejected and Confirm Deploy: the stage map's move for the task of this issue,
/// or an ignored delivery saying why it does not apply (the same checks as the commands).
pub(super) fn transition(
    ctx: &Ctx,
    meta: &Meta,
    out: EventResult,
    change: &StateChange,
    on: Trigger,
) -> Result<EventResult> {
    let detail = json!({ "state": out.state });
    apply(ctx, meta, out, |w| {
        let Some(task) = w.find_task_by_plane_issue(&change.issue_id)? else {
            return Ok(Outcome::ignored(EventNote::NoTask, None));
        };
        Ok(
            match transitions::decide(w, &task, on, Via::Plane, &detail)? {
                Ok(moved) => Outcome::queued(EventNote::Moved(on), task.id, moved.job),
                Err(refusal) => {
                    Outcome::ignored(EventNote::NotApplicable(on, refusal), Some(task.id))
                }
            },
        )
    })
}
