//! The rows orchctl keeps, as plain values. Field names are the column names of SPEC §2,
//! so the JSON output and the database speak the same words.

use serde::Serialize;

use crate::pipeline::{JobStatus, Stage};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Task {
    pub id: i64,
    pub plane_id: Option<String>,
    pub work_item_id: Option<String>,
    pub plane_issue_id: Option<String>,
    pub project_id: Option<String>,
    pub repo: String,
    pub branch: Option<String>,
    pub title: Option<String>,
    pub stage: Stage,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub cancelled_at: Option<String>,
    pub cancel_requested_at: Option<String>,
    pub cancel_reason: Option<String>,
}

/// The marker appended to a tombstoned key: `<key>#cancelled-<task id>`.
pub const TOMBSTONE: &str = "#cancelled-";

/// The key as it was before a tombstone was appended.
pub fn untombstoned(key: &str) -> &str {
    key.split(TOMBSTONE).next().unwrap_or(key)
}

impl Task {
    pub fn is_terminal(&self) -> bool {
        self.stage.is_terminal()
    }

    /// Terminal, or a deferred STOP is pending: its jobs must not run again.
    pub fn is_stopping(&self) -> bool {
        self.is_terminal() || self.cancel_requested_at.is_some()
    }

    /// The work item id without its tombstone (deploy markers are keyed by it).
    pub fn original_work_item(&self) -> Option<&str> {
        self.work_item_id.as_deref().map(untombstoned)
    }

    /// The Plane issue this task mirrors, tombstone removed.
    pub fn original_plane_issue(&self) -> Option<&str> {
        self.plane_issue_id
            .as_deref()
            .or(self.plane_id.as_deref())
            .map(untombstoned)
    }

    /// A short human name: the work item id, else `task <id>`.
    pub fn label(&self) -> String {
        match self.original_work_item() {
            Some(w) => w.to_string(),
            None => format!("task {}", self.id),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub id: i64,
    pub agent: String,
    pub repo: String,
    pub task_id: Option<i64>,
    pub status: JobStatus,
    pub pid: Option<i64>,
    pub proc_start: Option<i64>,
    pub run_id: Option<i64>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub created_at: Option<String>,
    pub claimed_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// The host whose orchctl claimed the run (SPEC §12): only it ever signals `pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The boot of that host the run was launched in (`/proc/sys/kernel/random/boot_id`):
    /// a pid of another boot is dead whatever runs under that number now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl Job {
    /// Whether this job's process, if any, is one that orchctl on `host` may judge and
    /// signal: launched there (a row with no host was written by another tool on this
    /// machine, as the seed's tests do).
    pub fn runs_on(&self, host: &str) -> bool {
        self.host.as_deref().is_none_or(|h| h == host)
    }
}

pub const JOB_TERMINAL: [&str; 3] = ["done", "failed", "cancelled"];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: Option<i64>,
    pub at: String,
    pub kind: String,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Lease {
    pub repo: String,
    pub branch: String,
    pub task_id: Option<i64>,
    pub acquired_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub task_id: Option<i64>,
    pub kind: String,
    pub payload: serde_json::Value,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub result: Option<String>,
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    #[serde(skip)]
    pub claimed_pid: Option<i64>,
    #[serde(skip)]
    pub claimed_start: Option<i64>,
    #[serde(skip)]
    pub claimed_until: Option<String>,
    /// The host that claimed the row for execution (with `claimed_pid`/`claimed_start`).
    #[serde(skip)]
    pub claimed_host: Option<String>,
    /// The only host that can carry the effect out (an agent's kill, a worktree's
    /// removal); `None`: any host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl OutboxRow {
    /// Who holds the row's execution claim, if anyone.
    pub fn owner(&self) -> crate::store::EffectOwner {
        crate::store::EffectOwner {
            host: self.claimed_host.clone(),
            pid: self.claimed_pid,
            start: self.claimed_start,
        }
    }
}

/// A host running orchctl against a shared database (SPEC §12), as `queue` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Host {
    pub id: String,
    pub last_seen_at: Option<String>,
    /// Seen within `ORCH_HOST_DEAD_SECS`, and not judged dead since.
    pub alive: bool,
    /// Its running jobs.
    pub running: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// When another host's `reconcile` judged it dead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_since: Option<String>,
}
