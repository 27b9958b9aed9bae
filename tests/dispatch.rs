//! Agents that run by themselves (issue 11, SPEC §13): `orchctl dispatch`, the supervisor
//! of every run, and the worktrees orchctl owns — against real agent processes, a real
//! database and real git (a temp bare remote and its clone).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::common::{alive, group_members, Env, GitRepo, GroupGuard, RecordedRuns};
use crate::fault::{script, wait_until, Bg};

const REPO: &str = "orchestrator";

fn add(env: &Env, work_item: &str, stage: &str) -> (i64, Option<i64>) {
    let v = env.json(&[
        "task",
        "add",
        "--repo",
        REPO,
        "--work-item",
        work_item,
        "--stage",
        stage,
    ]);
    (v["task"]["id"].as_i64().unwrap(), v["job"]["id"].as_i64())
}

fn job(env: &Env, id: i64) -> (String, Option<String>, i64) {
    env.db().one(
        "SELECT status, error, attempts FROM jobs WHERE id = ?1",
        [id],
    )
}

fn stage(env: &Env, task: i64) -> String {
    env.task(task).stage.to_string()
}

/// An agent command: a script in the test's folder.
fn agent(env: &Env, name: &str, body: &str) -> String {
    script(
        &env.path().join(format!("{name}.sh")),
        &format!("#!/bin/sh\n{body}\n"),
    )
    .display()
    .to_string()
}

fn pids(v: &Value) -> Vec<i64> {
    v["launched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["pid"].as_i64().unwrap())
        .collect()
}

fn worktrees_dir(env: &Env) -> PathBuf {
    env.path().join("xdg/orchctl/worktrees")
}

// ------------------------------------------------------------------ slots and waiting

#[test]
fn one_developer_slot_launches_one_of_two_jobs_and_a_second_dispatch_launches_nothing() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sleep 60");
    let (_, a) = add(&env, "ORCH-1", "development");
    let (_, b) = add(&env, "ORCH-2", "development");

    let first = env.json(&["dispatch"]);
    let launched = first["launched"].as_array().unwrap();
    assert_eq!(launched.len(), 1, "{first}");
    let _g = GroupGuard(launched[0]["pid"].as_i64().unwrap());
    assert_eq!(launched[0]["id"].as_i64(), a, "the oldest job first");
    assert_eq!(launched[0]["agent"], "developer");
    assert_eq!(
        launched[0]["worktree"],
        worktrees_dir(&env)
            .join(REPO)
            .join("ORCH-1")
            .display()
            .to_string()
    );
    assert_eq!(first["waiting"], serde_json::json!({ "developer": 1 }));
    assert_eq!(
        first["slots"]["developer"],
        serde_json::json!({ "running": 1, "limit": 1 })
    );
    assert_eq!(first["reaped"]["checked"], 0);

    let second = env.json(&["dispatch"]);
    assert_eq!(second["launched"], serde_json::json!([]), "{second}");
    assert_eq!(second["waiting"]["developer"], 1);
    assert_eq!(second["reaped"]["alive"], 1);
    assert_eq!(job(&env, b.unwrap()).0, "queued");
    // Nothing launched is still success.
    assert_eq!(env.run(&["dispatch"]).0, 0);
}

#[test]
fn agent_and_repo_narrow_what_a_dispatch_launches() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    GitRepo::new(&env, "other");
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sleep 60")
        .set("ORCH_AGENT_CMD_REVIEWER", "sleep 60")
        .set("ORCH_AGENT_SLOTS_DEVELOPER", "3");
    let (_, dev) = add(&env, "ORCH-7", "development");
    let (_, rev) = add(&env, "ORCH-8", "review");
    let other = env.json(&[
        "task",
        "add",
        "--repo",
        "other",
        "--work-item",
        "OTHER-1",
        "--stage",
        "development",
    ])["job"]["id"]
        .as_i64();
    let ids = |v: &Value| -> Vec<Option<i64>> {
        v["launched"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_i64())
            .collect()
    };

    // Only the reviewer, though developers have free slots and older jobs.
    let v = env.json(&["dispatch", "--agent", "reviewer"]);
    let _g: Vec<GroupGuard> = pids(&v).into_iter().map(GroupGuard).collect();
    assert_eq!(ids(&v), [rev], "{v}");
    assert!(v["slots"].get("developer").is_none(), "{v}");
    assert_eq!(job(&env, dev.unwrap()).0, "queued");
    // Only the other repo's job, though this repo's developer job is older.
    let v = env.json(&["dispatch", "--repo", "other"]);
    let _h: Vec<GroupGuard> = pids(&v).into_iter().map(GroupGuard).collect();
    assert_eq!(ids(&v), [other], "{v}");
    assert_eq!(v["launched"][0]["repo"], "other");
    assert_eq!(job(&env, dev.unwrap()).0, "queued");
    // An unknown agent is bad input, not a pass over every agent.
    assert_eq!(env.run(&["dispatch", "--agent", "tester"]).0, 2);
    assert_eq!(job(&env, dev.unwrap()).0, "queued");
}

#[test]
fn dry_run_shows_what_would_be_launched_and_changes_nothing() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sleep 60")
        .set("ORCH_AGENT_CMD_ANALYST", "sleep 60");
    let (_, dev) = add(&env, "ORCH-3", "development");
    let (_, an) = add(&env, "ORCH-4", "analysis");
    add(&env, "ORCH-5", "development");
    let before = env.dump();

    let v = env.json(&["dispatch", "--dry-run"]);

    assert_eq!(v["dry_run"], true);
    let ids: Vec<i64> = v["launched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![dev.unwrap(), an.unwrap()], "{v}");
    assert!(
        v["launched"][0]["pid"].is_null(),
        "nothing was started: {v}"
    );
    assert_eq!(v["waiting"], serde_json::json!({ "developer": 1 }));
    assert_eq!(v["slots"]["developer"]["running"], 1);
    assert_eq!(env.dump(), before, "the database is unchanged");
    assert!(!env.logs.exists(), "no run was started, no log written");
    assert!(!worktrees_dir(&env).exists());
    // ...and the real pass launches exactly what the dry run showed.
    let real = env.json(&["dispatch"]);
    let real_ids: Vec<i64> = real["launched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(real_ids, ids);
}

#[test]
fn an_agent_without_a_command_is_never_dispatched() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_REVIEWER", "sleep 60");
    let (_, dev) = add(&env, "ORCH-6", "development");
    for _ in 0..2 {
        let v = env.json(&["dispatch"]);
        assert_eq!(v["launched"], serde_json::json!([]), "{v}");
        assert_eq!(v["waiting"], serde_json::json!({ "developer": 1 }));
        assert!(v["no_command"]
            .as_array()
            .unwrap()
            .contains(&Value::from("developer")));
    }
    assert_eq!(job(&env, dev.unwrap()), ("queued".into(), None, 0));
    // claim --exec still serves it.
    let c = env.json(&["claim", "--exec", "--", "sleep", "60"]);
    let _g = GroupGuard(c["pid"].as_i64().unwrap());
    assert_eq!(c["id"].as_i64(), dev);
}

#[test]
fn the_waiting_count_is_what_claim_could_take() {
    // Dependencies, a pending STOP, the serial gate and other repos: `waiting` counts with
    // the claim's own rules (the store writes the eligibility twice).
    let env = Env::new();
    add(&env, "ORCH-10", "analysis");
    let v = env.json(&[
        "task",
        "add",
        "--repo",
        REPO,
        "--work-item",
        "ORCH-11",
        "--stage",
        "development",
        "--depends-on",
        "ORCH-10",
    ]);
    assert!(v["job"]["id"].is_i64());
    add(&env, "ORCH-12", "development");
    let (pending, _) = add(&env, "ORCH-13", "development");
    env.db().execute(
        "UPDATE tasks SET cancel_requested_at = '2026-01-01T00:00:00Z' WHERE id = ?1",
        [pending],
    );
    for (wi, branch) in [("ORCH-14", "feature/a"), ("ORCH-15", "feature/b")] {
        let t = env.make_task(&format!("PL-{wi}"), wi, "deploy", Some(branch));
        env.make_job_full(t, "deployer", "queued", None, None, None, 0, 2);
    }
    env.db().execute(
        "INSERT INTO merge_leases (repo, branch, task_id) VALUES (?1, 'feature/a', NULL)",
        [REPO],
    );
    let ctx = env.ctx();
    let filter = orchctl::store::ClaimFilter {
        agents: vec![],
        repo: None,
        task_deps: true,
        serial_gate: true,
    };
    for agent in ["analyst", "developer", "reviewer", "deployer"] {
        let counted = ctx
            .store
            .read(|r| r.count_eligible_queued(&filter, agent, 1000))
            .unwrap();
        let mut claimed = 0;
        while ctx
            .store
            .write(|w| {
                w.claim_next_job(
                    &orchctl::store::ClaimFilter {
                        agents: vec![agent.into()],
                        ..filter.clone()
                    },
                    "this-host",
                )
            })
            .unwrap()
            .is_some()
        {
            claimed += 1;
        }
        assert_eq!(counted, claimed, "{agent}");
    }
}

// --------------------------------------------------------------- exit status = outcome

#[test]
fn an_agent_that_exits_0_without_complete_advances_its_task() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "true");
    let (tid, dev) = add(&env, "ORCH-20", "development");
    env.json(&["dispatch"]);
    assert!(
        wait_until(Duration::from_secs(20), || job(&env, dev.unwrap()).0
            == "done"),
        "{:?}",
        job(&env, dev.unwrap())
    );
    assert_eq!(stage(&env, tid), "review");
    let next = env.count(&format!(
        "SELECT count(*) FROM jobs WHERE task_id = {tid} AND agent = 'reviewer' AND status = 'queued'"
    ));
    assert_eq!(next, 1, "the reviewer has no command: its job waits");
}

#[test]
fn an_agent_that_exits_3_records_exit_status_3_and_is_requeued_while_attempts_remain() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sh -c 'exit 3'");
    let (tid, dev) = add(&env, "ORCH-21", "development");
    let dev = dev.unwrap();
    env.json(&["dispatch"]);
    // The supervisor's own dispatch pass takes the requeued job again at once: the second
    // attempt fails as the first did, and the job is failed after max_attempts (2).
    assert!(wait_until(Duration::from_secs(20), || job(&env, dev).0 == "failed"));
    assert_eq!(
        job(&env, dev),
        ("failed".into(), Some("exit status 3".into()), 2)
    );
    let requeued: Vec<String> = env.db().values(
        "SELECT detail FROM task_events WHERE task_id = ?1 AND kind = 'job_requeued'",
        [tid],
    );
    assert_eq!(requeued.len(), 1, "{requeued:?}");
    assert!(requeued[0].contains("exit status 3"), "{requeued:?}");
    assert_eq!(stage(&env, tid), "development");
}

#[test]
fn claim_exec_records_the_exit_status_and_a_signal_by_name() {
    let env = Env::new();
    let _runs = RecordedRuns::new(&env);
    let (_, dev) = add(&env, "ORCH-22", "development");
    let dev = dev.unwrap();
    env.json(&["claim", "--exec", "--", "sh", "-c", "kill -KILL $$"]);
    assert!(wait_until(Duration::from_secs(10), || job(&env, dev).0 == "queued"));
    assert_eq!(
        job(&env, dev).1.as_deref(),
        Some("killed by signal SIGKILL")
    );
    env.json(&["claim", "--exec", "--", "sh", "-c", "exit 7"]);
    assert!(wait_until(Duration::from_secs(10), || job(&env, dev).0 == "failed"));
    assert_eq!(job(&env, dev).1.as_deref(), Some("exit status 7"));
}

#[test]
fn an_agent_that_reported_itself_keeps_its_report_and_a_late_complete_is_stale() {
    let env = Env::new();
    let _runs = RecordedRuns::new(&env);
    let (tid, dev) = add(&env, "ORCH-23", "development");
    let dev = dev.unwrap();
    // It reports success, then exits 1: the report stands, the exit status is not
    // recorded over it.
    let c = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "\"$0\" complete \"$ORCH_JOB_ID\" --run-id \"$ORCH_RUN_ID\" --success >/dev/null; exit 1",
        crate::common::BIN,
    ]);
    assert!(wait_until(Duration::from_secs(10), || job(&env, dev).0 == "done"));
    let run = c["run_id"].to_string();
    // The supervisor has nothing to add once the run is over; give it the time to try.
    assert!(wait_until(Duration::from_secs(10), || !alive(
        c["pid"].as_i64().unwrap() as i32
    )));
    assert_eq!(job(&env, dev), ("done".into(), None, 1));
    assert_eq!(stage(&env, tid), "review");
    let late = env.json(&["complete", &dev.to_string(), "--run-id", &run, "--failure"]);
    assert_eq!(late["note"], "stale-run");
    assert_eq!(job(&env, dev).0, "done");
}

// ---------------------------------------------------------- the pipeline, by itself

/// A script that records where it ran: `<agent> <folder> <branch>` in `results`.
fn recording(results: &Path, then: &str) -> String {
    format!(
        "set -e\necho \"$ORCH_AGENT $(pwd -P) $(git branch --show-current) $ORCH_WORKTREE\" >> '{}'\n{then}",
        results.display()
    )
}

#[test]
fn a_task_flows_from_development_to_deploy_after_one_dispatch_and_done_removes_its_worktree() {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    let results = env.path().join("results.txt");
    let dev = agent(
        &env,
        "developer",
        &recording(
            &results,
            "echo work > work.txt\ngit add work.txt\n\
             git -c user.name=dev -c user.email=dev@example.com commit -qm work\n\
             git push -q origin HEAD",
        ),
    );
    let rev = agent(&env, "reviewer", &recording(&results, "test -f work.txt"));
    let dep = agent(&env, "deployer", &recording(&results, "true"));
    env.set("ORCH_AGENT_CMD_DEVELOPER", &dev)
        .set("ORCH_AGENT_CMD_REVIEWER", &rev)
        .set("ORCH_AGENT_CMD_DEPLOYER", &dep);
    let (tid, _) = add(&env, "ORCH-30", "development");
    let branch = env.task(tid).branch.unwrap();

    env.json(&["dispatch"]);
    // No other tick: each supervisor dispatches the next stage itself.
    assert!(
        wait_until(Duration::from_secs(30), || stage(&env, tid) == "deploy"),
        "stuck in {}: {}",
        stage(&env, tid),
        std::fs::read_to_string(&results).unwrap_or_default()
    );
    let wt = worktrees_dir(&env).join(REPO).join("ORCH-30");
    let lines: Vec<String> = std::fs::read_to_string(&results)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let wt_text = wt.display().to_string();
    assert_eq!(
        lines,
        vec![
            format!("developer {wt_text} {branch} {wt_text}"),
            format!("reviewer {wt_text} {branch} {wt_text}"),
        ]
    );
    assert!(
        repo.remote_branches().contains(&branch),
        "the developer pushed"
    );

    env.json(&["confirm-deploy", "ORCH-30"]);
    env.json(&["dispatch"]);
    assert!(wait_until(Duration::from_secs(30), || stage(&env, tid) == "done"));
    assert!(wait_until(Duration::from_secs(10), || {
        env.count(&format!(
        "SELECT count(*) FROM outbox WHERE task_id = {tid} AND kind = 'remove_worktree' AND status = 'done'"
    )) == 1
    }));
    assert!(!wt.exists());
    let lines = std::fs::read_to_string(&results).unwrap();
    assert!(
        lines.ends_with(&format!("deployer {wt_text} {branch} {wt_text}\n")),
        "{lines}"
    );
    assert!(
        !repo.local_branches().contains(&branch),
        "the local branch is gone"
    );
    assert!(!repo.worktree_list().contains("ORCH-30"));
    assert!(repo.clone.join("README.md").exists(), "the clone is kept");
    assert!(
        repo.remote_branches().contains(&branch),
        "the remote branch is kept without ORCH_DELETE_BRANCH_ON_DONE"
    );
    let effects = env.json(&["task", "show", &tid.to_string()]);
    assert!(effects.to_string().contains("remove_worktree"), "{effects}");
}

#[test]
fn with_delete_branch_on_done_the_remote_branch_goes_too_and_the_docs_stay() {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    std::fs::create_dir_all(repo.clone.join("docs/work-items/ORCH-31")).unwrap();
    std::fs::write(
        repo.clone.join("docs/work-items/ORCH-31/notes.md"),
        "kept\n",
    )
    .unwrap();
    let dep = agent(
        &env,
        "deployer",
        "set -e\necho deployed > deployed.txt\ngit add deployed.txt\n\
         git -c user.name=d -c user.email=d@example.com commit -qm deployed\n\
         git push -q origin HEAD",
    );
    env.set("ORCH_AGENT_CMD_DEPLOYER", &dep)
        .set("ORCH_DELETE_BRANCH_ON_DONE", "on");
    let (tid, _) = add(&env, "ORCH-31", "deploy");
    let branch = env.task(tid).branch.unwrap();
    env.json(&["confirm-deploy", "ORCH-31"]);
    env.json(&["dispatch"]);
    assert!(wait_until(Duration::from_secs(30), || stage(&env, tid) == "done"));
    assert!(wait_until(Duration::from_secs(10), || env.count(&format!(
        "SELECT count(*) FROM outbox WHERE task_id = {tid} AND status = 'done'
           AND kind IN ('remove_worktree', 'delete_remote_branch')"
    )) == 2));
    assert!(!repo.remote_branches().contains(&branch));
    assert!(!repo.local_branches().contains(&branch));
    assert_eq!(
        std::fs::read_to_string(repo.clone.join("docs/work-items/ORCH-31/notes.md")).unwrap(),
        "kept\n"
    );
}

// ------------------------------------------------------------------------- worktrees

#[test]
fn a_worktree_comes_from_the_local_branch_else_the_remote_one_tracked_else_the_default_branch_fetched(
) {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    let git = |dir: &Path, args: &[&str]| -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // ORCH-40: a local branch with a commit of its own.
    git(&repo.clone, &["branch", "feature/ORCH-40"]);
    // ORCH-41: only on the remote, pushed from another clone.
    let other = env.path().join("other");
    let status = std::process::Command::new("git")
        .args(["clone", "-q"])
        .arg(&repo.bare)
        .arg(&other)
        .status()
        .unwrap();
    assert!(status.success());
    git(&other, &["checkout", "-q", "-b", "feature/ORCH-41"]);
    std::fs::write(other.join("remote.txt"), "from the remote\n").unwrap();
    git(&other, &["add", "."]);
    git(&other, &["commit", "-q", "-m", "remote work"]);
    git(&other, &["push", "-q", "origin", "feature/ORCH-41"]);
    // ORCH-42: nowhere yet; the remote's main moved on since the clone last fetched.
    git(&other, &["checkout", "-q", "main"]);
    std::fs::write(other.join("newer.txt"), "newer main\n").unwrap();
    git(&other, &["add", "."]);
    git(&other, &["commit", "-q", "-m", "newer main"]);
    git(&other, &["push", "-q", "origin", "main"]);
    let newest_main = git(&other, &["rev-parse", "HEAD"]);

    let out = env.path().join("where.txt");
    let dev = agent(
        &env,
        "developer",
        &format!(
            "echo \"$ORCH_WORK_ITEM $(git branch --show-current) $(git rev-parse --abbrev-ref --symbolic-full-name @{{u}} 2>/dev/null || echo none) $(git rev-parse HEAD)\" >> '{}'; sleep 60",
            out.display()
        ),
    );
    env.set("ORCH_AGENT_CMD_DEVELOPER", &dev)
        .set("ORCH_AGENT_SLOTS_DEVELOPER", "3");
    for wi in ["ORCH-40", "ORCH-41", "ORCH-42"] {
        env.json(&[
            "task",
            "add",
            "--repo",
            REPO,
            "--work-item",
            wi,
            "--branch",
            &format!("feature/{wi}"),
            "--stage",
            "development",
        ]);
    }
    let v = env.json(&["dispatch"]);
    assert_eq!(pids(&v).len(), 3, "{v}");
    assert!(wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&out)
            .map(|s| s.lines().count() == 3)
            .unwrap_or(false)
    }));
    let mut lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    let f = |i: usize| -> Vec<String> { lines[i].split(' ').map(String::from).collect() };
    assert_eq!(f(0)[..3], ["ORCH-40", "feature/ORCH-40", "none"]);
    assert_eq!(
        f(1)[..3],
        ["ORCH-41", "feature/ORCH-41", "origin/feature/ORCH-41"]
    );
    assert_eq!(
        f(2)[..3],
        ["ORCH-42", "feature/ORCH-42", "none"],
        "a new branch tracks nothing"
    );
    assert_eq!(
        f(2)[3],
        newest_main,
        "made from the remote's main after a fetch"
    );
    assert!(worktrees_dir(&env)
        .join(REPO)
        .join("ORCH-41/remote.txt")
        .exists());
}

#[test]
fn a_failed_preparation_fails_the_run_with_its_reason_and_touches_nothing_else() {
    let mut env = Env::new();
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "true");
    // No clone of the repo on this host.
    let (tid, dev) = add(&env, "ORCH-50", "development");
    let dev = dev.unwrap();
    env.json(&["dispatch"]);
    assert!(wait_until(Duration::from_secs(10), || job(&env, dev).0
        == "queued"
        && job(&env, dev).2 == 1));
    let (_, error, _) = job(&env, dev);
    let error = error.unwrap();
    assert!(
        error.starts_with("worktree: no clone at ") && error.ends_with("repos/orchestrator"),
        "{error}"
    );
    assert_eq!(stage(&env, tid), "development");
    assert!(!worktrees_dir(&env).exists());
    assert!(!env.repos.join(REPO).exists());
    // No dispatch pass after a failed preparation: the second attempt waits for the
    // next tick, which fails it for good (max_attempts 2).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(job(&env, dev).2, 1);
    env.json(&["dispatch"]);
    assert!(wait_until(Duration::from_secs(10), || job(&env, dev).0 == "failed"));
}

#[test]
fn a_hanging_fetch_fails_the_run_after_the_git_timeout() {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    // A remote that never answers: ssh that sleeps.
    let status = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo.clone)
        .args(["remote", "set-url", "origin", "ssh://example.invalid/x.git"])
        .status()
        .unwrap();
    assert!(status.success());
    let status = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo.clone)
        .args(["config", "core.sshCommand", "sleep 30 #"])
        .status()
        .unwrap();
    assert!(status.success());
    env.set("ORCH_AGENT_CMD_DEVELOPER", "true")
        .set("ORCH_GIT_TIMEOUT_SECS", "1");
    let (_, dev) = add(&env, "ORCH-51", "development");
    let dev = dev.unwrap();
    let started = std::time::Instant::now();
    env.json(&["dispatch"]);
    assert!(wait_until(Duration::from_secs(15), || job(&env, dev).2
        == 1
        && job(&env, dev).0 == "queued"));
    assert!(started.elapsed() < Duration::from_secs(10));
    let error = job(&env, dev).1.unwrap();
    assert!(
        error.starts_with("worktree: ") && error.contains("longer than 1.0s"),
        "{error}"
    );
}

// ------------------------------------------------------------ the supervisor's group

#[test]
fn an_agent_leaving_children_behind_leaves_no_process_of_its_group_once_it_exits() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set(
        "ORCH_AGENT_CMD_DEVELOPER",
        "sh -c 'sleep 300 & sleep 300 & exit 0'",
    );
    let (_, dev) = add(&env, "ORCH-60", "development");
    let v = env.json(&["dispatch"]);
    let pid = pids(&v)[0];
    let _g = GroupGuard(pid);
    assert!(wait_until(Duration::from_secs(10), || job(
        &env,
        dev.unwrap()
    )
    .0 == "done"));
    // By the time the outcome is recorded, the leftovers are gone. The supervisor itself,
    // the group's leader, may still be there: it records, then runs its dispatch pass
    // (ORCH_AGENT_CMD_DEVELOPER is set), then exits — a few ms that a busy machine
    // stretches past this test's 10 ms poll.
    let leftovers: Vec<i32> = group_members(pid as i32)
        .into_iter()
        .filter(|&p| p != pid as i32)
        .collect();
    assert_eq!(leftovers, Vec::<i32>::new());
    assert!(wait_until(Duration::from_secs(5), || !alive(pid as i32)));
    assert_eq!(group_members(pid as i32), Vec::<i32>::new());
}

#[test]
fn stop_of_a_dispatched_run_kills_supervisor_and_agent_and_the_job_stays_cancelled() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sh -c 'sleep 300 & sleep 300'")
        .set("ORCH_AGENT_CMD_REVIEWER", "sleep 300");
    let (tid, dev) = add(&env, "ORCH-61", "development");
    let v = env.json(&["dispatch"]);
    let pid = pids(&v)[0];
    let _g = GroupGuard(pid);
    // The supervisor, the agent's shell and its two sleeps.
    assert!(wait_until(Duration::from_secs(10), || group_members(
        pid as i32
    )
    .len()
        >= 4));

    let res = env.json(&["stop", "ORCH-61"]);

    assert_eq!(res["stopped"], 1, "{res}");
    assert_eq!(group_members(pid as i32), Vec::<i32>::new());
    assert!(!alive(pid as i32), "the supervisor went with its group");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(job(&env, dev.unwrap()).0, "cancelled");
    assert_eq!(stage(&env, tid), "cancelled");
    let after: i64 = env.count(&format!(
        "SELECT count(*) FROM task_events WHERE task_id = {tid} AND id > \
         (SELECT max(id) FROM task_events WHERE task_id = {tid} AND kind = 'cancelled') \
         AND kind LIKE 'job_%'"
    ));
    assert_eq!(after, 0, "the supervisor recorded nothing after the stop");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')"),
        0,
        "and dispatched nothing"
    );
}

#[test]
fn four_concurrent_dispatches_with_max_agents_2_start_exactly_two() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sleep 60")
        .set("ORCH_AGENT_SLOTS_DEVELOPER", "6")
        .set("ORCH_MAX_AGENTS", "2");
    for i in 0..6 {
        add(&env, &format!("ORCH-7{i}"), "development");
    }
    let passes: Vec<Bg> = (0..4).map(|_| Bg::start(&env, &["dispatch"])).collect();
    let mut launched = 0;
    for p in passes {
        let v = p.json(Duration::from_secs(30));
        launched += pids(&v).len();
    }
    assert_eq!(launched, 2);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'running'"),
        2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'queued'"),
        4
    );
}

#[test]
fn the_log_is_capped_with_one_truncation_line_and_the_agent_runs_on() {
    let mut env = Env::new();
    env.set("ORCH_LOG_MAX_BYTES", "1000");
    let _runs = RecordedRuns::new(&env);
    let (_, dev) = add(&env, "ORCH-80", "development");
    let c = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 200 ]; do echo 0123456789012345678901234567890123456789; i=$((i+1)); done; echo still-here > \"$0\"",
        env.path().join("after.txt").to_str().unwrap(),
    ]);
    assert!(wait_until(Duration::from_secs(10), || job(
        &env,
        dev.unwrap()
    )
    .0 == "done"));
    let log = std::fs::read(c["log"].as_str().unwrap()).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert_eq!(
        text.matches("ORCH_LOG_MAX_BYTES").count(),
        1,
        "one truncation line: {text}"
    );
    let (kept, rest) = text.split_at(text.find("\norchctl: this run's log").unwrap());
    assert_eq!(kept.len(), 1000);
    assert!(rest.lines().count() <= 2, "nothing after it: {rest}");
    assert_eq!(
        std::fs::read_to_string(env.path().join("after.txt")).unwrap(),
        "still-here\n",
        "the agent was not cut off"
    );
}

#[test]
fn the_agent_cannot_read_the_supervisors_tokens() {
    // As an unprivileged user (root may read any process's environment): the supervisor
    // holds orchctl's tokens and is the agent's parent, running as the same user.
    let mut env = Env::new();
    let token = "gitea-SECRET-supervisor-1234";
    env.set("ORCH_GITEA_TOKEN", token);
    add(&env, "ORCH-81", "development");
    let nobody = "65534";
    // The SQLite file and its folder, when the database is one (PostgreSQL's socket is
    // open to every local user).
    for p in [
        env.path().to_path_buf(),
        env.db.parent().unwrap().to_path_buf(),
        env.db.clone(),
        PathBuf::from(format!("{}-wal", env.db.display())),
        PathBuf::from(format!("{}-shm", env.db.display())),
    ] {
        if p.exists() {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        }
    }
    let seen = env.path().join("seen.txt");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        &format!("--reuid={nobody}"),
        &format!("--regid={nobody}"),
        "--clear-groups",
        crate::common::BIN,
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "cat /proc/$PPID/environ > \"$0\" 2>&1; tr '\\0' '\\n' < /proc/$PPID/cmdline >> \"$0\"; sleep 60",
        seen.to_str().unwrap(),
    ]);
    cmd.env_clear();
    for k in [
        "ORCH_DB_PATH",
        "ORCH_REPOS_DIR",
        "ORCH_LOG_DIR",
        "HOME",
        "XDG_STATE_HOME",
        "PATH",
        "ORCH_GITEA_TOKEN",
        "ORCH_DB_URL",
    ] {
        if let Some(v) = env.var(k) {
            cmd.env(k, v);
        }
    }
    let out = cmd.output().expect("setpriv (util-linux) is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    let _g = GroupGuard(c["pid"].as_i64().unwrap());
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&seen).is_ok_and(|s| s.contains("__supervise"))
    }));
    let text = std::fs::read_to_string(&seen).unwrap();
    assert!(!text.contains(token), "{text}");
    assert!(text.contains("Permission denied"), "{text}");
}

#[test]
fn an_outcome_recorded_from_outside_a_live_run_ends_its_processes_but_an_agents_own_does_not() {
    let env = Env::new();
    let _runs = RecordedRuns::new(&env);
    let (tid, dev) = add(&env, "ORCH-90", "development");
    let dev = dev.unwrap();
    let c = env.json(&["claim", "--exec", "--", "sh", "-c", "sleep 60 & sleep 60"]);
    let pid = c["pid"].as_i64().unwrap();
    let _g = GroupGuard(pid);
    assert!(wait_until(Duration::from_secs(5), || group_members(
        pid as i32
    )
    .len()
        >= 3));
    // An operator declares the run failed: it is requeued (its pid forgotten), so its
    // processes would be out of any STOP's reach; they are stopped instead.
    let res = env.json(&[
        "complete",
        &dev.to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--failure",
        "--error",
        "given up by hand",
    ]);
    assert_eq!(res["note"], "requeued");
    assert_eq!(group_members(pid as i32), Vec::<i32>::new());
    assert_eq!(
        job(&env, dev),
        ("queued".into(), Some("given up by hand".into()), 1)
    );
    assert!(env
        .json(&["task", "log", &tid.to_string()])
        .to_string()
        .contains("run_ended_from_outside"));

    // The agent's own report is followed by its own exit: nothing stops it early.
    let after = env.path().join("after.txt");
    let c = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "\"$0\" complete \"$ORCH_JOB_ID\" --run-id \"$ORCH_RUN_ID\" --success >/dev/null; sleep 0.3; echo after > \"$1\"",
        crate::common::BIN,
        after.to_str().unwrap(),
    ]);
    let _g2 = GroupGuard(c["pid"].as_i64().unwrap());
    assert!(wait_until(Duration::from_secs(10), || after.exists()));
    assert_eq!(job(&env, dev).0, "done");
}

#[test]
fn stop_ends_a_process_left_by_a_finished_run_of_the_task() {
    let env = Env::new();
    let _runs = RecordedRuns::new(&env);
    let (tid, _) = add(&env, "ORCH-91", "deploy");
    env.json(&["confirm-deploy", "ORCH-91"]);
    let c = env.json(&["claim", "--exec", "--", "sleep", "60"]);
    let pid = c["pid"].as_i64().unwrap();
    let _g = GroupGuard(pid);
    env.json(&["deploy-begin", "ORCH-91"]);
    assert_eq!(
        env.json(&["stop", "ORCH-91"])["note"],
        "deferred-critical-window"
    );
    // The deploy step succeeds: the deployer's run is done, the deferred STOP applies —
    // and the deployer, still running, is stopped with its task.
    let fin = env.json(&["finalize-deploy", "ORCH-91", "--outcome", "success"]);
    assert_eq!(fin["note"], "cancelled-after-deploy");
    assert_eq!(fin["jobs"][0]["status"], "done");
    assert_eq!(fin["stopped"], 1, "{fin}");
    assert_eq!(group_members(pid as i32), Vec::<i32>::new());
    assert_eq!(stage(&env, tid), "cancelled");
}

// ------------------------------------------------------------- the claimable jobs

#[test]
fn a_dependency_finished_by_another_tool_frees_its_dependent_for_the_next_claim() {
    // The dependent's job is held out of the claim's walk while its dependency is open;
    // finished with plain SQL (no orchctl write settled it), the claim settles it first.
    let env = Env::new();
    let (dep, _) = add(&env, "ORCH-100", "analysis");
    let v = env.json(&[
        "task",
        "add",
        "--repo",
        REPO,
        "--work-item",
        "ORCH-101",
        "--stage",
        "development",
        "--depends-on",
        "ORCH-100",
    ]);
    let job = v["job"]["id"].as_i64().unwrap();
    // SQLite marks it (PostgreSQL's claim tests the dependencies of each job it walks).
    if !env.db().is_postgres() {
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM jobs WHERE id = {job} AND held = 1"
            )),
            1
        );
    }
    assert_eq!(env.run(&["claim", "--agent", "developer"]).0, 3);
    env.db()
        .execute("UPDATE tasks SET stage = 'done' WHERE id = ?1", [dep]);
    let c = env.json(&["claim", "--agent", "developer"]);
    assert_eq!(c["id"].as_i64(), Some(job));
}

#[test]
fn without_task_deps_a_held_job_is_claimed_and_a_plain_sql_job_is_still_judged() {
    let mut env = Env::new();
    add(&env, "ORCH-102", "analysis");
    let v = env.json(&[
        "task",
        "add",
        "--repo",
        REPO,
        "--work-item",
        "ORCH-103",
        "--stage",
        "development",
        "--depends-on",
        "ORCH-102",
    ]);
    let held = v["job"]["id"].as_i64().unwrap();
    // A job written by another tool for the blocked task: not marked, still not eligible.
    let tid = v["task"]["id"].as_i64().unwrap();
    let plain = env.make_job_full(tid, "developer", "queued", None, None, None, 0, 2);
    let c = env.ctx();
    let n = c
        .store
        .read(|r| {
            r.count_eligible_queued(
                &orchctl::store::ClaimFilter {
                    agents: vec![],
                    repo: None,
                    task_deps: true,
                    serial_gate: true,
                },
                "developer",
                100,
            )
        })
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(env.run(&["claim", "--agent", "developer"]).0, 3);
    env.set("ORCH_TASK_DEPS", "off");
    let first = env.json(&["claim", "--agent", "developer"]);
    let second = env.json(&["claim", "--agent", "developer"]);
    let mut got = vec![
        first["id"].as_i64().unwrap(),
        second["id"].as_i64().unwrap(),
    ];
    got.sort();
    assert_eq!(got, vec![held, plain]);
}

#[test]
fn dispatch_in_text_says_what_it_launched_and_each_agents_slots_in_pipeline_order() {
    let mut env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sleep 60")
        .set("ORCH_MAX_AGENTS", "3");
    add(&env, "ORCH-110", "development");
    add(&env, "ORCH-111", "development");
    let (code, out, err) = env.run(&["--format", "text", "dispatch"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("launched 1 run(s); reap: 0 checked"),
        "{out}"
    );
    assert!(
        out.contains("ORCH-110") && out.contains("worktrees/orchestrator/ORCH-110"),
        "{out}"
    );
    let agents: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("AGENT"))
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        agents,
        ["analyst", "developer", "reviewer", "deployer", "in"],
        "{out}"
    );
    let developer = lines.iter().find(|l| l.starts_with("developer")).unwrap();
    assert_eq!(
        developer.split_whitespace().collect::<Vec<_>>(),
        ["developer", "1", "1", "1", "set"],
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("analyst") && l.ends_with("none")),
        "{out}"
    );
    assert!(!out.contains('{'), "no JSON in the text layout: {out}");
}

#[test]
fn claim_exec_of_a_relative_program_runs_the_one_in_the_callers_folder_inside_the_worktree() {
    let env = Env::new();
    GitRepo::new(&env, REPO);
    let _runs = RecordedRuns::new(&env);
    let (_, dev) = add(&env, "ORCH-120", "development");
    let out = env.path().join("where.txt");
    script(
        &env.path().join("agent.sh"),
        &format!("#!/bin/sh\npwd -P > '{}'\n", out.display()),
    );
    let o = env
        .cmd()
        .current_dir(env.path())
        .args(["claim", "--exec", "--", "./agent.sh"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_until(Duration::from_secs(10), || job(
        &env,
        dev.unwrap()
    )
    .0 == "done"));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        worktrees_dir(&env)
            .join(REPO)
            .join("ORCH-120")
            .display()
            .to_string()
    );
}
