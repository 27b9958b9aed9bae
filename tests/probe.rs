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
use crate::fault::{effect, outbox};

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

// ------------------------------------------------------------------ git helpers

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn remote_sha(repo: &GitRepo, branch: &str) -> Option<String> {
    let out = git(
        &repo.bare,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            &format!("refs/heads/{branch}"),
        ],
    );
    (!out.is_empty()).then_some(out)
}

fn add_task(env: &Env, work_item: &str, branch: &str) -> i64 {
    env.json(&[
        "task",
        "add",
        "--repo",
        "orchestrator",
        "--work-item",
        work_item,
        "--branch",
        branch,
        "--stage",
        "development",
    ])["task"]["id"]
        .as_i64()
        .unwrap()
}

// ------------------------------------- 2: git walking up into another repository

#[test]
fn a_broken_clone_inside_another_repository_is_refused_and_that_repository_untouched() {
    let mut env = Env::new();
    // An operator's repository that happens to contain ORCH_REPOS_DIR, with a worktree of
    // its own on the branch name the task uses, pushed to its origin.
    let outer = GitRepo::new(&env, "outer");
    let outer_wt = outer.feature(&env, "feature/ORCH-1-x");
    let repos = outer.clone.join("state/repos");
    // An interrupted clone: the folder and an empty .git.
    std::fs::create_dir_all(repos.join("orchestrator/.git")).unwrap();
    // And a folder that never was a clone.
    std::fs::create_dir_all(repos.join("plain")).unwrap();
    env.set("ORCH_REPOS_DIR", repos.to_str().unwrap());
    let tid = add_task(&env, "ORCH-1", "feature/ORCH-1-x");
    let plain = env.json(&[
        "task",
        "add",
        "--repo",
        "plain",
        "--work-item",
        "ORCH-2",
        "--branch",
        "feature/ORCH-1-x",
    ])["task"]["id"]
        .as_i64()
        .unwrap();

    for t in [tid, plain] {
        let res = env.json(&["stop", &t.to_string()]);
        for kind in ["remove_worktree", "delete_remote_branch"] {
            let e = effect(&res, kind);
            assert_eq!(e["status"], "failed", "{kind}: {e}");
            assert!(
                e["error"]
                    .as_str()
                    .unwrap()
                    .contains("is not a git clone of its own"),
                "{e}"
            );
        }
    }

    assert!(
        outer_wt.join("work.txt").exists(),
        "the outer worktree was removed"
    );
    assert!(outer.worktree_list().contains("feature/ORCH-1-x"));
    assert!(outer.local_branches().contains("feature/ORCH-1-x"));
    assert!(outer.remote_branches().contains("feature/ORCH-1-x"));
}

// ----------------------------------- 3: the default branch when there is no clone

#[test]
fn without_a_clone_gitea_is_asked_for_the_default_branch_before_any_delete() {
    let gitea = MockServer::start();
    let repo = gitea_repo(&gitea, "orchestrator", "trunk");
    let delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let down = gitea.mock(|when, then| {
        when.method(GET).path("/api/v1/repos/acme/elsewhere");
        then.status(503);
    });
    let mut env = Env::new();
    with_gitea(&mut env, &gitea);
    let trunk = env.make_task("PL-1", "ORCH-1", "development", Some("trunk"));
    let unknown = env.make_task_in("PL-2", "ORCH-2", "development", "elsewhere", Some("trunk"));

    let res = env.json(&["stop", &trunk.to_string()]);
    let e = effect(&res, "delete_remote_branch");
    assert_eq!(e["status"], "failed", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("trunk is the default branch of orchestrator"),
        "{e}"
    );
    repo.assert_hits(1);

    // Gitea cannot say: the deletion waits, it is never sent on a guess.
    let res = env.json(&["stop", &unknown.to_string()]);
    let e = effect(&res, "delete_remote_branch");
    assert_eq!(e["status"], "pending", "{e}");
    down.assert_hits(1);
    delete.assert_hits(0);
}

// -------------------------- issue 12: a deletion that cannot even be attempted

#[test]
fn a_branch_deletion_with_neither_gitea_nor_a_clone_is_failed_and_shown_in_queue() {
    let env = Env::new();
    let tid = env.make_task("PL-1", "ORCH-1", "development", None);

    let res = env.json(&["stop", &tid.to_string()]);

    let e = effect(&res, "delete_remote_branch");
    assert_eq!(e["status"], "failed", "{e}");
    let why = e["error"].as_str().unwrap();
    assert!(why.starts_with("cannot be attempted"), "{why}");
    assert!(
        why.contains("ORCH_GITEA_URL") && why.contains("repos/orchestrator"),
        "{why}"
    );
    let q = env.json(&["queue"]);
    assert_eq!(q["outbox"]["failed"], 1, "{q}");
    let items = q["outbox"]["items"].as_array().unwrap();
    assert!(
        items.iter().any(|i| i["kind"] == "delete_remote_branch"
            && i["status"] == "failed"
            && i["last_error"]
                .as_str()
                .unwrap()
                .starts_with("cannot be attempted")),
        "{q}"
    );
}

// ---------------------- 6: a retried cleanup never deletes a fresh pipeline's branch

#[test]
fn a_retried_branch_deletion_leaves_a_branch_a_live_task_owns_or_that_moved_since_the_stop() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let branch = "feature/ORCH-1-x";
    repo.feature(&env, branch);
    let old = add_task(&env, "ORCH-1", branch);
    // The git server is down during the STOP: the remote deletion waits.
    let hidden = repo.bare.with_extension("down");
    std::fs::rename(&repo.bare, &hidden).unwrap();
    let res = env.json(&["stop", &old.to_string()]);
    assert_eq!(effect(&res, "remove_worktree")["status"], "done");
    assert_eq!(effect(&res, "delete_remote_branch")["status"], "pending");
    std::fs::rename(&hidden, &repo.bare).unwrap();

    // The same work item starts again (its key was tombstoned) on the same branch, and
    // its agent pushes new work.
    let fresh = add_task(&env, "ORCH-1", branch);
    let wt = env.path().join("fresh-wt");
    git(&repo.clone, &["fetch", "-q", "origin"]);
    git(
        &repo.clone,
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            branch,
            wt.to_str().unwrap(),
            &format!("origin/{branch}"),
        ],
    );
    std::fs::write(wt.join("more.txt"), "new pipeline's work\n").unwrap();
    git(&wt, &["add", "."]);
    git(&wt, &["commit", "-q", "-m", "fresh work"]);
    git(&wt, &["push", "-q", "origin", branch]);
    let pushed = remote_sha(&repo, branch).unwrap();

    let r = env.json(&["reconcile"]);
    let rows = outbox(&env);
    let del = rows
        .iter()
        .find(|r| r.kind == "delete_remote_branch")
        .unwrap();
    assert_eq!(del.status, "failed", "{r}");
    assert!(
        del.last_error
            .as_deref()
            .unwrap()
            .contains(&format!("live task {fresh}")),
        "{del:?}"
    );
    assert_eq!(remote_sha(&repo, branch).as_deref(), Some(pushed.as_str()));
    assert!(
        wt.join("more.txt").exists(),
        "the fresh task's worktree was removed"
    );

    // Once no live task owns the branch, the old deletion still acts only on the commit
    // it was written for: the branch moved since the STOP, so it stays.
    env.db()
        .execute("UPDATE tasks SET stage = 'done' WHERE id = ?1", [fresh]);
    env.db().execute(
        "UPDATE outbox SET status = 'pending', attempts = 0 WHERE id = ?1",
        [del.id],
    );
    env.json(&["reconcile"]);
    let rows = outbox(&env);
    let del = rows
        .iter()
        .find(|r| r.kind == "delete_remote_branch")
        .unwrap();
    assert_eq!(del.status, "failed");
    let why = del.last_error.as_deref().unwrap();
    assert!(why.contains(&pushed) && why.contains("left alone"), "{why}");
    assert_eq!(remote_sha(&repo, branch).as_deref(), Some(pushed.as_str()));
}

#[test]
fn through_gitea_a_branch_is_deleted_only_while_it_points_at_the_commit_of_the_stop() {
    let gitea = MockServer::start();
    let delete = gitea.mock(|when, then| {
        when.method(DELETE);
        then.status(204);
    });
    let mut env = Env::new();
    with_gitea(&mut env, &gitea);
    let repo = GitRepo::new(&env, "orchestrator");
    repo.feature(&env, "feature/ORCH-1-x");
    repo.feature(&env, "feature/ORCH-2-y");
    let at_stop = remote_sha(&repo, "feature/ORCH-1-x").unwrap();
    let same = at_stop.clone();
    gitea.mock(move |when, then| {
        when.method(GET)
            .path("/api/v1/repos/acme/orchestrator/branches/feature/ORCH-1-x");
        then.status(200)
            .json_body(json!({ "name": "feature/ORCH-1-x", "commit": { "id": same } }));
    });
    gitea.mock(|when, then| {
        when.method(GET)
            .path("/api/v1/repos/acme/orchestrator/branches/feature/ORCH-2-y");
        then.status(200).json_body(json!({
            "name": "feature/ORCH-2-y",
            "commit": { "id": "0123456789abcdef0123456789abcdef01234567" }
        }));
    });
    let same_commit = add_task(&env, "ORCH-1", "feature/ORCH-1-x");
    let moved = add_task(&env, "ORCH-2", "feature/ORCH-2-y");

    let res = env.json(&["stop", &same_commit.to_string()]);
    assert_eq!(
        effect(&res, "delete_remote_branch")["result"],
        "deleted on Gitea"
    );
    delete.assert_hits(1);

    let res = env.json(&["stop", &moved.to_string()]);
    let e = effect(&res, "delete_remote_branch");
    assert_eq!(e["status"], "failed", "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("0123456789abcdef"),
        "{e}"
    );
    delete.assert_hits(1);
}

// ------------------------------------------------ 7: lock files of a killed git

#[test]
fn stale_ref_locks_are_recovered_and_logged_but_a_lock_a_live_process_holds_is_kept() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-1-x");
    repo.feature(&env, "feature/ORCH-2-y");
    let gitdir = repo.clone.join(".git");
    let old = std::time::SystemTime::now() - Duration::from_secs(600);
    let plant = |rel: &str| {
        let p = gitdir.join(rel);
        let f = std::fs::File::create(&p).unwrap();
        f.set_modified(old).unwrap();
        p
    };
    // A git SIGKILLed while deleting the branch leaves both behind.
    let ref_lock = plant("refs/heads/feature/ORCH-1-x.lock");
    let packed_lock = plant("packed-refs.lock");
    let first = add_task(&env, "ORCH-1", "feature/ORCH-1-x");

    let res = env.json(&["stop", &first.to_string()]);

    let e = effect(&res, "remove_worktree");
    assert_eq!(e["status"], "done", "{e}");
    assert!(!wt.exists() && !repo.local_branches().contains("ORCH-1"));
    assert!(!ref_lock.exists() && !packed_lock.exists());
    let log = env.json(&["task", "log", &first.to_string()]);
    let recovered: Vec<&Value> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|ev| ev["kind"] == "git_lock_recovered")
        .collect();
    assert_eq!(recovered.len(), 2, "{log}");

    // An old lock that a live process holds open is never taken: the removal waits.
    let held = plant("packed-refs.lock");
    let holder = Agent::spawn(&format!("exec 3>>'{}'; exec sleep 60", held.display()));
    assert!(crate::fault::wait_until(Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{}/fd", holder.pid))
            .unwrap()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == held))
    }));
    let second = add_task(&env, "ORCH-2", "feature/ORCH-2-y");
    let res = env.json(&["stop", &second.to_string()]);
    let e = effect(&res, "remove_worktree");
    assert_eq!(e["status"], "pending", "{e}");
    assert!(held.exists(), "a lock a live process holds was removed");
    assert!(repo.local_branches().contains("ORCH-2"));
    // Once its holder is gone, the next pass recovers it.
    drop(holder);
    env.json(&["reconcile"]);
    assert!(!held.exists());
    assert!(!repo.local_branches().contains("ORCH-2"));

    // A lock no process holds but younger than ORCH_GIT_TIMEOUT_SECS may be a git that
    // is starting: it is kept, and the removal waits.
    repo.feature(&env, "feature/ORCH-3-z");
    let young = gitdir.join("refs/heads/feature/ORCH-3-z.lock");
    std::fs::File::create(&young).unwrap();
    let third = add_task(&env, "ORCH-3", "feature/ORCH-3-z");
    let res = env.json(&["stop", &third.to_string()]);
    assert_eq!(
        effect(&res, "remove_worktree")["status"],
        "pending",
        "{res}"
    );
    assert!(young.exists(), "a young lock was taken");
    assert!(repo.local_branches().contains("ORCH-3"));
    let log = env.json(&["task", "log", &third.to_string()]);
    assert!(
        !log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ev| ev["kind"] == "git_lock_recovered"),
        "{log}"
    );
}

// ------------------------------------ 7: a `git worktree add` killed before it finished

/// A `git worktree add` killed before it finished (a STOP's SIGKILL of the supervisor that
/// prepares the worktree: git dies with it) leaves the worktree locked with the reason
/// `initializing`. `git worktree remove --force` refuses a locked worktree and `prune`
/// skips it, so the STOP's removal used to stay pending for good, and a later run's
/// preparation took the half-made worktree for the task's.
fn lock_as_unfinished(repo: &GitRepo, wt: &Path) {
    git(
        &repo.clone,
        &[
            "worktree",
            "lock",
            "--reason",
            "initializing",
            wt.to_str().unwrap(),
        ],
    );
}

/// The worktree of `branch` in `git worktree list --porcelain`, and whether it is locked.
fn listed(repo: &GitRepo, branch: &str) -> Option<bool> {
    let list = repo.worktree_list();
    list.split("\n\n")
        .find(|b| {
            b.lines()
                .any(|l| l == format!("branch refs/heads/{branch}"))
        })
        .map(|b| b.lines().any(|l| l.starts_with("locked")))
}

#[test]
fn a_stop_during_a_worktree_preparation_still_removes_the_worktree() {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    // A checkout that takes seconds (a slow smudge filter), so the STOP lands while the
    // supervisor's `git worktree add` runs.
    std::fs::write(repo.clone.join(".gitattributes"), "*.txt filter=slow\n").unwrap();
    std::fs::write(repo.clone.join("a.txt"), "slow to check out\n").unwrap();
    git(&repo.clone, &["add", "."]);
    git(&repo.clone, &["commit", "-q", "-m", "slow"]);
    git(&repo.clone, &["push", "-q", "origin", "main"]);
    git(
        &repo.clone,
        &["config", "filter.slow.smudge", "sleep 3; cat"],
    );
    let _runs = crate::common::RecordedRuns::new(&env);
    env.set("ORCH_AGENT_CMD_DEVELOPER", "sleep 60")
        .set("ORCH_STOP_GRACE_SECS", "1")
        .set("ORCH_OUTBOX_MAX_ATTEMPTS", "100");
    let tid = add_task(&env, "ORCH-1", "feature/ORCH-1-x");
    let wt = env.path().join("xdg/orchctl/worktrees/orchestrator/ORCH-1");
    let admin = repo.clone.join(".git/worktrees/ORCH-1");

    let d = env.json(&["dispatch"]);
    assert_eq!(d["launched"].as_array().unwrap().len(), 1, "{d}");
    assert!(
        crate::fault::wait_until(Duration::from_secs(10), || admin.join("locked").exists()),
        "the preparation did not start"
    );
    let res = env.json(&["stop", &tid.to_string()]);
    assert_eq!(effect(&res, "stop_process")["status"], "done", "{res}");

    // The checkout a killed `worktree add` started may still run (it holds the worktree's
    // index.lock): the removal waits for it, then removes the half-made worktree.
    let done = crate::fault::wait_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(200));
        env.json(&["reconcile"]);
        outbox(&env)
            .iter()
            .any(|r| r.kind == "remove_worktree" && r.status != "pending")
    });
    let rows = outbox(&env);
    let row = rows.iter().find(|r| r.kind == "remove_worktree").unwrap();
    assert!(
        done && row.status == "done",
        "{row:?}\n{}",
        repo.worktree_list()
    );
    assert!(!wt.exists(), "the half-made worktree is left");
    assert_eq!(listed(&repo, "feature/ORCH-1-x"), None);
    assert!(!repo.local_branches().contains("ORCH-1"));
}

#[test]
fn an_unfinished_worktree_is_removed_only_while_no_preparation_of_the_repo_runs() {
    let env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let wt = repo.feature(&env, "feature/ORCH-1-x");
    lock_as_unfinished(&repo, &wt);
    let tid = add_task(&env, "ORCH-1", "feature/ORCH-1-x");
    // A preparation of this repo's worktrees is under way on this host: it holds the lock
    // every preparation takes (its `git worktree add` may be this one, still running).
    let worktrees = env.path().join("xdg/orchctl/worktrees");
    std::fs::create_dir_all(&worktrees).unwrap();
    let lock = worktrees.join("orchestrator.lock");
    let holder = Agent::spawn(&format!("exec flock '{}' sleep 60", lock.display()));
    assert!(crate::fault::wait_until(Duration::from_secs(5), || {
        Command::new("flock")
            .args(["-n", lock.to_str().unwrap(), "true"])
            .status()
            .is_ok_and(|s| !s.success())
    }));

    let res = env.json(&["stop", &tid.to_string()]);
    let e = effect(&res, "remove_worktree");
    assert_eq!(e["status"], "pending", "{e}");
    assert!(wt.join("work.txt").exists());
    assert_eq!(listed(&repo, "feature/ORCH-1-x"), Some(true));

    // Once no preparation runs, the lock `git worktree add` left is its own leftover.
    drop(holder);
    env.json(&["reconcile"]);
    let rows = outbox(&env);
    let row = rows.iter().find(|r| r.kind == "remove_worktree").unwrap();
    assert_eq!(row.status, "done", "{row:?}");
    assert!(!wt.exists());
    assert_eq!(listed(&repo, "feature/ORCH-1-x"), None);
    assert!(!repo.local_branches().contains("ORCH-1"));
    let log = env.json(&["task", "log", &tid.to_string()]);
    assert!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ev| ev["kind"] == "unfinished_worktree_removed"),
        "{log}"
    );

    // A lock of any other reason (a person's `git worktree lock`) is never overridden.
    let wt2 = repo.feature(&env, "feature/ORCH-2-y");
    git(
        &repo.clone,
        &[
            "worktree",
            "lock",
            "--reason",
            "on a USB disk",
            wt2.to_str().unwrap(),
        ],
    );
    let t2 = add_task(&env, "ORCH-2", "feature/ORCH-2-y");
    let res = env.json(&["stop", &t2.to_string()]);
    assert_eq!(
        effect(&res, "remove_worktree")["status"],
        "pending",
        "{res}"
    );
    assert!(wt2.join("work.txt").exists());
}

#[test]
fn the_next_run_never_works_in_a_worktree_a_killed_git_worktree_add_left() {
    let mut env = Env::new();
    let repo = GitRepo::new(&env, "orchestrator");
    let _runs = crate::common::RecordedRuns::new(&env);
    let branch = "feature/ORCH-1-x";
    // What a `git worktree add -b` killed during its checkout leaves: the branch, and its
    // worktree registered and locked, with none of the files checked out.
    let wt = env.path().join("xdg/orchctl/worktrees/orchestrator/ORCH-1");
    git(
        &repo.clone,
        &[
            "worktree",
            "add",
            "-q",
            "--no-checkout",
            "-b",
            branch,
            wt.to_str().unwrap(),
            "origin/main",
        ],
    );
    lock_as_unfinished(&repo, &wt);
    assert!(!wt.join("README.md").exists());
    let seen = env.path().join("seen.txt");
    let agent = crate::fault::script(
        &env.path().join("developer.sh"),
        &format!(
            "#!/bin/sh\n{{ pwd; ls; git status --porcelain; }} > '{}'\n",
            seen.display()
        ),
    );
    env.set("ORCH_AGENT_CMD_DEVELOPER", agent.to_str().unwrap());
    add_task(&env, "ORCH-1", branch);

    let d = env.json(&["dispatch"]);
    assert_eq!(d["launched"].as_array().unwrap().len(), 1, "{d}");
    assert!(crate::fault::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&seen).is_ok_and(|s| s.lines().count() >= 2)
    }));
    std::thread::sleep(Duration::from_millis(100));
    let text = std::fs::read_to_string(&seen).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(wt.to_str().unwrap()), "{text}");
    let rest: Vec<&str> = lines.collect();
    assert_eq!(rest, ["README.md"], "a whole, clean checkout:\n{text}");
    assert_eq!(
        listed(&repo, branch),
        Some(false),
        "{}",
        repo.worktree_list()
    );
}

// ----------------------------------------------------- 8: reap racing the launcher

#[test]
fn reap_never_requeues_a_run_whose_agent_was_recorded_after_it_judged_the_run() {
    let mut env = Env::new();
    // A run without a pid counts as dead at once.
    env.set("ORCH_CLAIM_TIMEOUT_SECS", "0");
    add_task(&env, "ORCH-1", "feature/ORCH-1-x");
    let c = env.json(&["claim"]);
    let (job_id, run_id) = (c["id"].as_i64().unwrap(), c["run_id"].as_i64().unwrap());
    let ctx = env.ctx();
    // reap reads the run: running, no pid, older than the timeout — dead.
    let judged = ctx.store.read(|r| r.job(job_id)).unwrap().unwrap();
    assert_eq!((judged.status.as_str(), judged.pid), ("running", None));
    // The launcher records its agent before reap writes.
    let agent = Agent::spawn("sleep 60");
    assert!(ctx
        .store
        .write(|w| {
            w.record_launch(
                job_id,
                run_id,
                &orchctl::store::Launch {
                    pid: agent.pid,
                    proc_start: agent.start,
                    host: env.config().host_id,
                    boot_id: None,
                },
            )
        })
        .unwrap());

    let action = ctx
        .store
        .write(|w| orchctl::jobs::reap_unknown_outcome(w, &judged, "no agent pid"))
        .unwrap();

    assert_eq!(action, None, "reap undid a launch it never saw");
    let job = ctx.store.read(|r| r.job(job_id)).unwrap().unwrap();
    assert_eq!(
        (job.status.as_str(), job.pid, job.proc_start),
        ("running", Some(agent.pid), Some(agent.start))
    );
    // The recorded agent is still STOP's to end.
    let res = env.json(&["stop", "ORCH-1"]);
    assert_eq!(res["stopped"], 1, "{res}");
    // And a run judged with its pid is not ended once that pid changed either.
    let stale = orchctl::model::Job {
        pid: Some(agent.pid + 1),
        ..job
    };
    assert_eq!(
        ctx.store
            .write(|w| orchctl::jobs::reap_unknown_outcome(w, &stale, "gone"))
            .unwrap(),
        None
    );
}

// --------------------------------------------------------------- 13: a full disk

/// A small tmpfs mounted for one test (a disk that can be filled), unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test fills a disk: it mounts a 2 MiB tmpfs, which needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Writes zeros until the disk refuses more.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|_| f.sync_all()).is_ok() {}
    }

    fn unfill(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The SQLite file on a full disk (PostgreSQL's disk is the server's).
#[test]
fn sqlite_only_queue_on_a_full_disk_prints_its_snapshot_and_exits_0() {
    let mut env = Env::sqlite();
    let disk = SmallDisk::mount(&env.path().join("disk"));
    let db = disk.0.join("orch.db");
    env.set("ORCH_DB_PATH", db.to_str().unwrap());
    add_task(&env, "ORCH-1", "feature/ORCH-1-x");
    add_task(&env, "ORCH-2", "feature/ORCH-2-y");
    env.json(&["claim"]);
    // Another client (the sqlite3 shell, a backup script) closes the database last and
    // removes its -wal and -shm, which the next open must create again.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let wal = disk.0.join("orch.db-wal");
    assert!(!wal.exists() && !disk.0.join("orch.db-shm").exists());
    disk.fill();

    let (code, out, err) = env.run(&["queue"]);

    assert_eq!(code, 0, "{err}");
    let q: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(q["counts"]["queued"], 1, "{q}");
    assert_eq!(q["counts"]["running"], 1, "{q}");
    assert!(q["counts"].get("error").is_none(), "{q}");
    assert!(err.contains("warning"), "{err}");

    // A log that holds changes cannot be read without its index: the minimal snapshot,
    // each block with the error, still exit 0.
    disk.unfill();
    std::fs::write(&wal, vec![1u8; 4096]).unwrap();
    let _ = std::fs::remove_file(disk.0.join("orch.db-shm"));
    disk.fill();
    let (code, out, err) = env.run(&["queue"]);
    assert_eq!(code, 0, "{err}");
    let q: Value = serde_json::from_str(&out).unwrap();
    for block in ["counts", "serial_gate", "task_deps", "outbox", "stop"] {
        assert!(q[block]["error"].is_string(), "{block}: {q}");
    }
    assert_eq!(q["counts"]["queued"], 0);
    assert_eq!(q["recent"], json!([]));
}
