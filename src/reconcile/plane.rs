//! Reconcile's Plane pass (SPEC §5, §6): the safety net for lost webhooks. It lists each
//! project's work items a page at a time (never one request per task) and stops live tasks
//! whose issue is in STOP or gone, as far as the kill switch and its scope allow. It never
//! fetches a terminal task and never lets one failing project or task end the pass.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::TaskError;
use crate::integrations::plane::{PlaneClient, PlaneIssue};
use crate::model::Task;
use crate::plane_states::{self, Route};
use crate::stop::{self, Source, StopNote, StopOptions};
use crate::Ctx;

/// Reconcile runs from cron and may wait for Plane's minute window to reset.
const RECONCILE_MAX_WAIT: Duration = Duration::from_secs(60);

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
                Ok(r) if r.note == StopNote::Cancelled && gone => pass.deleted += 1,
                Ok(r) if r.note == StopNote::Cancelled => pass.stopped += 1,
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
            let mut name = plane_states::cached(ctx, project, id)?;
            if name.is_none() && !*refreshed {
                *refreshed = true;
                plane_states::refresh(ctx, client, project).map_err(|e| {
                    anyhow::anyhow!(
                        "listing the states of Plane project {project}: {}",
                        e.message
                    )
                })?;
                name = plane_states::cached(ctx, project, id)?;
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
