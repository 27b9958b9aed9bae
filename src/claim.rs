//! `orchctl claim` (SPEC §5): take the oldest eligible queued job, start a new run of it,
//! and optionally launch its agent.
//!
//! The choice and the update are one `BEGIN IMMEDIATE` transaction, so N concurrent
//! claimers never get the same job. With `--exec` the agent starts detached in its own
//! session; its pid and start time are recorded under a guard on the run, and if the run
//! changed between the claim and the launch (cancelled by STOP, requeued by reap) or could
//! not be recorded, the new process group is killed at once: no agent runs unrecorded.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::error::bad_input;
use crate::integrations::process;
use crate::names;
use crate::pipeline::{JobStatus, Stage};
use crate::store::ClaimFilter;
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
    let claimed = ctx.store.write(|w| {
        let Some(job) = w.claim_next_job(&filter)? else {
            return Ok(None);
        };
        let task = match job.task_id {
            Some(t) => w.task(t)?,
            None => None,
        };
        let run_id = job.run_id.context("a claimed job has no run id")?;
        w.event(
            job.task_id,
            "job_claimed",
            &json!({ "job_id": job.id, "run_id": run_id, "agent": job.agent, "attempt": job.attempts }),
        )?;
        Ok(Some(Claimed {
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
            killed_at_launch: false,
        }))
    })?;
    let Some(mut c) = claimed else {
        return Ok(None);
    };
    if !req.exec.is_empty() {
        launch(ctx, &mut c, &req.exec)?;
    }
    Ok(Some(c))
}

/// Launches the agent of claimed run `c` and records it; kills it at once when the job was
/// cancelled since the claim.
pub fn launch(ctx: &Ctx, c: &mut Claimed, argv: &[String]) -> Result<()> {
    let log = ctx
        .config
        .log_dir
        .join(format!("job-{}-run-{}.log", c.id, c.run_id));
    let db = std::path::absolute(ctx.store.path()).unwrap_or_else(|_| ctx.store.path().into());
    let env = vec![
        ("ORCH_JOB_ID".to_string(), c.id.to_string()),
        ("ORCH_RUN_ID".to_string(), c.run_id.to_string()),
        (
            "ORCH_TASK_ID".to_string(),
            c.task_id.map(|t| t.to_string()).unwrap_or_default(),
        ),
        (
            "ORCH_WORK_ITEM".to_string(),
            c.work_item_id.clone().unwrap_or_default(),
        ),
        ("ORCH_REPO".to_string(), c.repo.clone()),
        (
            "ORCH_BRANCH".to_string(),
            c.branch.clone().unwrap_or_default(),
        ),
        ("ORCH_AGENT".to_string(), c.agent.clone()),
        (
            "ORCH_DB_PATH".to_string(),
            db.to_string_lossy().into_owned(),
        ),
    ];
    let launched = process::spawn_detached(argv, &env, &log);
    let (pid, start) = match launched {
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
        let ok = w.record_launch(c.id, c.run_id, pid, start)?;
        if ok {
            w.event(
                c.task_id,
                "job_launched",
                &json!({ "job_id": c.id, "run_id": c.run_id, "pid": pid, "log": log }),
            )?;
        }
        Ok(ok)
    });
    // An agent whose run is not recorded can never be stopped by STOP or judged by reap:
    // whatever the reason (the database stayed busy, the run was cancelled, requeued or
    // ended since the claim), the launcher kills it rather than leave it loose.
    let recorded = match recorded {
        Ok(r) => r,
        Err(e) => {
            process::kill_group_now(pid);
            return Err(e.context(format!(
                "recording the agent of job {} run {} (pid {pid}) failed; the agent was killed",
                c.id, c.run_id
            )));
        }
    };
    if !recorded {
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
