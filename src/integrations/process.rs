//! OS processes: identity, stopping a process group, launching an agent, running a child
//! with a time limit (SPEC §5 "Stopping a process").
//!
//! A process's identity is its pid *and* its start time (field 22 of `/proc/<pid>/stat`,
//! clock ticks since boot): a pid alone may have been recycled. This module never signals
//! a process whose start time does not match the recorded one, never pid ≤ 1, and never
//! its own process group. A zombie counts as gone: it can no longer do anything, and on
//! machines whose init does not reap orphans it would otherwise look alive forever.
//! nix is kept behind this module; "already exited" (ESRCH) is success.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::config::SECRET_VARS;

/// The parts of `/proc/<pid>/stat` orchctl needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Field 22: start time in clock ticks since boot.
    pub start: i64,
}

impl ProcStat {
    /// A zombie or dead entry: the process has exited.
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state), so field N is rest[N - 3].
    Some(ProcStat {
        pid,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        session: rest.get(3)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

/// Reads the stat of `pid`; `None` when there is no such process.
pub fn stat(pid: i64) -> Option<ProcStat> {
    if pid <= 0 || pid > i32::MAX as i64 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The start time of a live process (None when gone or a zombie).
pub fn start_time(pid: i64) -> Option<i64> {
    stat(pid).filter(|s| !s.exited()).map(|s| s.start)
}

/// This process's identity, used to own outbox claims.
pub fn self_identity() -> (i64, i64) {
    let pid = std::process::id() as i64;
    (pid, stat(pid).map(|s| s.start).unwrap_or(0))
}

/// This machine's boot (`/proc/sys/kernel/random/boot_id`): a pid recorded in another boot
/// names nothing that still runs, whatever holds that number now.
pub fn boot_id() -> Option<String> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .clone()
}

/// Whether this process runs inside the session that `leader` leads: a run's agent (and
/// whatever it started without a session of its own) is inside its supervisor's.
pub fn inside_session_of(leader: i64) -> bool {
    nix::unistd::getsid(None).is_ok_and(|sid| sid.as_raw() as i64 == leader)
}

/// What is known about a recorded process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// The same process (pid and start time) is running.
    Alive,
    /// No such process, or it has exited.
    Gone,
    /// The pid now belongs to another process.
    Recycled,
    /// The pid is running but no start time was recorded to prove it is ours.
    Unverified,
}

pub fn liveness(pid: i64, recorded_start: Option<i64>) -> Liveness {
    match (start_time(pid), recorded_start) {
        (None, _) => Liveness::Gone,
        (Some(now), Some(rec)) if now == rec => Liveness::Alive,
        (Some(_), Some(_)) => Liveness::Recycled,
        (Some(_), None) => Liveness::Unverified,
    }
}

/// Every live (non-zombie) process, by scanning `/proc`.
fn live_processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .filter_map(stat)
        .filter(|s| !s.exited())
        .collect()
}

/// Whether any non-zombie member of process group `pgid` remains.
pub fn group_alive(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => false,
        // Members exist, but they may all be zombies waiting for a parent that never reaps.
        _ => live_processes().iter().any(|p| p.pgrp == pgid),
    }
}

/// Live descendants (pid, start time) of group `pgid`'s members that are in another group.
fn escaped_descendants(pgid: i32) -> Vec<(i32, i64)> {
    let procs = live_processes();
    let members: HashSet<i32> = procs
        .iter()
        .filter(|p| p.pgrp == pgid)
        .map(|p| p.pid)
        .collect();
    descendants(&procs, members)
        .into_iter()
        .filter(|(pid, _)| procs.iter().any(|p| p.pid == *pid && p.pgrp != pgid))
        .collect()
}

/// `roots` and every live descendant of theirs among `procs`, as (pid, start time).
fn descendants(procs: &[ProcStat], roots: HashSet<i32>) -> Vec<(i32, i64)> {
    let mut family = roots;
    // Parents before children is not guaranteed by /proc order: repeat until stable.
    loop {
        let before = family.len();
        for p in procs {
            if family.contains(&p.ppid) {
                family.insert(p.pid);
            }
        }
        if family.len() == before {
            break;
        }
    }
    procs
        .iter()
        .filter(|p| family.contains(&p.pid))
        .map(|p| (p.pid, p.start))
        .collect()
}

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StopOutcome {
    /// The group was running and is gone now.
    Stopped {
        signal: String,
        waited_ms: u64,
        /// Processes that had left the agent's group (its session's other groups, and its
        /// descendants that called setsid/setpgid): reported, never hunted.
        strays: Vec<i32>,
    },
    /// Nothing to stop: the process had already exited.
    NotRunning,
    /// The pid belongs to another process now; nothing was signalled.
    Recycled { found_start: i64 },
    /// No start time was recorded, so the pid cannot be proven ours; nothing was signalled.
    Unverified,
}

impl StopOutcome {
    pub fn stopped(&self) -> bool {
        matches!(self, StopOutcome::Stopped { .. })
    }
}

/// Why a stop could not be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopFailure {
    /// True when retrying cannot help (a refused pid, no permission).
    pub permanent: bool,
    pub message: String,
}

impl std::fmt::Display for StopFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn refuse(message: String) -> StopFailure {
    StopFailure {
        permanent: true,
        message,
    }
}

/// A stop that is waiting out an agent's grace period after SIGTERM.
#[derive(Debug, Clone, Copy)]
pub struct GraceWait {
    pub pid: i64,
    /// The whole grace period (ORCH_STOP_GRACE_SECS), SIGKILL at its end.
    pub grace: Duration,
}

/// How long an agent may take to exit on SIGTERM before the wait is reported.
const QUIET_WAIT: Duration = Duration::from_millis(300);

static WAIT_REPORTER: std::sync::OnceLock<fn(&GraceWait)> = std::sync::OnceLock::new();

/// Installs the function told when stopping an agent has to wait for it (an agent that
/// did not exit within a moment of SIGTERM). Only the binary installs one, to tell a person
/// at a terminal why `stop` is not returning; the library itself never prints. Like a
/// logger it is process-wide, so the report reaches it from inside the outbox without
/// every caller on the way passing it along. The first installation wins.
pub fn set_wait_reporter(report: fn(&GraceWait)) {
    let _ = WAIT_REPORTER.set(report);
}

/// Waits up to `grace` for `target` (the agent `pid`) to exit after SIGTERM, reporting the
/// wait (see [`set_wait_reporter`]) once it lasts longer than [`QUIET_WAIT`].
fn wait_out_grace(target: &Target, pid: i64, grace: Duration) -> bool {
    let started = Instant::now();
    if target.wait_exit(grace.min(QUIET_WAIT)) {
        return true;
    }
    let left = grace.saturating_sub(started.elapsed());
    if left.is_zero() {
        return false;
    }
    if let Some(report) = WAIT_REPORTER.get() {
        report(&GraceWait { pid, grace });
    }
    target.wait_exit(left)
}

/// Stops the agent `pid` whose recorded start time is `recorded_start`: SIGTERM, up to
/// `grace` for it to exit, then SIGKILL. When the verified pid leads its process group
/// (pid == pgid, as every agent orchctl launches does) the whole group is signalled and
/// waited for; otherwise only that process is — a group led by someone else (an outside
/// launcher's shell, say) is not the agent's to end.
pub fn stop_agent(
    pid: i64,
    recorded_start: Option<i64>,
    grace: Duration,
) -> Result<StopOutcome, StopFailure> {
    if pid <= 1 || pid > i32::MAX as i64 {
        return Err(refuse(format!("refusing to signal pid {pid}")));
    }
    let Some(found) = stat(pid).filter(|s| !s.exited()) else {
        return Ok(StopOutcome::NotRunning);
    };
    let Some(recorded) = recorded_start else {
        return Ok(StopOutcome::Unverified);
    };
    if found.start != recorded {
        return Ok(StopOutcome::Recycled {
            found_start: found.start,
        });
    }
    let pgid = found.pgrp;
    let own = nix::unistd::getpgrp().as_raw();
    if pgid <= 1 || pgid == own || pid == std::process::id() as i64 {
        return Err(refuse(format!(
            "refusing to signal process group {pgid} of pid {pid} (init's or orchctl's own)"
        )));
    }
    let target = if pgid as i64 == pid {
        Target::Group(pgid)
    } else {
        Target::Process(pid as i32, recorded)
    };
    let session = found.session;
    // Descendants that left the group (setsid, setpgid) — or, for a lone process, all of
    // its descendants — are noted before any signal: once their parent dies they are
    // re-parented and can no longer be told from strangers.
    let escaped = target.escaped_descendants();
    let started = Instant::now();
    let signal = |sig: Signal| -> Result<(), StopFailure> {
        match target.signal(sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(Errno::EPERM) => Err(refuse(format!("no permission to signal {target}"))),
            Err(e) => Err(StopFailure {
                permanent: false,
                message: format!("signalling {target}: {e}"),
            }),
        }
    };
    signal(Signal::SIGTERM)?;
    let mut used = "SIGTERM";
    if !wait_out_grace(&target, pid, grace) {
        signal(Signal::SIGKILL)?;
        used = "SIGKILL";
        if !target.wait_exit(Duration::from_secs(5)) {
            return Err(StopFailure {
                permanent: false,
                message: format!("{target} survived SIGKILL"),
            });
        }
    }
    let mut strays: Vec<i32> = live_processes()
        .iter()
        .filter(|p| {
            !target.contains(p)
                && ((matches!(target, Target::Group(_)) && p.session == session)
                    || escaped.iter().any(|e| e.0 == p.pid && e.1 == p.start))
        })
        .map(|p| p.pid)
        .collect();
    strays.sort_unstable();
    Ok(StopOutcome::Stopped {
        signal: used.into(),
        waited_ms: started.elapsed().as_millis() as u64,
        strays,
    })
}

/// What a stop signals: a whole process group, or one verified process (pid, start time).
#[derive(Debug, Clone, Copy)]
enum Target {
    Group(i32),
    Process(i32, i64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Group(g) => write!(f, "process group {g}"),
            Target::Process(p, _) => write!(f, "pid {p}"),
        }
    }
}

impl Target {
    fn signal(&self, sig: Signal) -> nix::Result<()> {
        match *self {
            Target::Group(g) => killpg(Pid::from_raw(g), sig),
            // The identity is checked again right before the signal: the pid must still be
            // the process that was verified.
            Target::Process(p, start) => match start_time(p as i64) {
                Some(now) if now == start => nix::sys::signal::kill(Pid::from_raw(p), sig),
                _ => Err(Errno::ESRCH),
            },
        }
    }

    fn alive(&self) -> bool {
        match *self {
            Target::Group(g) => group_alive(g),
            Target::Process(p, start) => start_time(p as i64) == Some(start),
        }
    }

    fn contains(&self, p: &ProcStat) -> bool {
        match *self {
            Target::Group(g) => p.pgrp == g,
            Target::Process(pid, start) => p.pid == pid && p.start == start,
        }
    }

    fn escaped_descendants(&self) -> Vec<(i32, i64)> {
        match *self {
            Target::Group(g) => escaped_descendants(g),
            Target::Process(pid, _) => descendants(&live_processes(), [pid].into())
                .into_iter()
                .filter(|d| d.0 != pid)
                .collect(),
        }
    }

    /// Waits until the target has no live member, polling with a short, growing interval
    /// so the caller returns soon after it exits instead of sleeping a whole grace period.
    fn wait_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(2);
        loop {
            if !self.alive() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// SIGKILL to a group orchctl itself just created (a launch that lost a race with STOP).
pub fn kill_group_now(pgid: i64) {
    if pgid > 1 && pgid != nix::unistd::getpgrp().as_raw() as i64 {
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
    }
}

/// Starts `argv` detached: a new session (so its own process group), stdin from
/// /dev/null, stdout and stderr appended to `log`. Returns its pid and start time.
pub fn spawn_detached(argv: &[String], env: &[(String, String)], log: &Path) -> Result<(i64, i64)> {
    let (program, args) = argv
        .split_first()
        .context("--exec needs a command after `--`")?;
    let out = append_file(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    scrub_child_env(&mut cmd);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {program:?}"))?;
    let pid = child.id() as i64;
    // The child may already have exited: a zombie still shows its start time until this
    // process exits, so read the stat directly rather than through `start_time`.
    let start = stat(pid)
        .map(|s| s.start)
        .with_context(|| format!("reading the start time of pid {pid}"))?;
    // Dropping `child` neither waits for nor kills it: the agent outlives orchctl.
    drop(child);
    Ok((pid, start))
}

/// Starts the supervisor of a run (SPEC §13): `program args`, detached in a new session,
/// so it leads the run's process group (pid = pgid = sid); stdin is the reading end of the
/// launch gate, stdout and stderr the run's log. It inherits orchctl's environment whole:
/// it is orchctl, and records the run's outcome with orchctl's configuration; the agent it
/// starts gets the scrubbed one ([`spawn_agent`]). Returns its pid and start time.
pub fn spawn_supervisor(
    program: &Path,
    args: &[OsString],
    env: &[(&str, &str)],
    gate: std::os::fd::OwnedFd,
    log: File,
) -> Result<(i64, i64)> {
    let err = log.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::from(gate))
        .stdout(log)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the supervisor {}", program.display()))?;
    let pid = child.id() as i64;
    // Read before anything can reap it: a zombie still shows its start time.
    let start = stat(pid)
        .map(|s| s.start)
        .with_context(|| format!("reading the start time of pid {pid}"))?;
    // Dropping `child` neither waits for nor kills it: the supervisor outlives orchctl.
    drop(child);
    Ok((pid, start))
}

/// Starts an agent command as the supervisor's child, in the supervisor's process group
/// (a STOP's signal to the group reaches both), in `dir` when given, with the scrubbed
/// environment plus `env`, stdin from /dev/null and stdout and stderr into `output`. The
/// agent dies with its supervisor: a supervisor killed alone must not leave an agent whose
/// run nobody watches.
pub fn spawn_agent(
    argv: &[String],
    env: &[(String, String)],
    dir: Option<&Path>,
    output: std::os::fd::OwnedFd,
) -> Result<std::process::Child> {
    let (program, args) = argv.split_first().context("an empty agent command")?;
    let err = output.try_clone()?;
    let mut cmd = Command::new(program);
    scrub_child_env(&mut cmd);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(err);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let parent = nix::unistd::getpid();
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other(
                    "the supervisor exited while starting the agent",
                ));
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {program:?}"))
}

/// SIGKILL to every live member of this process's own group but itself: what is left of a
/// run once its agent has exited, sent by the supervisor that leads the group. Each member
/// is checked again (same group, same start time) right before its signal. Waits (at most
/// `limit`) until none is left; returns how many were signalled.
pub fn kill_own_group_members(limit: Duration) -> usize {
    let me = std::process::id() as i32;
    let pgid = nix::unistd::getpgrp().as_raw();
    if pgid != me {
        // Only the group's leader may end its group: anyone else would hit a stranger's.
        return 0;
    }
    let deadline = Instant::now() + limit;
    let mut signalled = HashSet::new();
    loop {
        let left: Vec<ProcStat> = live_processes()
            .into_iter()
            .filter(|p| p.pgrp == pgid && p.pid != me)
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return signalled.len();
        }
        for p in left {
            let same = stat(p.pid as i64)
                .is_some_and(|now| now.pgrp == pgid && now.start == p.start && !now.exited());
            if same && nix::sys::signal::kill(Pid::from_raw(p.pid), Signal::SIGKILL).is_ok() {
                signalled.insert((p.pid, p.start));
            }
        }
        reap_children();
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A pipe whose two ends are closed on exec (a child gets only the end it is handed).
pub fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")
}

/// Reaps every child that has exited (a subreaper inherits the orphans of its descendants).
pub fn reap_children() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// The result of a child run with [`run_limited`].
#[derive(Debug)]
pub struct ChildOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` (an argument vector, never a shell) in its own process group with
/// `stdin` fed to it, killing the whole group when it runs past `limit`. The child gets
/// SIGKILL if orchctl dies first.
pub fn run_limited(
    program: &str,
    args: &[OsString],
    dir: Option<&Path>,
    env: &HashMap<String, String>,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<ChildOutput> {
    let mut cmd = Command::new(program);
    scrub_child_env(&mut cmd);
    cmd.args(args)
        .envs(env)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // The child dies with orchctl: killed mid-command, orchctl would otherwise leave a
    // stalled git holding the clone's locks while the retry runs, with nothing left to
    // bound its time.
    let parent = nix::unistd::getpid();
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other(
                    "orchctl exited while starting a child",
                ));
            }
            Ok(())
        });
    }
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let pgid = child.id() as i64;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(1 << 20).read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            kill_group_now(pgid);
            let _ = child.wait();
            let _ = out.join();
            let _ = err.join();
            anyhow::bail!(
                "{program} ran longer than {:.1}s and was killed",
                limit.as_secs_f64()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    };
    Ok(ChildOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Opens a job log for appending, creating its folder. Log names are predictable
/// (`job-<id>-run-<run>.log`), so whoever can write the folder could plant a link there and
/// have orchctl's user append to any file it can write: a folder others can write is
/// refused, a symbolic link is never followed (`O_NOFOLLOW`), and only a regular file
/// owned by this user is written (a FIFO is not waited on: `O_NONBLOCK`).
pub fn append_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log folder {}", dir.display()))?;
        let meta = std::fs::metadata(dir)
            .with_context(|| format!("reading the log folder {}", dir.display()))?;
        if meta.permissions().mode() & 0o002 != 0 {
            anyhow::bail!(
                "refusing the log folder {}: others can write to it (chmod o-w it, or set ORCH_LOG_DIR)",
                dir.display()
            );
        }
    }
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(flags.bits())
        .open(path)
        .with_context(|| {
            format!(
                "opening the log {} (a symbolic link is never followed)",
                path.display()
            )
        })?;
    let meta = file.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != me {
        anyhow::bail!(
            "refusing the log {}: not a regular file owned by uid {me}",
            path.display()
        );
    }
    Ok(file)
}

/// Variables that point git at a repository: orchctl run from a git hook (or by an agent in
/// its worktree) inherits them, and its children — git in a clone, an agent in its own
/// worktree — must find their repository themselves, never the caller's.
const GIT_LOCATION_VARS: [&str; 8] = [
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
];

/// What a child orchctl starts (an agent, git, the notify hook) must never inherit:
/// orchctl's secret variables, and credentials written into any `ORCH_*` URL
/// (`https://bot:token@gitea…`). Such a URL is passed on without its `user:password@`; a
/// value that is not UTF-8 cannot be inspected and is not passed on at all.
fn scrub_child_env(cmd: &mut Command) {
    for var in SECRET_VARS.iter().chain(GIT_LOCATION_VARS.iter()) {
        cmd.env_remove(var);
    }
    for (name, value) in std::env::vars_os() {
        if !name.as_encoded_bytes().starts_with(b"ORCH_") {
            continue;
        }
        match value.to_str() {
            // The database URL keeps its user (an agent may report with `orchctl complete`
            // through peer authentication or a ~/.pgpass of its own), never its password.
            Some(v) if name == "ORCH_DB_URL" => {
                cmd.env(&name, crate::config::db_url_without_password(v));
            }
            Some(v) => {
                if let Some(clean) = super::http::without_userinfo(v) {
                    cmd.env(&name, clean);
                }
            }
            None => {
                cmd.env_remove(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_awkward_names_parse() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 rest";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.session, 4242);
        assert_eq!(s.start, 987654);
    }

    #[test]
    fn own_process_is_alive_with_its_start_time() {
        let (pid, start) = self_identity();
        assert!(start > 0);
        assert_eq!(liveness(pid, Some(start)), Liveness::Alive);
        assert_eq!(liveness(pid, Some(start + 1)), Liveness::Recycled);
        assert_eq!(liveness(pid, None), Liveness::Unverified);
    }

    #[test]
    fn refuses_init_and_nonsense_pids() {
        for pid in [-5, 0, 1] {
            assert!(
                stop_agent(pid, Some(1), Duration::ZERO)
                    .unwrap_err()
                    .permanent
            );
        }
    }

    #[test]
    fn refuses_its_own_group() {
        // This test process is in its own group: stopping "itself" must be refused.
        let (pid, start) = self_identity();
        let err = stop_agent(pid, Some(start), Duration::ZERO).unwrap_err();
        assert!(err.permanent, "{err}");
    }
}
