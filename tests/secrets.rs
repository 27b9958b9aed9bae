//! Secrets (issue 7, SPEC §6 "Tokens and secrets never appear in output, logs or errors"):
//! a full scenario with recognisable token values — task add, claim --exec, a STOP whose
//! Gitea call fails then succeeds on reconcile, a Plane comment, the notify hook, a git
//! that fails and prints the tokens, queue, task show/log, error paths — then every output,
//! every log file, every child's environment and the whole database are searched for them.

use std::path::Path;
use std::time::Duration;

use httpmock::prelude::*;

use crate::common::{Env, GitRepo, GroupGuard};
use crate::fault::{dump, outbox, row, script, wait_until};

const GITEA_TOKEN: &str = "gitea-SECRET-7f3a9c41";
const PLANE_TOKEN: &str = "plane-SECRET-51be02d7";
const WEBHOOK_SECRET: &str = "webhook-SECRET-c0ffee99";
const TOKENS: [&str; 3] = [GITEA_TOKEN, PLANE_TOKEN, WEBHOOK_SECRET];

/// Every stdout and stderr of the scenario.
struct Seen {
    text: String,
}

impl Seen {
    fn run(&mut self, env: &Env, args: &[&str]) -> (i32, String, String) {
        let (code, out, err) = env.run(args);
        // Outputs only: a few commands are given a token as an argument on purpose.
        self.text.push_str(&format!(
            "$ orchctl #{} -> {code}\n{out}\n{err}\n",
            args.len()
        ));
        (code, out, err)
    }

    fn json(&mut self, env: &Env, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.run(env, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap()
    }
}

fn assert_clean(what: &str, text: &str) {
    for t in TOKENS {
        assert!(!text.contains(t), "{what} contains the secret {t}:\n{text}");
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn no_token_reaches_any_output_log_child_environment_or_database_row() {
    let gitea = MockServer::start();
    let plane = MockServer::start();
    // A misbehaving server that echoes the credentials it was sent.
    let mut failing = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(500).body(format!(
            "internal error; Authorization: token {GITEA_TOKEN}"
        ));
    });
    let comment = plane.mock(|when, then| {
        when.method(POST)
            .path_contains("/comments/")
            .header("X-Api-Key", PLANE_TOKEN);
        then.status(201);
    });
    let mut env = Env::new();
    let notify_dump = env.path().join("notify-dump.txt");
    let hook = script(
        &env.path().join("notify.sh"),
        &format!(
            "#!/bin/sh\nenv >> '{d}'\ncat >> '{d}'\nprintf '%s\\n' \"$@\" >> '{d}'\n",
            d = notify_dump.display()
        ),
    );
    env.set("ORCH_GITEA_URL", &gitea.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_GITEA_TOKEN", GITEA_TOKEN)
        .set("ORCH_PLANE_URL", &plane.base_url())
        .set("ORCH_PLANE_WORKSPACE", "acme")
        .set("ORCH_PLANE_API_TOKEN", PLANE_TOKEN)
        .set("ORCH_PLANE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .set("ORCH_NOTIFY_CMD", hook.to_str().unwrap());
    let repo = GitRepo::new(&env, "orchestrator");
    repo.feature(&env, "feature/ORCH-1-sec");
    repo.feature(&env, "feature/ORCH-2-sec");
    // A git that fails and prints the tokens (think of a credential helper gone wrong):
    // its stderr reaches orchctl's error text, which must be scrubbed.
    let git_env_dump = env.path().join("git-hook-env.txt");
    script(
        &repo.clone.join(".git/hooks/pre-push"),
        &format!(
            "#!/bin/sh\nenv > '{}'\necho \"auth failed: {GITEA_TOKEN} {PLANE_TOKEN} {WEBHOOK_SECRET}\" >&2\nexit 1\n",
            git_env_dump.display()
        ),
    );
    let mut seen = Seen {
        text: String::new(),
    };

    let a = seen.json(
        &env,
        &[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            "ORCH-1",
            "--plane-id",
            "PL-1",
            "--project-id",
            "proj-1",
            "--branch",
            "feature/ORCH-1-sec",
            "--stage",
            "development",
        ],
    )["task"]["id"]
        .as_i64()
        .unwrap();
    // The agent prints its whole environment and tries the secret variables by name.
    let claimed = seen.json(
        &env,
        &[
            "claim",
            "--exec",
            "--",
            "sh",
            "-c",
            "env; echo \"G=$ORCH_GITEA_TOKEN P=$ORCH_PLANE_API_TOKEN W=$ORCH_PLANE_WEBHOOK_SECRET\"; sleep 60",
        ],
    );
    let _agent = GroupGuard(claimed["pid"].as_i64().unwrap());
    let job_log = claimed["log"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&job_log)
            .unwrap_or_default()
            .contains("G=")
    }));

    let stopped = seen.json(&env, &["stop", "ORCH-1", "--reason", "operator stop"]);
    assert_eq!(stopped["stopped"], 1);
    failing.assert_hits(1);
    assert_eq!(row(&outbox(&env), "delete_remote_branch").status, "pending");
    seen.json(&env, &["queue"]);
    seen.run(&env, &["--format", "text", "queue"]);

    // Gitea recovers: reconcile finishes the deletion.
    failing.delete();
    let ok = gitea.mock(|when, then| {
        when.method(DELETE)
            .header("Authorization", format!("token {GITEA_TOKEN}"));
        then.status(204);
    });
    let r = seen.json(&env, &["reconcile"]);
    assert_eq!(r["outbox"]["done"], 1, "{r}");
    ok.assert_hits(1);
    comment.assert_hits(1);

    // Without Gitea the branch goes through `git push --delete`, which fails loudly.
    let b = seen.json(
        &env,
        &[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            "ORCH-2",
            "--branch",
            "feature/ORCH-2-sec",
        ],
    )["task"]["id"]
        .as_i64()
        .unwrap();
    env.unset("ORCH_GITEA_URL");
    let res = seen.json(&env, &["stop", &b.to_string()]);
    let pushed = res["effects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "delete_remote_branch")
        .unwrap()
        .clone();
    assert_eq!(pushed["status"], "pending", "{pushed}");
    assert!(
        pushed["error"]
            .as_str()
            .unwrap()
            .contains("auth failed: ***"),
        "git's stderr carried the tokens and was scrubbed: {pushed}"
    );
    seen.json(&env, &["reconcile"]);
    env.set("ORCH_GITEA_URL", &gitea.base_url());

    for t in [a.to_string(), b.to_string()] {
        seen.json(&env, &["task", "show", &t]);
        seen.json(&env, &["task", "log", &t]);
        seen.run(&env, &["--format", "text", "task", "log", &t]);
        seen.run(&env, &["--format", "text", "task", "show", &t]);
    }
    seen.json(&env, &["task", "list"]);
    seen.json(&env, &["reap"]);
    seen.json(&env, &["queue"]);
    // Error paths, including an operator pasting a token where a task id belongs.
    assert_eq!(seen.run(&env, &["task", "show", GITEA_TOKEN]).0, 1);
    assert_eq!(seen.run(&env, &["stop", PLANE_TOKEN]).0, 0);
    assert_eq!(seen.run(&env, &["claim", "--repo", "../x"]).0, 65);
    assert_eq!(seen.run(&env, &["task", "show", "1", GITEA_TOKEN]).0, 2);
    env.unset("ORCH_GITEA_OWNER");
    assert_eq!(seen.run(&env, &["queue"]).0, 78);
    env.set("ORCH_GITEA_OWNER", "acme")
        .unset("ORCH_PLANE_WORKSPACE");
    assert_eq!(seen.run(&env, &["stop", "1"]).0, 78);
    env.set("ORCH_PLANE_WORKSPACE", "acme");

    assert_clean("the commands' output", &seen.text);
    // The tokens were used where they belong (the stubs matched on them)...
    comment.assert_hits(1);
    // ...and nowhere else: not in any child's environment,
    let agent_log = std::fs::read_to_string(&job_log).unwrap();
    assert!(
        agent_log.contains("ORCH_JOB_ID="),
        "the agent dumped its env"
    );
    assert!(agent_log.contains("G= P= W="), "{agent_log}");
    let notify = std::fs::read_to_string(&notify_dump).unwrap();
    assert!(notify.contains("task_cancelled"));
    assert_clean("the notify hook's environment and input", &notify);
    let git_env = std::fs::read_to_string(&git_env_dump).unwrap();
    assert!(git_env.contains("PATH="));
    assert_clean("git's environment", &git_env);
    // not in any log file,
    for f in files_under(&env.logs) {
        assert_clean(
            &f.display().to_string(),
            &String::from_utf8_lossy(&std::fs::read(&f).unwrap()),
        );
    }
    // not in any database row (outbox included), nor anywhere in the file.
    assert!(!outbox(&env).is_empty());
    assert_clean("the database dump", &dump(&env));
    if !env.is_postgres() {
        assert_clean(
            "the database file",
            &String::from_utf8_lossy(&std::fs::read(&env.db).unwrap()),
        );
    }
}

#[test]
fn credentials_inside_a_configured_url_stay_out_of_error_texts() {
    let mut env = Env::new();
    let port = crate::fault::closed_port();
    env.set(
        "ORCH_GITEA_URL",
        &format!("http://bot:url-SECRET-1234@127.0.0.1:{port}"),
    )
    .set("ORCH_GITEA_OWNER", "acme");
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-1",
    ]);
    let (code, out, err) = env.run(&["stop", "ORCH-1"]);
    assert_eq!(code, 0, "{err}");
    let rows = outbox(&env);
    let e = row(&rows, "delete_remote_branch");
    assert_eq!(e.status, "pending");
    let error = e.last_error.clone().unwrap();
    assert!(
        error.contains(&format!("http://127.0.0.1:{port}/api/v1/")),
        "{error}"
    );
    for text in [out, err, error, dump(&env)] {
        assert!(!text.contains("url-SECRET-1234"), "{text}");
    }
}
