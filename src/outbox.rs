//! The side-effect outbox (SPEC §4).
//!
//! A state change that needs the outside world writes [`Effect`] rows in the *same*
//! transaction, then runs them right after the commit. Each row is claimed by one process
//! (pid + start time) before it runs, so two orchctl processes never run the same effect
//! at once, and a claim left by a killed orchctl is taken over. A failure leaves the row
//! `pending` with a backoff; after `ORCH_OUTBOX_MAX_ATTEMPTS` runs it is `failed` (and shows
//! in `queue`); a refusal is `failed` at once. Every ending is written to the task's log.
//! Effects never run inside a database transaction: the database is never locked while
//! waiting for a process, git or HTTP.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::Config;
use crate::integrations::git::{self, GitClone};
use crate::integrations::{gitea, notify, plane, process, EffectError};
use crate::model::OutboxRow;
use crate::names;
use crate::store::{EffectEnd, EffectOwner, Writer};
use crate::Ctx;

/// One external step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "payload", rename_all = "snake_case")]
pub enum Effect {
    /// Stop an agent's process group (identity-checked).
    StopProcess {
        job_id: i64,
        run_id: Option<i64>,
        pid: i64,
        proc_start: Option<i64>,
        /// The boot of its host the process was launched in: in another boot the pid names
        /// nothing of ours, whatever runs under it now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<String>,
    },
    /// Remove the branch's worktree and local branch from the clone.
    RemoveWorktree { repo: String, branch: String },
    /// Delete the branch on the remote (Gitea API, else `git push --delete`). `commit` is
    /// what the branch pointed at when the deletion was decided, when this host's clone
    /// knew it: only that is deleted, never what was pushed to the branch since (a fresh
    /// pipeline of the same work item reuses the branch name).
    DeleteRemoteBranch {
        repo: String,
        branch: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
    },
    /// A comment on the task's Plane issue.
    PlaneComment {
        project_id: Option<String>,
        issue_id: Option<String>,
        html: String,
    },
    /// `ORCH_NOTIFY_CMD` with the event on stdin.
    Notify { event: Value },
}

impl Effect {
    /// A Plane comment saying `message` (escaped) on an issue.
    pub fn plane_comment(
        project_id: Option<String>,
        issue_id: Option<String>,
        message: &str,
    ) -> Effect {
        Effect::PlaneComment {
            project_id,
            issue_id,
            html: format!("<p>orchctl: {}</p>", plane::html_escape(message)),
        }
    }

    /// The outbox `kind` of this effect.
    pub fn kind(&self) -> &'static str {
        match self {
            Effect::StopProcess { .. } => "stop_process",
            Effect::RemoveWorktree { .. } => "remove_worktree",
            Effect::DeleteRemoteBranch { .. } => "delete_remote_branch",
            Effect::PlaneComment { .. } => "plane_comment",
            Effect::Notify { .. } => "notify",
        }
    }

    fn split(&self) -> (String, Value) {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        (
            v["kind"].as_str().unwrap_or_default().to_string(),
            v.get("payload").cloned().unwrap_or(Value::Null),
        )
    }

    pub fn parse(kind: &str, payload: &Value) -> Result<Effect> {
        Ok(serde_json::from_value(
            json!({ "kind": kind, "payload": payload }),
        )?)
    }
}

/// Writes an effect row inside the caller's transaction; any host may carry it out.
pub fn enqueue(w: &Writer, task_id: Option<i64>, effect: &Effect) -> Result<i64> {
    enqueue_on(w, task_id, effect, None)
}

/// Writes an effect row that only `host` can carry out (an agent's kill, a worktree's
/// removal: SPEC §12), or any host when `None`.
pub fn enqueue_on(
    w: &Writer,
    task_id: Option<i64>,
    effect: &Effect,
    host: Option<&str>,
) -> Result<i64> {
    let (kind, payload) = effect.split();
    w.enqueue_effect(task_id, &kind, &payload, host)
}

/// Writes the notification effects of an event: a Plane comment and, when configured,
/// the notify hook.
pub fn enqueue_notification(
    w: &Writer,
    config: &Config,
    task: &crate::model::Task,
    event: &str,
    message: &str,
    extra: Value,
) -> Result<()> {
    enqueue(
        w,
        Some(task.id),
        &Effect::plane_comment(
            task.project_id.clone(),
            task.original_plane_issue().map(String::from),
            message,
        ),
    )?;
    if config.notify_cmd.is_some() {
        let mut ev = json!({
            "event": event,
            "message": message,
            "task_id": task.id,
            "work_item_id": task.original_work_item(),
            "plane_issue_id": task.original_plane_issue(),
            "repo": task.repo,
            "branch": task.branch,
        });
        if let (Value::Object(m), Value::Object(x)) = (&mut ev, extra) {
            m.extend(x);
        }
        enqueue(w, Some(task.id), &Effect::Notify { event: ev })?;
    }
    Ok(())
}

/// How one effect run ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EffectReport {
    pub id: i64,
    pub kind: String,
    /// `done`, `pending` (will be retried, or waits for its host), `failed`, or `busy`
    /// (another process runs it).
    pub status: String,
    /// The host the effect is bound to, when it is another one: that host carries it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl EffectReport {
    /// True for a `stop_process` left to the host that launched the agent.
    pub fn left_to_another_host(&self) -> bool {
        self.kind == "stop_process" && self.host.is_some() && self.status == "pending"
    }

    /// True for a `stop_process` that actually stopped a running agent.
    pub fn stopped_an_agent(&self) -> bool {
        self.kind == "stop_process"
            && self.status == "done"
            && self
                .detail
                .as_ref()
                .and_then(|d| d.get("outcome"))
                .and_then(Value::as_str)
                == Some("stopped")
    }
}

/// Runs every pending effect of a task now, whatever its backoff (an operator asked).
pub fn run_for_task(ctx: &Ctx, task_id: i64) -> Result<Vec<EffectReport>> {
    let rows = ctx.store.read(|r| r.pending_effects_of_task(task_id))?;
    run_rows(ctx, &rows)
}

/// Runs the pending effects bound to this host (the kills and worktree removals that other
/// hosts' STOPs left to it, SPEC §12), then what their tasks had waiting behind them (the
/// remote branch deletion, the notifications). `dispatch`, `reap` and `stop` run it, so a
/// cross-host STOP's kill happens within one timer interval of the agent's host. Costs one
/// index probe when there is nothing.
pub fn run_host_effects(ctx: &Ctx) -> Result<OutboxPass> {
    let mut pass = OutboxPass::default();
    // One machine's SQLite file binds no effect to a host: no query on every dispatch.
    if !ctx.config.hosts_shared {
        return Ok(pass);
    }
    let rows = ctx.store.read(|r| r.due_effects_of_host(ctx.host(), 100))?;
    if rows.is_empty() {
        return Ok(pass);
    }
    let mut tasks: Vec<i64> = rows.iter().filter_map(|r| r.task_id).collect();
    let mut reports = run_rows(ctx, &rows)?;
    tasks.sort_unstable();
    tasks.dedup();
    for t in tasks {
        reports.extend(run_for_task(ctx, t)?);
    }
    for report in reports {
        match report.status.as_str() {
            "done" => pass.done += 1,
            "pending" => pass.pending += 1,
            "failed" => pass.failed += 1,
            _ => pass.busy += 1,
        }
    }
    Ok(pass)
}

/// Counts of one outbox pass.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct OutboxPass {
    pub done: usize,
    pub pending: usize,
    pub failed: usize,
    pub busy: usize,
}

/// Runs the pending effects whose retry time has come that this host may run: the
/// unbound ones and those bound to it (reconcile).
pub fn run_due(ctx: &Ctx) -> Result<OutboxPass> {
    let rows = ctx.store.read(|r| r.due_effects(ctx.host(), 500))?;
    let mut pass = OutboxPass::default();
    for report in run_rows(ctx, &rows)? {
        match report.status.as_str() {
            "done" => pass.done += 1,
            "pending" => pass.pending += 1,
            "failed" => pass.failed += 1,
            _ => pass.busy += 1,
        }
    }
    Ok(pass)
}

/// An effect that has run but whose ending is not written yet. It is written in the same
/// transaction that claims the next effect (or alone after the last one), so an effect
/// costs one commit — one fsync — instead of two. If orchctl dies before that commit, the
/// effect is still claimed by a dead process and `reconcile` runs it again, as it would
/// after a death between running an effect and recording it: every effect is idempotent.
struct Ending<'r> {
    row: &'r OutboxRow,
    end: EffectEnd,
    attempt: i64,
    /// Task log entries of what the run did besides its result (stale locks removed).
    notes: Vec<(&'static str, Value)>,
}

impl Ending<'_> {
    fn status(&self) -> (&'static str, Option<String>, Option<String>) {
        match &self.end {
            EffectEnd::Done { result } => ("done", Some(result.clone()), None),
            EffectEnd::Retry { error, .. } => ("pending", None, Some(error.clone())),
            EffectEnd::Failed { error } => ("failed", None, Some(error.clone())),
        }
    }

    fn write(&self, w: &Writer, me: &EffectOwner, log_host: Option<&str>) -> Result<()> {
        for (kind, detail) in &self.notes {
            let mut detail = detail.clone();
            detail["outbox_id"] = json!(self.row.id);
            w.event(self.row.task_id, kind, &detail)?;
        }
        if w.finish_effect(self.row.id, me, &self.end)? {
            let (status, result, error) = self.status();
            log_end(
                w,
                self.row,
                status,
                result.as_deref(),
                error.as_deref(),
                self.attempt,
                log_host,
            )?;
        }
        Ok(())
    }
}

/// Runs `rows` in order. A row that another live process has claimed is reported `busy`
/// and left to it — and so are the task's later rows: a task's effects run in the order
/// they were written (stop the agent, then remove its worktree, then delete its branch),
/// and the process that holds the earlier row will run them. Otherwise a second STOP could
/// delete the branch while the first is still waiting for the agent to die, and the agent
/// could push it again.
pub fn run_rows(ctx: &Ctx, rows: &[OutboxRow]) -> Result<Vec<EffectReport>> {
    let (pid, start) = process::self_identity();
    let me = EffectOwner {
        host: Some(ctx.host().to_string()),
        pid: Some(pid),
        start: Some(start),
    };
    let lease = lease_secs(&ctx.config);
    // Which host ran an effect is worth a log entry where several hosts share the
    // database; a single host's log stays as it was.
    let log_host = ctx.config.host_scope();
    let mut out = Vec::with_capacity(rows.len());
    let mut held_elsewhere: HashSet<i64> = HashSet::new();
    let mut ending: Option<Ending> = None;
    for row in rows {
        if row.task_id.is_some_and(|t| held_elsewhere.contains(&t)) {
            out.push(report(row, "busy", None, None, None));
            continue;
        }
        // Bound to another host (an agent it launched, a worktree it holds): that host's
        // next dispatch, reap, reconcile or stop carries it out (SPEC §12).
        if let Some(h) = row
            .host
            .as_deref()
            .filter(|h| ctx.config.hosts_shared && *h != ctx.host())
        {
            let why = format!("left to host {h}, which launched the agent or holds the worktree");
            let mut r = report(row, "pending", None, Some(why), None);
            r.host = Some(h.to_string());
            out.push(r);
            continue;
        }
        let mut busy = |row: &OutboxRow, out: &mut Vec<EffectReport>| {
            if let Some(t) = row.task_id {
                held_elsewhere.insert(t);
            }
            out.push(report(row, "busy", None, None, None));
        };
        // A claim by a live process of this host is its; a dead one's is taken over. A
        // process of another host cannot be looked at from here: its claim is taken over
        // only once its lease has run out (`observed` then matches nothing, and the store's
        // guard lets an expired claim go).
        let held = row.owner();
        let observed = match (&held.host, held.pid, held.start) {
            (Some(h), _, _) if ctx.config.hosts_shared && h != ctx.host() => EffectOwner::default(),
            (_, Some(pid), Some(start)) => {
                if process::liveness(pid, Some(start)) == process::Liveness::Alive
                    && Some(pid) != me.pid
                {
                    busy(row, &mut out);
                    continue;
                }
                held
            }
            _ => held,
        };
        if row.attempts >= ctx.config.outbox_max_attempts {
            let error = row
                .last_error
                .clone()
                .unwrap_or_else(|| "attempts exhausted".into());
            let prev = ending.take();
            let failed = ctx.store.write(|w| {
                if let Some(e) = &prev {
                    e.write(w, &me, log_host)?;
                }
                let failed = w.fail_effect(row.id, &error, &observed)?;
                if failed {
                    log_end(w, row, "failed", None, Some(&error), row.attempts, log_host)?;
                }
                Ok(failed)
            })?;
            if failed {
                out.push(report(row, "failed", None, Some(error), None));
            } else {
                // Another process runs its last attempt: its ending is its to record.
                busy(row, &mut out);
            }
            continue;
        }
        let prev = ending.take();
        let claim = ctx.store.write(|w| {
            if let Some(e) = &prev {
                e.write(w, &me, log_host)?;
            }
            // The agent first: while stopping it waits for a retry (or for the host that
            // launched it), its worktree and branch stay, or it could recreate or push
            // them, and nobody is told it stopped. A refused stop (failed) lets them go.
            if let (Some(t), true) = (row.task_id, waits_for_the_agent(&row.kind)) {
                if w.pending_effect_before(t, "stop_process", row.id)? {
                    return Ok(Claim::WaitingForAgent);
                }
            }
            Ok(if w.claim_effect(row.id, &observed, &me, lease)? {
                Claim::Claimed
            } else {
                Claim::Busy
            })
        })?;
        match claim {
            Claim::Claimed => {}
            Claim::Busy => {
                busy(row, &mut out);
                continue;
            }
            Claim::WaitingForAgent => {
                let why = "waiting: the task's agent is not stopped yet".to_string();
                out.push(report(row, "pending", None, Some(why), None));
                continue;
            }
        }
        let attempt = row.attempts + 1;
        let mut notes = Vec::new();
        let (end, detail) = match Effect::parse(&row.kind, &row.payload) {
            Ok(effect) => match owner_refusal(ctx, row, &effect)
                .and_then(|()| execute(&ctx.config, row, &effect, &mut notes))
            {
                Ok((result, detail)) => (EffectEnd::Done { result }, detail),
                Err(e) => (end_for(&ctx.config, e, attempt), None),
            },
            Err(e) => (
                EffectEnd::Failed {
                    error: format!("unreadable outbox row: {e}"),
                },
                None,
            ),
        };
        let e = Ending {
            row,
            end,
            attempt,
            notes,
        };
        let (status, result, error) = e.status();
        out.push(report(row, status, result, error, detail));
        ending = Some(e);
    }
    if let Some(e) = ending {
        ctx.store.write(|w| e.write(w, &me, log_host))?;
    }
    Ok(out)
}

enum Claim {
    Claimed,
    Busy,
    WaitingForAgent,
}

/// Effects that come after the task's agents are stopped: those that act on its worktree
/// or branch, which a live agent still uses, and the notifications that say it stopped.
fn waits_for_the_agent(kind: &str) -> bool {
    matches!(
        kind,
        "remove_worktree" | "delete_remote_branch" | "plane_comment" | "notify"
    )
}

fn report(
    row: &OutboxRow,
    status: &str,
    result: Option<String>,
    error: Option<String>,
    detail: Option<Value>,
) -> EffectReport {
    EffectReport {
        id: row.id,
        kind: row.kind.clone(),
        status: status.into(),
        host: None,
        result,
        error,
        detail,
    }
}

/// Writes how an effect ended to its task's log, with the host that ran it (on several
/// hosts, who stopped the agent matters).
fn log_end(
    w: &Writer,
    row: &OutboxRow,
    status: &str,
    result: Option<&str>,
    error: Option<&str>,
    attempts: i64,
    host: Option<&str>,
) -> Result<()> {
    let mut detail = json!({ "outbox_id": row.id, "status": status, "attempts": attempts });
    if let Some(h) = host {
        detail["host"] = json!(h);
    }
    if let Some(r) = result {
        detail["result"] = json!(r);
    }
    if let Some(e) = error {
        detail["error"] = json!(e);
    }
    w.event(row.task_id, &row.kind, &detail)
}

/// The longest an effect may take before its claim may be taken over by another process:
/// an agent's grace and SIGKILL wait, a worktree removal's git calls (opening the clone,
/// its default branch, list, remove, prune, show-ref, branch -D), and a branch deletion's
/// three Gitea requests.
fn lease_secs(c: &Config) -> i64 {
    (c.stop_grace.as_secs_f64()
        + 5.0
        + 8.0 * c.git_timeout.as_secs_f64()
        + 3.0 * c.http_timeout.as_secs_f64())
    .ceil() as i64
        + 30
}

fn end_for(c: &Config, e: EffectError, attempt: i64) -> EffectEnd {
    let error = c.scrub(&e.message);
    if e.permanent {
        return EffectEnd::Failed { error };
    }
    if attempt >= c.outbox_max_attempts {
        return EffectEnd::Failed {
            error: format!("{error} (gave up after {attempt} attempts)"),
        };
    }
    let backoff = c
        .outbox_backoff_secs
        .saturating_mul(1 << (attempt - 1).clamp(0, 20))
        .min(3600);
    EffectEnd::Retry {
        error,
        delay_secs: backoff.max(e.retry_after_secs.unwrap_or(0)),
    }
}

fn clone_dir(c: &Config, repo: &str) -> PathBuf {
    c.repos_dir.join(repo)
}

/// Why `branch` must never be deleted whatever its repo's default branch is: `main`,
/// `master`, or a name matching `ORCH_PROTECTED_BRANCHES`.
fn protected_name(c: &Config, branch: &str) -> Option<String> {
    if branch == "main" || branch == "master" {
        return Some(format!("{branch} is never deleted"));
    }
    c.protected_branches
        .iter()
        .find(|p| names::glob_match(p, branch))
        .map(|p| format!("{branch} matches ORCH_PROTECTED_BRANCHES pattern {p:?}"))
}

/// Why `branch` of `repo` must not be deleted, or an error when that cannot be known: the
/// protected names, and the repo's default branch — from this host's clone, else from
/// Gitea. A default branch that cannot be established (Gitea unreachable, an answer
/// without one, no clone and no Gitea) stops the deletion: it is never guessed. A repo
/// Gitea does not have (404) has no default branch to protect, and nothing of it can be
/// deleted either: the deletion goes on and Gitea answers it as gone.
fn refusal(
    c: &Config,
    repo: &str,
    branch: &str,
    clone: Option<&GitClone>,
) -> Result<Option<String>, EffectError> {
    if let Some(why) = protected_name(c, branch) {
        return Ok(Some(why));
    }
    let default = match (clone.and_then(GitClone::default_branch), &c.gitea) {
        (Some(d), _) => Some(d),
        (None, Some(g)) => gitea::GiteaClient::new(g, c.http_timeout).default_branch(repo)?,
        (None, None) => {
            return Err(EffectError::permanent(format!(
                "refused: the default branch of {repo} cannot be established (no clone knows it and no Gitea is configured to ask)"
            )))
        }
    };
    Ok((default.as_deref() == Some(branch))
        .then(|| format!("{branch} is the default branch of {repo}")))
}

/// A worktree removal or branch deletion acts on what it was written for: once a live
/// task (a fresh pipeline of the same work item, say) has the same branch, it is that
/// task's, and the older task's cleanup leaves it alone.
fn owner_refusal(ctx: &Ctx, row: &OutboxRow, effect: &Effect) -> Result<(), EffectError> {
    let (Effect::RemoveWorktree { repo, branch } | Effect::DeleteRemoteBranch { repo, branch, .. }) =
        effect
    else {
        return Ok(());
    };
    let owner = ctx
        .store
        .read(|r| r.live_task_on_branch(repo, branch, row.task_id))
        .map_err(|e| EffectError::retry(format!("{e:#}")))?;
    match owner {
        Some(t) => Err(EffectError::permanent(format!(
            "refused: branch {branch} of {repo} belongs to live task {t} now; left alone"
        ))),
        None => Ok(()),
    }
}

/// Opens the clone of `repo` for a git effect, first removing lock files a killed git left
/// behind for `branch` (each one is written to the task's log).
fn open_clone(
    c: &Config,
    repo: &str,
    branch: &str,
    notes: &mut Vec<(&'static str, Value)>,
) -> Result<Option<GitClone>, EffectError> {
    let clone = GitClone::open(&clone_dir(c, repo), c.git_timeout)?;
    if let Some(cl) = &clone {
        for lock in cl.recover_stale_locks(branch) {
            notes.push((
                "git_lock_recovered",
                json!({
                    "repo": repo,
                    "lock": lock.path,
                    "age_secs": lock.age_secs,
                    "why": "no process holds it and it is older than ORCH_GIT_TIMEOUT_SECS: left by a git that was killed",
                }),
            ));
        }
    }
    Ok(clone)
}

type Executed = Result<(String, Option<Value>), EffectError>;

fn execute(
    c: &Config,
    row: &OutboxRow,
    effect: &Effect,
    notes: &mut Vec<(&'static str, Value)>,
) -> Executed {
    match effect {
        Effect::StopProcess {
            pid,
            proc_start,
            boot_id,
            ..
        } => {
            if let (Some(then), Some(now)) = (boot_id, process::boot_id()) {
                if *then != now {
                    return Ok((
                        format!("pid {pid} was launched before this host rebooted; not signalled"),
                        None,
                    ));
                }
            }
            let outcome =
                process::stop_agent(*pid, *proc_start, c.stop_grace).map_err(|f| EffectError {
                    permanent: f.permanent,
                    message: f.message,
                    retry_after_secs: None,
                })?;
            let result = match &outcome {
                process::StopOutcome::Stopped {
                    signal,
                    waited_ms,
                    strays,
                } if strays.is_empty() => format!("stopped pid {pid} with {signal} after {waited_ms} ms"),
                process::StopOutcome::Stopped {
                    signal, strays, ..
                } => format!(
                    "stopped pid {pid} with {signal}; processes that left its group were left alone: {strays:?}"
                ),
                process::StopOutcome::NotRunning => format!("pid {pid} was not running"),
                process::StopOutcome::Recycled { .. } => {
                    format!("pid {pid} now belongs to another process; not signalled")
                }
                process::StopOutcome::Unverified => {
                    format!("pid {pid} has no recorded start time; not signalled")
                }
            };
            Ok((result, serde_json::to_value(&outcome).ok()))
        }
        Effect::RemoveWorktree { repo, branch } => {
            check_names(repo, branch)?;
            let Some(clone) = open_clone(c, repo, branch, notes)? else {
                return Ok((
                    format!(
                        "no clone at {}: nothing to remove",
                        clone_dir(c, repo).display()
                    ),
                    None,
                ));
            };
            if let Some(why) = refusal(c, repo, branch, Some(&clone))? {
                return Err(EffectError::permanent(format!("refused: {why}")));
            }
            let r =
                clone.remove_worktree(branch, true, || crate::worktree::try_lock_repo(c, repo))?;
            for path in &r.unfinished {
                notes.push((
                    "unfinished_worktree_removed",
                    json!({
                        "repo": repo,
                        "path": path,
                        "why": "locked by a `git worktree add` that was killed before it finished (no preparation of the repo runs on this host and no process holds its files)",
                    }),
                ));
            }
            Ok((
                format!(
                    "removed {} worktree(s){}",
                    r.removed.len(),
                    if r.branch_deleted {
                        ", local branch deleted"
                    } else {
                        ""
                    }
                ),
                Some(json!({ "removed": r.removed, "branch_deleted": r.branch_deleted })),
            ))
        }
        Effect::DeleteRemoteBranch {
            repo,
            branch,
            commit,
        } => {
            check_names(repo, branch)?;
            // Names that are never deleted are refused before anything else is asked.
            if let Some(why) = protected_name(c, branch) {
                return Err(EffectError::permanent(format!("refused: {why}")));
            }
            let clone = match open_clone(c, repo, branch, notes) {
                Ok(cl) => cl,
                // Gitea does not need the clone: a broken one only cannot be asked.
                Err(_) if c.gitea.is_some() => None,
                Err(e) => return Err(e),
            };
            let cannot = || {
                EffectError::permanent(format!(
                    "cannot be attempted: no Gitea is configured (ORCH_GITEA_URL) and there is no clone at {} to push from",
                    clone_dir(c, repo).display()
                ))
            };
            if c.gitea.is_none() && clone.is_none() {
                return Err(cannot());
            }
            if let Some(why) = refusal(c, repo, branch, clone.as_ref())? {
                return Err(EffectError::permanent(format!("refused: {why}")));
            }
            let moved = |now: &str, then: &str| {
                EffectError::permanent(format!(
                    "refused: {branch} of {repo} points at {now} now, not at {then} as when it was to be deleted; left alone"
                ))
            };
            if let Some(g) = &c.gitea {
                let client = gitea::GiteaClient::new(g, c.http_timeout);
                // A branch Gitea does not show (404) cannot have moved: the DELETE below
                // then answers for it (404, gone).
                if let Some(then) = commit {
                    if let Some(now) = client.branch_commit(repo, branch)? {
                        if &now != then {
                            return Err(moved(&now, then));
                        }
                    }
                }
                return match client.delete_branch(repo, branch)? {
                    gitea::BranchDeletion::Deleted => Ok(("deleted on Gitea".into(), None)),
                    gitea::BranchDeletion::AlreadyGone => {
                        Ok(("already gone on Gitea".into(), None))
                    }
                };
            }
            let clone = clone.ok_or_else(cannot)?;
            match clone.push_delete("origin", branch, commit.as_deref()) {
                Ok(git::PushDeletion::Deleted) => Ok(("deleted on origin".into(), None)),
                Ok(git::PushDeletion::AlreadyGone) => Ok(("already gone on origin".into(), None)),
                Ok(git::PushDeletion::Moved(now)) => {
                    Err(moved(&now, commit.as_deref().unwrap_or_default()))
                }
                Err(e) => Err(EffectError::retry(format!("{e:#}"))),
            }
        }
        Effect::PlaneComment {
            project_id,
            issue_id,
            html,
        } => {
            let Some(p) = &c.plane else {
                return Ok(("skipped: Plane not configured".into(), None));
            };
            let (Some(project), Some(issue)) = (project_id, issue_id) else {
                return Ok(("skipped: the task has no Plane issue".into(), None));
            };
            let client = plane::PlaneClient::new(p, c.http_timeout, std::time::Duration::ZERO);
            let external_id = comment_external_id(row, project, issue);
            match client.add_comment(project, issue, html, &external_id)? {
                plane::CommentOutcome::Posted => Ok(("comment posted".into(), None)),
                plane::CommentOutcome::AlreadyPosted => {
                    Ok(("comment was already posted".into(), None))
                }
                plane::CommentOutcome::IssueGone => {
                    Ok(("skipped: the Plane issue no longer exists".into(), None))
                }
            }
        }
        Effect::Notify { event } => {
            let Some(argv) = &c.notify_cmd else {
                return Ok(("skipped: ORCH_NOTIFY_CMD not set".into(), None));
            };
            // The hook runs at least once: a crash between its run and the record of it
            // runs it again. A key stable across retries lets the hook drop the repeat.
            let mut event = event.clone();
            if let Value::Object(m) = &mut event {
                m.insert(
                    "notification_id".into(),
                    json!(format!(
                        "orchctl-{}-{}",
                        row.id,
                        short_hash(&format!("{}/notify", row.created_at))
                    )),
                );
            }
            notify::run(
                argv,
                &event,
                c.http_timeout.max(std::time::Duration::from_secs(10)),
            )?;
            Ok(("notify command ran".into(), None))
        }
    }
}

/// The `external_id` of a Plane comment effect: unique per outbox row and stable across
/// its retries, so a retry after a lost answer gets 409 instead of posting twice.
pub fn comment_external_id(row: &OutboxRow, project: &str, issue: &str) -> String {
    format!(
        "orchctl-{}-{}",
        row.id,
        short_hash(&format!("{}/{project}/{issue}", row.created_at))
    )
}

fn check_names(repo: &str, branch: &str) -> Result<(), EffectError> {
    names::validate_repo(repo)
        .and_then(|_| names::validate_branch(branch))
        .map_err(|e| EffectError::permanent(format!("refused: {e:#}")))
}

fn short_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn kind_names_match_the_stored_tag() {
        let all = [
            Effect::StopProcess {
                job_id: 1,
                run_id: None,
                pid: 2,
                proc_start: None,
                boot_id: None,
            },
            Effect::StopProcess {
                job_id: 1,
                run_id: Some(3),
                pid: 2,
                proc_start: Some(4),
                boot_id: Some("b00t".into()),
            },
            Effect::RemoveWorktree {
                repo: "r".into(),
                branch: "b".into(),
            },
            Effect::DeleteRemoteBranch {
                repo: "r".into(),
                branch: "b".into(),
                commit: None,
            },
            Effect::DeleteRemoteBranch {
                repo: "r".into(),
                branch: "b".into(),
                commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            },
            Effect::plane_comment(None, None, "<hi>"),
            Effect::Notify { event: json!({}) },
        ];
        for e in all {
            let (kind, payload) = e.split();
            assert_eq!(kind, e.kind());
            assert_eq!(Effect::parse(&kind, &payload).unwrap(), e);
        }
    }
}
