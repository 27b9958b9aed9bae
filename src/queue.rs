//! `orchctl queue` (SPEC §8): one read-only snapshot for people and dashboards.
//!
//! Each block is computed on its own: a block whose query fails is replaced by its minimal
//! form (zero counts, empty lists, the configuration it reports) plus an `error` string,
//! and the snapshot is still printed (dashboards poll it and must never get nothing).
//! `recent` is a list and cannot carry a field, so its error goes to `errors.recent`.
//! Every query is bounded by an index (job, task and awaiting counts are kept by
//! triggers; recent rows are read newest-first by key; blocked and waiting tasks come from
//! the partial index of waiting tasks; pending stops from theirs; open side effects from
//! the outbox's), so the cost grows neither with the history nor with the live set.
//! Read-only: it never writes, and it never fails as a whole.

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::pipeline::Awaiting;
use crate::store::sqlite::SqliteStore;
use crate::store::{AwaitingCounts, Reader, Store};
use crate::{Ctx, DbTarget};

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

/// The `awaiting` block's form when it cannot be read: empty lists, zero counts.
fn awaiting_minimal() -> Value {
    let mut m = Map::new();
    for kind in Awaiting::ON_PEOPLE {
        m.insert(kind.as_str().into(), json!([]));
    }
    m.insert("counts".into(), json!(AwaitingCounts::default()));
    Value::Object(m)
}

/// What waits on people (SPEC §14): per kind, the longest-waiting tasks (at most
/// `limit`) and the counts. Both read indexes made for them (`tasks_awaiting`,
/// `awaiting_counts`), so the block costs the same with 200k live tasks as with 150.
/// The counts alone are [`Reader::awaiting_counts`].
pub fn awaiting_block(r: &Reader, limit: i64) -> Result<Value> {
    let mut m = Map::new();
    for kind in Awaiting::ON_PEOPLE {
        m.insert(kind.as_str().into(), json!(r.awaiting_tasks(kind, limit)?));
    }
    m.insert("counts".into(), json!(r.awaiting_counts()?));
    Ok(Value::Object(m))
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
                    // As many as the side effects listed (at least 20): each carries the
                    // dependencies it waits on, a read per task.
                    let blocked: Vec<Value> = r
                        .blocked_tasks(recent.max(20))?
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
                        "deferred_pending": r.count_pending_cancels()?,
                        "recent": recent,
                    }))
                },
            );
            block(&mut out, "awaiting", awaiting_minimal(), || {
                awaiting_block(r, recent)
            });
            // The hosts sharing a PostgreSQL database (SPEC §12): a list like `recent`,
            // with its error beside it when it cannot be read.
            if matches!(ctx.store, Store::Postgres(_)) {
                match r.hosts(c.host_dead_secs) {
                    Ok(hosts) => {
                        out.insert("hosts".into(), json!(hosts));
                    }
                    Err(e) => {
                        out.insert("hosts".into(), json!([]));
                        let errors = out.entry("errors").or_insert_with(|| json!({}));
                        errors["hosts"] = json!(format!("{e:#}"));
                    }
                }
            }
            Ok(())
        })
        .ok();
    Value::Object(out)
}

/// The snapshot when the database could not be opened normally (`why`): read from the
/// database file alone when that is the whole committed state, else every block in its
/// minimal form with the error. Returns the snapshot and a warning for stderr.
pub fn snapshot_despite(
    target: &DbTarget,
    config: &Config,
    recent: i64,
    why: &anyhow::Error,
) -> (Value, String) {
    // A PostgreSQL server that cannot be reached has no file to read instead.
    let immutable = match target {
        DbTarget::Sqlite(db) => SqliteStore::open_immutable(db).map(|s| (Store::Sqlite(s), db)),
        DbTarget::Postgres(_) => Err(anyhow::anyhow!("no file to read without the server")),
    };
    match immutable {
        Ok((store, db)) => {
            let ctx = Ctx {
                store,
                config: config.clone(),
                target: target.clone(),
            };
            let warning = format!(
                "the database could not be opened for writing ({why:#}); this snapshot was read from {} alone, which holds every committed change",
                db.display()
            );
            (snapshot(&ctx, recent), warning)
        }
        Err(e) => {
            let error = format!("{why:#}; reading it without new files: {e:#}");
            let mut out = match SqliteStore::open_empty() {
                Ok(store) => snapshot(
                    &Ctx {
                        store: Store::Sqlite(store),
                        config: config.clone(),
                        target: target.clone(),
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
