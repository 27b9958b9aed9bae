//! `orchctl reconcile` (SPEC §5): the cron safety net.
//!
//! Skips terminal tasks (counted), applies deferred STOPs whose critical window has
//! closed, frees merge leases held by terminal or missing tasks, retries the outbox, and —
//! when Plane is configured — applies a STOP (or a deletion) that a lost webhook never
//! delivered. Each task is handled on its own: one failure is recorded and the pass goes on.

mod plane;

pub use plane::{plane_pass, PlanePass};

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use crate::jobs;
use crate::outbox::{self, OutboxPass};
use crate::stop;
use crate::store::Writer;
use crate::Ctx;

#[derive(Debug, Clone, Serialize)]
pub struct TaskError {
    pub task_id: Option<i64>,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    pub skipped_terminal: i64,
    pub deferred_applied: usize,
    pub deferred_waiting: usize,
    pub leases_released: usize,
    /// Hosts this pass judged dead (unseen for `ORCH_HOST_DEAD_SECS`, SPEC §12): their runs
    /// got the unknown-outcome rules, the effects bound to them failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts_dead: Vec<String>,
    pub outbox: OutboxPass,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plane: Option<plane::PlanePass>,
    pub errors: Vec<TaskError>,
}

pub fn reconcile(ctx: &Ctx) -> Result<ReconcileReport> {
    let mut report = ReconcileReport {
        skipped_terminal: ctx.store.read(|r| r.count_terminal_tasks())?,
        ..Default::default()
    };
    let config = ctx.config.clone();
    let fail = |report: &mut ReconcileReport, task_id: Option<i64>, e: anyhow::Error| {
        report.errors.push(TaskError {
            task_id,
            error: config.scrub(&format!("{e:#}")),
        })
    };

    for task in ctx.store.read(|r| r.pending_cancels())? {
        let applied = ctx
            .store
            .write(|w| stop::apply_deferred_tx(w, &ctx.config, task.id));
        match applied {
            Ok(true) => {
                report.deferred_applied += 1;
                if let Err(e) = outbox::run_for_task(ctx, task.id) {
                    fail(&mut report, Some(task.id), e);
                }
            }
            Ok(false) => report.deferred_waiting += 1,
            Err(e) => fail(&mut report, Some(task.id), e),
        }
    }

    for lease in ctx.store.read(|r| r.orphaned_leases())? {
        let released = ctx.store.write(|w| {
            let done = w.release_lease(&lease.repo, &lease.branch)?;
            if done {
                w.event(
                    lease.task_id,
                    "lease_released",
                    &json!({ "repo": lease.repo, "branch": lease.branch, "why": "holder terminal or missing" }),
                )?;
            }
            Ok(done)
        });
        match released {
            Ok(true) => report.leases_released += 1,
            Ok(false) => {}
            Err(e) => fail(&mut report, lease.task_id, e),
        }
    }

    match dead_hosts(ctx) {
        Ok(dead) => report.hosts_dead = dead,
        Err(e) => fail(&mut report, None, e),
    }

    if ctx.config.plane.is_some() {
        match plane::plane_pass(ctx) {
            Ok(p) => {
                for e in &p.errors {
                    report.errors.push(e.clone());
                }
                report.plane = Some(p);
            }
            Err(e) => fail(&mut report, None, e),
        }
    }

    match outbox::run_due(ctx) {
        Ok(p) => report.outbox = p,
        Err(e) => fail(&mut report, None, e),
    }
    Ok(report)
}

/// Judges the hosts unseen for `ORCH_HOST_DEAD_SECS` dead (SPEC §12), each once and in one
/// transaction: its running jobs get the unknown-outcome rules of §5 (as reap gives a dead
/// run), the effects bound to it (kills, worktree removals) are failed with the reason —
/// they show in `queue` — and the unbound effects that waited for them (the remote branch
/// deletion, the notifications) proceed in this pass's outbox run. Returns the hosts.
fn dead_hosts(ctx: &Ctx) -> Result<Vec<String>> {
    let secs = ctx.config.host_dead_secs;
    let (candidates, judged): (Vec<String>, Vec<String>) = ctx.store.read(|r| {
        let unseen: Vec<_> = r
            .hosts(secs)?
            .into_iter()
            .filter(|h| !h.alive && h.id != ctx.host())
            .collect();
        Ok((
            unseen
                .iter()
                .filter(|h| h.dead_since.is_none())
                .map(|h| h.id.clone())
                .collect(),
            unseen
                .iter()
                .filter(|h| h.dead_since.is_some())
                .map(|h| h.id.clone())
                .collect(),
        ))
    })?;
    // A host judged dead earlier may still be given effects (a STOP of a task one of whose
    // runs it once claimed binds a worktree removal to it): they fail at once, or what waits
    // behind them would wait forever.
    for host in judged {
        let reason = format!(
            "host {host} was judged dead (unseen for more than ORCH_HOST_DEAD_SECS={secs} s)"
        );
        let touched = ctx.store.write(|w| fail_bound_effects(w, &host, &reason))?;
        for t in touched {
            outbox::run_for_task(ctx, t)?;
        }
    }
    let mut dead = Vec::new();
    for host in candidates {
        let reason =
            format!("host {host} unseen for more than ORCH_HOST_DEAD_SECS={secs} s: judged dead");
        let touched = ctx.store.write(|w| {
            if !w.mark_host_dead(&host, secs)? {
                return Ok(None);
            }
            let mut touched = Vec::new();
            for (job, _) in w.running_jobs_aged()? {
                if job.host.as_deref() != Some(host.as_str()) {
                    continue;
                }
                jobs::reap_unknown_outcome(w, &job, &reason)?;
                if let Some(t) = job.task_id {
                    stop::apply_deferred_tx(w, &ctx.config, t)?;
                    touched.push(t);
                }
            }
            touched.extend(fail_bound_effects(w, &host, &reason)?);
            w.event(
                None,
                "host_dead",
                &json!({ "host": host, "reason": reason }),
            )?;
            Ok(Some(touched))
        })?;
        if let Some(mut touched) = touched {
            touched.sort_unstable();
            touched.dedup();
            for t in touched {
                outbox::run_for_task(ctx, t)?;
            }
            dead.push(host);
        }
    }
    Ok(dead)
}

/// Fails the pending effects bound to dead `host` with `reason`, each written to its
/// task's log; returns their tasks (what waited behind them may run now).
fn fail_bound_effects(w: &Writer, host: &str, reason: &str) -> Result<Vec<i64>> {
    let mut touched = Vec::new();
    for row in w.fail_effects_of_host(host, reason)? {
        w.event(
            row.task_id,
            &row.kind,
            &json!({ "outbox_id": row.id, "status": "failed", "error": reason, "host": host }),
        )?;
        touched.extend(row.task_id);
    }
    Ok(touched)
}
