//! The pipeline's vocabulary and its stage map (SPEC §1), written down once.
//!
//! [`Stage`], [`Agent`] and [`JobStatus`] are the words the database and the JSON output
//! use, as types: they serialise exactly as the stored strings. [`MOVES`] is the one table
//! of stage moves — what a finished job, Plane's Approved / Rejected / Confirm Deploy (or
//! the operator commands that stand for them), a retry, a deploy and a STOP do to a task
//! in each stage. Every module that moves a task (complete, event, the operator commands,
//! finalize-deploy, stop) looks its move up here; `transitions` carries it out. Pure
//! values and functions: no I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements the string form of a vocabulary enum: `as_str`, `Display`, `FromStr`,
/// serde as that string, and comparison with `&str` (tests and callers compare with text).
macro_rules! words {
    ($ty:ident, $what:literal, { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $word),+
                }
            }

            /// The value a stored word names, if any.
            pub fn parse(word: &str) -> Option<$ty> {
                match word {
                    $($word => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $ty::parse(s).ok_or_else(|| {
                    let all: Vec<&str> = $ty::ALL.iter().map(|v| v.as_str()).collect();
                    format!("unknown {} {s:?} (one of {})", $what, all.join(", "))
                })
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<$ty> for &str {
            fn eq(&self, other: &$ty) -> bool {
                *self == other.as_str()
            }
        }
    };
}

/// Where a task is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Analysis,
    Development,
    Review,
    Deploy,
    Done,
    Cancelled,
}

words!(Stage, "stage", {
    Analysis => "analysis",
    Development => "development",
    Review => "review",
    Deploy => "deploy",
    Done => "done",
    Cancelled => "cancelled",
});

/// The agents that work the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Agent {
    Analyst,
    Developer,
    Reviewer,
    Deployer,
}

words!(Agent, "agent", {
    Analyst => "analyst",
    Developer => "developer",
    Reviewer => "reviewer",
    Deployer => "deployer",
});

/// A job's status (SPEC §1): `queued` → `running` → `done` | `failed`; any non-terminal →
/// `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

words!(JobStatus, "job status", {
    Queued => "queued",
    Running => "running",
    Done => "done",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl JobStatus {
    /// No command changes a terminal job again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Queued or running: the job still has work to do.
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }
}

/// The stage names, for messages and argument checks.
pub const STAGES: [&str; 6] = [
    "analysis",
    "development",
    "review",
    "deploy",
    "done",
    "cancelled",
];

/// Stages a task may be created in.
pub const LIVE_STAGES: [&str; 4] = ["analysis", "development", "review", "deploy"];

impl Stage {
    /// The stages a task may be created in and moves through.
    pub const LIVE: [Stage; 4] = [
        Stage::Analysis,
        Stage::Development,
        Stage::Review,
        Stage::Deploy,
    ];

    /// Nothing ever changes a terminal task again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Done | Stage::Cancelled)
    }

    /// `development`, `review` or `deploy`.
    pub fn is_mid_pipeline(self) -> bool {
        matches!(self, Stage::Development | Stage::Review | Stage::Deploy)
    }

    /// The agent that works the stage.
    pub fn agent(self) -> Option<Agent> {
        match self {
            Stage::Analysis => Some(Agent::Analyst),
            Stage::Development => Some(Agent::Developer),
            Stage::Review => Some(Agent::Reviewer),
            Stage::Deploy => Some(Agent::Deployer),
            Stage::Done | Stage::Cancelled => None,
        }
    }

    /// The agent queued when a task is created in this stage (`task add`, a new pipeline):
    /// a task created in `deploy` parks awaiting Confirm Deploy, so it gets none.
    pub fn entry_agent(self) -> Option<Agent> {
        match self {
            Stage::Deploy => None,
            s => s.agent(),
        }
    }
}

/// What a task waits for when no agent works it (SPEC §14). The stored word is the key of
/// `queue`'s `awaiting` lists; `task show` says it in its own words ([`Awaiting::show`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Awaiting {
    /// Parked in analysis after the analyst's success: Approved or Rejected.
    Approval,
    /// Parked in deploy: Confirm Deploy.
    DeployConfirmation,
    /// The stage's last job failed and nothing else is queued: a retry (or a STOP).
    Failed,
    /// A dependency is not done yet.
    Dependency,
    /// A dependency was cancelled: the task can never start.
    BlockedByCancelled,
}

words!(Awaiting, "awaiting kind", {
    Approval => "approval",
    DeployConfirmation => "deploy_confirmation",
    Failed => "failed",
    Dependency => "dependency",
    BlockedByCancelled => "blocked_by_cancelled",
});

impl Awaiting {
    /// The kinds `queue`'s `awaiting` block lists (a dependency that is merely not done
    /// yet waits on work, not on people).
    pub const ON_PEOPLE: [Awaiting; 4] = [
        Awaiting::Approval,
        Awaiting::DeployConfirmation,
        Awaiting::Failed,
        Awaiting::BlockedByCancelled,
    ];

    /// `task show`'s word: `approval`, `deploy_confirmation`, `retry`, `dependency` or
    /// `cancelled_dependency`.
    pub fn show(self) -> &'static str {
        match self {
            Awaiting::Approval => "approval",
            Awaiting::DeployConfirmation => "deploy_confirmation",
            Awaiting::Failed => "retry",
            Awaiting::Dependency => "dependency",
            Awaiting::BlockedByCancelled => "cancelled_dependency",
        }
    }

    /// What the audit trail says a parked task awaits.
    pub fn describe(self) -> &'static str {
        match self {
            Awaiting::Approval => "Approved or Rejected",
            Awaiting::DeployConfirmation => "Confirm Deploy",
            Awaiting::Failed => "a retry",
            Awaiting::Dependency => "its dependencies",
            Awaiting::BlockedByCancelled => "a cancelled dependency (it can never start)",
        }
    }
}

/// What a live task waits for when no job of it is queued or running, no deploy window is
/// open and no dependency holds it: decided by its stage and its stage agent's last job.
/// A failed last job waits for a retry; the parks of the stage map (the moves that leave
/// a task without a job, [`Move::parks`]) wait for people — an analysis whose analyst
/// succeeded for Approved / Rejected, a deploy (entered from review, or whose deploy
/// failed) for Confirm Deploy.
pub fn waiting_in(stage: Stage, last_job: Option<JobStatus>) -> Option<Awaiting> {
    match (stage, last_job) {
        (s, Some(JobStatus::Failed)) if !s.is_terminal() => Some(Awaiting::Failed),
        (Stage::Analysis, Some(JobStatus::Done)) => Some(Awaiting::Approval),
        (Stage::Deploy, _) => Some(Awaiting::DeployConfirmation),
        _ => None,
    }
}

/// What moves a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The stage's agent finished its job successfully (`complete --success`).
    JobDone,
    /// Plane's Approved, or `orchctl approve`.
    Approved,
    /// Plane's Rejected, or `orchctl reject`.
    Rejected,
    /// Plane's Confirm Deploy, or `orchctl confirm-deploy`.
    ConfirmDeploy,
    /// `orchctl retry`: the stage's failed job once more.
    Retry,
    /// The deploy step succeeded (`finalize-deploy --outcome success`, or the deployer's
    /// own success).
    Deployed,
    /// STOP's full reset.
    Stopped,
}

impl Trigger {
    /// How an operator names it (the command) and how Plane's route note names it.
    pub fn word(self) -> &'static str {
        match self {
            Trigger::JobDone => "job-done",
            Trigger::Approved => "approved",
            Trigger::Rejected => "rejected",
            Trigger::ConfirmDeploy => "confirm-deploy",
            Trigger::Retry => "retry",
            Trigger::Deployed => "deployed",
            Trigger::Stopped => "stopped",
        }
    }

    /// The command that stands for it, for messages.
    pub fn command(self) -> &'static str {
        match self {
            Trigger::Approved => "approve",
            Trigger::Rejected => "reject",
            Trigger::ConfirmDeploy => "confirm-deploy",
            Trigger::Retry => "retry",
            Trigger::Deployed => "finalize-deploy",
            Trigger::Stopped => "stop",
            Trigger::JobDone => "complete",
        }
    }

    /// What a successful job of the stage's agent means: a deployer's success is the
    /// deploy's success (it closes the deploy window like `finalize-deploy`).
    pub fn for_job_success(stage: Stage) -> Trigger {
        match stage {
            Stage::Deploy => Trigger::Deployed,
            _ => Trigger::JobDone,
        }
    }

    /// Moves a person asks for (Plane or an operator): they have preconditions (SPEC §14).
    pub fn is_by_people(self) -> bool {
        matches!(
            self,
            Trigger::Approved | Trigger::Rejected | Trigger::ConfirmDeploy | Trigger::Retry
        )
    }
}

/// One row of the stage map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: Stage,
    pub on: Trigger,
    pub to: Stage,
    /// The agent whose job is queued on arrival.
    pub queue: Option<Agent>,
    /// What the task then waits for, when no job is queued.
    pub parks: Option<Awaiting>,
}

const fn mv(
    from: Stage,
    on: Trigger,
    to: Stage,
    queue: Option<Agent>,
    parks: Option<Awaiting>,
) -> Move {
    Move {
        from,
        on,
        to,
        queue,
        parks,
    }
}

use Agent::*;
use Stage::*;
use Trigger::*;

/// The stage map of SPEC §1 and §14. A (stage, trigger) pair that is not here does not
/// apply: the task stays as it is.
pub const MOVES: &[Move] = &[
    // The agents' work.
    mv(Analysis, JobDone, Analysis, None, Some(Awaiting::Approval)),
    mv(Development, JobDone, Review, Some(Reviewer), None),
    mv(
        Review,
        JobDone,
        Deploy,
        None,
        Some(Awaiting::DeployConfirmation),
    ),
    mv(Deploy, Deployed, Done, None, None),
    // What people decide (Plane's states, or the operator commands).
    mv(Analysis, Approved, Development, Some(Developer), None),
    mv(Analysis, Rejected, Analysis, Some(Analyst), None),
    mv(Review, Rejected, Development, Some(Developer), None),
    // Parked awaiting Confirm Deploy after the review: a person rejects the work.
    mv(Deploy, Rejected, Development, Some(Developer), None),
    mv(Deploy, ConfirmDeploy, Deploy, Some(Deployer), None),
    // A stuck stage's failed job, once more.
    mv(Analysis, Retry, Analysis, Some(Analyst), None),
    mv(Development, Retry, Development, Some(Developer), None),
    mv(Review, Retry, Review, Some(Reviewer), None),
    mv(Deploy, Retry, Deploy, Some(Deployer), None),
    // STOP's full reset, from anywhere live.
    mv(Analysis, Stopped, Cancelled, None, None),
    mv(Development, Stopped, Cancelled, None, None),
    mv(Review, Stopped, Cancelled, None, None),
    mv(Deploy, Stopped, Cancelled, None, None),
];

/// The move `on` makes from `from`, if any.
pub fn step(from: Stage, on: Trigger) -> Option<&'static Move> {
    MOVES.iter().find(|m| m.from == from && m.on == on)
}

/// The stages `on` applies to, for messages ("approve applies to a task in analysis").
pub fn stages_for(on: Trigger) -> Vec<Stage> {
    MOVES
        .iter()
        .filter(|m| m.on == on)
        .map(|m| m.from)
        .collect()
}

/// Nothing ever changes a terminal task again.
pub fn is_terminal(stage: &str) -> bool {
    Stage::parse(stage).is_some_and(Stage::is_terminal)
}

/// `development`, `review` or `deploy`.
pub fn is_mid_pipeline(stage: &str) -> bool {
    Stage::parse(stage).is_some_and(Stage::is_mid_pipeline)
}

/// The agent that works a stage.
pub fn agent_for_stage(stage: &str) -> Option<&'static str> {
    Stage::parse(stage)
        .and_then(Stage::agent)
        .map(Agent::as_str)
}

/// The agent queued when a task is created in `stage`.
pub fn entry_agent(stage: &str) -> Option<&'static str> {
    Stage::parse(stage)
        .and_then(Stage::entry_agent)
        .map(Agent::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_map() {
        assert_eq!(Deploy.agent(), Some(Deployer));
        assert_eq!(Deploy.entry_agent(), None);
        assert_eq!(Development.entry_agent(), Some(Developer));
        let to = |from, on| step(from, on).map(|m| (m.to, m.queue, m.parks));
        assert_eq!(
            to(Development, JobDone),
            Some((Review, Some(Reviewer), None))
        );
        assert_eq!(
            to(Review, JobDone),
            Some((Deploy, None, Some(Awaiting::DeployConfirmation)))
        );
        assert_eq!(
            to(Analysis, JobDone),
            Some((Analysis, None, Some(Awaiting::Approval)))
        );
        assert_eq!(to(Deploy, Deployed), Some((Done, None, None)));
        assert_eq!(to(Development, Approved), None);
        assert_eq!(stages_for(Rejected), [Analysis, Review, Deploy]);
        assert_eq!(stages_for(ConfirmDeploy), [Deploy]);
        for s in Stage::LIVE {
            assert_eq!(to(s, Retry), Some((s, s.agent(), None)), "{s}");
            assert_eq!(to(s, Stopped), Some((Cancelled, None, None)), "{s}");
        }
        // Nothing leaves a terminal stage.
        assert!(MOVES.iter().all(|m| !m.from.is_terminal()));
        assert!(Cancelled.is_terminal() && Done.is_terminal() && !Deploy.is_terminal());
        assert!(Review.is_mid_pipeline() && !Analysis.is_mid_pipeline());
    }

    #[test]
    fn a_parked_task_waits_for_what_its_park_in_the_map_says() {
        // Every park of the table is a wait (the stage the move parks the task in).
        for m in MOVES.iter().filter(|m| m.parks.is_some()) {
            let last = if m.from == m.to {
                Some(JobStatus::Done)
            } else {
                None
            };
            assert_eq!(waiting_in(m.to, last), m.parks, "{m:?}");
        }
        assert_eq!(
            waiting_in(Review, Some(JobStatus::Failed)),
            Some(Awaiting::Failed)
        );
        assert_eq!(waiting_in(Review, Some(JobStatus::Done)), None);
        assert_eq!(waiting_in(Analysis, None), None);
        assert_eq!(waiting_in(Done, Some(JobStatus::Failed)), None);
    }

    #[test]
    fn words_round_trip_as_the_stored_strings() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(
            STAGES.to_vec(),
            Stage::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(
            LIVE_STAGES.to_vec(),
            Stage::LIVE.iter().map(|s| s.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(
            serde_json::to_string(&Awaiting::DeployConfirmation).unwrap(),
            "\"deploy_confirmation\""
        );
        assert!("weird".parse::<JobStatus>().is_err());
        assert!(JobStatus::Queued == "queued" && "done" == JobStatus::Done);
    }
}
