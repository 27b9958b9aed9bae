//! The command line (SPEC §11): clap types only. They also feed the man pages and the
//! shell completions, so every help text here is user documentation.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0   ok (idempotent no-ops included)
  1   failure
  2   usage error
  3   nothing to claim
  65  bad input data (invalid name, malformed event)
  75  temporary: database busy past the timeout, merge lease held — safe to retry
  77  webhook signature missing or wrong
  78  bad configuration, or a database newer than this binary

Every flag can also be set by the ORCH_* variable shown with it; configuration
variables (ORCH_REPOS_DIR, ORCH_GITEA_URL, ORCH_PLANE_URL, ...) are listed in README.md.";

/// State keeper and control tool of an AI-agent delivery pipeline.
///
/// Work items live in Plane, code in Gitea, agents run as OS processes, and all state is
/// one SQLite file. Every command opens the file, does one transaction-shaped piece of
/// work, prints its result (text on a terminal, JSON otherwise) and exits.
#[derive(Debug, Parser)]
#[command(name = "orchctl", version, about, long_about, after_long_help = EXIT_CODES)]
pub struct Cli {
    /// The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]
    #[arg(long, global = true, env = "ORCH_DB_PATH", value_name = "PATH")]
    pub db: Option<PathBuf>,

    /// Output format [default: text on a terminal, JSON otherwise]
    #[arg(long, global = true, env = "ORCH_FORMAT", value_enum)]
    pub format: Option<Format>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending schema migrations (every command does this first)
    Migrate,

    /// Create, inspect and list tasks without Plane
    #[command(subcommand)]
    Task(TaskCommand),

    /// Stop a task: kill its agents, cancel its jobs, remove its worktree and branch
    ///
    /// Keeps the task row and its docs, frees its keys, notifies, and never revives it.
    /// Inside a merge/deploy window the stop is deferred and applied by finalize-deploy
    /// (or reconcile) once the window closes, unless --force is given.
    Stop(StopArgs),

    /// Take the oldest eligible queued job and start a run of it (exit 3: none)
    Claim(ClaimArgs),

    /// Record the outcome of a run
    Complete(CompleteArgs),

    /// Recover running jobs whose agent died
    Reap(ReapArgs),

    /// Cron safety net: deferred stops, orphaned leases, outbox retries, missed Plane STOPs
    Reconcile,

    /// Open the critical deploy window: take the merge lease, mark the deploy initiated
    DeployBegin(TaskRef),

    /// Close the deploy window and apply a deferred stop, or finish the task
    FinalizeDeploy(FinalizeArgs),

    /// A snapshot of queues, leases, dependencies, outbox and stops for dashboards
    Queue(QueueArgs),

    /// Handle one Plane webhook delivery read from stdin
    Event(EventArgs),
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a task and queue the first job of its stage
    Add(TaskAddArgs),
    /// Show a task with its jobs, lease, marker and side effects
    Show(TaskRef),
    /// List tasks, newest first
    List(TaskListArgs),
    /// Print a task's audit trail
    Log(TaskRef),
}

#[derive(Debug, Args)]
pub struct TaskRef {
    /// Task id, work item id (ORCH-310) or Plane issue id
    #[arg(value_name = "TASK")]
    pub task: String,
}

#[derive(Debug, Args)]
pub struct TaskAddArgs {
    /// Repository name (a clone at $ORCH_REPOS_DIR/<repo>)
    #[arg(long, env = "ORCH_TASK_REPO")]
    pub repo: String,
    /// Work item id, e.g. ORCH-310
    #[arg(long, value_name = "ID", env = "ORCH_TASK_WORK_ITEM")]
    pub work_item: String,
    /// Plane issue id (UUID)
    #[arg(long, value_name = "ID", env = "ORCH_TASK_PLANE_ID")]
    pub plane_id: Option<String>,
    /// Plane project id (UUID)
    #[arg(long, value_name = "ID", env = "ORCH_TASK_PROJECT_ID")]
    pub project_id: Option<String>,
    /// Branch [default: feature/<work item>-<slug of the title>]
    #[arg(long, env = "ORCH_TASK_BRANCH")]
    pub branch: Option<String>,
    /// Title
    #[arg(long, env = "ORCH_TASK_TITLE")]
    pub title: Option<String>,
    /// Stage to start in: analysis, development, review or deploy
    #[arg(long, default_value = "analysis", env = "ORCH_TASK_STAGE")]
    pub stage: String,
    /// A task whose completion this one waits for (repeatable)
    #[arg(
        long = "depends-on",
        value_name = "TASK",
        env = "ORCH_TASK_DEPENDS_ON",
        value_delimiter = ','
    )]
    pub depends_on: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TaskListArgs {
    /// Only tasks in this stage
    #[arg(long, env = "ORCH_LIST_STAGE")]
    pub stage: Option<String>,
    /// Only tasks of this repo
    #[arg(long, env = "ORCH_LIST_REPO")]
    pub repo: Option<String>,
    /// At most this many tasks
    #[arg(long, default_value_t = 100, env = "ORCH_LIST_LIMIT")]
    pub limit: i64,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Task id, work item id (ORCH-310) or Plane issue id
    #[arg(value_name = "TASK")]
    pub task: String,
    /// Why (recorded in the task and its log)
    #[arg(long, value_name = "TEXT", env = "ORCH_STOP_REASON")]
    pub reason: Option<String>,
    /// Skip the critical-window check: reset even during a deploy
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ClaimArgs {
    /// Only jobs of this agent (repeatable)
    #[arg(
        long = "agent",
        value_name = "A",
        env = "ORCH_CLAIM_AGENTS",
        value_delimiter = ','
    )]
    pub agents: Vec<String>,
    /// Only jobs of this repo
    #[arg(long, value_name = "R", env = "ORCH_CLAIM_REPO")]
    pub repo: Option<String>,
    /// Launch the agent: the command after `--`, detached in its own session
    #[arg(long, requires = "command")]
    pub exec: bool,
    /// The agent command and its arguments (after `--`)
    #[arg(last = true, value_name = "CMD", requires = "exec")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("outcome").required(true).args(["success", "failure"])))]
pub struct CompleteArgs {
    /// Job id
    #[arg(value_name = "JOB")]
    pub job: i64,
    /// The run being completed (an agent started with --exec has it in ORCH_RUN_ID)
    #[arg(long, value_name = "R", env = "ORCH_RUN_ID")]
    pub run_id: i64,
    /// The run succeeded
    #[arg(long)]
    pub success: bool,
    /// The run failed
    #[arg(long)]
    pub failure: bool,
    /// What went wrong (with --failure)
    #[arg(
        long,
        value_name = "TEXT",
        requires = "failure",
        env = "ORCH_COMPLETE_ERROR"
    )]
    pub error: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReapArgs {
    /// Report what would change, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Boot-time recovery: every running job is dead
    #[arg(long)]
    pub recover: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeployOutcomeArg {
    Success,
    Failure,
}

#[derive(Debug, Args)]
pub struct FinalizeArgs {
    /// Task id, work item id (ORCH-310) or Plane issue id
    #[arg(value_name = "TASK")]
    pub task: String,
    /// How the merge/deploy step ended
    #[arg(long, value_enum, env = "ORCH_DEPLOY_OUTCOME")]
    pub outcome: DeployOutcomeArg,
}

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// How many recent jobs and cancelled tasks to list
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        env = "ORCH_QUEUE_RECENT"
    )]
    pub recent: i64,
}

#[derive(Debug, Args)]
pub struct EventArgs {
    /// The X-Plane-Delivery header
    #[arg(long, value_name = "ID", env = "ORCH_PLANE_DELIVERY")]
    pub delivery: Option<String>,
    /// The X-Plane-Event header
    #[arg(long, value_name = "NAME", env = "ORCH_PLANE_EVENT")]
    pub event: Option<String>,
    /// The X-Plane-Signature header (hex HMAC-SHA256 of the body)
    #[arg(long, value_name = "HEX", env = "ORCH_PLANE_SIGNATURE")]
    pub signature: Option<String>,
}

/// The clap command, for man pages, completions and the CLI self-check.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        super::command().debug_assert();
    }
}
