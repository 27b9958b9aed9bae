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

use crate::outbox::{self, OutboxPass};
use crate::stop;
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
