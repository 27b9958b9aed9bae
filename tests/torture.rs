//! SIGKILL torture (issue 11; issue 13 finding 9): orchctl's write commands started and
//! SIGKILLed at random moments, seeded so a failing sequence can be replayed
//! (`ORCH_TORTURE_SEED=<n>`), bounded in steps and time; then the invariants that must
//! hold whatever moment a command died at. Real processes, a real database, real git.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{group_members, Env, GitRepo, RecordedRuns};
use crate::fault::{script, wait_until, Bg};

/// A small, seeded generator (xorshift64*): the same seed gives the same sequence.
struct Rng(u64);

impl Rng {
    fn new(default: u64) -> Rng {
        let seed = std::env::var("ORCH_TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        eprintln!("torture seed {seed} (replay with ORCH_TORTURE_SEED={seed})");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The live agent processes — command line holding `token` — with their process group.
/// A supervisor names its agent's command too: it is no agent (once its agent has exited
/// it records the outcome and dispatches, its run over), and neither is a child it has
/// forked but not yet exec'd (git, the next run's supervisor), which still shows its
/// command line.
fn processes_with(token: &str) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(token) || cmdline.contains(orchctl::supervisor::ARG) {
            continue;
        }
        if let Some(s) = orchctl::integrations::process::stat(pid) {
            if !s.exited() {
                out.push((s.pid, s.pgrp));
            }
        }
    }
    out
}

/// (job id, status, pid, proc_start, task stage).
type Recorded = (i64, String, i64, Option<i64>, Option<String>);

/// The runs recorded with a process: (job id, status, pid, proc_start, task stage) — on
/// their job, or, for a run whose stop is under way, in its pending `stop_process` effect
/// (status `stopping`): a process the next `reconcile` or `stop` ends is within reach.
fn recorded(env: &Env) -> Vec<Recorded> {
    let db = env.db();
    let mut out: Vec<Recorded> = db.all(
        "SELECT j.id, j.status, j.pid, j.proc_start, t.stage FROM jobs j
         LEFT JOIN tasks t ON t.id = j.task_id WHERE j.pid IS NOT NULL",
        (),
    );
    // The effect's payload is JSON text: read in Rust, on either backend.
    let stopping: Vec<(String, Option<String>)> = db.all(
        "SELECT o.payload, t.stage FROM outbox o LEFT JOIN tasks t ON t.id = o.task_id
         WHERE o.kind = 'stop_process' AND o.status = 'pending' ORDER BY o.id",
        (),
    );
    for (payload, stage) in stopping {
        let p: Value = serde_json::from_str(&payload).unwrap();
        out.push((
            p["job_id"].as_i64().unwrap(),
            "stopping".into(),
            p["pid"].as_i64().unwrap(),
            p["proc_start"].as_i64(),
            stage,
        ));
    }
    out
}

/// Every live agent (a process holding `token`) is in the group of a run recorded with
/// that group's leader as its pid, the leader alive with the recorded start time. With
/// `running`, that run must also still be `running`.
fn agents_unrecorded(env: &Env, token: &str, running: bool) -> Vec<String> {
    let runs = recorded(env);
    let mut bad = Vec::new();
    for (pid, pgid) in processes_with(token) {
        let leader = orchctl::integrations::process::stat(pgid as i64).filter(|s| !s.exited());
        let ok = runs.iter().any(|(_, status, rpid, start, _)| {
            *rpid == pgid as i64
                && (!running || status == "running")
                && leader.is_some_and(|l| Some(l.start) == *start)
        });
        if !ok {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            bad.push(format!("pid {pid} (group {pgid}): {cmd}"));
        }
    }
    bad
}

/// Starts `args`; SIGKILLs it after `kill_after` when given, else lets it finish.
fn run_or_kill(env: &Env, args: &[String], kill_after: Option<Duration>) {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let bg = Bg::start(env, &argv);
    match kill_after {
        Some(d) => {
            std::thread::sleep(d);
            bg.kill();
        }
        None => {
            let _ = bg.finish(Duration::from_secs(30));
        }
    }
}

/// Every audit row and side effect, one line each, for failure messages.
fn events(env: &Env) -> String {
    env.db()
        .all::<(Option<i64>, String, Option<String>)>(
            "SELECT task_id, kind, detail FROM task_events
             UNION ALL SELECT task_id, 'outbox ' || kind || ' ' || status, coalesce(result, last_error) FROM outbox
             ORDER BY 1",
            (),
        )
        .into_iter()
        .map(|(task, kind, detail)| format!("{task:?} {kind} {}", detail.unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every job, one line each, for failure messages.
fn jobs_table(env: &Env) -> String {
    env.db()
        .rows(
            "SELECT j.id, j.task_id, j.agent, j.status, j.pid, j.run_id, j.attempts, j.error, t.stage
             FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id ORDER BY j.id",
            (),
        )
        .iter()
        .map(|r| {
            format!(
                "job {} task {:?} {} {} pid {:?} run {:?} tries {} error {:?} stage {:?}",
                r.i64(0),
                r.opt_i64(1),
                r.string(2),
                r.string(3),
                r.opt_i64(4),
                r.opt_i64(5),
                r.i64(6),
                r.opt_string(7),
                r.opt_string(8),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn live_task_ids(env: &Env) -> Vec<i64> {
    env.db().values(
        "SELECT id FROM tasks WHERE stage NOT IN ('done', 'cancelled') ORDER BY id",
        (),
    )
}

#[test]
fn sigkilling_claim_exec_and_dispatch_at_50_random_moments_leaves_no_agent_unrecorded() {
    let mut rng = Rng::new(11);
    let mut env = Env::new();
    GitRepo::new(&env, "orchestrator");
    let runs = RecordedRuns::new(&env);
    let token = format!("unrecorded-{}", std::process::id());
    let agent = script(
        &env.path().join(format!("agent-{token}.sh")),
        "#!/bin/sh\nsleep 60\n",
    );
    let agent = agent.display().to_string();
    env.set("ORCH_AGENT_CMD_DEVELOPER", &agent)
        .set("ORCH_AGENT_SLOTS_DEVELOPER", "60")
        .set("ORCH_MAX_AGENTS", "60")
        .set("ORCH_WORKTREE_AGENTS", "none");
    let started = Instant::now();
    // How long one launch takes here and now (the machine may be busy): the kills are
    // spread over twice that, so some land inside the launch and some after it.
    let mut window = Duration::ZERO;
    for (i, args) in [
        vec!["claim", "--exec", "--", agent.as_str()],
        vec!["dispatch"],
    ]
    .into_iter()
    .enumerate()
    {
        env.json(&[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            &format!("ORCH-{}", 90 + i),
            "--stage",
            "development",
        ]);
        let t = Instant::now();
        env.json(&args);
        window = window.max(t.elapsed());
    }
    let window = (window * 2).max(Duration::from_millis(10));
    for i in 0..50 {
        env.json(&[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            &format!("ORCH-{}", 100 + i),
            "--stage",
            "development",
        ]);
        let args: Vec<String> = if rng.below(2) == 0 {
            ["claim", "--exec", "--", &agent]
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            vec!["dispatch".into()]
        };
        let after = Duration::from_micros(rng.below(window.as_micros() as u64));
        run_or_kill(&env, &args, Some(after));
    }
    // A supervisor whose launcher died before opening the gate exits on its own.
    std::thread::sleep(Duration::from_millis(300));
    let bad = agents_unrecorded(&env, &token, true);
    assert!(
        bad.is_empty(),
        "agents whose run is not recorded running:\n{}",
        bad.join("\n")
    );
    let alive = processes_with(&token).len();
    assert!(alive > 0, "some launch got through");
    // Every one of them is within STOP's reach.
    for t in live_task_ids(&env) {
        env.json(&["stop", &t.to_string()]);
    }
    assert!(
        wait_until(Duration::from_secs(20), || processes_with(&token)
            .is_empty()),
        "agents survived their task's stop: {:?}",
        processes_with(&token)
    );
    drop(runs);
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_seeded_sigkill_torture_of_the_write_commands_keeps_every_invariant() {
    let mut rng = Rng::new(13);
    let mut env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let runs = RecordedRuns::new(&env);
    let token = format!("torture-{}", std::process::id());
    // What an agent does depends on its run id: long work (to be stopped), success,
    // failure, its own `complete` first, or short work.
    let agent = script(
        &env.path().join(format!("agent-{token}.sh")),
        &format!(
            "#!/bin/sh\ncase $((ORCH_RUN_ID % 5)) in\n\
             0) sleep 30 ;;\n\
             1) exit 0 ;;\n\
             2) exit 1 ;;\n\
             3) '{bin}' complete \"$ORCH_JOB_ID\" --run-id \"$ORCH_RUN_ID\" --success >/dev/null 2>&1; sleep 0.2 ;;\n\
             *) sleep 0.3 ;;\n\
             esac\n",
            bin = crate::common::BIN
        ),
    );
    let agent = agent.display().to_string();
    for var in [
        "ORCH_AGENT_CMD_ANALYST",
        "ORCH_AGENT_CMD_DEVELOPER",
        "ORCH_AGENT_CMD_REVIEWER",
        "ORCH_AGENT_CMD_DEPLOYER",
    ] {
        env.set(var, &agent);
    }
    env.set("ORCH_AGENT_SLOTS_DEVELOPER", "3")
        .set("ORCH_STOP_GRACE_SECS", "2");
    let add_task = |env: &Env, rng: &mut Rng, tasks: &mut i64| {
        *tasks += 1;
        let stage = ["analysis", "development", "review", "deploy"][rng.below(4) as usize];
        env.json(&[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            &format!("ORCH-{tasks}"),
            "--stage",
            stage,
        ]);
    };
    let mut tasks = 0;
    for _ in 0..8 {
        add_task(&env, &mut rng, &mut tasks);
    }
    let started = Instant::now();
    let mut steps = Vec::new();
    for _ in 0..90 {
        let task = (1 + rng.below(tasks as u64)).to_string();
        let running: Vec<(i64, i64)> = env.db().all(
            "SELECT id, run_id FROM jobs WHERE status = 'running' ORDER BY id",
            (),
        );
        let args: Vec<String> = match rng.below(14) {
            0..=2 => vec!["dispatch".into()],
            3 | 4 => ["claim", "--exec", "--", &agent]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            5 | 6 => vec!["stop".into(), task],
            7 if !running.is_empty() => {
                let (job, run) = running[rng.below(running.len() as u64) as usize];
                let how = if rng.below(2) == 0 {
                    "--success"
                } else {
                    "--failure"
                };
                vec![
                    "complete".into(),
                    job.to_string(),
                    "--run-id".into(),
                    run.to_string(),
                    how.into(),
                ]
            }
            8 => vec!["reap".into()],
            9 => vec!["deploy-begin".into(), task],
            10 => vec![
                "finalize-deploy".into(),
                task,
                "--outcome".into(),
                if rng.below(2) == 0 {
                    "success"
                } else {
                    "failure"
                }
                .into(),
            ],
            11 => vec![
                ["approve", "confirm-deploy", "reject", "retry"][rng.below(4) as usize].into(),
                task,
            ],
            12 => vec!["reconcile".into()],
            _ => {
                add_task(&env, &mut rng, &mut tasks);
                continue;
            }
        };
        // Most launches are killed inside their few milliseconds; other commands anywhere.
        let window = if args[0] == "dispatch" || args[0] == "claim" {
            15_000
        } else {
            30_000
        };
        let kill = (rng.below(10) < 6).then(|| Duration::from_micros(rng.below(window)));
        steps.push(format!(
            "{} {}",
            args.join(" "),
            kill.map_or("".into(), |d| format!("(SIGKILL after {d:?})"))
        ));
        run_or_kill(&env, &args, kill);
    }
    let trail = steps.join("\n");

    // Whatever died when, no agent runs outside a recorded run.
    let bad = agents_unrecorded(&env, &token, false);
    assert!(
        bad.is_empty(),
        "agents without a recorded run:\n{}\njobs: {}\nlog: {}\nsteps:\n{trail}",
        bad.join("\n"),
        jobs_table(&env),
        events(&env)
    );

    // An operator stops everything; stops and reaps finish what the killed ones left.
    for t in live_task_ids(&env) {
        env.json(&["stop", &t.to_string()]);
    }
    let cancelled: Vec<i64> = env.db().values(
        "SELECT id FROM tasks WHERE stage = 'cancelled' ORDER BY id",
        (),
    );
    for t in &cancelled {
        env.json(&["stop", &t.to_string()]);
    }
    env.json(&["reap"]);
    for _ in 0..3 {
        env.json(&["reconcile"]);
    }

    let c = env.db();
    // SQLite's own check of its file (PostgreSQL has no counterpart to run here).
    if !env.is_postgres() {
        let integrity: String = c.value("PRAGMA integrity_check", ());
        assert_eq!(integrity, "ok", "steps:\n{trail}");
    }
    let live_jobs_of_terminal = env.count(
        "SELECT count(*) FROM jobs j JOIN tasks t ON t.id = j.task_id
         WHERE t.stage IN ('done', 'cancelled') AND j.status IN ('queued', 'running')",
    );
    assert_eq!(live_jobs_of_terminal, 0, "steps:\n{trail}");
    // Every cancelled task's agents are dead, recorded or not: what lives on is a run of a
    // live task (one whose STOP waits for its deploy window to close) or of a done one.
    let of_cancelled = || -> Vec<(i32, i32)> {
        let runs = recorded(&env);
        processes_with(&token)
            .into_iter()
            .filter(|(_, pgid)| {
                !runs.iter().any(|(_, _, pid, _, stage)| {
                    *pid == *pgid as i64 && stage.as_deref() != Some("cancelled")
                })
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(15), || of_cancelled().is_empty()),
        "agents of cancelled tasks (or of no run) alive after stop and reap: {:?}\nruns: {:?}\njobs: {}\nsteps:\n{trail}",
        of_cancelled(),
        recorded(&env),
        jobs_table(&env)
    );
    for (job, _, pid, _, stage) in recorded(&env) {
        if stage.as_deref() == Some("cancelled") {
            assert_eq!(
                group_members(pid as i32),
                Vec::<i32>::new(),
                "job {job}'s group lives on\nsteps:\n{trail}"
            );
        }
    }
    let open: Vec<(i64, String, String, Option<String>)> = c.all(
        "SELECT o.id, o.kind, o.status, o.last_error FROM outbox o JOIN tasks t ON t.id = o.task_id
         WHERE t.stage = 'cancelled' AND o.status NOT IN ('done', 'failed')",
        (),
    );
    assert!(
        open.is_empty(),
        "effects left open: {open:?}\nsteps:\n{trail}"
    );
    // A finished task's worktree is gone (STOP's or done's removal); only live tasks keep
    // theirs, and the clone's main working tree is untouched.
    let porcelain = repo.worktree_list();
    let trees = orchctl::integrations::git::parse_worktrees(&porcelain);
    assert!(trees[0].is_main);
    for t in &trees[1..] {
        let branch = t
            .branch
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches("refs/heads/");
        let live = env.count(&format!(
            "SELECT count(*) FROM tasks WHERE branch = '{branch}' AND stage NOT IN ('done', 'cancelled')"
        ));
        assert_eq!(
            live,
            1,
            "{} of a finished task is left\njobs: {}\nlog: {}\nsteps:\n{trail}",
            t.path.display(),
            jobs_table(&env),
            events(&env)
        );
    }
    assert!(Path::new(&repo.clone).join("README.md").exists());
    drop(runs);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}
