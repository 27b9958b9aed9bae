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
//! The module is split along its seams: [`signature`] (the HMAC), [`payload`] (reading
//! and validating the JSON), `routes` (what each Plane state does); the state-name cache
//! and the route lookup live in `plane_states`, shared with reconcile's Plane pass; the
//! moves Approved, Rejected and Confirm Deploy make are `transitions`', the same code the
//! operator commands run.

mod payload;
mod routes;
mod signature;

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{bad_input, config_err, temp_fail};
use crate::integrations::plane::PlaneClient;
use crate::integrations::EffectError;
use crate::model::{Job, Task};
use crate::outbox::{self, EffectReport};
use crate::pipeline::{Stage, Trigger};
use crate::plane_states::{self, Route};
use crate::stop::{StopNote, StopResult};
use crate::store::Writer;
use crate::transitions::Refusal;
use crate::Ctx;

use payload::{is_echo, missing, mistyped, opt_str, read_intake, Intake, StateChange};
pub use signature::verify_signature;

/// bounds each request tighter than the configured timeout.
const EVENT_MAX_WAIT: Duration = Duration::from_secs(2);
const EVENT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many request timeouts an event's Plane calls may take together before no new
/// request starts: with the one in flight, an event answers within four (20 s at most).
const EVENT_BUDGET_TIMEOUTS: u32 = 3;

/// What a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventAction {
    /// A STOP went through `stop` (its note says how).
    Stop,
    /// A To Analyse started a new pipeline.
    StartPipeline,
    /// A job was queued (Approved, Rejected, Confirm Deploy, To Analyse in analysis).
    JobQueued,
    /// A To Analyse on a mid-pipeline task: no job, a Plane comment says why.
    Refused,
    /// Nothing to do (the note says why).
    Ignored,
    /// The body was handled before.
    Duplicate,
}

/// Why, in a word or two.
#[derive(Debug, Clone, PartialEq)]
pub enum EventNote {
    /// A change made by orchctl's own Plane user.
    Echo,
    /// Another event, action or field than a state change (`event:comment`, …).
    OtherEvent(String),
    OtherAction(String),
    OtherField(String),
    /// The project has no state with that id.
    StateUnknown(String),
    CreatedNotToAnalyse,
    StateNotRouted,
    StopDisabled,
    NoTask,
    /// The stop's own note.
    Stop(StopNote),
    /// A new pipeline.
    Created,
    AnalystRelaunched,
    LegacyRelaunch,
    MidPipeline,
    /// A stage without an agent.
    NoAgent(Stage),
    Terminal(Stage),
    StopPending,
    JobActive,
    /// The stage map's move was made.
    Moved(Trigger),
    /// The move does not apply now.
    NotApplicable(Trigger, Refusal),
}

impl std::fmt::Display for EventNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventNote::Echo => f.write_str("echo"),
            EventNote::OtherEvent(e) => write!(f, "event:{e}"),
            EventNote::OtherAction(a) => write!(f, "action:{a}"),
            EventNote::OtherField(x) => write!(f, "field:{x}"),
            EventNote::StateUnknown(id) => write!(f, "state-unknown:{id}"),
            EventNote::CreatedNotToAnalyse => f.write_str("created-not-to-analyse"),
            EventNote::StateNotRouted => f.write_str("state-not-routed"),
            EventNote::StopDisabled => f.write_str("stop-disabled"),
            EventNote::NoTask => f.write_str("no-task"),
            EventNote::Stop(n) => write!(f, "{n}"),
            EventNote::Created => f.write_str("created"),
            EventNote::AnalystRelaunched => f.write_str("analyst-relaunched"),
            EventNote::LegacyRelaunch => f.write_str("legacy-relaunch"),
            EventNote::MidPipeline => f.write_str("mid-pipeline"),
            EventNote::NoAgent(s) => write!(f, "stage:{s}"),
            EventNote::Terminal(s) => write!(f, "terminal:{s}"),
            EventNote::StopPending => f.write_str("stop-pending"),
            EventNote::JobActive => f.write_str("job-active"),
            EventNote::Moved(on) => f.write_str(on.word()),
            EventNote::NotApplicable(on, refusal) => f.write_str(&refusal.note(*on)),
        }
    }
}

impl Serialize for EventNote {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

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
    pub action: EventAction,
    /// Why, in a word or two (`stop-disabled`, `no-task`, `mid-pipeline`, the stop's note…).
    pub note: Option<EventNote>,
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

impl EventAction {
    /// The word recorded with a handled delivery.
    pub fn as_str(self) -> &'static str {
        match self {
            EventAction::Stop => "stop",
            EventAction::StartPipeline => "start_pipeline",
            EventAction::JobQueued => "job_queued",
            EventAction::Refused => "refused",
            EventAction::Ignored => "ignored",
            EventAction::Duplicate => "duplicate",
        }
    }
}

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
        action: EventAction::Ignored,
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
        out.action = EventAction::Duplicate;
        return Ok(out);
    }
    if is_echo(&ctx.config, &payload) {
        return record_only(ctx, &meta, out, EventAction::Ignored, EventNote::Echo, None);
    }
    let change = match intake {
        Intake::Ignore(note) => {
            return record_only(ctx, &meta, out, EventAction::Ignored, note, None)
        }
        Intake::State(change) => change,
    };
    let Some(name) = state_name(ctx, &meta, &change)? else {
        let note = EventNote::StateUnknown(change.state_id.clone());
        return record_only(ctx, &meta, out, EventAction::Ignored, note, None);
    };
    out.state = Some(name.clone());
    match Route::of(&ctx.config, &name) {
        Some(Route::ToAnalyse) => routes::to_analyse(ctx, &meta, out, &payload, &change),
        _ if change.created => {
            let note = EventNote::CreatedNotToAnalyse;
            record_only(ctx, &meta, out, EventAction::Ignored, note, None)
        }
        Some(Route::Stop) => routes::stop(ctx, &meta, out, &change),
        Some(Route::Approved) => routes::transition(ctx, &meta, out, &change, Trigger::Approved),
        Some(Route::Rejected) => routes::transition(ctx, &meta, out, &change, Trigger::Rejected),
        Some(Route::ConfirmDeploy) => {
            routes::transition(ctx, &meta, out, &change, Trigger::ConfirmDeploy)
        }
        None => {
            let note = EventNote::StateNotRouted;
            record_only(ctx, &meta, out, EventAction::Ignored, note, None)
        }
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
    action: EventAction,
    note: EventNote,
    task_id: Option<i64>,
    job_id: Option<i64>,
    /// Effects were written for the task: run them after the commit.
    effects: bool,
}

impl Outcome {
    fn queued(note: EventNote, task_id: i64, job_id: Option<i64>) -> Outcome {
        Outcome {
            action: EventAction::JobQueued,
            note,
            task_id: Some(task_id),
            job_id,
            effects: false,
        }
    }

    fn ignored(note: EventNote, task_id: Option<i64>) -> Outcome {
        Outcome {
            action: EventAction::Ignored,
            note,
            task_id,
            job_id: None,
            effects: false,
        }
    }
}

impl Meta {
    /// Remembers the body as handled; false when it already was (a concurrent copy).
    fn record(&self, w: &Writer, action: EventAction, task_id: Option<i64>) -> Result<bool> {
        w.record_delivery(
            &self.sha,
            self.delivery.as_deref(),
            Some(&self.event),
            action.as_str(),
            task_id,
        )
    }
}

/// Records a delivery that changes nothing (so its retries are recognised) as `action`.
fn record_only(
    ctx: &Ctx,
    meta: &Meta,
    mut out: EventResult,
    action: EventAction,
    note: EventNote,
    task: Option<Task>,
) -> Result<EventResult> {
    let task_id = task.as_ref().map(|t| t.id);
    let fresh = ctx.store.write(|w| meta.record(w, action, task_id))?;
    out.action = if fresh {
        action
    } else {
        EventAction::Duplicate
    };
    out.note = Some(note);
    out.task = task;
    Ok(out)
}

/// Records the delivery and runs `decide` in one transaction (a concurrent copy of the
/// same body finds it recorded and is a duplicate), then runs the task's side effects.
fn apply(
    ctx: &Ctx,
    meta: &Meta,
    mut out: EventResult,
    mut decide: impl FnMut(&Writer) -> Result<Outcome>,
) -> Result<EventResult> {
    let outcome = ctx.store.write(|w| {
        // Recorded first: of two concurrent copies of one body, the second waits for the
        // first's record and is a duplicate, whatever the backend.
        if !meta.record(w, EventAction::Ignored, None)? {
            return Ok(None);
        }
        let o = decide(w)?;
        w.set_delivery_outcome(&meta.sha, o.action.as_str(), o.task_id)?;
        Ok(Some(o))
    })?;
    let Some(o) = outcome else {
        out.action = EventAction::Duplicate;
        return Ok(out);
    };
    if let (true, Some(t)) = (o.effects, o.task_id) {
        out.effects = outbox::run_for_task(ctx, t)?;
    }
    out.action = o.action;
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
    if let Some(name) = plane_states::cached(ctx, project, &change.state_id)? {
        return Ok(Some(name));
    }
    let plane = ctx.config.plane.as_ref().ok_or_else(|| {
        config_err(format!(
            "the name of Plane state {} is neither in the delivery nor cached, and ORCH_PLANE_URL is not set",
            change.state_id
        ))
    })?;
    plane_states::refresh(ctx, &event_client(ctx, plane, meta), project).map_err(|e| {
        plane_failure(
            &ctx.config,
            e,
            &format!("listing the states of Plane project {project}"),
        )
    })?;
    plane_states::cached(ctx, project, &change.state_id)
}
