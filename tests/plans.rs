//! Query plans (SPEC §10): the commands that run once per event or cron tick — claim,
//! complete, stop, reap, queue and reconcile — must cost the same with a million jobs of history as
//! with a thousand, so none of their queries may read a history table whole.
//!
//! Each command runs through the library on a real database, exercising its branches. The
//! store's statement cache then holds every statement it ran — the exact SQL in use, not a
//! copy — and each is explained with `EXPLAIN QUERY PLAN` (trigger programs included). A
//! `SCAN` of a table that grows with history (or of one of its indexes) fails the test.
//! Plans do not depend on the amount of data (orchctl never runs ANALYZE), so a small
//! database shows the plans a large one gets.

use std::collections::BTreeSet;

use orchctl::claim::{self, ClaimRequest};
use orchctl::jobs::{self, ReapOptions, RunOutcome};
use orchctl::stop::{self, StopOptions};
use orchctl::{metrics, prune, queue, reconcile, Ctx};

use crate::common::Env;

/// A recorded launch on this machine (pid, start time).
fn launch(ctx: &Ctx, pid: i64, proc_start: i64) -> orchctl::store::Launch {
    orchctl::store::Launch {
        pid,
        proc_start,
        host: ctx.host().into(),
        boot_id: None,
    }
}

/// Tables that grow with history.
const HISTORY: [&str; 6] = [
    "jobs",
    "tasks",
    "task_events",
    "outbox",
    "task_deps",
    "plane_deliveries",
];

/// Scans that stop early however long the history: (a fragment of the statement, why).
const BOUNDED: [(&str, &str); 2] = [
    (
        "FROM jobs ORDER BY id DESC LIMIT ?1",
        "the newest jobs, read backwards by rowid: stops after LIMIT rows",
    ),
    (
        "SELECT EXISTS(SELECT 1 FROM task_deps)",
        "whether any dependency exists: stops at the first row",
    ),
];

/// Indexes whose one key value stands for most of the history (`stage = 'done'`): a
/// search in them reads history as surely as a scan.
const HISTORY_KEYS: [&str; 1] = ["tasks_stage"];

/// Partial indexes that hold live rows only, so reading one whole costs the live work,
/// not the history: (index, what it holds).
const LIVE_INDEXES: [(&str, &str); 3] = [
    ("tasks_live", "tasks not done or cancelled"),
    ("tasks_cancel_pending", "live tasks with a deferred STOP"),
    ("outbox_status", "side effects not done"),
];

/// Tables that grow with the live set: read whole, they cost the live work, which SPEC §10
/// bounds too (`queue` with 200k live tasks within 1.3× of 150).
const LIVE_TABLES: [&str; 1] = ["task_waits"];

/// Statements that read every live task on purpose, through `tasks_live`: (a fragment of
/// the statement, why). Any other plan that walks `tasks_live` is a planner's guess.
const WHOLE_LIVE_SET: [(&str, &str); 1] = [(
    "FROM tasks WHERE stage NOT IN ('done', 'cancelled') ORDER BY id",
    "reconcile's Plane pass compares every live task with Plane (only when Plane is configured)",
)];

/// Partial indexes made for one read each: a statement that uses one must name it with
/// `INDEXED BY`, so that no planner guess (there are no statistics) picks a wider one, and
/// the statements that read these sets must use them.
const OWN_INDEXES: [(&str, &str); 2] = [
    (
        "tasks_cancel_pending",
        "FROM tasks INDEXED BY tasks_cancel_pending",
    ),
    (
        "task_waits_kind",
        "FROM task_waits INDEXED BY task_waits_kind",
    ),
];

/// The table each name in `sql` can stand for: the table itself and its aliases
/// (`FROM jobs j`, `JOIN tasks AS t`).
fn aliases(sql: &str) -> Vec<(String, String)> {
    const KEYWORDS: [&str; 16] = [
        "WHERE",
        "SET",
        "ON",
        "LEFT",
        "JOIN",
        "INNER",
        "CROSS",
        "ORDER",
        "GROUP",
        "LIMIT",
        "USING",
        "UNION",
        "VALUES",
        "RETURNING",
        "AND",
        "DEFAULT",
    ];
    let words: Vec<&str> = sql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let Some(table) = HISTORY.iter().find(|t| t.eq_ignore_ascii_case(w)) else {
            continue;
        };
        out.push((table.to_string(), table.to_string()));
        let mut next = words.get(i + 1).copied();
        if next.is_some_and(|n| n.eq_ignore_ascii_case("AS")) {
            next = words.get(i + 2).copied();
        }
        if let Some(n) = next.filter(|n| !KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(n))) {
            out.push((n.to_string(), table.to_string()));
        }
    }
    out
}

/// The full scans of history tables in the plan of `sql`, as "table: plan line".
fn full_scans(ctx: &Ctx, sql: &str) -> Vec<String> {
    if BOUNDED
        .iter()
        .any(|(fragment, _)| one_line(sql).contains(fragment))
    {
        return Vec::new();
    }
    let names = aliases(sql);
    let plan = ctx.store.sqlite().unwrap().explain(sql).unwrap();
    let mut out = Vec::new();
    let flat = one_line(sql);
    for line in &plan {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.contains(&"tasks_live") && !WHOLE_LIVE_SET.iter().any(|(f, _)| flat.contains(f)) {
            out.push(format!("the whole live set, by a planner's guess: {line}"));
            continue;
        }
        for (index, _) in OWN_INDEXES {
            if words.contains(&index) && !flat.contains(&format!("INDEXED BY {index}")) {
                out.push(format!("{index} used without INDEXED BY: {line}"));
            }
        }
        if let Some(rest) = line.trim().strip_prefix("SCAN ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if LIVE_TABLES.contains(&name) {
                out.push(format!("{name}: the whole live set: {line}"));
                continue;
            }
        }
        if HISTORY_KEYS
            .iter()
            .any(|i| line.split_whitespace().any(|w| w == *i))
        {
            out.push(format!("history by key: {line}"));
            continue;
        }
        let Some(rest) = line.trim().strip_prefix("SCAN ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let name = words.first().copied().unwrap_or_default();
        let index = words
            .iter()
            .position(|w| *w == "INDEX")
            .and_then(|i| words.get(i + 1));
        if index.is_some_and(|i| LIVE_INDEXES.iter().any(|(live, _)| live == i)) {
            continue;
        }
        if let Some((_, table)) = names
            .iter()
            .find(|(n, _)| n == name)
            .filter(|(_, table)| HISTORY.contains(&table.as_str()))
        {
            out.push(format!("{table}: {line}"));
        }
    }
    out
}

/// Every statement `ctx` ran, checked; returns them for the callers' own assertions.
fn check_plans(command: &str, ctx: &Ctx) -> Vec<String> {
    let statements = ctx.store.sqlite().unwrap().prepared_sql();
    let mut bad = Vec::new();
    for sql in &statements {
        for scan in full_scans(ctx, sql) {
            bad.push(format!("{scan}\n    in: {}", one_line(sql)));
        }
    }
    assert!(
        bad.is_empty(),
        "`{command}` reads a history table whole:\n  {}",
        bad.join("\n  ")
    );
    statements
}

fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn ctx(env: &Env) -> Ctx {
    let ctx = env.ctx();
    // Every statement of the command stays cached, so none escapes the check.
    ctx.store
        .sqlite()
        .unwrap()
        .connection()
        .set_prepared_statement_cache_capacity(1000);
    ctx
}

fn add(env: &Env, work_item: &str, stage: &str, extra: &[&str]) -> i64 {
    let mut args = vec![
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        work_item,
        "--stage",
        stage,
    ];
    args.extend(extra);
    env.json(&args)["task"]["id"].as_i64().unwrap()
}

/// A database with some history and live work of every kind the commands act on.
fn world() -> Env {
    let env = Env::sqlite();
    for i in 0..5 {
        let t = env.make_task(&format!("PL-H{i}"), &format!("ORCH-H{i}"), "done", None);
        env.make_job(t, "done", None, Some(100 + i));
    }
    let dep = add(&env, "ORCH-1", "analysis", &[]);
    add(
        &env,
        "ORCH-2",
        "development",
        &["--depends-on", &dep.to_string()],
    );
    add(&env, "ORCH-3", "development", &[]);
    add(&env, "ORCH-4", "review", &[]);
    let deploy = env.make_task("PL-5", "ORCH-5", "deploy", None);
    env.make_job_full(deploy, "deployer", "queued", None, None, None, 0, 2);
    env
}

#[test]
fn the_checker_finds_a_full_scan_of_jobs() {
    let env = world();
    let ctx = ctx(&env);
    let scans = full_scans(&ctx, "SELECT j.id FROM jobs j WHERE j.error = ?1");
    assert_eq!(scans.len(), 1, "{scans:?}");
    assert!(scans[0].starts_with("jobs: SCAN j"), "{scans:?}");
    // ... a count of finished tasks by stage, which reads an entry per finished task ...
    let by_key = full_scans(
        &ctx,
        "SELECT count(*) FROM tasks WHERE stage IN ('done', 'cancelled')",
    );
    assert_eq!(by_key.len(), 1, "{by_key:?}");
    // ... and accepts a search by index.
    assert!(full_scans(&ctx, "SELECT id FROM jobs WHERE status = 'running'").is_empty());
}

#[test]
fn claim_never_scans_history() {
    let env = world();
    let ctx = ctx(&env);
    // The plain claim, a filtered one, a deployer under the serial gate (takes the lease),
    // a launch, and one that finds nothing.
    claim::claim(&ctx, &ClaimRequest::default())
        .unwrap()
        .unwrap();
    let filtered = ClaimRequest {
        agents: vec!["deployer".into(), "reviewer".into()],
        repo: Some("orchestrator".into()),
        exec: Vec::new(),
    };
    claim::claim(&ctx, &filtered).unwrap().unwrap();
    let launched = ClaimRequest {
        exec: vec!["true".into()],
        ..Default::default()
    };
    claim::claim(&ctx, &launched).unwrap().unwrap();
    while claim::claim(&ctx, &ClaimRequest::default())
        .unwrap()
        .is_some()
    {}
    let sql = check_plans("claim", &ctx);
    assert!(
        sql.iter().any(|s| s.contains("j.status = 'queued'")),
        "the claim query itself was checked: {sql:#?}"
    );
    assert!(sql.iter().any(|s| s.contains("INSERT INTO merge_leases")));
}

#[test]
fn complete_never_scans_history() {
    let env = world();
    let ctx = ctx(&env);
    // Success (advances the pipeline), failure with attempts left (requeue), final
    // failure (notification), a stale run, and the deployer's success (finalize).
    let mut runs = Vec::new();
    while let Some(c) = claim::claim(&ctx, &ClaimRequest::default()).unwrap() {
        runs.push(c);
    }
    assert!(runs.len() >= 4, "{runs:?}");
    let ok = RunOutcome::Success;
    let fail = RunOutcome::Failure(Some("tests failed".into()));
    for c in &runs {
        let outcome = if c.agent == "developer" { &fail } else { &ok };
        jobs::complete(&ctx, c.id, c.run_id, outcome).unwrap();
    }
    let again = claim::claim(&ctx, &ClaimRequest::default())
        .unwrap()
        .unwrap();
    jobs::complete(&ctx, again.id, again.run_id, &fail).unwrap();
    let stale = jobs::complete(&ctx, again.id, again.run_id, &ok).unwrap();
    assert_eq!(stale.note, "stale-run");
    let sql = check_plans("complete", &ctx);
    assert!(sql
        .iter()
        .any(|s| s.contains("UPDATE jobs SET status = ?3")));
}

#[test]
fn stop_never_scans_history() {
    let env = world();
    // A running job whose agent is gone, a queued one, a task in its deploy window (the
    // deferred cancel), a terminal task and a reference that matches nothing.
    let c = env.ctx();
    let running = claim::claim(&c, &ClaimRequest::default()).unwrap().unwrap();
    c.store
        .write(|w| w.record_launch(running.id, running.run_id, &launch(&c, 999_999, 1)))
        .unwrap();
    drop(c);
    let critical = env.make_task("PL-9", "ORCH-9", "deploy", None);
    env.make_job_full(critical, "deployer", "queued", None, None, None, 0, 2);
    env.json(&["deploy-begin", "ORCH-9"]);

    let ctx = ctx(&env);
    let opts = StopOptions::operator(None, false);
    let r = stop::stop(&ctx, running.work_item_id.as_deref().unwrap(), &opts).unwrap();
    assert_eq!(r.note, "cancelled");
    assert_eq!(stop::stop(&ctx, "ORCH-3", &opts).unwrap().note, "cancelled");
    let d = stop::stop(&ctx, "PL-9", &opts).unwrap();
    assert_eq!(d.note, "deferred-critical-window");
    assert_eq!(
        stop::stop(&ctx, "ORCH-H0", &opts).unwrap().note,
        "already-terminal:done"
    );
    assert_eq!(stop::stop(&ctx, "ORCH-404", &opts).unwrap().note, "no-task");
    let sql = check_plans("stop", &ctx);
    assert!(sql
        .iter()
        .any(|s| s.contains("UPDATE tasks SET stage = 'cancelled'")));
    assert!(sql.iter().any(|s| s.contains("UPDATE outbox SET")));
}

#[test]
fn reap_never_scans_history() {
    let env = world();
    let c = env.ctx();
    // A dead agent, a run without a pid (judged by age), and a run of a cancelled task.
    let dead = claim::claim(&c, &ClaimRequest::default()).unwrap().unwrap();
    c.store
        .write(|w| w.record_launch(dead.id, dead.run_id, &launch(&c, 999_999, 1)))
        .unwrap();
    claim::claim(&c, &ClaimRequest::default()).unwrap().unwrap();
    let doomed = claim::claim(&c, &ClaimRequest::default()).unwrap().unwrap();
    c.store
        .write(|w| {
            w.record_launch(doomed.id, doomed.run_id, &launch(&c, 999_998, 1))?;
            w.mark_task_cancelled(doomed.task_id.unwrap(), "test")
        })
        .unwrap();
    drop(c);

    let ctx = ctx(&env);
    let r = jobs::reap(
        &ctx,
        ReapOptions {
            dry_run: false,
            recover: false,
        },
    )
    .unwrap();
    assert_eq!((r.requeued, r.cancelled, r.alive), (1, 1, 1), "{r:?}");
    let sql = check_plans("reap", &ctx);
    assert!(sql.iter().any(|s| s.contains("WHERE status = 'running'")));
}

#[test]
fn queue_never_scans_history() {
    let env = world();
    let c = env.ctx();
    stop::stop(&c, "ORCH-4", &StopOptions::operator(None, false)).unwrap();
    drop(c);
    let ctx = ctx(&env);
    let snapshot = queue::snapshot(&ctx, 10);
    for block in [
        "counts",
        "serial_gate",
        "task_deps",
        "recent",
        "outbox",
        "stop",
    ] {
        assert!(
            snapshot[block].get("error").is_none(),
            "{block}: {snapshot}"
        );
    }
    let sql: BTreeSet<String> = check_plans("queue", &ctx).into_iter().collect();
    assert!(sql.len() >= 8, "{sql:#?}");
}

#[test]
fn reconcile_never_scans_history() {
    let env = world();
    let c = env.ctx();
    stop::stop(&c, "ORCH-4", &StopOptions::operator(None, false)).unwrap();
    drop(c);
    let ctx = ctx(&env);
    let r = reconcile::reconcile(&ctx).unwrap();
    assert_eq!(r.skipped_terminal, 6, "{r:?}");
    check_plans("reconcile", &ctx);
}

/// The counters that replace counting rows must agree with the rows, whatever wrote them:
/// the commands, or plain SQL as the seed's tests and operators do.
#[test]
fn the_counters_match_the_rows() {
    let env = world();
    let ctx = env.ctx();
    while let Some(c) = claim::claim(&ctx, &ClaimRequest::default()).unwrap() {
        jobs::complete(&ctx, c.id, c.run_id, &RunOutcome::Success).unwrap();
    }
    stop::stop(&ctx, "ORCH-1", &StopOptions::operator(None, false)).unwrap();
    drop(ctx);
    let sql = env.db();
    sql.batch(
        "UPDATE tasks SET stage = 'review' WHERE work_item_id = 'ORCH-3';
         DELETE FROM jobs WHERE task_id = (SELECT id FROM tasks WHERE work_item_id = 'ORCH-H1');
         DELETE FROM tasks WHERE work_item_id = 'ORCH-H1';",
    );
    let mismatches = |counted: &str, kept: &str, key: &str| -> i64 {
        sql.count(&format!(
            "SELECT count(*) FROM ({counted}) g FULL JOIN {kept} k USING ({key})
             WHERE coalesce(g.n, 0) <> coalesce(k.n, 0)"
        ))
    };
    assert_eq!(
        mismatches(
            "SELECT status, count(*) AS n FROM jobs GROUP BY status",
            "job_counts",
            "status"
        ),
        0
    );
    assert_eq!(
        mismatches(
            "SELECT stage, count(*) AS n FROM tasks GROUP BY stage",
            "task_counts",
            "stage"
        ),
        0
    );
    let ctx = env.ctx();
    let q = queue::snapshot(&ctx, 10);
    assert_eq!(
        q["stop"]["cancelled_count"],
        env.count("SELECT count(*) FROM tasks WHERE stage = 'cancelled'")
    );
}

/// The deploy window's commands and the operator's stand-ins for Plane (SPEC §7, §14).
#[test]
fn operator_and_deploy_commands_never_scan_history() {
    use orchctl::deploy::{self, Outcome};
    use orchctl::pipeline::Trigger;
    use orchctl::transitions;

    let env = world();
    // A parked analysis, a failed developer, a task parked in deploy.
    let parked = env.make_task("PL-20", "ORCH-20", "analysis", None);
    env.make_job_full(parked, "analyst", "done", None, None, Some(200), 1, 2);
    let failed = env.make_task("PL-21", "ORCH-21", "development", None);
    env.make_job_full(failed, "developer", "failed", None, None, Some(201), 2, 2);
    let rejected = env.make_task("PL-22", "ORCH-22", "review", None);
    env.make_task("PL-23", "ORCH-23", "deploy", None);
    let ctx = ctx(&env);
    transitions::operate(&ctx, "ORCH-20", Trigger::Approved, None).unwrap();
    transitions::operate(&ctx, "ORCH-21", Trigger::Retry, None).unwrap();
    transitions::operate(&ctx, &rejected.to_string(), Trigger::Rejected, Some("no")).unwrap();
    transitions::operate(&ctx, "ORCH-23", Trigger::ConfirmDeploy, None).unwrap();
    // Refused ones run their checks too.
    transitions::operate(&ctx, "ORCH-20", Trigger::Approved, None).unwrap_err();
    transitions::operate(&ctx, "ORCH-H0", Trigger::Retry, None).unwrap_err();
    deploy::begin(&ctx, "ORCH-23").unwrap();
    deploy::begin(&ctx, "ORCH-23").unwrap();
    deploy::finalize(&ctx, "ORCH-22", Outcome::Success).unwrap_err();
    deploy::finalize(&ctx, "ORCH-23", Outcome::Success).unwrap();
    let sql = check_plans(
        "approve/reject/confirm-deploy/retry/deploy-begin/finalize-deploy",
        &ctx,
    );
    assert!(
        sql.iter().any(|s| s.contains("INSERT INTO jobs")),
        "{sql:#?}"
    );
    assert!(sql.iter().any(|s| s.contains("DELETE FROM deploy_markers")));
}

/// Each live set `queue` (and reconcile) reads goes through the index made for it: the
/// pending stops through `tasks_cancel_pending`, the waiting tasks through
/// `task_waits_kind` (today's planner would take `tasks_live`, every live task, for the
/// first had the statement not named its index).
#[test]
fn each_live_set_is_read_through_its_own_index() {
    let env = world();
    let c = env.ctx();
    // Something in every live set: a deferred stop, a parked task, a failed one.
    let deploy = env.make_task("PL-30", "ORCH-30", "deploy", None);
    env.json(&["deploy-begin", "ORCH-30"]);
    stop::stop(&c, "ORCH-30", &StopOptions::operator(None, false)).unwrap();
    let parked = env.make_task("PL-31", "ORCH-31", "analysis", None);
    env.make_job_full(parked, "analyst", "done", None, None, Some(300), 1, 2);
    drop(c);
    let ctx = ctx(&env);
    let q = queue::snapshot(&ctx, 10);
    assert_eq!(q["stop"]["deferred_pending"], 1, "{q}");
    assert_eq!(q["awaiting"]["counts"]["approval"], 1, "{q}");
    assert!(q["awaiting"].get("error").is_none(), "{q}");
    reconcile::reconcile(&ctx).unwrap();
    let sql = check_plans("queue + reconcile", &ctx);
    for (index, fragment) in OWN_INDEXES {
        let users: Vec<&String> = sql
            .iter()
            .filter(|s| one_line(s).contains(fragment))
            .collect();
        assert!(!users.is_empty(), "no statement reads {fragment}: {sql:#?}");
        for s in users {
            let plan = ctx.store.sqlite().unwrap().explain(s).unwrap();
            assert!(
                plan.iter()
                    .any(|l| l.split_whitespace().any(|w| w == index)),
                "{s}\n  does not use {index}: {plan:?}"
            );
        }
    }
    // The checker itself: the old statement of pending cancels is a planner's guess.
    let guess = "SELECT id FROM tasks WHERE cancel_requested_at IS NOT NULL \
                 AND stage NOT IN ('done', 'cancelled') ORDER BY id";
    assert!(
        !full_scans(&ctx, guess).is_empty(),
        "{:?}",
        ctx.store.sqlite().unwrap().explain(guess)
    );
    let _ = deploy;
}

/// The plan lines of every statement `ctx` ran whose SQL contains `fragment`.
fn plans_of(ctx: &Ctx, statements: &[String], fragment: &str) -> Vec<String> {
    let found: Vec<&String> = statements.iter().filter(|s| s.contains(fragment)).collect();
    assert!(
        !found.is_empty(),
        "no statement with {fragment:?}: {statements:#?}"
    );
    found
        .into_iter()
        .flat_map(|s| ctx.store.sqlite().unwrap().explain(s).unwrap())
        .collect()
}

#[test]
fn metrics_never_scans_history_and_each_read_has_its_index() {
    let env = world();
    let c = env.ctx();
    // A running job, a stopped task (its side effects, a dependent blocked by it): the
    // first claim takes ORCH-1's analyst, which the stop cancels, the second ORCH-3's.
    claim::claim(&c, &ClaimRequest::default()).unwrap().unwrap();
    claim::claim(&c, &ClaimRequest::default()).unwrap().unwrap();
    stop::stop(&c, "ORCH-1", &StopOptions::operator(None, false)).unwrap();
    drop(c);
    let ctx = ctx(&env);
    let m = metrics::collect(&ctx).unwrap();
    assert_eq!(m.agents_running.iter().map(|(_, n)| n).sum::<i64>(), 1);
    let sql = check_plans("metrics", &ctx);
    for (fragment, index) in [
        ("FROM job_counts", "job_counts"),
        ("FROM task_counts", "task_counts"),
        ("FROM outbox WHERE status = ?1", "outbox_status"),
        (
            "FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1",
            "jobs_status_id",
        ),
        (
            "FROM jobs WHERE status = 'running' AND (?1 IS NULL OR host = ?1 OR host IS NULL) GROUP BY agent",
            "jobs_status_id",
        ),
        ("FROM merge_leases", "merge_leases"),
        ("FROM awaiting_counts", "awaiting_counts"),
    ] {
        let plan = plans_of(&ctx, &sql, fragment);
        assert!(
            plan.iter().any(|l| l.contains(index)),
            "{fragment}: {plan:#?}"
        );
    }
}

#[test]
fn prune_never_scans_a_table_it_does_not_prune() {
    let env = world();
    let c = env.ctx();
    stop::stop(&c, "ORCH-4", &StopOptions::operator(None, false)).unwrap();
    drop(c);
    let ctx = ctx(&env);
    for dry_run in [true, false] {
        prune::prune(
            &ctx,
            prune::PruneOptions {
                older_than_days: 0,
                dry_run,
            },
        )
        .unwrap();
    }
    // The pruned tables are walked by key from a cursor (each row read once over all
    // batches); tasks and jobs are only ever looked up by key.
    let sql = check_plans("prune", &ctx);
    for (fragment, step) in [
        (
            "FROM plane_deliveries",
            "USING INTEGER PRIMARY KEY (rowid>?)",
        ),
        (
            "FROM outbox o CROSS JOIN tasks t",
            "USING INTEGER PRIMARY KEY (rowid>?)",
        ),
        (
            "FROM outbox o CROSS JOIN tasks t",
            "SEARCH t USING INTEGER PRIMARY KEY (rowid=?)",
        ),
    ] {
        let plan = plans_of(&ctx, &sql, fragment);
        assert!(
            plan.iter().any(|l| l.contains(step)),
            "{fragment}: {plan:#?}"
        );
    }
}

#[test]
fn dispatch_never_scans_history_and_walks_the_claimable_jobs() {
    let mut env = world();
    let _runs = crate::common::RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_ANALYST", "true")
        .set("ORCH_AGENT_CMD_DEVELOPER", "true")
        .set("ORCH_AGENT_SLOTS_DEVELOPER", "2")
        .set("ORCH_WORKTREE_AGENTS", "none");
    std::fs::create_dir_all(env.repos.join("orchestrator")).unwrap();
    let ctx = ctx(&env);
    let dry = orchctl::dispatch::DispatchRequest {
        dry_run: true,
        ..Default::default()
    };
    orchctl::dispatch::dispatch(&ctx, &dry).unwrap();
    let d = orchctl::dispatch::dispatch(&ctx, &Default::default()).unwrap();
    assert!(!d.launched.is_empty(), "{d:?}");
    // A filtered pass, and a claim of one agent and of all.
    orchctl::dispatch::dispatch(
        &ctx,
        &orchctl::dispatch::DispatchRequest {
            agents: vec!["developer".into()],
            repo: Some("orchestrator".into()),
            dry_run: false,
        },
    )
    .unwrap();
    claim::claim(
        &ctx,
        &ClaimRequest {
            agents: vec!["reviewer".into()],
            ..Default::default()
        },
    )
    .unwrap();
    claim::claim(&ctx, &ClaimRequest::default()).unwrap();
    let sql = check_plans("dispatch", &ctx);
    for (fragment, index) in [
        ("INDEXED BY jobs_claimable_agent", "jobs_claimable_agent"),
        ("INDEXED BY jobs_claimable LEFT", "jobs_claimable"),
        (
            "FROM jobs WHERE status = 'running' AND (?1 IS NULL OR host = ?1 OR host IS NULL) GROUP BY agent",
            "jobs_status_id",
        ),
    ] {
        let plan = plans_of(&ctx, &sql, fragment);
        assert!(
            plan.iter().any(|l| l.contains(index)),
            "{fragment}: {plan:#?}"
        );
    }
}
