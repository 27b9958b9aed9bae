//! Fault-injection helpers shared by the reliability, hostile-input and secrets tests:
//! a logical dump of the database, a port nobody listens on, a `git` wrapper on `PATH`
//! that logs (and can stall) every git call orchctl makes, scripts, background orchctl
//! processes that can be SIGKILLed mid-command, and bounded polling. Nothing here mocks
//! orchctl's own code: the faults are in the world around it.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::Env;

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

/// Every table's rows (by rowid), the schema and the schema version, as text: two dumps
/// are equal exactly when the database holds the same data.
pub fn dump(db: &Path) -> String {
    // A read-write connection that only reads: closing it leaves the file as it was.
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut out = String::new();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    out.push_str(&format!("user_version {version}\n"));
    let objects: Vec<(String, String, Option<String>)> = c
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (kind, name, sql) in &objects {
        out.push_str(&format!(
            "{kind} {name}: {}\n",
            sql.as_deref().unwrap_or("")
        ));
    }
    for (kind, name, _) in &objects {
        if kind != "table" || name.starts_with("sqlite_") {
            continue;
        }
        let without_rowid = objects.iter().any(|(k, n, s)| {
            k == "table" && n == name && s.as_deref().is_some_and(|s| s.contains("WITHOUT ROWID"))
        });
        let order = if without_rowid { "1" } else { "rowid" };
        let mut stmt = c
            .prepare(&format!("SELECT * FROM \"{name}\" ORDER BY {order}"))
            .unwrap();
        let n = stmt.column_count();
        let rows: Vec<String> = stmt
            .query_map([], |r| {
                let mut cells = Vec::with_capacity(n);
                for i in 0..n {
                    cells.push(format!("{:?}", r.get_ref(i)?));
                }
                Ok(cells.join(" | "))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        out.push_str(&format!("-- {name} ({} rows)\n", rows.len()));
        for row in rows {
            out.push_str(&row);
            out.push('\n');
        }
    }
    out
}

/// The database as bytes plus its logical dump, taken with no connection left open (so the
/// write-ahead log has been checkpointed into the main file).
pub fn snapshot(env: &Env) -> (Vec<u8>, String) {
    let text = dump(&env.db);
    let wal = env.db.with_extension("db-wal");
    assert!(
        std::fs::metadata(&wal)
            .map(|m| m.len() == 0)
            .unwrap_or(true),
        "a connection is still open on {}",
        env.db.display()
    );
    (std::fs::read(&env.db).unwrap(), text)
}

/// Asserts the database is byte-for-byte what `before` recorded (the dump names the
/// difference when it is not).
pub fn assert_unchanged(env: &Env, before: &(Vec<u8>, String), what: &str) {
    let now = snapshot(env);
    assert_eq!(now.1, before.1, "{what}: the database content changed");
    assert!(now.0 == before.0, "{what}: the database file changed");
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
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut s = c
        .prepare(
            "SELECT id, kind, status, attempts, claimed_pid, last_error, result, next_attempt_at
             FROM outbox ORDER BY id",
        )
        .unwrap();
    let rows = s
        .query_map([], |r| {
            Ok(Row {
                id: r.get(0)?,
                kind: r.get(1)?,
                status: r.get(2)?,
                attempts: r.get(3)?,
                claimed_pid: r.get(4)?,
                last_error: r.get(5)?,
                result: r.get(6)?,
                next_attempt_at: r.get(7)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
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
