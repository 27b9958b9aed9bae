//! Several agent hosts on one PostgreSQL database (SPEC §12), against a real server: two
//! hosts are two `ORCH_HOST_ID` values on this machine, their agents real process groups.
//! Host A must leave host B's agents alone even though it could reach them.
//!
//! These are about PostgreSQL by nature (their names say so: the SQLite pass skips them);
//! the rest of the suite runs on both backends.

use std::time::Duration;

use serde_json::Value;

use crate::common::{alive, group_members, Env, GitRepo, GroupGuard, RecordedRuns};

const REPO: &str = "orchestrator";

/// Runs orchctl as host `host`, expecting exit 0 and JSON.
fn on(env: &Env, host: &str, args: &[&str]) -> Value {
    let out = env
        .cmd()
        .env("ORCH_HOST_ID", host)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host {host}: orchctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "orchctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A task in development on `branch` (pushed to the bare remote, with a worktree), whose
/// developer job host `host` claims and launches as a real agent group.
fn agent_on(env: &Env, repo: &GitRepo, host: &str, wi: &str) -> (i64, i64, String) {
    let branch = format!("feature/{wi}");
    repo.feature(env, &branch);
    let added = on(
        env,
        host,
        &[
            "task",
            "add",
            "--repo",
            REPO,
            "--work-item",
            wi,
            "--branch",
            &branch,
            "--stage",
            "development",
        ],
    );
    let task = added["task"]["id"].as_i64().unwrap();
    let c = on(
        env,
        host,
        &[
            "claim",
            "--exec",
            "--",
            "sh",
            "-c",
            "sleep 300 & sleep 300 & wait",
        ],
    );
    let pid = c["pid"].as_i64().unwrap();
    // The supervisor starts the agent once its run is recorded: its group fills up.
    assert!(
        wait_until(Duration::from_secs(10), || group_members(pid as i32).len()
            >= 4),
        "host {host}'s agent group never started: {:?}",
        group_members(pid as i32)
    );
    (task, pid, branch)
}

#[test]
fn postgres_only_a_stop_on_host_a_leaves_host_b_agent_to_b_which_kills_it_then_the_branch_goes() {
    let mut env = Env::postgres();
    let notes = env.path().join("notifications");
    let hook = format!("sh -c 'cat >> {}'", notes.display());
    env.set("ORCH_NOTIFY_CMD", &hook);
    let _runs = RecordedRuns::new(&env);
    let repo = GitRepo::new(&env, REPO);
    let (task, pid, branch) = agent_on(&env, &repo, "host-b", "ORCH-1");
    let _guard = GroupGuard(pid);
    // B's agent pushes more work: the remote branch moves on, and A's clone does not know
    // (its copy of the branch is as old as its last fetch).
    let other = env.path().join("elsewhere");
    for args in [
        vec![
            "clone",
            "-q",
            repo.bare.to_str().unwrap(),
            other.to_str().unwrap(),
        ],
        vec!["-C", other.to_str().unwrap(), "checkout", "-q", &branch],
    ] {
        assert!(std::process::Command::new("git")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    std::fs::write(other.join("more.txt"), "more work\n").unwrap();
    for args in [
        vec!["add", "."],
        vec![
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@example.com",
            "commit",
            "-q",
            "-m",
            "more",
        ],
        vec!["push", "-q", "origin", branch.as_str()],
    ] {
        assert!(std::process::Command::new("git")
            .arg("-C")
            .arg(&other)
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    let show: Value = on(&env, "host-a", &["task", "show", "ORCH-1"]);
    assert_eq!(show["jobs"][0]["host"], "host-b", "{show}");
    let job = show["jobs"][0]["id"].as_i64().unwrap();

    // Host A stops the task: cancelled at once, the agent left to B.
    let r = on(&env, "host-a", &["stop", "ORCH-1"]);
    assert_eq!(r["note"], "cancelled", "{r}");
    assert_eq!(r["stopped"], 0, "{r}");
    assert_eq!(r["remote_pending"], 1, "{r}");
    assert_eq!(r["task"]["stage"], "cancelled");
    assert_eq!(
        r["task"]["work_item_id"],
        format!("ORCH-1#cancelled-{task}")
    );
    assert_eq!(group_members(pid as i32).len(), 4, "A touched B's agent");
    assert!(
        repo.remote_branches().contains(&branch),
        "the remote branch went before B stopped its agent"
    );
    assert!(!notes.exists(), "people were told before the agent stopped");

    // A's own reap and dispatch leave B's agent alone too.
    let reaped = on(&env, "host-a", &["reap"]);
    assert_eq!(reaped["checked"], 0, "{reaped}");
    on(&env, "host-a", &["reconcile"]);
    assert_eq!(
        group_members(pid as i32).len(),
        4,
        "A's reap touched B's agent"
    );
    assert!(repo.remote_branches().contains(&branch));

    // B's next reap stops the group; then the worktree and the branch go, people are told.
    on(&env, "host-b", &["reap"]);
    assert!(
        wait_until(Duration::from_secs(10), || group_members(pid as i32)
            .is_empty()),
        "B's reap left its agent running: {:?}",
        group_members(pid as i32)
    );
    assert!(!alive(pid as i32));
    assert!(
        !repo.remote_branches().contains(&branch),
        "{}",
        repo.remote_branches()
    );
    assert!(!repo.local_branches().contains(&branch));
    let told = std::fs::read_to_string(&notes).unwrap();
    assert!(told.contains("task_cancelled"), "{told}");
    // The log says which host did what.
    let log = on(&env, "host-a", &["task", "log", &task.to_string()]);
    let hosts: Vec<(String, String)> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["kind"].as_str()?.to_string(),
                e["detail"]["host"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert!(
        hosts.contains(&("stop_process".into(), "host-b".into())),
        "{hosts:?}"
    );
    // The job stays cancelled: nothing of B's revived it.
    assert_eq!(env.job_status(job), "cancelled");
}

#[test]
fn postgres_only_reap_judges_only_its_own_hosts_processes() {
    let env = Env::postgres();
    let _runs = RecordedRuns::new(&env);
    let repo = GitRepo::new(&env, REPO);
    let (_task, pid, _) = agent_on(&env, &repo, "host-b", "ORCH-2");
    // B's agent dies without a word (its host's supervisor group SIGKILLed).
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || group_members(
        pid as i32
    )
    .is_empty()));
    // A cannot judge a pid of B's: the run stays running.
    let a = on(&env, "host-a", &["reap"]);
    assert_eq!(
        (a["checked"].as_i64(), a["requeued"].as_i64()),
        (Some(0), Some(0)),
        "{a}"
    );
    assert_eq!(env.job_status(1), "running");
    // B can: requeued.
    let b = on(&env, "host-b", &["reap"]);
    assert_eq!(b["requeued"], 1, "{b}");
    assert_eq!(env.job_status(1), "queued");
}

#[test]
fn postgres_only_eight_claim_loops_from_two_hosts_claim_every_job_once() {
    const JOBS: i64 = 2_000;
    const LOOPS: usize = 8;
    let env = Env::postgres();
    let db = env.db();
    db.batch(&format!(
        "INSERT INTO tasks (work_item_id, repo, branch, stage)
             SELECT 'L-' || g, 'orchestrator', 'feature/L-' || g, 'development'
             FROM generate_series(1, {JOBS}) g;
         INSERT INTO jobs (agent, repo, task_id)
             SELECT 'developer', 'orchestrator', id FROM tasks ORDER BY id;"
    ));
    let claimed = std::sync::Mutex::new(Vec::new());
    let false_nothing = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..LOOPS {
            let env = &env;
            let claimed = &claimed;
            let false_nothing = &false_nothing;
            s.spawn(move || {
                let host = if i % 2 == 0 { "host-a" } else { "host-b" };
                let mut config = env.config();
                config.host_id = host.into();
                let ctx = orchctl::Ctx::open_target(&env.db_target(), config).unwrap();
                let req = orchctl::claim::ClaimRequest::default();
                loop {
                    match orchctl::claim::claim(&ctx, &req) {
                        Ok(Some(c)) => claimed.lock().unwrap().push(c.id),
                        Ok(None) => {
                            // "Nothing to claim" is only ever true: at most the jobs the
                            // other loops hold locked may be left.
                            let left = env.db().value::<i64>(
                                "SELECT count(*) FROM jobs WHERE status = 'queued'",
                                (),
                            );
                            if left > LOOPS as i64 {
                                false_nothing.lock().unwrap().push(left);
                            }
                            return;
                        }
                        Err(e) => panic!("host {host}: a claim failed: {e:#}"),
                    }
                }
            });
        }
    });
    let mut claimed = claimed.into_inner().unwrap();
    let n = claimed.len();
    claimed.sort_unstable();
    claimed.dedup();
    assert_eq!(claimed.len(), n, "a job was claimed twice");
    assert_eq!(n as i64, JOBS, "every job is claimed");
    assert_eq!(false_nothing.into_inner().unwrap(), Vec::<i64>::new());
    let (running, once, hosts): (i64, i64, i64) = db.one(
        "SELECT count(*), count(*) FILTER (WHERE attempts = 1), count(DISTINCT host)
         FROM jobs WHERE status = 'running'",
        (),
    );
    assert_eq!((running, once, hosts), (JOBS, JOBS, 2));
    let (runs, distinct): (i64, i64) =
        db.one("SELECT count(run_id), count(DISTINCT run_id) FROM jobs", ());
    assert_eq!(runs, distinct, "run ids are unique");
}

#[test]
fn postgres_only_a_host_unseen_past_its_dead_secs_is_judged_dead_by_another_hosts_reconcile() {
    let mut env = Env::postgres_clocked();
    env.set("ORCH_HOST_DEAD_SECS", "600");
    let _runs = RecordedRuns::new(&env);
    let repo = GitRepo::new(&env, REPO);
    let (task, pid, branch) = agent_on(&env, &repo, "host-b", "ORCH-3");
    let _guard = GroupGuard(pid);
    // A STOP on A leaves B a kill and a worktree; then B vanishes (its agent lives on, out
    // of everyone's reach but B's).
    let other = on(
        &env,
        "host-b",
        &[
            "task",
            "add",
            "--repo",
            REPO,
            "--work-item",
            "ORCH-4",
            "--stage",
            "development",
        ],
    );
    let c = on(&env, "host-b", &["claim"]);
    assert_eq!(c["task_id"], other["task"]["id"]);
    let r = on(&env, "host-a", &["stop", "ORCH-3"]);
    assert_eq!(r["remote_pending"], 1, "{r}");
    let q = on(&env, "host-a", &["queue"]);
    let b = q["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == "host-b")
        .cloned()
        .unwrap();
    assert_eq!(b["alive"], true, "{q}");

    // Ten minutes pass on the database's clock and only A is seen.
    env.set_db_clock("+601s");
    let rec = on(&env, "host-a", &["reconcile"]);
    assert_eq!(rec["hosts_dead"], serde_json::json!(["host-b"]), "{rec}");
    let q = on(&env, "host-a", &["queue"]);
    let hosts: Vec<(String, bool)> = q["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap().into(),
                h["alive"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [("host-a".to_string(), true), ("host-b".to_string(), false)],
        "{q}"
    );
    // B's running job got the unknown-outcome rules: requeued (its first attempt).
    let show = on(&env, "host-a", &["task", "show", "ORCH-4"]);
    assert_eq!(show["jobs"][0]["status"], "queued", "{show}");
    // The effects bound to B failed with the reason and show in queue; the branch deletion
    // and the notifications that waited for the kill went ahead.
    let items = q["outbox"]["items"].as_array().unwrap();
    let failed: Vec<&str> = items
        .iter()
        .filter(|e| e["status"] == "failed" && e["host"] == "host-b")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(failed.contains(&"stop_process"), "{q}");
    assert!(
        items.iter().all(|e| e["last_error"]
            .as_str()
            .is_none_or(|l| !l.contains("host-b") || l.contains("judged dead"))),
        "{q}"
    );
    assert!(
        !repo.remote_branches().contains(&branch),
        "{}",
        repo.remote_branches()
    );
    // A second judge finds nothing more to do.
    let again = on(&env, "host-a", &["reconcile"]);
    assert!(again.get("hosts_dead").is_none(), "{again}");
    let _ = task;
}

#[test]
fn postgres_only_a_newer_schema_is_refused_and_nothing_changes() {
    let env = Env::postgres();
    env.json(&["task", "add", "--repo", REPO, "--work-item", "ORCH-5"]);
    let db = env.db();
    db.set_schema_version(999);
    let before = db.dump();
    let seen_before = db.value::<String>("SELECT last_seen_at FROM hosts", ());
    for args in [
        &["queue"][..],
        &["migrate"],
        &["stop", "ORCH-5"],
        &["claim"],
    ] {
        let (code, _, err) = env.run(args);
        assert_eq!(code, 78, "{args:?}: {err}");
        assert!(err.contains("newer than this orchctl"), "{err}");
    }
    assert_eq!(db.dump(), before);
    // Not even the heartbeat was written.
    assert_eq!(
        db.value::<String>("SELECT last_seen_at FROM hosts", ()),
        seen_before
    );
}

#[test]
fn postgres_only_with_a_url_no_sqlite_file_appears_and_the_password_is_never_shown() {
    let mut env = Env::postgres();
    let db_path = env.db.clone();
    let password_url = env.pg().password_url();
    // The password in the URL.
    let password = env.use_password_role(true);
    let added = env.json(&["task", "add", "--repo", REPO, "--work-item", "ORCH-6"]);
    assert_eq!(added["task"]["stage"], "analysis");
    // An agent's environment lacks it, and still names the database and the role.
    let dump = env.path().join("agent-env");
    let c = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        &format!("env > {}", dump.display()),
    ]);
    let _guard = GroupGuard(c["pid"].as_i64().unwrap());
    let job = c["id"].as_i64().unwrap();
    assert!(wait_until(Duration::from_secs(10), || dump.exists()
        && env.job_status(job) != "running"));
    let agent_env = std::fs::read_to_string(&dump).unwrap();
    assert!(!agent_env.contains(password), "{agent_env}");
    assert!(
        agent_env.contains(&format!(
            "ORCH_DB_URL=postgresql://{}@",
            crate::common::pg::SECRET_ROLE
        )),
        "the agent reports through the same database, as its role: {agent_env}"
    );
    let mut outputs = String::new();
    for args in [
        &["queue"][..],
        &["task", "log", "ORCH-6"],
        &["task", "show", "nothing-like-this"],
        &["migrate"],
        &["stop", "ORCH-6"],
    ] {
        let (_, out, err) = env.run(args);
        outputs.push_str(&out);
        outputs.push_str(&err);
    }
    // The password in ORCH_DB_PASSWORD instead: the same.
    env.use_password_role(false);
    let (code, out, err) = env.run(&["queue"]);
    assert_eq!(code, 0, "{err}");
    outputs.push_str(&out);
    outputs.push_str(&err);
    // A wrong one is bad configuration (exit 78, as for `queue` any bad configuration is),
    // and is not echoed.
    env.set("ORCH_DB_PASSWORD", "not-the-Password-1");
    let (code, out, err) = env.run(&["queue"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    let (code, out2, err2) = env.run(&["task", "list"]);
    assert_eq!(code, 78, "{err2}");
    assert!(err2.contains("refused the credentials"), "{err2}");
    for text in [&out, &err, &out2, &err2] {
        assert!(!text.contains("not-the-Password-1"), "{text}");
    }
    // A password on the command line is no more shown than one in the environment.
    env.unset("ORCH_DB_URL");
    env.unset("ORCH_DB_PASSWORD");
    let (code, out, err) = env.run(&["--db-url", &password_url, "task", "show", "missing"]);
    assert_ne!(code, 0);
    assert!(err.contains("no task matches"), "{err}");
    outputs.push_str(&out);
    outputs.push_str(&err);
    assert!(!outputs.contains(password), "{outputs}");
    // No SQLite file appeared where the path points.
    assert!(!db_path.exists(), "{} appeared", db_path.display());
}

#[test]
fn a_run_recorded_in_an_earlier_boot_is_dead_whatever_runs_under_its_pid_now() {
    // Both backends: a host that rebooted finds its pids reused by anything.
    let env = Env::new();
    let _runs = RecordedRuns::new(&env);
    let added = env.json(&[
        "task",
        "add",
        "--repo",
        REPO,
        "--work-item",
        "ORCH-7",
        "--stage",
        "development",
    ]);
    let job = added["job"]["id"].as_i64().unwrap();
    let c = env.json(&["claim", "--exec", "--", "sleep", "300"]);
    let pid = c["pid"].as_i64().unwrap();
    let _guard = GroupGuard(pid);
    // Alive, its identity verified: reap leaves it.
    assert_eq!(env.json(&["reap"])["alive"], 1);
    // The same pid and start time, but recorded in another boot of this host.
    env.db().execute(
        "UPDATE jobs SET boot_id = 'an-earlier-boot' WHERE id = ?1",
        [job],
    );
    let r = env.json(&["reap"]);
    assert_eq!(r["requeued"], 1, "{r}");
    assert!(
        r["jobs"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("rebooted"),
        "{r}"
    );
    assert_eq!(env.job_status(job), "queued");
}
