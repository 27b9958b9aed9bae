//! `orchctl queue` (SPEC §8, seed TC-09): every block present and typed, each block computed
//! on its own (a broken table costs only its own block, exit 0), and a snapshot whose cost
//! does not grow with the job history.

use serde::Deserialize;
use serde_json::Value;

use crate::common::Env;

#[derive(Debug, Deserialize, PartialEq)]
struct Counts {
    queued: i64,
    running: i64,
    done: i64,
    failed: i64,
    cancelled: i64,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Lease {
    repo: String,
    branch: String,
    task_id: Option<i64>,
    acquired_at: String,
}

#[derive(Debug, Deserialize)]
struct SerialGate {
    enabled: bool,
    leases: Vec<Lease>,
    error: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Blocked {
    task_id: i64,
    waiting_on: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct TaskDeps {
    enabled: bool,
    blocked: Vec<Blocked>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AutoLabels {
    enabled: bool,
}

#[derive(Debug, Deserialize)]
struct Job {
    id: i64,
    agent: String,
    task_id: Option<i64>,
    status: String,
    run_id: Option<i64>,
    attempts: i64,
    max_attempts: i64,
}

#[derive(Debug, Deserialize)]
struct Effect {
    id: i64,
    task_id: Option<i64>,
    kind: String,
    status: String,
    attempts: i64,
    last_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Outbox {
    pending: i64,
    failed: i64,
    items: Vec<Effect>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Stopped {
    id: i64,
    work_item_id: Option<String>,
    repo: String,
    cancelled_at: Option<String>,
    cancel_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StopBlock {
    enabled: bool,
    repos: Vec<String>,
    cancelled_count: i64,
    recent: Vec<Stopped>,
    deferred_pending: Option<i64>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Queue {
    counts: Counts,
    serial_gate: SerialGate,
    task_deps: TaskDeps,
    auto_labels: AutoLabels,
    recent: Vec<Job>,
    outbox: Outbox,
    stop: StopBlock,
    errors: Option<Value>,
}

fn queue(env: &Env, args: &[&str]) -> (Queue, Value) {
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    let v = env.json(&all);
    (
        serde_json::from_value(v.clone()).expect("the snapshot's shape"),
        v,
    )
}

/// A small pipeline touching every block, built through the CLI (plus one failed side
/// effect inserted seed-style): returns the env.
///
/// task 1 DEMO-1 development → its developer run succeeds → review, reviewer job 3 queued
/// task 2 DEMO-2 analysis, depends on DEMO-1 (blocked), analyst job 2 queued
/// task 3 DEMO-3 deploy, deploy-begin (lease + marker), then STOP → deferred
/// task 4 DEMO-4 analysis, stopped → cancelled, job 4 cancelled; a failed side effect
pub fn pipeline() -> Env {
    let env = Env::new();
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-1",
        "--title",
        "Add a greeting",
        "--stage",
        "development",
    ]);
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-2",
        "--title",
        "Second",
        "--depends-on",
        "DEMO-1",
    ]);
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-3",
        "--title",
        "Ship it",
        "--stage",
        "deploy",
    ]);
    let claimed = env.json(&["claim", "--agent", "developer"]);
    assert_eq!(
        (claimed["id"].as_i64(), claimed["run_id"].as_i64()),
        (Some(1), Some(1))
    );
    let done = env.json(&["complete", "1", "--run-id", "1", "--success"]);
    assert_eq!(done["note"], "advanced");
    env.json(&["deploy-begin", "DEMO-3"]);
    let deferred = env.json(&["stop", "DEMO-3", "--reason", "wrong release"]);
    assert_eq!(deferred["note"], "deferred-critical-window");
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-4",
        "--title",
        "Dropped",
    ]);
    let stopped = env.json(&["stop", "DEMO-4", "--reason", "not needed"]);
    assert_eq!(stopped["note"], "cancelled");
    env.db()
        .execute(
            "INSERT INTO outbox (task_id, kind, payload, status, attempts, last_error)
             VALUES ((SELECT id FROM tasks WHERE work_item_id LIKE 'DEMO-4%'), 'delete_remote_branch', '{\"repo\":\"demo\",\"branch\":\"feature/DEMO-4-dropped\"}',
                     'failed', 10, 'Gitea answered 403: branch is protected')",
            (),
        );
    env
}

/// TC-09: every key of SPEC §8, with the values the pipeline above implies.
#[test]
fn tc09_queue_carries_every_block_with_typed_values() {
    let env = pipeline();
    let (q, raw) = queue(&env, &[]);
    for key in [
        "counts",
        "serial_gate",
        "task_deps",
        "auto_labels",
        "recent",
        "outbox",
        "stop",
    ] {
        assert!(raw.get(key).is_some(), "missing block {key}");
    }
    assert!(q.errors.is_none(), "{:?}", q.errors);

    assert_eq!(
        q.counts,
        Counts {
            queued: 2,
            running: 0,
            done: 1,
            failed: 0,
            cancelled: 1,
            error: None
        }
    );

    assert!(q.serial_gate.enabled && q.serial_gate.error.is_none());
    assert_eq!(q.serial_gate.leases.len(), 1);
    let lease = &q.serial_gate.leases[0];
    assert_eq!(
        (lease.repo.as_str(), lease.branch.as_str(), lease.task_id),
        ("demo", "feature/DEMO-3-ship-it", Some(3))
    );
    assert!(!lease.acquired_at.is_empty());

    assert!(q.task_deps.enabled && q.task_deps.error.is_none());
    assert_eq!(
        q.task_deps.blocked,
        vec![Blocked {
            task_id: 2,
            waiting_on: vec![1]
        }]
    );

    assert!(!q.auto_labels.enabled);

    // Newest first, all four jobs (default --recent 10).
    let ids: Vec<i64> = q.recent.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![4, 3, 2, 1]);
    let first = q.recent.last().unwrap();
    assert_eq!(
        (
            first.agent.as_str(),
            first.task_id,
            first.status.as_str(),
            first.run_id
        ),
        ("developer", Some(1), "done", Some(1))
    );
    assert_eq!((first.attempts, first.max_attempts), (1, 2));
    assert_eq!(q.recent[0].status, "cancelled");

    // Task 4's own branch deletion could not even be attempted (no Gitea, no clone):
    // failed with that reason (SPEC §4), next to the seeded 403.
    assert_eq!((q.outbox.pending, q.outbox.failed), (0, 2));
    assert!(q.outbox.error.is_none());
    assert_eq!(q.outbox.items.len(), 2);
    let e = &q.outbox.items[0];
    assert_eq!(
        (e.task_id, e.kind.as_str(), e.status.as_str(), e.attempts),
        (Some(4), "delete_remote_branch", "failed", 10)
    );
    assert!(e.id > 0 && e.last_error.as_deref().unwrap().contains("403"));
    let e = &q.outbox.items[1];
    assert_eq!(
        (e.task_id, e.kind.as_str(), e.status.as_str(), e.attempts),
        (Some(4), "delete_remote_branch", "failed", 1)
    );
    assert!(e
        .last_error
        .as_deref()
        .unwrap()
        .starts_with("cannot be attempted"));

    assert!(q.stop.enabled && q.stop.error.is_none());
    assert!(q.stop.repos.is_empty());
    assert_eq!(q.stop.cancelled_count, 1);
    assert_eq!(q.stop.deferred_pending, Some(1));
    assert_eq!(q.stop.recent.len(), 1);
    let s = &q.stop.recent[0];
    assert_eq!(
        (
            s.id,
            s.work_item_id.as_deref(),
            s.repo.as_str(),
            s.cancel_reason.as_deref()
        ),
        (4, Some("DEMO-4#cancelled-4"), "demo", Some("not needed"))
    );
    assert!(s.cancelled_at.as_deref().is_some_and(|t| !t.is_empty()));
}

#[test]
fn tc09_stop_block_reports_the_kill_switch_and_scope() {
    let mut env = Env::new();
    env.set("ORCH_STOP_ENABLED", "off")
        .set("ORCH_STOP_REPOS", "enduro-trails, orchestrator");
    env.set("ORCH_SERIAL_GATE", "0")
        .set("ORCH_TASK_DEPS", "false");
    let (q, _) = queue(&env, &[]);
    assert!(!q.stop.enabled);
    assert_eq!(q.stop.repos, vec!["enduro-trails", "orchestrator"]);
    assert_eq!(q.stop.cancelled_count, 0);
    assert!(!q.serial_gate.enabled && !q.task_deps.enabled);
    assert_eq!(q.counts.queued + q.counts.done, 0);
}

#[test]
fn recent_limits_both_lists() {
    let env = pipeline();
    let (q, _) = queue(&env, &["--recent", "2"]);
    assert_eq!(
        q.recent.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![4, 3]
    );
    let (q, _) = queue(&env, &["--recent", "0"]);
    assert!(q.recent.is_empty() && q.stop.recent.is_empty());
    assert_eq!(
        q.stop.cancelled_count, 1,
        "counts do not depend on --recent"
    );
}

/// The blocks of a snapshot that carry an `error`.
fn broken_blocks(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, b)| b.get("error").is_some())
        .map(|(k, _)| k.clone())
        .collect();
    if let Some(errors) = v.get("errors").and_then(Value::as_object) {
        out.extend(errors.keys().cloned());
    }
    out.sort();
    out
}

/// TC-09 "never raises": make one block's data unreadable with plain SQL; that block turns
/// into its minimal form with an `error`, every other block is intact, exit 0.
#[test]
fn tc09_a_broken_block_is_minimal_with_error_and_the_rest_intact() {
    // What each breakage takes down besides its block: on PostgreSQL what tasks wait for
    // is read from the tasks themselves (SQLite keeps a table of its own), and job counts
    // are counted from the jobs (SQLite keeps counters, which it can lose alone).
    let postgres = Env::new().db().is_postgres();
    let mut cases: Vec<(&str, &str, Vec<&str>)> = vec![
        // The stop block reads the tasks table.
        (
            "ALTER TABLE tasks RENAME TO tasks_elsewhere",
            "stop",
            if postgres { vec!["awaiting"] } else { vec![] },
        ),
        ("DROP TABLE outbox", "outbox", vec![]),
        ("DROP TABLE merge_leases", "serial_gate", vec![]),
    ];
    if !postgres {
        cases.push(("DROP TABLE job_counts", "counts", vec![]));
        cases.push((
            "ALTER TABLE jobs RENAME TO jobs_elsewhere",
            "recent",
            vec![],
        ));
    }
    for (sql, broken, also) in cases {
        let env = Env::new();
        env.json(&[
            "task",
            "add",
            "--repo",
            "demo",
            "--work-item",
            "DEMO-1",
            "--stage",
            "development",
        ]);
        env.json(&["task", "add", "--repo", "demo", "--work-item", "DEMO-2"]);
        env.json(&["stop", "DEMO-2"]);
        let intact = env.json(&["queue"]);
        assert!(broken_blocks(&intact).is_empty(), "{intact}");

        env.db().batch(sql);
        let (code, stdout, stderr) = env.run(&["queue"]);
        assert_eq!(code, 0, "{sql}: {stderr}");
        let v: Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{sql}: {e}: {stdout}"));
        let mut expected: Vec<String> = also.iter().map(|b| b.to_string()).collect();
        expected.push(broken.to_string());
        expected.sort();
        assert_eq!(broken_blocks(&v), expected, "{sql}: {v}");
        let q: Queue = serde_json::from_value(v.clone()).expect("still the snapshot's shape");

        // Every other block equals what it was before the breakage.
        for key in [
            "counts",
            "serial_gate",
            "task_deps",
            "auto_labels",
            "recent",
            "outbox",
            "stop",
        ] {
            if key != broken && !also.contains(&key) {
                assert_eq!(v[key], intact[key], "{sql}: block {key} changed");
            }
        }
        // The broken block's minimal form.
        match broken {
            "stop" => {
                let s = &q.stop;
                assert!(s.enabled && s.repos.is_empty() && s.recent.is_empty());
                assert_eq!(s.cancelled_count, 0);
                assert!(
                    s.error.as_deref().unwrap().contains("tasks"),
                    "{:?}",
                    s.error
                );
            }
            "outbox" => {
                let o = &q.outbox;
                assert_eq!((o.pending, o.failed, o.items.len()), (0, 0, 0));
                assert!(o.error.as_deref().unwrap().contains("outbox"));
            }
            "counts" => {
                let c = &q.counts;
                assert_eq!(c.queued + c.running + c.done + c.failed + c.cancelled, 0);
                assert!(c.error.as_deref().unwrap().contains("job_counts"));
            }
            "serial_gate" => {
                assert!(q.serial_gate.enabled && q.serial_gate.leases.is_empty());
                assert!(q.serial_gate.error.is_some());
            }
            "recent" => {
                assert!(q.recent.is_empty());
                assert!(v["errors"]["recent"].as_str().unwrap().contains("jobs"));
            }
            _ => unreachable!(),
        }

        // The text layout says which block is unavailable instead of failing.
        let (code, text, _) = env.run(&["--format", "text", "queue"]);
        assert_eq!(code, 0);
        assert!(text.contains("unavailable"), "{sql}: {text}");
    }
}

/// Pages SQLite read from the file on this connection so far (cache misses).
fn pages_read(conn: &rusqlite::Connection) -> i64 {
    let (mut cur, mut high) = (0, 0);
    // SAFETY: the handle is valid for the connection's lifetime; sqlite3_db_status only
    // reads counters of that connection.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_status(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_MISS,
            &mut cur,
            &mut high,
            0,
        )
    };
    assert_eq!(rc, 0);
    cur as i64
}

/// SPEC §10 asks `queue` to stay cheap however long the history: on a database of 200k
/// finished jobs, 20k done side effects and 20k finished dependencies, one snapshot reads
/// a few dozen pages, where a single scan of the job history reads thousands. Counted in
/// pages, not timed: SQLite's page cache counters.
#[test]
fn sqlite_only_queue_reads_a_bounded_number_of_pages_on_a_long_history() {
    let env = Env::sqlite();
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "LIVE-1",
        "--stage",
        "development",
    ]);
    env.db().batch(
        "BEGIN;
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000)
             INSERT INTO tasks (work_item_id, repo, branch, stage)
                 SELECT 'OLD-' || x, 'demo', 'feature/OLD-' || x, 'done' FROM n;
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 200000)
             INSERT INTO jobs (agent, repo, task_id, status, attempts, error)
                 SELECT 'developer', 'demo', 2 + x % 20000, 'done', 1, 'an old run' FROM n;
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000)
             INSERT INTO outbox (task_id, kind, payload, status)
                 SELECT 2 + x % 20000, 'notify', '{}', 'done' FROM n;
             WITH RECURSIVE n(x) AS (SELECT 3 UNION ALL SELECT x + 1 FROM n WHERE x < 20001)
             INSERT INTO task_deps (task_id, depends_on) SELECT x, x - 1 FROM n;
             COMMIT;",
    );

    let ctx = env.ctx();
    let conn = ctx.store.sqlite().unwrap().connection();
    let before = pages_read(conn);
    let snap = orchctl::queue::snapshot(&ctx, 10);
    let snapshot_pages = pages_read(conn) - before;
    assert_eq!(snap["counts"]["done"], 200000, "{snap}");
    assert_eq!(snap["counts"]["queued"], 1);
    assert_eq!(broken_blocks(&snap), Vec::<String>::new());

    // The yardstick: one scan of the job history on a cold connection.
    drop(ctx);
    let ctx = env.ctx();
    let conn = ctx.store.sqlite().unwrap().connection();
    let before = pages_read(conn);
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM jobs WHERE error = 'an old run'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let scan_pages = pages_read(conn) - before;
    assert_eq!(n, 200000);
    assert!(
        snapshot_pages * 20 < scan_pages,
        "queue read {snapshot_pages} pages; one scan of the jobs reads {scan_pages}"
    );
    assert!(snapshot_pages < 200, "queue read {snapshot_pages} pages");
}
