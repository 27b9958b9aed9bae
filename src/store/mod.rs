//! The store: the one seam between the domain and the database (SPEC §2, §12).
//!
//! The domain reads through a [`Reader`] and writes through a [`Writer`] handed out by
//! [`Store::read`] and [`Store::write`]; it never sees SQL, a connection or a driver's
//! error type. Each backend is a module of its own behind the same traits — [`sqlite`]
//! (the default: one file, `BEGIN IMMEDIATE`) and [`pg`] (one database shared by several
//! hosts: row locks and `FOR UPDATE SKIP LOCKED`) — and all SQL lives there.
//!
//! The traits are split by aggregate (tasks, jobs, outbox, leases and markers, Plane's
//! caches, what tasks wait for, hosts); [`ReadTx`] and [`WriteTx`] are all of them. Every
//! write is one transaction; every state change is guarded by the state it expects
//! (`… WHERE status = 'running' AND run_id = ?`) and reports whether it landed, so a late
//! writer never overwrites a newer truth. No method assumes it is the only writer: the
//! compound ones (a claim, a lease, a delivery's record, a run id) state their atomicity
//! contract below, and both backends keep it — SQLite by its single writer, PostgreSQL by
//! row locks, `SKIP LOCKED`, a sequence and `INSERT … ON CONFLICT`. A transaction that
//! reads a task in order to change it locks that task first (PostgreSQL: `FOR UPDATE`), so
//! two commands deciding about one task never interleave.
//!
//! Timestamps and ids are produced by the database (its clock, its sequences), never by
//! callers.

pub mod pg;
pub mod sqlite;

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::model::{Host, Job, Lease, OutboxRow, Task, TaskEvent};
use crate::pipeline::{Awaiting, Stage};

pub use types::*;

mod types;

/// The failures of a store that decide an exit code (SPEC §9): a busy database and a
/// conflict are temporary (75), a schema newer than this binary is bad configuration
/// (78). Backends attach one to their own errors ([`Error::attach`]); everything else is
/// a plain failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A lock or statement timeout (`ORCH_BUSY_TIMEOUT_MS`) or a serialization failure
    /// that persisted after retries.
    Busy,
    /// A write collided with a concurrent one on a unique key.
    Conflict,
    /// The database was written by a newer orchctl; it is left untouched.
    NewerSchema { found: i64, known: i64 },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Busy => f.write_str("the database is busy"),
            Error::Conflict => f.write_str("a concurrent write took the same key"),
            Error::NewerSchema { found, known } => write!(
                f,
                "schema version {found} is newer than this orchctl knows ({known}); refusing to touch it"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The store error in `err`'s chain, if any.
    pub fn of(err: &anyhow::Error) -> Option<&Error> {
        // anyhow finds a context layer too, which a walk of `chain()` would not.
        err.downcast_ref::<Error>()
    }
}

/// Reads: everything a command may look at.
pub trait ReadTx:
    TaskReads + JobReads + OutboxReads + LeaseReads + PlaneReads + LiveReads + HostReads
{
}
impl<T: TaskReads + JobReads + OutboxReads + LeaseReads + PlaneReads + LiveReads + HostReads> ReadTx
    for T
{
}

/// Writes, inside one transaction; every read is available too.
pub trait WriteTx:
    ReadTx + TaskWrites + JobWrites + OutboxWrites + LeaseWrites + PlaneWrites + LiveWrites + HostWrites
{
}
impl<
        T: ReadTx
            + TaskWrites
            + JobWrites
            + OutboxWrites
            + LeaseWrites
            + PlaneWrites
            + LiveWrites
            + HostWrites,
    > WriteTx for T
{
}

/// What the domain reads through.
pub type Reader<'a> = dyn ReadTx + 'a;
/// What the domain writes through (a [`Reader`] too).
pub type Writer<'a> = dyn WriteTx + 'a;

/// Tasks, their dependencies and their audit trail.
pub trait TaskReads {
    /// The task; inside a write it is locked for the transaction (the write decides about
    /// it).
    fn task(&self, id: i64) -> Result<Option<Task>>;
    /// The task, never locked, even inside a write: for reporting what a write did (a
    /// claim's job with its task), never for deciding a change.
    fn peek_task(&self, id: i64) -> Result<Option<Task>>;
    /// Resolves a task reference: numeric id, work item id or Plane issue id. Tombstoned
    /// keys carry a suffix and so no longer match.
    fn find_task(&self, reference: &str) -> Result<Option<Task>>;
    /// The task mirroring Plane issue `issue_id` (by `plane_id`, else `plane_issue_id`);
    /// a number is never read as a task id.
    fn find_task_by_plane_issue(&self, issue_id: &str) -> Result<Option<Task>>;
    /// The id of a cancelled task whose tombstoned key was `reference`.
    fn find_tombstoned(&self, reference: &str) -> Result<Option<i64>>;
    /// The task whose `work_item_id` or `plane_id` is taken (the work item first).
    fn task_holding_keys(
        &self,
        work_item_id: Option<&str>,
        plane_id: Option<&str>,
    ) -> Result<Option<Task>>;
    /// A live task other than `except` on `branch` of `repo`.
    fn live_task_on_branch(
        &self,
        repo: &str,
        branch: &str,
        except: Option<i64>,
    ) -> Result<Option<i64>>;
    fn list_tasks(&self, stage: Option<&str>, repo: Option<&str>, limit: i64) -> Result<Vec<Task>>;
    /// Live tasks (not terminal), oldest first.
    fn live_tasks(&self) -> Result<Vec<Task>>;
    /// The task's audit trail, in order.
    fn events(&self, task_id: i64) -> Result<Vec<TaskEvent>>;
    fn deps_of(&self, task_id: i64) -> Result<Vec<i64>>;
    /// The live tasks that depend on `task_id`.
    fn dependents(&self, task_id: i64) -> Result<Vec<i64>>;
    /// Whether any dependency was ever recorded.
    fn has_deps(&self) -> Result<bool>;
    /// Tasks `done` or `cancelled`.
    fn count_terminal_tasks(&self) -> Result<i64>;
    fn count_tasks_in_stage(&self, stage: &str) -> Result<i64>;
    /// Task counts by stage (stages with none left out).
    fn task_counts(&self) -> Result<Vec<(String, i64)>>;
    /// The most recently cancelled tasks.
    fn recent_cancelled(&self, limit: i64) -> Result<Vec<Task>>;
    /// Live tasks with a deferred STOP waiting to be applied.
    fn pending_cancels(&self) -> Result<Vec<Task>>;
    fn count_pending_cancels(&self) -> Result<i64>;
    /// The database clock's now minus `days` days, as a Julian day number.
    fn julian_days_ago(&self, days: f64) -> Result<f64>;
}

pub trait TaskWrites {
    /// Appends one row to the task's audit trail.
    fn event(&self, task_id: Option<i64>, kind: &str, detail: &Value) -> Result<()>;
    /// Inserts a task; `None` when one of its unique keys (`plane_id`, `work_item_id`) is
    /// taken. Atomicity: the key check and the insert are one statement, so of two
    /// concurrent inserts of one key exactly one gets an id, and the transaction goes on
    /// either way (the caller reads who holds the key).
    fn insert_task(&self, t: &NewTask) -> Result<Option<i64>>;
    fn add_dep(&self, task_id: i64, depends_on: i64) -> Result<()>;
    /// Moves a live task from `from` to `to`; false when it was not in `from` any more.
    fn set_stage(&self, task_id: i64, from: Stage, to: Stage) -> Result<bool>;
    /// Makes the task terminal `cancelled` and tombstones its keys; false when it was
    /// already terminal.
    fn mark_task_cancelled(&self, task_id: i64, reason: &str) -> Result<bool>;
    /// Records a deferred cancel; false when one was already pending or the task is
    /// terminal.
    fn set_cancel_requested(&self, task_id: i64, reason: &str) -> Result<bool>;
}

/// Jobs and their runs.
pub trait JobReads {
    fn job(&self, id: i64) -> Result<Option<Job>>;
    fn jobs_of_task(&self, task_id: i64) -> Result<Vec<Job>>;
    fn jobs_of_task_in(&self, task_id: i64, status: &str) -> Result<Vec<Job>>;
    fn has_active_job(&self, task_id: i64) -> Result<bool>;
    fn has_running_job(&self, task_id: i64) -> Result<bool>;
    /// A queued or running job of the task, the oldest first.
    fn active_job(&self, task_id: i64) -> Result<Option<Job>>;
    /// The task's newest job of `agent`.
    fn latest_job_of(&self, task_id: i64, agent: &str) -> Result<Option<Job>>;
    /// Job counts by status (statuses with none left out).
    fn job_counts(&self) -> Result<Vec<(String, i64)>>;
    /// The newest jobs.
    fn recent_jobs(&self, limit: i64) -> Result<Vec<Job>>;
    /// Running jobs by agent, of every host (`None`) or of one.
    fn running_by_agent(&self, host: Option<&str>) -> Result<Vec<(String, i64)>>;
    /// Every running job, oldest first, with the seconds since its run was claimed (its
    /// creation for a row another tool set running without a claim time).
    fn running_jobs_aged(&self) -> Result<Vec<(Job, Option<f64>)>>;
    /// How many queued jobs of `agent` a claim could take now, counted up to `cap`.
    fn count_eligible_queued(&self, f: &ClaimFilter, agent: &str, cap: i64) -> Result<i64>;
    /// Seconds since the first queued job in claim order was created.
    fn oldest_queued_job_age_secs(&self) -> Result<Option<f64>>;
    /// Whether run `run_id` of job `job_id` is still running, and when it finished.
    fn run_end(&self, job_id: i64, run_id: i64) -> Result<Option<RunEnd>>;
}

pub trait JobWrites {
    fn insert_job(&self, task_id: Option<i64>, agent: &str, repo: &str) -> Result<i64>;
    /// Cancels the task's queued (and, unless `only_queued`, running) jobs; returns them
    /// as they were before the change (pids and run ids intact). Atomicity: one statement
    /// per status, guarded on it, so a job a concurrent claim took meanwhile is cancelled
    /// as the running job it has become, never missed.
    fn cancel_jobs_for_task(
        &self,
        task_id: i64,
        only_queued: bool,
        reason: &str,
    ) -> Result<Vec<Job>>;
    /// Takes the oldest eligible queued job (SPEC §5) and starts a new run of it, on
    /// `host`. Atomicity: N concurrent claimers never get the same job (SQLite: the single
    /// writer; PostgreSQL: `FOR UPDATE SKIP LOCKED`), and a claim never answers "nothing"
    /// while an eligible, unlocked job is queued; the run id comes from one sequence
    /// (unique across the database); for a `deployer` under the serial gate the repo's
    /// merge lease is taken in the same transaction or the job is not claimed.
    fn claim_next_job(&self, f: &ClaimFilter, host: &str) -> Result<Option<Job>>;
    /// [`JobWrites::claim_next_job`] limited to the agents in `limits` with fewer running
    /// jobs on `host` than their limit, while fewer than `total` run there in all.
    /// Atomicity: the slot count and the claim are one transaction and concurrent
    /// slot-bounded claims of one host are serialised, so no other claim fills a slot in
    /// between.
    fn claim_in_slots(
        &self,
        f: &ClaimFilter,
        limits: &[(String, i64)],
        total: i64,
        host: &str,
    ) -> Result<SlotClaim>;
    /// Records the launched supervisor of a run (pid, start time, boot); false when the run
    /// is no longer running.
    fn record_launch(&self, job_id: i64, run_id: i64, launch: &Launch) -> Result<bool>;
    /// Ends a run as `done`, `failed` or `cancelled`; false when `run_id` is not the job's
    /// running run (stale).
    fn finish_run(
        &self,
        job_id: i64,
        run_id: i64,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool>;
    /// Puts a run's job back in the queue (guarded like `finish_run`).
    fn requeue_run(&self, job_id: i64, run_id: Option<i64>, error: Option<&str>) -> Result<bool>;
    /// Ends a running job whose run id may be unknown (rows written by other tools).
    fn finish_running(
        &self,
        job_id: i64,
        run_id: Option<i64>,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool>;
    /// Puts the judged run back in the queue; false when the job is no longer exactly the
    /// run reap judged (another run, status, or recorded process).
    fn requeue_judged_run(&self, judged: &Job, error: &str) -> Result<bool>;
    /// Ends the judged run as `status`, with the same guard.
    fn end_judged_run(&self, judged: &Job, status: &str, error: &str) -> Result<bool>;
}

/// The side-effect outbox (SPEC §4).
pub trait OutboxReads {
    fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>>;
    /// The task's side effects still waiting, in the order they were written.
    fn pending_effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>>;
    fn effects_of_task(&self, task_id: i64) -> Result<Vec<OutboxRow>>;
    /// Pending side effects whose retry time has come that `host` may run (unbound ones and
    /// those bound to it), oldest first.
    fn due_effects(&self, host: &str, limit: i64) -> Result<Vec<OutboxRow>>;
    /// Side effects not done (pending or failed), newest first.
    fn open_effects(&self, limit: i64) -> Result<Vec<OutboxRow>>;
    /// How many side effects are in `status` (`pending` or `failed`).
    fn count_effects(&self, status: &str) -> Result<i64>;
    /// Whether the task has a `pending` effect of `kind` written before row `before`.
    fn pending_effect_before(&self, task_id: i64, kind: &str, before: i64) -> Result<bool>;
    /// Up to `limit` `done` rows above id `after` whose task is terminal since before
    /// `cutoff` (a Julian day).
    fn old_done_effects(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>>;
}

pub trait OutboxWrites {
    /// Writes a side effect (run after the commit), bound to `host` when only that host
    /// can carry it out.
    fn enqueue_effect(
        &self,
        task_id: Option<i64>,
        kind: &str,
        payload: &Value,
        host: Option<&str>,
    ) -> Result<i64>;
    /// Takes a pending effect for execution by `owner` for at most `lease_secs`. Guarded
    /// on the claim that was observed, so two processes never run the same effect at once.
    fn claim_effect(
        &self,
        id: i64,
        observed: &EffectOwner,
        owner: &EffectOwner,
        lease_secs: i64,
    ) -> Result<bool>;
    /// Records how an effect claimed by `owner` ended.
    fn finish_effect(&self, id: i64, owner: &EffectOwner, end: &EffectEnd) -> Result<bool>;
    /// Marks a pending effect failed without running it (its attempts used up). Guarded
    /// like [`OutboxWrites::claim_effect`]: only while unclaimed, claimed by `observed` (a
    /// runner known dead) or past its claim — never under a live runner, which records the
    /// ending itself.
    fn fail_effect(&self, id: i64, error: &str, observed: &EffectOwner) -> Result<bool>;
    /// Deletes the given rows, each only while still `done`.
    fn delete_done_effects(&self, ids: &[i64]) -> Result<usize>;
}

/// Merge leases and deploy markers.
pub trait LeaseReads {
    fn lease(&self, repo: &str) -> Result<Option<Lease>>;
    fn leases(&self) -> Result<Vec<Lease>>;
    /// Leases whose holder is missing or terminal.
    fn orphaned_leases(&self) -> Result<Vec<Lease>>;
    fn count_leases(&self) -> Result<i64>;
    /// The deploy marker state of a work item of a repo (`initiated`), if any.
    fn marker(&self, repo: &str, work_item_id: &str) -> Result<Option<String>>;
}

pub trait LeaseWrites {
    /// Takes the repo's merge lease for `branch` when free. Atomicity: the check and the
    /// insert are one statement; of two concurrent takers exactly one acquires it.
    fn acquire_lease(&self, repo: &str, branch: &str, task_id: i64) -> Result<LeaseOutcome>;
    /// Releases the repo's lease if `branch` holds it.
    fn release_lease(&self, repo: &str, branch: &str) -> Result<bool>;
    /// Releases the repo's lease if `branch` holds it for this task (or for no task).
    fn release_lease_of(&self, repo: &str, branch: &str, task_id: i64) -> Result<bool>;
    fn set_marker(&self, repo: &str, work_item_id: &str, state: &str, task_id: i64) -> Result<()>;
    fn clear_marker(&self, repo: &str, work_item_id: &str) -> Result<bool>;
}

/// Plane's deliveries and caches.
pub trait PlaneReads {
    /// Whether a delivery body (by SHA-256) was handled already (a fast path only: the
    /// record itself decides, [`PlaneWrites::record_delivery`]).
    fn delivery_seen(&self, body_sha256: &str) -> Result<bool>;
    fn plane_state_name(&self, project_id: &str, state_id: &str) -> Result<Option<String>>;
    fn plane_project_identifier(&self, project_id: &str) -> Result<Option<String>>;
    /// Up to `limit` handled deliveries received before `cutoff` (a Julian day), keys
    /// above `after`, in key order.
    fn old_deliveries(&self, cutoff: f64, after: i64, limit: i64) -> Result<Vec<i64>>;
}

pub trait PlaneWrites {
    /// Records a handled delivery; false when the body was handled before. Atomicity:
    /// record first — of two concurrent copies of one body exactly one records it (the
    /// other waits for it, then sees the record), and only the one that recorded acts.
    fn record_delivery(
        &self,
        body_sha256: &str,
        delivery_id: Option<&str>,
        event: Option<&str>,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<bool>;
    /// Sets what a recorded delivery did (its action and task), once that is known.
    fn set_delivery_outcome(
        &self,
        body_sha256: &str,
        action: &str,
        task_id: Option<i64>,
    ) -> Result<()>;
    fn cache_plane_states(
        &self,
        project_id: &str,
        states: &[(String, String, Option<String>)],
    ) -> Result<()>;
    fn cache_plane_project(&self, project_id: &str, identifier: &str) -> Result<()>;
    /// Deletes the given delivery rows (keys of [`PlaneReads::old_deliveries`]).
    fn delete_deliveries(&self, keys: &[i64]) -> Result<usize>;
}

/// What live tasks wait for (SPEC §14).
pub trait LiveReads {
    /// The counts of the four kinds `queue`'s `awaiting` block reports.
    fn awaiting_counts(&self) -> Result<AwaitingCounts>;
    /// The tasks waiting for `kind`, longest waiting first, at most `limit`.
    fn awaiting_tasks(&self, kind: Awaiting, limit: i64) -> Result<Vec<AwaitingTask>>;
    /// What task `task_id` waits for, if anything.
    fn awaiting_of(&self, task_id: i64) -> Result<Option<Awaiting>>;
    /// Live tasks whose dependencies are not all done, with the ones they wait on.
    fn blocked_tasks(&self, limit: i64) -> Result<Vec<(i64, Vec<i64>)>>;
}

pub trait LiveWrites {
    /// Brings what tasks wait for up to date inside the caller's transaction; returns how
    /// many tasks it settled.
    fn settle_waits(&self) -> Result<usize>;
}

/// The hosts that run orchctl against this database (SPEC §12).
pub trait HostReads {
    /// Every host seen, with whether it is alive (seen within `dead_secs`) and its
    /// running jobs.
    fn hosts(&self, dead_secs: i64) -> Result<Vec<Host>>;
    /// The pending effects bound to `host` whose turn has come, oldest first.
    fn due_effects_of_host(&self, host: &str, limit: i64) -> Result<Vec<OutboxRow>>;
}

pub trait HostWrites {
    /// Marks `host` dead if it has not been seen for `dead_secs`; true when this call
    /// did. Atomicity: guarded on the host's last sighting, so of two judges one does.
    fn mark_host_dead(&self, host: &str, dead_secs: i64) -> Result<bool>;
    /// Fails the pending effects bound to `host` with `reason`; returns them.
    fn fail_effects_of_host(&self, host: &str, reason: &str) -> Result<Vec<OutboxRow>>;
}

/// An open database: one backend or the other.
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(pg::PgStore),
}

impl Store {
    /// Opens (creating when missing) and migrates the SQLite database at `path`.
    pub fn open(path: &Path, busy_timeout_ms: u64) -> Result<Store> {
        Ok(Store::Sqlite(sqlite::SqliteStore::open(
            path,
            busy_timeout_ms,
        )?))
    }

    /// Runs `f` outside any write transaction (each statement sees a committed state).
    pub fn read<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        match self {
            Store::Sqlite(s) => s.read(f),
            Store::Postgres(p) => p.read(f),
        }
    }

    /// Runs `f` inside one read transaction: every statement sees the same state.
    pub fn read_snapshot<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        match self {
            Store::Sqlite(s) => s.read_snapshot(f),
            Store::Postgres(p) => p.read_snapshot(f),
        }
    }

    /// Runs `f` inside one write transaction: committed when `f` returns `Ok`, rolled back
    /// otherwise. `f` may run more than once (a PostgreSQL transaction that lost a
    /// serialization race or a deadlock is retried whole), so it must not act on the
    /// world — side effects go through the outbox and run after the commit.
    pub fn write<T>(&self, f: impl FnMut(&Writer) -> Result<T>) -> Result<T> {
        match self {
            Store::Sqlite(s) => s.write(f),
            Store::Postgres(p) => p.write(f),
        }
    }

    /// Runs `f` in a write transaction that is always rolled back: what a change would do,
    /// with the locks and rules of the real one (`dispatch --dry-run`).
    pub fn write_rolled_back<T>(&self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        match self {
            Store::Sqlite(s) => s.write_rolled_back(f),
            Store::Postgres(p) => p.write_rolled_back(f),
        }
    }

    /// Settles, in a write transaction of its own, what tasks wait for after other tools
    /// changed rows (`orchctl migrate` runs it); returns how many tasks it settled.
    pub fn settle_waits(&self) -> Result<usize> {
        match self {
            Store::Sqlite(s) => s.settle_waits(),
            Store::Postgres(p) => p.settle_waits(),
        }
    }

    /// Whether this open created the database (SPEC §15: a new database is announced).
    pub fn created(&self) -> bool {
        match self {
            Store::Sqlite(s) => s.created(),
            Store::Postgres(p) => p.created(),
        }
    }

    /// The schema version the database had before this process migrated it.
    pub fn opened_version(&self) -> i64 {
        match self {
            Store::Sqlite(s) => s.opened_version(),
            Store::Postgres(p) => p.opened_version(),
        }
    }

    /// The schema version the database has now.
    pub fn schema_version(&self) -> Result<i64> {
        match self {
            Store::Sqlite(s) => s.user_version(),
            Store::Postgres(p) => p.schema_version(),
        }
    }

    /// The SQLite file, when that is the backend.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Store::Sqlite(s) => Some(s.path()),
            Store::Postgres(_) => None,
        }
    }

    /// Where the state lives, for people: the SQLite file, or the PostgreSQL database with
    /// no password.
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite(s) => s.path().display().to_string(),
            Store::Postgres(p) => p.describe(),
        }
    }

    /// The SQLite backend, for the tools that look inside it (query plans, the
    /// benchmark); `None` on PostgreSQL.
    #[doc(hidden)]
    pub fn sqlite(&self) -> Option<&sqlite::SqliteStore> {
        match self {
            Store::Sqlite(s) => Some(s),
            Store::Postgres(_) => None,
        }
    }
}
