//! Operators without Plane (SPEC §14) and the deploy window's guards (SPEC §7):
//! `approve`, `reject`, `confirm-deploy` and `retry` make exactly the moves Plane's states
//! make through `event` (one implementation, proven on twin tasks), refuse everything
//! else with exit 1 and an untouched database, and `queue`, `task show` and `stop` say what
//! waits on people. Real databases, the real binary, Plane as an httpmock stub.

use httpmock::prelude::*;
use serde_json::{json, Value};

use crate::common::db::Value as SqlValue;
use crate::common::Env;
use crate::event::{
    bytes, issue_id, sign, to_state, with_plane, APPROVED, CONFIRM_DEPLOY, PROJECT, REJECTED,
    SECRET,
};

// ---------------------------------------------------------------------------- helpers

/// Every row of every table and the schema, as text: "the database is unchanged" means
/// this is equal before and after.
fn dump(env: &Env) -> Vec<String> {
    env.dump().lines().map(String::from).collect()
}

fn add(env: &Env, args: &[&str]) -> (i64, Option<i64>) {
    let mut a = vec!["task", "add", "--repo", "orchestrator"];
    a.extend_from_slice(args);
    let v = env.json(&a);
    (v["task"]["id"].as_i64().unwrap(), v["job"]["id"].as_i64())
}

/// Claims the task's next job and completes it.
fn work(env: &Env, agent: &str, success: bool) -> Value {
    let c = env.json(&["claim", "--agent", agent]);
    let outcome = if success { "--success" } else { "--failure" };
    env.json(&[
        "complete",
        &c["id"].to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        outcome,
    ])
}

fn events(env: &Env, task: i64) -> Vec<Value> {
    env.json(&["task", "log", &task.to_string()])["events"]
        .as_array()
        .unwrap()
        .clone()
}

fn jobs_of(env: &Env, task: i64) -> Vec<String> {
    env.db().values(
        "SELECT agent || ':' || status || ':' || attempts || ':' || coalesce(error, '')
         FROM jobs WHERE task_id = ?1 ORDER BY id",
        [task],
    )
}

/// The rows a transition writes, without ids, keys and times: what twin tasks must share.
fn shape(env: &Env, task: i64) -> Value {
    let t = env.task(task);
    let lease = env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .filter(|l| l.task_id == Some(task))
        .is_some();
    json!({
        "stage": t.stage,
        "cancel_requested": t.cancel_requested_at.is_some(),
        "cancelled": t.cancelled_at.is_some(),
        "cancel_reason": t.cancel_reason,
        "jobs": jobs_of(env, task),
        "holds_lease": lease,
        "awaiting": env.json(&["task", "show", &task.to_string()])["awaiting"],
        "rows": rows_of(env, task),
    })
}

/// The task's row and its jobs' rows, every column: a key, id, title or time is kept as
/// whether it is set (twins differ in those by construction), any other value as it is.
/// "Equal task/job rows" is equal output of this. (What the task waits for, a cache the
/// next write settles, is compared through `task show` above.)
fn rows_of(env: &Env, task: i64) -> Vec<String> {
    // Columns that name the row or the moment rather than what the move did.
    const IDENTITY: &[&str] = &[
        "id",
        "task_id",
        "plane_id",
        "work_item_id",
        "plane_issue_id",
        "branch",
        "title",
        "created_at",
        "updated_at",
        "cancelled_at",
        "cancel_requested_at",
        "claimed_at",
        "finished_at",
        "pid",
        "proc_start",
        "run_id",
    ];
    let db = env.db();
    let mut out = Vec::new();
    for (table, key) in [("tasks", "id"), ("jobs", "task_id")] {
        let names = db.columns(table);
        for row in db.rows(
            &format!("SELECT * FROM {table} WHERE {key} = ?1 ORDER BY id"),
            [task],
        ) {
            let cells: Vec<String> = names
                .iter()
                .zip(&row.0)
                .map(|(name, v)| {
                    if IDENTITY.contains(&name.as_str()) {
                        format!("{name}={}", !matches!(v, SqlValue::Null))
                    } else {
                        match v {
                            SqlValue::Null => format!("{name}=NULL"),
                            SqlValue::Int(x) => format!("{name}={x}"),
                            SqlValue::Real(x) => format!("{name}={x}"),
                            SqlValue::Text(t) => format!("{name}={t:?}"),
                            SqlValue::Bool(b) => format!("{name}={b}"),
                            SqlValue::Blob(b) => format!("{name}=x'{}'", hex::encode(b)),
                        }
                    }
                })
                .collect();
            out.push(format!("{table}: {}", cells.join(" ")));
        }
    }
    out
}

fn deliver_signed(env: &Env, body: &[u8]) -> Value {
    let sig = sign(body);
    let (code, out, err) = env.run_stdin(&["event", "--signature", &sig], body);
    assert_eq!(code, 0, "event failed: {err}");
    serde_json::from_str(&out).unwrap()
}

fn refused(env: &Env, args: &[&str]) -> String {
    let before = dump(env);
    let (code, out, err) = env.run(args);
    assert_eq!(code, 1, "{args:?} should be refused: {out}{err}");
    assert!(out.is_empty(), "{args:?} printed a result: {out}");
    assert_eq!(dump(env), before, "{args:?} changed the database");
    err
}

// ------------------------------------------------------------------- the whole pipeline

#[test]
fn a_task_goes_from_task_add_to_done_with_cli_commands_only() {
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-1", "--title", "Greeting"]);

    assert_eq!(work(&env, "analyst", true)["note"], "parked");
    let q = env.json(&["queue"]);
    assert_eq!(q["awaiting"]["approval"][0]["id"], tid);
    assert_eq!(q["awaiting"]["counts"]["approval"], 1);
    assert_eq!(
        env.json(&["task", "show", "ORCH-1"])["awaiting"],
        "approval"
    );

    // Rejected once: the analyst works again.
    let r = env.json(&["reject", "ORCH-1", "--reason", "too vague"]);
    assert_eq!(r["ok"], true);
    assert_eq!(r["note"], "rejected");
    assert_eq!(r["job"]["agent"], "analyst");
    assert_eq!(r["task"]["stage"], "analysis");
    work(&env, "analyst", true);

    let a = env.json(&["approve", "ORCH-1"]);
    assert_eq!(
        (a["note"].as_str(), a["task"]["stage"].as_str()),
        (Some("approved"), Some("development"))
    );
    assert_eq!(a["job"]["agent"], "developer");
    assert_eq!(a["job"]["status"], "queued");
    assert_eq!(work(&env, "developer", true)["note"], "advanced");

    // A reviewer's failure on its last attempt: the stage is stuck, retry runs it again.
    env.db().execute(
        "UPDATE jobs SET max_attempts = 1 WHERE task_id = ?1 AND agent = 'reviewer'",
        [tid],
    );
    assert_eq!(work(&env, "reviewer", false)["note"], "failed");
    assert_eq!(env.json(&["task", "show", "ORCH-1"])["awaiting"], "retry");
    assert_eq!(env.json(&["queue"])["awaiting"]["failed"][0]["id"], tid);
    let r = env.json(&["retry", "ORCH-1"]);
    assert_eq!(r["note"], "requeued");
    assert_eq!(r["job"]["agent"], "reviewer");
    assert_eq!(r["task"]["stage"], "review");
    assert_eq!(work(&env, "reviewer", true)["note"], "advanced");

    assert_eq!(env.task(tid).stage, "deploy");
    assert_eq!(
        env.json(&["task", "show", "ORCH-1"])["awaiting"],
        "deploy_confirmation"
    );
    let c = env.json(&["confirm-deploy", "ORCH-1"]);
    assert_eq!(c["note"], "confirm-deploy");
    assert_eq!(c["job"]["agent"], "deployer");
    let deployer = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(deployer["task_id"], tid);
    assert_eq!(
        env.json(&["deploy-begin", "ORCH-1"])["note"],
        "lease-already-held"
    );
    let fin = env.json(&["finalize-deploy", "ORCH-1", "--outcome", "success"]);
    assert_eq!(
        (fin["note"].as_str(), fin["outcome"].as_str()),
        (Some("done"), Some("success"))
    );
    assert_eq!(env.task(tid).stage, "done");
    assert!(env.json(&["task", "show", "ORCH-1"])["awaiting"].is_null());
    let q = env.json(&["queue"]);
    for kind in [
        "approval",
        "deploy_confirmation",
        "failed",
        "blocked_by_cancelled",
    ] {
        assert_eq!(q["awaiting"]["counts"][kind], 0, "{kind}: {q}");
    }

    // Every stage move, and every job an operator queued, says it came through the CLI.
    let log = events(&env, tid);
    let moves: Vec<(String, String)> = log
        .iter()
        .filter(|e| e["kind"] == "stage_changed")
        .map(|e| {
            assert_eq!(e["detail"]["source"], "cli", "{e}");
            (
                e["detail"]["from"].as_str().unwrap().to_string(),
                e["detail"]["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = moves
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("analysis", "development"),
            ("development", "review"),
            ("review", "deploy"),
            ("deploy", "done")
        ]
    );
    let by_operator: Vec<&str> = log
        .iter()
        .filter(|e| e["kind"] == "job_queued" && e["detail"].get("action").is_some())
        .map(|e| {
            assert_eq!(e["detail"]["source"], "cli", "{e}");
            e["detail"]["action"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        by_operator,
        ["reject", "approve", "retry", "confirm-deploy"]
    );
    let reject = log
        .iter()
        .find(|e| e["detail"]["action"] == "reject")
        .unwrap();
    assert_eq!(reject["detail"]["reason"], "too vague");
}

// ---------------------------------------------------------------------------- refusals

/// The states a task can be in, each built as a seed test would (plain SQL) or with the
/// commands; returns (name, task reference).
fn every_kind_of_task(env: &Env) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut n = 0;
    let mut task = |name: &'static str, stage: &str, jobs: &[(&str, &str)]| -> i64 {
        n += 1;
        let wi = format!("ORCH-{}", 100 + n);
        let t = env.make_task(&format!("PL-{n}"), &wi, stage, None);
        for (k, (agent, status)) in jobs.iter().enumerate() {
            let running = *status == "running";
            env.make_job_full(
                t,
                agent,
                status,
                None,
                None,
                if running || *status != "queued" {
                    Some(1000 + n * 10 + k as i64)
                } else {
                    None
                },
                if *status == "queued" { 0 } else { 2 },
                2,
            );
        }
        out.push((name, wi));
        t
    };
    task(
        "analysis, analyst queued",
        "analysis",
        &[("analyst", "queued")],
    );
    task(
        "analysis, analyst running",
        "analysis",
        &[("analyst", "running")],
    );
    task("analysis, parked", "analysis", &[("analyst", "done")]);
    task(
        "analysis, analyst failed",
        "analysis",
        &[("analyst", "failed")],
    );
    task(
        "development, developer queued",
        "development",
        &[("analyst", "done"), ("developer", "queued")],
    );
    task(
        "development, developer running",
        "development",
        &[("developer", "running")],
    );
    task(
        "development, developer failed",
        "development",
        &[("developer", "failed")],
    );
    task(
        "review, reviewer queued",
        "review",
        &[("reviewer", "queued")],
    );
    task("review, reviewer done", "review", &[("reviewer", "done")]);
    task(
        "review, reviewer failed",
        "review",
        &[("reviewer", "failed")],
    );
    task("deploy, parked", "deploy", &[("reviewer", "done")]);
    task(
        "deploy, deployer queued",
        "deploy",
        &[("deployer", "queued")],
    );
    task(
        "deploy, deployer running",
        "deploy",
        &[("deployer", "running")],
    );
    task(
        "deploy, deployer failed",
        "deploy",
        &[("deployer", "failed")],
    );
    task("deploy, deploy initiated", "deploy", &[]);
    task("done", "done", &[("deployer", "done")]);
    task("cancelled", "cancelled", &[("developer", "cancelled")]);
    let pending = task(
        "development, STOP pending",
        "development",
        &[("developer", "failed")],
    );
    env.ctx()
        .store
        .write(|w| w.set_cancel_requested(pending, "a stop in a window"))
        .unwrap();
    let initiated = out
        .iter()
        .find(|(name, _)| *name == "deploy, deploy initiated")
        .unwrap()
        .1
        .clone();
    env.json(&["deploy-begin", &initiated]);
    out
}

/// Where each command applies, by the names above.
fn applies(command: &str, case: &str) -> bool {
    let ok: &[&str] = match command {
        "approve" => &["analysis, parked", "analysis, analyst failed"],
        "reject" => &[
            "analysis, parked",
            "analysis, analyst failed",
            "review, reviewer done",
            "review, reviewer failed",
            "deploy, parked",
            "deploy, deployer failed",
        ],
        "confirm-deploy" => &["deploy, parked", "deploy, deployer failed"],
        "retry" => &[
            "analysis, analyst failed",
            "development, developer failed",
            "review, reviewer failed",
            "deploy, deployer failed",
        ],
        _ => unreachable!(),
    };
    ok.contains(&case)
}

#[test]
fn each_operator_command_is_refused_wherever_it_does_not_apply_and_changes_nothing() {
    let env = Env::new();
    let cases = every_kind_of_task(&env);
    let mut refusals = 0;
    for command in ["approve", "reject", "confirm-deploy", "retry"] {
        for (case, reference) in &cases {
            if applies(command, case) {
                continue;
            }
            let err = refused(&env, &[command, reference]);
            let lines: Vec<&str> = err.lines().collect();
            assert_eq!(lines.len(), 1, "{command} {case}: one line: {err}");
            let stage = case.split(',').next().unwrap();
            if case.contains("STOP pending") {
                assert!(err.contains("STOP pending"), "{command} {case}: {err}");
            }
            assert!(
                err.contains(&format!("is {stage}")) || err.contains(&format!("in {stage}")),
                "{command} on a task {case}: the line names its stage: {err}"
            );
            refusals += 1;
        }
        // An unknown task (a number and a key).
        for unknown in ["9999", "ORCH-404"] {
            let err = refused(&env, &[command, unknown]);
            assert!(err.starts_with("orchctl: no task matches"), "{err}");
            refusals += 1;
        }
    }
    assert_eq!(refusals, 4 * 18 + 8 - 14, "every pair was tried");
    // ... and where it applies, it does change something.
    for command in ["approve", "reject", "confirm-deploy", "retry"] {
        let env = Env::new();
        for (case, reference) in every_kind_of_task(&env) {
            if applies(command, case) {
                let before = dump(&env);
                let r = env.json(&[command, &reference]);
                assert_eq!(r["ok"], true, "{command} {case}: {r}");
                assert!(r["job"]["id"].is_i64(), "{command} {case}: {r}");
                assert_ne!(dump(&env), before, "{command} {case}");
            }
        }
    }
}

#[test]
fn the_kill_switch_does_not_stop_an_operator() {
    let mut env = Env::new();
    env.set("ORCH_STOP_ENABLED", "off");
    let t = env.make_task("PL-1", "ORCH-1", "analysis", None);
    env.make_job_full(t, "analyst", "done", None, None, Some(1), 1, 2);
    assert_eq!(
        env.json(&["approve", "ORCH-1"])["task"]["stage"],
        "development"
    );
}

// ------------------------------------------------------------------ one implementation

#[test]
fn a_plane_delivery_and_the_command_leave_twin_tasks_equal() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    // (setup, Plane state, command): each pair of twins starts alike.
    type Setup = fn(&Env, i64);
    let parked_analysis: Setup = |env, t| {
        env.make_job_full(t, "analyst", "done", None, None, Some(t * 10), 1, 2);
    };
    let nothing: Setup = |_, _| {};
    let failed_deployer_with_lease: Setup = |env, t| {
        env.make_job_full(t, "deployer", "failed", None, None, Some(t * 10), 2, 2);
        let branch = env.task(t).branch.unwrap();
        env.ctx()
            .store
            .write(|w| w.acquire_lease("orchestrator", &branch, t))
            .unwrap();
    };
    let running_analyst: Setup = |env, t| {
        env.make_job_full(t, "analyst", "running", None, None, Some(t * 10), 1, 2);
    };
    let cases: [(&str, Setup, &str, &[&str]); 7] = [
        ("analysis", parked_analysis, APPROVED, &["approve"]),
        ("analysis", parked_analysis, REJECTED, &["reject"]),
        ("review", nothing, REJECTED, &["reject"]),
        ("deploy", failed_deployer_with_lease, REJECTED, &["reject"]),
        ("deploy", nothing, CONFIRM_DEPLOY, &["confirm-deploy"]),
        // Refused by both: wrong stage, and a job still running.
        ("development", nothing, APPROVED, &["approve"]),
        ("analysis", running_analyst, APPROVED, &["approve"]),
    ];
    let mut n = 0;
    for (stage, setup, state, command) in cases {
        n += 1;
        let (plane_issue, cli_issue) = (issue_id(2 * n), issue_id(2 * n + 1));
        let repo = "orchestrator";
        let via_plane =
            env.make_task_in(&plane_issue, &format!("ORCH-{}", 2 * n), stage, repo, None);
        let via_cli = env.make_task_in(
            &cli_issue,
            &format!("ORCH-{}", 2 * n + 1),
            stage,
            repo,
            None,
        );
        setup(&env, via_plane);
        let before_plane = shape(&env, via_plane);
        let r = deliver_signed(&env, &bytes(&to_state(&plane_issue, state)));
        // The first twin's move released its lease (if it had one) before the second
        // twin takes the same repo's lease: otherwise they would not start alike.
        setup(&env, via_cli);
        let before_cli = shape(&env, via_cli);
        assert_eq!(before_plane, before_cli, "{stage}: twins start alike");
        let mut args: Vec<&str> = command.to_vec();
        let reference = format!("ORCH-{}", 2 * n + 1);
        args.push(&reference);
        let (code, _, err) = env.run(&args);
        let applied = r["action"] == "job_queued";
        assert_eq!(
            code == 0,
            applied,
            "{stage} {command:?}: event {r} / cli {err}"
        );
        assert_eq!(
            shape(&env, via_plane),
            shape(&env, via_cli),
            "{stage} {command:?}: event {r}"
        );
        if !applied {
            assert_eq!(
                shape(&env, via_cli),
                before_cli,
                "{stage}: refused, unchanged"
            );
        }
        // Plane's rows say plane, the command's say cli.
        let source = |t: i64| -> Vec<String> {
            events(&env, t)
                .iter()
                .filter(|e| e["kind"] == "stage_changed" || e["kind"] == "job_queued")
                .map(|e| e["detail"]["source"].as_str().unwrap_or("none").to_string())
                .collect()
        };
        assert!(
            source(via_plane).iter().all(|s| s == "plane"),
            "{:?}",
            source(via_plane)
        );
        assert!(
            source(via_cli).iter().all(|s| s == "cli"),
            "{:?}",
            source(via_cli)
        );
        // Clean up the lease so the next pair starts from a free one.
        env.db().execute("DELETE FROM merge_leases", ());
    }
}

// ------------------------------------------------------------------ Plane is told

#[test]
fn an_operator_move_is_commented_on_the_plane_issue_when_plane_is_configured() {
    let server = MockServer::start();
    let comment = server.mock(|when, then| {
        when.method(POST)
            .path(format!(
                "/api/v1/workspaces/acme/projects/{PROJECT}/issues/{}/comments/",
                issue_id(1)
            ))
            .body_contains("orchctl approve")
            .body_contains("external_source");
        then.status(201).json_body(json!({ "id": "c-1" }));
    });
    let mut env = Env::new();
    let t = env.make_task(&issue_id(1), "ORCH-1", "analysis", None);
    crate::event::set_project(&env, t, PROJECT);
    env.make_job_full(t, "analyst", "done", None, None, Some(1), 1, 2);
    // Without Plane configured: no comment is even written down.
    let quiet = env.make_task("PL-quiet", "ORCH-2", "analysis", None);
    env.json(&["approve", "ORCH-2"]);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM outbox WHERE task_id = {quiet}"
        )),
        0
    );

    with_plane(&mut env, &server);
    let r = env.json(&["approve", "ORCH-1"]);
    assert_eq!(r["effects"][0]["kind"], "plane_comment", "{r}");
    assert_eq!(r["effects"][0]["status"], "done", "{r}");
    comment.assert_hits(1);
    // A task without a Plane issue gets none, Plane configured or not.
    add(&env, &["--work-item", "ORCH-3", "--stage", "deploy"]);
    let r = env.json(&["confirm-deploy", "ORCH-3"]);
    assert!(r.get("effects").is_none(), "{r}");
    comment.assert_hits(1);
}

// ------------------------------------------------------------------ the deploy window

#[test]
fn deploy_begin_on_a_task_in_analysis_is_refused_and_a_stop_is_then_a_full_reset() {
    let env = Env::new();
    add(&env, &["--work-item", "ORCH-1"]);
    let err = refused(&env, &["deploy-begin", "ORCH-1"]);
    assert!(err.contains("is in analysis"), "{err}");
    assert!(env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .is_none());
    assert_eq!(env.count("SELECT count(*) FROM deploy_markers"), 0);
    let stop = env.json(&["stop", "ORCH-1"]);
    assert_eq!(stop["note"], "cancelled", "{stop}");
    assert_eq!(stop["deferred"], false);

    // Terminal tasks and tasks in any other live stage are refused the same way.
    for stage in ["development", "review"] {
        let wi = format!("ORCH-{stage}");
        add(&env, &["--work-item", &wi, "--stage", stage]);
        let err = refused(&env, &["deploy-begin", &wi]);
        assert!(err.contains(&format!("is in {stage}")), "{err}");
    }
    let err = refused(&env, &["deploy-begin", "1"]);
    assert!(err.contains("is cancelled"), "{err}");
    let (done, _) = add(&env, &["--work-item", "ORCH-done", "--stage", "deploy"]);
    env.db()
        .execute("UPDATE tasks SET stage = 'done' WHERE id = ?1", [done]);
    let err = refused(&env, &["deploy-begin", "ORCH-done"]);
    assert!(err.contains("is done"), "{err}");
    // In deploy, but with a STOP pending: refused too, naming the stop, nothing changed.
    let (pending, _) = add(&env, &["--work-item", "ORCH-pending", "--stage", "deploy"]);
    env.ctx()
        .store
        .write(|w| w.set_cancel_requested(pending, "a stop"))
        .unwrap();
    let err = refused(&env, &["deploy-begin", "ORCH-pending"]);
    assert!(err.contains("STOP pending"), "{err}");
}

#[test]
fn deploy_begin_twice_is_already_initiated_for_the_holder() {
    let env = Env::new();
    add(&env, &["--work-item", "ORCH-1", "--stage", "deploy"]);
    assert_eq!(
        env.json(&["deploy-begin", "ORCH-1"])["note"],
        "lease-acquired"
    );
    let before = dump(&env);
    let again = env.json(&["deploy-begin", "ORCH-1"]);
    assert_eq!(again["note"], "already-initiated");
    assert_eq!(again["marker"], "initiated");
    assert_eq!(dump(&env), before, "a repeat changes nothing");
}

#[test]
fn finalize_deploy_without_a_deploy_in_progress_changes_nothing_and_bypasses_no_gate() {
    let env = Env::new();
    let (a, _) = add(&env, &["--work-item", "ORCH-1", "--stage", "deploy"]);
    let (b, _) = add(
        &env,
        &[
            "--work-item",
            "ORCH-2",
            "--stage",
            "deploy",
            "--branch",
            "feature/ORCH-1",
        ],
    );
    env.json(&["deploy-begin", "ORCH-1"]);
    // B never began a deploy (it shares A's branch name, even): its finalize is refused,
    // whatever the outcome, and A keeps its lease and its window.
    for outcome in ["success", "failure"] {
        let err = refused(&env, &["finalize-deploy", "ORCH-2", "--outcome", outcome]);
        assert!(err.contains("no deploy in progress for ORCH-2"), "{err}");
    }
    // A queued (not running) deployer is no deploy in progress either.
    env.make_job_full(b, "deployer", "queued", None, None, None, 0, 2);
    refused(&env, &["finalize-deploy", "ORCH-2", "--outcome", "success"]);
    let lease = env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .unwrap();
    assert_eq!(lease.task_id, Some(a));
    assert_eq!(env.task(b).stage, "deploy");

    // A's own finalize closes its window; a second one has nothing to close.
    let fin = env.json(&["finalize-deploy", "ORCH-1", "--outcome", "success"]);
    assert_eq!(fin["note"], "done");
    assert_eq!(fin["lease_released"], true);
    let err = refused(&env, &["finalize-deploy", "1", "--outcome", "success"]);
    assert!(err.contains("no deploy in progress for ORCH-1"), "{err}");
    // A running deployer is a deploy in progress (its claim took the lease).
    let c = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(c["task_id"], b);
    let fin = env.json(&["finalize-deploy", "ORCH-2", "--outcome", "failure"]);
    assert_eq!(
        (fin["note"].as_str(), fin["outcome"].as_str()),
        (Some("deploy-failed"), Some("failure"))
    );
    assert_eq!(fin["jobs"][0]["status"], "failed");
}

#[test]
fn a_deferred_stop_applied_after_a_successful_deploy_says_the_change_was_deployed() {
    let mut env = Env::new();
    let hook_log = env.path().join("notify.log");
    env.set(
        "ORCH_NOTIFY_CMD",
        &format!(
            "sh -c 'cat >> {}; echo >> {}'",
            hook_log.display(),
            hook_log.display()
        ),
    );
    for (wi, outcome, note) in [
        ("ORCH-1", "success", "cancelled-after-deploy"),
        ("ORCH-2", "failure", "cancelled"),
    ] {
        let (t, _) = add(&env, &["--work-item", wi, "--stage", "deploy"]);
        env.json(&["deploy-begin", wi]);
        assert_eq!(env.json(&["stop", wi])["note"], "deferred-critical-window");
        let fin = env.json(&["finalize-deploy", wi, "--outcome", outcome]);
        assert_eq!(fin["note"], note, "{fin}");
        assert_eq!(fin["outcome"], outcome);
        assert_eq!(env.task(t).stage, "cancelled");
        let cancelled = events(&env, t)
            .into_iter()
            .find(|e| e["kind"] == "cancelled")
            .unwrap();
        assert_eq!(cancelled["detail"]["source"], "deferred");
        let deployed = outcome == "success";
        assert_eq!(
            cancelled["detail"]["deployed_before_stop"]
                .as_bool()
                .unwrap_or(false),
            deployed,
            "{cancelled}"
        );
        if deployed {
            assert!(cancelled["detail"]["note"]
                .as_str()
                .unwrap()
                .contains("deployed"));
        }
    }
    let log = std::fs::read_to_string(&hook_log).unwrap();
    let notes: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v["event"] == "task_cancelled")
        .collect();
    assert_eq!(notes.len(), 2, "{log}");
    let first = notes[0]["message"].as_str().unwrap();
    assert!(
        first.contains("ORCH-1 was deployed before its STOP took effect"),
        "{first}"
    );
    assert_eq!(notes[0]["deployed_before_stop"], true);
    let second = notes[1]["message"].as_str().unwrap();
    assert!(second.contains("ORCH-2 was stopped"), "{second}");
    assert!(!second.contains("deployed before"), "{second}");

    // The deployer's own success closes a lease-only window the same way.
    let (t, _) = add(&env, &["--work-item", "ORCH-3", "--stage", "deploy"]);
    env.make_job_full(t, "deployer", "queued", None, None, None, 0, 2);
    let c = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(env.json(&["stop", "ORCH-3"])["deferred"], true);
    let done = env.json(&[
        "complete",
        &c["id"].to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--success",
    ]);
    assert_eq!(done["note"], "cancelled-after-deploy", "{done}");
}

// ------------------------------------------------------------------ what waits on people

#[test]
fn queue_awaiting_lists_exactly_the_waiting_tasks_of_a_mixed_database() {
    let env = Env::new();
    let cases = every_kind_of_task(&env);
    let id = |name: &str| -> i64 {
        let wi = &cases.iter().find(|(n, _)| *n == name).unwrap().1;
        env.json(&["task", "show", wi])["task"]["id"]
            .as_i64()
            .unwrap()
    };
    // Dependencies: one on a cancelled task (never starts), one on live work.
    let (blocked, _) = add(
        &env,
        &[
            "--work-item",
            "ORCH-B",
            "--depends-on",
            &id("cancelled").to_string(),
        ],
    );
    let (waiting, _) = add(
        &env,
        &[
            "--work-item",
            "ORCH-W",
            "--depends-on",
            &id("analysis, parked").to_string(),
        ],
    );

    let q = env.json(&["queue"]);
    let a = &q["awaiting"];
    let ids = |kind: &str| -> Vec<i64> {
        let mut v: Vec<i64> = a[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_i64().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids("approval"), [id("analysis, parked")]);
    assert_eq!(ids("deploy_confirmation"), [id("deploy, parked")]);
    let mut failed = vec![
        id("analysis, analyst failed"),
        id("development, developer failed"),
        id("review, reviewer failed"),
        id("deploy, deployer failed"),
    ];
    failed.sort();
    assert_eq!(ids("failed"), failed);
    assert_eq!(ids("blocked_by_cancelled"), [blocked]);
    assert_eq!(
        a["counts"],
        json!({ "approval": 1, "deploy_confirmation": 1, "failed": 4, "blocked_by_cancelled": 1 })
    );
    let row = &a["approval"][0];
    assert_eq!(row["work_item_id"], "ORCH-103");
    assert_eq!(row["repo"], "orchestrator");
    assert_eq!(row["stage"], "analysis");
    assert!(
        row["since"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{row}"
    );
    // --recent bounds the lists, not the counts.
    let q1 = env.json(&["queue", "--recent", "1"]);
    assert_eq!(q1["awaiting"]["failed"].as_array().unwrap().len(), 1);
    assert_eq!(q1["awaiting"]["counts"]["failed"], 4);
    // The blocked task also shows in task_deps, and task show says what each waits for.
    let blocked_ids: Vec<i64> = q["task_deps"]["blocked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["task_id"].as_i64().unwrap())
        .collect();
    assert_eq!(blocked_ids, [blocked, waiting]);
    let show = |t: i64| env.json(&["task", "show", &t.to_string()])["awaiting"].clone();
    assert_eq!(show(blocked), "cancelled_dependency");
    assert_eq!(show(waiting), "dependency");
    assert_eq!(show(id("analysis, parked")), "approval");
    assert_eq!(show(id("deploy, deployer failed")), "retry");
    assert_eq!(show(id("deploy, parked")), "deploy_confirmation");
    for busy in [
        "analysis, analyst queued",
        "development, developer running",
        "deploy, deployer queued",
        "deploy, deploy initiated",
        "development, STOP pending",
        "done",
        "cancelled",
    ] {
        assert!(show(id(busy)).is_null(), "{busy}: {}", show(id(busy)));
    }

    // Text: a summary line and one section per kind.
    let (code, text, _) = env.run(&["--format", "text", "queue"]);
    assert_eq!(code, 0);
    assert!(text.contains("awaiting     1 awaiting approval, 1 awaiting deploy confirmation, 4 failed, 1 blocked by a cancelled dependency"), "{text}");
    assert!(
        text.contains(
            "\nawaiting approval (approve / reject):\n  TASK  WORK ITEM  STAGE     SINCE"
        ),
        "{text}"
    );
    let (_, shown, _) = env.run(&[
        "--format",
        "text",
        "task",
        "show",
        &id("analysis, parked").to_string(),
    ]);
    assert!(
        shown.contains("  awaiting  approval: `orchctl approve` or `orchctl reject`"),
        "{shown}"
    );

    // The answer follows the rows, however they are written: plain SQL moves tasks on,
    // and the reads (which never write) see it before any orchctl write settles it.
    let dev_failed = id("development, developer failed");
    let parked = id("analysis, parked");
    let c = env.db();
    c.execute(
        "UPDATE jobs SET status = 'queued' WHERE task_id = ?1",
        [dev_failed],
    );
    c.execute(
        "INSERT INTO jobs (agent, repo, task_id, status) VALUES ('analyst', 'orchestrator', ?1, 'queued')",
        [parked],
    );
    // SQLite keeps what tasks wait for in a table of its own and marks what plain SQL
    // changed (PostgreSQL reads it from the rows each time: nothing to mark or settle).
    let kept = !c.is_postgres();
    let stale = || {
        if kept {
            env.count("SELECT count(*) FROM task_waits_stale")
        } else {
            0
        }
    };
    if kept {
        assert_eq!(stale(), 2);
    }
    let check = |when: &str| {
        let q = env.json(&["queue"]);
        assert_eq!(q["awaiting"]["counts"]["failed"], 3, "{when}: {q}");
        assert_eq!(q["awaiting"]["counts"]["approval"], 0, "{when}: {q}");
        assert_eq!(q["awaiting"]["approval"], json!([]), "{when}: {q}");
        assert!(q["awaiting"]["failed"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["id"] != dev_failed));
        assert!(show(parked).is_null(), "{when}");
    };
    check("before any orchctl write");
    // `migrate` (like any write) settles them.
    env.json(&["migrate"]);
    assert_eq!(stale(), 0);
    check("settled");
    // A claim (queued -> running) changes nothing a task waits for, and marks nothing.
    c.execute(
        "UPDATE jobs SET status = 'running', run_id = 9999 WHERE task_id = ?1 AND status = 'queued'",
        [parked],
    );
    assert_eq!(stale(), 0);
}

#[test]
fn stop_lists_the_tasks_that_depend_on_it_and_they_show_as_blocked() {
    let env = Env::new();
    let (base, _) = add(&env, &["--work-item", "ORCH-1"]);
    let (d1, _) = add(&env, &["--work-item", "ORCH-2", "--depends-on", "ORCH-1"]);
    let (d2, _) = add(
        &env,
        &[
            "--work-item",
            "ORCH-3",
            "--depends-on",
            "ORCH-1",
            "--stage",
            "development",
        ],
    );
    let (gone, _) = add(&env, &["--work-item", "ORCH-4", "--depends-on", "ORCH-1"]);
    env.json(&["stop", "ORCH-4"]);
    let other = add(&env, &["--work-item", "ORCH-5"]).0;

    let before = env.json(&["queue"]);
    assert_eq!(before["awaiting"]["counts"]["blocked_by_cancelled"], 0);
    let r = env.json(&["stop", "ORCH-1"]);
    assert_eq!(r["note"], "cancelled");
    assert_eq!(
        r["dependents"],
        json!([d1, d2]),
        "live dependents only: {r}"
    );
    let q = env.json(&["queue"]);
    let listed: Vec<i64> = q["awaiting"]["blocked_by_cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, [d1, d2]);
    assert_eq!(q["awaiting"]["counts"]["blocked_by_cancelled"], 2);
    // A stop of a task nobody depends on lists none; text shows the dependents.
    assert_eq!(
        env.json(&["stop", &other.to_string()])["dependents"],
        json!([])
    );
    let (_, text, _) = env.run(&["--format", "text", "stop", &base.to_string()]);
    assert!(text.contains(&format!("dependents: {d1}, {d2}")), "{text}");
    let _ = gone;
}

#[test]
fn retry_gives_a_stuck_stage_one_more_job_and_only_then() {
    let env = Env::new();
    let (t, job) = add(&env, &["--work-item", "ORCH-1", "--stage", "development"]);
    env.db().execute(
        "UPDATE jobs SET max_attempts = 1 WHERE id = ?1",
        [job.unwrap()],
    );
    assert_eq!(work(&env, "developer", false)["note"], "failed");
    let r = env.json(&["retry", "ORCH-1"]);
    assert_eq!(r["note"], "requeued");
    assert_eq!(r["job"]["agent"], "developer");
    assert_eq!(r["job"]["status"], "queued");
    assert_eq!(r["task"]["stage"], "development");
    // The new job is queued: nothing failed now.
    let err = refused(&env, &["retry", "ORCH-1"]);
    assert!(
        err.contains("is in development with its developer job"),
        "{err}"
    );
    assert_eq!(jobs_of(&env, t).len(), 2);
    let queued = events(&env, t)
        .into_iter()
        .rfind(|e| e["kind"] == "job_queued")
        .unwrap();
    assert_eq!(queued["detail"]["source"], "cli");
    assert_eq!(queued["detail"]["action"], "retry");
    // After a success the stage moved on: retry has nothing to do.
    work(&env, "developer", true);
    let err = refused(&env, &["retry", "ORCH-1"]);
    assert!(err.contains("review"), "{err}");
}
