//! The operator's experience (issue 15) and unreadable configuration (issue 13, finding 1)
//! on the real binary: one strict reader for every ORCH_* variable — undecodable values and
//! switch typos are exit 78 with nothing touched —, agent and stage names checked with the
//! valid ones listed, text that fits the terminal, and messages that say what they found
//! or what they wait for.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::{Agent, Env, GitRepo};
use crate::event::{bytes, fixture, to_state, ISSUE, PROJECT, STOP};
use crate::fault::{assert_unchanged, snapshot};

/// Runs `cmd` to its end; returns (exit code, stdout, stderr).
fn output(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// orchctl `args` with `var` set to the raw bytes `value` and `stdin` as input.
fn run_with_bytes(
    env: &Env,
    var: &str,
    value: &[u8],
    args: &[&str],
    stdin: &[u8],
) -> (i32, String, String) {
    let mut child = env
        .cmd()
        .env(var, OsStr::from_bytes(value))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let _ = pipe.write_all(stdin);
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a configuration refusal: exit 78, nothing printed, one line naming `var`.
fn refused(got: (i32, String, String), var: &str, what: &str) {
    let (code, stdout, stderr) = got;
    assert_eq!(code, 78, "{what}: {stderr}");
    assert_eq!(stdout, "", "{what}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("orchctl: ") && first.contains(var),
        "{what}: the error must name {var}: {stderr:?}"
    );
}

// ------------------------------------------------------------ undecodable configuration

/// Issue 13 finding 1: a webhook secret with one Latin-1 byte used to read as unset, so an
/// unsigned delivery started a pipeline. It is exit 78 now, before the body is looked at.
#[test]
fn an_undecodable_webhook_secret_refuses_the_delivery_instead_of_skipping_the_signature() {
    let mut env = Env::new();
    env.set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_PROJECT_IDENTIFIERS", &format!("{PROJECT}=ORCH"));
    drop(env.db());
    let before = snapshot(&env);
    let got = run_with_bytes(
        &env,
        "ORCH_PLANE_WEBHOOK_SECRET",
        b"plane_wh_s\xe9cret",
        &["event"],
        &fixture("issue_created.json"),
    );
    refused(got, "ORCH_PLANE_WEBHOOK_SECRET", "non-UTF-8 secret");
    assert_unchanged(
        &env,
        &before,
        "an unsigned delivery with an unreadable secret",
    );
}

/// Issue 13 finding 1: one Latin-1 byte in ORCH_PROTECTED_BRANCHES used to drop the whole
/// list, and a protected release branch was deleted on the remote by a STOP.
#[test]
fn an_undecodable_protected_branch_list_stops_nothing_and_deletes_nothing() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    repo.feature(&env, "release/1.4");
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-14",
        "--branch",
        "release/1.4",
    ]);
    let before = snapshot(&env);
    let got = run_with_bytes(
        &env,
        "ORCH_PROTECTED_BRANCHES",
        b"release/*,caf\xe9/*",
        &["stop", "ORCH-14"],
        b"",
    );
    refused(got, "ORCH_PROTECTED_BRANCHES", "non-UTF-8 protected list");
    assert_unchanged(&env, &before, "a stop with an unreadable protected list");
    assert!(
        repo.remote_branches().lines().any(|b| b == "release/1.4"),
        "{}",
        repo.remote_branches()
    );
}

/// Issue 13 finding 1: `off` followed by a Latin-1 no-break space used to read as "on", so
/// Plane's STOP stopped a task with the kill switch off. Undecodable → 78; the UTF-8 no-break
/// space is no boolean either (only ASCII blanks around the word are ignored).
#[test]
fn a_kill_switch_with_a_no_break_space_is_refused_not_read_as_on() {
    let env = Env::new();
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-42",
        "--plane-id",
        ISSUE,
    ]);
    let before = snapshot(&env);
    let body = bytes(&to_state(ISSUE, STOP));
    for value in [&b"off\xa0"[..], "off\u{a0}".as_bytes(), b"of", b"offf"] {
        let got = run_with_bytes(&env, "ORCH_STOP_ENABLED", value, &["event"], &body);
        refused(got, "ORCH_STOP_ENABLED", &format!("{value:?}"));
        assert_unchanged(&env, &before, "a STOP with an unreadable kill switch");
    }
    // A value with ASCII blanks around it is still the word.
    let got = run_with_bytes(&env, "ORCH_STOP_ENABLED", b" off ", &["event"], &body);
    assert_eq!(got.0, 0, "{}", got.2);
    let v: Value = serde_json::from_str(&got.1).unwrap();
    assert_eq!(v["note"], "stop-disabled", "{v}");
}

/// Every variable orchctl reads — configuration, secrets and the variables of flags, which
/// clap reads itself — refuses a value that is not UTF-8 with exit 78 naming it, before the
/// database is opened (it is not even created).
#[test]
fn every_orch_variable_refuses_bytes_that_are_not_utf8_before_the_database_is_opened() {
    let env = Env::new();
    let mut names: Vec<String> = orchctl::config::VARIABLES
        .iter()
        .map(|(n, _, _)| n.to_string())
        .collect();
    let mut cmd = orchctl::cli::command();
    cmd.build();
    fn flag_vars(cmd: &clap::Command, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if let Some(e) = a.get_env() {
                out.push(e.to_string_lossy().into_owned());
            }
        }
        for s in cmd.get_subcommands() {
            flag_vars(s, out);
        }
    }
    flag_vars(&cmd, &mut names);
    names.sort();
    names.dedup();
    assert!(names.contains(&"ORCH_STOP_REASON".to_string()));
    for name in &names {
        let got = run_with_bytes(&env, name, b"x\xffy", &["queue"], b"");
        refused(got, name, name);
        assert!(!env.database_created(), "{name}: the database was opened");
    }
    // A flag's own variable, on its own command (clap would have said "invalid UTF-8",
    // exit 2, or taken the bytes as a path).
    let got = run_with_bytes(
        &env,
        "ORCH_STOP_REASON",
        b"caf\xe9",
        &["stop", "ORCH-1"],
        b"",
    );
    refused(got, "ORCH_STOP_REASON", "stop --reason from its variable");
    let odd = env.path().join("odd");
    let mut path = odd.as_os_str().as_bytes().to_vec();
    path.extend_from_slice(b"/\xff.db");
    let got = run_with_bytes(&env, "ORCH_DB_PATH", &path, &["migrate"], b"");
    refused(got, "ORCH_DB_PATH", "a database path that is not UTF-8");
    assert!(
        !odd.exists(),
        "a database was created at the undecodable path"
    );
    // Outside ORCH_*, an undecodable COLUMNS is only a lost layout hint.
    let got = run_with_bytes(&env, "COLUMNS", b"8\xff0", &["queue"], b"");
    assert_eq!(got.0, 0, "{}", got.2);
}

// ------------------------------------------------------------------- strict switches

/// Every switch bound to a variable, as (command path, variable, required positionals).
fn switch_variables() -> Vec<(Vec<String>, String, usize)> {
    fn walk(
        cmd: &clap::Command,
        path: &mut Vec<String>,
        out: &mut Vec<(Vec<String>, String, usize)>,
    ) {
        let positionals = cmd
            .get_positionals()
            .filter(|a| a.is_required_set())
            .count();
        for a in cmd.get_arguments() {
            if matches!(a.get_action(), clap::ArgAction::SetTrue) {
                if let Some(e) = a.get_env() {
                    out.push((path.clone(), e.to_string_lossy().into_owned(), positionals));
                }
            }
        }
        for s in cmd.get_subcommands() {
            path.push(s.get_name().to_string());
            walk(s, path, out);
            path.pop();
        }
    }
    let mut cmd = orchctl::cli::command();
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, &mut Vec::new(), &mut out);
    out
}

/// A task in its deploy window (DEMO-1) and a running job whose agent is alive (DEMO-2):
/// a forced stop, a recovering reap or a real reap would each change something.
fn dangerous_world() -> (Env, Agent) {
    let env = Env::new();
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
    let agent = Agent::spawn("sleep 60");
    let task = env.make_task("p-2", "DEMO-2", "development", None);
    env.make_job_full(
        task,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(1),
        1,
        2,
    );
    (env, agent)
}

/// SPEC §11: `ORCH_STOP_FORCE=maybe orchctl stop T` on a task in its deploy window is exit 78
/// naming the variable, with the database unchanged — and so for every switch variable
/// (today's and any added later: the list comes from the command line itself).
#[test]
fn a_switch_variable_that_is_no_boolean_is_exit_78_and_changes_nothing() {
    let (env, _agent) = dangerous_world();
    let switches = switch_variables();
    for var in ["ORCH_STOP_FORCE", "ORCH_REAP_DRY_RUN", "ORCH_REAP_RECOVER"] {
        assert!(
            switches.iter().any(|(_, v, _)| v == var),
            "{var}: {switches:?}"
        );
    }
    let before = snapshot(&env);
    for (path, var, positionals) in &switches {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.extend(std::iter::repeat_n("DEMO-1", *positionals));
        for value in [
            "maybe",
            "offf",
            "of",
            "2",
            "y",
            "n",
            "nope",
            "off\u{a0}",
            "on;",
        ] {
            let mut cmd = env.cmd();
            cmd.env(var, value).args(&args);
            refused(
                output(cmd),
                var,
                &format!("{var}={value:?} orchctl {args:?}"),
            );
            assert_unchanged(&env, &before, &format!("{var}={value:?}"));
        }
    }
}

/// The check runs before the database is opened: a bad switch never creates the file.
#[test]
fn a_bad_switch_variable_is_refused_before_the_database_is_created() {
    let env = Env::new();
    let mut cmd = env.cmd();
    cmd.env("ORCH_STOP_FORCE", "maybe").args(["stop", "1"]);
    refused(output(cmd), "ORCH_STOP_FORCE", "stop");
    assert!(!env.database_created());
}

/// `off`, `0`, `no`, empty (and any case, blanks around) leave a switch off; the on words
/// turn it on.
#[test]
fn off_words_and_empty_leave_switches_off() {
    let (mut env, agent) = dangerous_world();
    for value in ["off", "0", "no", "", "OFF", "False", " No "] {
        env.set("ORCH_STOP_FORCE", value);
        let r = env.json(&["stop", "DEMO-1"]);
        assert!(
            r["note"].as_str().unwrap().starts_with("deferred"),
            "ORCH_STOP_FORCE={value:?}: {r}"
        );
        env.set("ORCH_REAP_RECOVER", value)
            .set("ORCH_REAP_DRY_RUN", value);
        let r = env.json(&["reap"]);
        assert_eq!(r["dry_run"], false, "ORCH_REAP_DRY_RUN={value:?}");
        assert_eq!(r["alive"], 1, "ORCH_REAP_RECOVER={value:?}: {r}");
    }
    assert_eq!(env.task(1).stage, "deploy");
    // The on words: a dry recovering reap reports the live agent's job as dead.
    env.set("ORCH_REAP_RECOVER", "Yes")
        .set("ORCH_REAP_DRY_RUN", "TRUE");
    let r = env.json(&["reap"]);
    assert_eq!(
        (r["dry_run"].as_bool(), r["alive"].as_i64()),
        (Some(true), Some(0)),
        "{r}"
    );
    assert!(common_alive(agent.pid));
    env.set("ORCH_STOP_FORCE", "On");
    assert_eq!(env.json(&["stop", "DEMO-1"])["note"], "cancelled");
}

fn common_alive(pid: i64) -> bool {
    crate::common::alive(pid as i32)
}

// ------------------------------------------------------------------ names on the CLI

/// Asserts a usage error (exit 2) whose message lists every one of `valid`.
fn usage_listing(env: &Env, args: &[&str], vars: &[(&str, &str)], valid: &[&str]) -> String {
    let mut cmd = env.cmd();
    cmd.args(args).envs(vars.iter().copied());
    let (code, stdout, stderr) = output(cmd);
    assert_eq!(code, 2, "orchctl {args:?} {vars:?}: {stderr}");
    assert_eq!(stdout, "");
    let first = stderr.lines().next().unwrap_or_default();
    for name in valid {
        assert!(
            first.contains(name),
            "{args:?}: {name} not listed: {stderr}"
        );
    }
    stderr
}

#[test]
fn agent_and_stage_names_are_checked_with_the_valid_ones_listed() {
    let env = Env::new();
    env.json(&["task", "add", "--repo", "demo", "--work-item", "DEMO-1"]);
    let agents = ["analyst", "developer", "reviewer", "deployer"];
    let stages = [
        "analysis",
        "development",
        "review",
        "deploy",
        "done",
        "cancelled",
    ];
    let before = snapshot(&env);
    // Today `claim --agent bogus` answered "nothing to claim".
    usage_listing(&env, &["claim", "--agent", "bogus"], &[], &agents);
    usage_listing(
        &env,
        &["claim", "--agent", "developer", "--agent", "Analyst"],
        &[],
        &agents,
    );
    usage_listing(
        &env,
        &["claim"],
        &[("ORCH_CLAIM_AGENTS", "analyst,bogus")],
        &agents,
    );
    // dispatch takes agents too, on its command line and in its variable.
    usage_listing(&env, &["dispatch", "--agent", "bogus"], &[], &agents);
    usage_listing(
        &env,
        &["dispatch"],
        &[("ORCH_DISPATCH_AGENTS", "developer,bogus")],
        &agents,
    );
    usage_listing(&env, &["task", "list", "--stage", "bogus"], &[], &stages);
    usage_listing(
        &env,
        &["task", "list"],
        &[("ORCH_LIST_STAGE", "bogus")],
        &stages,
    );
    // A task starts in a live stage only: the terminal ones are not offered.
    for bad in ["bogus", "done", "cancelled"] {
        let e = usage_listing(
            &env,
            &[
                "task",
                "add",
                "--repo",
                "demo",
                "--work-item",
                "DEMO-2",
                "--stage",
                bad,
            ],
            &[],
            &stages[..4],
        );
        assert!(!e.lines().next().unwrap().contains("done,"), "{e}");
    }
    usage_listing(
        &env,
        &["task", "add", "--repo", "demo", "--work-item", "DEMO-2"],
        &[("ORCH_TASK_STAGE", "bogus")],
        &stages[..4],
    );
    assert_unchanged(&env, &before, "rejected names");
    // The valid names still work.
    assert_eq!(
        env.json(&["task", "list", "--stage", "analysis"])[0]["id"],
        1
    );
    assert_eq!(
        env.json(&["claim", "--agent", "analyst"])["agent"],
        "analyst"
    );
}

/// Every `--agent` and `--stage` of the command line (dispatch's included, once it lands)
/// checks its names: adding one is `value_parser = orchctl::cli::agent_name()`.
#[test]
fn every_agent_and_stage_argument_has_the_names_as_possible_values() {
    let mut cmd = orchctl::cli::command();
    cmd.build();
    fn walk(cmd: &clap::Command, seen: &mut usize) {
        for a in cmd.get_arguments() {
            let values: Vec<String> = a
                .get_possible_values()
                .iter()
                .map(|p| p.get_name().to_string())
                .collect();
            match a.get_long() {
                Some("agent") => {
                    *seen += 1;
                    assert_eq!(values, orchctl::cli::agent_names(), "{}", cmd.get_name());
                }
                Some("stage") => {
                    *seen += 1;
                    assert!(
                        !values.is_empty()
                            && values
                                .iter()
                                .all(|v| orchctl::pipeline::STAGES.contains(&v.as_str())),
                        "{}: {values:?}",
                        cmd.get_name()
                    );
                }
                _ => {}
            }
        }
        for s in cmd.get_subcommands() {
            walk(s, seen);
        }
    }
    let mut seen = 0;
    walk(&cmd, &mut seen);
    assert!(seen >= 3, "claim --agent, task add/list --stage");
}

// --------------------------------------------------------------- tables that fit

const LONG_TITLE: &str = "Migrate the billing service's nightly settlement export to the new \
    ledger schema without dropping historical adjustments";
const LONG_REASON: &str = "the customer withdrew the request after the quarterly review; see \
    the steering committee minutes of 2026-05-19 for the full discussion and follow-ups";
const LONG_ERROR: &str = "cargo test failed: thread 'ledger::tests::settlement_roundtrip' \
    panicked at src/ledger.rs:412:9: assertion failed: left == right (left: 1204.55, right: 1204.56)";

/// Long titles (so long branches), a long repo name, a long stop reason, a long job error,
/// a lease held by a long branch.
fn wide_world() -> Env {
    let env = Env::new();
    let repo = "customer-facing-billing-and-settlement-service";
    for (wi, stage) in [
        ("BILL-1201", "development"),
        ("BILL-1202", "analysis"),
        ("BILL-1203", "deploy"),
    ] {
        env.json(&[
            "task",
            "add",
            "--repo",
            repo,
            "--work-item",
            wi,
            "--title",
            LONG_TITLE,
            "--stage",
            stage,
        ]);
    }
    let c = env.json(&["claim", "--agent", "developer"]);
    env.json(&[
        "complete",
        &c["id"].to_string(),
        "--run-id",
        &c["run_id"].to_string(),
        "--failure",
        "--error",
        LONG_ERROR,
    ]);
    env.json(&["deploy-begin", "BILL-1203"]);
    env.json(&["stop", "BILL-1202", "--reason", LONG_REASON]);
    env
}

fn widest(text: &str) -> usize {
    text.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

fn text_with(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = env.cmd();
    cmd.arg("--format")
        .arg("text")
        .args(args)
        .envs(vars.iter().copied());
    let (code, stdout, stderr) = output(cmd);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stdout
}

#[test]
fn with_columns_80_tables_fit_and_cut_their_widest_cells() {
    let env = wide_world();
    for args in [
        vec!["task", "list"],
        vec!["task", "log", "2"],
        vec!["task", "log", "1"],
        vec!["queue"],
        vec!["task", "show", "1"],
    ] {
        // Without a width (a pipe, no COLUMNS) nothing is cut: the lines are long.
        let full = text_with(&env, &[], &args);
        assert!(
            widest(&full) > 80,
            "{args:?}: the world is not wide:\n{full}"
        );
        let fitted = text_with(&env, &[("COLUMNS", "80")], &args);
        assert!(widest(&fitted) <= 80, "{args:?} at COLUMNS=80:\n{fitted}");
        assert!(fitted.contains('~'), "{args:?}: nothing was cut:\n{fitted}");
        // Never wrapped: the same number of lines.
        assert_eq!(
            fitted.lines().count(),
            full.lines().count(),
            "{args:?}\n{fitted}"
        );
    }
    // The narrow columns and the times keep their values; the widest ones are cut.
    let list = text_with(&env, &[("COLUMNS", "80")], &["task", "list"]);
    let header = list.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["ID", "WORK", "ITEM", "STAGE", "REPO", "UPDATED", "BRANCH"],
        "{list}"
    );
    let row = list.lines().find(|l| l.starts_with("2 ")).unwrap();
    let cells: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells[0], "2", "{list}");
    assert!(
        cells[1].starts_with("BILL-1202#") && cells[1].ends_with('~'),
        "{list}"
    );
    assert_eq!(cells[2], "cancelled", "{list}");
    assert!(
        cells[3].starts_with("customer-") && cells[3].ends_with('~'),
        "{list}"
    );
    assert!(cells[4].len() == 20 && cells[4].ends_with('Z'), "{list}");
    assert!(
        cells[5].starts_with("feature/BIL") && cells[5].ends_with('~'),
        "{list}"
    );
    let wide = text_with(&env, &[("COLUMNS", "300")], &["task", "list"]);
    assert!(widest(&wide) > 80 && !wide.contains('~'), "{wide}");
}

/// Without COLUMNS the terminal's own width (TIOCGWINSZ) is used.
#[test]
fn text_on_a_terminal_fits_its_width() {
    let env = wide_world();
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 70,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut child = env
        .cmd()
        .args(["task", "list"])
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    assert!(child.wait().unwrap().success());
    let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
    assert!(text.starts_with("ID  WORK ITEM"), "{text}");
    assert!(widest(&text) <= 70, "{text}");
    assert!(text.contains('~'), "{text}");
}

// ------------------------------------------------------------------ messages

#[test]
fn a_duplicate_task_add_names_the_task_that_holds_the_key() {
    let env = Env::new();
    env.json(&["task", "add", "--repo", "demo", "--work-item", "S-1"]);
    env.json(&[
        "task",
        "add",
        "--repo",
        "other",
        "--work-item",
        "S-2",
        "--plane-id",
        "plane-7",
        "--stage",
        "review",
    ]);
    let before = snapshot(&env);
    let (code, _, err) = env.run(&["task", "add", "--repo", "demo", "--work-item", "S-1"]);
    assert_eq!(code, 65, "{err}");
    let first = err.lines().next().unwrap();
    assert_eq!(
        first,
        "orchctl: task 1 (S-1, analysis, repo demo) already has work item \"S-1\""
    );
    let (code, _, err) = env.run(&[
        "task",
        "add",
        "--repo",
        "demo",
        "--work-item",
        "S-3",
        "--plane-id",
        "plane-7",
    ]);
    assert_eq!(code, 65, "{err}");
    assert_eq!(
        err.lines().next().unwrap(),
        "orchctl: task 2 (S-2, review, repo other) already has Plane id \"plane-7\""
    );
    assert_unchanged(&env, &before, "duplicate task add");
}

/// `orchctl event` typed at a terminal says what it waits for (on stderr); from a pipe, as
/// a webhook server runs it, it says nothing of the kind.
#[test]
fn event_on_a_terminal_says_it_waits_for_a_body_on_stdin() {
    let env = Env::new();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave: OwnedFd = pty.slave;
    let child = env
        .cmd()
        .arg("event")
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    // A line, then Ctrl-D on an empty line: end of input.
    master.write_all(b"{}\n\x04").unwrap();
    let out = child.wait_with_output().unwrap();
    drop(master);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("orchctl: waiting for a Plane delivery body on stdin")),
        "{stderr}"
    );
    let (_, _, stderr) = env.run_stdin(&["event"], b"{}");
    assert!(!stderr.contains("waiting"), "{stderr}");
}

/// A stop that waits out an agent's grace period says so when stderr is a terminal (and
/// stays quiet for scripts).
#[test]
fn stop_says_on_a_terminal_that_it_waits_out_the_grace_period() {
    let mut env = Env::new();
    env.set("ORCH_STOP_GRACE_SECS", "1");
    let mut said = Vec::new();
    for on_terminal in [true, false] {
        let agent = Agent::spawn("trap '' TERM; sleep 60");
        let task = env.make_task(
            &format!("p-{on_terminal}"),
            &format!("ORCH-{}", on_terminal as u8),
            "development",
            None,
        );
        env.make_job_full(
            task,
            "developer",
            "running",
            Some(agent.pid),
            Some(agent.start),
            Some(1),
            1,
            2,
        );
        let mut cmd = env.cmd();
        cmd.args(["stop", &task.to_string()]).stdout(Stdio::piped());
        let (stderr, status, stdout) = if on_terminal {
            let pty = nix::pty::openpty(None, None).unwrap();
            let child = cmd.stderr(Stdio::from(pty.slave)).spawn().unwrap();
            // The command holds a copy of the terminal's slave side: without dropping it,
            // reading the master would never end.
            drop(cmd);
            let mut master = std::fs::File::from(pty.master);
            let mut err = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match master.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => err.extend_from_slice(&buf[..n]),
                }
            }
            let out = child.wait_with_output().unwrap();
            (
                String::from_utf8_lossy(&err).into_owned(),
                out.status,
                out.stdout,
            )
        } else {
            let out = cmd.stderr(Stdio::piped()).output().unwrap();
            (
                String::from_utf8_lossy(&out.stderr).into_owned(),
                out.status,
                out.stdout,
            )
        };
        assert!(status.success(), "{stderr}");
        let r: Value = serde_json::from_slice(&stdout).unwrap();
        assert_eq!(
            (r["note"].as_str(), r["stopped"].as_i64()),
            (Some("cancelled"), Some(1)),
            "{r}"
        );
        assert!(agent.wait_gone(std::time::Duration::from_secs(5)));
        said.push(stderr);
    }
    assert!(
        said[0].contains(&"waiting up to 1 s for agent pid ".to_string())
            && said[0].contains("SIGTERM"),
        "terminal: {:?}",
        said[0]
    );
    assert!(!said[1].contains("waiting"), "pipe: {:?}", said[1]);
}
