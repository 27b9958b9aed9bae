//! The side-effect outbox (SPEC §4), on SQLite. The open rows (pending, failed) have a
//! partial index of their own; a statement states its condition (`status <> 'done'`) so
//! SQLite may use it.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::{outbox_row, SqliteTx, NOW_SQL, OUTBOX_COLS};
use crate::model::OutboxRow;
use crate::store::{EffectEnd, EffectOwner, OutboxReads, OutboxWrites};

impl OutboxReads for SqliteTx<'_> {
    fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>> {
        self.c
            .prepare_cached(&format!("SELECT {OUTBOX_COLS} FROM outbox WHERE id = ?1"))?
            .query_row([id], outbox_row)
            .optional()
            .context("reading an outbox row")
    }

    /// The task's side effects still waiting, in the order they were written.
    fn pending_effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox WHERE task_id = ?1 AND status = 'pending' ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([task_id], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox WHERE task_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([task_id], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Pending side effects whose retry time has come, oldest first.
    fn due_effects(&self, host: &str, limit: i64) -> Result<Vec<OutboxRow>> {
        // `status <> 'done'` repeats the condition of the partial index `outbox_status`:
        // SQLite uses a partial index only when the query states its condition, and
        // without it this reads the whole outbox (one row per side effect ever run).
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox
             WHERE status = 'pending' AND status <> 'done'
               AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW_SQL})
             ORDER BY id LIMIT ?1"
        ))?;
        // One machine's file: an effect bound to a host is this one's, whatever its id.
        let _ = host;
        let rows = stmt
            .query_map(params![limit], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Side effects not done (pending or failed), newest first.
    fn open_effects(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        // `status <> 'done'` repeats the partial index's condition so the planner may use
        // it: otherwise this scans every side effect ever run.
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox
             WHERE status IN ('pending', 'failed') AND status <> 'done'
             ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit], outbox_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// How many side effects are `pending` or `failed` (never counts `done`).
    fn count_effects(&self, status: &str) -> Result<i64> {
        Ok(self
            .c
            // See open_effects: a bound status alone cannot use the partial index.
            .prepare_cached("SELECT count(*) FROM outbox WHERE status = ?1 AND status <> 'done'")?
            .query_row([status], |r| r.get(0))?)
    }

    /// Whether the task has a `pending` effect of `kind` written before row `before`.
    fn pending_effect_before(&self, task_id: i64, kind: &str, before: i64) -> Result<bool> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM outbox
                  WHERE task_id = ?1 AND id < ?3 AND kind = ?2 AND status = 'pending')",
            )?
            .query_row(params![task_id, kind, before], |r| r.get(0))?)
    }

    /// Up to `limit` `done` outbox rows with an id above `after` whose task has been
    /// terminal since before `cutoff` (a Julian day): cancelled at `cancelled_at`, done at
    /// its last update (nothing changes a terminal task again).
    fn old_done_effects(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>> {
        // CROSS JOIN keeps the outbox as the outer loop, walked by id from the cursor.
        let mut stmt = self.c.prepare_cached(
            "SELECT o.id FROM outbox o CROSS JOIN tasks t ON t.id = o.task_id
             WHERE o.id > ?2 AND o.status = 'done' AND t.stage IN ('done', 'cancelled')
               AND julianday(coalesce(t.cancelled_at, t.updated_at, t.created_at)) < ?1
             ORDER BY o.id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![cutoff, after, limit], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .context("reading old side effects")?;
        Ok(rows)
    }
}

impl OutboxWrites for SqliteTx<'_> {
    /// Writes a side effect to the outbox (executed after the commit).
    fn enqueue_effect(
        &self,
        task_id: Option<i64>,
        kind: &str,
        payload: &Value,
        host: Option<&str>,
    ) -> Result<i64> {
        self.c
            .prepare_cached(&format!(
                "INSERT INTO outbox (task_id, kind, payload, status, created_at, updated_at, host)
                 VALUES (?1, ?2, ?3, 'pending', {NOW_SQL}, {NOW_SQL}, ?4)"
            ))?
            .execute(params![task_id, kind, payload.to_string(), host])
            .with_context(|| format!("writing side effect {kind}"))?;
        Ok(self.c.last_insert_rowid())
    }

    /// Takes a pending side effect for execution by `owner` (pid, start time) for at most
    /// `lease_secs`. Guarded on the claim that was observed, so two processes never run the
    /// same effect at once; a crashed owner's claim is taken over by the caller.
    fn claim_effect(
        &self,
        id: i64,
        observed: &EffectOwner,
        owner: &EffectOwner,
        lease_secs: i64,
    ) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE outbox SET claimed_pid = ?4, claimed_start = ?5, claimed_host = ?8,
                        claimed_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || ?6 || ' seconds'),
                        attempts = attempts + 1, updated_at = {NOW_SQL}
                 WHERE id = ?1 AND status = 'pending'
                   AND ((claimed_pid IS ?2 AND claimed_start IS ?3 AND claimed_host IS ?7)
                        OR claimed_until < {NOW_SQL})"
            ))?
            .execute(params![
                id,
                observed.pid,
                observed.start,
                owner.pid,
                owner.start,
                lease_secs,
                observed.host,
                owner.host
            ])?;
        Ok(n == 1)
    }

    /// Records how an effect claimed by `owner` ended.
    fn finish_effect(&self, id: i64, owner: &EffectOwner, end: &EffectEnd) -> Result<bool> {
        let (status, result, error, delay): (&str, Option<&str>, Option<&str>, Option<i64>) =
            match end {
                EffectEnd::Done { result } => ("done", Some(result), None, None),
                EffectEnd::Retry { error, delay_secs } => {
                    ("pending", None, Some(error), Some(*delay_secs))
                }
                EffectEnd::Failed { error } => ("failed", None, Some(error), None),
            };
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE outbox SET status = ?4, result = coalesce(?5, result), last_error = ?6,
                        next_attempt_at = CASE WHEN ?7 IS NULL THEN NULL
                            ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || ?7 || ' seconds') END,
                        claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                        claimed_host = NULL, updated_at = {NOW_SQL}
                 WHERE id = ?1 AND claimed_pid = ?2 AND claimed_start = ?3
                   AND claimed_host IS ?8"
            ))?
            .execute(params![
                id,
                owner.pid,
                owner.start,
                status,
                result,
                error,
                delay,
                owner.host
            ])?;
        Ok(n == 1)
    }

    /// Marks a pending effect failed without running it (attempts exhausted).
    fn fail_effect(&self, id: i64, error: &str, observed: &EffectOwner) -> Result<bool> {
        let n = self
            .c
            .prepare_cached(&format!(
                "UPDATE outbox SET status = 'failed', last_error = ?2, updated_at = {NOW_SQL},
                        claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                        claimed_host = NULL
                 WHERE id = ?1 AND status = 'pending'
                   AND (claimed_pid IS NULL OR claimed_until < {NOW_SQL}
                        OR (claimed_pid = ?3 AND claimed_start IS ?4 AND claimed_host IS ?5))"
            ))?
            .execute(params![
                id,
                error,
                observed.pid,
                observed.start,
                observed.host
            ])?;
        Ok(n == 1)
    }

    /// Deletes the given outbox rows, each only while still `done` (a row that is not is
    /// kept whatever the caller saw).
    fn delete_done_effects(&self, ids: &[i64]) -> Result<usize> {
        let mut stmt = self
            .c
            .prepare_cached("DELETE FROM outbox WHERE id = ?1 AND status = 'done'")?;
        let mut n = 0;
        for id in ids {
            n += stmt.execute([id])?;
        }
        Ok(n)
    }
}
