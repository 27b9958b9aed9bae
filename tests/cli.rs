//! The interface conventions of SPEC §9 on the real binary: JSON off a terminal, text on
//! one, `--format`/ORCH_FORMAT to override; errors as one `orchctl:` line (+ a hint) with
//! the contract's exit code and the database untouched; exit codes and ORCH_* variables in
//! `--help`; and the text layouts people read, as redacted snapshots.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::Stdio;

use serde_json::Value;

use crate::common::Env;
use crate::queue::pipeline;

/// Runs orchctl with stdout (and stdin) on a pseudo-terminal; returns (exit code, output).
fn run_on_tty(env: &Env, args: &[&str]) -> (i32, String) {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut child = env
        .cmd()
        .args(args)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Our copies of the slave are gone (moved into the child's stdio), so reading the
    // master ends (EIO) once the child exits.
    let mut master = std::fs::File::from(pty.master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let status = child.wait().unwrap();
    // The terminal turns "\n" into "\r\n".
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out).replace("\r\n", "\n"),
    )
}

#[test]
fn json_off_a_terminal_text_on_one_and_format_overrides_both() {
    let mut env = Env::new();
    env.json(&["task", "add", "--repo", "demo", "--work-item", "DEMO-1"]);

    // Not a terminal (a pipe): JSON.
    let list = env.json(&["task", "list"]);
    assert_eq!(list[0]["work_item_id"], "DEMO-1");

    // A terminal: text.
    let (code, text) = run_on_tty(&env, &["task", "list"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("ID  WORK ITEM"), "{text:?}");
    assert!(serde_json::from_str::<Value>(&text).is_err());

    // --format json on a terminal, --format text in a pipe.
    let (code, json) = run_on_tty(&env, &["--format", "json", "task", "list"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v, list);
    let (code, text, _) = env.run(&["task", "list", "--format", "text"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("ID  WORK ITEM"), "{text}");

    // ORCH_FORMAT does the same; the flag beats the variable.
    env.set("ORCH_FORMAT", "text");
    let (_, text, _) = env.run(&["task", "list"]);
    assert!(text.starts_with("ID  WORK ITEM"), "{text}");
    let (_, json, _) = env.run(&["--format", "json", "task", "list"]);
    assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), list);
    env.set("ORCH_FORMAT", "json");
    let (_, json) = run_on_tty(&env, &["task", "list"]);
    assert_eq!(serde_json::from_str::<Value>(json.trim()).unwrap(), list);
}

/// Asserts SPEC §9's error shape and returns stderr.
fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let (got, stdout, stderr) = env.run(args);
    assert_eq!(got, code, "orchctl {args:?}: {stderr}");
    assert_eq!(stdout, "", "orchctl {args:?} printed a result");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        !lines.is_empty() && lines.len() <= 2,
        "orchctl {args:?}: one line and maybe a hint, got {stderr:?}"
    );
    assert!(lines[0].starts_with("orchctl: "), "{stderr:?}");
    assert!(!lines[0].starts_with("orchctl: error"), "{stderr:?}");
    if let Some(h) = lines.get(1) {
        assert!(h.starts_with("orchctl: hint: "), "{stderr:?}");
    }
    stderr
}

#[test]
fn errors_are_one_line_with_a_hint_and_the_contract_exit_code() {
    let mut env = Env::new();
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-1",
        "--stage",
        "deploy",
    ]);
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-2",
        "--stage",
        "deploy",
    ]);
    let tasks = || env.count("SELECT count(*) FROM tasks");

    // 2: usage, with the subcommand's usage and help in the hint.
    let e = fails(&env, &["stop"], 2);
    assert!(
        e.contains("<TASK>") && e.contains("orchctl stop --help"),
        "{e}"
    );
    let e = fails(&env, &["stop", "DEMO-1", "--bogus"], 2);
    assert!(e.contains("unexpected argument '--bogus'"), "{e}");
    let e = fails(
        &env,
        &["finalize-deploy", "DEMO-1", "--outcome", "maybe"],
        2,
    );
    assert!(e.contains("possible values: success, failure"), "{e}");
    assert!(e.contains("orchctl finalize-deploy --help"), "{e}");
    let e = fails(&env, &["complete", "1", "--run-id", "1"], 2);
    assert!(e.contains("--success|--failure"), "{e}");
    fails(&env, &["no-such-command"], 2);

    // 65: bad input data, nothing written.
    let before = tasks();
    let e = fails(
        &env,
        &["task", "add", "--repo", "a b", "--work-item", "X-1"],
        65,
    );
    assert!(e.contains("invalid repo name"), "{e}");
    fails(
        &env,
        &[
            "task",
            "add",
            "--repo",
            "demo",
            "--work-item",
            "X-1",
            "--branch",
            "a..b",
        ],
        65,
    );
    fails(
        &env,
        &["task", "add", "--repo", "demo", "--work-item", "DEMO-1"],
        65,
    );
    assert_eq!(tasks(), before);

    // 1: a task that does not exist, with a hint on how to name one.
    let e = fails(&env, &["task", "show", "NOPE-9"], 1);
    assert!(
        e.contains("no task matches \"NOPE-9\"") && e.contains("hint"),
        "{e}"
    );

    // 3: nothing to claim.
    let e = fails(&env, &["claim", "--agent", "developer"], 3);
    assert_eq!(e, "orchctl: nothing to claim\n");

    // 75: the merge lease is held by another branch (safe to retry).
    env.json(&["deploy-begin", "DEMO-1"]);
    let e = fails(&env, &["deploy-begin", "DEMO-2"], 75);
    assert!(e.contains("held by branch feature/DEMO-1"), "{e}");

    // 75: the database stays busy past ORCH_BUSY_TIMEOUT_MS.
    {
        let holder = env.hold_busy();
        env.set("ORCH_BUSY_TIMEOUT_MS", "100");
        let e = fails(
            &env,
            &["task", "add", "--repo", "demo", "--work-item", "DEMO-3"],
            75,
        );
        assert!(e.contains("hint: the database stayed busy"), "{e}");
        holder.release();
        env.unset("ORCH_BUSY_TIMEOUT_MS");
    }

    // 78: bad configuration, and a database newer than this binary (left untouched).
    env.set("ORCH_STOP_ENABLED", "maybe");
    let e = fails(&env, &["queue"], 78);
    assert!(e.contains("ORCH_STOP_ENABLED"), "{e}");
    env.unset("ORCH_STOP_ENABLED");
    env.set("ORCH_GITEA_URL", "http://gitea.invalid");
    fails(&env, &["queue"], 78);
    env.unset("ORCH_GITEA_URL");
    env.db().set_schema_version(999);
    let e = fails(&env, &["queue"], 78);
    assert!(e.contains("newer than this orchctl"), "{e}");
    assert_eq!(
        env.db_raw().schema_version(),
        999,
        "the newer database was touched"
    );
}

#[test]
fn help_shows_the_exit_codes_and_every_variable() {
    let env = Env::new();
    for flag in ["--help", "-h"] {
        let (code, help, _) = env.run(&[flag]);
        assert_eq!(code, 0);
        for (c, meaning) in orchctl::cli::EXIT_CODES {
            assert!(
                help.contains(&format!("  {c:<3} {meaning}")),
                "{flag}: exit {c}\n{help}"
            );
        }
    }
    // Each subcommand's --help names the ORCH_* variable of each of its flags.
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, env: &Env) {
        let args: Vec<&str> = path.iter().map(String::as_str).chain(["--help"]).collect();
        let (code, help, err) = env.run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        // Help is wrapped to the width of the terminal: compare words, not lines.
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(help.contains("Exit codes:"), "{args:?}");
        for a in cmd.get_arguments() {
            if let Some(var) = a.get_env() {
                let shown = format!("[env: {}]", var.to_string_lossy());
                assert!(help.contains(&shown), "{args:?} lacks {shown}");
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            path.push(sub.get_name().to_string());
            walk(sub, path, env);
            path.pop();
        }
    }
    let mut cmd = orchctl::cli::command();
    cmd.build();
    walk(&cmd, &mut Vec::new(), &env);
}

#[test]
fn switch_variables_turn_switches_on_and_off_words_leave_them_off() {
    let mut env = Env::new();
    for (value, dry) in [
        ("1", true),
        ("yes", true),
        ("0", false),
        ("off", false),
        ("", false),
    ] {
        env.set("ORCH_REAP_DRY_RUN", value);
        assert_eq!(
            env.json(&["reap"])["dry_run"],
            dry,
            "ORCH_REAP_DRY_RUN={value:?}"
        );
    }
    env.unset("ORCH_REAP_DRY_RUN");

    // ORCH_STOP_FORCE=0 keeps the critical-window check, ORCH_STOP_FORCE=1 skips it.
    env.json(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "DEMO-1",
        "--stage",
        "deploy",
    ]);
    env.json(&["deploy-begin", "DEMO-1"]);
    env.set("ORCH_STOP_FORCE", "0");
    assert_eq!(
        env.json(&["stop", "DEMO-1"])["note"],
        "deferred-critical-window"
    );
    env.set("ORCH_STOP_FORCE", "1");
    assert_eq!(env.json(&["stop", "DEMO-1"])["note"], "cancelled");
}

/// SPEC §2: without `--db`/ORCH_DB_PATH the database is `$XDG_STATE_HOME/orchctl/orch.db`,
/// else `~/.local/state/orchctl/orch.db`, its folders created.
#[test]
fn sqlite_only_the_default_database_path_follows_xdg_state_home_then_home() {
    let mut env = Env::sqlite();
    env.unset("ORCH_DB_PATH");
    let xdg = env.path().join("xdg/deep/state");
    env.set("XDG_STATE_HOME", xdg.to_str().unwrap());
    let v = env.json(&["migrate"]);
    let want = xdg.join("orchctl/orch.db");
    assert_eq!(v["db"], want.to_str().unwrap());
    assert!(want.is_file());

    env.unset("XDG_STATE_HOME");
    let home = env.path().join("home");
    env.set("HOME", home.to_str().unwrap());
    let v = env.json(&["migrate"]);
    let want = home.join(".local/state/orchctl/orch.db");
    assert_eq!(v["db"], want.to_str().unwrap());
    assert!(want.is_file());
}

/// An empty variable is an unset one, for the variables of flags as for the configuration
/// ones: an environment file line `ORCH_DB_PATH=` or `ORCH_FORMAT=` means "the default".
#[test]
fn empty_flag_variables_count_as_unset() {
    let mut env = Env::new();
    let xdg = env.path().join("xdg");
    env.set("XDG_STATE_HOME", xdg.to_str().unwrap());
    for var in [
        "ORCH_DB_PATH",
        "ORCH_FORMAT",
        "ORCH_QUEUE_RECENT",
        "ORCH_CLAIM_REPO",
        "ORCH_CLAIM_AGENTS",
    ] {
        env.set(var, "");
    }
    let v = env.json(&["queue"]);
    assert!(v["counts"].is_object(), "{v}");
    if env.is_postgres() {
        // SPEC §12: the URL wins, so no SQLite file, not even the default one.
        assert!(!xdg.join("orchctl/orch.db").exists());
    } else {
        assert!(xdg.join("orchctl/orch.db").is_file());
    }
    assert_eq!(
        env.run(&["claim"]).0,
        3,
        "nothing to claim, not a usage error"
    );
}

#[test]
fn an_agent_completes_its_run_from_its_environment() {
    let mut env = Env::new();
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
    let c = env.json(&["claim"]);
    let (job, run) = (c["id"].to_string(), c["run_id"].to_string());
    env.set("ORCH_JOB_ID", &job).set("ORCH_RUN_ID", &run);
    let done = env.json(&["complete", "--success"]);
    assert_eq!(done["note"], "advanced");
    assert_eq!(done["job"]["status"], "done");
    assert_eq!(done["task"]["stage"], "review");
}

/// Replaces what changes from run to run by placeholders of the same width, so the
/// alignment the snapshot checks survives: UTC times and the test's temp dir.
fn redact(env: &Env, text: &str) -> String {
    let mut text = text.replace(env.path().to_str().unwrap(), "<tmp>");
    // Where hosts share a PostgreSQL database the log names the host that ran each side
    // effect; the one host of these snapshots is left out.
    if let Some(host) = env
        .var("ORCH_HOST_ID")
        .map(String::from)
        .or_else(|| Some(env.config().host_id))
    {
        text = text.replace(&format!(" host={host} "), " ");
    }
    let b = text.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:ddZ";
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let is_time = b.len() - i >= shape.len()
            && shape.iter().enumerate().all(|(k, &s)| {
                let c = b[i + k];
                if s == b'd' {
                    c.is_ascii_digit()
                } else {
                    c == s
                }
            });
        if is_time {
            out.push_str("YYYY-MM-DDThh:mm:ssZ");
            i += shape.len();
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn text(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["--format", "text"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = env.run(&all);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    redact(env, &stdout)
}

/// `queue`'s text without what only PostgreSQL shows (the hosts sharing the database),
/// after checking that it shows this one host, alive.
fn queue_text(env: &Env) -> String {
    let out = text(env, &["queue"]);
    if !env.db().is_postgres() {
        assert!(!out.contains("hosts"), "{out}");
        return out;
    }
    let host = env.config().host_id;
    let line = "hosts        1 alive, 0 dead\n";
    assert!(out.contains(line), "{out}");
    let start = out.find("\nhosts:\n").expect("a hosts section") + 1;
    let end = start + out[start..].find("\n\n").expect("the section ends") + 2;
    let section = &out[start..end];
    let row = section.lines().nth(2).unwrap_or_default();
    assert!(
        section.lines().nth(1).unwrap_or_default().contains("ALIVE")
            && row.trim_start().starts_with(&host)
            && row.contains("yes"),
        "{section}"
    );
    format!("{}{}", &out[..start], &out[end..]).replacen(line, "", 1)
}

#[test]
fn text_snapshot_of_queue() {
    let env = pipeline();
    assert_eq!(
        queue_text(&env),
        "\
jobs         2 queued, 0 running, 1 done, 0 failed, 1 cancelled
serial gate  on, 1 merge lease(s) held
task deps    on, 1 task(s) waiting on others
auto labels  off
outbox       0 pending, 2 failed
stop         on (all repos), 1 cancelled, 1 deferred pending

merge leases:
  REPO  TASK  SINCE                 BRANCH
  demo  3     YYYY-MM-DDThh:mm:ssZ  feature/DEMO-3-ship-it

blocked tasks:
  TASK  WAITING ON
  2     1

recent jobs:
  JOB  TASK  AGENT      STATUS     RUN  TRIES  PID  CLAIMED               ERROR
  4    4     analyst    cancelled  -    0/2    -    -                     not needed
  3    1     reviewer   queued     -    0/2    -    -                     -
  2    2     analyst    queued     -    0/2    -    -                     -
  1    1     developer  done       1    1/2    -    YYYY-MM-DDThh:mm:ssZ  -

open side effects:
  ID  TASK  SIDE EFFECT           STATUS  TRIES  NEXT TRY  LAST ERROR
  5   4     delete_remote_branch  failed  10     -         Gitea answered 403: branch is protected
  3   4     delete_remote_branch  failed  1      -         cannot be attempted: no Gitea is configured (ORCH_GITEA_URL) and there is no clone at <tmp>/repos/demo to push from

recent stops:
  TASK  WORK ITEM           REPO  CANCELLED             REASON
  4     DEMO-4#cancelled-4  demo  YYYY-MM-DDThh:mm:ssZ  not needed
"
    );
}

#[test]
fn text_snapshot_of_task_list_and_task_log() {
    let env = pipeline();
    assert_eq!(
        text(&env, &["task", "list"]),
        "\
ID  WORK ITEM           STAGE      REPO  UPDATED               BRANCH
4   DEMO-4#cancelled-4  cancelled  demo  YYYY-MM-DDThh:mm:ssZ  feature/DEMO-4-dropped
3   DEMO-3              deploy     demo  YYYY-MM-DDThh:mm:ssZ  feature/DEMO-3-ship-it
2   DEMO-2              analysis   demo  YYYY-MM-DDThh:mm:ssZ  feature/DEMO-2-second
1   DEMO-1              review     demo  YYYY-MM-DDThh:mm:ssZ  feature/DEMO-1-add-a-greeting
"
    );
    assert_eq!(
        text(&env, &["task", "log", "4"]),
        "\
DEMO-4 (task 4)  cancelled

AT                    EVENT                 DETAIL
YYYY-MM-DDThh:mm:ssZ  created               branch=feature/DEMO-4-dropped source=task add stage=analysis
YYYY-MM-DDThh:mm:ssZ  job_queued            agent=analyst job_id=4
YYYY-MM-DDThh:mm:ssZ  cancelled             effects=[remove_worktree, delete_remote_branch] forced=no jobs_cancelled=[4] lease_released=no marker_cleared=no reason=not needed source=operator
YYYY-MM-DDThh:mm:ssZ  remove_worktree       attempts=1 outbox_id=2 result=no clone at <tmp>/repos/demo: nothing to remove status=done
YYYY-MM-DDThh:mm:ssZ  delete_remote_branch  attempts=1 error=cannot be attempted: no Gitea is configured (ORCH_GITEA_URL) and there is no clone at <tmp>/repos/demo to push from outbox_id=3 status=failed
YYYY-MM-DDThh:mm:ssZ  plane_comment         attempts=1 outbox_id=4 result=skipped: Plane not configured status=done
"
    );
}

#[test]
fn text_snapshot_of_stop_and_task_show() {
    let env = pipeline();
    assert_eq!(
        text(&env, &["stop", "DEMO-3"]),
        "\
DEMO-3 (task 3): a deferred stop is already pending
  queued jobs cancelled  0
  stage                  deploy (unchanged)
  finalize-deploy applies the stop when the deploy step ends (reconcile does
  once the window closes); `orchctl stop --force` resets now.
"
    );
    assert_eq!(
        text(&env, &["task", "show", "DEMO-3"]),
        "\
task 3  DEMO-3  deploy
  title         Ship it
  repo          demo
  branch        feature/DEMO-3-ship-it
  created       YYYY-MM-DDThh:mm:ssZ
  updated       YYYY-MM-DDThh:mm:ssZ
  stop pending  YYYY-MM-DDThh:mm:ssZ (deferred stop)
  merge lease   held by feature/DEMO-3-ship-it since YYYY-MM-DDThh:mm:ssZ
  deploy        initiated

jobs:
  none

side effects:
  ID  SIDE EFFECT    STATUS  RESULT
  1   plane_comment  done    skipped: Plane not configured
"
    );
}

#[test]
fn text_output_never_passes_escape_sequences_from_stored_data_to_the_terminal() {
    let env = Env::new();
    let title = "Evil \u{1b}]0;owned\u{7}\u{1b}[2J title";
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-990",
        "--title",
        title,
    ]);
    // JSON keeps the title exactly (escaped by the encoder).
    let shown = env.json(&["task", "show", "ORCH-990"]);
    assert_eq!(shown["task"]["title"], title);
    for args in [
        vec!["--format", "text", "task", "show", "ORCH-990"],
        vec!["--format", "text", "task", "list"],
        vec!["--format", "text", "task", "log", "ORCH-990"],
        vec!["--format", "text", "stop", "ORCH-990"],
    ] {
        let (code, stdout, _) = env.run(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(
            !stdout.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed a control character: {stdout:?}"
        );
        if args.contains(&"show") {
            assert!(stdout.contains("Evil ?]0;owned??[2J title"), "{stdout}");
        }
    }
}
