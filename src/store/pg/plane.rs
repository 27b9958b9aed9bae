//! Plane's handled deliveries (body hashes, SPEC §6) and its state and project caches, on
//! PostgreSQL. A delivery is recorded first, by `INSERT … ON CONFLICT DO NOTHING`: of two
//! concurrent copies of one body, the second waits for the first's commit and finds it.

use anyhow::{Context, Result};

use super::{params, PgTx};
use crate::store::{PlaneReads, PlaneWrites};

impl PlaneReads for PgTx<'_> {
    fn delivery_seen(&self, body_sha256: &str) -> Result<bool> {
        Ok(self
            .one(
                "SELECT EXISTS(SELECT 1 FROM plane_deliveries WHERE body_sha256 = $1)",
                params![body_sha256],
            )?
            .try_get(0)?)
    }

    fn plane_state_name(&self, project_id: &str, state_id: &str) -> Result<Option<String>> {
        self.opt(
            "SELECT name FROM plane_states WHERE project_id = $1 AND state_id = $2",
            params![project_id, state_id],
        )
        .context("reading the Plane state cache")?
        .map(|r| Ok(r.try_get(0)?))
        .transpose()
    }

    fn plane_project_identifier(&self, project_id: &str) -> Result<Option<String>> {
        self.opt(
            "SELECT identifier FROM plane_projects WHERE project_id = $1",
            params![project_id],
        )
        .context("reading the Plane project cache")?
        .map(|r| Ok(r.try_get(0)?))
        .transpose()
    }

    fn old_deliveries(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>> {
        self.rows(
            "SELECT id FROM plane_deliveries
             WHERE id > $2 AND orch_julian(received_at) < $1
             ORDER BY id LIMIT $3",
            params![cutoff, after, limit],
        )
        .context("reading old deliveries")?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
    }
}

impl PlaneWrites for PgTx<'_> {
    fn record_delivery(
        &self,
        body_sha256: &str,
        delivery_id: Option<&str>,
        event: Option<&str>,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<bool> {
        Ok(self
            .opt(
                "INSERT INTO plane_deliveries (body_sha256, delivery_id, event, action, task_id, received_at)
                 VALUES ($1, $2, $3, $4, $5, orch_now())
                 ON CONFLICT (body_sha256) DO NOTHING RETURNING 1",
                params![body_sha256, delivery_id, event, action, task_id],
            )
            .context("recording a delivery")?
            .is_some())
    }

    fn set_delivery_outcome(
        &self,
        body_sha256: &str,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<()> {
        self.exec(
            "UPDATE plane_deliveries SET action = $2, task_id = $3 WHERE body_sha256 = $1",
            params![body_sha256, action, task_id],
        )
        .context("recording what a delivery did")?;
        Ok(())
    }

    fn cache_plane_states(
        &self,
        project_id: &str,
        states: &[(String, String, Option<String>)],
    ) -> Result<()> {
        self.exec(
            "DELETE FROM plane_states WHERE project_id = $1",
            params![project_id],
        )?;
        for (id, name, group) in states {
            self.exec(
                "INSERT INTO plane_states (project_id, state_id, name, state_group, fetched_at)
                 VALUES ($1, $2, $3, $4, orch_now())
                 ON CONFLICT (project_id, state_id) DO UPDATE SET name = excluded.name,
                     state_group = excluded.state_group, fetched_at = excluded.fetched_at",
                params![project_id, id.as_str(), name.as_str(), group.as_deref()],
            )?;
        }
        Ok(())
    }

    fn cache_plane_project(&self, project_id: &str, identifier: &str) -> Result<()> {
        self.exec(
            "INSERT INTO plane_projects (project_id, identifier, fetched_at)
             VALUES ($1, $2, orch_now())
             ON CONFLICT (project_id) DO UPDATE SET identifier = excluded.identifier,
                 fetched_at = excluded.fetched_at",
            params![project_id, identifier],
        )?;
        Ok(())
    }

    fn delete_deliveries(&self, keys: &[i64]) -> Result<usize> {
        Ok(self.exec(
            "DELETE FROM plane_deliveries WHERE id = ANY($1)",
            params![keys.to_vec()],
        )? as usize)
    }
}
