//! Issue 7 on the Plane intake (`orchctl event`): hostile bodies, Plane outages while an
//! event needs Plane, secrets in every output, and replays.
//!
//! Many generated cases go through `orchctl::event::handle` on one library `Ctx` (proptest,
//! modest case counts); the cases where the process itself matters (stack depth, the 1 MiB
//! stdin limit, exit codes, stderr, timing, two processes at once) go through the real
//! binary. "Nothing written" is checked on every row of every table, and through the binary
//! on SQLite on the database file's bytes too.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use httpmock::prelude::*;
use orchctl::error::{exit_kind, ExitKind};
use orchctl::event::{handle, Delivery, EventResult};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};

use crate::common::{Agent, Env, GitRepo, Snapshot, TestDb};
use crate::event::{
    api, bytes, fixture, fixture_json, issue_id, sign, states_mock, to_state, to_state_stale,
    with_plane, APPROVED, ISSUE, PROJECT, SECRET, STOP, TOKEN, TO_ANALYSE, WORKSPACE,
};

// ------------------------------------------------------------------------------ helpers

/// Every row of every table (and the schema version), as text.
fn dump_with(c: &TestDb) -> BTreeMap<String, Vec<String>> {
    let mut out = c.dump_tables();
    out.insert(
        "schema version".into(),
        vec![c.schema_version().to_string()],
    );
    out
}

fn dump(env: &Env) -> BTreeMap<String, Vec<String>> {
    dump_with(&env.db())
}

/// "Nothing written": every row, and on SQLite the database file and its write-ahead log
/// byte for byte (the `-shm` index is scratch memory).
fn state(env: &Env) -> Snapshot {
    env.snapshot()
}

/// Opens the database once through the library (creating and migrating it) and closes
/// every connection, so that its bytes are settled before a "nothing written" check.
fn settle(env: &Env) {
    drop(env.db());
}

fn kind_of(r: &anyhow::Result<EventResult>) -> Option<ExitKind> {
    r.as_ref().err().map(exit_kind)
}

const ACTIONS: [&str; 6] = [
    "stop",
    "start_pipeline",
    "job_queued",
    "refused",
    "ignored",
    "duplicate",
];

/// Runs `handle` and checks what must hold for any input: no panic (proptest reports one),
/// an error is 65 or 78 (a route the configuration cannot serve) and leaves every table as
/// it was, a success has a known action.
fn check_any(
    ctx: &orchctl::Ctx,
    conn: &TestDb,
    body: &[u8],
    d: &Delivery,
) -> Result<anyhow::Result<EventResult>, TestCaseError> {
    let before = dump_with(conn);
    let r = handle(ctx, body, d);
    match &r {
        Ok(res) => {
            prop_assert!(ACTIONS.contains(&res.action.as_str()), "{res:?}");
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| TestCaseError::fail(format!("accepted a non-JSON body: {e}")))?;
            prop_assert!(v.is_object(), "accepted a non-object: {v}");
        }
        Err(e) => {
            let k = exit_kind(e);
            prop_assert!(
                matches!(k, ExitKind::DataErr | ExitKind::Config),
                "unexpected {k:?}: {e:#}"
            );
            prop_assert_eq!(
                &dump_with(conn),
                &before,
                "an error wrote something: {:#}",
                e
            );
        }
    }
    Ok(r)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(PtConfig {
        cases,
        // No regression files in the source tree; a failure prints its minimal input.
        failure_persistence: None,
        ..PtConfig::default()
    })
}

/// Bytes that look a little like JSON: brackets, quotes, escapes, the field names the
/// routes read, invalid UTF-8 (lone continuation bytes, surrogates, overlong forms), NUL.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b":".to_vec()),
        Just(b",".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"\\u".to_vec()),
        Just(b"\"\\ud800\"".to_vec()),
        Just(b"null".to_vec()),
        Just(b"true".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"-0".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"\"event\"".to_vec()),
        Just(b"\"issue\"".to_vec()),
        Just(b"\"action\"".to_vec()),
        Just(b"\"updated\"".to_vec()),
        Just(b"\"data\"".to_vec()),
        Just(b"\"activity\"".to_vec()),
        Just(b"\"state\"".to_vec()),
        Just(vec![0xff]),
        Just(vec![0xc3]),
        Just(vec![0xc0, 0x80]),
        Just(vec![0xed, 0xa0, 0x80]),
        Just(vec![0xef, 0xbb, 0xbf]),
        Just(vec![0]),
        Just(b" \n\t".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        proptest::collection::vec(piece, 0..48).prop_map(|v| v.concat()),
    ]
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("event".to_string()),
        Just("action".to_string()),
        Just("data".to_string()),
        Just("activity".to_string()),
        Just("id".to_string()),
        Just("state".to_string()),
        Just("name".to_string()),
        ".{0,8}",
    ]
}

/// Any JSON value, leaning towards the strings the routes compare against.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
        prop_oneof![
            Just("issue"),
            Just("updated"),
            Just("created"),
            Just("state_id"),
            Just("STOP"),
            Just("To Analyse"),
            Just(STOP),
            Just(ISSUE),
            Just(PROJECT),
            Just(""),
            Just("x#cancelled-1"),
            Just("'; DROP TABLE tasks; --"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(json_key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON path the intake reads, the types it accepts there, and whether it must be there.
struct Site {
    path: &'static str,
    accepts: &'static [&'static str],
    required: bool,
}

const fn site(path: &'static str, accepts: &'static [&'static str], required: bool) -> Site {
    Site {
        path,
        accepts,
        required,
    }
}

/// What a state change (`issue` / `updated`) reads.
const UPDATED_SITES: &[Site] = &[
    site("event", &["string"], true),
    site("action", &["string"], true),
    site("data", &["object"], true),
    site("data.id", &["string"], true),
    site("data.project", &["string"], false),
    site("data.state", &["object", "string"], false),
    site("data.state.id", &["string"], false),
    site("data.state.name", &["string"], false),
    site("activity", &["object"], true),
    site("activity.field", &["string"], false),
    site("activity.new_value", &["string"], true),
];

/// What a new issue created in To Analyse reads (it starts a pipeline).
const CREATED_SITES: &[Site] = &[
    site("event", &["string"], true),
    site("action", &["string"], true),
    site("data", &["object"], true),
    site("data.id", &["string"], true),
    site("data.project", &["string"], true),
    site("data.state", &["object", "string"], true),
    site("data.state.id", &["string"], true),
    site("data.state.name", &["string"], false),
    site("data.sequence_id", &["integer"], true),
    site("data.name", &["string"], false),
];

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn set_path(root: &mut Value, path: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = &mut cur[*p];
    }
    cur[parts[parts.len() - 1]] = v;
}

/// A STOP for the issue of a live task, its state named in the payload.
fn updated_base(issue: &str) -> Value {
    to_state(issue, STOP)
}

/// A new issue created in To Analyse.
fn created_base(issue: &str, seq: i64) -> Value {
    let mut v = fixture_json("issue_created.json");
    v["data"]["id"] = json!(issue);
    v["data"]["sequence_id"] = json!(seq);
    v
}

/// The expectations for one value at one site, on top of [`check_any`]: a present value of
/// a type the site does not accept, or a required one missing, is exit 65 naming the path.
fn check_site(
    site: &Site,
    value: &Value,
    r: &anyhow::Result<EventResult>,
) -> Result<(), TestCaseError> {
    let t = json_type(value);
    let wrong = if t == "null" {
        site.required
    } else {
        !site.accepts.contains(&t)
    };
    if wrong {
        let Err(e) = r else {
            return Err(TestCaseError::fail(format!(
                "{} = {value} was accepted: {:?}",
                site.path,
                r.as_ref().ok()
            )));
        };
        prop_assert_eq!(exit_kind(e), ExitKind::DataErr, "{}: {:#}", site.path, e);
        let msg = format!("{e:#}");
        prop_assert!(
            msg.contains(&format!("`{}", site.path)) || msg.contains(site.path),
            "{} = {value}: the message does not name the path: {msg}",
            site.path
        );
    }
    Ok(())
}

/// An environment that can start pipelines without Plane.
fn intake_env() -> Env {
    let mut env = Env::new();
    env.set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_PROJECT_IDENTIFIERS", &format!("{PROJECT}=ORCH"));
    env
}

fn no_headers() -> Delivery {
    Delivery::default()
}

fn signed(body: &[u8]) -> Delivery {
    Delivery {
        signature: Some(sign(body)),
        ..Delivery::default()
    }
}

/// A port nothing listens on (bound a moment ago, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "event failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}): {}", self.stdout))
    }
}

/// `orchctl ARGS < body` with a watchdog: a command still running after `limit` is killed
/// and the test fails, instead of hanging the suite.
fn run_within(env: &Env, args: &[&str], body: &[u8], limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = env
        .cmd()
        .args(args)
        .current_dir(env.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = body.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("orchctl {args:?} still ran after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    writer.join().unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed,
    }
}

fn event_within(env: &Env, body: &[u8], args: &[&str], limit: Duration) -> Run {
    let mut a = vec!["event"];
    a.extend_from_slice(args);
    run_within(env, &a, body, limit)
}

/// The watchdog for commands that should be quick.
const QUICK: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ 1. hostile bodies

#[test]
fn arbitrary_bytes_are_refused_with_65_and_write_nothing() {
    let env = intake_env();
    env.make_task(ISSUE, "ORCH-42", "development", None);
    let ctx = env.ctx();
    let conn = env.db();
    runner(256)
        .run(&hostile_bytes(), |body| {
            let r = check_any(&ctx, &conn, &body, &no_headers())?;
            if serde_json::from_slice::<Value>(&body).is_err() {
                prop_assert_eq!(kind_of(&r), Some(ExitKind::DataErr));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn with_a_secret_every_unsigned_or_forged_body_is_77_before_it_is_parsed() {
    let mut env = intake_env();
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    env.make_task(ISSUE, "ORCH-42", "development", None);
    let ctx = env.ctx();
    let conn = env.db();
    let valid = bytes(&to_state(ISSUE, STOP));
    let sig = prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[0-9a-f]{64}".prop_map(Some),
        ".{0,80}".prop_map(Some),
        // A real signature, but of other bytes.
        Just(Some(sign(&valid))),
        Just(Some(sign(b""))),
    ];
    runner(256)
        .run(&(hostile_bytes(), sig), |(body, signature)| {
            let before = dump_with(&conn);
            prop_assume!(signature.as_deref() != Some(sign(&body).as_str()));
            let d = Delivery {
                signature,
                ..Delivery::default()
            };
            let r = handle(&ctx, &body, &d);
            prop_assert_eq!(kind_of(&r), Some(ExitKind::NoPerm), "{:?}", r.as_ref().ok());
            prop_assert_eq!(&dump_with(&conn), &before);
            // The same hostile body, correctly signed, reaches the parser.
            let r = check_any(&ctx, &conn, &body, &signed(&body))?;
            if serde_json::from_slice::<Value>(&body).is_err() {
                prop_assert_eq!(kind_of(&r), Some(ExitKind::DataErr));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn valid_json_that_is_not_an_object_is_65() {
    let env = intake_env();
    let ctx = env.ctx();
    let conn = env.db();
    runner(128)
        .run(&json_value(), |v| {
            prop_assume!(!v.is_object());
            let r = check_any(&ctx, &conn, &bytes(&v), &no_headers())?;
            let e = r.expect_err("a non-object was accepted");
            prop_assert_eq!(exit_kind(&e), ExitKind::DataErr);
            prop_assert!(format!("{e:#}").contains("`$` must be an object"), "{e:#}");
            Ok(())
        })
        .unwrap();
}

/// Every path a route reads, with a value of every JSON type: the wrong ones are 65 naming
/// the path, nothing else is ever written by a refused delivery.
#[test]
fn every_path_with_every_json_type() {
    let env = intake_env();
    let ctx = env.ctx();
    let conn = env.db();
    let samples = [
        Value::Null,
        json!(true),
        json!(7),
        json!(-3),
        json!(1.5),
        json!("s"),
        json!([]),
        json!([STOP]),
        json!({}),
        json!({ "id": STOP, "name": "STOP" }),
    ];
    let mut n = 0;
    for (sites, updated) in [(UPDATED_SITES, true), (CREATED_SITES, false)] {
        for site in sites {
            for v in &samples {
                n += 1;
                let issue = issue_id(1000 + n);
                let mut body = if updated {
                    env.make_task(&issue, &format!("ORCH-{}", 1000 + n), "development", None);
                    updated_base(&issue)
                } else {
                    created_base(&issue, 1000 + n as i64)
                };
                set_path(&mut body, site.path, v.clone());
                let r = check_any(&ctx, &conn, &bytes(&body), &no_headers())
                    .unwrap_or_else(|e| panic!("{} = {v}: {e}", site.path));
                check_site(site, v, &r).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

/// One wrong type at each path, through the binary: exit 65, one line naming the path, the
/// database file untouched.
#[test]
fn a_wrong_type_at_each_path_through_the_binary() {
    let env = intake_env();
    env.make_task(ISSUE, "ORCH-42", "development", None);
    settle(&env);
    let before = state(&env);
    for (sites, updated) in [(UPDATED_SITES, true), (CREATED_SITES, false)] {
        for site in sites {
            let wrong = match site.accepts[0] {
                "string" => json!(["a string in a list"]),
                "integer" => json!("42"),
                _ => json!(42),
            };
            let mut body = if updated {
                updated_base(ISSUE)
            } else {
                created_base(&issue_id(7), 7)
            };
            set_path(&mut body, site.path, wrong.clone());
            let r = event_within(&env, &bytes(&body), &[], QUICK);
            assert_eq!(r.code, 65, "{} = {wrong}: {}", site.path, r.stderr);
            assert!(
                r.stderr.starts_with(&format!(
                    "orchctl: malformed Plane delivery: `{}",
                    site.path
                )),
                "{}: {}",
                site.path,
                r.stderr
            );
            assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
            assert!(r.stdout.is_empty());
        }
    }
    assert_eq!(state(&env), before);
}

#[test]
fn arbitrary_values_at_the_paths_the_routes_read() {
    let env = intake_env();
    let ctx = env.ctx();
    let conn = env.db();
    let seq = std::cell::Cell::new(5000i64);
    let sites = prop_oneof![
        (0..UPDATED_SITES.len()).prop_map(|i| (true, i)),
        (0..CREATED_SITES.len()).prop_map(|i| (false, i)),
    ];
    runner(256)
        .run(&(sites, json_value()), |((updated, i), v)| {
            seq.set(seq.get() + 1);
            let seq = seq.get();
            let issue = issue_id(seq as u32);
            let (site, mut body) = if updated {
                env.make_task(&issue, &format!("ORCH-{seq}"), "review", None);
                (&UPDATED_SITES[i], updated_base(&issue))
            } else {
                (&CREATED_SITES[i], created_base(&issue, seq))
            };
            set_path(&mut body, site.path, v.clone());
            let r = check_any(&ctx, &conn, &bytes(&body), &no_headers())?;
            check_site(site, &v, &r)
        })
        .unwrap();
}

#[test]
fn ids_that_cannot_be_keys_and_sequence_ids_that_are_not_positive_are_65() {
    let env = intake_env();
    let ctx = env.ctx();
    let conn = env.db();
    let cases: Vec<(Value, &str)> = vec![
        (created_base("", 1), "`data.id`"),
        (created_base("   ", 1), "`data.id`"),
        (created_base("abc#cancelled-1", 1), "`data.id`"),
        (created_base("abc\u{0}def", 1), "`data.id`"),
        (created_base("abc\ndef", 1), "`data.id`"),
        (created_base(ISSUE, 0), "`data.sequence_id`"),
        (created_base(ISSUE, -42), "`data.sequence_id`"),
        (
            {
                let mut v = created_base(ISSUE, 1);
                v["data"]["project"] = json!("p#1");
                v
            },
            "`data.project`",
        ),
    ];
    for (body, path) in cases {
        let r = check_any(&ctx, &conn, &bytes(&body), &no_headers()).unwrap();
        let e = r.err().unwrap_or_else(|| panic!("{path}: accepted"));
        assert_eq!(exit_kind(&e), ExitKind::DataErr, "{e:#}");
        assert!(format!("{e:#}").contains(path), "{path}: {e:#}");
    }
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 0);
}

/// 100 000 levels of nesting: serde_json's recursion limit answers 65; no stack overflow
/// (which would kill the process with a signal, not an exit code).
#[test]
fn deep_nesting_is_65_never_a_crash() {
    let mut env = intake_env();
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let depth = 100_000;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let cases: Vec<Vec<u8>> = vec![
        arrays.clone().into_bytes(),
        objects.into_bytes(),
        "[".repeat(depth).into_bytes(),
        format!(r#"{{"event":"issue","action":"updated","data":{arrays}}}"#).into_bytes(),
        format!(
            r#"{{"event":"issue","action":"updated","data":{{"id":"{ISSUE}","state":{arrays}}},"activity":{{"field":"state_id","new_value":"{STOP}"}}}}"#
        )
        .into_bytes(),
    ];
    settle(&env);
    let before = state(&env);
    for body in &cases {
        assert!(body.len() < 1 << 20);
        let r = event_within(&env, body, &[], QUICK);
        assert_eq!(r.code, 65, "stderr: {}", r.stderr);
        assert!(r.stderr.contains("recursion limit"), "{}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
        assert_eq!(state(&env), before);
    }
    // Through the library on a test thread's (smaller) stack as well.
    {
        let ctx = env.ctx();
        for body in &cases {
            let r = handle(&ctx, body, &no_headers());
            assert_eq!(kind_of(&r), Some(ExitKind::DataErr));
        }
    }
    // With a secret, a forged deep body is refused for its signature before it is parsed;
    // a correctly signed one still gets 65 from the parser.
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    for body in &cases {
        let r = event_within(&env, body, &["--signature", &"0".repeat(64)], QUICK);
        assert_eq!(r.code, 77, "{}", r.stderr);
        let r = event_within(&env, body, &["--signature", &sign(body)], QUICK);
        assert_eq!(r.code, 65, "{}", r.stderr);
    }
    assert_eq!(state(&env), before);
    assert_eq!(env.task(task).stage, "development");
}

/// The 1 MiB limit on stdin: exactly 1 MiB is read and handled, one byte more is refused
/// before anything else happens (a forged oversized body is refused for its size: it is
/// never parsed, and its signature cannot be checked without reading it whole).
#[test]
fn huge_bodies_up_to_the_limit_work_and_beyond_it_are_65() {
    const LIMIT: usize = 1 << 20;
    let mut env = intake_env();
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);

    let padded = |v: &Value, total: usize| -> Vec<u8> {
        let mut v = v.clone();
        v["data"]["description_html"] = json!("");
        let base = bytes(&v).len();
        v["data"]["description_html"] = json!("y".repeat(total - base));
        let b = bytes(&v);
        assert_eq!(b.len(), total);
        b
    };
    let stop = to_state(ISSUE, STOP);
    let over = padded(&stop, LIMIT + 1);
    settle(&env);
    let before = state(&env);
    let r = event_within(&env, &over, &[], QUICK);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("larger than 1 MiB"), "{}", r.stderr);
    let much_over = padded(&stop, 4 * LIMIT);
    assert_eq!(event_within(&env, &much_over, &[], QUICK).code, 65);
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    let r = event_within(&env, &over, &["--signature", &sign(&over)], QUICK);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert_eq!(state(&env), before);
    assert_eq!(env.task(task).stage, "development");

    // Exactly the limit, signed: handled.
    let exact = padded(&stop, LIMIT);
    let r = event_within(&env, &exact, &["--signature", &sign(&exact)], QUICK).json();
    assert_eq!(r["note"], "cancelled", "{r}");

    // A title of almost 1 MiB is stored whole; the branch takes a short slug of it.
    let mut created = created_base(&issue_id(77), 77);
    let title = format!("Huge {}", "word ".repeat(200_000));
    created["data"]["name"] = json!(title);
    let body = bytes(&created);
    assert!(body.len() < LIMIT);
    let r = event_within(&env, &body, &["--signature", &sign(&body)], QUICK).json();
    assert_eq!(r["action"], "start_pipeline", "{}", &r.to_string()[..200]);
    let id = r["task"]["id"].as_i64().unwrap();
    assert_eq!(env.task(id).title.as_deref(), Some(title.trim()));
    let branch = env.task(id).branch.unwrap();
    assert!(
        branch.starts_with("feature/ORCH-77-huge-word-word"),
        "{branch}"
    );
    assert!(branch.len() < 80, "{branch}");
}

#[test]
fn non_utf8_and_non_object_bodies_through_the_binary() {
    let mut env = intake_env();
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    let mut non_utf8 = bytes(&to_state(ISSUE, STOP));
    // An invalid UTF-8 byte inside a string value of an otherwise valid delivery.
    let at = non_utf8.windows(4).position(|w| w == b"STOP").unwrap();
    non_utf8[at + 1] = 0xff;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (non_utf8, "not JSON"),
        (vec![0xff, 0xfe, 0x00, 0x7b], "not JSON"),
        (b"".to_vec(), "not JSON"),
        (b"\xef\xbb\xbf{}".to_vec(), "not JSON"),
        (b"[1, 2]".to_vec(), "`$` must be an object"),
        (b"\"issue\"".to_vec(), "`$` must be an object"),
        (b"42".to_vec(), "`$` must be an object"),
        (b"null".to_vec(), "`$` must be an object"),
        (b"true".to_vec(), "`$` must be an object"),
        (b"{} {}".to_vec(), "not JSON"),
    ];
    settle(&env);
    let before = state(&env);
    for (body, want) in &cases {
        let r = event_within(&env, body, &[], QUICK);
        assert_eq!(r.code, 65, "{want}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{want}: {}", r.stderr);
        assert!(r.stdout.is_empty());
    }
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    for (body, want) in &cases {
        assert_eq!(event_within(&env, body, &[], QUICK).code, 77, "{want}");
        let r = event_within(&env, body, &["--signature", &sign(body)], QUICK);
        assert_eq!(r.code, 65, "{want}: {}", r.stderr);
    }
    assert_eq!(state(&env), before);
    assert_eq!(env.task(task).stage, "development");
}

/// SQL-looking text in ids, titles, headers is data: stored and echoed byte for byte.
#[test]
fn sql_looking_strings_are_stored_verbatim() {
    let env = intake_env();
    let issue = "x'); DROP TABLE tasks; --";
    let title = "Robert'); DELETE FROM jobs WHERE ('1'='1";
    let delivery = "1' OR '1'='1\"; DROP TABLE plane_deliveries; --";
    let mut v = created_base(issue, 7);
    v["data"]["name"] = json!(title);
    let body = bytes(&v);
    let r = event_within(&env, &body, &["--delivery", delivery], QUICK).json();
    assert_eq!(r["action"], "start_pipeline", "{r}");
    assert_eq!(r["delivery"], delivery);
    let id = r["task"]["id"].as_i64().unwrap();
    let t = env.task(id);
    assert_eq!(t.plane_id.as_deref(), Some(issue));
    assert_eq!(t.plane_issue_id.as_deref(), Some(issue));
    assert_eq!(t.title.as_deref(), Some(title));
    let stored: String = env
        .db()
        .value("SELECT delivery_id FROM plane_deliveries", ());
    assert_eq!(stored, delivery);
    // The task resolves by that id, and the tables are all still there.
    let shown = env.json(&["task", "show", issue]);
    assert_eq!(shown["task"]["id"], id, "{shown}");
    assert_eq!(env.count("SELECT count(*) FROM jobs"), 1);

    // An unknown event name from the header is recorded as given.
    let mut other = fixture_json("issue_comment_created.json");
    other.as_object_mut().unwrap().remove("event");
    let name = "issue'; DROP TABLE tasks; --";
    let r = event_within(&env, &bytes(&other), &["--event", name], QUICK).json();
    assert_eq!(r["action"], "ignored");
    assert_eq!(r["note"], format!("event:{name}"));
    let stored: i64 = env.db().value(
        "SELECT count(*) FROM plane_deliveries WHERE event = ?1",
        [name],
    );
    assert_eq!(stored, 1);
    assert_eq!(env.count("SELECT count(*) FROM tasks"), 1);
}

fn files_named_like(dir: &Path, needle: &str, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(p.clone());
        }
        if p.is_dir() && !p.is_symlink() {
            files_named_like(&p, needle, found);
        }
    }
}

/// A branch name holding `$(…)`, `;` and backticks (the project identifier comes from
/// Plane's API) goes through the whole STOP — worktree removal, local and remote branch
/// deletion, the notify hook — as one argument each time: nothing is ever executed.
#[test]
fn shell_metacharacters_in_a_title_and_a_branch_never_reach_a_shell() {
    let server = MockServer::start();
    let ident = "$(touch${IFS}pwned-ident);`touch${IFS}pwned-tick`";
    let project = server.mock(|when, then| {
        when.method(GET).path(api(""));
        then.status(200)
            .json_body(json!({ "id": PROJECT, "identifier": ident }));
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    env.set("ORCH_DEFAULT_REPO", "orchestrator");
    let notified = env.path().join("notified.json");
    env.set(
        "ORCH_NOTIFY_CMD",
        &format!("sh -c 'cat > \"$0\"' {}", notified.display()),
    );
    let repo = GitRepo::new(&env, "orchestrator");

    let title = "$(touch pwned-title) `touch pwned-tick2`; touch pwned-semi | tee x && y";
    let mut v = created_base(ISSUE, 42);
    v["data"]["name"] = json!(title);
    let r = event_within(
        &env,
        &bytes(&v),
        &["--delivery", "$(touch pwned-delivery)"],
        QUICK,
    );
    let r = r.json();
    assert_eq!(r["action"], "start_pipeline", "{r}");
    project.assert_hits(1);
    let task = r["task"]["id"].as_i64().unwrap();
    let branch = r["task"]["branch"].as_str().unwrap().to_string();
    assert_eq!(
        branch,
        format!("feature/{ident}-42-touch-pwned-title-touch-pwned-tick2-touc")
    );
    assert_eq!(env.task(task).title.as_deref(), Some(title));
    // The agent's worktree and pushed branch under that very name.
    let wt = repo.feature(&env, &branch);
    assert!(repo.remote_branches().contains(&branch));

    let r = event_within(&env, &bytes(&to_state(ISSUE, STOP)), &[], QUICK).json();
    assert_eq!(r["note"], "cancelled", "{r}");
    for e in r["stop"]["effects"].as_array().unwrap() {
        assert_eq!(e["status"], "done", "{e}");
    }
    assert!(!wt.exists(), "the worktree is gone");
    assert!(!repo.local_branches().contains(&branch));
    assert!(!repo.remote_branches().contains(&branch));
    let hook: Value = serde_json::from_slice(&std::fs::read(&notified).unwrap()).unwrap();
    assert_eq!(hook["branch"], branch.as_str());

    let mut found = Vec::new();
    files_named_like(env.path(), "pwned", &mut found);
    // orchctl ran in the test's directory; a shell would have written there or in the clone.
    for e in std::fs::read_dir(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().contains("pwned") {
            found.push(e.path());
        }
    }
    assert!(found.is_empty(), "something was executed: {found:?}");
}

// ------------------------------------------------------------------------- 2. outages

/// The longest an event may take when Plane misbehaves: a few request timeouts plus the
/// rate-limit wait, plus generous slack for a loaded machine. Never a tight timing check.
fn event_bound(env: &Env) -> Duration {
    let timeout: f64 = env.var("ORCH_HTTP_TIMEOUT_SECS").unwrap().parse().unwrap();
    Duration::from_secs_f64(4.0 * timeout.min(5.0) + 2.0 + 15.0)
}

/// How Plane fails.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Refused,
    Slow,
    Status(u16),
    RateLimited { retry_after: u32 },
}

const FAULTS: [Fault; 6] = [
    Fault::Refused,
    Fault::Slow,
    Fault::Status(500),
    Fault::Status(503),
    Fault::RateLimited { retry_after: 3600 },
    Fault::RateLimited { retry_after: 1 },
];

/// Points `env` at a Plane whose `path` fails with `fault` (a closed port for `Refused`);
/// the failing mock is returned, to be deleted when Plane comes back.
fn faulty_plane<'a>(
    env: &mut Env,
    server: &'a MockServer,
    fault: Fault,
    path: &str,
) -> Option<httpmock::Mock<'a>> {
    with_plane(env, server);
    Some(match fault {
        Fault::Refused => {
            env.set(
                "ORCH_PLANE_URL",
                &format!("http://127.0.0.1:{}", closed_port()),
            );
            return None;
        }
        Fault::Slow => server.mock(|when, then| {
            when.path(path);
            then.status(200)
                .delay(Duration::from_secs(30))
                .body(fixture("states_list.json"));
        }),
        Fault::Status(s) => server.mock(|when, then| {
            when.path(path);
            then.status(s)
                .body(format!("{{\"error\": \"upstream\", \"key\": \"{TOKEN}\"}}"));
        }),
        Fault::RateLimited { retry_after } => server.mock(|when, then| {
            when.path(path);
            then.status(429)
                .header("Retry-After", retry_after.to_string())
                .body(format!("slow down, {TOKEN}"));
        }),
    })
}

/// The event needs Plane's states API (its payload shows a later state) while Plane is
/// down: exit 75 within the bound, no trace in the database, and the same body handled
/// normally once Plane is back (it was not remembered as handled).
#[test]
fn an_event_that_needs_the_states_api_while_plane_is_down_is_75_and_writes_nothing() {
    for fault in FAULTS {
        let server = MockServer::start();
        let mut env = Env::new();
        env.set("ORCH_HTTP_TIMEOUT_SECS", "1");
        let failing = faulty_plane(&mut env, &server, fault, &api("states/"));
        let task = env.make_task(ISSUE, "ORCH-42", "development", None);
        crate::event::set_project(&env, task, PROJECT);
        let body = bytes(&to_state_stale(ISSUE, STOP));
        let before = dump(&env);
        let r = event_within(&env, &body, &[], event_bound(&env) + QUICK);
        assert_eq!(r.code, 75, "{fault:?}: {}", r.stderr);
        assert!(
            r.elapsed < event_bound(&env),
            "{fault:?} took {:?}",
            r.elapsed
        );
        assert!(r.stderr.contains("states"), "{fault:?}: {}", r.stderr);
        assert!(!r.stderr.contains(TOKEN), "{}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
        assert_eq!(dump(&env), before, "{fault:?} wrote something");

        // Plane is back: Plane's retry of the same body goes through.
        if let Some(mut m) = failing {
            m.delete();
        }
        states_mock(&server);
        with_plane(&mut env, &server);
        let r = event_within(&env, &body, &["--delivery", "retry"], QUICK).json();
        assert_eq!(r["note"], "cancelled", "{fault:?}: {r}");
        assert_eq!(env.task(task).stage, "cancelled");
    }
}

/// The same for a new pipeline that needs the project's identifier.
#[test]
fn an_event_that_needs_the_project_identifier_while_plane_is_down_is_75_and_writes_nothing() {
    for fault in FAULTS {
        let server = MockServer::start();
        let mut env = Env::new();
        env.set("ORCH_HTTP_TIMEOUT_SECS", "1")
            .set("ORCH_DEFAULT_REPO", "orchestrator");
        let failing = faulty_plane(&mut env, &server, fault, &api(""));
        let body = fixture("issue_created.json");
        settle(&env);
        let before = dump(&env);
        let r = event_within(&env, &body, &[], event_bound(&env) + QUICK);
        assert_eq!(r.code, 75, "{fault:?}: {}", r.stderr);
        assert!(r.elapsed < event_bound(&env), "{fault:?}: {:?}", r.elapsed);
        assert!(r.stderr.contains(PROJECT), "{fault:?}: {}", r.stderr);
        assert!(!r.stderr.contains(TOKEN), "{}", r.stderr);
        assert_eq!(dump(&env), before, "{fault:?} wrote something");

        if let Some(mut m) = failing {
            m.delete();
        }
        server.mock(|when, then| {
            when.method(GET).path(api("")).header("X-Api-Key", TOKEN);
            then.status(200)
                .json_body(json!({ "id": PROJECT, "identifier": "ORCH" }));
        });
        with_plane(&mut env, &server);
        let r = event_within(&env, &body, &[], QUICK).json();
        assert_eq!(r["action"], "start_pipeline", "{fault:?}: {r}");
        assert_eq!(r["task"]["work_item_id"], "ORCH-42");
        assert_eq!(env.count("SELECT count(*) FROM tasks"), 1);
    }
}

/// A Plane that keeps answering "there is another page" (slowly) cannot keep an event past
/// its time budget: Plane itself gives up on a receiver after 30 s.
#[test]
fn an_endless_states_listing_ends_within_the_event_budget() {
    let server = MockServer::start();
    let pages = 80;
    for n in 0..pages {
        server.mock(|when, then| {
            when.path(api("states/"))
                .query_param("cursor", format!("1000:{n}:0"));
            then.status(200)
                .delay(Duration::from_millis(400))
                .json_body(json!({
                    "results": [], "next_page_results": true,
                    "next_cursor": format!("1000:{}:0", n + 1),
                }));
        });
    }
    let first = server.mock(|when, then| {
        when.path(api("states/"));
        then.status(200).json_body(json!({
            "results": [], "next_page_results": true, "next_cursor": "1000:0:0",
        }));
    });
    let mut env = Env::new();
    with_plane(&mut env, &server);
    env.set("ORCH_HTTP_TIMEOUT_SECS", "1");
    let task = env.make_task(ISSUE, "ORCH-42", "development", None);
    crate::event::set_project(&env, task, PROJECT);
    let before = dump(&env);
    let r = event_within(
        &env,
        &bytes(&to_state_stale(ISSUE, STOP)),
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, 75, "{}", r.stderr);
    assert!(r.elapsed < event_bound(&env), "took {:?}", r.elapsed);
    first.assert_hits(1);
    assert_eq!(dump(&env), before);
}

/// A Plane that repeats a page cursor is not followed round in circles.
#[test]
fn a_repeated_page_cursor_is_not_followed() {
    use orchctl::integrations::plane::PlaneClient;
    let server = MockServer::start();
    let looping = server.mock(|when, then| {
        when.path(api("states/"));
        then.status(200).json_body(json!({
            "results": [{ "id": STOP, "name": "STOP" }],
            "next_page_results": true, "next_cursor": "1000:1:0",
        }));
    });
    let cfg = orchctl::config::Plane {
        url: server.base_url(),
        workspace: WORKSPACE.into(),
        token: Some(orchctl::config::Secret::new(TOKEN)),
    };
    let client = PlaneClient::new(&cfg, Duration::from_secs(5), Duration::ZERO);
    let e = match client.states(PROJECT) {
        Ok(states) => panic!("followed the loop: {} states listed", states.len()),
        Err(e) => e,
    };
    assert!(!e.permanent);
    assert!(e.message.contains("cursor"), "{}", e.message);
    assert_eq!(looping.hits(), 2);
}

fn comment_path(issue: &str) -> String {
    api(&format!("issues/{issue}/comments/"))
}

/// The comment an event writes (a refused relaunch, a STOP's notice) while Plane is down:
/// the state change commits, the comment waits in the outbox (`queue` shows it), and a
/// later `reconcile` posts it once — a retry after a lost answer gets 409, not a second
/// comment.
#[test]
fn a_comment_while_plane_is_down_waits_in_the_outbox_and_is_posted_once() {
    let mut env = Env::new();
    let down = format!("http://127.0.0.1:{}", closed_port());
    env.set("ORCH_PLANE_URL", &down)
        .set("ORCH_PLANE_WORKSPACE", WORKSPACE)
        .set("ORCH_PLANE_API_TOKEN", TOKEN)
        .set("ORCH_HTTP_TIMEOUT_SECS", "1");
    let refused = env.make_task(&issue_id(1), "ORCH-1", "review", None);
    let stopped = env.make_task(&issue_id(2), "ORCH-2", "development", None);
    for t in [refused, stopped] {
        crate::event::set_project(&env, t, PROJECT);
    }
    let r = event_within(
        &env,
        &bytes(&to_state(&issue_id(1), TO_ANALYSE)),
        &[],
        QUICK,
    );
    assert!(r.elapsed < event_bound(&env));
    let r = r.json();
    assert_eq!(r["action"], "refused", "{r}");
    assert_eq!(r["effects"][0]["status"], "pending", "{r}");
    let r = event_within(&env, &bytes(&to_state(&issue_id(2), STOP)), &[], QUICK).json();
    assert_eq!(r["note"], "cancelled", "{r}");
    assert_eq!(env.task(stopped).stage, "cancelled");
    let pending = "SELECT count(*) FROM outbox WHERE kind = 'plane_comment' AND status = 'pending'";
    assert_eq!(env.count(pending), 2);
    let q = env.json(&["queue"]);
    assert!(q["outbox"].to_string().contains("plane_comment"), "{q}");
    assert!(!q.to_string().contains(TOKEN));

    // Plane is back behind a flaky proxy: the first attempt is stored by Plane but its
    // answer is lost (502); the retry with the same external_id gets 409.
    let server = MockServer::start();
    let mut lost = server.mock(|when, then| {
        when.method(POST).path(comment_path(&issue_id(1)));
        then.status(502);
    });
    let posted = server.mock(|when, then| {
        when.method(POST)
            .path(comment_path(&issue_id(2)))
            .header("X-Api-Key", TOKEN)
            .body_contains("\"external_source\":\"orchctl\"");
        then.status(201).json_body(json!({ "id": "c2" }));
    });
    server.mock(|when, then| {
        when.path_contains("/issues/").method(GET);
        then.status(500);
    });
    with_plane(&mut env, &server);
    let r = env.json(&["reconcile"]);
    assert!(!r.to_string().contains(TOKEN));
    lost.assert_hits(1);
    posted.assert_hits(1);
    lost.delete();
    let external_ids: Vec<String> = env
        .ctx()
        .store
        .read(|r| r.effects_of_task(refused))
        .unwrap()
        .iter()
        .filter(|row| row.kind == "plane_comment")
        .map(|row| orchctl::outbox::comment_external_id(row, PROJECT, &issue_id(1)))
        .collect();
    assert_eq!(external_ids.len(), 1);
    let conflict = server.mock(|when, then| {
        when.method(POST)
            .path(comment_path(&issue_id(1)))
            .json_body_partial(json!({ "external_id": external_ids[0] }).to_string());
        then.status(409);
    });
    // The retry waits for its backoff (0 s here); reconcile until nothing is pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.count(pending) > 0 && Instant::now() < deadline {
        env.json(&["reconcile"]);
    }
    assert_eq!(env.count(pending), 0);
    conflict.assert_hits(1);
    posted.assert_hits(1);
    env.json(&["reconcile"]);
    conflict.assert_hits(1);
    posted.assert_hits(1);
    // Branch deletions with no Gitea and no clone to push from are failed (SPEC §4).
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status <> 'done' AND NOT (kind = 'delete_remote_branch' AND last_error LIKE 'cannot be attempted%')"),
        0
    );
}

// ------------------------------------------------------------------------- 3. secrets

const HOOK_SECRET: &str = "plane_wh_f00dfacecafebeef0011223344556677";
const API_TOKEN: &str = "plane_api_5ecr3t_d0_n0t_l34k_9f8e7d6c";

fn sign_with(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Every output of a scenario that crosses every error path of `event` (bad and missing
/// signatures, a signature that *is* the secret, Plane answering 401/500/429 with bodies
/// that echo the token, Plane unreachable, a slow Plane), its successes, `task log`,
/// `queue`, `reconcile`, the outbox rows and the database files: neither the webhook
/// secret nor the API token appears anywhere.
#[test]
fn the_webhook_secret_and_the_api_token_appear_in_no_output_row_or_file() {
    let server = MockServer::start();
    let mut env = Env::new();
    env.set("ORCH_PLANE_URL", &server.base_url())
        .set("ORCH_PLANE_WORKSPACE", WORKSPACE)
        .set("ORCH_PLANE_API_TOKEN", API_TOKEN)
        .set("ORCH_PLANE_WEBHOOK_SECRET", HOOK_SECRET)
        .set("ORCH_DEFAULT_REPO", "orchestrator")
        .set("ORCH_HTTP_TIMEOUT_SECS", "1");
    let echo = format!("{{\"detail\": \"bad key {API_TOKEN}\", \"secret\": \"{HOOK_SECRET}\"}}");
    let mut outputs: Vec<String> = Vec::new();
    let mut record = |what: &str, r: &Run| {
        outputs.push(format!("{what}\n{}\n{}", r.stdout, r.stderr));
    };
    let send = |env: &Env, body: &[u8], args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        event_within(env, body, &args, QUICK)
    };
    let signed_args = |body: &[u8]| vec!["--signature".to_string(), sign_with(HOOK_SECRET, body)];

    let created = fixture("issue_created.json");
    // Bad, missing, and "the secret itself" as the signature.
    for sig in [
        None,
        Some("0".repeat(64)),
        Some(HOOK_SECRET.to_string()),
        Some(API_TOKEN.to_string()),
    ] {
        let args: Vec<String> = sig
            .map(|s| vec!["--signature".into(), s])
            .unwrap_or_default();
        let r = send(&env, &created, &args);
        assert_eq!(r.code, 77, "{}", r.stderr);
        record("bad signature", &r);
    }
    // Plane answers the project lookup with 401, 500 and 429, each echoing the token.
    for status in [401, 500, 429] {
        let mut m = server.mock(|when, then| {
            when.path(api(""));
            then.status(status)
                .header("Retry-After", "3600")
                .header("WWW-Authenticate", format!("Token {API_TOKEN}"))
                .body(&echo);
        });
        let r = send(&env, &created, &signed_args(&created));
        assert_eq!(r.code, 75, "{status}: {}", r.stderr);
        record("plane error", &r);
        m.delete();
    }
    // Plane slow, then unreachable.
    let mut slow = server.mock(|when, then| {
        when.path(api(""));
        then.status(200).delay(Duration::from_secs(10)).body(&echo);
    });
    let r = send(&env, &created, &signed_args(&created));
    assert_eq!(r.code, 75, "{}", r.stderr);
    record("slow", &r);
    slow.delete();
    env.set(
        "ORCH_PLANE_URL",
        &format!("http://127.0.0.1:{}", closed_port()),
    );
    let r = send(&env, &created, &signed_args(&created));
    assert_eq!(r.code, 75, "{}", r.stderr);
    record("refused", &r);
    env.set("ORCH_PLANE_URL", &server.base_url());
    // A 200 whose body is not JSON but carries the token.
    let mut garbage = server.mock(|when, then| {
        when.path(api(""));
        then.status(200).body(format!("<html>{API_TOKEN}</html>"));
    });
    let r = send(&env, &created, &signed_args(&created));
    assert_ne!(r.code, 0);
    record("garbage", &r);
    garbage.delete();

    // Plane works: the pipeline starts.
    server.mock(|when, then| {
        when.method(GET)
            .path(api(""))
            .header("X-Api-Key", API_TOKEN);
        then.status(200)
            .json_body(json!({ "id": PROJECT, "identifier": "ORCH" }));
    });
    let r = send(&env, &created, &signed_args(&created));
    assert_eq!(r.code, 0, "{}", r.stderr);
    record("created", &r);
    let task = r.json()["task"]["id"].as_i64().unwrap();
    env.db()
        .execute("UPDATE tasks SET stage = 'review' WHERE id = ?1", [task]);

    // A refused relaunch whose comment Plane answers 401 with the token in the body, and
    // a STOP whose states lookup gets 500 with the token, then works.
    let mut comments = server.mock(|when, then| {
        when.method(POST).path_contains("/comments/");
        then.status(401).body(&echo);
    });
    let body = bytes(&to_state(ISSUE, TO_ANALYSE));
    let r = send(&env, &body, &signed_args(&body));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["action"], "refused");
    record("refused relaunch", &r);
    let stale = bytes(&to_state_stale(ISSUE, STOP));
    let mut states = server.mock(|when, then| {
        when.path(api("states/"));
        then.status(500).body(&echo);
    });
    let r = send(&env, &stale, &signed_args(&stale));
    assert_eq!(r.code, 75);
    record("states 500", &r);
    states.delete();
    states_mock_with(&server, API_TOKEN);
    let r = send(&env, &stale, &signed_args(&stale));
    assert_eq!(r.code, 0, "{}", r.stderr);
    record("stop", &r);
    let r = send(&env, &stale, &signed_args(&stale));
    record("duplicate", &r);
    let sig = sign_with(HOOK_SECRET, &stale);
    let r = run_within(
        &env,
        &["--format", "text", "event", "--signature", &sig],
        &stale,
        QUICK,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    record("duplicate as text", &r);
    comments.delete();
    server.mock(|when, then| {
        when.path_contains("/issues/");
        then.status(500).body(&echo);
    });
    for args in [
        vec!["reconcile"],
        vec!["queue"],
        vec!["task", "log", "1"],
        vec!["task", "show", "1"],
        vec!["task", "list"],
        vec!["--format", "text", "task", "log", "1"],
        vec!["--format", "text", "queue"],
        vec!["--format", "text", "reconcile"],
    ] {
        let r = run_within(&env, &args, b"", QUICK);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        record(&format!("{args:?}"), &r);
    }

    // The outbox rows saw the failures (401, then 500 on reconcile's retry).
    let errors = env.count("SELECT count(*) FROM outbox WHERE last_error LIKE '%HTTP%'");
    assert!(errors >= 1, "the comment's failure is recorded");
    let dumped = format!("{:?}", dump(&env));
    let mut files = String::new();
    // On PostgreSQL there is no such folder: the dump above is the database.
    for e in std::fs::read_dir(env.db.parent().unwrap())
        .into_iter()
        .flatten()
        .flatten()
    {
        files.push_str(&String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()));
    }
    for secret in [HOOK_SECRET, API_TOKEN] {
        for o in &outputs {
            assert!(!o.contains(secret), "{secret} leaked: {o}");
        }
        assert!(!dumped.contains(secret), "{secret} is in the database");
        assert!(!files.contains(secret), "{secret} is in a database file");
    }
    // The scenario did cross the paths it claims to.
    let all = outputs.join("\n");
    for want in [
        "HTTP 401",
        "HTTP 500",
        "rate limit",
        "unreachable",
        "X-Plane-Signature",
    ] {
        assert!(all.contains(want), "no output mentions {want:?}");
    }
}

fn states_mock_with<'a>(server: &'a MockServer, token: &str) -> httpmock::Mock<'a> {
    server.mock(|when, then| {
        when.method(GET)
            .path(api("states/"))
            .header("X-Api-Key", token);
        then.status(200)
            .header("Content-Type", "application/json")
            .body(fixture("states_list.json"));
    })
}

// ------------------------------------------------------------------------- 4. replays

/// Every kind of delivery, replayed with a new delivery id, is a duplicate that changes
/// nothing — no second job, no second comment, no second stop.
#[test]
fn a_replay_of_any_handled_body_is_a_duplicate_that_changes_nothing() {
    let server = MockServer::start();
    let comments = server.mock(|when, then| {
        when.method(POST).path_contains("/comments/");
        then.status(201).json_body(json!({ "id": "c" }));
    });
    let mut env = intake_env();
    with_plane(&mut env, &server);
    env.set("ORCH_PLANE_WEBHOOK_SECRET", SECRET);
    env.make_task(&issue_id(2), "ORCH-2", "analysis", None);
    env.make_task(&issue_id(3), "ORCH-3", "review", None);
    env.make_task(&issue_id(4), "ORCH-4", "development", None);
    env.make_task(&issue_id(5), "ORCH-5", "review", None);
    let mut created = created_base(&issue_id(1), 1);
    created["data"]["name"] = json!("new");
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (bytes(&created), "start_pipeline"),
        (bytes(&to_state(&issue_id(2), APPROVED)), "job_queued"),
        (bytes(&to_state(&issue_id(3), TO_ANALYSE)), "refused"),
        (bytes(&to_state(&issue_id(4), STOP)), "stop"),
        (bytes(&to_state(&issue_id(99), STOP)), "stop"),
        (fixture("issue_update_other_field.json"), "ignored"),
        (fixture("issue_comment_created.json"), "ignored"),
    ];
    for (n, (body, action)) in bodies.iter().enumerate() {
        let sig = sign(body);
        let first = format!("first-{n}");
        let r = event_within(
            &env,
            body,
            &["--delivery", &first, "--signature", &sig],
            QUICK,
        );
        assert_eq!(r.json()["action"], *action, "{}", r.stdout);
        let before = dump(&env);
        for k in 0..3 {
            let again = format!("again-{n}-{k}");
            let r = event_within(
                &env,
                body,
                &["--delivery", &again, "--signature", &sig],
                QUICK,
            )
            .json();
            assert_eq!(r["action"], "duplicate", "{action}: {r}");
            assert_eq!(r["delivery"], again.as_str());
        }
        assert_eq!(
            dump(&env),
            before,
            "a replay of the {action} changed something"
        );
    }
    // Only the refused relaunch comments (the stopped task has no Plane project).
    comments.assert_hits(1);
}

/// Starts `orchctl event` and leaves it waiting for its body on stdin (it has opened the
/// database by then), so that two copies can be released at the same moment.
fn spawn_event(env: &Env, delivery: &str) -> Child {
    env.cmd()
        .args(["event", "--delivery", delivery])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Two concurrent deliveries of the same body, many times over, for each kind of action:
/// exactly one acts, the other answers `duplicate`, and the side effects happen once.
#[test]
fn two_concurrent_deliveries_of_one_body_act_once() {
    let server = MockServer::start();
    let comments = server.mock(|when, then| {
        when.method(POST).path_contains("/comments/");
        then.status(201).json_body(json!({ "id": "c" }));
    });
    let mut env = intake_env();
    with_plane(&mut env, &server);
    let rounds: u32 = 8;
    let mut agents = Vec::new();
    for round in 0..rounds {
        let base = 100 * (round + 1);
        let (stop_issue, approve_issue, refuse_issue) =
            (issue_id(base + 1), issue_id(base + 2), issue_id(base + 3));
        let stop_task = env.make_task(
            &stop_issue,
            &format!("ORCH-{}", base + 1),
            "development",
            None,
        );
        if round < 3 {
            let agent = Agent::spawn("sleep 60");
            env.make_job_full(
                stop_task,
                "developer",
                "running",
                Some(agent.pid),
                Some(agent.start),
                Some(i64::from(round) + 1),
                1,
                2,
            );
            agents.push(agent);
        } else {
            env.make_job(stop_task, "queued", None, None);
        }
        let approve_task = env.make_task(
            &approve_issue,
            &format!("ORCH-{}", base + 2),
            "analysis",
            None,
        );
        let refuse_task =
            env.make_task(&refuse_issue, &format!("ORCH-{}", base + 3), "review", None);
        crate::event::set_project(&env, refuse_task, PROJECT);
        let new_issue = issue_id(base + 4);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bytes(&to_state(&stop_issue, STOP)), "stop"),
            (bytes(&to_state(&approve_issue, APPROVED)), "job_queued"),
            (bytes(&to_state(&refuse_issue, TO_ANALYSE)), "refused"),
            (
                bytes(&created_base(&new_issue, i64::from(base) + 4)),
                "start_pipeline",
            ),
        ];
        for (body, action) in &cases {
            let mut a = spawn_event(&env, "a");
            let mut b = spawn_event(&env, "b");
            let mut ia = a.stdin.take().unwrap();
            let mut ib = b.stdin.take().unwrap();
            ia.write_all(body).unwrap();
            ib.write_all(body).unwrap();
            drop(ia);
            drop(ib);
            let outs: Vec<Value> = [a, b]
                .into_iter()
                .map(|c| {
                    let o = c.wait_with_output().unwrap();
                    assert!(
                        o.status.success(),
                        "{action}: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    serde_json::from_slice(&o.stdout).unwrap()
                })
                .collect();
            let actions: Vec<&str> = outs.iter().map(|o| o["action"].as_str().unwrap()).collect();
            let actors: Vec<&Value> = outs.iter().filter(|o| o["action"] != "duplicate").collect();
            assert_eq!(actors.len(), 1, "round {round} {action}: {actions:?}");
            assert_eq!(actors[0]["action"], *action, "{}", actors[0]);
            if *action == "stop" {
                assert_eq!(actors[0]["note"], "cancelled", "{}", actors[0]);
            }
        }
        // Side effects once.
        assert_eq!(env.task(stop_task).stage, "cancelled");
        let count = |sql: &str, t: i64| -> i64 { env.db().value(sql, [t]) };
        assert_eq!(
            count(
                "SELECT count(*) FROM task_events WHERE task_id = ?1 AND kind = 'cancelled'",
                stop_task
            ),
            1
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM outbox WHERE task_id = ?1 AND kind = 'stop_process'",
                stop_task
            ),
            i64::from(round < 3)
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM jobs WHERE task_id = ?1 AND agent = 'developer'",
                approve_task
            ),
            1
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM outbox WHERE task_id = ?1 AND kind = 'plane_comment'",
                refuse_task
            ),
            1
        );
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM tasks WHERE plane_issue_id = '{new_issue}'"
            )),
            1
        );
    }
    for a in &agents {
        assert!(
            a.wait_gone(Duration::from_secs(15)),
            "an agent survived its STOP"
        );
    }
    comments.assert_hits(rounds as usize);
    // Branch deletions with no Gitea and no clone to push from are failed (SPEC §4).
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE status <> 'done' AND NOT (kind = 'delete_remote_branch' AND last_error LIKE 'cannot be attempted%')"),
        0
    );
}

// ------------------------------------------------------------ reconcile's Plane pass

/// A Plane listing whose only work item is in STOP.
fn listing_with_stop(issue: &str) -> Value {
    let mut item = fixture_json("issue_get.json");
    item["id"] = json!(issue);
    item["state"] = json!(STOP);
    json!({
        "next_cursor": "100:1:0", "prev_cursor": "100:-1:1",
        "next_page_results": false, "prev_page_results": false,
        "count": 1, "total_pages": 1, "total_results": 1, "results": [item],
    })
}

/// Plane refusing, failing or rate-limiting reconcile's pass: the pass still does the rest
/// of its work, exits 0 within a bound derived from the timeouts, records the error without
/// the token, changes nothing Plane-driven, and a later pass with Plane back applies the
/// missed STOP.
#[test]
fn reconcile_survives_plane_being_down_and_catches_up_when_it_is_back() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    enum Down {
        Refused,
        Answer(u16, Option<&'static str>),
    }
    for down in [
        Down::Refused,
        Down::Answer(500, None),
        Down::Answer(503, None),
        Down::Answer(429, Some("3600")),
    ] {
        let server = MockServer::start();
        let mut env = Env::new();
        with_plane(&mut env, &server);
        env.set("ORCH_HTTP_TIMEOUT_SECS", "2");
        let mut failing = None;
        match &down {
            Down::Refused => {
                env.set("ORCH_PLANE_URL", &closed);
            }
            Down::Answer(status, retry_after) => {
                let (status, retry_after) = (*status, *retry_after);
                failing = Some(server.mock(|when, then| {
                    when.path_contains("/api/");
                    let then = then.status(status).body(format!("token was {TOKEN}"));
                    if let Some(r) = retry_after {
                        then.header("Retry-After", r);
                    }
                }));
            }
        }
        let task = env.make_task(ISSUE, "ORCH-42", "development", None);
        crate::event::set_project(&env, task, PROJECT);
        // Work that does not need Plane: a deferred STOP whose window has closed.
        let deferred = env.make_task(&issue_id(7), "ORCH-7", "development", None);
        env.ctx()
            .store
            .write(|w| w.set_cancel_requested(deferred, "earlier STOP"))
            .unwrap();

        let started = Instant::now();
        let (code, stdout, stderr) = env.run(&["reconcile"]);
        let took = started.elapsed();

        assert_eq!(code, 0, "{stderr}");
        // Each listing is one bounded request; a 429 asking for an hour is not waited out.
        assert!(took < Duration::from_secs(30), "reconcile took {took:?}");
        let r: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(r["deferred_applied"], 1, "the rest of the pass ran: {r}");
        let errors = r["plane"]["errors"].as_array().unwrap();
        assert!(!errors.is_empty(), "the outage is reported: {r}");
        assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
        assert_eq!(env.task(task).stage, "development");
        assert_eq!(env.task(deferred).stage, "cancelled");

        // Plane is back: the missed STOP is applied.
        if let Some(m) = failing.as_mut() {
            m.delete();
        }
        env.set("ORCH_PLANE_URL", &server.base_url());
        server.mock(|when, then| {
            when.method(GET).path(api("issues/"));
            then.status(200).json_body(listing_with_stop(ISSUE));
        });
        states_mock(&server);
        server.mock(|when, then| {
            when.method(POST).path_contains("/comments/");
            then.status(201).json_body(json!({ "id": "c" }));
        });
        let r = env.json(&["reconcile"]);
        assert_eq!(r["plane"]["stopped"], 1, "{r}");
        assert_eq!(env.task(task).stage, "cancelled");
        assert_eq!(r["plane"]["errors"], json!([]), "{r}");
    }
}
