//! Plane's handled deliveries (body hashes, SPEC §6) and its state and project caches, on
//! SQLite.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::{SqliteTx, NOW_SQL};
use crate::store::{PlaneReads, PlaneWrites};

impl PlaneReads for SqliteTx<'_> {
    fn delivery_seen(&self, body_sha256: &str) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM plane_deliveries WHERE body_sha256 = ?1)")?
            .query_row([body_sha256], |r| r.get(0))?)
    }

    /// A cached Plane state name.
    fn plane_state_name(&self, project_id: &str, state_id: &str) -> Result<Option<String>> {
        self.c
            .prepare_cached(
                "SELECT name FROM plane_states WHERE project_id = ?1 AND state_id = ?2",
            )?
            .query_row([project_id, state_id], |r| r.get(0))
            .optional()
            .context("reading the Plane state cache")
    }

    fn plane_project_identifier(&self, project_id: &str) -> Result<Option<String>> {
        self.c
            .prepare_cached("SELECT identifier FROM plane_projects WHERE project_id = ?1")?
            .query_row([project_id], |r| r.get(0))
            .optional()
            .context("reading the Plane project cache")
    }

    /// Up to `limit` handled deliveries received before `cutoff` (a Julian day), with a
    /// rowid above `after`, in rowid order.
    fn old_deliveries(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT rowid FROM plane_deliveries
             WHERE rowid > ?2 AND julianday(received_at) < ?1
             ORDER BY rowid LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![cutoff, after, limit], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .context("reading old deliveries")?;
        Ok(rows)
    }
}

impl PlaneWrites for SqliteTx<'_> {
    /// Remembers a handled Plane delivery; false when the body was handled before.
    fn record_delivery(
        &self,
        body_sha256: &str,
        delivery_id: Option<&str>,
        event: Option<&str>,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "INSERT OR IGNORE INTO plane_deliveries (body_sha256, delivery_id, event, action, task_id, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, {NOW_SQL})"
            ))?
            .execute(params![body_sha256, delivery_id, event, action, task_id])?;
        Ok(n == 1)
    }

    /// Replaces the cached states of a Plane project.
    fn set_delivery_outcome(
        &self,
        body_sha256: &str,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<()> {
        self.c
            .prepare_cached(
                "UPDATE plane_deliveries SET action = ?2, task_id = ?3 WHERE body_sha256 = ?1",
            )?
            .execute(params![body_sha256, action, task_id])
            .context("recording what a delivery did")?;
        Ok(())
    }

    fn cache_plane_states(
        &self,
        project_id: &str,
        states: &[(String, String, Option<String>)],
    ) -> Result<()> {
        self.c
            .prepare_cached("DELETE FROM plane_states WHERE project_id = ?1")?
            .execute([project_id])?;
        let mut ins = self.c.prepare_cached(&format!(
            "INSERT OR REPLACE INTO plane_states (project_id, state_id, name, state_group, fetched_at)
             VALUES (?1, ?2, ?3, ?4, {NOW_SQL})"
        ))?;
        for (id, name, group) in states {
            ins.execute(params![project_id, id, name, group])?;
        }
        Ok(())
    }

    fn cache_plane_project(&self, project_id: &str, identifier: &str) -> Result<()> {
        self.c
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO plane_projects (project_id, identifier, fetched_at)
                 VALUES (?1, ?2, {NOW_SQL})"
            ))?
            .execute([project_id, identifier])?;
        Ok(())
    }

    /// Deletes the given handled-delivery rows; returns how many were deleted.
    fn delete_deliveries(&self, rowids: &[i64]) -> Result<usize> {
        let mut stmt = self
            .c
            .prepare_cached("DELETE FROM plane_deliveries WHERE rowid = ?1")?;
        let mut n = 0;
        for id in rowids {
            n += stmt.execute([id])?;
        }
        Ok(n)
    }
}
