//! Dispatch's SQL (SPEC §13): the agent slots, counted and filled in the claim's own
//! transaction, and the eligible jobs left waiting.
//!
//! The slots are a limit on *running* jobs, so the count that decides whether one more run
//! may start has to see every run that another dispatch started: it is taken inside the
//! transaction that claims, never before it. On SQLite that transaction is `BEGIN
//! IMMEDIATE`, which holds the write lock from the count to the commit; a backend whose
//! transactions run side by side must lock what the count reads.

use anyhow::{Context, Result};
use rusqlite::ToSql;

use super::{ClaimFilter, Reader, Writer};
use crate::model::Job;

/// What a slot-bounded claim saw and took.
#[derive(Debug, Clone, Default)]
pub struct SlotClaim {
    /// Running jobs by agent, as counted in the claim's transaction (before the claim).
    pub running: Vec<(String, i64)>,
    /// The job claimed, if an agent had a free slot and an eligible job.
    pub job: Option<Job>,
}

impl SlotClaim {
    /// Running jobs of `agent` before the claim.
    pub fn running_of(&self, agent: &str) -> i64 {
        self.running
            .iter()
            .find(|(a, _)| a == agent)
            .map_or(0, |(_, n)| *n)
    }

    /// Running jobs of every agent before the claim.
    pub fn running_total(&self) -> i64 {
        self.running.iter().map(|(_, n)| n).sum()
    }
}

impl<'c> Writer<'c> {
    /// Claims the oldest eligible queued job (the rules of [`Writer::claim_next_job`]) of an
    /// agent in `limits` that has fewer running jobs than its limit, while fewer than
    /// `total` jobs run in all. Atomicity: the slot count and the claim are one
    /// transaction (the caller's write): no other claim can fill a slot in between.
    pub fn claim_in_slots(
        &self,
        f: &ClaimFilter,
        limits: &[(String, i64)],
        total: i64,
    ) -> Result<SlotClaim> {
        let running = self.running_by_agent()?;
        let mut out = SlotClaim { running, job: None };
        if out.running_total() >= total {
            return Ok(out);
        }
        let free: Vec<String> = limits
            .iter()
            .filter(|(agent, limit)| out.running_of(agent) < *limit)
            .map(|(agent, _)| agent.clone())
            .collect();
        if free.is_empty() {
            return Ok(out);
        }
        let filter = ClaimFilter {
            agents: free,
            ..f.clone()
        };
        out.job = self.claim_next_job(&filter)?;
        Ok(out)
    }
}

impl<'c> Reader<'c> {
    /// How many queued jobs of `agent` `claim` could take now (the eligibility of
    /// [`Writer::claim_next_job`]: task live, no STOP pending, dependencies done, the serial
    /// gate), counted up to `cap`.
    pub fn count_eligible_queued(&self, f: &ClaimFilter, agent: &str, cap: i64) -> Result<i64> {
        // The same conditions as claim_next_job's choice, written out again here: the
        // store of each backend owns its SQL, and tests/dispatch.rs checks the two agree.
        let mut sql = String::from(
            "SELECT count(*) FROM (
               SELECT 1 FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id
               WHERE j.status = 'queued' AND j.agent = ?1
                 AND (j.task_id IS NULL OR (t.stage NOT IN ('done', 'cancelled')
                                            AND t.cancel_requested_at IS NULL))",
        );
        if f.task_deps {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                                  WHERE d.task_id = j.task_id AND dt.stage IS NOT 'done')",
            );
        }
        if f.serial_gate {
            sql.push_str(
                " AND (j.agent <> 'deployer' OR NOT EXISTS (
                        SELECT 1 FROM merge_leases l WHERE l.repo = j.repo AND l.branch IS NOT t.branch))",
            );
        }
        let mut args: Vec<&dyn ToSql> = vec![&agent];
        if let Some(repo) = &f.repo {
            sql.push_str(" AND j.repo = ?2");
            args.push(repo);
        }
        sql.push_str(if f.repo.is_some() {
            " LIMIT ?3)"
        } else {
            " LIMIT ?2)"
        });
        args.push(&cap);
        self.c
            .prepare_cached(&sql)?
            .query_row(args.as_slice(), |r| r.get(0))
            .with_context(|| format!("counting the queued {agent} jobs"))
    }
}

impl super::Store {
    /// Runs `f` in a write transaction that is always rolled back: what a change would do,
    /// seen with the locks and the rules of the real one (`dispatch --dry-run`). Atomicity:
    /// nothing `f` writes is ever committed.
    pub fn write_rolled_back<T>(&self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .context("starting a write transaction")?;
        let w = Writer {
            r: Reader { c: &self.conn },
        };
        let out = f(&w);
        let _ = self.conn.execute_batch("ROLLBACK");
        out
    }
}
