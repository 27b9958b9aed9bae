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
    let body = json!({ "name": repo, "full_name": format!("acme/{repo}"), "default_branch": default });
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
    assert_eq!(e["status"], "pending", "a redirect is not a posted comment: {e}");
    redirect_post.assert_hits(1);

    let r = env.json(&["reconcile"]);
    redirect_list.assert_hits(1);
    // Nothing at all reached the other origin: not the comment, not the API key.
    caught.assert_hits(0);
    assert_eq!(env.task(other).stage, "development", "{r}");
    let errors = r["plane"]["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["error"].as_str().unwrap().contains("302")),
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
        when.method(GET).path(api(&format!("issues/{}/", issue_id(1))));
        then.status(200)
            .json_body(json!({ "error": "upstream unavailable", "status": 503 }));
    });
    let mut foreign = fixture_json("issue_get_expand_state.json");
    foreign["id"] = json!(issue_id(99));
    plane.mock(move |when, then| {
        when.method(GET).path(api(&format!("issues/{}/", issue_id(2))));
        then.status(200).json_body(foreign);
    });
    plane.mock(|when, then| {
        when.method(GET).path(api(&format!("issues/{}/", issue_id(3))));
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
    .then(|| std::fs::read_to_string(&dir).unwrap().trim().parse().unwrap())
    .expect("the child's pid");
    let start = orchctl::integrations::process::stat(child).unwrap().start;
    assert_ne!(child, group.pid);
    env.make_job_full(tid, "developer", "running", Some(child), Some(start), Some(3), 1, 2);

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
    assert!(group.group().len() >= 2, "the rest of the group was signalled");
}

#[allow(dead_code)]
fn unused(_: &Path, _: Command, _: Value) {
    let _ = (outbox, row);
}
