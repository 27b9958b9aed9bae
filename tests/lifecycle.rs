//! The job lifecycle and the pipeline's moves (SPEC §1, §5, §7; seed TC-03, TC-04, TC-12,
//! TC-14, D7 finalizer): claim (+ launch), complete, reap, reconcile, the deploy window —
//! with real agent processes, a real database shared by several processes, real git.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use httpmock::prelude::*;
use serde_json::Value;

use crate::common::{alive, group_members, ts_in, Env, GitRepo, GroupGuard, BIN};

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn add(env: &Env, args: &[&str]) -> (i64, Option<i64>) {
    let mut full = vec!["task", "add", "--repo", "orchestrator"];
    full.extend(args);
    let v = env.json(&full);
    (v["task"]["id"].as_i64().unwrap(), v["job"]["id"].as_i64())
}

fn task_jobs(env: &Env, task: i64) -> Vec<(String, String)> {
    env.db().all(
        "SELECT agent, status FROM jobs WHERE task_id = ?1 ORDER BY id",
        [task],
    )
}

#[test]
fn tc04_the_reaper_does_not_requeue_a_job_of_a_cancelled_task() {
    let env = Env::new();
    let tid = env.make_task("PL-30", "ORCH-330", "development", None);
    let jid = env.make_job_full(
        tid,
        "developer",
        "running",
        Some(999_999),
        Some(1),
        Some(8),
        1,
        2,
    );
    // The task is flipped to cancelled (as STOP would) while the job still runs.
    env.ctx()
        .store
        .write(|w| w.mark_task_cancelled(tid, "test"))
        .unwrap();

    let r = env.json(&["reap"]);

    assert_eq!(r["cancelled"], 1);
    assert_eq!(r["requeued"], 0);
    assert_eq!(env.job_status(jid), "cancelled");
}

#[test]
fn tc12_reconcile_skips_and_counts_a_cancelled_task() {
    let env = Env::new();
    let tid = env.make_task("PL-100", "ORCH-400", "development", None);
    env.ctx()
        .store
        .write(|w| w.mark_task_cancelled(tid, "test"))
        .unwrap();
    let r = env.json(&["reconcile"]);
    assert_eq!(r["skipped_terminal"], 1);
    assert_eq!(r["deferred_applied"], 0);
    assert_eq!(r["errors"], serde_json::json!([]));
}

#[test]
fn tc12_recovery_never_revives_a_cancelled_job() {
    let env = Env::new();
    let tid = env.make_task("PL-101", "ORCH-401", "development", None);
    let jc = env.make_job(tid, "running", None, None);
    let other = env.make_task("PL-102", "ORCH-402", "development", None);
    let jr = env.make_job(other, "running", None, Some(3));
    let ctx = env.ctx();
    ctx.store
        .write(|w| w.cancel_jobs_for_task(tid, false, "stop"))
        .unwrap();
    assert_eq!(env.job_status(jc), "cancelled");

    let n = orchctl::jobs::requeue_running_jobs(&ctx).unwrap();

    assert_eq!(n, 1, "only the running job is recovered");
    assert_eq!(env.job_status(jc), "cancelled");
    assert_eq!(env.job_status(jr), "queued");
    let r = env.json(&["reap", "--recover"]);
    assert_eq!(r["checked"], 0);
}

#[test]
fn an_agent_completes_its_own_run_and_the_pipeline_moves_on() {
    let env = Env::new();
    let (tid, job) = add(&env, &["--work-item", "ORCH-500", "--stage", "development"]);
    let job = job.unwrap();
    // The agent calls `orchctl complete` itself with the environment it was launched with.
    let claimed = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "test -n \"${ORCH_DB_URL:-$ORCH_DB_PATH}\" && exec \"$0\" complete \"$ORCH_JOB_ID\" --success",
        BIN,
    ]);
    let _guard = GroupGuard(claimed["pid"].as_i64().unwrap());
    assert_eq!(claimed["id"].as_i64(), Some(job));
    assert_eq!(claimed["stage"], "development");
    assert_eq!(claimed["work_item_id"], "ORCH-500");

    assert!(
        wait_until(Duration::from_secs(20), || env.job_status(job) == "done"),
        "the agent never completed; log: {}",
        std::fs::read_to_string(claimed["log"].as_str().unwrap()).unwrap_or_default()
    );
    assert_eq!(env.task(tid).stage, "review");
    assert_eq!(
        task_jobs(&env, tid),
        vec![
            ("developer".to_string(), "done".to_string()),
            ("reviewer".to_string(), "queued".to_string())
        ]
    );
}

#[test]
fn the_stage_map_of_successful_jobs() {
    let mut env = Env::new();
    env.set("ORCH_SERIAL_GATE", "0");
    let (tid, _) = add(&env, &["--work-item", "ORCH-501"]);
    let run = |env: &Env| -> (i64, i64) {
        let c = env.json(&["claim"]);
        (c["id"].as_i64().unwrap(), c["run_id"].as_i64().unwrap())
    };
    // analysis: the analyst's success parks the task awaiting approval.
    let (j, r) = run(&env);
    let res = env.json(&[
        "complete",
        &j.to_string(),
        "--run-id",
        &r.to_string(),
        "--success",
    ]);
    assert_eq!(res["note"], "parked");
    assert_eq!(env.task(tid).stage, "analysis");
    assert_eq!(env.run(&["claim"]).0, 3);
    // development → review with a reviewer job.
    env.db().execute(
        "UPDATE tasks SET stage = 'development' WHERE id = ?1",
        [tid],
    );
    env.db().execute(
        "INSERT INTO jobs (agent, repo, task_id) VALUES ('developer', 'orchestrator', ?1)",
        [tid],
    );
    let (j, r) = run(&env);
    let res = env.json(&[
        "complete",
        &j.to_string(),
        "--run-id",
        &r.to_string(),
        "--success",
    ]);
    assert_eq!(res["note"], "advanced");
    assert_eq!(res["next_job"]["agent"], "reviewer");
    assert_eq!(env.task(tid).stage, "review");
    // review → deploy, parked (no job) awaiting Confirm Deploy.
    let (j, r) = run(&env);
    let res = env.json(&[
        "complete",
        &j.to_string(),
        "--run-id",
        &r.to_string(),
        "--success",
    ]);
    assert_eq!(res["note"], "advanced");
    assert_eq!(res["next_job"], Value::Null);
    assert_eq!(env.task(tid).stage, "deploy");
    assert_eq!(env.run(&["claim"]).0, 3);
    // deploy: the deployer's success finishes the task.
    env.db().execute(
        "INSERT INTO jobs (agent, repo, task_id) VALUES ('deployer', 'orchestrator', ?1)",
        [tid],
    );
    let (j, r) = run(&env);
    let res = env.json(&[
        "complete",
        &j.to_string(),
        "--run-id",
        &r.to_string(),
        "--success",
    ]);
    assert_eq!(res["note"], "done");
    assert_eq!(env.task(tid).stage, "done");
    // Terminal: nothing changes it again.
    assert_eq!(
        env.json(&["stop", &tid.to_string()])["note"],
        "already-terminal:done"
    );
}

#[test]
fn a_stale_or_terminal_run_is_never_overwritten_by_complete() {
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-502", "--stage", "development"]);
    let c = env.json(&["claim"]);
    let (j, r) = (c["id"].as_i64().unwrap(), c["run_id"].as_i64().unwrap());

    let stale = env.json(&[
        "complete",
        &j.to_string(),
        "--run-id",
        &(r + 100).to_string(),
        "--success",
    ]);
    assert_eq!(stale["note"], "stale-run");
    assert_eq!(env.job_status(j), "running");

    env.json(&["stop", &tid.to_string()]);
    let late = env.json(&[
        "complete",
        &j.to_string(),
        "--run-id",
        &r.to_string(),
        "--success",
    ]);
    assert_eq!(late["note"], "stale-run");
    assert_eq!(
        env.job_status(j),
        "cancelled",
        "a late complete revived a cancelled job"
    );
    assert_eq!(env.task(tid).stage, "cancelled");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs"),
        1,
        "no new job for a stopped task"
    );
}

#[test]
fn failure_requeues_while_attempts_remain_then_fails_and_the_task_stays() {
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-503", "--stage", "development"]);
    let c = env.json(&["claim"]);
    let res = env.json(&[
        "complete",
        &c["id"].to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--failure",
        "--error",
        "tests red",
    ]);
    assert_eq!(res["note"], "requeued");
    assert_eq!(res["job"]["status"], "queued");
    assert_eq!(res["job"]["error"], "tests red");
    let c2 = env.json(&["claim"]);
    assert_eq!(c2["id"], c["id"]);
    assert_eq!(c2["attempts"], 2);
    assert!(
        c2["run_id"].as_i64() > c["run_id"].as_i64(),
        "a fresh run id"
    );
    let res = env.json(&[
        "complete",
        &c2["id"].to_string(),
        "--run-id",
        &c2["run_id"].to_string(),
        "--failure",
    ]);
    assert_eq!(res["note"], "failed");
    assert_eq!(res["job"]["status"], "failed");
    assert_eq!(env.task(tid).stage, "development");
    assert_eq!(env.run(&["claim"]).0, 3);
}

#[test]
fn a_sigkilled_agent_is_requeued_by_reap_then_failed_after_max_attempts() {
    let env = Env::new();
    let (tid, job) = add(&env, &["--work-item", "ORCH-504", "--stage", "development"]);
    let job = job.unwrap();
    for attempt in 1..=2 {
        let c = env.json(&["claim", "--exec", "--", "sh", "-c", "sleep 60 & sleep 60"]);
        let pid = c["pid"].as_i64().unwrap();
        let _guard = GroupGuard(pid);
        assert_eq!(c["attempts"], attempt);
        // Alive: reap leaves it alone.
        let r = env.json(&["reap"]);
        assert_eq!(
            (r["checked"].as_i64(), r["alive"].as_i64()),
            (Some(1), Some(1))
        );
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert!(wait_until(Duration::from_secs(5), || group_members(
            pid as i32
        )
        .is_empty()));
        let r = env.json(&["reap"]);
        if attempt == 1 {
            assert_eq!(r["requeued"], 1, "{r}");
            assert_eq!(env.job_status(job), "queued");
        } else {
            assert_eq!(r["failed"], 1, "{r}");
            assert_eq!(env.job_status(job), "failed");
        }
    }
    assert_eq!(env.task(tid).stage, "development");
}

#[test]
fn reap_judges_a_pidless_run_by_age_and_dry_run_changes_nothing() {
    let mut env = Env::new();
    env.set("ORCH_CLAIM_TIMEOUT_SECS", "3600");
    let (_, job) = add(&env, &["--work-item", "ORCH-505", "--stage", "development"]);
    let job = job.unwrap();
    env.json(&["claim"]);
    assert_eq!(
        env.json(&["reap"])["alive"],
        1,
        "a fresh run without a pid is alive"
    );
    env.db().execute(
        "UPDATE jobs SET claimed_at = ?2 WHERE id = ?1",
        (job, ts_in(-2 * 3600)),
    );
    let dry = env.json(&["reap", "--dry-run"]);
    assert_eq!(dry["requeued"], 1);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(env.job_status(job), "running");
    assert_eq!(env.json(&["reap"])["requeued"], 1);
    assert_eq!(env.job_status(job), "queued");
}

/// The seed's `_make_job` inserts a running job with plain SQL and no `claimed_at`: its
/// age is then known only from `created_at`, and a fresh row is not dead.
#[test]
fn reap_judges_a_seed_style_pidless_run_without_claim_time_by_its_creation() {
    let env = Env::new();
    let tid = env.make_task("PL-506", "ORCH-506", "development", None);
    let c = env.db();
    let job = c.insert(
        "INSERT INTO jobs (agent, repo, task_id, status, pid, run_id, attempts, max_attempts)
         VALUES ('developer', 'orchestrator', ?1, 'running', NULL, NULL, 1, 2)",
        [tid],
    );

    let r = env.json(&["reap"]);
    assert_eq!(r["alive"], 1, "a run inserted just now is not dead: {r}");
    assert_eq!(env.job_status(job), "running");

    c.execute(
        "UPDATE jobs SET created_at = ?2 WHERE id = ?1",
        (job, ts_in(-2 * 3600)),
    );
    let r = env.json(&["reap"]);
    assert_eq!(r["requeued"], 1, "{r}");
    assert_eq!(env.job_status(job), "queued");
}

#[test]
fn a_job_cancelled_between_claim_and_launch_has_its_agent_killed_at_once() {
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-506", "--stage", "development"]);
    let ctx = env.ctx();
    let mut claimed = orchctl::claim::claim(&ctx, &Default::default())
        .unwrap()
        .unwrap();
    // STOP wins the race: the run is cancelled before its agent is recorded.
    env.json(&["stop", &tid.to_string()]);

    orchctl::claim::launch(
        &ctx,
        &mut claimed,
        &["sh".into(), "-c".into(), "sleep 60 & sleep 60".into()],
    )
    .unwrap();

    let pid = claimed.pid.unwrap();
    let _guard = GroupGuard(pid);
    assert!(claimed.killed_at_launch);
    assert!(wait_until(Duration::from_secs(5), || group_members(
        pid as i32
    )
    .is_empty()));
    assert_eq!(env.job_status(claimed.id), "cancelled");
}

#[test]
fn launch_records_pid_start_time_environment_and_log() {
    let env = Env::new();
    let (tid, job) = add(
        &env,
        &[
            "--work-item",
            "ORCH-507",
            "--stage",
            "development",
            "--title",
            "Log it",
        ],
    );
    let c = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "env | grep ^ORCH_ | sort; sleep 60",
    ]);
    let pid = c["pid"].as_i64().unwrap();
    let _guard = GroupGuard(pid);
    let stat = orchctl::integrations::process::stat(pid).unwrap();
    assert_eq!(c["proc_start"].as_i64(), Some(stat.start));
    assert_eq!(stat.session, pid as i32, "the agent leads its own session");
    let log = c["log"].as_str().unwrap();
    assert!(log.ends_with(&format!("job-{}-run-{}.log", job.unwrap(), c["run_id"])));
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(log)
            .map(|s| s.contains("ORCH_WORK_ITEM"))
            .unwrap_or(false)
    }));
    let text = std::fs::read_to_string(log).unwrap();
    // The agent reaches the same database: the file, or the URL (which wins).
    let database = match env.db_url() {
        Some(url) => format!("ORCH_DB_URL={url}"),
        None => format!("ORCH_DB_PATH={}", env.db.display()),
    };
    for want in [
        format!("ORCH_JOB_ID={}", job.unwrap()),
        format!("ORCH_RUN_ID={}", c["run_id"]),
        format!("ORCH_TASK_ID={tid}"),
        "ORCH_WORK_ITEM=ORCH-507".into(),
        "ORCH_REPO=orchestrator".into(),
        "ORCH_BRANCH=feature/ORCH-507-log-it".into(),
        database,
    ] {
        assert!(text.contains(&want), "{want} missing from {text}");
    }
    let row = env.json(&["task", "show", &tid.to_string()]);
    assert_eq!(row["jobs"][0]["pid"].as_i64(), Some(pid));
}

#[test]
fn four_concurrent_claimers_never_get_the_same_job() {
    let mut env = Env::new();
    env.set("ORCH_BUSY_TIMEOUT_MS", "30000");
    env.json(&["migrate"]);
    {
        env.db().transaction(|tx| {
            let task = tx.insert(
                "INSERT INTO tasks (work_item_id, repo, branch, stage) VALUES ('ORCH-600', 'orchestrator', 'feature/ORCH-600', 'development')",
                (),
            );
            for _ in 0..2000 {
                tx.execute(
                    "INSERT INTO jobs (agent, repo, task_id) VALUES ('developer', 'orchestrator', ?1)",
                    [task],
                );
            }
        });
    }
    let loops: Vec<_> = (0..4)
        .map(|i| {
            let out = env.path().join(format!("claims-{i}.jsonl"));
            let script = format!(
                "while :; do \"$0\" claim >> {out}; rc=$?; [ $rc -eq 0 ] || break; done; echo \"exit $rc\" >> {out}.end",
                out = out.display()
            );
            let cmd = env.cmd();
            let mut sh = Command::new("sh");
            sh.arg("-c").arg(&script).arg(BIN).stdout(Stdio::null()).stderr(Stdio::piped());
            for (k, v) in cmd.get_envs() {
                if let (k, Some(v)) = (k, v) {
                    sh.env(k, v);
                }
            }
            sh.env_remove("ORCH_FORMAT");
            (out, sh.spawn().unwrap())
        })
        .collect();
    let mut ids = Vec::new();
    for (out, child) in loops {
        let res = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(
            !stderr.to_lowercase().contains("busy") && !stderr.contains("locked"),
            "{stderr}"
        );
        let end = std::fs::read_to_string(format!("{}.end", out.display())).unwrap();
        assert_eq!(
            end.trim(),
            "exit 3",
            "each loop ends with nothing to claim: {stderr}"
        );
        for line in std::fs::read_to_string(&out).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            ids.push(v["id"].as_i64().unwrap());
        }
    }
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 2000, "every job claimed once");
    assert_eq!(unique.len(), 2000, "no job claimed twice");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'running' AND attempts = 1"),
        2000
    );
    assert_eq!(env.count("SELECT count(DISTINCT run_id) FROM jobs"), 2000);
}

#[test]
fn the_serial_gate_lets_one_deployer_per_repo_hold_the_merge_lease() {
    let env = Env::new();
    let (a, _) = add(&env, &["--work-item", "ORCH-700", "--stage", "deploy"]);
    let (b, _) = add(&env, &["--work-item", "ORCH-701", "--stage", "deploy"]);
    for t in [a, b] {
        env.db().execute(
            "INSERT INTO jobs (agent, repo, task_id) VALUES ('deployer', 'orchestrator', ?1)",
            [t],
        );
    }
    let first = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(first["task_id"].as_i64(), Some(a));
    let lease = env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .unwrap();
    assert_eq!(lease.branch, "feature/ORCH-700");
    assert_eq!(
        env.run(&["claim", "--agent", "deployer"]).0,
        3,
        "the second deployer waits"
    );

    let fin = env.json(&["finalize-deploy", "ORCH-700", "--outcome", "success"]);
    assert_eq!(fin["note"], "done");
    assert_eq!(fin["lease_released"], true);
    assert_eq!(fin["jobs"][0]["status"], "done");

    let second = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(second["task_id"].as_i64(), Some(b));
    assert_eq!(
        env.ctx()
            .store
            .read(|r| r.lease("orchestrator"))
            .unwrap()
            .unwrap()
            .branch,
        "feature/ORCH-701"
    );
}

#[test]
fn without_the_serial_gate_deployers_run_side_by_side() {
    let mut env = Env::new();
    env.set("ORCH_SERIAL_GATE", "off");
    for wi in ["ORCH-710", "ORCH-711"] {
        let (t, _) = add(&env, &["--work-item", wi, "--stage", "deploy"]);
        env.db().execute(
            "INSERT INTO jobs (agent, repo, task_id) VALUES ('deployer', 'orchestrator', ?1)",
            [t],
        );
    }
    env.json(&["claim"]);
    env.json(&["claim"]);
    assert!(env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .is_none());
}

#[test]
fn task_dependencies_hold_jobs_until_the_dependency_is_done() {
    let env = Env::new();
    let (a, _) = add(&env, &["--work-item", "ORCH-720", "--stage", "development"]);
    let (b, _) = add(
        &env,
        &[
            "--work-item",
            "ORCH-721",
            "--stage",
            "development",
            "--depends-on",
            "ORCH-720",
        ],
    );
    let c = env.json(&["claim"]);
    assert_eq!(c["task_id"].as_i64(), Some(a));
    assert_eq!(env.run(&["claim"]).0, 3, "b waits for a");
    env.db()
        .execute("UPDATE tasks SET stage = 'done' WHERE id = ?1", [a]);
    assert_eq!(env.json(&["claim"])["task_id"].as_i64(), Some(b));
}

#[test]
fn deploy_begin_refuses_when_another_branch_holds_the_lease() {
    let env = Env::new();
    add(&env, &["--work-item", "ORCH-730", "--stage", "deploy"]);
    add(&env, &["--work-item", "ORCH-731", "--stage", "deploy"]);
    let first = env.json(&["deploy-begin", "ORCH-730"]);
    assert_eq!(first["marker"], "initiated");
    assert_eq!(first["note"], "lease-acquired");
    let (code, _, stderr) = env.run(&["deploy-begin", "ORCH-731"]);
    assert_eq!(code, 75, "{stderr}");
    assert!(stderr.contains("feature/ORCH-730"), "{stderr}");
    // Idempotent for the holder (SPEC §7).
    assert_eq!(
        env.json(&["deploy-begin", "ORCH-730"])["note"],
        "already-initiated"
    );
}

#[test]
fn d7_the_finalizer_applies_a_deferred_stop_as_a_forced_full_reset() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-440-d");
    let (tid, _) = add(
        &env,
        &[
            "--work-item",
            "ORCH-440",
            "--branch",
            "feature/ORCH-440-d",
            "--stage",
            "deploy",
        ],
    );
    env.db().execute(
        "INSERT INTO jobs (agent, repo, task_id) VALUES ('deployer', 'orchestrator', ?1)",
        [tid],
    );
    let deployer = env.json(&["claim", "--exec", "--", "sleep", "60"]);
    let _guard = GroupGuard(deployer["pid"].as_i64().unwrap());
    env.json(&["deploy-begin", "ORCH-440"]);

    let deferred = env.json(&["stop", "ORCH-440"]);
    assert_eq!(deferred["note"], "deferred-critical-window");
    assert!(
        alive(deployer["pid"].as_i64().unwrap() as i32),
        "the deployer keeps running"
    );
    // The window stays closed to a new deploy while the STOP is pending.
    assert_eq!(env.json(&["reconcile"])["deferred_waiting"], 1);

    let fin = env.json(&["finalize-deploy", "ORCH-440", "--outcome", "success"]);

    // The deploy succeeded before the STOP took effect (SPEC §7).
    assert_eq!(fin["note"], "cancelled-after-deploy");
    assert_eq!(fin["outcome"], "success");
    assert_eq!(fin["lease_released"], true);
    assert_eq!(fin["marker_cleared"], true);
    assert_eq!(
        fin["jobs"][0]["status"], "done",
        "the deployer's run is recorded"
    );
    let t = env.task(tid);
    assert_eq!(t.stage, "cancelled");
    assert!(t
        .work_item_id
        .unwrap()
        .ends_with(&format!("#cancelled-{tid}")));
    assert!(!wt.exists());
    assert!(
        !repo.remote_branches().contains("ORCH-440"),
        "the branch is deleted"
    );
    assert!(env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .is_none());
    let log = env.json(&["task", "log", &tid.to_string()]);
    let cancelled = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "cancelled")
        .unwrap();
    assert_eq!(cancelled["detail"]["source"], "deferred");
    assert_eq!(cancelled["detail"]["forced"], true);
}

#[test]
fn deploy_begin_is_refused_while_a_stop_is_pending() {
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-441", "--stage", "deploy"]);
    env.ctx()
        .store
        .write(|w| w.set_cancel_requested(tid, "x"))
        .unwrap();
    let (code, _, stderr) = env.run(&["deploy-begin", "ORCH-441"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("STOP pending"), "{stderr}");
}

#[test]
fn a_deferred_stop_is_applied_when_its_running_job_completes() {
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-442", "--stage", "deploy"]);
    env.db().execute(
        "INSERT INTO jobs (agent, repo, task_id) VALUES ('deployer', 'orchestrator', ?1)",
        [tid],
    );
    let c = env.json(&["claim"]);
    assert_eq!(
        env.json(&["stop", "ORCH-442"])["deferred"],
        true,
        "lease + running job"
    );
    let res = env.json(&[
        "complete",
        &c["id"].to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--failure",
    ]);
    assert_eq!(res["note"], "cancelled");
    assert_eq!(env.task(tid).stage, "cancelled");
}

#[test]
fn reconcile_applies_closed_windows_frees_orphaned_leases_and_retries_the_outbox() {
    let server = MockServer::start();
    let mut failing = server.mock(|when, then| {
        when.method(DELETE);
        then.status(503);
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme");
    // A deferred cancel whose window has closed (no marker, no running job).
    let deferred = env.make_task("PL-800", "ORCH-800", "development", None);
    env.ctx()
        .store
        .write(|w| w.set_cancel_requested(deferred, "earlier STOP"))
        .unwrap();
    // A lease held by a task that is already terminal.
    let gone = env.make_task("PL-801", "ORCH-801", "done", Some("feature/gone"));
    env.ctx()
        .store
        .write(|w| w.acquire_lease("other-repo", "feature/gone", gone))
        .unwrap();

    let r1 = env.json(&["reconcile"]);
    assert_eq!(r1["deferred_applied"], 1);
    assert_eq!(r1["leases_released"], 1);
    assert_eq!(env.task(deferred).stage, "cancelled");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE kind = 'delete_remote_branch' AND status = 'pending'"),
        1
    );

    // Gitea is back: the next pass finishes the branch deletion exactly once.
    failing.delete();
    let ok = server.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let r2 = env.json(&["reconcile"]);
    assert_eq!(r2["outbox"]["done"], 1, "{r2}");
    ok.assert_hits(1);
    env.json(&["reconcile"]);
    ok.assert_hits(1);
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status = 'pending'"),
        0
    );
}

#[test]
fn an_outbox_row_gives_up_after_max_attempts_and_shows_in_queue() {
    let server = MockServer::start();
    server.mock(|when, then| {
        when.method(DELETE);
        then.status(500);
    });
    let mut env = Env::new();
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_OUTBOX_MAX_ATTEMPTS", "3");
    env.make_task("PL-810", "ORCH-810", "development", None);
    env.json(&["stop", "ORCH-810"]);
    env.json(&["reconcile"]);
    let r = env.json(&["reconcile"]);
    assert_eq!(r["outbox"]["failed"], 1, "{r}");
    let q = env.json(&["queue"]);
    assert_eq!(q["outbox"]["failed"], 1);
    assert_eq!(q["outbox"]["items"][0]["kind"], "delete_remote_branch");
    assert_eq!(q["outbox"]["items"][0]["attempts"], 3);
}

#[test]
fn claim_output_names_job_run_and_task() {
    let env = Env::new();
    let (tid, job) = add(
        &env,
        &[
            "--work-item",
            "ORCH-820",
            "--stage",
            "review",
            "--title",
            "Check",
        ],
    );
    let c = env.json(&["claim", "--agent", "reviewer", "--repo", "orchestrator"]);
    for key in [
        "id",
        "agent",
        "repo",
        "task_id",
        "run_id",
        "attempts",
        "work_item_id",
        "branch",
        "stage",
    ] {
        assert!(c.get(key).is_some(), "claim output lacks {key}: {c}");
    }
    assert_eq!(c["id"].as_i64(), job);
    assert_eq!(c["task_id"].as_i64(), Some(tid));
    assert_eq!(c["branch"], "feature/ORCH-820-check");
    assert!(c["run_id"].as_i64().unwrap() > 0);
    assert_eq!(env.run(&["claim", "--agent", "analyst"]).0, 3);
}

#[test]
fn an_orphaned_agent_process_of_a_stopped_task_is_gone() {
    // A stopped task's agent launched by `claim --exec` is a real detached session.
    let env = Env::new();
    let (tid, _) = add(&env, &["--work-item", "ORCH-830", "--stage", "development"]);
    let c = env.json(&["claim", "--exec", "--", "sh", "-c", "sleep 60 & sleep 60"]);
    let pid = c["pid"].as_i64().unwrap();
    let _guard = GroupGuard(pid);
    assert!(wait_until(Duration::from_secs(5), || group_members(
        pid as i32
    )
    .len()
        >= 2));
    let res = env.json(&["stop", &tid.to_string()]);
    assert_eq!(res["stopped"], 1);
    assert!(group_members(pid as i32).is_empty());
}

#[test]
fn a_deployer_failing_its_last_attempt_frees_the_merge_lease_unless_a_deploy_is_initiated() {
    let env = Env::new();
    let (a, _) = add(&env, &["--work-item", "ORCH-900", "--stage", "deploy"]);
    let (b, _) = add(&env, &["--work-item", "ORCH-901", "--stage", "deploy"]);
    for t in [a, b] {
        env.db()
            .execute("INSERT INTO jobs (agent, repo, task_id, max_attempts) VALUES ('deployer', 'orchestrator', ?1, 1)", [t]);
    }
    // complete --failure on the last attempt: the lease is freed, the other deployer runs.
    let c = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(c["task_id"].as_i64(), Some(a));
    assert_eq!(env.run(&["claim", "--agent", "deployer"]).0, 3);
    let res = env.json(&[
        "complete",
        &c["id"].to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--failure",
    ]);
    assert_eq!(res["note"], "failed");
    assert_eq!(env.task(a).stage, "deploy", "the task stays in deploy");
    let c2 = env.json(&["claim", "--agent", "deployer"]);
    assert_eq!(c2["task_id"].as_i64(), Some(b));

    // A deployer that dies after deploy-begin: the deploy's outcome is unknown, the lease
    // stays until someone finalizes it.
    env.json(&["deploy-begin", "ORCH-901"]);
    env.db().execute(
        "UPDATE jobs SET claimed_at = '2000-01-01T00:00:00.000Z' WHERE id = ?1",
        [c2["id"].as_i64().unwrap()],
    );
    let r = env.json(&["reap"]);
    assert_eq!(r["failed"], 1, "{r}");
    let lease = env.ctx().store.read(|r| r.lease("orchestrator")).unwrap();
    assert_eq!(lease.map(|l| l.branch).as_deref(), Some("feature/ORCH-901"));
    let fin = env.json(&["finalize-deploy", "ORCH-901", "--outcome", "failure"]);
    assert_eq!(fin["note"], "deploy-failed");
    assert!(env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .is_none());
}
