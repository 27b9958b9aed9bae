//! Dispatch's SQL (SPEC §13): the agent slots, counted and filled in the claim's own
//! transaction, and the eligible jobs left waiting.
//!
//! The slots are a limit on *running* jobs, so the count that decides whether one more run
//! may start has to see every run that another dispatch started: it is taken inside the
//! transaction that claims, never before it. On SQLite that transaction is `BEGIN
//! IMMEDIATE`, which holds the write lock from the count to the commit; a backend whose
//! transactions run side by side must lock what the count reads.

use super::{ClaimFilter, Reader, Writer};
use crate::model::Job;
use anyhow::{Context, Result};

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
