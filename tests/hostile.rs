//! Hostile input (issue 7, SPEC §4 names, §9 exit codes): property tests for name
//! validation against git's own ref rules, arbitrary command-line and environment values
//! (the right exit code, never a panic, the database byte-for-byte unchanged on refusal),
//! NUL bytes, shell metacharacters that must never reach a shell, SQL-looking strings.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path};
use std::process::Command;

use httpmock::prelude::*;
use proptest::prelude::*;
use serde_json::Value;

use crate::common::{Env, GitRepo, GroupGuard};
use crate::fault::{assert_unchanged, effect, lines, script, snapshot, wait_until};
use orchctl::error::{exit_kind, ExitKind};
use orchctl::names;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrunk failures are printed; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Pieces that exercise every rule of git's ref format and of the repo name pattern.
fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a", "Z", "9", "x", "ORCH-1", "feature/", "/", "//", ".", "..", ".lock", "-", "_", "@",
        "@{", "{", "}", "~", "^", ":", "?", "*", "[", "]", "\\", " ", "\t", "\n", "\u{1}",
        "\u{7f}", "é", "日本", "HEAD", "#", "'", "\"", "$", "(", ")", ";", "`", "|", "&", "%", "+",
        "=", ",", "!", "<", ">",
    ])
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..10).prop_map(|v| v.concat())
}

/// Names that are mostly legal (shell and quote characters included), so that the
/// accepting paths are exercised as often as the refusing ones.
fn mostly_legal() -> impl Strategy<Value = String> {
    let legal = prop::sample::select(vec![
        "a", "Z", "9", "x", "ORCH-1", "feature/", "-", "_", ".", "é", "$", "(", ")", ";", "`", "'",
        "\"", "|", "&", "%", "=", "!", "<", ">",
    ]);
    prop_oneof![
        3 => prop::collection::vec(legal, 1..8).prop_map(|v| format!("w{}", v.concat())),
        1 => name(),
    ]
}

fn repo_name() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[A-Za-z0-9._-]{1,16}", 1 => name()]
}

/// Git's verdict on a branch name (`git check-ref-format --branch`, outside any repo).
fn git_accepts_branch(name: &str) -> bool {
    Command::new("git")
        .args(["check-ref-format", "--branch", name])
        .current_dir("/")
        .env("GIT_CEILING_DIRECTORIES", "/")
        .output()
        .unwrap()
        .status
        .success()
}

/// SPEC §4: `[A-Za-z0-9._-]+`, not `.` or `..` (and orchctl caps it at 200 bytes).
fn spec_repo_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The branch rule orchctl promises: whatever git accepts, except `@` (git reads it as
/// HEAD's branch) and names over 255 bytes.
fn spec_branch_ok(s: &str) -> bool {
    s != "@" && s.len() <= 255 && !s.contains('\0') && git_accepts_branch(s)
}

fn spec_work_item_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.contains('#')
        && s.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn branch_validation_agrees_with_git_check_ref_format(s in name()) {
        prop_assert_eq!(
            names::branch_problem(&s).is_none(),
            spec_branch_ok(&s),
            "orchctl and git disagree on {:?}", s
        );
    }

    #[test]
    fn an_accepted_repo_name_joins_as_exactly_one_folder(s in name()) {
        let ok = names::validate_repo(&s).is_ok();
        prop_assert_eq!(ok, spec_repo_ok(&s), "{:?}", s);
        if ok {
            let joined = Path::new("/repos").join(&s);
            let parts: Vec<Component> = joined.components().collect();
            prop_assert_eq!(parts.len(), 3, "{:?} escapes its folder", s);
            prop_assert!(matches!(parts[2], Component::Normal(_)), "{:?}", s);
        }
    }

    #[test]
    fn validators_never_panic_and_refuse_with_exit_65(s in any::<String>()) {
        for r in [
            names::validate_repo(&s),
            names::validate_branch(&s),
            names::validate_work_item(&s),
        ] {
            if let Err(e) = r {
                prop_assert_eq!(exit_kind(&e), ExitKind::DataErr);
                prop_assert_eq!(format!("{e:#}").lines().count(), 1);
            }
        }
        let slug = names::slug(&s);
        prop_assert!(slug.len() <= 40 && !slug.ends_with('-'));
        prop_assert!(slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn task_add_with_arbitrary_names_exits_0_or_65_and_refusals_write_nothing(
        repo in repo_name(),
        work_item in mostly_legal(),
        branch in mostly_legal(),
        title in any::<String>().prop_map(|s| s.replace('\0', "")),
    ) {
        let env = Env::new();
        env.json(&["migrate"]);
        let before = snapshot(&env);
        let (code, stdout, stderr) = env.run(&[
            "task",
            "add",
            &format!("--repo={repo}"),
            &format!("--work-item={work_item}"),
            &format!("--branch={branch}"),
            &format!("--title={title}"),
        ]);
        let want_ok = spec_repo_ok(&repo) && spec_work_item_ok(&work_item) && spec_branch_ok(&branch);
        if want_ok {
            prop_assert_eq!(code, 0, "{}", stderr);
            let added: Value = serde_json::from_str(&stdout).unwrap();
            let id = added["task"]["id"].to_string();
            let shown = env.json(&["task", "show", &id]);
            // Stored verbatim: no trimming, escaping or interpretation.
            prop_assert_eq!(shown["task"]["repo"].as_str(), Some(repo.as_str()));
            prop_assert_eq!(shown["task"]["branch"].as_str(), Some(branch.as_str()));
            prop_assert_eq!(shown["task"]["title"].as_str(), Some(title.as_str()));
            prop_assert_eq!(shown["task"]["work_item_id"].as_str(), Some(work_item.as_str()));
        } else {
            prop_assert_eq!(code, 65, "repo {:?} wi {:?} branch {:?}: {}", repo, work_item, branch, stderr);
            prop_assert!(stdout.is_empty());
            prop_assert!(stderr.starts_with("orchctl: "), "{}", stderr);
            prop_assert_eq!(stderr.lines().count(), 1, "{}", stderr);
            assert_unchanged(&env, &before, "refused task add");
        }
    }

    #[test]
    fn references_repos_and_agents_from_outside_never_change_the_database(
        reference in name(),
        repo in name(),
        agent in name(),
    ) {
        let env = Env::new();
        env.json(&["task", "add", "--repo", "orchestrator", "--work-item", "ORCH-1", "--plane-id", "PL-1"]);
        let before = snapshot(&env);
        let trimmed = reference.trim();
        let resolves = trimmed.parse::<i64>() == Ok(1) || trimmed == "ORCH-1" || trimmed == "PL-1";
        if !resolves {
            let (code, stdout, stderr) = env.run(&["stop", "--", &reference]);
            prop_assert_eq!(code, 0, "{}", stderr);
            let res: Value = serde_json::from_str(&stdout).unwrap();
            prop_assert_eq!(res["note"].as_str(), Some("no-task"));
            prop_assert_eq!(stderr.lines().count(), 1, "{}", stderr);
            let (code, _, stderr) = env.run(&["task", "show", "--", &reference]);
            prop_assert_eq!(code, 1, "{}", stderr);
            let (code, _, stderr) = env.run(&["deploy-begin", "--", &reference]);
            prop_assert_eq!(code, 1, "{}", stderr);
        }
        if repo != "orchestrator" {
            let (code, _, stderr) = env.run(&["claim", &format!("--repo={repo}")]);
            prop_assert_eq!(code, if spec_repo_ok(&repo) { 3 } else { 65 }, "{:?}: {}", repo, stderr);
        }
        // `--agent` takes a comma-separated list of agent names (SPEC §11: anything else
        // is a usage error listing them).
        let agents: Vec<&str> = agent.split(',').collect();
        if !agents.contains(&"analyst") {
            let known = orchctl::cli::agent_names();
            let ok = agents.iter().all(|a| known.contains(a));
            let (code, _, stderr) = env.run(&["claim", &format!("--agent={agent}")]);
            prop_assert_eq!(code, if ok { 3 } else { 2 }, "{:?}: {}", agent, stderr);
        }
        assert_unchanged(&env, &before, "lookups with outside input");
    }

    #[test]
    fn arbitrary_configuration_values_are_accepted_or_refused_with_78_never_a_panic(
        var in prop::sample::select(vec![
            "ORCH_STOP_GRACE_SECS", "ORCH_HTTP_TIMEOUT_SECS", "ORCH_GIT_TIMEOUT_SECS",
            "ORCH_BUSY_TIMEOUT_MS", "ORCH_OUTBOX_MAX_ATTEMPTS", "ORCH_OUTBOX_BACKOFF_SECS",
            "ORCH_CLAIM_TIMEOUT_SECS", "ORCH_STOP_ENABLED", "ORCH_SERIAL_GATE", "ORCH_TASK_DEPS",
            "ORCH_NOTIFY_CMD", "ORCH_REPO_MAP", "ORCH_PROJECT_IDENTIFIERS", "ORCH_PROTECTED_BRANCHES",
            "ORCH_STOP_REPOS", "ORCH_GITEA_URL", "ORCH_PLANE_URL",
        ]),
        value in prop_oneof![
            "[0-9eE.+-]{1,24}",
            Just("1e20".to_string()),
            Just("18446744073709551616".to_string()),
            Just("NaN".to_string()),
            any::<String>().prop_map(|s| s.replace('\0', "")),
        ],
    ) {
        let mut env = Env::new();
        env.json(&["task", "add", "--repo", "orchestrator", "--work-item", "ORCH-1"]);
        env.set(var, &value);
        let (code, _, stderr) = env.run(&["stop", "ORCH-1"]);
        prop_assert!(code == 0 || code == 78, "{}={:?}: exit {} {}", var, value, code, stderr);
        if code == 78 {
            prop_assert!(stderr.starts_with("orchctl: "), "{}", stderr);
            prop_assert_eq!(stderr.lines().count(), 1, "{}", stderr);
        }
    }
}

#[test]
fn names_git_refuses_are_refused_and_slashes_inside_a_branch_stay_legal() {
    for bad in [
        "..", "a..b", "-x", "--force", "@{", "a@{1}", "a\u{1}b", "a\tb", "a\u{7f}", "HEAD",
        "a.lock", "x/a.lock", ".x", "x/.y", "x/", "/x", "x//y", "a~1", "a^", "a:b", "a?", "a*",
        "a[b", "a\\b", "a b", "a.", "",
    ] {
        assert!(!git_accepts_branch(bad), "git accepts {bad:?}");
        let e = names::validate_branch(bad).unwrap_err();
        assert_eq!(exit_kind(&e), ExitKind::DataErr, "{bad:?}");
    }
    for good in [
        "feature/ORCH-1-x",
        "feature/a/b/c",
        "fix/über",
        "$(x)",
        "a;b",
        "a`b`",
        "x'y\"z",
    ] {
        assert!(git_accepts_branch(good), "git refuses {good:?}");
        assert!(names::validate_branch(good).is_ok(), "{good:?}");
    }
    for bad in [
        "", ".", "..", "a/b", "../x", "x/..", "a b", "a;b", "$(id)", "a\nb", "é",
    ] {
        assert!(names::validate_repo(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn huge_durations_are_configuration_errors_at_the_command_line() {
    let mut env = Env::new();
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-1",
    ]);
    let before = snapshot(&env);
    for (var, value) in [
        ("ORCH_STOP_GRACE_SECS", "1e20"),
        ("ORCH_STOP_GRACE_SECS", "1e18"),
        ("ORCH_HTTP_TIMEOUT_SECS", "1e300"),
        ("ORCH_BUSY_TIMEOUT_MS", "3000000000"),
    ] {
        env.set(var, value);
        let (code, _, stderr) = env.run(&["stop", "ORCH-1"]);
        assert_eq!(code, 78, "{var}={value}: {stderr}");
        env.unset(var);
    }
    assert_unchanged(&env, &before, "refused configuration");
}

#[test]
fn nul_bytes_cannot_pass_argv_and_the_library_refuses_them() {
    let env = Env::new();
    env.json(&["migrate"]);
    // The OS refuses an argument with a NUL: it can never reach orchctl from a command line.
    let err = env.cmd().args(["stop", "ORCH\0-1"]).output().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    // Library callers (and a future intake) can pass one: every validator refuses it.
    assert!(names::validate_branch("feature/a\0b").is_err());
    assert!(names::validate_repo("orch\0estrator").is_err());
    assert!(names::validate_work_item("ORCH\0-1").is_err());
    let before = snapshot(&env);
    let ctx = env.ctx();
    for add in [
        orchctl::tasks::AddTask {
            repo: "orchestrator".into(),
            work_item: "ORCH-1".into(),
            branch: Some("feature/x\0y".into()),
            ..Default::default()
        },
        orchctl::tasks::AddTask {
            repo: "orch\0".into(),
            work_item: "ORCH-1".into(),
            ..Default::default()
        },
        orchctl::tasks::AddTask {
            repo: "orchestrator".into(),
            work_item: "ORCH\0-1".into(),
            ..Default::default()
        },
        orchctl::tasks::AddTask {
            repo: "orchestrator".into(),
            work_item: "ORCH-1".into(),
            plane_id: Some("PL\0".into()),
            ..Default::default()
        },
    ] {
        let e = orchctl::tasks::add(&ctx, &add).unwrap_err();
        assert_eq!(exit_kind(&e), ExitKind::DataErr, "{add:?}: {e:#}");
    }
    let r = orchctl::stop::stop(
        &ctx,
        "1\0",
        &orchctl::stop::StopOptions::operator(None, false),
    )
    .unwrap();
    assert_eq!(r.note, "no-task");
    drop(ctx);
    assert_unchanged(&env, &before, "NUL input");
}

#[test]
fn arguments_that_are_not_utf8_are_a_usage_error_not_a_panic() {
    let env = Env::new();
    env.json(&["migrate"]);
    let before = snapshot(&env);
    for args in [
        vec![
            OsString::from("stop"),
            OsString::from_vec(vec![0x4f, 0xff, 0xfe]),
        ],
        vec![
            OsString::from("task"),
            OsString::from("add"),
            OsString::from("--repo"),
            OsString::from_vec(vec![0xc3, 0x28]),
            OsString::from("--work-item"),
            OsString::from("ORCH-1"),
        ],
    ] {
        let out = env.cmd().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert_unchanged(&env, &before, "non-UTF-8 arguments");
}

#[test]
fn shell_metacharacters_in_names_titles_reasons_and_hooks_never_reach_a_shell() {
    let plane = MockServer::start();
    let comment = plane.mock(|when, then| {
        when.method(POST);
        then.status(201);
    });
    let mut env = Env::new();
    let pwned = env.path().join("pwned");
    let p = pwned.display().to_string();
    // Legal under git's ref rules: no space, no `..`, no `@{`; `$ ( ) ` ; | &` are allowed.
    let branch = format!("feature/$(touch${{IFS}}{p})`touch${{IFS}}{p}`;touch${{IFS}}{p}|x&y");
    assert!(names::branch_problem(&branch).is_none(), "{branch}");
    let work_item = format!("ORCH-$(touch${{IFS}}{p});`id`");
    let title = format!("$(touch {p}) `touch {p}`; touch {p} && touch {p} | touch {p}");
    let reason = format!("'; touch {p}; echo \"$(touch {p})\" `touch {p}` #");
    let notify_log = env.path().join("notify.log");
    let args_log = env.path().join("notify-args.log");
    let hook = script(
        &env.path().join("hook.sh"),
        &format!(
            "#!/bin/sh\ncat >> '{}'\necho >> '{}'\nprintf '%s\\n' \"$@\" >> '{}'\n",
            notify_log.display(),
            notify_log.display(),
            args_log.display()
        ),
    );
    // shlex splits this into words; a shell would run `touch`.
    env.set(
        "ORCH_NOTIFY_CMD",
        &format!(
            "{} arg; touch {p} && touch {p} $(touch {p})",
            hook.display()
        ),
    )
    .set("ORCH_PLANE_URL", &plane.base_url())
    .set("ORCH_PLANE_WORKSPACE", "acme");
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, &branch);
    let added = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        &format!("--work-item={work_item}"),
        &format!("--branch={branch}"),
        &format!("--title={title}"),
        "--plane-id",
        "PL-1",
        "--project-id",
        "proj-1",
        "--stage",
        "development",
    ]);
    let tid = added["task"]["id"].as_i64().unwrap();
    // The agent gets the names as environment values, not as shell text.
    let claimed = env.json(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "printf '%s\\n' \"$ORCH_BRANCH\" \"$ORCH_WORK_ITEM\"; sleep 60",
    ]);
    let _agent = GroupGuard(claimed["pid"].as_i64().unwrap());
    let log = claimed["log"].as_str().unwrap().to_string();
    assert!(wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            >= 2
    }));

    let res = env.json(&["stop", &tid.to_string(), &format!("--reason={reason}")]);

    assert_eq!(res["note"], "cancelled");
    assert_eq!(res["stopped"], 1);
    for kind in [
        "remove_worktree",
        "delete_remote_branch",
        "plane_comment",
        "notify",
    ] {
        assert_eq!(effect(&res, kind)["status"], "done", "{res}");
    }
    assert!(!pwned.exists(), "a shell ran something");
    // The exact names reached git as arguments: the worktree and both branches are gone.
    assert!(!wt.exists());
    assert!(!repo.local_branches().contains("touch"));
    assert!(!repo.remote_branches().contains("touch"));
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .take(2)
            .collect::<Vec<_>>(),
        vec![branch.as_str(), work_item.as_str()]
    );
    let events = lines(&notify_log);
    assert_eq!(events.len(), 1);
    let ev: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(ev["reason"], reason);
    assert_eq!(ev["branch"], branch);
    assert_eq!(ev["work_item_id"], work_item);
    assert_eq!(
        lines(&args_log),
        vec![
            "arg;".to_string(),
            "touch".into(),
            p.clone(),
            "&&".into(),
            "touch".into(),
            p.clone(),
            "$(touch".into(),
            format!("{p})")
        ]
    );
    comment.assert_hits(1);
    assert_eq!(
        env.json(&["task", "show", &tid.to_string()])["task"]["cancel_reason"],
        reason
    );

    // Through the Gitea API the branch is one percent-encoded path, not shell text either.
    let gitea = MockServer::start();
    let delete = gitea.mock(|when, then| {
        when.method(DELETE)
            .path_contains("/api/v1/repos/acme/orchestrator/branches/feature/")
            .path_contains("%24%28touch%24%7BIFS%7D");
        then.status(204);
    });
    env.set("ORCH_GITEA_URL", &gitea.base_url())
        .set("ORCH_GITEA_OWNER", "acme");
    let b2 = format!("feature/x;touch${{IFS}}{p}`touch${{IFS}}{p}`$(touch${{IFS}}{p})");
    let t2 = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-2",
        &format!("--branch={b2}"),
    ])["task"]["id"]
        .as_i64()
        .unwrap();
    let res = env.json(&["stop", &t2.to_string(), &format!("--reason={reason}")]);
    assert_eq!(
        effect(&res, "delete_remote_branch")["status"],
        "done",
        "{res}"
    );
    delete.assert_hits(1);
    assert!(!pwned.exists(), "a shell ran something");
}

#[test]
fn sql_looking_strings_are_stored_verbatim_and_match_only_themselves() {
    let env = Env::new();
    let bystander = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-7",
        "--plane-id",
        "PL-7",
    ])["task"]["id"]
        .as_i64()
        .unwrap();
    let title = "'); DROP TABLE tasks; --";
    let work_item = "ORCH-8';DELETE-FROM-jobs;--";
    let plane_id = "PL-8' OR '1'='1";
    let reason = "x'); DELETE FROM jobs; UPDATE tasks SET stage='done'; --";
    let added = env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        &format!("--work-item={work_item}"),
        &format!("--plane-id={plane_id}"),
        &format!("--title={title}"),
    ]);
    let tid = added["task"]["id"].as_i64().unwrap();
    let shown = env.json(&["task", "show", plane_id]);
    assert_eq!(shown["task"]["id"].as_i64(), Some(tid));
    assert_eq!(shown["task"]["title"], title);
    assert_eq!(shown["task"]["work_item_id"], work_item);
    // A lookup by a quote-laden key finds that task only.
    let (code, _, _) = env.run(&["task", "show", "PL-7' OR '1'='1"]);
    assert_eq!(code, 1);

    let res = env.json(&["stop", plane_id, &format!("--reason={reason}")]);
    assert_eq!(res["task"]["id"].as_i64(), Some(tid));
    assert_eq!(res["task"]["cancel_reason"], reason);
    assert_eq!(
        res["task"]["work_item_id"],
        format!("{work_item}#cancelled-{tid}")
    );
    assert_eq!(env.task(bystander).stage, "analysis");
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 2);
    assert_eq!(env.count("SELECT count(*) FROM jobs"), 2);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'queued'"),
        1,
        "the bystander's job is untouched"
    );
    let log = env.json(&["task", "log", &tid.to_string()]);
    assert!(log["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "cancelled" && e["detail"]["reason"] == reason));
}
