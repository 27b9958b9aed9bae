//! `orchctl claim` (SPEC §5): take the oldest eligible queued job, start a new run of it,
//! and optionally launch its agent.
//!
//! The choice and the update are one `BEGIN IMMEDIATE` transaction, so N concurrent
//! claimers never get the same job. With `--exec` the agent starts under its supervisor
//! (SPEC §13, [`crate::supervisor`]) in a new session; the supervisor's pid and start time
//! are recorded under a guard on the run, and the supervisor starts the agent only after
//! that record is committed. If the run changed between the claim and the launch
//! (cancelled by STOP, requeued by reap) or could not be recorded, the supervisor is
//! killed before it starts anything: no agent runs unrecorded. `dispatch` launches the same
//! way ([`launch`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::error::bad_input;
use crate::integrations::process;
use crate::model::Job;
use crate::names;
use crate::pipeline::{JobStatus, Stage};
use crate::store::{ClaimFilter, Launch, Writer};
use crate::supervisor::{self, RunSpec};
use crate::worktree::{self, Place};
use crate::Ctx;

#[derive(Debug, Clone, Default)]
pub struct ClaimRequest {
    pub agents: Vec<String>,
    pub repo: Option<String>,
    /// The agent command (`--exec -- CMD ARGS...`); empty for a claim without launch.
    pub exec: Vec<String>,
}

/// A claimed job with its task (SPEC §5).
#[derive(Debug, Clone, Serialize)]
pub struct Claimed {
    pub id: i64,
    pub agent: String,
    pub repo: String,
    pub task_id: Option<i64>,
    pub status: JobStatus,
    pub run_id: i64,
    pub attempts: i64,
    pub max_attempts: i64,
    pub work_item_id: Option<String>,
    pub branch: Option<String>,
    pub stage: Option<Stage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proc_start: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// Where the agent works: the task's worktree (prepared by the supervisor before the
    /// agent starts) or the clone; null when it works in orchctl's own folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worktree: Option<PathBuf>,
    /// The run changed (cancelled, requeued) before its agent could be recorded: the agent
    /// was killed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub killed_at_launch: bool,
}

/// Claims one job; `None` when nothing is eligible (exit 3).
pub fn claim(ctx: &Ctx, req: &ClaimRequest) -> Result<Option<Claimed>> {
    if let Some(r) = &req.repo {
        names::validate_repo(r)?;
    }
    for a in &req.agents {
        if a.is_empty()
            || !a
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad_input(format!("invalid agent name {a:?}")));
        }
    }
    let filter = ClaimFilter {
        agents: req.agents.clone(),
        repo: req.repo.clone(),
        task_deps: ctx.config.task_deps,
        serial_gate: ctx.config.serial_gate,
    };
    let claimed = ctx
        .store
        .write(|w| match w.claim_next_job(&filter, ctx.host())? {
            Some(job) => started(w, job).map(Some),
            None => Ok(None),
        })?;
    let Some(mut c) = claimed else {
        return Ok(None);
    };
    if !req.exec.is_empty() {
        launch(ctx, &mut c, &req.exec)?;
    }
    Ok(Some(c))
}

static SUPERVISOR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Names the program that supervises runs: the orchctl binary. `main` sets
/// `/proc/self/exe` (this very binary, even if it was replaced on disk since it started);
/// the first setting wins.
pub fn set_supervisor_program(program: PathBuf) {
    let _ = SUPERVISOR.set(program);
}

/// The orchctl binary a launch execs as the run's supervisor. A program that uses this
/// library without setting it (a test binary, a tool of one's own) gets the `orchctl` next
/// to it — cargo puts test binaries in `target/<profile>/deps/`, beside `orchctl` one
/// level up — else the one on `PATH`.
fn supervisor_program() -> PathBuf {
    if let Some(p) = SUPERVISOR.get() {
        return p.clone();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("orchctl");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("orchctl")
}

/// The claimed run `job` with its task, and its audit row, inside the claim's transaction.
pub(crate) fn started(w: &Writer, job: Job) -> Result<Claimed> {
    // Read, not locked: a claim holds its job, and must never wait for the task's lock that a
    // STOP holds while it waits for that job.
    let task = match job.task_id {
        Some(t) => w.peek_task(t)?,
        None => None,
    };
    let run_id = job.run_id.context("a claimed job has no run id")?;
    w.event(
        job.task_id,
        "job_claimed",
        &json!({ "job_id": job.id, "run_id": run_id, "agent": job.agent, "attempt": job.attempts }),
    )?;
    Ok(Claimed {
        id: job.id,
        agent: job.agent,
        repo: job.repo,
        task_id: job.task_id,
        status: job.status,
        run_id,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        work_item_id: task.as_ref().and_then(|t| t.work_item_id.clone()),
        branch: task.as_ref().and_then(|t| t.branch.clone()),
        stage: task.map(|t| t.stage),
        pid: None,
        proc_start: None,
        log: None,
        worktree: None,
        killed_at_launch: false,
    })
}

/// Launches the agent of claimed run `c` as `claim --exec` does: see [`launch_run`]; a
/// repo without a clone on this host runs its agent in orchctl's working directory.
pub fn launch(ctx: &Ctx, c: &mut Claimed, argv: &[String]) -> Result<()> {
    launch_run(ctx, c, argv, true)
}

/// Launches the agent of claimed run `c` under its supervisor (SPEC §13) and records the
/// supervisor's pid and start time; the supervisor starts the agent only once that record
/// is committed (the launch gate). When the record fails or finds the run changed
/// (cancelled, requeued or ended since the claim), the supervisor's group is killed at once
/// and no agent ever starts. `lenient` (`claim --exec`) lets a repo without a clone run its
/// agent in orchctl's working directory; `dispatch` is strict.
pub fn launch_run(ctx: &Ctx, c: &mut Claimed, argv: &[String], lenient: bool) -> Result<()> {
    let log = ctx
        .config
        .log_dir
        .join(format!("job-{}-run-{}.log", c.id, c.run_id));
    let db = ctx
        .store
        .path()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.into()));
    let place = worktree::place_for(&ctx.config, &c.agent, &c.repo, lenient);
    c.worktree = match &place {
        Place::Worktree => c
            .work_item_id
            .as_deref()
            .and_then(|wi| worktree::worktree_path(&ctx.config, &c.repo, wi).ok()),
        Place::Clone => Some(worktree::clone_dir(&ctx.config, &c.repo)),
        Place::Inherited => None,
    };
    let spec = RunSpec {
        db,
        job_id: c.id,
        run_id: c.run_id,
        task_id: c.task_id,
        agent: c.agent.clone(),
        repo: c.repo.clone(),
        work_item: c.work_item_id.clone(),
        branch: c.branch.clone(),
        place,
        log: log.clone(),
    };
    let started = process::append_file(&log).and_then(|file| {
        anyhow::ensure!(!argv.is_empty(), "--exec needs a command after `--`");
        let (gate, opener) = process::pipe().context("creating the launch gate")?;
        // The agent starts in its worktree or clone: a program named by a relative path
        // (`./agent.sh`) is the one the launcher's caller meant, in the launcher's folder.
        let mut argv = argv.to_vec();
        if argv[0].contains('/') && std::path::Path::new(&argv[0]).is_relative() {
            if let Ok(abs) = std::path::absolute(&argv[0]) {
                argv[0] = abs.to_string_lossy().into_owned();
            }
        }
        let args = supervisor::command_line(&spec, &argv)?;
        // On PostgreSQL the supervisor needs the URL, which may hold a password: in its
        // environment (it makes itself non-dumpable), never on its command line.
        let env: Vec<(&str, &str)> = match &ctx.target {
            crate::DbTarget::Postgres(url) => vec![("ORCH_DB_URL", url.as_str())],
            crate::DbTarget::Sqlite(_) => Vec::new(),
        };
        let (pid, start) =
            process::spawn_supervisor(&supervisor_program(), &args, &env, gate, file)?;
        Ok((pid, start, opener))
    });
    let (pid, start, opener) = match started {
        Ok(v) => v,
        Err(e) => {
            // The run never started: give the attempt back to the queue (or fail it).
            let msg = format!("launch failed: {e:#}");
            ctx.store.write(|w| {
                let done = if c.attempts < c.max_attempts {
                    w.requeue_run(c.id, Some(c.run_id), Some(&msg))?
                } else {
                    w.finish_run(c.id, c.run_id, "failed", Some(&msg))?
                };
                if done {
                    w.event(
                        c.task_id,
                        "job_launch_failed",
                        &json!({ "job_id": c.id, "run_id": c.run_id, "error": msg }),
                    )?;
                }
                Ok(())
            })?;
            return Err(e);
        }
    };
    let recorded = ctx.store.write(|w| {
        let ok = w.record_launch(
            c.id,
            c.run_id,
            &Launch {
                pid,
                proc_start: start,
                host: ctx.host().to_string(),
                boot_id: process::boot_id(),
            },
        )?;
        if ok {
            w.event(
                c.task_id,
                "job_launched",
                &json!({ "job_id": c.id, "run_id": c.run_id, "pid": pid, "log": log, "worktree": c.worktree }),
            )?;
        }
        Ok(ok)
    });
    // An agent whose run is not recorded could never be stopped by STOP or judged by reap:
    // whatever the reason (the database stayed busy, the run was cancelled, requeued or
    // ended since the claim), the gate stays shut and the supervisor is killed.
    let recorded = match recorded {
        Ok(r) => r,
        Err(e) => {
            process::kill_group_now(pid);
            return Err(e.context(format!(
                "recording the supervisor of job {} run {} (pid {pid}) failed; it was killed before starting the agent",
                c.id, c.run_id
            )));
        }
    };
    if recorded {
        // A supervisor that died already (the write then fails) has left a recorded run
        // with a dead pid, which reap judges as any dead run.
        let _ = std::fs::File::from(opener).write_all(b"g");
    } else {
        drop(opener);
        process::kill_group_now(pid);
        c.killed_at_launch = true;
        let status = ctx.store.read(|r| r.job(c.id))?.map(|j| j.status);
        ctx.store.write(|w| {
            w.event(
                c.task_id,
                "job_killed_at_launch",
                &json!({ "job_id": c.id, "run_id": c.run_id, "pid": pid, "job_status": status }),
            )
        })?;
        if let Some(s) = status {
            c.status = s;
        }
    }
    c.pid = Some(pid);
    c.proc_start = Some(start);
    c.log = Some(log);
    Ok(())
}
