//! STOP (SPEC §3, §4; seed TC-02, TC-03, TC-05, TC-06, TC-07, TC-13, D7) against real
//! processes, real git repositories, a real database and HTTP stub servers.

use std::time::Duration;

use httpmock::prelude::*;
use serde_json::Value;

use crate::common::{alive, ts_in, Agent, Env, GitRepo};
use orchctl::stop::{self, in_critical_window, StopOptions};

fn effect<'a>(res: &'a Value, kind: &str) -> Option<&'a Value> {
    res["effects"]
        .as_array()?
        .iter()
        .find(|e| e["kind"] == kind)
}

#[test]
fn tc02_every_pid_of_a_real_agent_group_is_gone_after_stop() {
    let env = Env::new();
    let tid = env.make_task("PL-10", "ORCH-310", "development", None);
    let agent = Agent::spawn("sleep 60 & sleep 60");
    let members = agent.group();
    assert!(
        members.len() >= 2,
        "the agent group has its children: {members:?}"
    );
    env.make_job_full(
        tid,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(77),
        1,
        2,
    );

    let res = env.json(&["stop", "ORCH-310"]);

    assert_eq!(res["ok"], true);
    assert_eq!(res["deferred"], false);
    assert_eq!(res["stopped"], 1);
    assert_eq!(res["note"], "cancelled");
    for pid in members {
        assert!(!alive(pid), "pid {pid} of the agent group survived stop");
    }
    let stop = effect(&res, "stop_process").expect("a stop_process effect");
    assert_eq!(stop["status"], "done");
    assert_eq!(stop["detail"]["signal"], "SIGTERM");
}

#[test]
fn tc02_an_agent_ignoring_sigterm_is_killed_after_the_grace() {
    let mut env = Env::new();
    env.set("ORCH_STOP_GRACE_SECS", "0.3");
    let tid = env.make_task("PL-12", "ORCH-312", "development", None);
    let agent = Agent::spawn("trap '' TERM; sleep 60 & sleep 60; wait");
    let members = agent.group();
    env.make_job_full(
        tid,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(5),
        1,
        2,
    );

    let res = env.json(&["stop", "ORCH-312"]);

    assert_eq!(res["stopped"], 1);
    assert_eq!(
        effect(&res, "stop_process").unwrap()["detail"]["signal"],
        "SIGKILL"
    );
    for pid in members {
        assert!(!alive(pid), "pid {pid} survived SIGKILL");
    }
}

#[test]
fn tc02_idle_task_stops_no_process() {
    let env = Env::new();
    let tid = env.make_task("PL-11", "ORCH-311", "development", None);
    env.make_job(tid, "queued", None, None);

    let res = env.json(&["stop", &tid.to_string()]);

    assert_eq!(res["ok"], true);
    assert_eq!(res["stopped"], 0);
    assert_eq!(res["jobs_cancelled"], 1);
    assert!(effect(&res, "stop_process").is_none());
}

#[test]
fn a_recycled_pid_is_never_signalled() {
    let env = Env::new();
    let tid = env.make_task("PL-13", "ORCH-313", "development", None);
    let agent = Agent::spawn("sleep 60");
    // The recorded start time is not the live process's: the pid was "recycled".
    env.make_job_full(
        tid,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start - 1),
        Some(9),
        1,
        2,
    );

    let res = env.json(&["stop", "ORCH-313"]);

    assert_eq!(res["stopped"], 0);
    assert!(
        alive(agent.pid as i32),
        "a process that is not ours was signalled"
    );
    let e = effect(&res, "stop_process").unwrap();
    assert_eq!(e["status"], "done");
    assert_eq!(e["detail"]["outcome"], "recycled");
    assert_eq!(env.job_status(1), "cancelled");
}

#[test]
fn a_pid_without_a_recorded_start_time_is_never_signalled() {
    let env = Env::new();
    let tid = env.make_task("PL-14", "ORCH-314", "development", None);
    let agent = Agent::spawn("sleep 60");
    env.make_job(tid, "running", Some(agent.pid), Some(3));

    let res = env.json(&["stop", "ORCH-314"]);

    assert_eq!(res["stopped"], 0);
    assert!(alive(agent.pid as i32));
    assert_eq!(
        effect(&res, "stop_process").unwrap()["detail"]["outcome"],
        "unverified"
    );
}

#[test]
fn tc03_queued_and_running_jobs_are_cancelled_and_claim_skips_them() {
    let mut env = Env::new();
    env.set("ORCH_SERIAL_GATE", "0").set("ORCH_TASK_DEPS", "0");
    let tid = env.make_task("PL-20", "ORCH-320", "development", None);
    let jq = env.make_job(tid, "queued", None, None);
    let jr = env.make_job(tid, "running", None, Some(4));

    let res = env.json(&["stop", "ORCH-320"]);

    assert_eq!(res["jobs_cancelled"], 2);
    assert_eq!(env.job_status(jq), "cancelled");
    assert_eq!(env.job_status(jr), "cancelled");
    let (code, stdout, _) = env.run(&["claim"]);
    assert_eq!(code, 3, "a cancelled job was claimed: {stdout}");
    // Finished jobs carry their end time.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE status = 'cancelled' AND finished_at IS NOT NULL"
        ),
        2
    );
}

#[test]
fn tc03_cancel_jobs_for_task_can_leave_the_running_actor_alone() {
    let env = Env::new();
    let tid = env.make_task("PL-21", "ORCH-321", "development", None);
    let jq = env.make_job(tid, "queued", None, None);
    let jr = env.make_job(tid, "running", None, None);
    let ctx = env.ctx();

    let n = ctx
        .store
        .write(|w| w.cancel_jobs_for_task(tid, true, "test"))
        .unwrap()
        .len();

    assert_eq!(n, 1);
    assert_eq!(env.job_status(jq), "cancelled");
    assert_eq!(env.job_status(jr), "running");
}

#[test]
fn tc05_worktree_local_and_remote_branch_are_removed_through_a_real_bare_remote() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-340-x");
    assert!(repo.remote_branches().contains("feature/ORCH-340-x"));
    let tid = env.make_task("PL-40", "ORCH-340", "review", Some("feature/ORCH-340-x"));

    let res = env.json(&["stop", &tid.to_string()]);

    assert_eq!(res["note"], "cancelled");
    assert_eq!(effect(&res, "remove_worktree").unwrap()["status"], "done");
    assert_eq!(
        effect(&res, "delete_remote_branch").unwrap()["status"],
        "done"
    );
    assert!(!wt.exists(), "the worktree folder is gone");
    assert!(
        !repo.worktree_list().contains("ORCH-340"),
        "git no longer lists the worktree"
    );
    assert!(
        !repo.local_branches().contains("ORCH-340"),
        "the local branch is deleted"
    );
    assert!(
        !repo.remote_branches().contains("ORCH-340"),
        "the remote branch is deleted"
    );
    // The main working tree and main branch are untouched.
    assert!(repo.clone.join("README.md").exists());
    assert!(repo.local_branches().contains("main"));
    assert!(repo.remote_branches().contains("main"));
}

#[test]
fn tc05_remote_branch_is_deleted_through_the_gitea_api() {
    let server = MockServer::start();
    let delete = server.mock(|when, then| {
        when.method(DELETE)
            .path("/api/v1/repos/acme/orchestrator/branches/feature/ORCH-341-x")
            .header("Authorization", "token gitea-secret-1");
        then.status(204);
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_GITEA_TOKEN", "gitea-secret-1");
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-341-x");
    let tid = env.make_task("PL-41", "ORCH-341", "review", Some("feature/ORCH-341-x"));

    let res = env.json(&["stop", &tid.to_string()]);

    delete.assert_hits(1);
    assert_eq!(
        effect(&res, "delete_remote_branch").unwrap()["result"],
        "deleted on Gitea"
    );
    assert!(!wt.exists());
    assert!(!repo.local_branches().contains("ORCH-341"));
    assert!(!res.to_string().contains("gitea-secret-1"));
}

#[test]
fn tc05_gitea_404_means_already_gone() {
    let server = MockServer::start();
    let delete = server.mock(|when, then| {
        when.method(DELETE).path_contains("/branches/");
        then.status(404);
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme");
    let tid = env.make_task("PL-42", "ORCH-342", "review", None);

    let res = env.json(&["stop", &tid.to_string()]);

    delete.assert_hits(1);
    let e = effect(&res, "delete_remote_branch").unwrap();
    assert_eq!(e["status"], "done");
    assert_eq!(e["result"], "already gone on Gitea");
}

#[test]
fn tc05_main_master_default_and_protected_branches_are_refused_before_any_request() {
    let server = MockServer::start();
    let any_delete = server.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_PROTECTED_BRANCHES", "release/*,prod");
    let repo = GitRepo::new(&env, "orchestrator");
    // The clone's default branch, whatever its name, is refused too.
    std::process::Command::new("git")
        .arg("-C")
        .arg(&repo.clone)
        .args([
            "symbolic-ref",
            "refs/remotes/origin/HEAD",
            "refs/remotes/origin/trunk",
        ])
        .status()
        .unwrap();
    for (i, branch) in ["main", "master", "release/1.0", "prod", "trunk"]
        .iter()
        .enumerate()
    {
        let tid = env.make_task(
            &format!("PL-5{i}"),
            &format!("ORCH-35{i}"),
            "development",
            Some(branch),
        );
        let res = env.json(&["stop", &tid.to_string()]);
        assert_eq!(
            res["note"], "cancelled",
            "{branch}: the task is still cancelled"
        );
        for kind in ["delete_remote_branch", "remove_worktree"] {
            let e = effect(&res, kind).unwrap();
            assert_eq!(e["status"], "failed", "{branch} {kind}: {e}");
            assert!(e["error"].as_str().unwrap().starts_with("refused"), "{e}");
        }
        // The refusal is in the task's log.
        let log = env.json(&["task", "log", &tid.to_string()]);
        assert!(
            log["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|ev| ev["kind"] == "delete_remote_branch"
                    && ev["detail"]["status"] == "failed"
                    && ev["detail"]["error"].as_str().unwrap().contains(branch)),
            "{log}"
        );
    }
    any_delete.assert_hits(0);
    assert!(repo.local_branches().contains("main"));
    assert!(repo.remote_branches().contains("main"));
}

#[test]
fn a_gitea_500_leaves_the_task_cancelled_and_the_branch_deletion_pending() {
    let server = MockServer::start();
    let failing = server.mock(|when, then| {
        when.method(DELETE);
        then.status(500).body("boom");
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme");
    let tid = env.make_task("PL-60", "ORCH-360", "development", None);

    let res = env.json(&["stop", "ORCH-360"]);

    failing.assert_hits(1);
    assert_eq!(res["note"], "cancelled");
    assert_eq!(env.task(tid).stage, "cancelled");
    let e = effect(&res, "delete_remote_branch").unwrap();
    assert_eq!(e["status"], "pending");
    assert!(e["error"].as_str().unwrap().contains("500"));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE kind = 'delete_remote_branch' AND status = 'pending' AND last_error LIKE '%500%'"),
        1
    );
    let log = env.json(&["task", "log", &tid.to_string()]);
    assert!(log["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|ev| { ev["kind"] == "delete_remote_branch" && ev["detail"]["status"] == "pending" }));
}

#[test]
fn tc06_docs_artefacts_in_the_main_clone_and_the_task_row_survive() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-350-x");
    let docs = repo.clone.join("docs/work-items/ORCH-350");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("02-trz.md"), "trz").unwrap();
    let tid = env.make_task(
        "PL-50",
        "ORCH-350",
        "development",
        Some("feature/ORCH-350-x"),
    );

    env.json(&["stop", &tid.to_string()]);

    assert!(!wt.exists());
    assert_eq!(
        std::fs::read_to_string(docs.join("02-trz.md")).unwrap(),
        "trz"
    );
    assert_eq!(env.task(tid).stage, "cancelled");
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 1);
}

#[test]
fn tc07_stop_on_cancelled_done_or_missing_is_a_no_op() {
    let env = Env::new();
    let cancelled = env.make_task("PL-60", "ORCH-360", "cancelled", None);
    let done = env.make_task("PL-61", "ORCH-361", "done", None);
    let events_before = env.count("SELECT count(*) FROM task_events");

    let r1 = env.json(&["stop", &cancelled.to_string()]);
    assert_eq!(r1["ok"], true);
    assert_eq!(r1["note"], "already-terminal:cancelled");
    assert!(r1.get("effects").is_none(), "{r1}");
    let r2 = env.json(&["stop", &done.to_string()]);
    assert_eq!(r2["note"], "already-terminal:done");
    assert_eq!(env.task(done).stage, "done");

    let (code, stdout, stderr) = env.run(&["stop", "999999"]);
    assert_eq!(code, 0);
    let r3: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r3["note"], "no-task");
    assert_eq!(r3["ok"], true);
    assert!(stderr.contains("warning"), "{stderr}");
    assert_eq!(env.count("SELECT count(*) FROM task_events"), events_before);
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn tc13_end_to_end_stop() {
    let plane = MockServer::start();
    let comment = plane.mock(|when, then| {
        when.method(POST)
            .path("/api/v1/workspaces/acme/projects/proj-1/issues/PL-110/comments/")
            .header("X-Api-Key", "plane-secret-1")
            .json_body_partial(r#"{"external_source": "orchctl"}"#);
        then.status(201).json_body(serde_json::json!({"id": "c1"}));
    });
    let mut env = Env::new();
    let notify_log = env.path().join("notify.log");
    let script = env.path().join("notify.sh");
    std::fs::write(&script, "#!/bin/sh\ncat >> \"$1\"\necho >> \"$1\"\n").unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    env.set("ORCH_PLANE_URL", &plane.base_url())
        .set("ORCH_PLANE_WORKSPACE", "acme")
        .set("ORCH_PLANE_API_TOKEN", "plane-secret-1")
        .set(
            "ORCH_NOTIFY_CMD",
            &format!("{} {}", script.display(), notify_log.display()),
        );
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-410-e2e");
    let added = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-410",
        "--plane-id",
        "PL-110",
        "--project-id",
        "proj-1",
        "--branch",
        "feature/ORCH-410-e2e",
        "--stage",
        "review",
    ]);
    let tid = added["task"]["id"].as_i64().unwrap();
    let jq = added["job"]["id"].as_i64().unwrap();
    let agent = Agent::spawn("sleep 60 & sleep 60");
    let members = agent.group();
    let jr = env.make_job_full(
        tid,
        "reviewer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(11),
        1,
        2,
    );

    let res = env.json(&["stop", "PL-110", "--reason", "Plane STOP status"]);

    assert_eq!(res["ok"], true);
    assert_eq!(res["deferred"], false);
    assert_eq!(res["stopped"], 1);
    assert_eq!(res["jobs_cancelled"], 2);
    for pid in members {
        assert!(!alive(pid));
    }
    assert_eq!(env.job_status(jr), "cancelled");
    assert_eq!(env.job_status(jq), "cancelled");
    assert!(!wt.exists());
    assert!(!repo.remote_branches().contains("ORCH-410"));
    let t = &res["task"];
    assert_eq!(t["stage"], "cancelled");
    assert!(!t["cancelled_at"].as_str().unwrap().is_empty());
    assert_eq!(t["cancel_reason"], "Plane STOP status");
    assert_eq!(t["plane_id"], format!("PL-110#cancelled-{tid}"));
    assert_eq!(t["work_item_id"], format!("ORCH-410#cancelled-{tid}"));
    assert_eq!(t["plane_issue_id"], format!("PL-110#cancelled-{tid}"));
    assert_eq!(
        t["plane_issue_id"]
            .as_str()
            .unwrap()
            .split("#cancelled-")
            .next(),
        Some("PL-110")
    );
    // The keys are free: the Plane id no longer resolves...
    assert!(env
        .ctx()
        .store
        .read(|r| r.find_task("PL-110"))
        .unwrap()
        .is_none());
    let (code, _, _) = env.run(&["task", "show", "PL-110"]);
    assert_eq!(code, 1);
    // ...and a fresh pipeline for the same issue can start.
    let again = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-410",
        "--plane-id",
        "PL-110",
    ]);
    assert_ne!(again["task"]["id"].as_i64().unwrap(), tid);
    // Notifications: one Plane comment, one notify-hook event.
    comment.assert_hits(1);
    let notified = std::fs::read_to_string(&notify_log).unwrap();
    let events: Vec<Value> = notified
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{notified}");
    assert_eq!(events[0]["event"], "task_cancelled");
    assert_eq!(events[0]["work_item_id"], "ORCH-410");
    assert!(!notified.contains("plane-secret-1"));
}

#[test]
fn tc14_migrations_are_idempotent_and_the_seed_columns_exist() {
    let env = Env::new();
    let first = env.json(&["migrate"]);
    assert_eq!(first["from"], 0);
    let second = env.json(&["migrate"]);
    assert_eq!(second["from"], second["to"]);
    let c = env.db();
    let cols = |t: &str| -> Vec<String> { c.columns(t) };
    for col in [
        "id",
        "plane_id",
        "work_item_id",
        "plane_issue_id",
        "project_id",
        "repo",
        "branch",
        "title",
        "stage",
        "created_at",
        "updated_at",
        "cancelled_at",
        "cancel_requested_at",
        "cancel_reason",
    ] {
        assert!(cols("tasks").contains(&col.to_string()), "tasks.{col}");
    }
    for col in [
        "id",
        "agent",
        "repo",
        "task_id",
        "status",
        "pid",
        "proc_start",
        "run_id",
        "attempts",
        "max_attempts",
        "created_at",
        "claimed_at",
        "finished_at",
        "error",
    ] {
        assert!(cols("jobs").contains(&col.to_string()), "jobs.{col}");
    }
    for table in [
        "task_deps",
        "task_events",
        "outbox",
        "merge_leases",
        "deploy_markers",
    ] {
        assert!(!cols(table).is_empty(), "table {table}");
    }
}

/// SPEC §2: the SQLite file is in write-ahead-log mode.
#[test]
fn sqlite_only_tc14_the_database_file_is_in_wal_mode() {
    let env = Env::sqlite();
    env.json(&["migrate"]);
    let mode: String = env.db().value("PRAGMA journal_mode", ());
    assert_eq!(mode, "wal");
}

/// The Python predecessor's SQLite file (PostgreSQL has no predecessor).
#[test]
fn sqlite_only_tc14_a_predecessor_database_is_brought_up_to_date() {
    let env = Env::sqlite();
    std::fs::create_dir_all(env.db.parent().unwrap()).unwrap();
    {
        let c = rusqlite::Connection::open(&env.db).unwrap();
        c.execute_batch(
            "CREATE TABLE tasks (id INTEGER PRIMARY KEY, plane_id TEXT UNIQUE, work_item_id TEXT UNIQUE,
                                 repo TEXT NOT NULL, branch TEXT, stage TEXT NOT NULL DEFAULT 'analysis');
             CREATE TABLE jobs (id INTEGER PRIMARY KEY, agent TEXT NOT NULL, repo TEXT NOT NULL,
                                task_id INTEGER, status TEXT NOT NULL DEFAULT 'queued', pid INTEGER);
             INSERT INTO tasks (plane_id, work_item_id, repo, branch, stage)
                 VALUES ('PL-1', 'ORCH-1', 'orchestrator', 'feature/ORCH-1', 'development');
             INSERT INTO jobs (agent, repo, task_id, status) VALUES ('developer', 'orchestrator', 1, 'queued');",
        )
        .unwrap();
    }
    env.json(&["migrate"]);
    env.json(&["migrate"]);
    let res = env.json(&["stop", "ORCH-1"]);
    assert_eq!(res["note"], "cancelled");
    assert_eq!(res["jobs_cancelled"], 1);
}

#[test]
fn tc14_a_queued_job_is_claimable_when_no_gate_blocks_it() {
    let mut env = Env::new();
    env.set("ORCH_SERIAL_GATE", "0").set("ORCH_TASK_DEPS", "0");
    let tid = env.make_task("PL-120", "ORCH-420", "development", None);
    let jid = env.make_job(tid, "queued", None, None);
    let claimed = env.json(&["claim"]);
    assert_eq!(claimed["id"].as_i64(), Some(jid));
}

#[test]
fn a_database_from_a_newer_binary_is_refused_untouched() {
    let env = Env::new();
    env.json(&["migrate"]);
    env.db().set_schema_version(999);
    // On SQLite the file's bytes, on PostgreSQL every row and the schema.
    let before = env.snapshot();
    for args in [vec!["migrate"], vec!["task", "list"], vec!["stop", "1"]] {
        let (code, _, stderr) = env.run(&args);
        assert_eq!(code, 78, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("orchctl: ") && stderr.contains("newer"),
            "{stderr}"
        );
    }
    env.assert_unchanged(&before, "a database from a newer orchctl");
}

#[test]
fn invalid_names_are_refused_with_exit_65_and_nothing_written() {
    let env = Env::new();
    env.json(&["migrate"]);
    for args in [
        vec!["--repo", "../etc", "--work-item", "ORCH-1"],
        vec!["--repo", "a/b", "--work-item", "ORCH-1"],
        vec!["--repo", "..", "--work-item", "ORCH-1"],
        vec!["--repo", "ok", "--work-item", "ORCH-1", "--branch", "a..b"],
        vec!["--repo", "ok", "--work-item", "ORCH-1", "--branch=-rf"],
        vec!["--repo", "ok", "--work-item", "ORCH-1", "--branch", "x@{y"],
        vec![
            "--repo",
            "ok",
            "--work-item",
            "ORCH-1",
            "--branch",
            "x\u{7}y",
        ],
        vec!["--repo", "ok", "--work-item", "ORCH 1"],
    ] {
        let mut full = vec!["task", "add"];
        full.extend(&args);
        let (code, _, stderr) = env.run(&full);
        assert_eq!(code, 65, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    // A stage name is checked on the command line (SPEC §11): a usage error, exit 2.
    let (code, _, stderr) = env.run(&[
        "task",
        "add",
        "--repo",
        "ok",
        "--work-item",
        "ORCH-1",
        "--stage",
        "done",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 0);
    assert_eq!(env.count("SELECT count(*) FROM jobs"), 0);
    // Slashes inside a branch stay legal.
    env.json(&[
        "task",
        "add",
        "--repo",
        "ok",
        "--work-item",
        "ORCH-1",
        "--branch",
        "feature/ORCH-1-x",
    ]);
}

// ------------------------------------------------------------------------------ D7

#[test]
fn d7_stop_inside_an_initiated_deploy_is_deferred_then_repeated_without_a_second_notice() {
    let mut env = Env::new();
    let notify_log = env.path().join("notify.log");
    let script = env.path().join("notify.sh");
    std::fs::write(&script, "#!/bin/sh\ncat >> \"$1\"\necho >> \"$1\"\n").unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    env.set(
        "ORCH_NOTIFY_CMD",
        &format!("{} {}", script.display(), notify_log.display()),
    );
    let tid = env.make_task("PL-130", "ORCH-430", "deploy", Some("feature/ORCH-430-d"));
    env.json(&["deploy-begin", "ORCH-430"]);
    let jq = env.make_job_full(tid, "deployer", "queued", None, None, None, 0, 2);
    let actor = Agent::spawn("sleep 60");
    let jr = env.make_job_full(
        tid,
        "deployer",
        "running",
        Some(actor.pid),
        Some(actor.start),
        Some(3),
        1,
        2,
    );

    let r1 = env.json(&["stop", "ORCH-430"]);
    let r2 = env.json(&["stop", "ORCH-430"]);

    assert_eq!(r1["ok"], true);
    assert_eq!(r1["deferred"], true);
    assert_eq!(r1["note"], "deferred-critical-window");
    assert_eq!(r1["stopped"], 0);
    assert_eq!(r2["deferred"], true);
    assert_eq!(r2["note"], "deferred-already-pending");
    assert_eq!(env.job_status(jq), "cancelled");
    assert_eq!(env.job_status(jr), "running");
    assert!(alive(actor.pid as i32), "the deploy actor was killed");
    let t = env.task(tid);
    assert!(t
        .cancel_requested_at
        .as_deref()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(t.stage, "deploy");
    assert_eq!(
        t.work_item_id.as_deref(),
        Some("ORCH-430"),
        "keys stay until the reset"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM outbox WHERE kind IN ('remove_worktree', 'delete_remote_branch')"
        ),
        0
    );
    let notices = std::fs::read_to_string(&notify_log).unwrap();
    assert_eq!(
        notices.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{notices}"
    );
    assert!(notices.contains("cancel_deferred"));
}

#[test]
fn d7_critical_window_detection() {
    let env = Env::new();
    let ctx = env.ctx();
    let tid = env.make_task("PL-431", "ORCH-431", "deploy", Some("feature/x"));
    let task = env.task(tid);
    assert!(!ctx.store.read(|r| in_critical_window(r, &task)).unwrap());
    ctx.store
        .write(|w| w.set_marker("orchestrator", "ORCH-431", "initiated", tid))
        .unwrap();
    assert!(ctx.store.read(|r| in_critical_window(r, &task)).unwrap());
}

#[test]
fn d7_lease_held_while_parked_is_not_critical_and_stop_releases_it() {
    let env = Env::new();
    let ctx = env.ctx();
    let branch = "feature/ORCH-434-park";
    let tid = env.make_task("PL-434", "ORCH-434", "deploy", Some(branch));
    ctx.store
        .write(|w| w.acquire_lease("orchestrator", branch, tid))
        .unwrap();
    let task = env.task(tid);
    assert!(!ctx.store.read(|r| in_critical_window(r, &task)).unwrap());

    let res = env.json(&["stop", "ORCH-434"]);

    assert_eq!(res["deferred"], false);
    assert_eq!(res["note"], "cancelled");
    assert_eq!(env.task(tid).stage, "cancelled");
    assert!(effect(&res, "delete_remote_branch").is_some());
    assert!(ctx
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .is_none());
}

#[test]
fn d7_lease_held_with_a_running_actor_is_critical() {
    let env = Env::new();
    let ctx = env.ctx();
    let branch = "feature/ORCH-433-merge";
    let tid = env.make_task("PL-433", "ORCH-433", "deploy", Some(branch));
    ctx.store
        .write(|w| w.acquire_lease("orchestrator", branch, tid))
        .unwrap();
    env.make_job_full(tid, "deployer", "running", Some(9191), None, Some(1), 1, 2);
    let task = env.task(tid);
    assert!(ctx.store.read(|r| in_critical_window(r, &task)).unwrap());
    // Another branch's lease does not make this task critical.
    let other = env.make_task("PL-435", "ORCH-435", "deploy", Some("feature/other"));
    env.make_job_full(other, "deployer", "running", None, None, Some(2), 1, 2);
    let other = env.task(other);
    assert!(!ctx.store.read(|r| in_critical_window(r, &other)).unwrap());
}

#[test]
fn d7_forced_stop_of_a_deferred_task_applies_the_full_reset() {
    let env = Env::new();
    let tid = env.make_task(
        "PL-140",
        "ORCH-440",
        "development",
        Some("feature/ORCH-440-d"),
    );
    let ctx = env.ctx();
    ctx.store
        .write(|w| w.set_cancel_requested(tid, "deferred earlier"))
        .unwrap();

    let res = stop::cancel_task(
        &ctx,
        tid,
        &StopOptions {
            reason: None,
            force: true,
            source: stop::Source::Deferred,
        },
    )
    .unwrap();

    assert!(res.ok && !res.deferred);
    assert_eq!(res.note, "cancelled");
    assert_eq!(env.task(tid).stage, "cancelled");
    assert!(res.effects.iter().any(|e| e.kind == "delete_remote_branch"));
}

#[test]
fn stop_returns_soon_after_a_term_respecting_agent_exits() {
    let mut env = Env::new();
    env.set("ORCH_STOP_GRACE_SECS", "10");
    let tid = env.make_task("PL-150", "ORCH-450", "development", None);
    let agent = Agent::spawn("sleep 60");
    env.make_job_full(
        tid,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(1),
        1,
        2,
    );
    let started = std::time::Instant::now();
    let res = env.json(&["stop", "ORCH-450"]);
    // Far below the 10 s grace: the stop polled for the exit instead of sleeping.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(res["stopped"], 1);
}

#[test]
fn the_worktree_and_branch_wait_while_stopping_the_agent_awaits_a_retry() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-460-w");
    let tid = env.make_task(
        "PL-460",
        "ORCH-460",
        "cancelled",
        Some("feature/ORCH-460-w"),
    );
    // A STOP whose agent stop failed and waits for its retry (backoff in the future),
    // followed by the branch's effects, already due.
    let c = env.db();
    c.execute(
        "INSERT INTO outbox (task_id, kind, payload, status, attempts, last_error, next_attempt_at)
         VALUES (?1, 'stop_process', '{\"job_id\":1,\"run_id\":1,\"pid\":999999,\"proc_start\":1}',
                 'pending', 1, 'process group survived SIGKILL',
                 ?2)",
        (tid, ts_in(3600)),
    );
    for kind in ["remove_worktree", "delete_remote_branch"] {
        c.execute(
            "INSERT INTO outbox (task_id, kind, payload) VALUES (?1, ?2, ?3)",
            (
                tid,
                kind,
                r#"{"repo":"orchestrator","branch":"feature/ORCH-460-w"}"#,
            ),
        );
    }

    let r = env.json(&["reconcile"]);

    assert_eq!(r["outbox"]["done"], 0, "{r}");
    assert!(
        wt.exists(),
        "the worktree was removed while the agent may live"
    );
    assert!(repo.remote_branches().contains("ORCH-460"));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts = 0"),
        2
    );

    // The agent stop is retried (the pid is gone now): then the rest follows, in order.
    let res = env.json(&["stop", &tid.to_string()]);
    assert_eq!(res["note"], "already-terminal:cancelled");
    assert!(!wt.exists());
    assert!(!repo.remote_branches().contains("ORCH-460"));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status <> 'done'"),
        0
    );
}
