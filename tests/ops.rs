//! Operations (SPEC §15): `metrics` checked by Prometheus's own linter (`promtool check
//! metrics`, Debian package `prometheus`) with the exact numbers of a mixed database, its
//! `--textfile` (a temporary file renamed into place, seen through strace), `prune` under
//! a clock moved by Debian's `faketime` (on PostgreSQL the server's clock too: libfaketime
//! in the clock cluster, see tests/common/pg.rs), the announcement of a new database file and
//! `task add`'s warning about a missing clone. The webhook server's side (401 before
//! orchctl runs, the HTTP reads, the unprivileged user) is the end-to-end test in
//! tests/event.rs.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::db::{ts_plain_in, Params};
use crate::common::{now_ts, Env, GitRepo, BIN};

/// Feeds `text` to `promtool check metrics`: it must parse and pass the linter silently.
pub(crate) fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "the metrics tests need promtool (Debian package `prometheus`): \
                 apt-get install prometheus — .ci/run installs it ({e})"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {} {said}\n{text}",
        out.status
    );
}

/// A command with exactly this test's environment (the one `env.cmd()` gives orchctl).
fn command_in(env: &Env, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear().stdin(Stdio::null());
    for (k, v) in env.cmd().get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd
}

/// Runs orchctl under Debian's `faketime` with `spec` (`+100d` moves the clock on; an
/// absolute time stops it there): SQLite's `now` and the file times compared with it
/// follow the faked clock. On PostgreSQL the database's clock is the server's: the test's
/// database is on the clock cluster (`Env::clocked`), whose libfaketime follows the same
/// spec for as long as this command runs. Returns (exit code, stdout, stderr).
fn faked(env: &Env, spec: &str, args: &[&str]) -> (i32, String, String) {
    env.set_db_clock(spec);
    let out = command_in(env, "faketime")
        .args(["-f", spec, BIN])
        .args(args)
        .output();
    env.set_db_clock("+0");
    let out = out.unwrap_or_else(|e| {
        panic!(
            "these tests need faketime (Debian package `faketime`): apt-get install \
             faketime — .ci/run installs it ({e})"
        )
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The stopped clock of the metrics tests, and the creation time of the oldest queued
/// job an hour before it.
const FROZEN: &str = "2030-01-01 00:00:00";
const HOUR_BEFORE: &str = "2029-12-31T23:00:00.000Z";

fn sql(env: &Env, statement: &str, params: impl Params) {
    env.db().execute(statement, params);
}

fn effect(env: &Env, task: i64, status: &str) {
    sql(
        env,
        "INSERT INTO outbox (task_id, kind, payload, status) VALUES (?1, 'plane_comment', '{}', ?2)",
        (task, status),
    );
}

/// A database with work in every state the metrics count, written with plain SQL as the
/// seed's tests and other tools write it.
fn mixed() -> Env {
    let env = Env::clocked();
    let task = |wi: &str, stage: &str| env.make_task(&format!("PL-{wi}"), wi, stage, None);
    let job = |task: i64, agent: &str, status: &str| {
        env.make_job_full(task, agent, status, None, None, None, 1, 2)
    };
    // analysis: one parked awaiting Approved, one with its analyst queued (the oldest).
    let t1 = task("ORCH-1", "analysis");
    job(t1, "analyst", "done");
    let t2 = task("ORCH-2", "analysis");
    let oldest = job(t2, "analyst", "queued");
    // development: one stuck on a failed job, one waiting on a cancelled task.
    let t3 = task("ORCH-3", "development");
    job(t3, "developer", "failed");
    let t9 = task("ORCH-9", "development");
    let newer = job(t9, "developer", "queued");
    // review: the reviewer runs.
    let t4 = task("ORCH-4", "review");
    job(t4, "developer", "done");
    job(t4, "reviewer", "running");
    // deploy: one parked awaiting Confirm Deploy, one deploying with the lease.
    let t5 = task("ORCH-5", "deploy");
    job(t5, "reviewer", "done");
    let t6 = task("ORCH-6", "deploy");
    job(t6, "deployer", "running");
    // history.
    let t7 = task("ORCH-7", "done");
    job(t7, "deployer", "done");
    let t8 = task("ORCH-8", "cancelled");
    job(t8, "developer", "cancelled");

    sql(
        &env,
        "INSERT INTO task_deps (task_id, depends_on) VALUES (?1, ?2)",
        [t9, t8],
    );
    sql(
        &env,
        "INSERT INTO merge_leases (repo, branch, task_id) VALUES ('orchestrator', 'feature/ORCH-6-slug', ?1)",
        [t6],
    );
    sql(
        &env,
        "UPDATE jobs SET created_at = ?2 WHERE id = ?1",
        (oldest, HOUR_BEFORE),
    );
    sql(
        &env,
        "UPDATE jobs SET created_at = '2029-12-31T23:30:00.000Z' WHERE id = ?1",
        [newer],
    );
    for (t, status) in [
        (t6, "pending"),
        (t8, "pending"),
        (t8, "failed"),
        (t7, "done"),
        (t8, "done"),
        (t8, "done"),
    ] {
        effect(&env, t, status);
    }
    env
}

const FAMILIES: [&str; 7] = [
    "orchctl_jobs",
    "orchctl_tasks",
    "orchctl_outbox_effects",
    "orchctl_merge_leases_held",
    "orchctl_awaiting_tasks",
    "orchctl_oldest_queued_job_age_seconds",
    "orchctl_agents_running",
];

#[test]
fn metrics_of_a_mixed_database_pass_promtool_and_carry_its_numbers() {
    let env = mixed();
    let (code, text, err) = faked(&env, FROZEN, &["metrics"]);
    assert_eq!(code, 0, "{err}");
    promtool_check(&text);
    for family in FAMILIES {
        assert_eq!(
            text.matches(&format!("# TYPE {family} gauge\n")).count(),
            1,
            "{family}\n{text}"
        );
        assert_eq!(
            text.matches(&format!("# HELP {family} ")).count(),
            1,
            "{family}\n{text}"
        );
    }
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let expected = [
        r#"orchctl_jobs{status="queued"} 2"#,
        r#"orchctl_jobs{status="running"} 2"#,
        r#"orchctl_jobs{status="done"} 4"#,
        r#"orchctl_jobs{status="failed"} 1"#,
        r#"orchctl_jobs{status="cancelled"} 1"#,
        r#"orchctl_tasks{stage="analysis"} 2"#,
        r#"orchctl_tasks{stage="development"} 2"#,
        r#"orchctl_tasks{stage="review"} 1"#,
        r#"orchctl_tasks{stage="deploy"} 2"#,
        r#"orchctl_tasks{stage="done"} 1"#,
        r#"orchctl_tasks{stage="cancelled"} 1"#,
        r#"orchctl_outbox_effects{status="pending"} 2"#,
        r#"orchctl_outbox_effects{status="failed"} 1"#,
        r#"orchctl_merge_leases_held 1"#,
        r#"orchctl_awaiting_tasks{kind="approval"} 1"#,
        r#"orchctl_awaiting_tasks{kind="deploy_confirmation"} 1"#,
        r#"orchctl_awaiting_tasks{kind="failed"} 1"#,
        r#"orchctl_awaiting_tasks{kind="blocked_by_cancelled"} 1"#,
        r#"orchctl_oldest_queued_job_age_seconds 3600.000"#,
        r#"orchctl_agents_running{agent="analyst"} 0"#,
        r#"orchctl_agents_running{agent="developer"} 0"#,
        r#"orchctl_agents_running{agent="reviewer"} 1"#,
        r#"orchctl_agents_running{agent="deployer"} 1"#,
    ];
    assert_eq!(samples, expected, "{text}");

    // The exposition format whatever --format says (a scrape must never get JSON).
    let (code, json_asked, _) = faked(&env, FROZEN, &["--format", "json", "metrics"]);
    assert_eq!(code, 0);
    assert_eq!(json_asked, text);

    // Nothing queued: the age is 0, not missing; a claim moves the numbers.
    sql(
        &env,
        "UPDATE jobs SET status = 'running' WHERE status = 'queued'",
        (),
    );
    let (_, text, _) = faked(&env, FROZEN, &["metrics"]);
    promtool_check(&text);
    assert!(
        text.contains("\norchctl_oldest_queued_job_age_seconds 0.000\n"),
        "{text}"
    );
    assert!(
        text.contains("\norchctl_jobs{status=\"running\"} 4\n"),
        "{text}"
    );
    assert!(
        text.contains("\norchctl_agents_running{agent=\"analyst\"} 1\n"),
        "{text}"
    );
}

/// A label value orchctl did not write (plain SQL can) is escaped and still parses.
#[test]
fn metrics_escape_label_values_from_the_database() {
    let env = Env::clocked();
    let t = env.make_task("PL-1", "ORCH-1", "development", None);
    env.make_job_full(t, "odd\"agent\\x", "running", None, None, None, 1, 2);
    let (code, text, err) = faked(&env, FROZEN, &["metrics"]);
    assert_eq!(code, 0, "{err}");
    promtool_check(&text);
    assert!(
        text.contains("\norchctl_agents_running{agent=\"odd\\\"agent\\\\x\"} 1\n"),
        "{text}"
    );
}

#[test]
fn metrics_textfile_is_renamed_into_place_and_nothing_is_printed() {
    let env = mixed();
    let dir = env.path().join("textfile");
    std::fs::create_dir_all(&dir).unwrap();
    // The previous scrape's file is replaced.
    std::fs::write(dir.join("orchctl.prom"), "stale\n").unwrap();
    let trace = env.path().join("strace.out");
    env.set_db_clock(FROZEN);
    let out = command_in(&env, "strace")
        .args(["-f", "-qq", "-e", "trace=rename,renameat,renameat2", "-o"])
        .arg(&trace)
        .args(["faketime", "-f", FROZEN, BIN, "metrics", "--textfile"])
        .arg(&dir)
        .output();
    env.set_db_clock("+0");
    let out = out.unwrap_or_else(|e| {
        panic!("this test needs strace: apt-get install strace — .ci/run installs it ({e})")
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "printed: {:?}", out.stdout);

    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["orchctl.prom"]);
    let written = std::fs::read_to_string(dir.join("orchctl.prom")).unwrap();
    let (_, printed, _) = faked(&env, FROZEN, &["metrics"]);
    assert_eq!(written, printed);
    promtool_check(&written);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("orchctl.prom"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o644, "node_exporter's user must read it");

    // It arrived by one rename of a temporary file in the same folder.
    let trace = std::fs::read_to_string(&trace).unwrap();
    let target = format!("\"{}\"", dir.join("orchctl.prom").display());
    let renames: Vec<&str> = trace.lines().filter(|l| l.contains(&target)).collect();
    assert_eq!(renames.len(), 1, "{trace}");
    let from = format!("\"{}/.orchctl.prom.", dir.display());
    assert!(
        renames[0].contains(&from) && renames[0].contains("= 0"),
        "{trace}"
    );

    // A folder that does not exist: one line, exit 1, nothing created.
    let missing = env.path().join("no-such-folder");
    let (code, out, err) = env.run(&["metrics", "--textfile", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(!missing.exists());
}

// ------------------------------------------------------------------------------- prune

/// Every row of the tables prune must never touch, and the counts of those it may.
fn rows(env: &Env) -> (String, i64, i64) {
    let c = env.db();
    let dump = |sql: &str| -> String { c.values::<String>(sql, ()).join(";") };
    let kept = [
        dump("SELECT id || stage || coalesce(updated_at, '') FROM tasks ORDER BY id"),
        dump("SELECT id || status || coalesce(finished_at, '') FROM jobs ORDER BY id"),
        dump("SELECT id || kind || at FROM task_events ORDER BY id"),
        dump("SELECT id || status FROM outbox WHERE status <> 'done' ORDER BY id"),
    ]
    .join("\n");
    (
        kept,
        env.count("SELECT count(*) FROM plane_deliveries"),
        env.count("SELECT count(*) FROM outbox WHERE status = 'done'"),
    )
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn prune(env: &Env, clock: &str, args: &[&str]) -> Value {
    let mut all = vec!["prune"];
    all.extend(args);
    let (code, out, err) = faked(env, clock, &all);
    assert_eq!(code, 0, "prune {args:?} at {clock}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn counts(r: &Value) -> (i64, i64, i64) {
    (
        r["deliveries"].as_i64().unwrap(),
        r["outbox"].as_i64().unwrap(),
        r["logs"].as_i64().unwrap(),
    )
}

#[test]
fn prune_deletes_what_aged_past_its_window_and_never_a_task_job_or_audit_row() {
    let env = Env::clocked();
    // Work done through the commands, so the audit trail has rows too.
    let done = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-1",
    ])["task"]["id"]
        .as_i64()
        .unwrap();
    let cancelled = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-2",
    ])["task"]["id"]
        .as_i64()
        .unwrap();
    let live = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-3",
    ])["task"]["id"]
        .as_i64()
        .unwrap();
    // Finished now: one done, one cancelled (plain SQL, so no side effect of their own).
    sql(
        &env,
        "UPDATE tasks SET stage = 'done', updated_at = ?2 WHERE id = ?1",
        (done, now_ts()),
    );
    sql(
        &env,
        "UPDATE tasks SET stage = 'cancelled', cancelled_at = ?2 WHERE id = ?1",
        (cancelled, now_ts()),
    );
    for (t, status) in [
        (done, "done"),
        (done, "done"),
        (done, "pending"),
        (done, "failed"),
        (cancelled, "done"),
        (live, "done"),
    ] {
        effect(&env, t, status);
    }
    // Two deliveries handled now, one a month ago (in the space-separated form plain SQL
    // may write).
    for (sha, received) in [
        ("a1", now_ts()),
        ("b2", now_ts()),
        ("c3", ts_plain_in(-30 * 86_400)),
    ] {
        sql(
            &env,
            "INSERT INTO plane_deliveries (body_sha256, action, received_at)
             VALUES (?1, 'ignored', ?2)",
            (sha, received),
        );
    }
    // Runs: a finished one, an earlier run of the same job, a running one, a job the
    // database does not know, and a run that finished now but whose log was last
    // written long ago (the database's finish time counts).
    let finished = env.make_job_full(done, "analyst", "done", None, None, Some(1), 1, 2);
    let running = env.make_job_full(live, "developer", "running", None, None, Some(5), 1, 2);
    let old_write = env.make_job_full(cancelled, "analyst", "cancelled", None, None, Some(7), 1, 2);
    sql(
        &env,
        "UPDATE jobs SET finished_at = ?3 WHERE id IN (?1, ?2)",
        (finished, old_write, now_ts()),
    );
    std::fs::create_dir_all(&env.logs).unwrap();
    let log = |name: String| {
        std::fs::write(env.logs.join(&name), "agent output\n").unwrap();
        name
    };
    let finished_log = log(format!("job-{finished}-run-1.log"));
    let earlier_log = log(format!("job-{finished}-run-0.log"));
    let running_log = log(format!("job-{running}-run-5.log"));
    let unknown_log = log("job-999-run-3.log".into());
    let old_write_log = log(format!("job-{old_write}-run-7.log"));
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(200 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(env.logs.join(&old_write_log))
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    // Not agent logs: never touched.
    for other in ["reap.log", "notes.txt", "job-1-run-1.log.1"] {
        std::fs::write(env.logs.join(other), "x").unwrap();
    }
    std::os::unix::fs::symlink(
        env.path().join("elsewhere"),
        env.logs.join("job-998-run-1.log"),
    )
    .unwrap();
    std::fs::write(env.path().join("elsewhere"), "not a log").unwrap();

    let (kept, deliveries, done_rows) = rows(&env);
    assert_eq!((deliveries, done_rows), (3, 4));
    let all_files = files(&env.logs);

    // Today: only the delivery received long ago qualifies.
    let r = prune(&env, "+0d", &["--dry-run"]);
    assert_eq!(counts(&r), (1, 0, 0), "{r}");
    assert_eq!(r["dry_run"], true);
    assert_eq!(rows(&env), (kept.clone(), 3, 4));

    // Ten days on: every delivery hash is past its week; nothing is past 90 days.
    let r = prune(&env, "+10d", &[]);
    assert_eq!(counts(&r), (3, 0, 0), "{r}");
    assert_eq!(r["older_than_days"], 90);
    assert_eq!(rows(&env), (kept.clone(), 0, 4));
    assert_eq!(files(&env.logs), all_files);

    // A hundred days on, a 120-day window: still nothing.
    let r = prune(&env, "+100d", &["--older-than", "120"]);
    assert_eq!(counts(&r), (0, 0, 0), "{r}");

    // A hundred days on, the default window, dry run: counted, nothing changed.
    let r = prune(&env, "+100d", &["--dry-run"]);
    assert_eq!(counts(&r), (0, 3, 4), "{r}");
    assert_eq!(rows(&env), (kept.clone(), 0, 4));
    assert_eq!(files(&env.logs), all_files);

    // And for real: the done effects of the two terminal tasks, the logs of the ended
    // runs. The live task's done effect, the pending and failed ones, the running run's
    // log and every other file stay; so does every task, job and audit row.
    let r = prune(&env, "+100d", &[]);
    assert_eq!(counts(&r), (0, 3, 4), "{r}");
    assert_eq!(r["log_bytes"], 4 * "agent output\n".len());
    assert_eq!(rows(&env), (kept.clone(), 0, 1));
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM outbox WHERE status = 'done' AND task_id = {live}"
        )),
        1
    );
    let left = files(&env.logs);
    for gone in [&finished_log, &earlier_log, &unknown_log, &old_write_log] {
        assert!(!left.contains(gone), "{gone} kept: {left:?}");
    }
    for stays in [
        running_log.as_str(),
        "reap.log",
        "notes.txt",
        "job-1-run-1.log.1",
        "job-998-run-1.log",
    ] {
        assert!(left.contains(stays), "{stays} deleted: {left:?}");
    }
    assert!(env.path().join("elsewhere").exists());

    // Nothing is left to do.
    let r = prune(&env, "+100d", &[]);
    assert_eq!(counts(&r), (0, 0, 0), "{r}");
}

// --------------------------------------------------------- announcements and warnings

/// A new SQLite file (a mistyped path) is announced; a PostgreSQL URL names a database
/// that must already exist.
#[test]
fn sqlite_only_a_new_database_file_is_announced_once_with_its_path() {
    let mut env = Env::sqlite();
    let typo = env.path().join("stat/orch.db");
    env.set("ORCH_DB_PATH", typo.to_str().unwrap());
    let (code, _, err) = env.run(&["queue"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [format!(
            "orchctl: created a new database at {}",
            typo.display()
        )]
    );
    assert!(typo.exists());
    let (code, _, err) = env.run(&["queue"]);
    assert_eq!(code, 0);
    assert_eq!(err, "", "an existing database is not announced");
    // --db too.
    let other = env.path().join("other.db");
    let (_, _, err) = env.run(&["--db", other.to_str().unwrap(), "queue"]);
    assert!(err.contains(other.to_str().unwrap()), "{err}");
}

#[test]
fn task_add_warns_when_the_repo_has_no_clone_and_adds_the_task() {
    let env = Env::new();
    drop(env.ctx());
    let (code, out, err) = env.run(&["task", "add", "--repo", "typo", "--work-item", "ORCH-1"]);
    assert_eq!(code, 0, "{err}");
    let added: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["task"]["repo"], "typo");
    assert_eq!(added["job"]["agent"], "analyst");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("orchctl: warning: repo \"typo\" has no clone"),
        "{err}"
    );
    assert!(
        err.contains(env.repos.join("typo").to_str().unwrap()),
        "{err}"
    );
    // A folder that is not a clone is no better.
    std::fs::create_dir_all(env.repos.join("empty")).unwrap();
    let (_, _, err) = env.run(&["task", "add", "--repo", "empty", "--work-item", "ORCH-2"]);
    assert!(err.contains("is not a git clone"), "{err}");

    GitRepo::new(&env, "orchestrator");
    let (code, _, err) = env.run(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-3",
    ]);
    assert_eq!(code, 0);
    assert_eq!(err, "");
}
