//! The command line (SPEC §11): clap types only. They also feed the man pages and the
//! shell completions (`cargo run --example generate-docs`), so every help text here is user
//! documentation. Parsing goes through [`try_parse`] / [`command`], which add what every
//! command shares (exit codes under the help, environment values never shown, strict
//! switch variables). Names the command line takes (agents, stages) are checked here, by
//! the value parsers [`agent_name`], [`stage_name`] and [`live_stage_name`], so a typo is
//! a usage error listing the valid names and the shell completions offer them.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, ArgGroup, Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::{self, Environment};
use crate::pipeline;

/// The exit codes of SPEC §9, as `(code, meaning)`: shown by `--help` and the man pages
/// (a test keeps README's table equal to this list).
pub const EXIT_CODES: [(u8, &str); 8] = [
    (0, "ok (idempotent no-ops included)"),
    (1, "failure"),
    (2, "usage error"),
    (3, "nothing to claim"),
    (65, "bad input data (invalid name, malformed event)"),
    (
        75,
        "temporary: database busy past the timeout, merge lease held - safe to retry",
    ),
    (77, "webhook signature missing or wrong"),
    (
        78,
        "bad configuration, or a database newer than this binary",
    ),
];

/// The exit code list as it appears under `orchctl --help`.
pub fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (code, meaning) in EXIT_CODES {
        s.push_str(&format!("  {code:<3} {meaning}\n"));
    }
    s.push_str(
        "\nEvery flag can also be set by the ORCH_* variable shown with it. The configuration\n\
         variables (ORCH_REPOS_DIR, ORCH_GITEA_URL, ORCH_PLANE_URL, ...) are listed in\n\
         README.md and in the example environment file scripts/orchctl.env.",
    );
    s
}

/// Shown under every subcommand's help: the full list lives under `orchctl --help`.
const SUB_AFTER_HELP: &str = "Exit codes: 0 ok, 1 failure, 2 usage, 3 nothing to claim, \
65 bad input, 75 temporary (retry), 77 bad signature, 78 bad configuration \
(details: orchctl --help).";

/// State keeper and control tool of an AI-agent delivery pipeline.
///
/// Work items live in Plane, code in Gitea, agents (analyst, developer, reviewer,
/// deployer) run as OS processes, and all state is one SQLite file. Every command opens the
/// file, does one transaction-shaped piece of work, prints its result (text on a terminal,
/// JSON otherwise) and exits. Cron runs `reap` and `reconcile`; a webhook shim pipes Plane
/// deliveries into `event`; operators type `orchctl stop ORCH-310`.
#[derive(Debug, Parser)]
#[command(
    name = "orchctl",
    version,
    about,
    long_about,
    after_help = exit_codes_help(),
    arg_required_else_help = true
)]
pub struct Cli {
    /// The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]
    #[arg(long, global = true, env = "ORCH_DB_PATH", value_name = "PATH")]
    pub db: Option<PathBuf>,

    /// A PostgreSQL database shared by several agent hosts, instead of the SQLite file
    /// (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the
    /// password in ORCH_DB_PASSWORD: a command line is visible to every user
    #[arg(
        long,
        global = true,
        env = "ORCH_DB_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub db_url: Option<String>,

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
    ///
    /// Migrations are additive and idempotent; a database written by a newer orchctl is
    /// refused untouched (exit 78).
    Migrate,

    /// Create, inspect and list tasks without Plane
    #[command(subcommand)]
    Task(TaskCommand),

    /// Stop a task: kill its agents, cancel its jobs, remove its worktree and branch
    ///
    /// Stops every running agent of the task (SIGTERM to its process group, SIGKILL after
    /// ORCH_STOP_GRACE_SECS; only a process whose start time matches the recorded one),
    /// cancels its queued and running jobs, removes the branch's worktree and deletes the
    /// remote branch, then notifies (Plane comment, ORCH_NOTIFY_CMD). The task row, the
    /// main clone and its docs/work-items/<ID>/ are kept; the task's keys are freed so a
    /// fresh pipeline can start for the same Plane issue; the task is never revived.
    ///
    /// Inside a merge/deploy window (deploy-begin ran, or the task's branch holds the merge
    /// lease while one of its jobs runs) the stop is deferred: queued jobs are cancelled
    /// now and finalize-deploy (or reconcile, once the window closes) applies the rest.
    /// --force skips that check. A missing or finished task is a no-op (exit 0).
    Stop(StopArgs),

    /// Take the oldest eligible queued job and start a run of it (exit 3: none)
    ///
    /// Eligible: the task is live with no stop requested, its dependencies are done
    /// (ORCH_TASK_DEPS) and, for the deployer under the serial gate (ORCH_SERIAL_GATE),
    /// the repo's merge lease is free or already the task's. Concurrent claimers never
    /// get the same job. With --exec the agent is started as dispatch starts it: under a
    /// supervisor leading a session of its own (its pid is the one recorded), with
    /// ORCH_JOB_ID, ORCH_RUN_ID, ORCH_TASK_ID, ORCH_WORK_ITEM, ORCH_REPO, ORCH_BRANCH,
    /// ORCH_AGENT, ORCH_WORKTREE and ORCH_DB_PATH set and its output in
    /// $ORCH_LOG_DIR/job-<id>-run-<run>.log; its exit status is the run's outcome unless it
    /// calls complete first. With a clone at $ORCH_REPOS_DIR/<repo>, developers, reviewers
    /// and deployers work in the task's worktree; without one, in the current folder.
    Claim(ClaimArgs),

    /// Launch agents into free slots: reap, then claim and start jobs (run it from a timer)
    ///
    /// Runs the reap pass, then, while an agent with a command (ORCH_AGENT_CMD_<AGENT>) has
    /// a free slot (ORCH_AGENT_SLOTS_<AGENT>, default 1; ORCH_MAX_AGENTS in all, default
    /// 4), claims its oldest eligible job and launches it as claim --exec does: under a
    /// supervisor that records the agent's exit status as the run's outcome and then
    /// dispatches again. Developers, reviewers and deployers (ORCH_WORKTREE_AGENTS) work in
    /// $ORCH_WORKTREES_DIR/<repo>/<work item>, prepared first; the others in the clone.
    /// Prints what it launched, reap's counts, the slots and the jobs left waiting; exit 0
    /// also when nothing was launched. An agent without a command is never launched.
    Dispatch(DispatchArgs),

    /// Record the outcome of a run
    ///
    /// Only the named run counts: a stale run id or a finished job changes nothing (note
    /// stale-run). Success advances the pipeline; failure requeues the job while attempts
    /// remain, else marks it failed.
    Complete(CompleteArgs),

    /// Recover running jobs whose agent died (run it from cron)
    ///
    /// A running job whose process is dead, missing or recycled is requeued while attempts
    /// remain, else failed; a job of a stopped or finished task is cancelled. A job without
    /// a pid is judged by age (ORCH_CLAIM_TIMEOUT_SECS). Cancelled jobs are never revived.
    Reap(ReapArgs),

    /// Cron safety net: deferred stops, orphaned leases, outbox retries, missed Plane STOPs
    ///
    /// Applies deferred stops whose window has closed, releases merge leases held by
    /// finished or missing tasks, retries pending side effects with backoff and, with
    /// Plane configured, applies STOPs whose webhook was missed. One failing task never
    /// aborts the pass.
    Reconcile,

    /// Open the critical deploy window: take the merge lease, mark the deploy initiated
    ///
    /// Call it right before the irreversible merge/deploy step. Only a live task in deploy
    /// with no STOP pending may open its window (exit 1 otherwise, nothing changed); a
    /// repeat by the task whose window is open is a no-op (note already-initiated). Exit
    /// 75 when another branch holds the repo's merge lease.
    DeployBegin(TaskRef),

    /// Close the deploy window and apply a deferred stop, or finish the task
    ///
    /// Needs a deploy in progress (deploy-begin ran, or a deployer job of the task is
    /// running): otherwise exit 1 (no deploy in progress), nothing changed. Clears the
    /// marker, releases the task's merge lease and marks the running deployer job; then a
    /// pending STOP is applied (note cancelled, or cancelled-after-deploy when the deploy
    /// succeeded), else success finishes the task and failure leaves it in deploy.
    FinalizeDeploy(FinalizeArgs),

    /// A snapshot of queues, leases, dependencies, outbox and stops for dashboards
    ///
    /// Blocks: counts, serial_gate, task_deps, auto_labels, recent, outbox, stop, awaiting
    /// (tasks waiting on people: approval, deploy_confirmation, failed,
    /// blocked_by_cancelled). A block that cannot be read shows its minimal form with an
    /// `error`; the command still prints and exits 0.
    Queue(QueueArgs),

    /// Handle one Plane webhook delivery read from stdin
    ///
    /// The body is read raw (at most 1 MiB); with ORCH_PLANE_WEBHOOK_SECRET set the
    /// signature is required and checked (exit 77). See docs/plane-webhook.md.
    Event(EventArgs),

    /// Approve a task parked in analysis (Plane's Approved): on to development
    ///
    /// The task moves to development and a developer job is queued. Exit 1, nothing
    /// changed, unless the task is in analysis with no job queued or running and no STOP
    /// pending. Recorded in the task log (source cli) and, when the task has a Plane issue
    /// and Plane is configured, as a comment on it.
    Approve(TaskRef),

    /// Reject a task's work (Plane's Rejected): analysis again, or back to development
    ///
    /// In analysis a new analyst job is queued; in review, or parked in deploy awaiting
    /// Confirm Deploy (a queued deployer is withdrawn, the merge lease freed), the task
    /// goes back to development with a developer job. Exit 1, nothing changed, in any
    /// other stage, with a job of the stage queued or running, during a deploy window or
    /// with a STOP pending.
    Reject(RejectArgs),

    /// Confirm the deploy of a task parked in deploy (Plane's Confirm Deploy)
    ///
    /// Queues the deployer job (it needs the repo's merge lease when claimed). Exit 1,
    /// nothing changed, unless the task is in deploy with no job queued or running, no
    /// deploy window open and no STOP pending.
    ConfirmDeploy(TaskRef),

    /// Run a stuck stage's failed job once more
    ///
    /// For a live task whose current stage's last job failed and that has no job queued
    /// or running: a new job for the stage's agent (note requeued). Exit 1, nothing
    /// changed, otherwise.
    Retry(TaskRef),

    /// Prometheus metrics: jobs, tasks, side effects, leases, waits, queue age, agents
    ///
    /// Prints the text exposition format (0.0.4) whatever --format says: orchctl_jobs,
    /// orchctl_tasks, orchctl_outbox_effects, orchctl_merge_leases_held,
    /// orchctl_awaiting_tasks, orchctl_oldest_queued_job_age_seconds and
    /// orchctl_agents_running, all gauges. With --textfile DIR it writes DIR/orchctl.prom
    /// atomically for node_exporter's textfile collector and prints nothing.
    Metrics(MetricsArgs),

    /// Housekeeping: delete old delivery hashes, done side effects and agent logs (daily)
    ///
    /// Deletes the hashes of Plane deliveries handled more than 7 days ago, the done
    /// side effects of tasks finished or cancelled more than DAYS ago, and the agent logs
    /// ($ORCH_LOG_DIR/job-<id>-run-<run>.log) of runs that ended more than DAYS ago.
    /// Never deletes a task, a job or an audit row. Prints the counts.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct RejectArgs {
    /// Task id, work item id (ORCH-310) or Plane issue id
    #[arg(value_name = "TASK")]
    pub task: String,
    /// Why (recorded in the task log and the Plane comment)
    #[arg(long, value_name = "TEXT", env = "ORCH_REJECT_REASON")]
    pub reason: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a task and queue the first job of its stage
    ///
    /// Prints {"task": ..., "job": ...}. A task added in deploy parks awaiting Confirm
    /// Deploy without a job.
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
    #[arg(long, value_name = "R", env = "ORCH_TASK_REPO")]
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
    #[arg(long, value_name = "B", env = "ORCH_TASK_BRANCH")]
    pub branch: Option<String>,
    /// Title
    #[arg(long, value_name = "T", env = "ORCH_TASK_TITLE")]
    pub title: Option<String>,
    /// Stage to start in
    #[arg(
        long,
        value_name = "S",
        default_value = "analysis",
        env = "ORCH_TASK_STAGE",
        value_parser = live_stage_name()
    )]
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
    #[arg(long, value_name = "S", env = "ORCH_LIST_STAGE", value_parser = stage_name())]
    pub stage: Option<String>,
    /// Only tasks of this repo
    #[arg(long, value_name = "R", env = "ORCH_LIST_REPO")]
    pub repo: Option<String>,
    /// At most this many tasks
    #[arg(long, value_name = "N", default_value_t = 100, env = "ORCH_LIST_LIMIT")]
    pub limit: i64,
}

// Switches take their variable too (SPEC §9: every flag has one), read strictly like every
// boolean (config::parse_bool): 1/0, true/false, on/off, yes/no in any case, empty = off,
// anything else is exit 78 before anything is touched — a typo of "off" must never force a
// STOP through a deploy window. [`command`] gives every switch with a variable that reading
// (so a new switch needs nothing more than `env = "ORCH_..."`), and [`try_parse_from`] checks
// every switch variable before the command line is parsed. They act on one invocation:
// never put them in a shared environment file.
//
// Three switches have none, on purpose: --success/--failure are one required choice and
// --exec needs the command after `--`. clap counts a variable set to "0" as the switch
// being given, so ORCH_COMPLETE_FAILURE=0 would turn `complete --success` into a usage
// error; and none of them is configuration that an environment file could carry.

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Task id, work item id (ORCH-310) or Plane issue id
    #[arg(value_name = "TASK")]
    pub task: String,
    /// Why (recorded in the task and its log)
    #[arg(long, value_name = "TEXT", env = "ORCH_STOP_REASON")]
    pub reason: Option<String>,
    /// Skip the critical-window check: reset even during a deploy
    #[arg(long, env = "ORCH_STOP_FORCE")]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ClaimArgs {
    /// Only jobs of this agent (repeatable)
    #[arg(
        long = "agent",
        value_name = "A",
        env = "ORCH_CLAIM_AGENTS",
        value_delimiter = ',',
        value_parser = agent_name()
    )]
    pub agents: Vec<String>,
    /// Only jobs of this repo
    #[arg(long, value_name = "R", env = "ORCH_CLAIM_REPO")]
    pub repo: Option<String>,
    /// Launch the agent: the command after `--`, under a supervisor in its own session
    #[arg(long, requires = "command")]
    pub exec: bool,
    /// The agent command and its arguments (after `--`)
    #[arg(last = true, value_name = "CMD", requires = "exec")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// Only jobs of this agent (repeatable)
    #[arg(
        long = "agent",
        value_name = "A",
        env = "ORCH_DISPATCH_AGENTS",
        value_delimiter = ',',
        value_parser = agent_name()
    )]
    pub agents: Vec<String>,
    /// Only jobs of this repo
    #[arg(long, value_name = "R", env = "ORCH_DISPATCH_REPO")]
    pub repo: Option<String>,
    /// Show what would be launched, change nothing
    #[arg(long, env = "ORCH_DISPATCH_DRY_RUN")]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("outcome").required(true).args(["success", "failure"])))]
pub struct CompleteArgs {
    /// Job id (an agent started with --exec has it in ORCH_JOB_ID)
    #[arg(value_name = "JOB", env = "ORCH_JOB_ID")]
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
    #[arg(long, env = "ORCH_REAP_DRY_RUN")]
    pub dry_run: bool,
    /// Boot-time recovery: every running job is dead (run once at boot, before agents)
    #[arg(long, env = "ORCH_REAP_RECOVER")]
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
    /// How many recent jobs, cancelled tasks and waiting tasks of each kind to list (at
    /// most 1000; blocked tasks and side effects: at least 20)
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

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Write DIR/orchctl.prom (temporary file + rename) instead of printing
    #[arg(long, value_name = "DIR", env = "ORCH_METRICS_TEXTFILE")]
    pub textfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Keep side effects and logs of the last DAYS days
    #[arg(
        long,
        value_name = "DAYS",
        default_value_t = 90,
        env = "ORCH_PRUNE_OLDER_THAN",
        value_parser = clap::value_parser!(u32).range(0..=36_500)
    )]
    pub older_than: u32,
    /// Count what would be deleted, delete nothing
    #[arg(long, env = "ORCH_PRUNE_DRY_RUN")]
    pub dry_run: bool,
}

/// The agent names (`analyst`, `developer`, `reviewer`, `deployer`), in pipeline order.
pub fn agent_names() -> Vec<&'static str> {
    pipeline::LIVE_STAGES
        .iter()
        .filter_map(|s| pipeline::agent_for_stage(s))
        .collect()
}

/// The value parser of an `--agent` argument: one of [`agent_names`] (exit 2 otherwise,
/// listing them; completions offer them). `value_parser = agent_name()` on the argument.
pub fn agent_name() -> PossibleValuesParser {
    PossibleValuesParser::new(agent_names())
}

/// The value parser of a stage filter: any of the six stages.
pub fn stage_name() -> PossibleValuesParser {
    PossibleValuesParser::new(pipeline::STAGES)
}

/// The value parser of a stage a task can be put in: the four live ones.
pub fn live_stage_name() -> PossibleValuesParser {
    PossibleValuesParser::new(pipeline::LIVE_STAGES)
}

/// Whether `a` is a switch bound to a variable (its value read by [`Switch`]).
fn is_switch_variable(a: &clap::Arg) -> bool {
    matches!(a.get_action(), ArgAction::SetTrue) && a.get_env().is_some()
}

/// The strict reading of a switch variable. A switch on the command line arrives as
/// `true`, an absent one as `false`; anything else came from its variable.
#[derive(Clone, Copy, Debug)]
pub struct Switch;

impl TypedValueParser for Switch {
    type Value = bool;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<bool, clap::Error> {
        let name = arg
            .and_then(clap::Arg::get_env)
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| "the switch".into());
        let invalid = |message: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{message}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid(format!("{name} is not valid UTF-8")))?;
        if config::is_blank(text) {
            return Ok(false);
        }
        config::parse_bool(&name, text).map_err(|e| invalid(e.to_string()))
    }
}

/// Exit 78 for the first switch variable in `env` that is not a boolean, checking every
/// switch of every command (a typo in any of them is refused, whatever the command).
pub fn check_switch_variables(env: &Environment) -> anyhow::Result<()> {
    check_switches_of(&command(), env)
}

fn check_switches_of(cmd: &clap::Command, env: &Environment) -> anyhow::Result<()> {
    for a in cmd.get_arguments().filter(|a| is_switch_variable(a)) {
        if let Some(name) = a.get_env().and_then(OsStr::to_str) {
            env.boolean(name, false)?;
        }
    }
    cmd.get_subcommands()
        .try_for_each(|s| check_switches_of(s, env))
}

/// The clap command, for parsing, man pages, completions and the CLI self-check.
///
/// On top of the derive: every subcommand shows the exit codes under its help, no help
/// shows the current value of an environment variable (help, man pages and completions
/// must not depend on who runs them, and a value can be sensitive), and every switch with
/// a variable reads it strictly ([`Switch`]).
pub fn command() -> clap::Command {
    fn finish(cmd: clap::Command, top: bool) -> clap::Command {
        let mut cmd = cmd.mut_args(|a| {
            let a = a.hide_env_values(true);
            if is_switch_variable(&a) {
                a.value_parser(Switch)
            } else {
                a
            }
        });
        if !top {
            cmd = cmd.after_help(SUB_AFTER_HELP);
        }
        let subs: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        for name in subs {
            cmd = cmd.mut_subcommand(name, |s| finish(s, false));
        }
        cmd
    }
    finish(<Cli as clap::CommandFactory>::command(), true)
}

/// Unbinds every flag whose variable is set but empty (or blank): an environment file's
/// `ORCH_DB_PATH=` means "the default", as an empty configuration variable does
/// (config.rs), instead of an empty value that fails to parse. Only for parsing: help, man
/// pages and completions must not depend on the environment.
fn ignore_empty_env(cmd: clap::Command, env: &Environment) -> clap::Command {
    let mut cmd = cmd.mut_args(|a| {
        let empty = a
            .get_env()
            .and_then(OsStr::to_str)
            .is_some_and(|name| env.get(name).is_some_and(config::is_blank));
        if empty {
            a.env(None::<&str>)
        } else {
            a
        }
    });
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(name, |s| ignore_empty_env(s, env));
    }
    cmd
}

/// Why the command line gave no [`Cli`].
#[derive(Debug)]
pub enum ParseError {
    /// A usage error, `--help` or `--version`: clap's to print (exit 2, or 0 for help).
    Usage(clap::Error),
    /// A switch variable that is no boolean (exit 78, see [`check_switch_variables`]).
    Config(anyhow::Error),
}

/// Parses `args` (the program name first) with [`command`]. `env` is the captured
/// environment (see [`Environment`]): every switch variable is checked in it first, so a
/// bad one is exit 78 naming it before anything else happens; clap then reads the flags'
/// variables itself, and finds them valid.
pub fn try_parse_from<I, T>(args: I, env: &Environment) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cmd = command();
    check_switches_of(&cmd, env).map_err(ParseError::Config)?;
    let mut cmd = ignore_empty_env(cmd, env);
    let matches = cmd
        .try_get_matches_from_mut(args)
        .map_err(ParseError::Usage)?;
    Cli::from_arg_matches(&matches).map_err(|e| ParseError::Usage(e.format(&mut cmd)))
}

/// Parses the process arguments.
pub fn try_parse(env: &Environment) -> Result<Cli, ParseError> {
    try_parse_from(std::env::args_os(), env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        command().debug_assert();
    }

    fn all(cmd: &clap::Command) -> Vec<clap::Command> {
        let mut out = vec![cmd.clone()];
        for s in cmd.get_subcommands() {
            out.extend(all(s));
        }
        out
    }

    #[test]
    fn switch_variables_are_read_strictly() {
        let cmd = command();
        let arg = clap::Arg::new("force")
            .long("force")
            .action(ArgAction::SetTrue)
            .env("ORCH_STOP_FORCE");
        let parse = |v: &str| Switch.parse_ref(&cmd, Some(&arg), OsStr::new(v));
        for (v, want) in [
            ("true", true),
            ("false", false),
            ("off", false),
            ("YES", true),
            ("", false),
        ] {
            assert_eq!(parse(v).unwrap(), want, "{v:?}");
        }
        for v in ["maybe", "n", "f", "2", "off\u{a0}"] {
            let e = parse(v).unwrap_err();
            assert!(e.to_string().contains("ORCH_STOP_FORCE="), "{e}");
        }
        let env = |k: &str, v: &str| Environment::from_pairs([(k, v)]);
        for var in ["ORCH_STOP_FORCE", "ORCH_REAP_DRY_RUN", "ORCH_REAP_RECOVER"] {
            let err = check_switch_variables(&env(var, "maybe")).unwrap_err();
            assert_eq!(
                crate::error::exit_kind(&err),
                crate::error::ExitKind::Config,
                "{var}"
            );
            assert!(err.to_string().contains(var), "{err}");
            check_switch_variables(&env(var, "off")).unwrap();
            check_switch_variables(&env(var, "")).unwrap();
        }
        // Only switch variables are booleans.
        check_switch_variables(&env("ORCH_STOP_REASON", "maybe")).unwrap();
    }

    /// The switches that deliberately have no variable (see the comment above StopArgs).
    const NO_VARIABLE: [&str; 3] = ["success", "failure", "exec"];

    /// SPEC §9: every flag has an ORCH_* variable, and help never prints its value.
    #[test]
    fn every_flag_has_an_orch_variable() {
        let mut cmd = command();
        cmd.build();
        for c in all(&cmd) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.get_long().is_none() {
                    continue;
                }
                if NO_VARIABLE.contains(&id) {
                    assert!(a.get_env().is_none(), "--{id}");
                    continue;
                }
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("ORCH_")),
                    "{} --{}: no ORCH_* variable",
                    c.get_name(),
                    a.get_long().unwrap()
                );
                assert!(a.is_hide_env_values_set(), "{} --{id}", c.get_name());
            }
        }
    }
}
