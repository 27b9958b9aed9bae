//! `orchctl queue` (SPEC §8): one read-only snapshot for people and dashboards.
//!
//! Each block is computed on its own: a block whose query fails is replaced by its minimal
//! form (zero counts, empty lists, the configuration it reports) plus an `error` string,
//! and the snapshot is still printed (dashboards poll it and must never get nothing).
//! `recent` is a list and cannot carry a field, so its error goes to `errors.recent`.
//! Every query is bounded by an index (job counts are kept by triggers; recent rows are
//! read newest-first by key; blocked tasks start from the live stages; open side effects
//! from the outbox's partial index), so the cost does not grow with the history.
//! Read-only: it never writes, and it never fails as a whole.

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::store::{Reader, Store};
use crate::Ctx;

const JOB_STATUSES: [&str; 5] = ["queued", "running", "done", "failed", "cancelled"];

fn block(
    out: &mut Map<String, Value>,
    name: &str,
    minimal: Value,
    f: impl FnOnce() -> Result<Value>,
) {
    let v = match f() {
        Ok(v) => v,
        Err(e) => {
            let mut m = minimal;
            if let Value::Object(o) = &mut m {
                o.insert("error".into(), json!(format!("{e:#}")));
            }
            m
        }
    };
    out.insert(name.into(), v);
}

/// The snapshot as a JSON object with the blocks of SPEC §8.
pub fn snapshot(ctx: &Ctx, recent: i64) -> Value {
    let recent = recent.clamp(0, 1000);
    let c = &ctx.config;
    let mut out = Map::new();
    ctx.store
        .read(|r: &Reader| {
            let zero_counts: Map<String, Value> = JOB_STATUSES
                .iter()
                .map(|s| (s.to_string(), json!(0)))
                .collect();
            block(
                &mut out,
                "counts",
                Value::Object(zero_counts.clone()),
                || {
                    let mut m = zero_counts;
                    for (status, n) in r.job_counts()? {
                        m.insert(status, json!(n));
                    }
                    Ok(Value::Object(m))
                },
            );
            block(
                &mut out,
                "serial_gate",
                json!({ "enabled": c.serial_gate, "leases": [] }),
                || Ok(json!({ "enabled": c.serial_gate, "leases": r.leases()? })),
            );
            block(
                &mut out,
                "task_deps",
                json!({ "enabled": c.task_deps, "blocked": [] }),
                || {
                    // Without any dependency nothing is blocked, and the tasks table
                    // (the stop block's) is not needed at all.
                    if !r.has_deps()? {
                        return Ok(json!({ "enabled": c.task_deps, "blocked": [] }));
                    }
                    let blocked: Vec<Value> = r
                        .blocked_tasks(100)?
                        .into_iter()
                        .map(|(id, on)| json!({ "task_id": id, "waiting_on": on }))
                        .collect();
                    Ok(json!({ "enabled": c.task_deps, "blocked": blocked }))
                },
            );
            // orchctl does not label Plane issues; the block keeps dashboards' shape.
            out.insert("auto_labels".into(), json!({ "enabled": false }));
            match r.recent_jobs(recent) {
                Ok(jobs) => {
                    out.insert("recent".into(), json!(jobs));
                }
                Err(e) => {
                    out.insert("recent".into(), json!([]));
                    out.insert("errors".into(), json!({ "recent": format!("{e:#}") }));
                }
            }
            block(
                &mut out,
                "outbox",
                json!({ "pending": 0, "failed": 0, "items": [] }),
                || {
                    Ok(json!({
                        "pending": r.count_effects("pending")?,
                        "failed": r.count_effects("failed")?,
                        "items": r.open_effects(recent.max(20))?,
                    }))
                },
            );
            block(
                &mut out,
                "stop",
                json!({
                    "enabled": c.stop_enabled,
                    "repos": c.stop_repos,
                    "cancelled_count": 0,
                    "recent": [],
                }),
                || {
                    let recent: Vec<Value> = r
                        .recent_cancelled(recent)?
                        .into_iter()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "work_item_id": t.work_item_id,
                                "repo": t.repo,
                                "cancelled_at": t.cancelled_at,
                                "cancel_reason": t.cancel_reason,
                            })
                        })
                        .collect();
                    Ok(json!({
                        "enabled": c.stop_enabled,
                        "repos": c.stop_repos,
                        "cancelled_count": r.count_tasks_in_stage("cancelled")?,
                        "deferred_pending": r.pending_cancels()?.len(),
                        "recent": recent,
                    }))
                },
            );
            Ok(())
        })
        .ok();
    Value::Object(out)
}

/// The snapshot when the database could not be opened normally (`why`): read from the
/// database file alone when that is the whole committed state, else every block in its
/// minimal form with the error. Returns the snapshot and a warning for stderr.
pub fn snapshot_despite(
    db: &Path,
    config: &Config,
    recent: i64,
    why: &anyhow::Error,
) -> (Value, String) {
    match Store::open_immutable(db) {
        Ok(store) => {
            let ctx = Ctx {
                store,
                config: config.clone(),
            };
            let warning = format!(
                "the database could not be opened for writing ({why:#}); this snapshot was read from {} alone, which holds every committed change",
                db.display()
            );
            (snapshot(&ctx, recent), warning)
        }
        Err(e) => {
            let error = format!("{why:#}; reading it without new files: {e:#}");
            let mut out = match Store::open_empty() {
                Ok(store) => snapshot(
                    &Ctx {
                        store,
                        config: config.clone(),
                    },
                    recent,
                ),
                Err(_) => Value::Object(Map::new()),
            };
            if let Value::Object(blocks) = &mut out {
                for block in blocks.values_mut() {
                    if let Value::Object(b) = block {
                        b.insert("error".into(), json!(error));
                    }
                }
                blocks.insert("errors".into(), json!({ "recent": error }));
            }
            (out, format!("the database could not be read: {error}"))
        }
    }
}
