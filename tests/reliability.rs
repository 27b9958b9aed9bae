//! Reliability (issue 7, SPEC §3–§5, §9): orchctl SIGKILLed in the middle of a STOP,
//! Gitea and Plane down, commands racing each other as real processes, a busy database,
//! process safety and data safety. Every fault is real: a killed process, a closed port, a
//! stalled HTTP stub, a held write lock (SQLite's, or a PostgreSQL table lock), a git that
//! hangs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use httpmock::prelude::*;
use serde_json::{json, Value};

use crate::common::db::unix_secs;
use crate::common::{alive, group_members, now_ts, Agent, Env, GitRepo, GroupGuard};
use crate::fault::{
    assert_unchanged, closed_port, effect, lines, notify_hook, outbox, pids_with, row, script,
    snapshot, wait_until, Bg, FakeGit,
};

const BRANCH: &str = "feature/ORCH-900-crash";
const DELETE_PATH: &str = "/api/v1/repos/acme/orchestrator/branches/feature/ORCH-900-crash";
const COMMENT_PATH: &str = "/api/v1/workspaces/acme/projects/proj-1/issues/PL-900/comments/";

/// A task with everything a full reset touches: a real clone with a worktree for its
/// branch, Gitea and Plane stubs, a notify hook.
struct World {
    env: Env,
    gitea: MockServer,
    plane: MockServer,
    repo: GitRepo,
    wt: PathBuf,
    notify_log: PathBuf,
    tid: i64,
}

impl World {
    fn new() -> World {
        let gitea = MockServer::start();
        let plane = MockServer::start();
        let mut env = Env::new();
        env.set("ORCH_GITEA_URL", &gitea.base_url())
            .set("ORCH_GITEA_OWNER", "acme")
            .set("ORCH_GITEA_TOKEN", "gitea-token-w")
            .set("ORCH_PLANE_URL", &plane.base_url())
            .set("ORCH_PLANE_WORKSPACE", "acme")
            .set("ORCH_PLANE_API_TOKEN", "plane-token-w")
            // Long enough that a stalled stub is still stalled when the test kills orchctl.
            .set("ORCH_HTTP_TIMEOUT_SECS", "60");
        let notify_log = env.path().join("notify.log");
        notify_hook(&mut env, &notify_log);
        let repo = GitRepo::new(&env, "orchestrator");
        let wt = repo.feature(&env, BRANCH);
        let added = env.json(&[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            "ORCH-900",
            "--plane-id",
            "PL-900",
            "--project-id",
            "proj-1",
            "--branch",
            BRANCH,
            "--stage",
            "development",
        ]);
        let tid = added["task"]["id"].as_i64().unwrap();
        World {
            env,
            gitea,
            plane,
            repo,
            wt,
            notify_log,
            tid,
        }
    }

    /// Starts `orchctl stop` in the background and SIGKILLs it once it has claimed the
    /// outbox row of `kind` and `also` holds (the step is under way).
    fn kill_stop_during(&self, kind: &str, also: impl Fn() -> bool) -> i64 {
        let bg = Bg::start(&self.env, &["stop", "ORCH-900"]);
        let pid = bg.pid();
        assert!(
            wait_until(Duration::from_secs(30), || {
                outbox(&self.env)
                    .iter()
                    .any(|r| r.kind == kind && r.claimed_pid == Some(pid))
                    && also()
            }),
            "orchctl never got to {kind}: {:#?}",
            outbox(&self.env)
        );
        bg.kill();
        pid
    }

    /// The state right after the kill: the reset is committed whole, the rows before
    /// `kind` are done, `kind` is still claimed by the dead process, the rest wait.
    fn assert_consistent_after_kill(&self, kind: &str, dead: i64) {
        let t = self.env.task(self.tid);
        assert_eq!(t.stage, "cancelled");
        assert!(t.cancelled_at.is_some());
        assert_eq!(
            t.work_item_id,
            Some(format!("ORCH-900#cancelled-{}", self.tid))
        );
        assert_eq!(
            self.env.count(&format!(
                "SELECT count(*) FROM jobs WHERE task_id = {} AND status IN ('queued', 'running')",
                self.tid
            )),
            0
        );
        let rows = outbox(&self.env);
        let at = rows.iter().position(|r| r.kind == kind).unwrap();
        for (i, r) in rows.iter().enumerate() {
            if i < at {
                assert_eq!(r.status, "done", "{r:?}");
            } else if i == at {
                assert_eq!(r.status, "pending", "{r:?}");
                assert_eq!(r.claimed_pid, Some(dead), "{r:?}");
                assert_eq!(r.attempts, 1);
            } else {
                assert_eq!(r.status, "pending", "{r:?}");
                assert_eq!((r.claimed_pid, r.attempts), (None, 0), "{r:?}");
            }
        }
        // `queue` shows what is left.
        let q = self.env.json(&["queue"]);
        assert_eq!(q["outbox"]["pending"], (rows.len() - at) as i64, "{q}");
    }

    fn all_done(&self) {
        for r in outbox(&self.env) {
            assert_eq!(r.status, "done", "{r:?}");
        }
    }
}

fn ok_delete(gitea: &MockServer) -> httpmock::Mock<'_> {
    gitea.mock(|when, then| {
        when.method(DELETE).path(DELETE_PATH);
        then.status(204);
    })
}

fn ok_comment(plane: &MockServer) -> httpmock::Mock<'_> {
    plane.mock(|when, then| {
        when.method(POST).path(COMMENT_PATH);
        then.status(201).json_body(json!({ "id": "comment-1" }));
    })
}

// ------------------------------------------------------------------- crash in the middle

#[test]
fn killed_while_the_agent_ignores_sigterm_a_second_stop_finishes_every_effect_once() {
    let mut w = World::new();
    w.env.set("ORCH_STOP_GRACE_SECS", "30");
    let delete = ok_delete(&w.gitea);
    let comment = ok_comment(&w.plane);
    let agent = Agent::spawn("trap '' TERM; sleep 60 & sleep 60; wait");
    let members = agent.group();
    w.env.make_job_full(
        w.tid,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(1),
        1,
        2,
    );

    let dead = w.kill_stop_during("stop_process", || true);

    w.assert_consistent_after_kill("stop_process", dead);
    assert!(
        members.iter().all(|p| alive(*p)),
        "the agent ignores SIGTERM"
    );
    assert!(w.wt.exists());
    delete.assert_hits(0);
    comment.assert_hits(0);
    assert!(lines(&w.notify_log).is_empty());

    // The operator repeats the STOP: the dead process's claim is taken over.
    w.env.set("ORCH_STOP_GRACE_SECS", "0.3");
    let res = w.env.json(&["stop", &w.tid.to_string()]);
    assert_eq!(res["note"], "already-terminal:cancelled");
    assert_eq!(res["stopped"], 1, "{res}");
    assert_eq!(effect(&res, "stop_process")["detail"]["signal"], "SIGKILL");
    for p in &members {
        assert!(!alive(*p), "pid {p} survived");
    }
    assert!(!w.wt.exists());
    assert!(!w.repo.local_branches().contains("ORCH-900"));
    w.all_done();
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);

    // Nothing runs twice afterwards.
    w.env.json(&["reconcile"]);
    w.env.json(&["stop", &w.tid.to_string()]);
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);
}

#[test]
fn killed_while_git_hangs_on_the_worktree_a_second_stop_finishes_once() {
    let mut w = World::new();
    let git = FakeGit::install(&mut w.env);
    let delete = ok_delete(&w.gitea);
    let comment = ok_comment(&w.plane);
    git.hang(true);

    let dead = w.kill_stop_during("remove_worktree", || {
        git.calls().iter().any(|c| c.contains("worktree remove"))
    });
    // The stalled git dies with orchctl: it cannot go on to race the retry.
    assert!(
        wait_until(Duration::from_secs(5), || pids_with("worktree remove")
            .is_empty()),
        "git outlived the orchctl that started it"
    );
    for pid in pids_with("worktree remove") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    git.hang(false);

    w.assert_consistent_after_kill("remove_worktree", dead);
    assert!(w.wt.exists());
    delete.assert_hits(0);

    let res = w.env.json(&["stop", "ORCH-900"]);
    // The key was tombstoned by the first STOP: it no longer resolves.
    assert_eq!(res["note"], "no-task");
    let res = w.env.json(&["stop", &w.tid.to_string()]);
    assert_eq!(res["note"], "already-terminal:cancelled");
    assert_eq!(effect(&res, "remove_worktree")["status"], "done");
    assert!(!w.wt.exists());
    w.all_done();
    w.env.json(&["reconcile"]);
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);
}

#[test]
fn killed_while_gitea_stalls_on_the_branch_delete_reconcile_finishes_once() {
    let w = World::new();
    let mut stalled = w.gitea.mock(|when, then| {
        when.method(DELETE).path(DELETE_PATH);
        then.status(204).delay(Duration::from_secs(30));
    });
    let comment = ok_comment(&w.plane);

    let dead = w.kill_stop_during("delete_remote_branch", || stalled.hits() == 1);

    w.assert_consistent_after_kill("delete_remote_branch", dead);
    assert!(!w.wt.exists(), "the worktree step finished before the kill");
    comment.assert_hits(0);
    assert!(lines(&w.notify_log).is_empty());

    stalled.delete();
    let delete = ok_delete(&w.gitea);
    let r = w.env.json(&["reconcile"]);
    assert_eq!(r["outbox"]["done"], 3, "{r}");
    w.all_done();
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);

    // After a success the branch is never deleted again, the comment never re-posted.
    w.env.json(&["reconcile"]);
    w.env.json(&["stop", &w.tid.to_string()]);
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);
}

#[test]
fn killed_while_plane_stalls_on_the_comment_the_retry_reuses_its_external_id() {
    let w = World::new();
    let delete = ok_delete(&w.gitea);
    let mut stalled = w.plane.mock(|when, then| {
        when.method(POST).path(COMMENT_PATH);
        then.status(201).delay(Duration::from_secs(30));
    });

    let dead = w.kill_stop_during("plane_comment", || stalled.hits() == 1);

    w.assert_consistent_after_kill("plane_comment", dead);
    delete.assert_hits(1);
    // Plane may have stored the comment before orchctl died. The retry carries the same
    // external id, which Plane answers with 409: no second comment.
    let id = row(&outbox(&w.env), "plane_comment").id;
    stalled.delete();
    let conflict = w.plane.mock(|when, then| {
        when.method(POST)
            .path(COMMENT_PATH)
            .body_contains(format!("\"external_id\":\"orchctl-{id}-"))
            .body_contains("\"external_source\":\"orchctl\"");
        then.status(409);
    });
    let res = w.env.json(&["stop", &w.tid.to_string()]);
    assert_eq!(
        effect(&res, "plane_comment")["result"],
        "comment was already posted",
        "{res}"
    );
    conflict.assert_hits(1);
    w.all_done();
    w.env.json(&["reconcile"]);
    conflict.assert_hits(1);
    delete.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);
}

#[test]
fn killed_while_the_notify_hook_hangs_the_rerun_carries_the_same_notification_id() {
    let mut w = World::new();
    let delete = ok_delete(&w.gitea);
    let comment = ok_comment(&w.plane);
    let log = w.notify_log.clone();
    let first = w.env.path().join("hook-ran-once");
    let hook_pid = w.env.path().join("hook.pid");
    let hook = script(
        &w.env.path().join("hanging-notify.sh"),
        &format!(
            "#!/bin/sh\ncat >> '{log}'\necho >> '{log}'\n\
             if [ ! -e '{first}' ]; then touch '{first}'; echo $$ > '{pid}.new'; mv '{pid}.new' '{pid}'; exec sleep 30; fi\n",
            log = log.display(),
            first = first.display(),
            pid = hook_pid.display()
        ),
    );
    w.env.set("ORCH_NOTIFY_CMD", hook.to_str().unwrap());

    let dead = w.kill_stop_during("notify", || hook_pid.exists());
    // The hook dies with the orchctl that started it.
    let pid: i64 = std::fs::read_to_string(&hook_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let died = wait_until(Duration::from_secs(5), || !alive(pid as i32));
    drop(GroupGuard(pid));
    assert!(died, "the notify hook outlived orchctl");

    w.assert_consistent_after_kill("notify", dead);
    delete.assert_hits(1);
    comment.assert_hits(1);

    w.env.json(&["reconcile"]);
    w.all_done();
    // The hook ran twice (at least once is all a crash allows) with one stable key, so a
    // hook can drop the repeat; nothing else ran again.
    let events: Vec<Value> = lines(&log)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["notification_id"], events[1]["notification_id"]);
    assert!(events[0]["notification_id"]
        .as_str()
        .unwrap()
        .starts_with("orchctl-"));
    w.env.json(&["reconcile"]);
    assert_eq!(lines(&log).len(), 2);
    delete.assert_hits(1);
    comment.assert_hits(1);
}

// ------------------------------------------------------------------------------ outages

#[test]
fn gitea_and_plane_refusing_connections_leave_the_stop_committed_and_the_effects_queued() {
    let mut env = Env::new();
    env.set(
        "ORCH_GITEA_URL",
        &format!("http://127.0.0.1:{}", closed_port()),
    )
    .set("ORCH_GITEA_OWNER", "acme")
    .set("ORCH_GITEA_TOKEN", "gitea-token-o")
    .set(
        "ORCH_PLANE_URL",
        &format!("http://127.0.0.1:{}", closed_port()),
    )
    .set("ORCH_PLANE_WORKSPACE", "acme")
    .set("ORCH_PLANE_API_TOKEN", "plane-token-o");
    let tid = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-910",
        "--plane-id",
        "PL-910",
        "--project-id",
        "proj-1",
        "--stage",
        "review",
    ])["task"]["id"]
        .as_i64()
        .unwrap();

    let res = env.json(&["stop", "ORCH-910"]);

    assert_eq!(res["note"], "cancelled");
    assert_eq!(env.task(tid).stage, "cancelled");
    for kind in ["delete_remote_branch", "plane_comment"] {
        let e = effect(&res, kind);
        assert_eq!(e["status"], "pending", "{e}");
        assert!(e["error"].as_str().unwrap().contains("unreachable"), "{e}");
    }
    let q = env.json(&["queue"]);
    assert_eq!(q["outbox"]["pending"], 2, "{q}");
    let kinds: Vec<&str> = q["outbox"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"delete_remote_branch") && kinds.contains(&"plane_comment"));

    // Both come back: the next reconcile finishes the work, once.
    let gitea = MockServer::start();
    let plane = MockServer::start();
    let delete = gitea.mock(|when, then| {
        when.method(DELETE)
            .path("/api/v1/repos/acme/orchestrator/branches/feature/ORCH-910");
        then.status(204);
    });
    let comment = plane.mock(|when, then| {
        when.method(POST)
            .path("/api/v1/workspaces/acme/projects/proj-1/issues/PL-910/comments/");
        then.status(201);
    });
    env.set("ORCH_GITEA_URL", &gitea.base_url())
        .set("ORCH_PLANE_URL", &plane.base_url());
    let r = env.json(&["reconcile"]);
    assert_eq!(r["outbox"]["done"], 2, "{r}");
    env.json(&["reconcile"]);
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(env.json(&["queue"])["outbox"]["pending"], 0);
}

#[test]
fn stalled_servers_cost_at_most_the_http_timeout_per_request() {
    let gitea = MockServer::start();
    let plane = MockServer::start();
    let mut slow_delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(204).delay(Duration::from_secs(60));
    });
    let mut slow_comment = plane.mock(|when, then| {
        when.method(POST);
        then.status(201).delay(Duration::from_secs(60));
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &gitea.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_PLANE_URL", &plane.base_url())
        .set("ORCH_PLANE_WORKSPACE", "acme")
        .set("ORCH_HTTP_TIMEOUT_SECS", "0.5");
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-911",
        "--plane-id",
        "PL-911",
        "--project-id",
        "proj-1",
    ]);

    let started = Instant::now();
    let res = env.json(&["stop", "ORCH-911"]);
    let took = started.elapsed();

    // Two requests of at most 0.5 s each; the bound is generous for a loaded machine but
    // far below the stubs' 60 s.
    assert!(took < Duration::from_secs(20), "stop took {took:?}");
    assert_eq!(res["note"], "cancelled");
    for kind in ["delete_remote_branch", "plane_comment"] {
        let e = effect(&res, kind);
        assert_eq!(e["status"], "pending", "{e}");
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("timeout")
                || e["error"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .contains("timed out"),
            "{e}"
        );
    }
    slow_delete.assert_hits(1);
    slow_comment.assert_hits(1);
    slow_delete.delete();
    slow_comment.delete();
    let delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let comment = plane.mock(|when, then| {
        when.method(POST);
        then.status(201);
    });
    let r = env.json(&["reconcile"]);
    assert_eq!(r["outbox"]["done"], 2, "{r}");
    delete.assert_hits(1);
    comment.assert_hits(1);
}

#[test]
fn server_errors_and_rate_limits_wait_in_the_outbox_honouring_retry_after() {
    let gitea = MockServer::start();
    let plane = MockServer::start();
    let mut limited_delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(429);
    });
    let mut limited_comment = plane.mock(|when, then| {
        when.method(POST);
        then.status(429).header("Retry-After", "120");
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &gitea.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_PLANE_URL", &plane.base_url())
        .set("ORCH_PLANE_WORKSPACE", "acme");
    let tid = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-912",
        "--plane-id",
        "PL-912",
        "--project-id",
        "proj-1",
    ])["task"]["id"]
        .as_i64()
        .unwrap();

    let res = env.json(&["stop", "ORCH-912"]);
    assert_eq!(env.task(tid).stage, "cancelled");
    assert_eq!(effect(&res, "delete_remote_branch")["status"], "pending");
    assert_eq!(effect(&res, "plane_comment")["status"], "pending");
    limited_comment.assert_hits(1);
    // Retry-After: 120 is honoured: the comment is not due before then.
    let next: String = env.db().value(
        "SELECT next_attempt_at FROM outbox WHERE kind = 'plane_comment'",
        (),
    );
    let due = unix_secs(&next) - unix_secs(&now_ts());
    assert!((100..=121).contains(&due), "next attempt in {due}s");

    // Gitea now fails with a 5xx: still pending, retried.
    limited_delete.delete();
    let mut broken = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(502);
    });
    let r = env.json(&["reconcile"]);
    assert_eq!(r["outbox"]["pending"], 1, "{r}");
    broken.assert_hits(1);
    limited_comment.assert_hits(1);
    assert!(row(&outbox(&env), "delete_remote_branch")
        .last_error
        .as_deref()
        .unwrap()
        .contains("502"));

    // Both recover; once the retry time has come, one reconcile finishes both.
    broken.delete();
    limited_comment.delete();
    let delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let comment = plane.mock(|when, then| {
        when.method(POST);
        then.status(201);
    });
    env.db().execute(
        "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE status = 'pending'",
        (),
    );
    let r = env.json(&["reconcile"]);
    assert_eq!(r["outbox"]["done"], 2, "{r}");
    env.json(&["reconcile"]);
    delete.assert_hits(1);
    comment.assert_hits(1);
}

// ------------------------------------------------------------------------------- races

fn add_task(env: &Env, work_item: &str, stage: &str) -> i64 {
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        work_item,
        "--stage",
        stage,
    ])["task"]["id"]
        .as_i64()
        .unwrap()
}

#[test]
fn a_second_stop_never_runs_the_effects_ahead_of_the_first_one_still_stopping_the_agent() {
    let mut w = World::new();
    w.env.set("ORCH_STOP_GRACE_SECS", "30");
    let delete = ok_delete(&w.gitea);
    let comment = ok_comment(&w.plane);
    let agent = Agent::spawn("trap '' TERM; sleep 60 & sleep 60; wait");
    let members = agent.group();
    w.env.make_job_full(
        w.tid,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(1),
        1,
        2,
    );
    let first = Bg::start(&w.env, &["stop", "ORCH-900"]);
    let first_pid = first.pid();
    assert!(wait_until(Duration::from_secs(30), || outbox(&w.env)
        .iter()
        .any(
            |r| r.kind == "stop_process" && r.claimed_pid == Some(first_pid)
        )));

    // The first STOP is waiting out the grace of an agent that ignores SIGTERM.
    let second = w.env.json(&["stop", &w.tid.to_string()]);

    assert_eq!(second["note"], "already-terminal:cancelled");
    for e in second["effects"].as_array().unwrap() {
        assert_eq!(e["status"], "busy", "the second STOP ran {e} out of order");
    }
    assert!(
        members.iter().all(|p| alive(*p)),
        "the agent is still stopping"
    );
    delete.assert_hits(0);
    assert!(w.wt.exists());

    // The agent dies: the first STOP goes on with every effect, in order, once.
    drop(agent);
    let res = first.json(Duration::from_secs(30));
    assert_eq!(res["note"], "cancelled");
    w.all_done();
    delete.assert_hits(1);
    comment.assert_hits(1);
    assert_eq!(lines(&w.notify_log).len(), 1);
    assert!(!w.wt.exists());
}

#[test]
fn two_stops_at_once_one_resets_one_is_a_no_op_and_effects_run_once() {
    let gitea = MockServer::start();
    let plane = MockServer::start();
    let delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let comment = plane.mock(|when, then| {
        when.method(POST);
        then.status(201);
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &gitea.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_PLANE_URL", &plane.base_url())
        .set("ORCH_PLANE_WORKSPACE", "acme");
    const ROUNDS: usize = 8;
    for i in 0..ROUNDS {
        let tid = env.json(&[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            &format!("ORCH-92{i}"),
            "--plane-id",
            &format!("PL-92{i}"),
            "--project-id",
            "proj-1",
        ])["task"]["id"]
            .as_i64()
            .unwrap();
        let a = Bg::start(&env, &["stop", &tid.to_string()]);
        let b = Bg::start(&env, &["stop", &tid.to_string()]);
        let mut notes = vec![
            a.json(Duration::from_secs(30))["note"].to_string(),
            b.json(Duration::from_secs(30))["note"].to_string(),
        ];
        notes.sort();
        assert_eq!(
            notes,
            vec![
                "\"already-terminal:cancelled\"".to_string(),
                "\"cancelled\"".to_string()
            ]
        );
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM task_events WHERE task_id = {tid} AND kind = 'cancelled'"
            )),
            1
        );
    }
    delete.assert_hits(ROUNDS);
    comment.assert_hits(ROUNDS);
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status <> 'done'"),
        0
    );
}

#[test]
fn stop_racing_claim_exec_as_real_processes_never_leaves_an_agent_running() {
    let mut env = Env::new();
    env.set("ORCH_STOP_GRACE_SECS", "2");
    let (mut stop_first, mut killed_at_launch, mut stopped_after) = (0, 0, 0);
    for i in 0..12 {
        let tid = add_task(&env, &format!("ORCH-93{i:02}"), "development");
        let token = format!("race-agent-{}-{i}", std::process::id());
        let script = format!("sleep 60; : {token}");
        let claim = Bg::start(&env, &["claim", "--exec", "--", "sh", "-c", &script]);
        // Vary the start of the STOP so every interleaving gets a chance.
        std::thread::sleep(Duration::from_millis((i % 4) * 3));
        let stop = Bg::start(&env, &["stop", &tid.to_string()]);
        let (code, out, err) = claim.finish(Duration::from_secs(30));
        let stop = stop.json(Duration::from_secs(30));
        let claimed: Option<Value> = (code == 0).then(|| serde_json::from_str(&out).unwrap());
        let _guard = claimed
            .as_ref()
            .and_then(|c| c["pid"].as_i64())
            .map(GroupGuard);
        match &claimed {
            None => {
                assert_eq!(code, 3, "claim failed: {err}");
                stop_first += 1;
            }
            Some(c) if c["killed_at_launch"] == true => killed_at_launch += 1,
            Some(_) => {
                assert_eq!(stop["stopped"], 1, "{stop}");
                stopped_after += 1;
            }
        }
        assert!(
            wait_until(Duration::from_secs(10), || pids_with(&token).is_empty()),
            "round {i}: an agent of a stopped task is still running ({claimed:?}, {stop})"
        );
        assert_eq!(env.task(tid).stage, "cancelled");
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM jobs WHERE task_id = {tid} AND status <> 'cancelled'"
            )),
            0,
            "round {i}"
        );
    }
    eprintln!(
        "stop vs claim --exec: stop first {stop_first}, killed at launch {killed_at_launch}, \
         stopped after launch {stopped_after}"
    );
}

#[test]
fn stop_racing_complete_as_real_processes_keeps_the_task_cancelled() {
    let env = Env::new();
    for i in 0..12 {
        let tid = add_task(&env, &format!("ORCH-94{i:02}"), "development");
        let c = env.json(&["claim"]);
        let (job, run) = (c["id"].as_i64().unwrap(), c["run_id"].as_i64().unwrap());
        let outcome = if i % 2 == 0 { "--success" } else { "--failure" };
        let complete = Bg::start(
            &env,
            &[
                "complete",
                &job.to_string(),
                "--run-id",
                &run.to_string(),
                outcome,
            ],
        );
        let stop = Bg::start(&env, &["stop", &tid.to_string()]);
        let done = complete.json(Duration::from_secs(30));
        stop.json(Duration::from_secs(30));

        let status = env.job_status(job);
        if done["note"] == "stale-run" {
            assert_eq!(status, "cancelled", "round {i}: STOP came first");
        } else {
            // complete came first; STOP then cancelled whatever it queued.
            assert!(
                matches!(status.as_str(), "done" | "cancelled"),
                "round {i}: {status}"
            );
        }
        assert_eq!(env.task(tid).stage, "cancelled", "round {i}");
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM jobs WHERE task_id = {tid} AND status IN ('queued', 'running')"
            )),
            0,
            "round {i}: a job of a cancelled task is live"
        );
        // A late complete never revives it.
        let late = env.json(&[
            "complete",
            &job.to_string(),
            "--run-id",
            &run.to_string(),
            "--success",
        ]);
        assert_eq!(late["note"], "stale-run");
        assert_eq!(env.job_status(job), status);
    }
}

#[test]
fn reap_racing_complete_as_real_processes_never_undoes_a_completed_run() {
    let env = Env::new();
    for i in 0..12 {
        let tid = add_task(&env, &format!("ORCH-95{i:02}"), "development");
        let c = env.json(&["claim"]);
        let (job, run) = (c["id"].as_i64().unwrap(), c["run_id"].as_i64().unwrap());
        // The agent's recorded pid is gone: reap judges the run dead.
        env.db().execute(
            "UPDATE jobs SET pid = 2147483000, proc_start = 1 WHERE id = ?1",
            [job],
        );
        let complete = Bg::start(
            &env,
            &[
                "complete",
                &job.to_string(),
                "--run-id",
                &run.to_string(),
                "--success",
            ],
        );
        let reap = Bg::start(&env, &["reap"]);
        let done = complete.json(Duration::from_secs(30));
        let reaped = reap.json(Duration::from_secs(30));
        let reaped_it = reaped["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["job_id"] == job);
        let status = env.job_status(job);
        if done["note"] == "stale-run" {
            assert!(reaped_it, "round {i}: stale-run without a reap");
            assert_eq!(status, "queued", "round {i}");
            assert_eq!(env.task(tid).stage, "development");
        } else {
            assert!(
                !reaped_it,
                "round {i}: both complete and reap won: {reaped}"
            );
            assert_eq!(status, "done", "round {i}: a completed run was undone");
            assert_eq!(env.task(tid).stage, "review");
        }
        // Leave nothing queued for the next round's claim.
        env.json(&["stop", &tid.to_string()]);
    }
}

#[test]
fn reap_deciding_on_a_stale_view_cannot_undo_a_complete_that_landed_first() {
    // River #1302: the reaper reads a running job, the job completes, then the reaper
    // writes. The guarded update must make that write a no-op.
    let env = Env::new();
    add_task(&env, "ORCH-960", "development");
    let c = env.json(&["claim"]);
    let job_id = c["id"].as_i64().unwrap();
    let ctx = env.ctx();
    let seen_running = ctx.store.read(|r| r.job(job_id)).unwrap().unwrap();
    assert_eq!(seen_running.status, "running");

    env.json(&[
        "complete",
        &job_id.to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--success",
    ]);
    let action = ctx
        .store
        .write(|w| orchctl::jobs::reap_unknown_outcome(w, &seen_running, "agent gone"))
        .unwrap();

    assert_eq!(action, None, "reap overwrote a completed run");
    assert_eq!(env.job_status(job_id), "done");
    // The same holds for a job that was cancelled, and for one requeued and re-claimed.
    let tid = add_task(&env, "ORCH-961", "development");
    let c = env.json(&["claim", "--agent", "developer"]);
    let seen = ctx
        .store
        .read(|r| r.job(c["id"].as_i64().unwrap()))
        .unwrap()
        .unwrap();
    env.json(&["stop", &tid.to_string()]);
    assert_eq!(
        ctx.store
            .write(|w| orchctl::jobs::reap_unknown_outcome(w, &seen, "agent gone"))
            .unwrap(),
        None
    );
    assert_eq!(env.job_status(seen.id), "cancelled");
}

#[test]
fn a_database_busy_past_the_timeout_exits_75_and_nothing_is_half_written() {
    let mut env = Env::new();
    env.set("ORCH_BUSY_TIMEOUT_MS", "150");
    let stoppable = add_task(&env, "ORCH-970", "development");
    add_task(&env, "ORCH-971", "review");
    let running = env.json(&["claim", "--agent", "reviewer"]);
    let deploy = add_task(&env, "ORCH-972", "deploy");
    // A running job whose agent is gone, so reap has something to write.
    let t = add_task(&env, "ORCH-973", "analysis");
    env.make_job_full(
        t,
        "analyst",
        "running",
        Some(2147483000),
        Some(1),
        Some(99),
        1,
        2,
    );
    let before = snapshot(&env);

    let lock = env.hold_busy();
    let commands: Vec<Vec<String>> = vec![
        vec!["stop".into(), stoppable.to_string()],
        vec![
            "task".into(),
            "add".into(),
            "--repo".into(),
            "orchestrator".into(),
            "--work-item".into(),
            "ORCH-974".into(),
        ],
        vec!["claim".into()],
        vec![
            "complete".into(),
            running["id"].to_string(),
            "--run-id".into(),
            running["run_id"].to_string(),
            "--success".into(),
        ],
        vec!["reap".into()],
        vec!["deploy-begin".into(), deploy.to_string()],
        vec![
            "finalize-deploy".into(),
            deploy.to_string(),
            "--outcome".into(),
            "failure".into(),
        ],
    ];
    for args in &commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let (code, stdout, stderr) = env.run(&args);
        assert_eq!(code, 75, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed a result: {stdout}");
        assert!(stderr.starts_with("orchctl: "), "{stderr}");
        assert!(stderr.contains("retry"), "a hint to retry: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    lock.release();
    assert_unchanged(&env, &before, "after commands refused on a busy database");

    // Once the lock is gone the same command goes through.
    assert_eq!(
        env.json(&["stop", &stoppable.to_string()])["note"],
        "cancelled"
    );
}

#[test]
fn an_agent_whose_launch_cannot_be_recorded_is_killed_not_left_loose() {
    let mut env = Env::new();
    env.set("ORCH_BUSY_TIMEOUT_MS", "100");
    add_task(&env, "ORCH-975", "development");
    let ctx = env.ctx();
    let mut claimed = orchctl::claim::claim(&ctx, &Default::default())
        .unwrap()
        .unwrap();
    let token = format!("unrecorded-agent-{}", std::process::id());
    let lock = env.hold_busy();

    let err = orchctl::claim::launch(
        &ctx,
        &mut claimed,
        &["sh".into(), "-c".into(), format!("sleep 60; : {token}")],
    )
    .unwrap_err();

    let gone = wait_until(Duration::from_secs(5), || pids_with(&token).is_empty());
    let loose = pids_with(&token);
    for p in &loose {
        drop(GroupGuard(*p as i64));
    }
    assert!(gone, "an unrecorded agent is running: {loose:?}");
    assert_eq!(
        orchctl::error::exit_kind(&err),
        orchctl::error::ExitKind::TempFail,
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("killed"), "{err:#}");
    lock.release();
}

#[test]
fn an_agent_whose_run_was_requeued_before_its_launch_is_killed() {
    let env = Env::new();
    add_task(&env, "ORCH-976", "development");
    let ctx = env.ctx();
    let mut claimed = orchctl::claim::claim(&ctx, &Default::default())
        .unwrap()
        .unwrap();
    // Boot-time recovery runs between the claim and the launch: the run is requeued.
    assert_eq!(env.json(&["reap", "--recover"])["requeued"], 1);

    orchctl::claim::launch(
        &ctx,
        &mut claimed,
        &["sh".into(), "-c".into(), "sleep 60 & sleep 60".into()],
    )
    .unwrap();

    let pid = claimed.pid.unwrap();
    let _guard = GroupGuard(pid);
    assert!(claimed.killed_at_launch);
    assert_eq!(claimed.status, "queued");
    assert!(wait_until(Duration::from_secs(5), || group_members(
        pid as i32
    )
    .is_empty()));
    let job = ctx.store.read(|r| r.job(claimed.id)).unwrap().unwrap();
    assert_eq!((job.status.as_str(), job.pid), ("queued", None));
}

// ---------------------------------------------------------------------- process safety

#[test]
fn processes_that_left_the_agent_group_are_reported_not_hunted() {
    let env = Env::new();
    let tid = add_task(&env, "ORCH-980", "development");
    // One child starts its own session, one its own group; the shell and a plain child stay.
    let agent = Agent::spawn(
        "setsid sleep 61 & perl -e 'setpgrp(0, 0); select(undef, undef, undef, 62)' & sleep 60; wait",
    );
    let mut escaped = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        escaped = all_procs()
            .into_iter()
            .filter(|p| p.ppid == agent.pid as i32 && p.pgrp != agent.pid as i32)
            .map(|p| p.pid)
            .collect();
        escaped.len() == 2
    }));
    let _strays: Vec<GroupGuard> = escaped.iter().map(|p| GroupGuard(*p as i64)).collect();
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

    let res = env.json(&["stop", &tid.to_string()]);

    let e = effect(&res, "stop_process");
    assert_eq!(e["detail"]["outcome"], "stopped");
    let mut strays: Vec<i64> = e["detail"]["strays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    strays.sort_unstable();
    escaped.sort_unstable();
    assert_eq!(
        strays,
        escaped.iter().map(|p| *p as i64).collect::<Vec<_>>()
    );
    assert!(group_members(agent.pid as i32).is_empty());
    for p in &escaped {
        assert!(alive(*p), "pid {p} left the group and was hunted anyway");
    }
    let log = env.json(&["task", "log", &tid.to_string()]);
    let logged = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ev| ev["kind"] == "stop_process")
        .unwrap()
        .to_string();
    for p in &escaped {
        assert!(logged.contains(&p.to_string()), "{logged}");
    }
}

fn all_procs() -> Vec<orchctl::integrations::process::ProcStat> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .filter_map(orchctl::integrations::process::stat)
        .filter(|s| !s.exited())
        .collect()
}

#[test]
fn pid_zero_one_and_negative_are_refused_and_recorded_as_such() {
    let env = Env::new();
    let init_start = orchctl::integrations::process::stat(1).map(|s| s.start);
    for (i, (pid, start)) in [(0, Some(1)), (1, init_start), (-1, Some(1)), (-4242, None)]
        .into_iter()
        .enumerate()
    {
        let tid = add_task(&env, &format!("ORCH-98{}", i + 1), "development");
        env.make_job_full(tid, "developer", "running", Some(pid), start, Some(1), 1, 2);
        let res = env.json(&["stop", &tid.to_string()]);
        let e = effect(&res, "stop_process");
        assert_eq!(e["status"], "failed", "pid {pid}: {e}");
        assert!(e["error"].as_str().unwrap().contains("refusing"), "{e}");
        assert_eq!(res["stopped"], 0);
        assert_eq!(res["note"], "cancelled");
    }
}

#[test]
fn an_agent_in_orchctl_s_own_process_group_is_refused() {
    // A helper in this test's process group: the orchctl child shares the group, so
    // signalling it would hit orchctl (and this test) itself.
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = child.id() as i64;
    let start = orchctl::integrations::process::stat(pid).unwrap().start;
    let env = Env::new();
    let tid = add_task(&env, "ORCH-985", "development");
    env.make_job_full(
        tid,
        "developer",
        "running",
        Some(pid),
        Some(start),
        Some(1),
        1,
        2,
    );

    let res = env.json(&["stop", &tid.to_string()]);

    let e = effect(&res, "stop_process");
    assert_eq!(e["status"], "failed", "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("orchctl's own"),
        "{e}"
    );
    assert!(alive(pid as i32));
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------------- data safety

/// SQLite's migrations are numbered steps: the second failing takes the first back.
#[test]
fn sqlite_only_a_failed_migration_rolls_back_whole() {
    let env = Env::sqlite();
    std::fs::create_dir_all(env.db.parent().unwrap()).unwrap();
    {
        // A view where migration 2 wants its counter table: migration 1 succeeds, then
        // migration 2 fails writing to it.
        let c = rusqlite::Connection::open(&env.db).unwrap();
        c.execute_batch("CREATE VIEW job_counts AS SELECT 'queued' AS status, 0 AS n;")
            .unwrap();
    }
    let before = crate::fault::dump(&env);

    let (code, stdout, stderr) = env.run(&["migrate"]);

    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.contains("migration 2 failed"), "{stderr}");
    // Migration 1's tables are gone with it; the version did not move.
    assert_eq!(crate::fault::dump(&env), before);
    let (code, _, _) = env.run(&["task", "list"]);
    assert_eq!(code, 1, "every command refuses until the migration can run");
}

/// On either backend: a database the migrations cannot bring up to date (a view stands
/// where the schema wants its `outbox` table) is refused, and left exactly as it was —
/// none of the tables made before the failure stays.
#[test]
fn a_migration_that_fails_leaves_the_database_as_it_was() {
    let env = Env::new();
    std::fs::create_dir_all(env.db.parent().unwrap()).unwrap();
    env.db_raw()
        .batch("CREATE VIEW outbox AS SELECT 1 AS id, 'x' AS kind");
    let before = crate::fault::dump(&env);

    let (code, stdout, stderr) = env.run(&["migrate"]);

    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.starts_with("orchctl: "), "{stderr}");
    assert_eq!(crate::fault::dump(&env), before);
    let (code, _, _) = env.run(&["task", "list"]);
    assert_eq!(code, 1, "every command refuses until the migration can run");
    assert_eq!(crate::fault::dump(&env), before);
}

#[test]
fn no_command_deletes_a_task_row_or_a_docs_artefact() {
    let mut env = Env::new();
    env.set("ORCH_CLAIM_TIMEOUT_SECS", "0");
    let repo = GitRepo::new(&env, "orchestrator");
    let docs = repo.clone.join("docs/work-items");
    let mut tasks = 0;
    let mut check = |env: &Env, what: &str| {
        let n = env.count("SELECT count(*) FROM tasks");
        assert!(n >= tasks, "{what}: a task row was deleted");
        tasks = n;
        for wi in ["ORCH-990", "ORCH-991", "ORCH-992"] {
            assert_eq!(
                std::fs::read_to_string(docs.join(wi).join("01-analysis.md")).unwrap(),
                format!("analysis of {wi}"),
                "{what}: a docs artefact of {wi} is gone"
            );
        }
    };
    for wi in ["ORCH-990", "ORCH-991", "ORCH-992"] {
        std::fs::create_dir_all(docs.join(wi)).unwrap();
        std::fs::write(
            docs.join(wi).join("01-analysis.md"),
            format!("analysis of {wi}"),
        )
        .unwrap();
        repo.feature(&env, &format!("feature/{wi}"));
    }
    check(&env, "start");
    let a = add_task(&env, "ORCH-990", "development");
    let b = add_task(&env, "ORCH-991", "deploy");
    let c = add_task(&env, "ORCH-992", "review");
    check(&env, "task add");
    let claimed = env.json(&["claim", "--agent", "developer"]);
    env.json(&[
        "complete",
        &claimed["id"].to_string(),
        "--run-id",
        &claimed["run_id"].to_string(),
        "--success",
    ]);
    check(&env, "complete");
    env.json(&["claim", "--agent", "reviewer"]);
    env.json(&["reap"]);
    check(&env, "reap");
    env.json(&["deploy-begin", &b.to_string()]);
    env.json(&["stop", &b.to_string()]);
    env.json(&["finalize-deploy", &b.to_string(), "--outcome", "success"]);
    check(&env, "deferred stop + finalize");
    env.json(&["stop", &a.to_string()]);
    env.json(&["stop", &c.to_string()]);
    check(&env, "stop");
    env.json(&["reconcile"]);
    env.json(&["reap", "--recover"]);
    env.json(&["stop", &a.to_string()]);
    check(&env, "reconcile, recover, repeated stop");
    assert_eq!(
        env.count("SELECT count(*) FROM tasks WHERE stage = 'cancelled'"),
        3
    );
    // The worktrees went; the main clone and its docs stayed.
    assert!(repo.clone.join("README.md").exists());
    assert!(!repo.worktree_list().contains("feature/ORCH-99"));

    // No code path deletes task rows: the store has no such statement.
    let store = include_str!("../src/store/mod.rs").to_lowercase();
    assert!(!store.contains("delete from tasks"));
    assert!(!store.contains("delete from task_events"));
}

#[test]
fn a_repo_name_smuggled_into_the_database_is_refused_before_any_git_or_path_join() {
    let mut env = Env::new();
    let git = FakeGit::install(&mut env);
    // A git repository beside ORCH_REPOS_DIR with a worktree for the branch: what a path
    // join of `../outside` would reach.
    let outside_env = Env::new();
    let outside = GitRepo::new(&outside_env, "outside");
    let wt = outside.feature(&outside_env, "feature/ORCH-995-x");
    let target = env.repos.join("..").join("outside");
    std::os::unix::fs::symlink(&outside.clone, &target).unwrap();
    let seeded = [
        ("../outside", "feature/ORCH-995-x"),
        ("a/b", "feature/ORCH-996-x"),
        ("..", "feature/ORCH-997-x"),
        ("orchestrator", "-D"),
        ("orchestrator", "x/../../y"),
        ("orchestrator", "a@{1}"),
    ];
    for (i, (repo, branch)) in seeded.iter().enumerate() {
        let tid = env.make_task_in(
            &format!("PL-99{i}"),
            &format!("ORCH-99{i}"),
            "development",
            repo,
            Some(branch),
        );
        let res = env.json(&["stop", &tid.to_string()]);
        assert_eq!(res["note"], "cancelled", "{repo} {branch}");
        for kind in ["remove_worktree", "delete_remote_branch"] {
            let e = effect(&res, kind);
            assert_eq!(e["status"], "failed", "{repo} {branch}: {e}");
            assert!(
                e["error"].as_str().unwrap().starts_with("refused: invalid"),
                "{e}"
            );
        }
    }
    assert!(git.calls().is_empty(), "git ran: {:?}", git.calls());
    assert!(wt.exists(), "a worktree outside ORCH_REPOS_DIR was removed");
    assert!(outside.local_branches().contains("feature/ORCH-995-x"));
}
