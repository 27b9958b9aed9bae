//! Merge leases (one per repo) and deploy markers (one per work item of a repo), on
//! SQLite.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::{lease_row, SqliteTx, NOW_SQL};
use crate::model::Lease;
use crate::store::{LeaseOutcome, LeaseReads, LeaseWrites};

impl LeaseReads for SqliteTx<'_> {
    fn lease(&self, repo: &str) -> Result<Option<Lease>> {
        self.c
            .prepare_cached(
                "SELECT repo, branch, task_id, acquired_at FROM merge_leases WHERE repo = ?1",
            )?
            .query_row([repo], lease_row)
            .optional()
            .with_context(|| format!("reading the merge lease of {repo}"))
    }

    fn leases(&self) -> Result<Vec<Lease>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT repo, branch, task_id, acquired_at FROM merge_leases ORDER BY repo",
        )?;
        let rows = stmt
            .query_map([], lease_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Leases whose holder is missing or terminal (reconcile frees them).
    fn orphaned_leases(&self) -> Result<Vec<Lease>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT l.repo, l.branch, l.task_id, l.acquired_at FROM merge_leases l
             LEFT JOIN tasks t ON t.id = l.task_id
             WHERE t.id IS NULL OR t.stage IN ('done', 'cancelled')
             ORDER BY l.repo",
        )?;
        let rows = stmt
            .query_map([], lease_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// How many repos have their merge lease taken (one row per held lease).
    fn count_leases(&self) -> Result<i64> {
        self.c
            .prepare_cached("SELECT count(*) FROM merge_leases")?
            .query_row([], |r| r.get(0))
            .context("counting merge leases")
    }

    /// The deploy marker state for a work item of a repo (`initiated`), if any.
    fn marker(&self, repo: &str, work_item_id: &str) -> Result<Option<String>> {
        self.c
            .prepare_cached(
                "SELECT state FROM deploy_markers WHERE repo = ?1 AND work_item_id = ?2",
            )?
            .query_row([repo, work_item_id], |r| r.get(0))
            .optional()
            .context("reading a deploy marker")
    }
}

impl LeaseWrites for SqliteTx<'_> {
    /// Takes the repo's merge lease for `branch` when free.
    fn acquire_lease(&self, repo: &str, branch: &str, task_id: i64) -> Result<LeaseOutcome> {
        if let Some(l) = self.lease(repo)? {
            return Ok(if l.branch == branch {
                LeaseOutcome::AlreadyHeld
            } else {
                LeaseOutcome::HeldBy(l)
            });
        }
        self.c
            .prepare_cached(&format!(
                "INSERT INTO merge_leases (repo, branch, task_id, acquired_at)
                 VALUES (?1, ?2, ?3, {NOW_SQL})"
            ))?
            .execute(params![repo, branch, task_id])
            .with_context(|| format!("taking the merge lease of {repo}"))?;
        Ok(LeaseOutcome::Acquired)
    }

    /// Releases the repo's lease if `branch` holds it.
    fn release_lease(&self, repo: &str, branch: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached("DELETE FROM merge_leases WHERE repo = ?1 AND branch = ?2")?
            .execute([repo, branch])?;
        Ok(n == 1)
    }

    /// Releases the repo's lease if `branch` holds it for this task (or for no recorded
    /// task): a finalizer never frees a lease another task holds on a same-named branch.
    fn release_lease_of(&self, repo: &str, branch: &str, task_id: i64) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(
                "DELETE FROM merge_leases WHERE repo = ?1 AND branch = ?2
                 AND (task_id IS NULL OR task_id = ?3)",
            )?
            .execute(params![repo, branch, task_id])?;
        Ok(n == 1)
    }

    fn set_marker(&self, repo: &str, work_item_id: &str, state: &str, task_id: i64) -> Result<()> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO deploy_markers (repo, work_item_id, state, task_id, set_at)
                 VALUES (?1, ?2, ?3, ?4, {NOW_SQL})
                 ON CONFLICT(repo, work_item_id) DO UPDATE SET state = excluded.state,
                     task_id = excluded.task_id, set_at = excluded.set_at"
            ))?
            .execute(params![repo, work_item_id, state, task_id])
            .context("setting a deploy marker")?;
        Ok(())
    }

    fn clear_marker(&self, repo: &str, work_item_id: &str) -> Result<bool> {
        let n = self
            .c
            .prepare_cached("DELETE FROM deploy_markers WHERE repo = ?1 AND work_item_id = ?2")?
            .execute([repo, work_item_id])?;
        Ok(n == 1)
    }
}
