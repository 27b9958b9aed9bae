//! `orchctl prune [--older-than DAYS] [--dry-run]` (SPEC §15): housekeeping, run daily.
//!
//! Deletes what only grows and is never read again: the hashes of Plane deliveries
//! handled more than a week ago (Plane's retries end within hours, so an older body can
//! no longer come back as a retry), the `done` side effects of tasks terminal for longer
//! than DAYS, and the agent logs (`$ORCH_LOG_DIR/job-<id>-run-<run>.log`) of runs that
//! ended longer ago than DAYS. It never deletes a task, a job or an audit row, a side
//! effect that is pending or failed, a log of a running run, or any other file.
//!
//! The database part runs in short transactions of a bounded batch each (a first prune of
//! a long history must not hold the write lock for long); files are deleted after the
//! rows, outside any transaction. "Now" is the process clock for rows (SQLite's `now`)
//! and files alike, so a shifted clock shifts both. `--dry-run` counts and changes
//! nothing.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::store::Reader;
use crate::Ctx;

/// Handled-delivery hashes are kept this long, whatever `--older-than` says.
pub const DELIVERY_KEEP_DAYS: u32 = 7;
/// `--older-than`'s default.
pub const DEFAULT_OLDER_THAN_DAYS: u32 = 90;
/// Rows deleted per transaction.
const BATCH: i64 = 500;

#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    pub older_than_days: u32,
    pub dry_run: bool,
}

/// What was deleted (with `--dry-run`: what would be).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PruneReport {
    pub ok: bool,
    pub dry_run: bool,
    pub older_than_days: u32,
    pub delivery_keep_days: u32,
    /// Handled-delivery hashes.
    pub deliveries: usize,
    /// `done` outbox rows of long-terminal tasks.
    pub outbox: usize,
    /// Agent log files.
    pub logs: usize,
    pub log_bytes: u64,
    /// Log files that could not be deleted, one line each (the rest went on).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Seconds since the epoch → Julian day, the unit SQLite's `julianday` speaks.
fn julian(t: SystemTime) -> f64 {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    secs / 86_400.0 + 2_440_587.5
}

/// `job-<id>-run-<run>.log` → (id, run); anything else is not an agent log.
fn agent_log(name: &str) -> Option<(i64, i64)> {
    let rest = name.strip_prefix("job-")?.strip_suffix(".log")?;
    let (id, run) = rest.split_once("-run-")?;
    let number = |s: &str| -> Option<i64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    Some((number(id)?, number(run)?))
}

/// Walks a cursor over `next(after, limit)` batches; with `delete`, each batch is read and
/// deleted in one write transaction, else only read. Returns how many rows qualified.
fn sweep(
    ctx: &Ctx,
    dry_run: bool,
    next: impl Fn(&Reader, i64) -> Result<Vec<i64>>,
    delete: impl Fn(&crate::store::Writer, &[i64]) -> Result<usize>,
) -> Result<usize> {
    let mut after = 0;
    let mut total = 0;
    loop {
        let (n, last) = if dry_run {
            let ids = ctx.store.read(|r| next(r, after))?;
            (ids.len(), ids.last().copied())
        } else {
            ctx.store.write(|w| {
                let ids = next(w, after)?;
                Ok((delete(w, &ids)?, ids.last().copied()))
            })?
        };
        total += n;
        match last {
            Some(id) => after = id,
            None => return Ok(total),
        }
    }
}

pub fn prune(ctx: &Ctx, opts: PruneOptions) -> Result<PruneReport> {
    let (delivery_cutoff, cutoff) = ctx.store.read(|r| {
        Ok((
            r.julian_days_ago(DELIVERY_KEEP_DAYS as f64)?,
            r.julian_days_ago(opts.older_than_days as f64)?,
        ))
    })?;
    let deliveries = sweep(
        ctx,
        opts.dry_run,
        |r, after| r.old_deliveries(delivery_cutoff, after, BATCH),
        |w, ids| w.delete_deliveries(ids),
    )
    .context("pruning handled deliveries")?;
    let outbox = sweep(
        ctx,
        opts.dry_run,
        |r, after| r.old_done_effects(cutoff, after, BATCH),
        |w, ids| w.delete_done_effects(ids),
    )
    .context("pruning done side effects")?;
    let mut report = PruneReport {
        ok: true,
        dry_run: opts.dry_run,
        older_than_days: opts.older_than_days,
        delivery_keep_days: DELIVERY_KEEP_DAYS,
        deliveries,
        outbox,
        logs: 0,
        log_bytes: 0,
        errors: Vec::new(),
    };
    prune_logs(ctx, &ctx.config.log_dir, cutoff, opts.dry_run, &mut report)?;
    Ok(report)
}

/// The agent logs of runs that ended before `cutoff` (a Julian day). A run's end is the
/// job's `finished_at` when the database still has it (the job's latest run, ended), else
/// the log's last write: an earlier run of a requeued job, or a job the database does not
/// know, stopped writing when it ended.
fn prune_logs(
    ctx: &Ctx,
    dir: &Path,
    cutoff: f64,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // No agent ever ran here: nothing to prune.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("listing the log folder {}", dir.display()))
        }
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing the log folder {}", dir.display()))?;
        let name = entry.file_name();
        let Some((job, run)) = name.to_str().and_then(agent_log) else {
            continue;
        };
        // Never follow a link: only plain files orchctl wrote are deleted.
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        let end = match ctx.store.read(|r| r.run_end(job, run))? {
            Some(e) if e.running => continue,
            Some(e) => e.finished,
            None => None,
        };
        let end = match end {
            Some(t) => t,
            None => match meta.modified() {
                Ok(t) => julian(t),
                Err(_) => continue,
            },
        };
        if end >= cutoff {
            continue;
        }
        if !dry_run {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {}
                // Another prune got there first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    report
                        .errors
                        .push(format!("{}: {e}", entry.path().display()));
                    continue;
                }
            }
        }
        report.logs += 1;
        report.log_bytes += meta.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_agent_log_names_are_recognised() {
        assert_eq!(agent_log("job-12-run-7.log"), Some((12, 7)));
        for other in [
            "reap.log",
            "job-12-run-7.log.1",
            "job--run-7.log",
            "job-+1-run-7.log",
            "job-1-run-x.log",
            "job-1.log",
        ] {
            assert_eq!(agent_log(other), None, "{other}");
        }
    }

    #[test]
    fn julian_days_match_sqlite() {
        // 1970-01-01T00:00:00Z is Julian day 2440587.5.
        assert_eq!(julian(UNIX_EPOCH), 2_440_587.5);
        let day = UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        assert_eq!(julian(day), 2_440_588.5);
    }
}
