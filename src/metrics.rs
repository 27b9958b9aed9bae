//! `orchctl metrics [--textfile DIR]` (SPEC §15): the pipeline's state as Prometheus
//! gauges, in the text exposition format 0.0.4.
//!
//! One read transaction gathers every family, so the numbers of one scrape agree with each
//! other; each read goes through a counter table or an index made for it (see
//! `store/metrics.rs`), so a scrape costs about what `queue` costs. Every family is
//! written with its `# HELP` and `# TYPE` lines and, for the label values orchctl knows
//! (job statuses, stages, agents, side-effect states, the kinds of waiting), a sample
//! even when it is zero: a series that appears only once it is non-zero breaks `rate()`
//! and alert rules. With `--textfile DIR` the text is written to `DIR/orchctl.prom` for
//! node_exporter's textfile collector through a temporary file in `DIR` and a rename, so
//! the collector never reads half a file. Read-only on the database; never prints.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::pipeline::{Awaiting, STAGES};
use crate::store::Reader;
use crate::Ctx;

const JOB_STATUSES: [&str; 5] = ["queued", "running", "done", "failed", "cancelled"];
const AGENTS: [&str; 4] = ["analyst", "developer", "reviewer", "deployer"];
/// The kinds of SPEC §14's `awaiting` block, in its order.
pub const AWAITING_KINDS: [&str; 4] = [
    "approval",
    "deploy_confirmation",
    "failed",
    "blocked_by_cancelled",
];

/// The file name node_exporter's textfile collector reads (it takes `*.prom`).
pub const TEXTFILE_NAME: &str = "orchctl.prom";

/// One scrape's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub jobs: Vec<(String, i64)>,
    pub tasks: Vec<(String, i64)>,
    pub outbox_pending: i64,
    pub outbox_failed: i64,
    pub merge_leases_held: i64,
    pub awaiting: Vec<(String, i64)>,
    /// 0 when nothing is queued.
    pub oldest_queued_job_age_seconds: f64,
    pub agents_running: Vec<(String, i64)>,
}

/// `known` label values first, each with its count or 0, then any other value found with
/// a non-zero count (rows written by other tools may carry names orchctl does not use).
fn with_zeros(known: &[&str], found: Vec<(String, i64)>) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = known
        .iter()
        .map(|k| {
            let n = found.iter().find(|(f, _)| f == k).map_or(0, |(_, n)| *n);
            (k.to_string(), n)
        })
        .collect();
    for (name, n) in found {
        if n != 0 && !known.contains(&name.as_str()) {
            out.push((name, n));
        }
    }
    out
}

/// How many live tasks wait on people, per kind of [`AWAITING_KINDS`] in that order.
///
/// The one place the `awaiting` definition of SPEC §14 enters the metrics: the counts of
/// `queue`'s `awaiting` block ([`Reader::awaiting_counts`], kept by triggers), nothing
/// else, so a scrape and a snapshot never disagree.
pub fn awaiting_counts(r: &Reader) -> Result<Vec<(String, i64)>> {
    let counts = r.awaiting_counts()?;
    Ok(AWAITING_KINDS
        .iter()
        .map(|k| {
            let n = Awaiting::parse(k).map_or(0, |kind| counts.get(kind));
            (k.to_string(), n)
        })
        .collect())
}

/// Reads one consistent set of numbers.
pub fn collect(ctx: &Ctx) -> Result<Metrics> {
    ctx.store
        .read_snapshot(|r| {
            Ok(Metrics {
                jobs: with_zeros(&JOB_STATUSES, r.job_counts()?),
                tasks: with_zeros(&STAGES, r.task_counts()?),
                outbox_pending: r.count_effects("pending")?,
                outbox_failed: r.count_effects("failed")?,
                merge_leases_held: r.count_leases()?,
                awaiting: awaiting_counts(r)?,
                // A job created "in the future" (a clock step back) is not minus seconds old.
                oldest_queued_job_age_seconds: r
                    .oldest_queued_job_age_secs()?
                    .unwrap_or(0.0)
                    .max(0.0),
                agents_running: with_zeros(&AGENTS, r.running_by_agent(None)?),
            })
        })
        .context("reading the metrics")
}

/// A label value as the exposition format wants it: `\`, `"` and newlines escaped.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, help: &str) {
        self.0
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
    }

    fn sample(&mut self, name: &str, value: impl std::fmt::Display) {
        self.0.push_str(&format!("{name} {value}\n"));
    }

    fn labelled(&mut self, name: &str, label: &str, values: &[(String, i64)]) {
        for (v, n) in values {
            self.0
                .push_str(&format!("{name}{{{label}=\"{}\"}} {n}\n", label_value(v)));
        }
    }
}

/// The text exposition format (0.0.4) of `m`.
pub fn exposition(m: &Metrics) -> String {
    let mut e = Exposition(String::new());
    e.family("orchctl_jobs", "Jobs by status.");
    e.labelled("orchctl_jobs", "status", &m.jobs);
    e.family("orchctl_tasks", "Tasks by stage.");
    e.labelled("orchctl_tasks", "stage", &m.tasks);
    e.family(
        "orchctl_outbox_effects",
        "Side effects not done, by status: pending (retried by reconcile) or failed (given up).",
    );
    e.labelled(
        "orchctl_outbox_effects",
        "status",
        &[
            ("pending".to_string(), m.outbox_pending),
            ("failed".to_string(), m.outbox_failed),
        ],
    );
    e.family(
        "orchctl_merge_leases_held",
        "Repos whose merge lease is held.",
    );
    e.sample("orchctl_merge_leases_held", m.merge_leases_held);
    e.family(
        "orchctl_awaiting_tasks",
        "Live tasks waiting on people, by kind of wait.",
    );
    e.labelled("orchctl_awaiting_tasks", "kind", &m.awaiting);
    e.family(
        "orchctl_oldest_queued_job_age_seconds",
        "Seconds since the first queued job in claim order was created; 0 when nothing is queued.",
    );
    e.sample(
        "orchctl_oldest_queued_job_age_seconds",
        format!("{:.3}", m.oldest_queued_job_age_seconds),
    );
    e.family("orchctl_agents_running", "Running jobs by agent.");
    e.labelled("orchctl_agents_running", "agent", &m.agents_running);
    e.0
}

/// Writes `text` to `dir/orchctl.prom` atomically: a temporary file in `dir` (same file
/// system, so the rename is atomic), flushed, made readable by the collector's user, then
/// renamed over the old file. On failure the temporary file is removed and the old file is
/// left as it was.
pub fn write_textfile(dir: &Path, text: &str) -> Result<PathBuf> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("--textfile {}: cannot use the folder", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("--textfile {}: not a folder", dir.display());
    }
    let target = dir.join(TEXTFILE_NAME);
    // A dot name: the collector reads `*.prom` only, and `ls` hides it meanwhile.
    let mut tmp = tempfile::Builder::new()
        .prefix(".orchctl.prom.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    // tempfile creates 0600; node_exporter usually runs as another user.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("making {} readable", tmp.path().display()))?;
    tmp.persist(&target)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", target.display()))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("x\ny"), "x\\ny");
    }

    #[test]
    fn known_values_come_first_with_zeros_and_strangers_follow() {
        let found = vec![("running".to_string(), 2), ("weird".to_string(), 1)];
        let out = with_zeros(&["queued", "running"], found);
        assert_eq!(
            out,
            vec![
                ("queued".to_string(), 0),
                ("running".to_string(), 2),
                ("weird".to_string(), 1)
            ]
        );
    }
}
