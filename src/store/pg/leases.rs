//! Merge leases (one per repo) and deploy markers (one per work item of a repo), on
//! PostgreSQL. A lease is taken by one `INSERT … ON CONFLICT DO NOTHING`: of two concurrent
//! takers one inserts, the other waits for its commit and then finds the lease held.

use anyhow::{Context, Result};

use super::{lease_row, params, PgTx};
use crate::model::Lease;
use crate::store::{LeaseOutcome, LeaseReads, LeaseWrites};

impl PgTx<'_> {
    fn leases_of(&self, sql: &str, params: &[super::Typed<'_>]) -> Result<Vec<Lease>> {
        self.rows(sql, params)?.iter().map(lease_row).collect()
    }
}

impl LeaseReads for PgTx<'_> {
    fn lease(&self, repo: &str) -> Result<Option<Lease>> {
        self.opt(
            "SELECT repo, branch, task_id, acquired_at FROM merge_leases WHERE repo = $1",
            params![repo],
        )
        .with_context(|| format!("reading the merge lease of {repo}"))?
        .as_ref()
        .map(lease_row)
        .transpose()
    }

    fn leases(&self) -> Result<Vec<Lease>> {
        self.leases_of(
            // Byte order, as SQLite's: the database's collation would sort by locale.
            r#"SELECT repo, branch, task_id, acquired_at FROM merge_leases ORDER BY repo COLLATE "C""#,
            params![],
        )
    }

    fn orphaned_leases(&self) -> Result<Vec<Lease>> {
        self.leases_of(
            "SELECT l.repo, l.branch, l.task_id, l.acquired_at FROM merge_leases l
             LEFT JOIN tasks t ON t.id = l.task_id
             WHERE t.id IS NULL OR t.stage IN ('done', 'cancelled')
             ORDER BY l.repo COLLATE \"C\"",
            params![],
        )
    }

    fn count_leases(&self) -> Result<i64> {
        Ok(self
            .one("SELECT count(*) FROM merge_leases", params![])
            .context("counting merge leases")?
            .try_get(0)?)
    }

    fn marker(&self, repo: &str, work_item_id: &str) -> Result<Option<String>> {
        self.opt(
            "SELECT state FROM deploy_markers WHERE repo = $1 AND work_item_id = $2",
            params![repo, work_item_id],
        )
        .context("reading a deploy marker")?
        .map(|r| Ok(r.try_get(0)?))
        .transpose()
    }
}

impl LeaseWrites for PgTx<'_> {
    fn acquire_lease(&self, repo: &str, branch: &str, task_id: i64) -> Result<LeaseOutcome> {
        let inserted = self
            .opt(
                "INSERT INTO merge_leases (repo, branch, task_id, acquired_at)
                 VALUES ($1, $2, $3, orch_now())
                 ON CONFLICT (repo) DO NOTHING RETURNING repo",
                params![repo, branch, task_id],
            )
            .with_context(|| format!("taking the merge lease of {repo}"))?;
        if inserted.is_some() {
            return Ok(LeaseOutcome::Acquired);
        }
        match self.lease(repo)? {
            Some(l) if l.branch == branch => Ok(LeaseOutcome::AlreadyHeld),
            Some(l) => Ok(LeaseOutcome::HeldBy(l)),
            // Released between the two statements: taken now, or by another in between.
            None => self.acquire_lease(repo, branch, task_id),
        }
    }

    fn release_lease(&self, repo: &str, branch: &str) -> Result<bool> {
        Ok(self.exec(
            "DELETE FROM merge_leases WHERE repo = $1 AND branch = $2",
            params![repo, branch],
        )? == 1)
    }

    fn release_lease_of(&self, repo: &str, branch: &str, task_id: i64) -> Result<bool> {
        Ok(self.exec(
            "DELETE FROM merge_leases WHERE repo = $1 AND branch = $2
             AND (task_id IS NULL OR task_id = $3)",
            params![repo, branch, task_id],
        )? == 1)
    }

    fn set_marker(&self, repo: &str, work_item_id: &str, state: &str, task_id: i64) -> Result<()> {
        self.exec(
            "INSERT INTO deploy_markers (repo, work_item_id, state, task_id, set_at)
             VALUES ($1, $2, $3, $4, orch_now())
             ON CONFLICT (repo, work_item_id) DO UPDATE SET state = excluded.state,
                 task_id = excluded.task_id, set_at = excluded.set_at",
            params![repo, work_item_id, state, task_id],
        )
        .context("setting a deploy marker")?;
        Ok(())
    }

    fn clear_marker(&self, repo: &str, work_item_id: &str) -> Result<bool> {
        Ok(self.exec(
            "DELETE FROM deploy_markers WHERE repo = $1 AND work_item_id = $2",
            params![repo, work_item_id],
        )? == 1)
    }
}
