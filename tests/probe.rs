//! What an adversarial probe broke (issue 13), each finding as a test against real
//! components: git repositories nested in other repositories, HTTP stubs that redirect or
//! answer 200 with something that is not a work item, a branch reused by a fresh pipeline,
//! lock files left by a killed git, a launcher racing reap, credentials inside URLs,
//! symlinked logs, pids that do not lead their group, and a full disk.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use httpmock::prelude::*;
use serde_json::{json, Value};

use crate::common::{alive, Agent, Env, GitRepo};
use crate::event::{api, fixture_json, issue_id, set_project, with_plane, PROJECT, TOKEN};
use crate::fault::{effect, outbox, row};

const GITEA_TOKEN: &str = "gitea-probe-77aa";

fn with_gitea(env: &mut Env, server: &MockServer) {
    env.set("ORCH_GITEA_URL", &server.base_url())
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_GITEA_TOKEN", GITEA_TOKEN);
}

/// Gitea's `GET /repos/{owner}/{repo}`: the repo and its default branch.
fn gitea_repo<'a>(server: &'a MockServer, repo: &str, default: &str) -> httpmock::Mock<'a> {
    let path = format!("/api/v1/repos/acme/{repo}");
    let body =
        json!({ "name": repo, "full_name": format!("acme/{repo}"), "default_branch": default });
    server.mock(move |when, then| {
        when.method(GET).path(path);
        then.status(200).json_body(body);
    })
}

// ------------------------------------------------------------------ 5: redirects

#[test]
fn a_redirected_branch_delete_is_retried_never_recorded_as_deleted() {
    let elsewhere = MockServer::start();
    let caught = elsewhere.mock(|_, then| {
        then.status(200).json_body(json!({}));
    });
    let gitea = MockServer::start();
    gitea_repo(&gitea, "orchestrator", "main");
    let moved = gitea.mock(|when, then| {
        when.method(DELETE).path_contains("/branches/");
        then.status(301)
            .header("Location", elsewhere.url("/api/v1/moved"));
    });
    let mut env = Env::new();
    with_gitea(&mut env, &gitea);
    let tid = env.make_task("PL-1", "ORCH-1", "development", None);

    let res = env.json(&["stop", &tid.to_string()]);

    moved.assert_hits(1);
    caught.assert_hits(0);
    let e = effect(&res, "delete_remote_branch");
    assert_eq!(e["status"], "pending", "a redirect is not a deletion: {e}");
    assert!(e["error"].as_str().unwrap().contains("301"), "{e}");
}

#[test]
fn a_redirected_plane_comment_is_retried_and_the_key_never_leaves_for_another_origin() {
    let elsewhere = MockServer::start();
    let caught = elsewhere.mock(|_, then| {
        then.status(200).json_body(json!({ "results": [] }));
    });
    let plane = MockServer::start();
    let redirect_post = plane.mock(|when, then| {
        when.method(POST).path_contains("/comments/");
        then.status(302)
            .header("Location", elsewhere.url("/comments/"));
    });
    let redirect_list = plane.mock(|when, then| {
        when.method(GET).path(api("issues/"));
        then.status(302).header("Location", elsewhere.url("/list"));
    });
    let mut env = Env::new();
    with_plane(&mut env, &plane);
    let tid = env.make_task(&issue_id(1), "ORCH-1", "development", None);
    set_project(&env, tid, PROJECT);
    let other = env.make_task(&issue_id(2), "ORCH-2", "development", None);
    set_project(&env, other, PROJECT);

    let res = env.json(&["stop", &tid.to_string()]);
    let e = effect(&res, "plane_comment");
    assert_eq!(
        e["status"], "pending",
        "a redirect is not a posted comment: {e}"
    );
    redirect_post.assert_hits(1);

    let r = env.json(&["reconcile"]);
    redirect_list.assert_hits(1);
    // Nothing at all reached the other origin: not the comment, not the API key.
    caught.assert_hits(0);
    assert_eq!(env.task(other).stage, "development", "{r}");
    let errors = r["plane"]["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["error"].as_str().unwrap().contains("302")),
        "{r}"
    );
    assert!(!r.to_string().contains(TOKEN));
}

// --------------------------------------- 4: a 200 that is not a work item is not "deleted"

#[test]
fn a_200_that_is_not_the_work_item_is_an_error_of_the_pass_never_a_cancel() {
    let plane = MockServer::start();
    // The listing does not show the issues: reconcile asks for each one.
    plane.mock(|when, then| {
        when.method(GET).path(api("issues/"));
        then.status(200).json_body(json!({
            "next_cursor": "1:1:0", "next_page_results": false, "results": []
        }));
    });
    // A proxy's error page as JSON, and a changed API that answers another issue.
    plane.mock(|when, then| {
        when.method(GET)
            .path(api(&format!("issues/{}/", issue_id(1))));
        then.status(200)
            .json_body(json!({ "error": "upstream unavailable", "status": 503 }));
    });
    let mut foreign = fixture_json("issue_get_expand_state.json");
    foreign["id"] = json!(issue_id(99));
    plane.mock(move |when, then| {
        when.method(GET)
            .path(api(&format!("issues/{}/", issue_id(2))));
        then.status(200).json_body(foreign);
    });
    plane.mock(|when, then| {
        when.method(GET)
            .path(api(&format!("issues/{}/", issue_id(3))));
        then.status(200).body("<html>gateway</html>");
    });
    let mut env = Env::new();
    with_plane(&mut env, &plane);
    let agent = Agent::spawn("sleep 60");
    let mut tasks = Vec::new();
    for n in 1..=3 {
        let t = env.make_task(&issue_id(n), &format!("ORCH-{n}"), "development", None);
        set_project(&env, t, PROJECT);
        tasks.push(t);
    }
    env.make_job_full(
        tasks[0],
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(4),
        1,
        2,
    );

    let r = env.json(&["reconcile"]);

    assert_eq!(r["plane"]["deleted"], 0, "{r}");
    assert_eq!(r["plane"]["errors"].as_array().unwrap().len(), 3, "{r}");
    for t in tasks {
        assert_eq!(env.task(t).stage, "development", "task {t}: {r}");
    }
    assert!(alive(agent.pid as i32), "the live agent was killed");
}

// ------------------------------------------- 12: a pid that does not lead its group

#[test]
fn a_recorded_pid_that_does_not_lead_its_group_is_signalled_alone() {
    let env = Env::new();
    let tid = env.make_task("PL-1", "ORCH-1", "development", None);
    // The group's leader is a shell; the recorded "agent" is one of its children.
    let dir = env.path().join("child.pid");
    let group = Agent::spawn(&format!(
        "sleep 60 & echo $! > '{}'; sleep 60; wait",
        dir.display()
    ));
    let child: i64 = crate::fault::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&dir).is_ok_and(|s| s.trim().parse::<i64>().is_ok())
    })
    .then(|| {
        std::fs::read_to_string(&dir)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    })
    .expect("the child's pid");
    let start = orchctl::integrations::process::stat(child).unwrap().start;
    assert_ne!(child, group.pid);
    env.make_job_full(
        tid,
        "developer",
        "running",
        Some(child),
        Some(start),
        Some(3),
        1,
        2,
    );

    let res = env.json(&["stop", &tid.to_string()]);

    assert_eq!(res["stopped"], 1, "{res}");
    assert!(
        crate::fault::wait_until(Duration::from_secs(5), || !alive(child as i32)),
        "the recorded process was not stopped"
    );
    assert!(
        alive(group.pid as i32),
        "the group's leader (not the recorded agent) was signalled"
    );
    assert!(
        group.group().len() >= 2,
        "the rest of the group was signalled"
    );
}

// ---------------------------------------------- 10: credentials inside configured URLs

#[test]
fn children_get_configured_urls_without_their_credentials() {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    repo.feature(&env, "feature/ORCH-1-x");
    let dumps = env.path().join("dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    // A git in front of the real one that writes down the environment it was given.
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real_git = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    crate::fault::script(
        &bin.join("git"),
        &format!(
            "#!/bin/sh\nenv >> '{}/git.env'\nexec {} \"$@\"\n",
            dumps.display(),
            real_git.trim()
        ),
    );
    let hook = crate::fault::script(
        &env.path().join("notify.sh"),
        &format!(
            "#!/bin/sh\nenv >> '{}/notify.env'\ncat > /dev/null\n",
            dumps.display()
        ),
    );
    let path = format!("{}:{}", bin.display(), env.var("PATH").unwrap());
    env.set("PATH", &path)
        .set("ORCH_GITEA_URL", "http://bot:url-cred-gitea@127.0.0.1:9")
        .set("ORCH_GITEA_OWNER", "acme")
        .set("ORCH_PLANE_URL", "http://me:url-cred-plane@127.0.0.1:9/")
        .set("ORCH_PLANE_WORKSPACE", "acme")
        .set("ORCH_NOTIFY_CMD", hook.to_str().unwrap());
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-1",
        "--branch",
        "feature/ORCH-1-x",
        "--stage",
        "development",
    ]);
    let agent_env = dumps.join("agent.env");
    let script = format!("env > '{}'", agent_env.display());
    let claimed = env.json(&["claim", "--exec", "--", "sh", "-c", &script]);
    let _guard = crate::common::GroupGuard(claimed["pid"].as_i64().unwrap());
    assert!(crate::fault::wait_until(Duration::from_secs(5), || {
        agent_env.exists()
    }));
    std::thread::sleep(Duration::from_millis(50));
    env.json(&["stop", "ORCH-1"]);

    for name in ["agent.env", "git.env", "notify.env"] {
        let text = std::fs::read_to_string(dumps.join(name))
            .unwrap_or_else(|e| panic!("{name} was not written: {e}"));
        for cred in ["url-cred-gitea", "url-cred-plane", "bot:", "me:"] {
            assert!(!text.contains(cred), "{name} holds {cred}:\n{text}");
        }
        assert!(
            text.contains("ORCH_GITEA_URL=http://127.0.0.1:9"),
            "{name}:\n{text}"
        );
    }
}

// ------------------------------------------------------------ 11: symlinked job logs

#[test]
fn a_job_log_is_never_opened_through_a_link_nor_in_a_folder_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        "ORCH-1",
        "--stage",
        "development",
    ]);
    let victim = env.path().join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::create_dir_all(&env.logs).unwrap();
    // Run ids are predictable: the first claim is job 1, run 1.
    std::os::unix::fs::symlink(&victim, env.logs.join("job-1-run-1.log")).unwrap();

    let (code, out, err) = env.run(&[
        "claim",
        "--exec",
        "--",
        "sh",
        "-c",
        "echo written-by-the-agent",
    ]);

    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("symbolic link"), "{err}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // The attempt was given back: the job waits in the queue.
    assert_eq!(env.job_status(1), "queued");

    // A log folder anyone can write is refused before any file is opened in it.
    std::fs::remove_file(env.logs.join("job-1-run-1.log")).unwrap();
    std::fs::set_permissions(&env.logs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = env.run(&["claim", "--exec", "--", "sh", "-c", "echo hi"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("others can write"), "{err}");
    assert_eq!(std::fs::read_dir(&env.logs).unwrap().count(), 0);
}

#[allow(dead_code)]
fn unused(_: &Path, _: Command, _: Value) {
    let _ = (outbox, row);
}
