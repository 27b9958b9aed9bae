//! The values that cross the store's seam (besides the rows of [`crate::model`]).

use crate::model::{Job, Lease};
use crate::pipeline::Awaiting;

/// What a new task is made of.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub plane_id: Option<String>,
    pub work_item_id: Option<String>,
    pub plane_issue_id: Option<String>,
    pub project_id: Option<String>,
    pub repo: String,
    pub branch: Option<String>,
    pub title: Option<String>,
    pub stage: String,
}

/// Which queued jobs a claimer will take.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    pub agents: Vec<String>,
    pub repo: Option<String>,
    pub task_deps: bool,
    pub serial_gate: bool,
}

/// The outcome of asking for a repo's merge lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    Acquired,
    AlreadyHeld,
    HeldBy(Lease),
}

/// How a claimed side effect ended.
#[derive(Debug, Clone)]
pub enum EffectEnd {
    Done { result: String },
    Retry { error: String, delay_secs: i64 },
    Failed { error: String },
}

/// Who runs (or ran) a side effect: an orchctl process, named by its host, pid and start
/// time. A claim by a process of another host can only be judged by its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EffectOwner {
    pub host: Option<String>,
    pub pid: Option<i64>,
    pub start: Option<i64>,
}

/// A launched run's supervisor: the process STOP and reap act on, on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub pid: i64,
    pub proc_start: i64,
    pub host: String,
    pub boot_id: Option<String>,
}

/// What a slot-bounded claim saw and took.
#[derive(Debug, Clone, Default)]
pub struct SlotClaim {
    /// Running jobs of the host by agent, counted in the claim's transaction (before it).
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

    /// The agents of `limits` that have a free slot, when fewer than `total` run in all.
    pub fn free_agents(&self, limits: &[(String, i64)], total: i64) -> Vec<String> {
        if self.running_total() >= total {
            return Vec::new();
        }
        limits
            .iter()
            .filter(|(agent, limit)| self.running_of(agent) < *limit)
            .map(|(agent, _)| agent.clone())
            .collect()
    }
}

/// What the database says about one run of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunEnd {
    /// The job's current run is this one and it is running.
    pub running: bool,
    /// When this run finished (a Julian day), when it is the job's latest run and ended.
    pub finished: Option<f64>,
}

/// One task waiting on people: the row of `queue`'s `awaiting` lists.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AwaitingTask {
    pub id: i64,
    pub work_item_id: Option<String>,
    pub repo: String,
    pub stage: crate::pipeline::Stage,
    /// When it started waiting.
    pub since: Option<String>,
}

/// How many live tasks wait, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AwaitingCounts {
    pub approval: i64,
    pub deploy_confirmation: i64,
    pub failed: i64,
    pub blocked_by_cancelled: i64,
}

impl AwaitingCounts {
    pub fn get(&self, kind: Awaiting) -> i64 {
        match kind {
            Awaiting::Approval => self.approval,
            Awaiting::DeployConfirmation => self.deploy_confirmation,
            Awaiting::Failed => self.failed,
            Awaiting::BlockedByCancelled => self.blocked_by_cancelled,
            Awaiting::Dependency => 0,
        }
    }

    pub fn add(&mut self, kind: Awaiting, by: i64) {
        match kind {
            Awaiting::Approval => self.approval += by,
            Awaiting::DeployConfirmation => self.deploy_confirmation += by,
            Awaiting::Failed => self.failed += by,
            Awaiting::BlockedByCancelled => self.blocked_by_cancelled += by,
            Awaiting::Dependency => {}
        }
    }
}

/// What one migration run did.
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq)]
pub struct MigrateReport {
    pub from: i64,
    pub to: i64,
}

/// The facts that decide what a live task waits for (SPEC §14), read from its rows;
/// [`WaitFacts::kind`] is the one definition both backends use.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitFacts {
    pub stage: crate::pipeline::Stage,
    pub terminal_or_stopping: bool,
    /// A dependency is cancelled.
    pub dep_cancelled: bool,
    /// A dependency is not done.
    pub dep_open: bool,
    /// A job of the task is queued or running.
    pub active_job: bool,
    /// The task's deploy marker says `initiated`.
    pub deploy_initiated: bool,
    /// The status of the newest job of the stage's agent.
    pub last_stage_job: Option<crate::pipeline::JobStatus>,
}

impl WaitFacts {
    /// What the task waits for: nothing when it is finished or has a STOP pending; a
    /// cancelled dependency blocks it for good; a dependency not done holds it; a queued
    /// or running job, or an open deploy window, is work in progress; otherwise its stage
    /// and its stage agent's last job decide ([`crate::pipeline::waiting_in`]).
    pub fn kind(&self) -> Option<Awaiting> {
        if self.terminal_or_stopping {
            return None;
        }
        if self.dep_cancelled {
            return Some(Awaiting::BlockedByCancelled);
        }
        if self.dep_open {
            return Some(Awaiting::Dependency);
        }
        if self.active_job {
            return None;
        }
        if self.stage == crate::pipeline::Stage::Deploy && self.deploy_initiated {
            return None;
        }
        crate::pipeline::waiting_in(self.stage, self.last_stage_job)
    }
}
