//! Hosts on PostgreSQL (SPEC §12): every command records its host as seen (the heartbeat,
//! [`super::PgStore::open`]); a host unseen for `ORCH_HOST_DEAD_SECS` is judged dead by
//! another host's `reconcile`, once (the judgement is guarded on the host's last sighting).

use anyhow::{Context, Result};

use super::{params, PgTx, OUTBOX_COLS};
use crate::model::{Host, OutboxRow};
use crate::store::{HostReads, HostWrites};

impl HostReads for PgTx<'_> {
    fn hosts(&self, dead_secs: i64) -> Result<Vec<Host>> {
        let dead = dead_secs as f64;
        self.rows(
            "SELECT h.id, h.last_seen_at, h.boot_id, h.dead_since,
                    h.dead_since IS NULL AND orch_age(h.last_seen_at) <= $1,
                    (SELECT count(*) FROM jobs j WHERE j.status = 'running' AND j.host = h.id)
             FROM hosts h ORDER BY h.id COLLATE \"C\"",
            params![dead],
        )
        .context("reading the hosts")?
        .iter()
        .map(|r| {
            Ok(Host {
                id: r.try_get(0)?,
                last_seen_at: r.try_get(1)?,
                boot_id: r.try_get(2)?,
                dead_since: r.try_get(3)?,
                alive: r.try_get(4)?,
                running: r.try_get(5)?,
            })
        })
        .collect()
    }

    fn due_effects_of_host(&self, host: &str, limit: i64) -> Result<Vec<OutboxRow>> {
        self.effects(
            &format!(
                "SELECT {OUTBOX_COLS} FROM outbox
                 WHERE host = $1 AND status = 'pending'
                   AND (next_attempt_at IS NULL OR next_attempt_at <= orch_now())
                 ORDER BY id LIMIT $2"
            ),
            params![host, limit],
        )
        .with_context(|| format!("reading the side effects bound to host {host}"))
    }
}

impl HostWrites for PgTx<'_> {
    fn mark_host_dead(&self, host: &str, dead_secs: i64) -> Result<bool> {
        let dead = dead_secs as f64;
        Ok(self.exec(
            "UPDATE hosts SET dead_since = orch_now()
             WHERE id = $1 AND dead_since IS NULL AND orch_age(last_seen_at) > $2",
            params![host, dead],
        )? == 1)
    }

    fn fail_effects_of_host(&self, host: &str, reason: &str) -> Result<Vec<OutboxRow>> {
        self.effects(
            &format!(
                "UPDATE outbox SET status = 'failed', last_error = $2, updated_at = orch_now(),
                        claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                        claimed_host = NULL
                 WHERE host = $1 AND status = 'pending'
                 RETURNING {OUTBOX_COLS}"
            ),
            params![host, reason],
        )
        .with_context(|| format!("failing the side effects bound to host {host}"))
    }
}
