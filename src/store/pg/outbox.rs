//! The side-effect outbox (SPEC §4) on PostgreSQL. Every change of a row is guarded by
//! the state it expects (its claim, its status), so two processes — of one host or of
//! several — never run one effect at once, and a late writer changes nothing.

use anyhow::{Context, Result};
use serde_json::Value;

use super::{outbox_row, params, PgTx, Typed, OUTBOX_COLS};
use crate::model::OutboxRow;
use crate::store::{EffectEnd, EffectOwner, OutboxReads, OutboxWrites};

impl PgTx<'_> {
    pub(super) fn effects(&self, sql: &str, params: &[Typed<'_>]) -> Result<Vec<OutboxRow>> {
        self.rows(sql, params)?.iter().map(outbox_row).collect()
    }
}

impl OutboxReads for PgTx<'_> {
    fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>> {
        self.opt(
            &format!("SELECT {OUTBOX_COLS} FROM outbox WHERE id = $1"),
            params![id],
        )
        .context("reading an outbox row")?
        .as_ref()
        .map(outbox_row)
        .transpose()
    }

    fn pending_effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>> {
        self.effects(
            &format!(
                "SELECT {OUTBOX_COLS} FROM outbox WHERE task_id = $1 AND status = 'pending' ORDER BY id"
            ),
            params![task_id],
        )
    }

    fn effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>> {
        self.effects(
            &format!("SELECT {OUTBOX_COLS} FROM outbox WHERE task_id = $1 ORDER BY id"),
            params![task_id],
        )
    }

    fn due_effects(&self, host: &str, limit: i64) -> Result<Vec<OutboxRow>> {
        self.effects(
            &format!(
                "SELECT {OUTBOX_COLS} FROM outbox
                 WHERE status = 'pending'
                   AND (next_attempt_at IS NULL OR next_attempt_at <= orch_now())
                   AND (host IS NULL OR host = $2)
                 ORDER BY id LIMIT $1"
            ),
            params![limit, host],
        )
    }

    fn open_effects(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        self.effects(
            &format!(
                "SELECT {OUTBOX_COLS} FROM outbox
                 WHERE status IN ('pending', 'failed') AND status <> 'done'
                 ORDER BY id DESC LIMIT $1"
            ),
            params![limit],
        )
    }

    fn count_effects(&self, status: &str) -> Result<i64> {
        Ok(self
            .one(
                "SELECT count(*) FROM outbox WHERE status = $1 AND status <> 'done'",
                params![status],
            )?
            .try_get(0)?)
    }

    fn pending_effect_before(&self, task_id: i64, kind: &str, before: i64) -> Result<bool> {
        Ok(self
            .one(
                "SELECT EXISTS(SELECT 1 FROM outbox
                  WHERE task_id = $1 AND id < $3 AND kind = $2 AND status = 'pending')",
                params![task_id, kind, before],
            )?
            .try_get(0)?)
    }

    fn old_done_effects(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>> {
        self.rows(
            "SELECT o.id FROM outbox o JOIN tasks t ON t.id = o.task_id
             WHERE o.id > $2 AND o.status = 'done' AND t.stage IN ('done', 'cancelled')
               AND orch_julian(coalesce(t.cancelled_at, t.updated_at, t.created_at)) < $1
             ORDER BY o.id LIMIT $3",
            params![cutoff, after, limit],
        )
        .context("reading old side effects")?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
    }
}

impl OutboxWrites for PgTx<'_> {
    fn enqueue_effect(
        &self,
        task_id: Option<i64>,
        kind: &str,
        payload: &Value,
        host: Option<&str>,
    ) -> Result<i64> {
        Ok(self
            .one(
                "INSERT INTO outbox (task_id, kind, payload, status, created_at, updated_at, host)
                 VALUES ($1, $2, $3, 'pending', orch_now(), orch_now(), $4) RETURNING id",
                params![task_id, kind, payload.to_string(), host],
            )
            .with_context(|| format!("writing side effect {kind}"))?
            .try_get(0)?)
    }

    fn claim_effect(
        &self,
        id: i64,
        observed: &EffectOwner,
        owner: &EffectOwner,
        lease_secs: i64,
    ) -> Result<bool> {
        let lease = lease_secs as f64;
        Ok(self.exec(
            "UPDATE outbox SET claimed_pid = $4, claimed_start = $5, claimed_host = $8,
                    claimed_until = orch_after($6), attempts = attempts + 1,
                    updated_at = orch_now()
             WHERE id = $1 AND status = 'pending'
               AND ((claimed_pid IS NOT DISTINCT FROM $2 AND claimed_start IS NOT DISTINCT FROM $3
                     AND claimed_host IS NOT DISTINCT FROM $7)
                    OR claimed_until < orch_now())",
            params![
                id,
                observed.pid,
                observed.start,
                owner.pid,
                owner.start,
                lease,
                observed.host,
                owner.host
            ],
        )? == 1)
    }

    fn finish_effect(&self, id: i64, owner: &EffectOwner, end: &EffectEnd) -> Result<bool> {
        let (status, result, error, delay): (&str, Option<&str>, Option<&str>, Option<f64>) =
            match end {
                EffectEnd::Done { result } => ("done", Some(result), None, None),
                EffectEnd::Retry { error, delay_secs } => {
                    ("pending", None, Some(error), Some(*delay_secs as f64))
                }
                EffectEnd::Failed { error } => ("failed", None, Some(error), None),
            };
        Ok(self.exec(
            "UPDATE outbox SET status = $4, result = coalesce($5, result), last_error = $6,
                    next_attempt_at = CASE WHEN $7::float8 IS NULL THEN NULL ELSE orch_after($7) END,
                    claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                    claimed_host = NULL, updated_at = orch_now()
             WHERE id = $1 AND claimed_pid = $2 AND claimed_start = $3
               AND claimed_host IS NOT DISTINCT FROM $8",
            &[
                super::p(&id),
                super::p(&owner.pid),
                super::p(&owner.start),
                super::p(&status),
                super::p(&result),
                super::p(&error),
                (&delay, postgres::types::Type::FLOAT8),
                super::p(&owner.host),
            ],
        )? == 1)
    }

    fn fail_effect(&self, id: i64, error: &str, observed: &EffectOwner) -> Result<bool> {
        Ok(self.exec(
            "UPDATE outbox SET status = 'failed', last_error = $2, updated_at = orch_now(),
                    claimed_pid = NULL, claimed_start = NULL, claimed_until = NULL,
                    claimed_host = NULL
             WHERE id = $1 AND status = 'pending'
               AND (claimed_pid IS NULL OR claimed_until < orch_now()
                    OR (claimed_pid = $3 AND claimed_start IS NOT DISTINCT FROM $4
                        AND claimed_host IS NOT DISTINCT FROM $5))",
            params![id, error, observed.pid, observed.start, observed.host],
        )? == 1)
    }

    fn delete_done_effects(&self, ids: &[i64]) -> Result<usize> {
        Ok(self.exec(
            "DELETE FROM outbox WHERE id = ANY($1) AND status = 'done'",
            params![ids.to_vec()],
        )? as usize)
    }
}
