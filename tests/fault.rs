//! Fault-injection helpers shared by the reliability, hostile-input and secrets tests:
//! a logical dump of the database (either backend), a port nobody listens on, a `git` wrapper on `PATH`
//! that logs (and can stall) every git call orchctl makes, scripts, background orchctl
//! processes that can be SIGKILLed mid-command, and bounded polling. Nothing here mocks
//! orchctl's own code: the faults are in the world around it.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Env, Snapshot};

/// Polls `f` every 10 ms until it holds or `limit` passes; returns the last answer.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Every table's rows, the schema and the schema version, as text: two dumps are equal
/// exactly when the database holds the same data (on either backend).
pub fn dump(env: &Env) -> String {
    env.dump()
}

/// The database's logical dump, and on SQLite its bytes, taken with no connection of the
/// harness left open (so the write-ahead log has been checkpointed into the main file).
pub fn snapshot(env: &Env) -> Snapshot {
    env.snapshot()
}

/// Asserts the database is what `before` recorded: the same rows, and on SQLite the same
/// bytes (the dump names the difference when there is one).
pub fn assert_unchanged(env: &Env, before: &Snapshot, what: &str) {
    env.assert_unchanged(before, what)
}

/// A local port with nothing listening on it (connection refused).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Writes an executable script.
pub fn script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// A `git` in front of the real one on `PATH`: appends every argument vector to a log
/// (one line per call, arguments joined by a space) and, while a file `hang` exists next
/// to it, sleeps before running `git worktree remove` (a git that stalls).
pub struct FakeGit {
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl FakeGit {
    pub fn install(env: &mut Env) -> FakeGit {
        let real = std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap();
        let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
        assert!(!real.is_empty(), "git is on PATH");
        let dir = env.path().join("fakebin");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("git.log");
        script(
            &dir.join("git"),
            &format!(
                "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{log}'\n\
                 case \"$*\" in *'worktree remove'*) [ -e '{hang}' ] && sleep 30 ;; esac\n\
                 exec '{real}' \"$@\"\n",
                log = log.display(),
                hang = dir.join("hang").display(),
            ),
        );
        let path = format!("{}:{}", dir.display(), env.var("PATH").unwrap_or(""));
        env.set("PATH", &path);
        FakeGit { dir, log }
    }

    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    pub fn hang(&self, on: bool) {
        let f = self.dir.join("hang");
        if on {
            std::fs::write(f, "").unwrap();
        } else {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// orchctl running in the background, SIGKILLed (and reaped) on drop.
pub struct Bg {
    pub child: Child,
}

impl Bg {
    pub fn start(env: &Env, args: &[&str]) -> Bg {
        let child = env
            .cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Bg { child }
    }

    pub fn pid(&self) -> i64 {
        self.child.id() as i64
    }

    /// SIGKILL, then reap: the process is gone (not a zombie) when this returns.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits (bounded) for the exit; returns (code, stdout, stderr).
    pub fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + limit;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "orchctl did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, out, err)
    }

    /// Like [`finish`], parsing stdout as JSON and requiring exit 0.
    pub fn json(self, limit: Duration) -> Value {
        let (code, out, err) = self.finish(limit);
        assert_eq!(code, 0, "orchctl failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One outbox row as the tests look at it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub kind: String,
    pub status: String,
    pub attempts: i64,
    pub claimed_pid: Option<i64>,
    pub last_error: Option<String>,
    pub result: Option<String>,
    pub next_attempt_at: Option<String>,
}

pub fn outbox(env: &Env) -> Vec<Row> {
    env.db_raw()
        .all::<(
            i64,
            String,
            String,
            i64,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        )>(
            "SELECT id, kind, status, attempts, claimed_pid, last_error, result, next_attempt_at
             FROM outbox ORDER BY id",
            (),
        )
        .into_iter()
        .map(
            |(id, kind, status, attempts, claimed_pid, last_error, result, next_attempt_at)| Row {
                id,
                kind,
                status,
                attempts,
                claimed_pid,
                last_error,
                result,
                next_attempt_at,
            },
        )
        .collect()
}

pub fn row<'a>(rows: &'a [Row], kind: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} row in {rows:#?}"))
}

/// The effect of `kind` in a stop/complete result.
pub fn effect<'a>(res: &'a Value, kind: &str) -> &'a Value {
    res["effects"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["kind"] == kind))
        .unwrap_or_else(|| panic!("no {kind} effect in {res}"))
}

/// Non-empty lines of a file (missing file = none).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

/// A notify hook that appends each event (one JSON line) to `log`.
pub fn notify_hook(env: &mut Env, log: &Path) {
    let hook = script(
        &env.path().join("notify.sh"),
        "#!/bin/sh\ncat >> \"$1\"\necho >> \"$1\"\n",
    );
    env.set(
        "ORCH_NOTIFY_CMD",
        &format!("{} {}", hook.display(), log.display()),
    );
}

/// Pids of live processes whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // Arguments are NUL-separated: match them joined by spaces.
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && crate::common::alive(pid) {
            out.push(pid);
        }
    }
    out
}
