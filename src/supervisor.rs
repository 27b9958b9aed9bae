//! The supervisor of a run (SPEC §13): the small orchctl process that every launch —
//! `dispatch` and `claim --exec` alike — starts as the leader of the run's new session and
//! process group, and whose pid and start time are what the job records.
//!
//! It waits at the launch gate (its stdin) until the launcher has recorded the run: the
//! launcher writes one byte after its commit, so a launcher that dies first (SIGKILL,
//! power loss) leaves a supervisor that reads end-of-file and exits without starting the
//! agent — no agent ever runs unrecorded. Then it prepares the agent's working directory
//! (the task's worktree or the clone, [`crate::worktree`]), starts the agent in its own
//! group with the scrubbed environment plus the run's variables, and copies the agent's
//! output into the run's log, at most `ORCH_LOG_MAX_BYTES`, then one truncation line.
//! When the agent exits it ends what is left of the group, records the exit status as the
//! run's outcome through `complete`'s own guarded code ([`jobs::complete`]: a run the agent
//! reported, or that a STOP cancelled, stays as it is), and runs one dispatch pass so the
//! next stage starts at once. A SIGTERM (a STOP signals the whole group) makes it record
//! nothing and start nothing more.
//!
//! It holds no database connection while the agent runs, makes itself non-dumpable (its
//! environment holds orchctl's tokens, and the agent runs as the same user: without this
//! the agent could read them in `/proc/<supervisor>/environ`) and a child subreaper (the
//! orphans of the agent's children are its to reap).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Environment};
use crate::integrations::process;
use crate::jobs::{self, CompleteNote, RunOutcome};
use crate::worktree::{self, Place};
use crate::{dispatch, Ctx};

/// The first argument that makes `orchctl` a supervisor (never shown to people: the
/// launcher execs it with the run's [`RunSpec`] as the second argument).
pub const ARG: &str = "__supervise";

/// Everything the supervisor needs to know about its run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSpec {
    /// The SQLite database, absolute; `None` on PostgreSQL, whose URL the supervisor gets
    /// in its environment (`ORCH_DB_URL`: it may hold a password, never an argument).
    pub db: Option<PathBuf>,
    pub job_id: i64,
    pub run_id: i64,
    pub task_id: Option<i64>,
    pub agent: String,
    pub repo: String,
    pub work_item: Option<String>,
    pub branch: Option<String>,
    pub place: Place,
    pub log: PathBuf,
}

impl RunSpec {
    /// The variables the agent gets on top of the scrubbed environment (SPEC §5, §13).
    fn agent_env(&self, dir: Option<&std::path::Path>) -> Vec<(String, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        vec![
            ("ORCH_JOB_ID".into(), self.job_id.to_string()),
            ("ORCH_RUN_ID".into(), self.run_id.to_string()),
            (
                "ORCH_TASK_ID".into(),
                self.task_id.map(|t| t.to_string()).unwrap_or_default(),
            ),
            ("ORCH_WORK_ITEM".into(), opt(&self.work_item)),
            ("ORCH_REPO".into(), self.repo.clone()),
            ("ORCH_BRANCH".into(), opt(&self.branch)),
            ("ORCH_AGENT".into(), self.agent.clone()),
            (
                "ORCH_DB_PATH".into(),
                self.db
                    .as_ref()
                    .map(|d| d.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            (
                "ORCH_WORKTREE".into(),
                dir.map(|d| d.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ]
    }
}

/// The arguments the launcher execs the supervisor with.
pub fn command_line(spec: &RunSpec, argv: &[String]) -> Result<Vec<OsString>> {
    let mut args: Vec<OsString> =
        vec![ARG.into(), serde_json::to_string(spec)?.into(), "--".into()];
    args.extend(argv.iter().map(OsString::from));
    Ok(args)
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: nix::libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

fn terminated() -> bool {
    TERMINATED.load(Ordering::SeqCst)
}

/// The run's log: every byte the run writes (the agent's output and the supervisor's own
/// lines) counts against `ORCH_LOG_MAX_BYTES`; past it one truncation line, then nothing.
struct CappedLog {
    file: File,
    written: u64,
    cap: u64,
    truncated: bool,
}

impl CappedLog {
    fn write(&mut self, buf: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.cap.saturating_sub(self.written);
        if (buf.len() as u64) <= room {
            let _ = self.file.write_all(buf);
            self.written += buf.len() as u64;
            return;
        }
        let _ = self.file.write_all(&buf[..room as usize]);
        self.written += room;
        self.truncated = true;
        let _ = self.file.write_all(
            format!(
                "\norchctl: this run's log reached ORCH_LOG_MAX_BYTES ({} bytes); the rest of its output was dropped\n",
                self.cap
            )
            .as_bytes(),
        );
    }
}

type Log = Arc<Mutex<CappedLog>>;

fn say(log: &Log, line: &str) {
    if let Ok(mut l) = log.lock() {
        l.write(format!("orchctl: {line}\n").as_bytes());
    }
}

/// `orchctl __supervise SPEC -- CMD ARGS...`; `args` are the arguments after the program
/// name. Returns the process's exit code (nobody waits for it; it is for people reading
/// `ps` or a core file).
pub fn main(args: &[OsString]) -> u8 {
    // First: before anything else can read them, the tokens in this process's
    // environment are out of the agent's reach.
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::sys::prctl::set_child_subreaper(true);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let _ = nix::sys::signal::sigaction(
            nix::sys::signal::Signal::SIGTERM,
            &nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::Handler(on_sigterm),
                nix::sys::signal::SaFlags::SA_RESTART,
                nix::sys::signal::SigSet::empty(),
            ),
        );
    }
    let log_file = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from);
    let Ok(log_file) = log_file else { return 1 };
    let (spec, argv) = match parse(args) {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(&log_file, "orchctl: supervisor: {e:#}");
            return 2;
        }
    };
    // The gate: one byte once the launcher has recorded this run; end-of-file if it died.
    let mut gate = [0u8; 1];
    let opened = matches!(std::io::stdin().lock().read(&mut gate), Ok(1) if gate[0] == b'g');
    if !opened {
        let _ = writeln!(
            &log_file,
            "orchctl: the launcher did not record run {} of job {}: its agent was not started",
            spec.run_id, spec.job_id
        );
        return 0;
    }
    let environment = Environment::capture();
    let config = match environment.and_then(|e| Config::from_environment(&e)) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(&log_file, "orchctl: supervisor: {e:#}");
            return 78;
        }
    };
    let log: Log = Arc::new(Mutex::new(CappedLog {
        file: log_file,
        written: 0,
        cap: config.log_max_bytes,
        truncated: false,
    }));
    supervise(&spec, &argv, &config, &log)
}

fn parse(args: &[OsString]) -> Result<(RunSpec, Vec<String>)> {
    let text = args
        .get(1)
        .and_then(|a| a.to_str())
        .context("no run given")?;
    let spec: RunSpec = serde_json::from_str(text).context("reading the run")?;
    anyhow::ensure!(
        args.get(2).is_some_and(|a| a == "--"),
        "no `--` before the agent command"
    );
    let argv = args[3..]
        .iter()
        .map(|a| {
            a.to_str()
                .map(String::from)
                .context("an agent argument is not UTF-8")
        })
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!argv.is_empty(), "no agent command");
    Ok((spec, argv))
}

fn supervise(spec: &RunSpec, argv: &[String], config: &Config, log: &Log) -> u8 {
    if terminated() {
        return 0;
    }
    let dir = match worktree::prepare(
        config,
        &spec.place,
        &spec.repo,
        spec.work_item.as_deref(),
        spec.branch.as_deref(),
    ) {
        Ok(d) => d,
        Err(why) => {
            let why = config.scrub(&why);
            say(log, &format!("worktree: {why}"));
            // No dispatch pass after a failed preparation: the next timer tick retries,
            // rather than spending the job's attempts on a broken clone within a second.
            record(
                spec,
                config,
                log,
                &RunOutcome::Failure(Some(format!("worktree: {why}"))),
            );
            return 1;
        }
    };
    if terminated() {
        return 0;
    }
    let (reader, writer) = match process::pipe() {
        Ok(p) => p,
        Err(e) => {
            say(log, &format!("creating the agent's output pipe: {e}"));
            return 1;
        }
    };
    let mut child = match process::spawn_agent(
        argv,
        &spec.agent_env(dir.as_deref()),
        dir.as_deref(),
        writer,
    ) {
        Ok(c) => c,
        Err(e) => {
            let why = config.scrub(&format!("the agent command could not be started: {e:#}"));
            say(log, &why);
            record(spec, config, log, &RunOutcome::Failure(Some(why)));
            return 1;
        }
    };
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let copier_log = Arc::clone(log);
    std::thread::spawn(move || {
        let mut reader = File::from(reader);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Ok(mut l) = copier_log.lock() {
                        l.write(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = done_tx.send(());
    });
    if terminated() {
        // The STOP came while the agent was being started: it was not in the group yet.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let status = loop {
        match child.wait() {
            Ok(s) => break Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break None,
        }
    };
    // A run ends when its command exits: what it left in the group goes with it, before
    // the outcome lets the next stage start in the same worktree.
    process::kill_own_group_members(Duration::from_secs(5));
    // The agent's last output, unless something that left the group still holds the pipe.
    let _ = done_rx.recv_timeout(Duration::from_millis(200));
    if terminated() {
        return 0;
    }
    let outcome = match status {
        Some(s) => outcome_of(s),
        None => RunOutcome::Failure(Some("the agent's exit status could not be read".into())),
    };
    let ctx = record(spec, config, log, &outcome);
    process::reap_children();
    if let (Some(ctx), false) = (ctx, config.agent_cmds.is_empty()) {
        if !terminated() {
            match dispatch::dispatch(&ctx, &dispatch::DispatchRequest::default()) {
                Ok(d) => {
                    for l in &d.launched {
                        say(
                            log,
                            &format!(
                                "dispatch: launched job {} run {} ({})",
                                l.id, l.run_id, l.agent
                            ),
                        );
                    }
                }
                Err(e) => say(
                    log,
                    &format!("dispatch: {}", config.scrub(&format!("{e:#}"))),
                ),
            }
        }
    }
    0
}

/// The outcome an exit status stands for: 0 is success; anything else a failure saying
/// how the agent ended.
pub fn outcome_of(status: std::process::ExitStatus) -> RunOutcome {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return RunOutcome::Success;
    }
    let why = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "ended without an exit status".into(),
    };
    RunOutcome::Failure(Some(why))
}

/// Records `outcome` as the run's through `complete` (its guards: a run that is no longer
/// running is left as it is). Returns the open database for the dispatch pass.
fn record(spec: &RunSpec, config: &Config, log: &Log, outcome: &RunOutcome) -> Option<Ctx> {
    let target = match &spec.db {
        Some(path) => Ok(crate::DbTarget::Sqlite(path.clone())),
        None => std::env::var("ORCH_DB_URL")
            .map(crate::DbTarget::Postgres)
            .map_err(|_| anyhow::anyhow!("ORCH_DB_URL is not in the supervisor's environment")),
    };
    let ctx = match target.and_then(|t| Ctx::open_target(&t, config.clone())) {
        Ok(c) => c,
        Err(e) => {
            say(
                log,
                &format!("opening the database: {}", config.scrub(&format!("{e:#}"))),
            );
            return None;
        }
    };
    let what = match outcome {
        RunOutcome::Success => "success".to_string(),
        RunOutcome::Failure(e) => e.clone().unwrap_or_default(),
    };
    match jobs::complete(&ctx, spec.job_id, spec.run_id, outcome) {
        Ok(r) if r.note == CompleteNote::StaleRun => say(
            log,
            &format!(
                "the agent ended ({what}); run {} was no longer running: nothing recorded",
                spec.run_id
            ),
        ),
        Ok(r) => say(
            log,
            &format!(
                "the agent ended ({what}); run {} recorded: {}",
                spec.run_id,
                serde_json::to_value(r.note)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        ),
        Err(e) => say(
            log,
            &format!(
                "recording run {}: {}",
                spec.run_id,
                config.scrub(&format!("{e:#}"))
            ),
        ),
    }
    Some(ctx)
}
