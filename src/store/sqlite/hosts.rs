//! Hosts on SQLite: one file is one machine's, so no host is ever judged dead here and no
//! command records a heartbeat (a read like `queue` stays a read). Jobs still carry the
//! host and boot they were launched in (a reboot is noticed by the boot), but every run is
//! this host's: the domain binds no effect to a host here, slots count every running job,
//! and a renamed host (`ORCH_HOST_ID`) changes nothing.

use anyhow::{Context, Result};
use rusqlite::params;

use super::{outbox_row, SqliteTx, NOW_SQL, OUTBOX_COLS};
use crate::model::{Host, OutboxRow};
use crate::store::{HostReads, HostWrites};

impl HostReads for SqliteTx<'_> {
    fn hosts(&self, dead_secs: i64) -> Result<Vec<Host>> {
        let mut stmt = self.c.prepare_cached(
            "SELECT h.id, h.last_seen_at, h.boot_id, h.dead_since,
                    h.dead_since IS NULL
                      AND (julianday('now') - julianday(h.last_seen_at)) * 86400.0 <= ?1,
                    (SELECT count(*) FROM jobs j WHERE j.status = 'running' AND j.host = h.id)
             FROM hosts h ORDER BY h.id",
        )?;
        let rows = stmt
            .query_map([dead_secs], |r| {
                Ok(Host {
                    id: r.get(0)?,
                    last_seen_at: r.get(1)?,
                    boot_id: r.get(2)?,
                    dead_since: r.get(3)?,
                    alive: r.get(4)?,
                    running: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading the hosts")?;
        Ok(rows)
    }

    fn due_effects_of_host(&self, host: &str, limit: i64) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox INDEXED BY outbox_bound
             WHERE host = ?1 AND status = 'pending'
               AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW_SQL})
             ORDER BY id LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![host, limit], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("reading the side effects bound to host {host}"))?;
        Ok(rows)
    }
}

impl HostWrites for SqliteTx<'_> {
    fn mark_host_dead(&self, host: &str, dead_secs: i64) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE hosts SET dead_since = {NOW_SQL}
                 WHERE id = ?1 AND dead_since IS NULL
                   AND (julianday('now') - julianday(last_seen_at)) * 86400.0 > ?2"
            ))?
            .execute(params![host, dead_secs])?;
        Ok(n == 1)
    }

    fn fail_effects_of_host(&self, host: &str, reason: &str) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "UPDATE outbox SET status = 'failed', last_error = ?2, updated_at = {NOW_SQL},
                    claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                    claimed_host = NULL
             WHERE host = ?1 AND status = 'pending'
             RETURNING {OUTBOX_COLS}"
        ))?;
        let rows = stmt
            .query_map(params![host, reason], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("failing the side effects bound to host {host}"))?;
        Ok(rows)
    }
}
