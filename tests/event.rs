//! Plane intake (SPEC §6): `orchctl event` against real databases and processes, the Plane
//! API as an httpmock stub, reconcile's Plane pass, and the shipped shims behind the real
//! `webhook` server and a CGI call.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use httpmock::prelude::*;
use httpmock::Mock;
use serde_json::{json, Value};

use crate::common::{Agent, Env, BIN};

pub(crate) const SECRET: &str = "plane_wh_0123456789abcdef0123456789abcdef";
pub(crate) const TOKEN: &str = "tok-plane-3c9d1f";
pub(crate) const WORKSPACE: &str = "acme";
pub(crate) const PROJECT: &str = "22222222-2222-4222-8222-222222222222";
pub(crate) const ISSUE: &str = "44444444-4444-4444-8444-444444444444";
pub(crate) const TO_ANALYSE: &str = "aaaaaaaa-aaaa-4aaa-8aaa-000000000001";
pub(crate) const APPROVED: &str = "aaaaaaaa-aaaa-4aaa-8aaa-000000000002";
pub(crate) const CONFIRM_DEPLOY: &str = "aaaaaaaa-aaaa-4aaa-8aaa-000000000003";
pub(crate) const STOP: &str = "aaaaaaaa-aaaa-4aaa-8aaa-000000000004";
pub(crate) const REJECTED: &str = "aaaaaaaa-aaaa-4aaa-8aaa-000000000005";
const DONE: &str = "aaaaaaaa-aaaa-4aaa-8aaa-000000000006";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plane")
}

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

pub(crate) fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

pub(crate) fn issue_id(n: u32) -> String {
    format!("44444444-4444-4444-8444-{n:012}")
}

fn state_name(id: &str) -> &'static str {
    match id {
        TO_ANALYSE => "To Analyse",
        APPROVED => "Approved",
        CONFIRM_DEPLOY => "Confirm Deploy",
        STOP => "STOP",
        REJECTED => "Rejected",
        DONE => "Done",
        _ => "Elsewhere",
    }
}

/// A web-UI state change of `issue` to `state`, shaped like Plane's payload, with `data`
/// showing that same state.
pub(crate) fn to_state(issue: &str, state: &str) -> Value {
    let mut v = fixture_json("issue_update_state_change.json");
    v["data"]["id"] = json!(issue);
    v["activity"]["old_value"] = json!(CONFIRM_DEPLOY);
    v["activity"]["new_value"] = json!(state);
    v["data"]["state"] =
        json!({ "id": state, "name": state_name(state), "color": "#000000", "group": "started" });
    v
}

/// The same change, but `data` already shows a later state (the payload is serialized
/// when the webhook is sent): the name must come from Plane's states API.
pub(crate) fn to_state_stale(issue: &str, state: &str) -> Value {
    let mut v = to_state(issue, state);
    v["data"]["state"] = json!({ "id": "aaaaaaaa-aaaa-4aaa-8aaa-0000000000ff", "name": "Later", "color": "#000000", "group": "started" });
    v
}

pub(crate) fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// The body with a distinct `data.updated_at`: another delivery of the same kind.
fn variant(mut v: Value, n: u32) -> Vec<u8> {
    v["data"]["updated_at"] = json!(format!("2026-05-19T14:{:02}:00.000000Z", n % 60));
    bytes(&v)
}

pub(crate) fn sign(body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// `orchctl event ARGS < body`: (exit code, JSON result or Null, stderr).
fn deliver(env: &Env, body: &[u8], args: &[&str]) -> (i32, Value, String) {
    let mut a = vec!["event"];
    a.extend_from_slice(args);
    let (code, out, err) = env.run_stdin(&a, body);
    let v = if code == 0 {
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("event printed no JSON ({e}): {out}"))
    } else {
        Value::Null
    };
    (code, v, err)
}

fn ok(env: &Env, body: &[u8]) -> Value {
    let (code, v, err) = deliver(env, body, &[]);
    assert_eq!(code, 0, "event failed: {err}");
    v
}

fn agents_of(env: &Env, task: i64) -> Vec<String> {
    env.db().values(
        "SELECT agent || ':' || status FROM jobs WHERE task_id = ?1 ORDER BY id",
        [task],
    )
}

pub(crate) fn set_project(env: &Env, task: i64, project: &str) {
    env.db().execute(
        "UPDATE tasks SET project_id = ?1 WHERE id = ?2",
        (project, task),
    );
}

/// Every row that a delivery could write, for "nothing written" checks.
fn snapshot(env: &Env) -> Vec<String> {
    let c = env.db();
    let q = |sql: &str| -> String { c.values::<String>(sql, ()).join(";") };
    let mut out = vec![
        q("SELECT id || '|' || stage || '|' || coalesce(plane_id, '') || '|' || coalesce(cancel_requested_at, '') FROM tasks ORDER BY id"),
        q("SELECT id || '|' || status FROM jobs ORDER BY id"),
    ];
    for t in [
        "task_events",
        "outbox",
        "plane_deliveries",
        "plane_states",
        "plane_projects",
        "merge_leases",
        "deploy_markers",
    ] {
        out.push(format!(
            "{t}={}",
            env.count(&format!("SELECT count(*) FROM {t}"))
        ));
    }
    out
}

/// Points the environment at a Plane stub.
pub(crate) fn with_plane(env: &mut Env, server: &MockServer) {
    env.set("ORCH_PLANE_URL", &server.base_url())
        .set("ORCH_PLANE_WORKSPACE", WORKSPACE)
        .set("ORCH_PLANE_API_TOKEN", TOKEN);
}

pub(crate) fn api(path: &str) -> String {
    format!("/api/v1/workspaces/{WORKSPACE}/projects/{PROJECT}/{path}")
}

pub(crate) fn states_mock(server: &MockServer) -> Mock<'_> {
    server.mock(|when, then| {
        when.method(GET)
            .path(api("states/"))
            .header("X-Api-Key", TOKEN);
        then.status(200)
            .header("Content-Type", "application/json")
            .body(fixture("states_list.json"));
    })
}

// ------------------------------------------------------------------------------- TC-01

#[test]
fn tc01_stop_state_is_routed_to_stop_and_the_agent_is_gone() {
    let env = Env::new();
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let agent = Agent::spawn("sleep 60 & sleep 60");
    let job = env.make_job_full(
        task,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(7),
        1,
        2,
    );

    let r = ok(&env, &fixture("issue_update_state_change.json"));
    assert_eq!(r["action"], "stop");
    assert_eq!(r["note"], "cancelled");
    assert_eq!(r["state"], "STOP");
    assert_eq!(r["task"]["id"], task);
    assert_eq!(r["task"]["stage"], "cancelled");
    assert_eq!(r["stop"]["stopped"], 1);
    assert!(
        agent.wait_gone(Duration::from_secs(15)),
        "agent group still alive: {:?}",
        agent.group()
    );
    assert_eq!(env.job_status(job), "cancelled");
    let t = env.task(task);
    assert_eq!(t.cancel_reason.as_deref(), Some("Plane STOP status"));
    assert_eq!(t.plane_id.unwrap(), format!("{ISSUE}#cancelled-{task}"));
}

#[test]
fn tc01_a_state_change_made_through_the_api_is_routed_too() {
    let env = Env::new();
    let task = env.make_task(ISSUE, "ORCH-42", "review", None);
    let mut v = to_state(ISSUE, STOP);
    v["activity"]["field"] = json!("state");
    let r = ok(&env, &bytes(&v));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("stop"), Some("cancelled"))
    );
    assert_eq!(env.task(task).stage, "cancelled");
}

#[test]
fn tc01_other_states_fields_and_events_do_not_stop() {
    let env = Env::new();
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let job = env.make_job(task, "queued", None, None);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (bytes(&to_state(ISSUE, DONE)), "state-not-routed"),
        (bytes(&to_state(ISSUE, APPROVED)), "approved-in:development"),
        (fixture("issue_update_other_field.json"), "field:priority"),
        (fixture("issue_comment_created.json"), "event:issue_comment"),
        (fixture("issue_deleted.json"), "action:deleted"),
    ];
    for (body, note) in cases {
        let r = ok(&env, &body);
        assert_eq!(r["action"], "ignored", "{note}: {r}");
        assert_eq!(r["note"], note);
    }
    assert_eq!(env.task(task).stage, "development");
    assert_eq!(env.job_status(job), "queued");
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn tc01_stop_for_an_unknown_task_is_a_no_op() {
    let env = Env::new();
    let other = env.make_task(&issue_id(9), "ORCH-9", "development", None);
    let before = snapshot(&env);
    let (code, r, err) = deliver(&env, &fixture("issue_update_state_change.json"), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["action"], "stop");
    assert_eq!(r["note"], "no-task");
    assert!(r["task"].is_null());
    let after = snapshot(&env);
    // Only the delivery itself is remembered.
    assert_eq!(before[..2], after[..2]);
    assert_eq!(env.count("SELECT count(*) FROM plane_deliveries"), 1);
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    assert_eq!(env.task(other).stage, "development");
}

// ------------------------------------------------------------------------------- TC-08

#[test]
fn tc08_kill_switch_off_makes_stop_and_the_relaunch_gate_inert() {
    let mut env = Env::new();
    env.set("ORCH_STOP_ENABLED", "off");
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let agent = Agent::spawn("sleep 60");
    let job = env.make_job_full(
        task,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(3),
        1,
        2,
    );

    let r = ok(&env, &bytes(&to_state(ISSUE, STOP)));
    assert_eq!(r["action"], "ignored");
    assert_eq!(r["note"], "stop-disabled");
    assert_eq!(env.task(task).stage, "development");
    assert_eq!(env.job_status(job), "running");
    assert!(!agent.group().is_empty(), "the agent must keep running");

    // The legacy behaviour: To Analyse relaunches the stage's agent, no comment.
    let r = ok(&env, &bytes(&to_state(ISSUE, TO_ANALYSE)));
    assert_eq!(r["action"], "job_queued");
    assert_eq!(r["note"], "legacy-relaunch");
    assert_eq!(r["job"]["agent"], "developer");
    assert_eq!(
        agents_of(&env, task),
        ["developer:running", "developer:queued"]
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn tc08_the_scope_is_a_csv_of_repos() {
    let mut env = Env::new();
    env.set("ORCH_STOP_REPOS", "enduro-trails, other");
    let outside = env.make_task_in(&issue_id(1), "ORCH-1", "development", "orchestrator", None);
    let inside = env.make_task_in(&issue_id(2), "TRL-2", "development", "enduro-trails", None);
    let mid_outside = env.make_task_in(&issue_id(3), "ORCH-3", "review", "orchestrator", None);
    let mid_inside = env.make_task_in(&issue_id(4), "TRL-4", "review", "enduro-trails", None);

    let r = ok(&env, &bytes(&to_state(&issue_id(1), STOP)));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("stop-disabled"))
    );
    let r = ok(&env, &bytes(&to_state(&issue_id(2), STOP)));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("stop"), Some("cancelled"))
    );
    assert_eq!(env.task(outside).stage, "development");
    assert_eq!(env.task(inside).stage, "cancelled");

    let r = ok(&env, &bytes(&to_state(&issue_id(3), TO_ANALYSE)));
    assert_eq!(r["note"], "legacy-relaunch");
    assert_eq!(agents_of(&env, mid_outside), ["reviewer:queued"]);
    let r = ok(&env, &bytes(&to_state(&issue_id(4), TO_ANALYSE)));
    assert_eq!(r["action"], "refused");
    assert!(agents_of(&env, mid_inside).is_empty());
}

// ------------------------------------------------------------------------------- TC-10

#[test]
fn tc10_to_analyse_on_a_mid_pipeline_task_creates_no_job_and_says_why_in_plane() {
    let server = MockServer::start();
    let comments = server.mock(|when, then| {
        when.method(POST)
            .path_contains(format!(
                "/api/v1/workspaces/{WORKSPACE}/projects/{PROJECT}/issues/"
            ))
            .path_contains("/comments/")
            .header("X-Api-Key", TOKEN)
            .body_contains("does not start a new")
            .body_contains("\"external_source\":\"orchctl\"");
        then.status(201).json_body(json!({ "id": "c1" }));
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    for (n, stage) in [(1, "development"), (2, "review"), (3, "deploy")] {
        let task = env.make_task(&issue_id(n), &format!("ORCH-{n}"), stage, None);
        let r = ok(&env, &bytes(&to_state(&issue_id(n), TO_ANALYSE)));
        assert_eq!(r["action"], "refused", "{stage}: {r}");
        assert_eq!(r["note"], "mid-pipeline");
        assert_eq!(r["task"]["stage"], stage);
        assert!(
            agents_of(&env, task).is_empty(),
            "{stage}: no job may be created"
        );
        assert_eq!(r["effects"][0]["kind"], "plane_comment");
        assert_eq!(r["effects"][0]["status"], "done", "{r}");
    }
    comments.assert_hits(3);
    assert_eq!(env.count("SELECT count(*) FROM jobs"), 0);
}

// ------------------------------------------------------------------------------- TC-11

#[test]
fn tc11_to_analyse_on_an_idle_analysis_task_queues_exactly_one_analyst() {
    let env = Env::new();
    let task = env.make_task(ISSUE, "ORCH-42", "analysis", None);
    let r = ok(&env, &variant(to_state(ISSUE, TO_ANALYSE), 1));
    assert_eq!(r["action"], "job_queued");
    assert_eq!(r["note"], "analyst-relaunched");
    assert_eq!(r["job"]["agent"], "analyst");
    // A second move while that job waits: still one.
    let r = ok(&env, &variant(to_state(ISSUE, TO_ANALYSE), 2));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("job-active"))
    );
    assert_eq!(agents_of(&env, task), ["analyst:queued"]);
}

#[test]
fn tc11_a_new_issue_starts_the_pipeline() {
    let mut env = Env::new();
    env.set("ORCH_REPO_MAP", &format!("{PROJECT}=enduro-trails"))
        .set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_PROJECT_IDENTIFIERS", &format!("{PROJECT}=ORCH"));

    let r = ok(&env, &fixture("issue_created.json"));
    assert_eq!(r["action"], "start_pipeline");
    let t = &r["task"];
    assert_eq!(t["work_item_id"], "ORCH-42");
    assert_eq!(
        t["branch"],
        "feature/ORCH-42-deploy-billing-service-v2-4-1-to-product"
    );
    assert_eq!(t["repo"], "enduro-trails");
    assert_eq!(t["stage"], "analysis");
    assert_eq!(t["plane_id"], ISSUE);
    assert_eq!(t["plane_issue_id"], ISSUE);
    assert_eq!(t["project_id"], PROJECT);
    assert_eq!(t["title"], "Deploy billing-service v2.4.1 to production");
    assert_eq!(
        agents_of(&env, t["id"].as_i64().unwrap()),
        ["analyst:queued"]
    );

    // A move to To Analyse of an issue without a task starts one the same way.
    let mut v = to_state(&issue_id(43), TO_ANALYSE);
    v["data"]["sequence_id"] = json!(43);
    v["data"]["name"] = json!("Fix: the login page (again)");
    v["data"]["project"] = json!("99999999-9999-4999-8999-999999999999");
    let (code, _, err) = deliver(&env, &bytes(&v), &[]);
    assert_eq!(
        code, 78,
        "a project without an identifier is a configuration error: {err}"
    );
    assert!(err.contains("ORCH_PROJECT_IDENTIFIERS"), "{err}");
    v["data"]["project"] = json!(PROJECT);
    let r = ok(&env, &bytes(&v));
    assert_eq!(r["action"], "start_pipeline");
    assert_eq!(r["task"]["work_item_id"], "ORCH-43");
    assert_eq!(
        r["task"]["branch"],
        "feature/ORCH-43-fix-the-login-page-again"
    );
    assert_eq!(r["job"]["agent"], "analyst");
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 2);

    // Created in another state: nothing starts.
    let mut v = fixture_json("issue_created.json");
    v["data"]["id"] = json!(issue_id(44));
    v["data"]["state"] = json!({ "id": APPROVED, "name": "Approved" });
    let r = ok(&env, &bytes(&v));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("created-not-to-analyse"))
    );
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 2);
}

#[test]
fn a_stopped_issue_moved_back_to_to_analyse_starts_a_fresh_pipeline() {
    let mut env = Env::new();
    env.set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_PROJECT_IDENTIFIERS", &format!("{PROJECT}=ORCH"));
    let first = ok(&env, &fixture("issue_created.json"))["task"]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        ok(&env, &bytes(&to_state(ISSUE, STOP)))["note"],
        "cancelled"
    );
    let r = ok(&env, &bytes(&to_state(ISSUE, TO_ANALYSE)));
    assert_eq!(r["action"], "start_pipeline");
    let second = r["task"]["id"].as_i64().unwrap();
    assert_ne!(first, second);
    assert_eq!(r["task"]["work_item_id"], "ORCH-42");
    assert_eq!(
        env.task(first).work_item_id.unwrap(),
        format!("ORCH-42#cancelled-{first}")
    );
    assert_eq!(agents_of(&env, second), ["analyst:queued"]);
}

#[test]
fn the_project_identifier_comes_from_plane_once_and_is_cached() {
    let server = MockServer::start();
    let project = server.mock(|when, then| {
        when.method(GET).path(api("")).header("X-Api-Key", TOKEN);
        then.status(200)
            .json_body(json!({ "id": PROJECT, "identifier": "BILL", "name": "Billing" }));
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    env.set("ORCH_DEFAULT_REPO", "orchestrator");
    for n in [42, 43] {
        let mut v = fixture_json("issue_created.json");
        v["data"]["id"] = json!(issue_id(n));
        v["data"]["sequence_id"] = json!(n);
        let r = ok(&env, &bytes(&v));
        assert_eq!(r["task"]["work_item_id"], format!("BILL-{n}"));
    }
    project.assert_hits(1);
}

// ------------------------------------------------------------------------ SPEC §1 moves

#[test]
fn approved_rejected_and_confirm_deploy_follow_the_stage_map() {
    let env = Env::new();
    let approve = env.make_task(&issue_id(1), "ORCH-1", "analysis", None);
    let reject_analysis = env.make_task(&issue_id(2), "ORCH-2", "analysis", None);
    let reject_review = env.make_task(&issue_id(3), "ORCH-3", "review", None);
    let confirm = env.make_task(&issue_id(4), "ORCH-4", "deploy", None);
    let done = env.make_task(&issue_id(5), "ORCH-5", "done", None);
    let early = env.make_task(&issue_id(6), "ORCH-6", "development", None);

    let r = ok(&env, &bytes(&to_state(&issue_id(1), APPROVED)));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("job_queued"), Some("approved"))
    );
    assert_eq!(env.task(approve).stage, "development");
    assert_eq!(agents_of(&env, approve), ["developer:queued"]);

    ok(&env, &bytes(&to_state(&issue_id(2), REJECTED)));
    assert_eq!(env.task(reject_analysis).stage, "analysis");
    assert_eq!(agents_of(&env, reject_analysis), ["analyst:queued"]);

    ok(&env, &bytes(&to_state(&issue_id(3), REJECTED)));
    assert_eq!(env.task(reject_review).stage, "development");
    assert_eq!(agents_of(&env, reject_review), ["developer:queued"]);

    let r = ok(&env, &variant(to_state(&issue_id(4), CONFIRM_DEPLOY), 1));
    assert_eq!(r["job"]["agent"], "deployer");
    let r = ok(&env, &variant(to_state(&issue_id(4), CONFIRM_DEPLOY), 2));
    assert_eq!(r["note"], "job-active");
    assert_eq!(env.task(confirm).stage, "deploy");
    assert_eq!(agents_of(&env, confirm), ["deployer:queued"]);

    let r = ok(&env, &bytes(&to_state(&issue_id(5), APPROVED)));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("terminal:done"))
    );
    assert!(agents_of(&env, done).is_empty());
    let r = ok(&env, &bytes(&to_state(&issue_id(5), TO_ANALYSE)));
    assert_eq!(r["note"], "terminal:done");
    assert!(agents_of(&env, done).is_empty());

    let r = ok(&env, &bytes(&to_state(&issue_id(6), CONFIRM_DEPLOY)));
    assert_eq!(r["note"], "confirm-deploy-in:development");
    assert!(agents_of(&env, early).is_empty());
}

#[test]
fn rejected_while_parked_awaiting_confirm_deploy_goes_back_to_development() {
    let env = Env::new();
    let parked = env.make_task(&issue_id(1), "ORCH-1", "deploy", Some("feature/ORCH-1-p"));
    // A deployer failed its last attempt earlier and its branch still held the lease.
    env.ctx()
        .store
        .write(|w| w.acquire_lease("orchestrator", "feature/ORCH-1-p", parked))
        .unwrap();
    let failed = env.make_job_full(parked, "deployer", "failed", None, None, Some(3), 2, 2);

    let r = ok(&env, &bytes(&to_state(&issue_id(1), REJECTED)));

    assert_eq!(r["action"], "job_queued", "{r}");
    assert_eq!(env.task(parked).stage, "development");
    assert_eq!(env.job_status(failed), "failed");
    assert_eq!(
        agents_of(&env, parked),
        ["deployer:failed", "developer:queued"]
    );
    assert!(env
        .ctx()
        .store
        .read(|r| r.lease("orchestrator"))
        .unwrap()
        .is_none());

    // SPEC §14: a job of its stage still queued (a Confirm Deploy's deployer that has not
    // started) is a reason to refuse, and nothing changes.
    let confirmed = env.make_task(&issue_id(3), "ORCH-3", "deploy", None);
    let queued = env.make_job_full(confirmed, "deployer", "queued", None, None, None, 0, 2);
    let r = ok(&env, &bytes(&to_state(&issue_id(3), REJECTED)));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("job-active")),
        "{r}"
    );
    assert_eq!(env.task(confirmed).stage, "deploy");
    assert_eq!(env.job_status(queued), "queued");

    // With a deployer running (the window is open) the rejection is not applied.
    let busy = env.make_task(&issue_id(2), "ORCH-2", "deploy", None);
    env.make_job_full(busy, "deployer", "running", None, None, Some(9), 1, 2);
    let r = ok(&env, &bytes(&to_state(&issue_id(2), REJECTED)));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("rejected-in:deploy-busy"))
    );
    assert_eq!(env.task(busy).stage, "deploy");
}

// ---------------------------------------------------------------------------- signatures

#[test]
fn signatures_follow_the_fixture_test_vectors() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET)
        .set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_PROJECT_IDENTIFIERS", &format!("{PROJECT}=ORCH"));
    let vectors = [
        (
            "issue_created.json",
            "f66a03419873ec3779a350734e1d8472f3839b1d37e77323a2266df2aa1d2374",
        ),
        (
            "issue_update_state_change.wire.json",
            "61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066",
        ),
        (
            "issue_update_state_change.json",
            "0679874643f3f1c185c48e8e4a5a1cce1c6529f03986fb5ea9f044f02b9dfdfd",
        ),
        (
            "issue_update_other_field.json",
            "8df38cf5954eb971e6b06a57a90daecebc09b87acc872edc1f107ccc99962e52",
        ),
        (
            "issue_deleted.json",
            "83e497fcef23adc4827325ac07bf002a181f88f7b8bf2c3eb542033b4c400997",
        ),
        (
            "issue_comment_created.json",
            "ef3c149a355bd23cb22e4bb24bd14d01992eb5e2508a5669f30c918d86c7ece9",
        ),
    ];
    for (file, digest) in vectors {
        let body = fixture(file);
        let mut wrong = digest.to_string();
        wrong.replace_range(0..1, if digest.starts_with('0') { "1" } else { "0" });
        let (code, _, err) = deliver(&env, &body, &["--signature", &wrong]);
        assert_eq!(code, 77, "{file} with a wrong signature: {err}");
        let (code, r, err) = deliver(&env, &body, &["--signature", digest, "--delivery", "d-1"]);
        assert_eq!(code, 0, "{file}: {err}");
        assert_ne!(r["action"], "duplicate", "{file}");
    }
    // The created issue started a pipeline; the STOP bodies then stopped it.
    assert_eq!(
        env.count("SELECT count(*) FROM tasks WHERE stage = 'cancelled'"),
        1
    );
}

#[test]
fn a_wrong_or_missing_signature_writes_nothing() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    env.make_job(task, "queued", None, None);
    let wire = fixture("issue_update_state_change.wire.json");
    // The pretty file is the same JSON value with other bytes: its digest must not verify
    // the wire bytes (the body is never re-serialized).
    let pretty_digest = "0679874643f3f1c185c48e8e4a5a1cce1c6529f03986fb5ea9f044f02b9dfdfd";
    let before = snapshot(&env);
    for args in [
        vec![],
        vec!["--signature", ""],
        vec!["--signature", "not-hex"],
        vec!["--signature", pretty_digest],
        vec!["--signature", &"0".repeat(64)],
    ] {
        let (code, out, err) = deliver(&env, &wire, &args);
        assert_eq!(code, 77, "{args:?}: {err}");
        assert!(out.is_null());
        assert!(err.contains("X-Plane-Signature"), "{err}");
        assert!(!err.contains(SECRET));
        assert_eq!(snapshot(&env), before, "{args:?} wrote something");
    }
    let r = ok_signed(&env, &wire);
    assert_eq!(r["note"], "cancelled");
}

fn ok_signed(env: &Env, body: &[u8]) -> Value {
    let sig = sign(body);
    let (code, v, err) = deliver(env, body, &["--signature", &sig]);
    assert_eq!(code, 0, "{err}");
    v
}

#[test]
fn a_body_with_raw_non_ascii_text_verifies() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let wire = String::from_utf8(fixture("issue_update_state_change.wire.json")).unwrap();
    assert!(wire.contains("M\\u00fcller"));
    let raw = wire.replace("M\\u00fcller", "Müller").into_bytes();
    assert!(
        raw.windows(2).any(|w| w == [0xc3, 0xbc]),
        "the body carries UTF-8 bytes"
    );
    // The escaped body's digest does not verify the raw one: bytes, not the JSON value.
    let escaped = "61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066";
    assert_eq!(deliver(&env, &raw, &["--signature", escaped]).0, 77);
    let r = ok_signed(&env, &raw);
    assert_eq!(r["note"], "cancelled");
    assert_eq!(env.task(task).stage, "cancelled");
}

// --------------------------------------------------------------------- dedupe and echoes

#[test]
fn a_replayed_body_with_a_new_delivery_id_is_a_duplicate() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    let idle = env.make_task(&issue_id(1), "ORCH-1", "analysis", None);
    let busy = env.make_task(&issue_id(2), "ORCH-2", "development", None);

    let body = bytes(&to_state(&issue_id(1), TO_ANALYSE));
    let sig = sign(&body);
    let (_, r, _) = deliver(&env, &body, &["--delivery", "d-1", "--signature", &sig]);
    assert_eq!(r["action"], "job_queued");
    let (code, r, err) = deliver(&env, &body, &["--delivery", "d-2", "--signature", &sig]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["action"], "duplicate");
    assert_eq!(r["delivery"], "d-2");
    assert_eq!(agents_of(&env, idle), ["analyst:queued"]);

    let body = bytes(&to_state(&issue_id(2), STOP));
    let sig = sign(&body);
    assert_eq!(
        deliver(&env, &body, &["--delivery", "d-3", "--signature", &sig]).1["note"],
        "cancelled"
    );
    let events = env.count("SELECT count(*) FROM task_events");
    let (_, r, _) = deliver(&env, &body, &["--delivery", "d-4", "--signature", &sig]);
    assert_eq!(r["action"], "duplicate");
    assert_eq!(env.count("SELECT count(*) FROM task_events"), events);
    assert_eq!(env.task(busy).stage, "cancelled");
    assert_eq!(env.count("SELECT count(*) FROM plane_deliveries"), 2);
}

#[test]
fn our_own_echoes_are_ignored() {
    let mut env = Env::new();
    env.set(
        "ORCH_PLANE_BOT_USER_ID",
        "55555555-5555-4555-8555-555555555555",
    );
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let r = ok(&env, &fixture("issue_update_state_change.json"));
    assert_eq!(
        (r["action"].as_str(), r["note"].as_str()),
        (Some("ignored"), Some("echo"))
    );
    assert_eq!(env.task(task).stage, "development");
    // Someone else's change goes through.
    let mut v = to_state(ISSUE, STOP);
    v["activity"]["actor"]["id"] = json!("66666666-6666-4666-8666-666666666666");
    assert_eq!(ok(&env, &bytes(&v))["note"], "cancelled");
}

// ------------------------------------------------------------------------- bad input

#[test]
fn malformed_deliveries_exit_65_naming_the_path_and_write_nothing() {
    let mut env = Env::new();
    env.set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_PROJECT_IDENTIFIERS", &format!("{PROJECT}=ORCH"));
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    env.make_job(task, "queued", None, None);

    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = to_state(ISSUE, STOP);
        f(&mut v);
        bytes(&v)
    };
    let mut no_seq = fixture_json("issue_created.json");
    no_seq["data"]["id"] = json!(issue_id(7));
    no_seq["data"]["sequence_id"] = json!("42");
    let mut no_event = to_state(ISSUE, STOP);
    no_event.as_object_mut().unwrap().remove("event");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "not JSON"),
        (b"[1, 2]".to_vec(), "`$` must be an object"),
        (
            edit(&|v| v["activity"]["new_value"] = json!(4)),
            "`activity.new_value` must be a string",
        ),
        (
            edit(&|v| v["activity"]["new_value"] = Value::Null),
            "`activity.new_value` is missing",
        ),
        (
            edit(&|v| v["activity"] = json!("state")),
            "`activity` must be an object",
        ),
        (
            edit(&|v| {
                v["data"].as_object_mut().unwrap().remove("id");
            }),
            "`data.id` is missing",
        ),
        (edit(&|v| v["data"] = json!([])), "`data` must be an object"),
        (
            edit(&|v| v["action"] = json!(1)),
            "`action` must be a string",
        ),
        (
            edit(&|v| {
                v["data"]["state"] = json!({"id": "x", "name": "Later"});
                v["data"].as_object_mut().unwrap().remove("project");
            }),
            "`data.project` is missing",
        ),
        (bytes(&no_seq), "`data.sequence_id` must be an integer"),
        (bytes(&no_event), "`event` is missing"),
    ];
    let before = snapshot(&env);
    for (body, want) in cases {
        let (code, _, err) = deliver(&env, &body, &[]);
        assert_eq!(code, 65, "{want}: {err}");
        assert!(err.contains(want), "expected {want:?} in {err:?}");
        assert!(
            err.starts_with("orchctl: ") && err.trim_end().lines().count() == 1,
            "{err}"
        );
        assert_eq!(snapshot(&env), before, "{want}: something was written");
    }
    // The header is not signed: it may not contradict the body.
    let (code, _, err) = deliver(
        &env,
        &bytes(&to_state(ISSUE, STOP)),
        &["--event", "issue_comment"],
    );
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("X-Plane-Event \"issue_comment\" contradicts `event`"),
        "{err}"
    );
    assert_eq!(snapshot(&env), before);
    // A body over 1 MiB is refused, not truncated.
    let mut big = to_state(ISSUE, STOP);
    big["data"]["description_html"] = json!("x".repeat(1 << 20));
    assert_eq!(deliver(&env, &bytes(&big), &[]).0, 65);
    assert_eq!(snapshot(&env), before);
}

// --------------------------------------------------------------------- the Plane stub

#[test]
fn the_states_cache_serves_two_events_of_one_project_with_one_request() {
    let server = MockServer::start();
    let states = states_mock(&server);
    let mut env = Env::new();
    with_plane(&mut env, &server);
    let a = env.make_task(&issue_id(1), "ORCH-1", "development", None);
    let b = env.make_task(&issue_id(2), "ORCH-2", "review", None);
    for (n, task) in [(1, a), (2, b)] {
        let (code, r, err) = deliver(&env, &bytes(&to_state_stale(&issue_id(n), STOP)), &[]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(r["state"], "STOP");
        assert_eq!(r["note"], "cancelled");
        assert_eq!(env.task(task).stage, "cancelled");
        assert!(!err.contains(TOKEN) && !r.to_string().contains(TOKEN));
    }
    states.assert_hits(1);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM plane_states WHERE project_id = '{PROJECT}'"
        )),
        6
    );
}

#[test]
fn an_unreachable_plane_is_a_temporary_failure_that_writes_nothing() {
    let server = MockServer::start();
    let broken = server.mock(|when, then| {
        when.method(GET).path(api("states/"));
        then.status(502).body(format!("upstream said {TOKEN}"));
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let before = snapshot(&env);
    let (code, _, err) = deliver(&env, &bytes(&to_state_stale(ISSUE, STOP)), &[]);
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("HTTP 502") && !err.contains(TOKEN), "{err}");
    assert_eq!(snapshot(&env), before);
    broken.assert_hits(1);
    assert_eq!(env.task(task).stage, "development");
}

#[test]
fn a_comment_retried_after_a_lost_answer_is_not_posted_twice() {
    let server = MockServer::start();
    let comments_path = api(&format!("issues/{ISSUE}/comments/"));
    let mut failing = server.mock(|when, then| {
        when.method(POST).path(comments_path.clone());
        then.status(500);
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    let task = env.make_task(ISSUE, "ORCH-42", "review", None);
    set_project(&env, task, PROJECT);
    let r = ok(&env, &bytes(&to_state(ISSUE, TO_ANALYSE)));
    assert_eq!(r["action"], "refused");
    assert_eq!(r["effects"][0]["status"], "pending", "{r}");
    failing.assert_hits(1);
    failing.delete();

    let ctx = env.ctx();
    let row = ctx
        .store
        .read(|r| r.effects_of_task(task))
        .unwrap()
        .remove(0);
    let external_id = orchctl::outbox::comment_external_id(&row, PROJECT, ISSUE);
    // Plane stored the first attempt after all: the same external_id answers 409.
    let already = server.mock(|when, then| {
        when.method(POST)
            .path(comments_path.clone())
            .json_body_partial(
                json!({ "external_source": "orchctl", "external_id": external_id }).to_string(),
            );
        then.status(409)
            .json_body(json!({ "error": "already exists" }));
    });
    let pass = orchctl::outbox::run_due(&ctx).unwrap();
    assert_eq!(pass.done, 1, "{pass:?}");
    already.assert_hits(1);
    let row = ctx.store.read(|r| r.outbox_row(row.id)).unwrap().unwrap();
    assert_eq!(row.status, "done");
    assert_eq!(row.result.as_deref(), Some("comment was already posted"));
    assert_eq!(row.attempts, 2);
}

fn plane_cfg(server: &MockServer) -> orchctl::config::Plane {
    orchctl::config::Plane {
        url: server.base_url(),
        workspace: WORKSPACE.into(),
        token: Some(orchctl::config::Secret::new(TOKEN)),
    }
}

#[test]
fn a_429_is_waited_out_for_retry_after_then_retried() {
    use orchctl::integrations::plane::PlaneClient;
    let server = MockServer::start();
    let mut limited = server.mock(|when, then| {
        when.method(GET).path(api("states/"));
        then.status(429).header("Retry-After", "2");
    });
    let cfg = plane_cfg(&server);
    let started = Instant::now();
    let (states, requests) = std::thread::scope(|s| {
        let call = s.spawn(|| {
            let client = PlaneClient::new(&cfg, Duration::from_secs(5), Duration::from_secs(10));
            (client.states(PROJECT), client.requests())
        });
        // Plane lets the next request through once the wait is over.
        let deadline = Instant::now() + Duration::from_secs(30);
        while limited.hits() < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        limited.delete();
        states_mock(&server);
        call.join().unwrap()
    });
    let states = states.expect("the retry after Retry-After succeeds");
    assert_eq!(states.len(), 6);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "waited only {:?}",
        started.elapsed()
    );
    assert_eq!(requests, 2);
}

#[test]
fn a_429_beyond_the_wait_bound_fails_at_once_and_a_second_429_gives_up() {
    use orchctl::integrations::plane::PlaneClient;
    let server = MockServer::start();
    let cfg = plane_cfg(&server);
    let long = server.mock(|when, then| {
        when.method(GET).path(api("states/"));
        then.status(429).header("Retry-After", "3600");
    });
    let client = PlaneClient::new(&cfg, Duration::from_secs(5), Duration::from_secs(2));
    let started = Instant::now();
    let e = client.states(PROJECT).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!e.permanent);
    assert_eq!(e.retry_after_secs, Some(3600));
    long.assert_hits(1);

    let server = MockServer::start();
    let cfg = plane_cfg(&server);
    let always = server.mock(|when, then| {
        when.method(GET).path(api("states/"));
        then.status(429).header("Retry-After", "1");
    });
    let client = PlaneClient::new(&cfg, Duration::from_secs(5), Duration::from_secs(2));
    let started = Instant::now();
    let e = client.states(PROJECT).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(e.message.contains("429"), "{}", e.message);
    always.assert_hits(2);
}

#[test]
fn x_ratelimit_remaining_zero_waits_for_the_reset_within_the_bound() {
    use orchctl::integrations::plane::PlaneClient;
    let server = MockServer::start();
    let cfg = plane_cfg(&server);
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let exhausted = server.mock(|when, then| {
        when.method(GET).path(api("states/"));
        then.status(200)
            .header("X-RateLimit-Remaining", "0")
            .header("X-RateLimit-Reset", reset.to_string())
            .body(fixture("states_list.json"));
    });
    // Bound too short: the next request is not even sent.
    let client = PlaneClient::new(&cfg, Duration::from_secs(5), Duration::ZERO);
    client.states(PROJECT).unwrap();
    let e = client.states(PROJECT).unwrap_err();
    assert!(e.message.contains("rate limit"), "{}", e.message);
    exhausted.assert_hits(1);
    // Bound long enough: it waits for the window to reset, then sends.
    let client = PlaneClient::new(&cfg, Duration::from_secs(5), Duration::from_secs(10));
    client.states(PROJECT).unwrap();
    let started = Instant::now();
    client.states(PROJECT).unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    exhausted.assert_hits(3);
}

// ----------------------------------------------------------------------- reconcile

fn listed(id: &str, state: &str) -> Value {
    let mut v = fixture_json("issue_get.json");
    v["id"] = json!(id);
    v["state"] = json!(state);
    v
}

fn page(items: Vec<Value>, next: Option<&str>) -> Value {
    json!({
        "grouped_by": null, "sub_grouped_by": null, "total_count": 3,
        "next_cursor": next.unwrap_or("100:2:0"), "prev_cursor": "100:-1:1",
        "next_page_results": next.is_some(), "prev_page_results": false,
        "count": items.len(), "total_pages": 2, "total_results": 3, "extra_stats": null,
        "results": items,
    })
}

#[test]
fn reconcile_applies_a_missed_stop_and_cancels_a_task_whose_issue_was_deleted() {
    let server = MockServer::start();
    let other_project = "33333333-3333-4333-8333-333333333333";
    // The most specific mocks first: httpmock answers with the first that matches.
    let page2 = server.mock(|when, then| {
        when.method(GET)
            .path(api("issues/"))
            .query_param("cursor", "100:1:0")
            .header("X-Api-Key", TOKEN);
        then.status(200)
            .json_body(page(vec![listed(&issue_id(2), APPROVED)], None));
    });
    let page1 = server.mock(|when, then| {
        when.method(GET)
            .path(api("issues/"))
            .query_param("per_page", "100")
            .header("X-Api-Key", TOKEN);
        then.status(200).json_body(page(
            vec![listed(&issue_id(1), STOP), listed(&issue_id(9), DONE)],
            Some("100:1:0"),
        ));
    });
    let states = states_mock(&server);
    let gone = server.mock(|when, then| {
        when.method(GET)
            .path(api(&format!("issues/{}/", issue_id(3))));
        then.status(404)
            .json_body(json!({ "error": "Issue not found" }));
    });
    let single = server.mock(|when, then| {
        when.method(GET).path_contains(format!(
            "/api/v1/workspaces/{WORKSPACE}/projects/{PROJECT}/issues/4444"
        ));
        then.status(200)
            .json_body(fixture_json("issue_get_expand_state.json"));
    });
    let broken = server.mock(|when, then| {
        when.method(GET).path(format!(
            "/api/v1/workspaces/{WORKSPACE}/projects/{other_project}/issues/"
        ));
        then.status(500);
    });
    let gone_comment = server.mock(|when, then| {
        when.method(POST)
            .path(api(&format!("issues/{}/comments/", issue_id(3))));
        then.status(404);
    });
    let comments = server.mock(|when, then| {
        when.method(POST).path_contains("/comments/");
        then.status(201).json_body(json!({ "id": "c" }));
    });

    let mut env = Env::new();
    with_plane(&mut env, &server);
    let stopped = env.make_task(&issue_id(1), "ORCH-1", "development", None);
    let kept = env.make_task(&issue_id(2), "ORCH-2", "review", None);
    let deleted = env.make_task(&issue_id(3), "ORCH-3", "analysis", None);
    let terminal = env.make_task(&issue_id(4), "ORCH-4", "done", None);
    let elsewhere = env.make_task(&issue_id(5), "ORCH-5", "development", None);
    let unlinked = env.make_task(&issue_id(6), "ORCH-6", "development", None);
    for t in [stopped, kept, deleted, terminal] {
        set_project(&env, t, PROJECT);
    }
    set_project(&env, elsewhere, other_project);
    let agent = Agent::spawn("sleep 60 & sleep 60");
    env.make_job_full(
        stopped,
        "developer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(5),
        1,
        2,
    );

    let r = env.json(&["reconcile"]);
    let p = &r["plane"];
    assert_eq!(p["checked"], 3, "{r}");
    assert_eq!(p["stopped"], 1, "{r}");
    assert_eq!(p["deleted"], 1, "{r}");
    assert_eq!(p["unlinked"], 1, "{r}");
    // Two pages + the states + one look at the absent issue + the failing project.
    assert_eq!(p["requests"], 5, "{r}");
    let errors = p["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{r}");
    assert!(errors[0]["error"].as_str().unwrap().contains(other_project));
    assert!(!r.to_string().contains(TOKEN));

    assert!(
        agent.wait_gone(Duration::from_secs(15)),
        "agent still alive: {:?}",
        agent.group()
    );
    let t = env.task(stopped);
    assert_eq!(t.stage, "cancelled");
    assert!(t.cancel_reason.unwrap().contains("STOP"));
    let t = env.task(deleted);
    assert_eq!(t.stage, "cancelled");
    assert_eq!(
        t.cancel_reason.as_deref(),
        Some(
            format!(
                "the Plane issue {} no longer exists (deleted in Plane)",
                issue_id(3)
            )
            .as_str()
        )
    );
    for (t, stage) in [
        (kept, "review"),
        (terminal, "done"),
        (elsewhere, "development"),
        (unlinked, "development"),
    ] {
        assert_eq!(env.task(t).stage, stage);
    }
    page1.assert_hits(1);
    page2.assert_hits(1);
    states.assert_hits(1);
    gone.assert_hits(1);
    single.assert_hits(0);
    broken.assert_hits(1);
    gone_comment.assert_hits(1);
    comments.assert_hits(1);
    // The deleted issue's farewell comment had nowhere to go: done, not failed forever.
    // (The branch deletions have no Gitea and no clone to push from: failed, SPEC §4.)
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status <> 'done' AND NOT (kind = 'delete_remote_branch' AND last_error LIKE 'cannot be attempted%')"),
        0
    );

    // The next pass finds nothing more to do: terminal tasks are never fetched.
    let r = env.json(&["reconcile"]);
    assert_eq!(r["plane"]["checked"], 1, "{r}");
    assert_eq!(r["plane"]["stopped"], 0);
    gone.assert_hits(1);
}

#[test]
fn reconcile_with_the_kill_switch_off_asks_plane_nothing() {
    let server = MockServer::start();
    let any = server.mock(|when, then| {
        when.path_contains("/api/");
        then.status(500);
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    env.set("ORCH_STOP_ENABLED", "0");
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    set_project(&env, task, PROJECT);
    let r = env.json(&["reconcile"]);
    assert_eq!(r["plane"]["stop_disabled"], 1, "{r}");
    assert_eq!(r["plane"]["requests"], 0);
    any.assert_hits(0);
    assert_eq!(env.task(task).stage, "development");
}

// ------------------------------------------------------------------ the shipped shims

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// `program` with exactly this test's environment (the one orchctl gets), plus the shims'
/// `ORCHCTL`.
fn command_in(env: &Env, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for (k, v) in env.cmd().get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd.env("ORCHCTL", BIN);
    cmd
}

/// Whether this test process runs as root (then the webhook server is started as
/// [`SERVER_USER`], as the shipped systemd drop-in runs it as `orchctl`).
fn is_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

/// The unprivileged user and group the server runs as when the tests run as root.
const SERVER_USER: (&str, &str) = ("nobody", "nogroup");

/// Prefixes `cmd` to run as [`SERVER_USER`] when the tests run as root (setpriv execs the
/// program, so the pid is the program's own); as any other user it runs as that user.
fn unprivileged(program: &str, args: &[&str]) -> (String, Vec<String>) {
    if !is_root() {
        return (
            program.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        );
    }
    let mut all = vec![
        format!("--reuid={}", SERVER_USER.0),
        format!("--regid={}", SERVER_USER.1),
        "--clear-groups".to_string(),
        program.to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    ("setpriv".to_string(), all)
}

/// Makes this test's folder the server user's: the shims and the binary are put inside it
/// (the checkout may sit where that user cannot go), a `tmp/` for the server's temporary
/// files, and everything handed over with `chown -R`. Returns the folder of the shims.
fn hand_over(env: &Env) -> PathBuf {
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(env.path().join("tmp")).unwrap();
    let orchctl = bin.join("orchctl");
    if std::fs::hard_link(BIN, &orchctl).is_err() {
        std::fs::copy(BIN, &orchctl).unwrap();
    }
    for shim in ["plane-webhook-shim", "orchctl-read-shim"] {
        std::fs::copy(scripts().join(shim), bin.join(shim)).unwrap();
    }
    if is_root() {
        let owner = format!("{}:{}", SERVER_USER.0, SERVER_USER.1);
        let out = Command::new("chown")
            .args(["-R", &owner])
            .arg(env.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    bin
}

/// The real `webhook` server, killed (and reaped) when dropped, even if the test fails.
struct WebhookServer {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WebhookServer {
    /// Starts `webhook` with `flags` (the shipped drop-in's, `-hooks` and `-port` filled
    /// in here) as an unprivileged user, with this test's environment, `ORCHCTL` pointing
    /// at `bin/orchctl` and `TMPDIR` at the test's `tmp/`.
    fn start(env: &Env, bin: &Path, hooks: &Path, flags: &[String]) -> WebhookServer {
        match Command::new("webhook").arg("-version").output() {
            Ok(o) if o.status.success() => {}
            _ => panic!(
                "the end-to-end test needs the `webhook` server on PATH (Debian package `webhook`, \
                 adnanh/webhook): apt-get install webhook — scripts/test and .ci/run install it"
            ),
        }
        if is_root() && Command::new("setpriv").arg("--version").output().is_err() {
            panic!("the end-to-end test needs setpriv (util-linux) to drop root");
        }
        // A port that was free a moment ago; the bind race is retried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut args: Vec<String> = Vec::new();
            let mut it = flags.iter();
            while let Some(f) = it.next() {
                match f.as_str() {
                    "-hooks" | "-port" => {
                        it.next();
                    }
                    _ => args.push(f.clone()),
                }
            }
            args.extend([
                "-hooks".to_string(),
                hooks.display().to_string(),
                "-port".to_string(),
                port.to_string(),
                "-verbose".to_string(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (program, argv) = unprivileged("webhook", &args);
            let log = env.path().join(format!("webhook-{port}.log"));
            let mut cmd = command_in(env, program);
            cmd.env("ORCHCTL", bin.join("orchctl"))
                .env("TMPDIR", env.path().join("tmp"))
                .current_dir(env.path())
                .args(argv)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(Stdio::from(
                    std::fs::File::options().append(true).open(&log).unwrap(),
                ));
            let mut server = WebhookServer {
                child: cmd.spawn().unwrap(),
                log,
                port,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if server.child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
            eprintln!(
                "webhook did not come up on port {port}: {}",
                server.log_text()
            );
        }
        panic!("the webhook server did not start");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn post(&self, body: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
        let agent = orchctl::integrations::http::agent(Duration::from_secs(60));
        let url = format!("http://127.0.0.1:{}/hooks/plane", self.port);
        let mut req = agent.post(url.as_str());
        req = req
            .header("Content-Type", "application/json")
            .header("User-Agent", "Autopilot");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send(body).unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().read_to_string().unwrap())
    }

    /// `GET /hooks/<hook>`: (status, Content-Type, body).
    fn get(&self, hook: &str) -> (u16, String, String) {
        let agent = orchctl::integrations::http::agent(Duration::from_secs(60));
        let url = format!("http://127.0.0.1:{}/hooks/{hook}", self.port);
        let resp = agent.get(url.as_str()).call().unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (
            status,
            content_type,
            resp.into_body().read_to_string().unwrap(),
        )
    }
}

/// The server's flags from the shipped systemd drop-in's `ExecStart=`, which must run it
/// as the unprivileged `orchctl` user with its own temp dir.
fn drop_in_flags() -> Vec<String> {
    let unit =
        std::fs::read_to_string(scripts().join("systemd/webhook.service.d/orchctl.conf")).unwrap();
    assert!(unit.lines().any(|l| l == "User=orchctl"), "{unit}");
    assert!(unit.lines().any(|l| l == "PrivateTmp=yes"), "{unit}");
    let exec = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .next_back()
        .expect("an ExecStart= line");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/webhook"), "{exec}");
    let flags: Vec<String> = words.map(String::from).collect();
    assert!(flags.iter().any(|f| f == "-template"), "{exec}");
    flags
}

/// Names in `/`, to show that the server wrote nothing there.
fn root_entries() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn end_to_end_a_signed_delivery_through_the_real_webhook_server_stops_the_task() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    let task = env.make_task(ISSUE, "ORCH-42", "deploy", None);
    // The agent runs as the server's user, as agents and server both run as `orchctl` in
    // production: a STOP through the server may only signal its own user's processes.
    let agent = if is_root() {
        Agent::spawn(&format!(
            "exec setpriv --reuid={} --regid={} --clear-groups sh -c 'sleep 60 & sleep 60'",
            SERVER_USER.0, SERVER_USER.1
        ))
    } else {
        Agent::spawn("sleep 60 & sleep 60")
    };
    let job = env.make_job_full(
        task,
        "deployer",
        "running",
        Some(agent.pid),
        Some(agent.start),
        Some(11),
        1,
        2,
    );

    // The shipped hooks file, with the shims' install path pointed at copies in the test's
    // folder (the server's user may not reach the checkout).
    let bin = hand_over(&env);
    let mut hooks: Value =
        serde_json::from_slice(&std::fs::read(scripts().join("plane-webhook.hooks.json")).unwrap())
            .unwrap();
    let mut ids = Vec::new();
    for hook in hooks.as_array_mut().unwrap() {
        ids.push(hook["id"].as_str().unwrap().to_string());
        assert!(hook.get("command-working-directory").is_none(), "{hook}");
        let shim = Path::new(hook["execute-command"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_owned();
        hook["execute-command"] = json!(bin.join(shim));
    }
    assert_eq!(ids, ["plane", "queue", "metrics"]);
    assert_eq!(
        hooks[0]["pass-file-to-command"][0]["source"],
        "raw-request-body"
    );
    let hooks_file = env.path().join("hooks.json");
    std::fs::write(&hooks_file, serde_json::to_vec_pretty(&hooks).unwrap()).unwrap();
    let before_root = root_entries();
    let server = WebhookServer::start(&env, &bin, &hooks_file, &drop_in_flags());

    // Unsigned and wrongly signed deliveries are refused by the server itself with 401:
    // orchctl never runs and nothing is written.
    let body = fixture("issue_update_state_change.wire.json");
    let before = snapshot(&env);
    let (status, text) = server.post(&body, &[("X-Plane-Event", "issue")]);
    assert_eq!(status, 401, "{text}\n{}", server.log_text());
    let zeros = "0".repeat(64);
    for wrong in ["--help", "00", zeros.as_str()] {
        let (status, text) = server.post(
            &body,
            &[("X-Plane-Event", "issue"), ("X-Plane-Signature", wrong)],
        );
        assert_eq!(status, 401, "{wrong}: {text}\n{}", server.log_text());
    }
    assert_eq!(snapshot(&env), before);
    let log = server.log_text();
    assert_eq!(
        log.matches("didn't get triggered because the trigger rules were not satisfied")
            .count(),
        4,
        "{log}"
    );
    assert!(!log.contains("executing"), "orchctl ran: {log}");
    assert_eq!(env.task(task).stage, "deploy");
    assert!(!agent.group().is_empty());

    let (status, text) = server.post(
        &body,
        &[
            ("X-Plane-Delivery", "0b5c6d2e-1111-4222-8333-444455556666"),
            ("X-Plane-Event", "issue"),
            (
                "X-Plane-Signature",
                "61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066",
            ),
        ],
    );
    assert_eq!(status, 200, "{text}\n{}", server.log_text());
    let r: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(r["action"], "stop");
    assert_eq!(r["note"], "cancelled");
    assert_eq!(r["delivery"], "0b5c6d2e-1111-4222-8333-444455556666");
    assert_eq!(
        r["body_sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body))
    );
    assert!(
        agent.wait_gone(Duration::from_secs(15)),
        "agent still alive: {:?}",
        agent.group()
    );
    assert_eq!(env.task(task).stage, "cancelled");
    assert_eq!(env.job_status(job), "cancelled");

    // Plane's retry of the same body is a duplicate.
    let (status, text) = server.post(
        &body,
        &[
            ("X-Plane-Event", "issue"),
            (
                "X-Plane-Signature",
                "61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066",
            ),
        ],
    );
    assert_eq!(status, 200);
    assert!(text.contains("\"action\":\"duplicate\""), "{text}");

    // The reads: the queue as JSON, the metrics as Prometheus text.
    let (status, content_type, text) = server.get("queue");
    assert_eq!(status, 200, "{text}\n{}", server.log_text());
    assert_eq!(content_type, "application/json");
    let q: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(q["counts"]["cancelled"], 1, "{q}");
    assert_eq!(q["stop"]["cancelled_count"], 1, "{q}");
    let (status, content_type, text) = server.get("metrics");
    assert_eq!(status, 200, "{text}\n{}", server.log_text());
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    crate::ops::promtool_check(&text);
    assert!(
        text.contains("\norchctl_tasks{stage=\"cancelled\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\norchctl_jobs{status=\"cancelled\"} 1\n"),
        "{text}"
    );

    // Each body went to a file in the server's temp dir, and nothing was left in `/`.
    let log = server.log_text();
    let tmp = env.path().join("tmp");
    let bodies: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("writing env BODY_FILE file ").nth(1))
        .collect();
    assert_eq!(bodies.len(), 2, "{log}");
    for b in bodies {
        assert!(Path::new(b.trim()).starts_with(&tmp), "{b}");
    }
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    drop(server);
    assert_eq!(root_entries(), before_root);
}

#[test]
fn the_cgi_shim_maps_headers_and_exit_codes() {
    let mut env = Env::new();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let body = fixture("issue_update_state_change.wire.json");
    let cgi = |sig: &str| -> String {
        let mut child = command_in(&env, scripts().join("plane-event.cgi"))
            .env("REQUEST_METHOD", "POST")
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("HTTP_X_PLANE_EVENT", "issue")
            .env("HTTP_X_PLANE_DELIVERY", "$(touch pwned)")
            .env("HTTP_X_PLANE_SIGNATURE", sig)
            .current_dir(env.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&body).unwrap();
        // A CGI server may keep stdin open: the shim reads CONTENT_LENGTH bytes only.
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        String::from_utf8(out.stdout).unwrap()
    };
    let out = cgi("0000");
    assert!(out.starts_with("Status: 401 Unauthorized\r\n"), "{out}");
    assert_eq!(env.task(task).stage, "development");
    let out = cgi("61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066");
    assert!(
        out.starts_with("Status: 200 OK\r\nContent-Type: application/json\r\n\r\n"),
        "{out}"
    );
    let r: Value = serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
    assert_eq!(r["note"], "cancelled");
    assert_eq!(r["delivery"], "$(touch pwned)");
    assert!(!env.path().join("pwned").exists());
    assert_eq!(env.task(task).stage, "cancelled");
}
