//! Plane intake (SPEC §6): `orchctl event` and reconcile's Plane pass.
//!
//! `handle` takes one webhook delivery: it checks the HMAC of the *raw* body before it
//! trusts a byte of it, reads every field a route needs before anything is written (a
//! malformed body is exit 65 naming the JSON path, an unsigned one exit 77, and neither
//! leaves a trace), drops a body it has handled before (Plane retries with the same body
//! and a new delivery id) and our own bot's echoes, then routes the state change: STOP
//! goes through `stop` (kill switch and scope permitting); To Analyse is the only way a
//! pipeline starts, and never relaunches a mid-pipeline task while the gate is on;
//! Approved, Rejected and Confirm Deploy make the moves of SPEC §1. Each change and the
//! record of the delivery are one transaction (for STOP too, so two copies of one body
//! act once); Plane is only called outside it (state names, the project identifier),
//! within a time budget that answers Plane before it gives up on us, and the comment goes
//! through the outbox.
//!
//! `plane_pass` is reconcile's safety net for lost webhooks: it lists each project's work
//! items a page at a time and stops live tasks whose issue is in STOP or gone. It never
//! fetches a terminal task and never lets one failing project or task end the pass.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Result;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::{Config, Secret};
use crate::error::{bad_input, config_err, no_perm, temp_fail};
use crate::integrations::plane::{PlaneClient, PlaneIssue};
use crate::integrations::EffectError;
use crate::model::{Job, Task};
use crate::names;
use crate::outbox::{self, Effect, EffectReport};
use crate::pipeline;
use crate::reconcile::TaskError;
use crate::stop::{self, Source, StopOptions, StopResult};
use crate::store::{NewTask, Writer};
use crate::tasks;
use crate::Ctx;

/// Plane gives a receiver 30 s: an event may wait out a rate limit only briefly and
/// bounds each request tighter than the configured timeout.
const EVENT_MAX_WAIT: Duration = Duration::from_secs(2);
const EVENT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many request timeouts an event's Plane calls may take together before no new
/// request starts: with the one in flight, an event answers within four (20 s at most).
const EVENT_BUDGET_TIMEOUTS: u32 = 3;
/// Reconcile runs from cron and may wait for Plane's minute window to reset.
const RECONCILE_MAX_WAIT: Duration = Duration::from_secs(60);

/// The headers of a delivery, passed as flags or environment.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub delivery: Option<String>,
    pub event: Option<String>,
    pub signature: Option<String>,
}

/// What `orchctl event` did with one delivery.
#[derive(Debug, Clone, Serialize)]
pub struct EventResult {
    /// `stop`, `start_pipeline`, `job_queued`, `refused` (a To Analyse on a mid-pipeline
    /// task: no job, a Plane comment says why), `ignored` or `duplicate`.
    pub action: String,
    /// Why, in a word or two (`stop-disabled`, `no-task`, `mid-pipeline`, the stop's note…).
    pub note: Option<String>,
    /// The task as it is after the delivery.
    pub task: Option<Task>,
    /// The job the delivery queued.
    pub job: Option<Job>,
    /// The Plane state the work item moved to, by name.
    pub state: Option<String>,
    pub event: Option<String>,
    pub delivery: Option<String>,
    pub body_sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<EffectReport>,
}

/// What reconcile's Plane pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanePass {
    /// Live tasks compared with their Plane issue.
    pub checked: usize,
    /// Tasks stopped because their issue is in STOP.
    pub stopped: usize,
    /// Tasks cancelled because their issue is gone.
    pub deleted: usize,
    /// Stops deferred by a critical deploy window (applied later).
    pub deferred: usize,
    /// Live tasks without a Plane issue or project (nothing to compare).
    pub unlinked: usize,
    /// Live tasks left alone because the kill switch or its scope excludes their repo.
    pub stop_disabled: usize,
    /// HTTP requests sent to Plane.
    pub requests: u32,
    pub errors: Vec<TaskError>,
}

// ---------------------------------------------------------------------------- signature

/// Checks `X-Plane-Signature` against the raw body when a secret is configured: lowercase
/// hex HMAC-SHA256, compared in constant time. Missing or wrong is exit 77.
pub fn verify_signature(
    secret: Option<&Secret>,
    body: &[u8],
    signature: Option<&str>,
) -> Result<()> {
    let Some(secret) = secret else {
        return Ok(());
    };
    let Some(sig) = signature.map(str::trim).filter(|s| !s.is_empty()) else {
        return Err(no_perm(
            "the delivery has no X-Plane-Signature but ORCH_PLANE_WEBHOOK_SECRET is set",
        ));
    };
    let wrong = || no_perm("the X-Plane-Signature does not match the delivery body");
    let sig = hex::decode(sig).map_err(|_| wrong())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .map_err(|_| config_err("ORCH_PLANE_WEBHOOK_SECRET cannot key an HMAC"))?;
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| wrong())
}

// ---------------------------------------------------------------------------- JSON paths

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value at a dotted `path`; `None` when it (or a parent) is absent or null. A parent
/// that is present but not an object is an error naming that parent's path.
fn lookup<'v>(root: &'v Value, path: &str) -> Result<Option<&'v Value>> {
    let mut cur = root;
    let mut walked = String::new();
    for part in path.split('.') {
        match cur {
            Value::Object(map) => match map.get(part) {
                None | Some(Value::Null) => return Ok(None),
                Some(v) => cur = v,
            },
            other => {
                return Err(bad_input(format!(
                    "malformed Plane delivery: `{walked}` must be an object, got {}",
                    type_name(other)
                )))
            }
        }
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
    }
    Ok(Some(cur))
}

fn missing(path: &str) -> anyhow::Error {
    bad_input(format!("malformed Plane delivery: `{path}` is missing"))
}

fn mistyped(path: &str, want: &str, got: &Value) -> anyhow::Error {
    bad_input(format!(
        "malformed Plane delivery: `{path}` must be {want}, got {}",
        type_name(got)
    ))
}

fn opt_str<'v>(root: &'v Value, path: &str) -> Result<Option<&'v str>> {
    match lookup(root, path)? {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(mistyped(path, "a string", other)),
    }
}

fn req_str<'v>(root: &'v Value, path: &str) -> Result<&'v str> {
    opt_str(root, path)?.ok_or_else(|| missing(path))
}

fn req_object(root: &Value, path: &str) -> Result<()> {
    match lookup(root, path)? {
        None => Err(missing(path)),
        Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(mistyped(path, "an object", other)),
    }
}

fn req_i64(root: &Value, path: &str) -> Result<i64> {
    match lookup(root, path)? {
        None => Err(missing(path)),
        Some(v) => v.as_i64().ok_or_else(|| mistyped(path, "an integer", v)),
    }
}

/// A Plane id that becomes a key: non-empty, no `#` (the tombstone separator), no
/// control characters.
fn plane_key<'v>(root: &'v Value, path: &str) -> Result<&'v str> {
    let id = req_str(root, path)?;
    if id.trim().is_empty() || id.contains('#') || id.chars().any(char::is_control) {
        return Err(bad_input(format!(
            "malformed Plane delivery: `{path}` is not a usable id ({id:?})"
        )));
    }
    Ok(id)
}

// ---------------------------------------------------------------------------- intake

/// A work item that moved to a state (or was created in one).
#[derive(Debug, Clone)]
struct StateChange {
    created: bool,
    issue_id: String,
    project_id: Option<String>,
    state_id: String,
    /// The name the payload gives that very state id; `None` when `data` is newer than
    /// the change (its state is another one) or carries only the id.
    state_name: Option<String>,
}

enum Intake {
    Ignore(String),
    State(StateChange),
}

/// Reads what the delivery asks for, validating every field the route needs.
fn read_intake(v: &Value, event: &str) -> Result<Intake> {
    if event != "issue" {
        return Ok(Intake::Ignore(format!("event:{event}")));
    }
    let action = req_str(v, "action")?;
    let created = match action {
        "updated" => false,
        "created" => true,
        other => return Ok(Intake::Ignore(format!("action:{other}"))),
    };
    let issue_id = plane_key(v, "data.id")?.to_string();
    let project_id = opt_str(v, "data.project")?.map(String::from);
    let (state_id, state_name) = if created {
        match lookup(v, "data.state")? {
            None => return Err(missing("data.state")),
            Some(Value::String(id)) => (id.clone(), None),
            Some(Value::Object(_)) => (
                req_str(v, "data.state.id")?.to_string(),
                opt_str(v, "data.state.name")?.map(String::from),
            ),
            Some(other) => return Err(mistyped("data.state", "an object or a string", other)),
        }
    } else {
        req_object(v, "activity")?;
        match opt_str(v, "activity.field")? {
            Some("state_id" | "state") => {}
            other => return Ok(Intake::Ignore(format!("field:{}", other.unwrap_or("none")))),
        }
        let new_value = req_str(v, "activity.new_value")?.to_string();
        // `data` is serialized when the webhook is sent, so it may already show a later
        // state: its name counts only when its id is the one this change set.
        let name = match lookup(v, "data.state")? {
            Some(Value::Object(_)) if opt_str(v, "data.state.id")? == Some(new_value.as_str()) => {
                opt_str(v, "data.state.name")?.map(String::from)
            }
            None | Some(Value::Object(_) | Value::String(_)) => None,
            // Anything else is a malformed payload, not a reason to ask Plane for names.
            Some(other) => return Err(mistyped("data.state", "an object or a string", other)),
        };
        (new_value, name)
    };
    Ok(Intake::State(StateChange {
        created,
        issue_id,
        project_id,
        state_id,
        state_name,
    }))
}

fn is_echo(config: &Config, v: &Value) -> bool {
    let Some(bot) = &config.bot_user_id else {
        return false;
    };
    lookup(v, "activity.actor.id")
        .ok()
        .flatten()
        .and_then(Value::as_str)
        == Some(bot.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Stop,
    ToAnalyse,
    Approved,
    Rejected,
    ConfirmDeploy,
}

impl Route {
    fn of(config: &Config, name: &str) -> Option<Route> {
        let s = &config.states;
        let is = |want: &str| name.trim().eq_ignore_ascii_case(want.trim());
        if is(&s.stop) {
            Some(Route::Stop)
        } else if is(&s.to_analyse) {
            Some(Route::ToAnalyse)
        } else if is(&s.approved) {
            Some(Route::Approved)
        } else if is(&s.rejected) {
            Some(Route::Rejected)
        } else if is(&s.confirm_deploy) {
            Some(Route::ConfirmDeploy)
        } else {
            None
        }
    }

    fn word(self) -> &'static str {
        match self {
            Route::Stop => "stop",
            Route::ToAnalyse => "to-analyse",
            Route::Approved => "approved",
            Route::Rejected => "rejected",
            Route::ConfirmDeploy => "confirm-deploy",
        }
    }
}

// ---------------------------------------------------------------------------- handle

/// Handles one delivery body (SPEC §6).
pub fn handle(ctx: &Ctx, body: &[u8], d: &Delivery) -> Result<EventResult> {
    verify_signature(
        ctx.config.webhook_secret.as_ref(),
        body,
        d.signature.as_deref(),
    )?;
    let payload: Value = serde_json::from_slice(body)
        .map_err(|e| bad_input(format!("the delivery body is not JSON: {e}")))?;
    if !payload.is_object() {
        return Err(mistyped("$", "an object", &payload));
    }
    let header = |h: &Option<String>| {
        h.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    // The body is signed and the header is not: the body's word wins, and a header that
    // contradicts it is refused rather than trusted.
    let event = match (header(&d.event), opt_str(&payload, "event")?) {
        (Some(h), Some(b)) if h != b => {
            let why = format!("X-Plane-Event {h:?} contradicts `event` {b:?} in the body");
            return Err(bad_input(format!("malformed Plane delivery: {why}")));
        }
        (_, Some(b)) => b.to_string(),
        (Some(h), None) => h,
        (None, None) => return Err(missing("event")),
    };
    let intake = read_intake(&payload, &event)?;

    let meta = Meta {
        sha: hex::encode(Sha256::digest(body)),
        delivery: header(&d.delivery),
        event,
        plane_deadline: Instant::now() + EVENT_BUDGET_TIMEOUTS * event_http_timeout(ctx),
    };
    let mut out = EventResult {
        action: "ignored".into(),
        note: None,
        task: None,
        job: None,
        state: None,
        event: Some(meta.event.clone()),
        delivery: meta.delivery.clone(),
        body_sha256: meta.sha.clone(),
        stop: None,
        effects: Vec::new(),
    };
    if ctx.store.read(|r| r.delivery_seen(&meta.sha))? {
        out.action = "duplicate".into();
        return Ok(out);
    }
    if is_echo(&ctx.config, &payload) {
        return record_only(ctx, &meta, out, "ignored", "echo", None);
    }
    let change = match intake {
        Intake::Ignore(note) => return record_only(ctx, &meta, out, "ignored", &note, None),
        Intake::State(change) => change,
    };
    let Some(name) = state_name(ctx, &meta, &change)? else {
        let note = format!("state-unknown:{}", change.state_id);
        return record_only(ctx, &meta, out, "ignored", &note, None);
    };
    out.state = Some(name.clone());
    match Route::of(&ctx.config, &name) {
        Some(Route::ToAnalyse) => to_analyse(ctx, &meta, out, &payload, &change),
        _ if change.created => {
            record_only(ctx, &meta, out, "ignored", "created-not-to-analyse", None)
        }
        Some(Route::Stop) => route_stop(ctx, &meta, out, &change),
        Some(route) => transition(ctx, &meta, out, &change, route),
        None => record_only(ctx, &meta, out, "ignored", "state-not-routed", None),
    }
}

/// The delivery's identity, recorded once it is handled.
struct Meta {
    sha: String,
    delivery: Option<String>,
    event: String,
    /// When the delivery's calls to Plane must have ended (Plane waits 30 s for an answer).
    plane_deadline: Instant,
}

/// What a routing transaction decided.
struct Outcome {
    action: &'static str,
    note: String,
    task_id: Option<i64>,
    job_id: Option<i64>,
    /// Effects were written for the task: run them after the commit.
    effects: bool,
}

impl Outcome {
    fn queued(note: &str, task_id: i64, job_id: Option<i64>) -> Outcome {
        Outcome {
            action: "job_queued",
            note: note.into(),
            task_id: Some(task_id),
            job_id,
            effects: false,
        }
    }

    fn ignored(note: impl Into<String>, task_id: Option<i64>) -> Outcome {
        Outcome {
            action: "ignored",
            note: note.into(),
            task_id,
            job_id: None,
            effects: false,
        }
    }
}

impl Meta {
    /// Remembers the body as handled; false when it already was (a concurrent copy).
    fn record(&self, w: &Writer, action: &str, task_id: Option<i64>) -> Result<bool> {
        w.record_delivery(
            &self.sha,
            self.delivery.as_deref(),
            Some(&self.event),
            action,
            task_id,
        )
    }
}

/// Records a delivery that changes nothing (so its retries are recognised) as `action`.
fn record_only(
    ctx: &Ctx,
    meta: &Meta,
    mut out: EventResult,
    action: &str,
    note: &str,
    task: Option<Task>,
) -> Result<EventResult> {
    let task_id = task.as_ref().map(|t| t.id);
    let fresh = ctx.store.write(|w| meta.record(w, action, task_id))?;
    out.action = if fresh { action } else { "duplicate" }.into();
    out.note = Some(note.to_string());
    out.task = task;
    Ok(out)
}

/// Runs `decide` and records the delivery in one transaction (a concurrent copy of the
/// same body finds it recorded and is a duplicate), then runs the task's side effects.
fn apply(
    ctx: &Ctx,
    meta: &Meta,
    mut out: EventResult,
    decide: impl FnOnce(&Writer) -> Result<Outcome>,
) -> Result<EventResult> {
    let outcome = ctx.store.write(|w| {
        if w.delivery_seen(&meta.sha)? {
            return Ok(None);
        }
        let o = decide(w)?;
        meta.record(w, o.action, o.task_id)?;
        Ok(Some(o))
    })?;
    let Some(o) = outcome else {
        out.action = "duplicate".into();
        return Ok(out);
    };
    if let (true, Some(t)) = (o.effects, o.task_id) {
        out.effects = outbox::run_for_task(ctx, t)?;
    }
    out.action = o.action.into();
    out.note = Some(o.note);
    ctx.store.read(|r| {
        out.task = match o.task_id {
            Some(t) => r.task(t)?,
            None => None,
        };
        out.job = match o.job_id {
            Some(j) => r.job(j)?,
            None => None,
        };
        Ok(())
    })?;
    Ok(out)
}

fn event_http_timeout(ctx: &Ctx) -> Duration {
    ctx.config.http_timeout.min(EVENT_HTTP_TIMEOUT)
}

fn event_client<'a>(ctx: &'a Ctx, plane: &'a crate::config::Plane, meta: &Meta) -> PlaneClient<'a> {
    PlaneClient::new(plane, event_http_timeout(ctx), EVENT_MAX_WAIT)
        .with_deadline(meta.plane_deadline)
}

/// A failed Plane call during an event: temporary (exit 75, Plane retries) unless
/// retrying cannot help.
fn plane_failure(config: &Config, e: EffectError, what: &str) -> anyhow::Error {
    let msg = config.scrub(&format!("{what}: {}", e.message));
    if e.permanent {
        anyhow::anyhow!(msg)
    } else {
        temp_fail(msg)
    }
}

/// The name of the state a change moved to: from the payload when it names that very
/// state, else from the per-project cache, else from Plane's states API (then cached).
/// `None` when the project has no such state.
fn state_name(ctx: &Ctx, meta: &Meta, change: &StateChange) -> Result<Option<String>> {
    if let Some(name) = &change.state_name {
        return Ok(Some(name.clone()));
    }
    let project = change.project_id.as_deref().ok_or_else(|| {
        bad_input(format!(
            "malformed Plane delivery: `data.project` is missing (needed to look up state {})",
            change.state_id
        ))
    })?;
    if let Some(name) = ctx
        .store
        .read(|r| r.plane_state_name(project, &change.state_id))?
    {
        return Ok(Some(name));
    }
    let plane = ctx.config.plane.as_ref().ok_or_else(|| {
        config_err(format!(
            "the name of Plane state {} is neither in the delivery nor cached, and ORCH_PLANE_URL is not set",
            change.state_id
        ))
    })?;
    refresh_states(ctx, &event_client(ctx, plane, meta), project).map_err(|e| {
        plane_failure(
            &ctx.config,
            e,
            &format!("listing the states of Plane project {project}"),
        )
    })?;
    ctx.store
        .read(|r| r.plane_state_name(project, &change.state_id))
}

/// Fetches a project's states and replaces its cache.
fn refresh_states(ctx: &Ctx, client: &PlaneClient, project: &str) -> Result<(), EffectError> {
    let states = client.states(project)?;
    let rows: Vec<(String, String, Option<String>)> = states
        .into_iter()
        .map(|s| (s.id, s.name, s.group))
        .collect();
    ctx.store
        .write(|w| w.cache_plane_states(project, &rows))
        .map_err(|e| EffectError::retry(format!("caching the states: {e:#}")))
}

// ---------------------------------------------------------------------------- STOP

fn route_stop(
    ctx: &Ctx,
    meta: &Meta,
    mut out: EventResult,
    change: &StateChange,
) -> Result<EventResult> {
    if !ctx.config.stop_enabled {
        return record_only(ctx, meta, out, "ignored", "stop-disabled", None);
    }
    let Some(task) = ctx
        .store
        .read(|r| r.find_task_by_plane_issue(&change.issue_id))?
    else {
        // Unknown task: a no-op, never an error.
        return record_only(ctx, meta, out, "stop", "no-task", None);
    };
    if !ctx.config.stop_applies(&task.repo) {
        return record_only(ctx, meta, out, "ignored", "stop-disabled", Some(task));
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
        meta.record(w, "stop", Some(task.id))
    })?
    else {
        out.action = "duplicate".into();
        return Ok(out);
    };
    out.action = "stop".into();
    out.note = Some(result.note.clone());
    out.task = result.task.clone();
    out.stop = Some(result);
    Ok(out)
}

// ---------------------------------------------------------------------------- To Analyse

fn to_analyse(
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
        action: "start_pipeline",
        note: "created".into(),
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
            format!("terminal:{}", task.stage),
            Some(task.id),
        ));
    }
    if task.cancel_requested_at.is_some() {
        return Some(Outcome::ignored("stop-pending", Some(task.id)));
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
    if task.stage == "analysis" {
        if w.has_active_job(task.id)? {
            return Ok(Outcome::ignored("job-active", Some(task.id)));
        }
        let job = queue_job(
            w,
            task,
            "analyst",
            json!({ "state": state, "why": "analysis resumed" }),
        )?;
        return Ok(Outcome::queued("analyst-relaunched", task.id, Some(job)));
    }
    let Some(agent) = pipeline::agent_for_stage(&task.stage) else {
        return Ok(Outcome::ignored(
            format!("stage:{}", task.stage),
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
        return Ok(Outcome::queued("legacy-relaunch", task.id, Some(job)));
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
        action: "refused",
        note: "mid-pipeline".into(),
        task_id: Some(task.id),
        job_id: None,
        effects: true,
    })
}

// ---------------------------------------------------------------------------- transitions

fn transition(
    ctx: &Ctx,
    meta: &Meta,
    out: EventResult,
    change: &StateChange,
    route: Route,
) -> Result<EventResult> {
    let state = out.state.clone();
    apply(ctx, meta, out, |w| {
        let Some(task) = w.find_task_by_plane_issue(&change.issue_id)? else {
            return Ok(Outcome::ignored("no-task", None));
        };
        if let Some(o) = inert(&task) {
            return Ok(o);
        }
        let state = state.as_deref();
        match (route, task.stage.as_str()) {
            (Route::Approved, "analysis") => move_stage(w, &task, "development", route, state),
            (Route::Rejected, "review") => move_stage(w, &task, "development", route, state),
            // Parked awaiting Confirm Deploy after the review: a person rejects the work.
            // Not while a deployer runs or a deploy is initiated (the window is open).
            (Route::Rejected, "deploy") => {
                if w.has_running_job(task.id)? || stop::in_critical_window(w, &task)? {
                    return Ok(Outcome::ignored("rejected-in:deploy-busy", Some(task.id)));
                }
                if let Some(branch) = &task.branch {
                    w.release_lease(&task.repo, branch)?;
                }
                move_stage(w, &task, "development", route, state)
            }
            (Route::Rejected, "analysis") => queue_if_idle(w, &task, "analyst", route, state),
            (Route::ConfirmDeploy, "deploy") => queue_if_idle(w, &task, "deployer", route, state),
            (_, stage) => Ok(Outcome::ignored(
                format!("{}-in:{stage}", route.word()),
                Some(task.id),
            )),
        }
    })
}

/// SPEC §1 moves out of a parked stage: the stage's queued jobs are superseded, the task
/// moves, and the new stage's agent is queued.
fn move_stage(
    w: &Writer,
    task: &Task,
    to: &str,
    route: Route,
    state: Option<&str>,
) -> Result<Outcome> {
    let superseded = w.cancel_jobs_for_task(
        task.id,
        true,
        &format!("superseded: Plane {}", route.word()),
    )?;
    if !w.set_stage(task.id, &task.stage, to)? {
        return Ok(Outcome::ignored("stage-changed", Some(task.id)));
    }
    w.event(
        Some(task.id),
        "stage_changed",
        &json!({ "from": task.stage, "to": to, "source": "plane", "state": state,
                 "queued_jobs_cancelled": superseded.iter().map(|j| j.id).collect::<Vec<_>>() }),
    )?;
    let job = match pipeline::entry_agent(to) {
        Some(agent) => Some(queue_job(w, task, agent, json!({ "state": state }))?),
        None => None,
    };
    Ok(Outcome::queued(route.word(), task.id, job))
}

/// A new job of `agent` unless one is already queued or running.
fn queue_if_idle(
    w: &Writer,
    task: &Task,
    agent: &str,
    route: Route,
    state: Option<&str>,
) -> Result<Outcome> {
    if w.has_active_job(task.id)? {
        return Ok(Outcome::ignored("job-active", Some(task.id)));
    }
    let job = queue_job(w, task, agent, json!({ "state": state }))?;
    Ok(Outcome::queued(route.word(), task.id, Some(job)))
}

// ---------------------------------------------------------------------------- reconcile

/// What Plane says about a task's issue.
enum Verdict {
    Stop,
    Gone,
    Other,
}

/// Reconcile's Plane pass: lists each project's work items in pages (never one request
/// per task) and stops live tasks whose issue is in STOP or no longer exists, as far as
/// the kill switch and its scope allow.
pub fn plane_pass(ctx: &Ctx) -> Result<PlanePass> {
    let mut pass = PlanePass::default();
    let Some(plane) = &ctx.config.plane else {
        return Ok(pass);
    };
    let client = PlaneClient::new(plane, ctx.config.http_timeout, RECONCILE_MAX_WAIT);
    let mut by_project: BTreeMap<String, Vec<Task>> = BTreeMap::new();
    for task in ctx.store.read(|r| r.live_tasks())? {
        match (&task.project_id, task.original_plane_issue()) {
            (Some(p), Some(_)) => {
                if !ctx.config.stop_applies(&task.repo) {
                    pass.stop_disabled += 1;
                } else if task.cancel_requested_at.is_none() {
                    by_project.entry(p.clone()).or_default().push(task);
                }
            }
            _ => pass.unlinked += 1,
        }
    }
    let scrub = |e: String| ctx.config.scrub(&e);
    for (project, tasks) in by_project {
        let listing = match client.issues(&project) {
            Ok(Some(items)) => items,
            // A wrong workspace slug looks the same as a deleted project: never cancel on it.
            Ok(None) => {
                pass.errors.push(TaskError {
                    task_id: None,
                    error: format!(
                        "Plane project {project} not found (404); its {} task(s) were left alone",
                        tasks.len()
                    ),
                });
                continue;
            }
            Err(e) => {
                pass.errors.push(TaskError {
                    task_id: None,
                    error: scrub(format!(
                        "listing the work items of Plane project {project}: {}",
                        e.message
                    )),
                });
                continue;
            }
        };
        let issues: HashMap<&str, &PlaneIssue> =
            listing.iter().map(|i| (i.id.as_str(), i)).collect();
        let mut refreshed = false;
        for task in tasks {
            pass.checked += 1;
            let issue_id = task.original_plane_issue().unwrap_or_default().to_string();
            let verdict = match issues.get(issue_id.as_str()) {
                Some(issue) => verdict_of(ctx, &client, &project, issue, &mut refreshed),
                // Absent from the listing: deleted, or archived (which lists hide). Ask.
                None => match client.issue(&project, &issue_id) {
                    Ok(None) => Ok(Verdict::Gone),
                    Ok(Some(issue)) => verdict_of(ctx, &client, &project, &issue, &mut refreshed),
                    Err(e) => Err(anyhow::anyhow!(
                        "reading Plane issue {issue_id}: {}",
                        e.message
                    )),
                },
            };
            let (reason, gone) = match verdict {
                Ok(Verdict::Other) => continue,
                Ok(Verdict::Stop) => (
                    format!(
                        "Plane state is {} (found by reconcile)",
                        ctx.config.states.stop
                    ),
                    false,
                ),
                Ok(Verdict::Gone) => (
                    format!("the Plane issue {issue_id} no longer exists (deleted in Plane)"),
                    true,
                ),
                Err(e) => {
                    pass.errors.push(TaskError {
                        task_id: Some(task.id),
                        error: scrub(format!("{e:#}")),
                    });
                    continue;
                }
            };
            let opts = StopOptions {
                reason: Some(reason),
                force: false,
                source: Source::Reconcile,
            };
            match stop::cancel_task(ctx, task.id, &opts) {
                Ok(r) if r.deferred => pass.deferred += 1,
                Ok(r) if r.note == "cancelled" && gone => pass.deleted += 1,
                Ok(r) if r.note == "cancelled" => pass.stopped += 1,
                Ok(_) => {}
                Err(e) => pass.errors.push(TaskError {
                    task_id: Some(task.id),
                    error: scrub(format!("{e:#}")),
                }),
            }
        }
    }
    pass.requests = client.requests();
    Ok(pass)
}

/// Whether a listed issue is in STOP: its expanded state name, else the cached name of
/// its state id (the cache refreshed at most once per project per pass).
fn verdict_of(
    ctx: &Ctx,
    client: &PlaneClient,
    project: &str,
    issue: &PlaneIssue,
    refreshed: &mut bool,
) -> Result<Verdict> {
    let name = match (&issue.state_name, &issue.state_id) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(id)) => {
            let mut name = ctx.store.read(|r| r.plane_state_name(project, id))?;
            if name.is_none() && !*refreshed {
                *refreshed = true;
                refresh_states(ctx, client, project).map_err(|e| {
                    anyhow::anyhow!(
                        "listing the states of Plane project {project}: {}",
                        e.message
                    )
                })?;
                name = ctx.store.read(|r| r.plane_state_name(project, id))?;
            }
            name
        }
        (None, None) => None,
    };
    Ok(match name.and_then(|n| Route::of(&ctx.config, &n)) {
        Some(Route::Stop) => Verdict::Stop,
        _ => Verdict::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_name_what_is_wrong() {
        let v: Value =
            serde_json::from_str(r#"{"activity": {"new_value": 7, "field": null}, "data": "x"}"#)
                .unwrap();
        let e = req_str(&v, "activity.new_value").unwrap_err();
        assert!(format!("{e}").contains("`activity.new_value` must be a string, got a number"));
        let e = req_str(&v, "data.id").unwrap_err();
        assert!(format!("{e}").contains("`data` must be an object"), "{e}");
        let e = req_str(&v, "activity.field").unwrap_err();
        assert!(format!("{e}").contains("`activity.field` is missing"));
        assert_eq!(crate::error::exit_kind(&e), crate::error::ExitKind::DataErr);
    }

    #[test]
    fn signature_is_hmac_sha256_of_the_raw_bytes() {
        let secret = Secret::new("plane_wh_0123456789abcdef0123456789abcdef");
        let body = include_bytes!("../tests/fixtures/plane/issue_update_state_change.wire.json");
        let good = "61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066";
        assert!(verify_signature(Some(&secret), body, Some(good)).is_ok());
        for bad in [None, Some(""), Some("zz"), Some(&good[..62])] {
            let e = verify_signature(Some(&secret), body, bad).unwrap_err();
            assert_eq!(crate::error::exit_kind(&e), crate::error::ExitKind::NoPerm);
        }
        assert!(verify_signature(None, body, None).is_ok());
    }

    #[test]
    fn state_names_are_configurable_and_case_blind() {
        let mut c = Config::from_lookup(&|_| None).unwrap();
        assert_eq!(Route::of(&c, "STOP"), Some(Route::Stop));
        assert_eq!(Route::of(&c, " to analyse "), Some(Route::ToAnalyse));
        assert_eq!(Route::of(&c, "Done"), None);
        c.states.stop = "Halt".into();
        assert_eq!(Route::of(&c, "STOP"), None);
        assert_eq!(Route::of(&c, "halt"), Some(Route::Stop));
    }
}
