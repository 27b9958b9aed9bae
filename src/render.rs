//! Text rendering of results for people at a terminal (JSON is serde's job).
//!
//! Every layout takes the JSON value a command prints, so text and JSON can never say
//! different things, and an unexpected shape degrades to the generic layout instead of
//! failing. Commands people read often have their own layout: a headline saying what
//! happened, the few facts that matter, and aligned tables. Times drop their fractional
//! seconds; nothing here decides anything or touches the database.
//!
//! Text fits the width `main` found (the terminal's, or `COLUMNS`) when it found one:
//! tables cut their widest cells with `~`, a `key  value` line cuts its value, and any
//! other line longer than the width is cut at the end — never wrapped. The width is set
//! around a whole rendering by [`layout`] (so every layout, present or future, keeps its
//! `fn(&Value) -> String` shape); without one, lines keep their length.

use std::cell::Cell;

use serde_json::{Map, Value};

/// The widest a table cell gets before it is cut (the last column is never cut) when no
/// width is known: piped text stays greppable, yet one huge cell does not push the others
/// off every screen.
const MAX_CELL: usize = 60;

/// The narrowest a column is cut to while a table is fitted to the width.
const MIN_CELL: usize = 4;

/// Columns this narrow (an agent, a status, a stage) are cut only when cutting the wide
/// ones is not enough.
const KEEP_CELL: usize = 12;

thread_local! {
    /// The width the text being rendered must fit, less the indent it will be given.
    static WIDTH: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `render` with the width `width` (columns; `None` = unlimited), then cuts every line
/// still longer than it (with `~`).
pub fn layout(width: Option<usize>, render: impl FnOnce() -> String) -> String {
    let before = WIDTH.with(|w| w.replace(width));
    let text = render();
    WIDTH.with(|w| w.set(before));
    match width {
        Some(max) => fit_lines(&text, max),
        None => text,
    }
}

/// `text` with each line longer than `max` characters cut to `max`, ending in `~`.
pub fn fit_lines(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        out.push_str(&cut(body.to_string(), max));
        out.push_str(newline);
    }
    out
}

/// The width left for the text being rendered, if any.
fn width() -> Option<usize> {
    WIDTH.with(Cell::get)
}

/// `render`'s text, laid out `by` columns narrower, indented by `by`.
fn indented(by: usize, render: impl FnOnce() -> String) -> String {
    let before = WIDTH.with(|w| w.replace(w.get().map(|n| n.saturating_sub(by).max(1))));
    let text = render();
    WIDTH.with(|w| w.set(before));
    indent(&text, by)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("-".into()),
        Value::Bool(b) => Some(if *b { "yes" } else { "no" }.into()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(one_line(s)),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            Some(if a.is_empty() {
                "-".into()
            } else {
                a.iter().filter_map(scalar).collect::<Vec<_>>().join(", ")
            })
        }
        _ => None,
    }
}

fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.is_empty() {
        "-".into()
    } else {
        short_time(&s)
    }
}

/// `2026-01-02T03:04:05.678Z` → `2026-01-02T03:04:05Z`; anything else unchanged.
fn short_time(s: &str) -> String {
    let b = s.as_bytes();
    let looks_like_time = b.len() > 20
        && b.len() <= 30
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && s.ends_with('Z')
        && s[..4].bytes().all(|c| c.is_ascii_digit());
    if looks_like_time {
        format!("{}Z", &s[..19])
    } else {
        s.to_string()
    }
}

/// `text` with every control character but the newline shown as `?` (tabs as a space),
/// so no escape sequence from stored data reaches a terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' => '\n',
            '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect()
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None => "-".into(),
        Some(v) => scalar(v).unwrap_or_else(|| v.to_string()),
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn truthy(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn cut(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        s
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('~');
        out
    }
}

/// An aligned table: `columns` are `(header, key)`; missing cells print `-`. With a width
/// (see [`layout`]) the widest columns are cut, all to the same width, until a row fits.
pub fn table_with(columns: &[(&str, &str)], rows: &[Value]) -> String {
    let last = columns.len().saturating_sub(1);
    let fitting = width();
    let mut headers: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let mut cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .enumerate()
                .map(|(i, (_, key))| {
                    let c = cell(r.get(*key));
                    if i == last && fitting.is_none() {
                        c
                    } else {
                        cut(c, MAX_CELL)
                    }
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    if let Some(max) = fitting {
        let rigid: Vec<bool> = (0..widths.len())
            .map(|i| !cells.is_empty() && cells.iter().all(|row| rigid(&row[i])))
            .collect();
        // First the long free-text columns give way, the last one (an error, a reason, a
        // branch) down to almost nothing, while short ones stay whole; only when that is
        // not enough is every column but the rigid ones cut.
        let floors = |keep: usize| -> Vec<usize> {
            widths
                .iter()
                .enumerate()
                .map(|(i, &w)| match (rigid[i], i == last) {
                    (true, _) => w,
                    (false, true) => w.min(MIN_CELL),
                    (false, false) => w.min(keep),
                })
                .collect()
        };
        let gaps = 2 * widths.len().saturating_sub(1);
        let mut fitted = fit_columns(&widths, &floors(KEEP_CELL), max);
        if fitted.iter().sum::<usize>() + gaps > max {
            fitted = fit_columns(&widths, &floors(MIN_CELL), max);
        }
        if fitted != widths {
            for (i, w) in fitted.iter().enumerate() {
                headers[i] = cut(std::mem::take(&mut headers[i]), *w);
                for row in &mut cells {
                    row[i] = cut(std::mem::take(&mut row[i]), *w);
                }
            }
            widths = fitted;
        }
    }
    let line = |items: Vec<String>| -> String {
        let n = items.len();
        let mut l = items
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                if i + 1 == n {
                    s
                } else {
                    let pad = widths[i].saturating_sub(s.chars().count());
                    format!("{s}{}", " ".repeat(pad))
                }
            })
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(headers);
    for row in cells {
        out.push_str(&line(row));
    }
    out
}

/// Column widths that fit `max` with two-space gaps: the widest columns come down to one
/// common width (none below its floor), the spare columns of that rounding going to the
/// leftmost of them. Unchanged when the table fits already; the floors when even they do
/// not fit (the line is then cut at the end).
fn fit_columns(widths: &[usize], floors: &[usize], max: usize) -> Vec<usize> {
    let gaps = 2 * widths.len().saturating_sub(1);
    let at = |level: usize| -> Vec<usize> {
        widths
            .iter()
            .zip(floors)
            .map(|(&w, &f)| w.min(level.max(f)))
            .collect()
    };
    let total = |level: usize| -> usize { gaps + at(level).iter().sum::<usize>() };
    let widest = widths.iter().copied().max().unwrap_or(0);
    if total(widest) <= max {
        return widths.to_vec();
    }
    // The largest common width at which the table fits (the total grows with the level).
    let (mut lo, mut hi) = (0, widest);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if total(mid) <= max {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut out = at(lo);
    let mut spare = max.saturating_sub(total(lo));
    for (i, w) in out.iter_mut().enumerate() {
        if spare == 0 {
            break;
        }
        if widths[i] > *w {
            *w += 1;
            spare -= 1;
        }
    }
    out
}

/// Whether a cell is a fixed-shape value (a number, a time, `-`) that a cut would make
/// meaningless: columns of them are cut last.
fn rigid(cell: &str) -> bool {
    cell == "-"
        || cell.bytes().all(|b| b.is_ascii_digit() || b == b'/')
        || (cell.len() == 20 && cell.as_bytes()[10] == b'T' && cell.ends_with('Z'))
}

/// An aligned table whose headers are the upper-cased keys.
pub fn table(columns: &[&str], rows: &[Value]) -> String {
    let headers: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    let cols: Vec<(&str, &str)> = headers
        .iter()
        .zip(columns)
        .map(|(h, c)| (h.as_str(), *c))
        .collect();
    table_with(&cols, rows)
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// `key  value` lines, keys aligned; pairs whose value is `None` are left out.
fn facts(pairs: &[(&str, Option<String>)], by: usize) -> String {
    let shown: Vec<(&str, &String)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
        .collect();
    let width = shown.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let pad = " ".repeat(by);
    let room = self::width().map(|w| w.saturating_sub(by + width + 2).max(MIN_CELL));
    shown
        .into_iter()
        .map(|(k, v)| {
            let v = match room {
                Some(room) => cut(v.clone(), room),
                None => v.clone(),
            };
            format!("{pad}{k:width$}  {v}\n")
        })
        .collect()
}

fn opt(v: &Value, key: &str) -> Option<String> {
    match v.get(key) {
        None | Some(Value::Null) => None,
        Some(x) => scalar(x).filter(|s| s != "-"),
    }
}

fn table_columns(rows: &[Value]) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        if let Value::Object(m) = r {
            for (k, v) in m {
                if scalar(v).is_some() && !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    cols
}

fn object(out: &mut String, m: &Map<String, Value>, by: usize) {
    let pad = " ".repeat(by);
    let width = m.keys().map(|k| k.len()).max().unwrap_or(0);
    for (k, v) in m {
        if let Some(s) = scalar(v) {
            out.push_str(&format!("{pad}{k:width$}  {s}\n"));
        } else if let Value::Object(inner) = v {
            out.push_str(&format!("{pad}{k}:\n"));
            object(out, inner, by + 2);
        } else if let Value::Array(items) = v {
            out.push_str(&format!("{pad}{k}:\n"));
            let cols = table_columns(items);
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            out.push_str(&indented(by + 2, || table(&cols, items)));
        }
    }
}

/// Any result as text: `key  value` lines, nested objects indented, lists as tables.
pub fn generic(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) => object(&mut out, m, 0),
        Value::Array(items) => {
            let cols = table_columns(items);
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            out = table(&cols, items);
        }
        other => {
            out = scalar(other).unwrap_or_default();
            out.push('\n');
        }
    }
    out
}

/// `ORCH-310 (task 7)`, or `task 7` for a task without a work item id. A tombstoned key
/// shows as it was: the headline names the work, the tables show the stored key.
fn task_name(t: &Value) -> String {
    match t.get("work_item_id").and_then(Value::as_str) {
        Some(w) => format!("{} (task {})", crate::model::untombstoned(w), t["id"]),
        None => format!("task {}", t["id"]),
    }
}

/// The facts of a task worth reading, as `facts` pairs.
fn task_facts(t: &Value) -> Vec<(&'static str, Option<String>)> {
    let plane = opt(t, "plane_issue_id").map(|p| match opt(t, "project_id") {
        Some(proj) => format!("{p} (project {proj})"),
        None => p,
    });
    let cancelled = opt(t, "cancelled_at").map(|at| match opt(t, "cancel_reason") {
        Some(r) => format!("{at}: {r}"),
        None => at,
    });
    let requested = opt(t, "cancel_requested_at").filter(|_| opt(t, "cancelled_at").is_none());
    vec![
        ("title", opt(t, "title")),
        ("repo", opt(t, "repo")),
        ("branch", opt(t, "branch")),
        ("plane", plane),
        ("created", opt(t, "created_at")),
        ("updated", opt(t, "updated_at")),
        (
            "stop pending",
            requested.map(|at| format!("{at} (deferred stop)")),
        ),
        ("cancelled", cancelled),
    ]
}

const JOB_COLUMNS: [(&str, &str); 9] = [
    ("JOB", "id"),
    ("TASK", "task_id"),
    ("AGENT", "agent"),
    ("STATUS", "status"),
    ("RUN", "run_id"),
    ("TRIES", "tries"),
    ("PID", "pid"),
    ("CLAIMED", "claimed_at"),
    ("ERROR", "error"),
];

fn job_rows(jobs: &[Value]) -> Vec<Value> {
    jobs.iter()
        .map(|j| {
            let tries = format!("{}/{}", n(j, "attempts"), n(j, "max_attempts"));
            let mut j = j.clone();
            if let Value::Object(m) = &mut j {
                m.insert("tries".into(), Value::String(tries));
            }
            j
        })
        .collect()
}

fn effects_table(effects: &[Value]) -> String {
    let rows: Vec<Value> = effects
        .iter()
        .map(|e| {
            let outcome = e
                .get("error")
                .and_then(Value::as_str)
                .or_else(|| e.get("result").and_then(Value::as_str))
                .or_else(|| e.get("last_error").and_then(Value::as_str))
                .unwrap_or("-");
            serde_json::json!({
                "id": e["id"], "kind": e["kind"], "status": e["status"], "outcome": outcome,
            })
        })
        .collect();
    table_with(
        &[
            ("ID", "id"),
            ("SIDE EFFECT", "kind"),
            ("STATUS", "status"),
            ("RESULT", "outcome"),
        ],
        &rows,
    )
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// `task list`: one aligned row per task.
pub fn task_list(v: &Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no tasks\n".into();
    }
    table_with(
        &[
            ("ID", "id"),
            ("WORK ITEM", "work_item_id"),
            ("STAGE", "stage"),
            ("REPO", "repo"),
            ("UPDATED", "updated_at"),
            ("BRANCH", "branch"),
        ],
        &rows,
    )
}

/// `task log`: the audit trail, one line per event.
pub fn task_log(v: &Value) -> String {
    let mut out = String::new();
    if let Some(t) = v.get("task") {
        out.push_str(&format!("{}  {}\n\n", task_name(t), s(t, "stage")));
    }
    let rows: Vec<Value> = array(v, "events")
        .iter()
        .map(|e| {
            let detail = match &e["detail"] {
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| match v {
                        // Brackets keep `k=[a, b]` readable among the other pairs.
                        Value::Array(a) if a.is_empty() => format!("{k}=[]"),
                        Value::Array(_) => format!("{k}=[{}]", cell(Some(v))),
                        _ => format!("{k}={}", cell(Some(v))),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                other => cell(Some(other)),
            };
            serde_json::json!({ "at": e["at"], "kind": e["kind"], "detail": detail })
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no events\n");
    } else {
        out.push_str(&table_with(
            &[("AT", "at"), ("EVENT", "kind"), ("DETAIL", "detail")],
            &rows,
        ));
    }
    out
}

/// `task show`: the task, then its jobs, dependencies, lease, marker and side effects.
pub fn task_show(v: &Value) -> String {
    let Some(t) = v.get("task") else {
        return generic(v);
    };
    let mut out = format!(
        "task {}  {}  {}\n",
        t["id"],
        s(t, "work_item_id"),
        s(t, "stage")
    );
    let lease = v.get("lease").filter(|l| !l.is_null()).map(|l| {
        format!(
            "held by {} since {}",
            s(l, "branch"),
            cell(l.get("acquired_at"))
        )
    });
    let mut pairs = task_facts(t);
    pairs.extend([
        ("awaiting", opt(v, "awaiting").map(|a| awaiting_words(&a))),
        ("depends on", opt(v, "depends_on")),
        ("merge lease", lease),
        ("deploy", opt(v, "deploy_marker")),
    ]);
    out.push_str(&facts(&pairs, 2));
    let jobs = array(v, "jobs");
    out.push_str("\njobs:\n");
    if jobs.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&indented(2, || table_with(&JOB_COLUMNS, &job_rows(jobs))));
    }
    let effects = array(v, "outbox");
    if !effects.is_empty() {
        out.push_str("\nside effects:\n");
        out.push_str(&indented(2, || effects_table(effects)));
    }
    out
}

/// What `task show`'s `awaiting` word asks of a person.
fn awaiting_words(kind: &str) -> String {
    let what = match kind {
        "approval" => {
            "approval: `orchctl approve` or `orchctl reject` (Plane: Approved / Rejected)"
        }
        "deploy_confirmation" => {
            "deploy confirmation: `orchctl confirm-deploy` (Plane: Confirm Deploy)"
        }
        "retry" => "a retry: its stage's last job failed (`orchctl retry`, or stop it)",
        "dependency" => "a dependency that is not done yet",
        "cancelled_dependency" => {
            "nothing: a dependency was cancelled, it can never start (stop it)"
        }
        other => other,
    };
    what.to_string()
}

/// `approve`, `reject`, `confirm-deploy`, `retry`: the move made and the job queued.
pub fn operator(v: &Value) -> String {
    let Some(t) = v.get("task").filter(|t| !t.is_null()) else {
        return generic(v);
    };
    let mut out = format!("{}: {}\n", task_name(t), s(v, "note"));
    let job = v
        .get("job")
        .filter(|j| !j.is_null())
        .map(|j| format!("{} ({}, {})", j["id"], s(j, "agent"), s(j, "status")));
    out.push_str(&facts(
        &[
            ("stage", opt(t, "stage")),
            ("job", job.or(Some("none".into()))),
        ],
        2,
    ));
    let effects = array(v, "effects");
    if !effects.is_empty() {
        out.push('\n');
        out.push_str(&effects_table(effects));
    }
    out
}

/// `task add`: the new task and its first job.
pub fn task_add(v: &Value) -> String {
    let Some(t) = v.get("task") else {
        return generic(v);
    };
    let mut out = format!("added {}\n", task_name(t));
    let job = match v.get("job").filter(|j| !j.is_null()) {
        Some(j) => format!("{} ({}, {})", j["id"], s(j, "agent"), s(j, "status")),
        None => "none: parked awaiting Confirm Deploy".into(),
    };
    let mut pairs = vec![("stage", opt(t, "stage"))];
    pairs.extend(task_facts(t));
    pairs.push(("job", Some(job)));
    out.push_str(&facts(&pairs, 2));
    out
}

/// `stop`: what happened to the task, then each side effect.
pub fn stop(v: &Value) -> String {
    let note = s(v, "note");
    let name = v
        .get("task")
        .filter(|t| !t.is_null())
        .map(task_name)
        .unwrap_or_else(|| "task".into());
    let mut out = String::new();
    match note {
        "no-task" => out.push_str("no such task: nothing to stop\n"),
        "cancelled" => {
            out.push_str(&format!("{name}: cancelled\n"));
            out.push_str(&facts(
                &[
                    ("agents stopped", Some(n(v, "stopped").to_string())),
                    (
                        "left to other hosts",
                        (n(v, "remote_pending") > 0).then(|| {
                            format!(
                                "{} agent(s): stopped by their hosts' next dispatch, reap or reconcile; the branch goes after",
                                n(v, "remote_pending")
                            )
                        }),
                    ),
                    ("jobs cancelled", Some(n(v, "jobs_cancelled").to_string())),
                    (
                        "reason",
                        v.get("task").and_then(|t| opt(t, "cancel_reason")),
                    ),
                ],
                2,
            ));
        }
        "deferred-critical-window" | "deferred-already-pending" => {
            if note == "deferred-critical-window" {
                out.push_str(&format!(
                    "{name}: stop DEFERRED - the task is in its merge/deploy window\n"
                ));
            } else {
                out.push_str(&format!("{name}: a deferred stop is already pending\n"));
            }
            out.push_str(&facts(
                &[
                    (
                        "queued jobs cancelled",
                        Some(n(v, "jobs_cancelled").to_string()),
                    ),
                    (
                        "stage",
                        v.get("task")
                            .and_then(|t| opt(t, "stage"))
                            .map(|s| format!("{s} (unchanged)")),
                    ),
                ],
                2,
            ));
            out.push_str(
                "  finalize-deploy applies the stop when the deploy step ends (reconcile does\n  \
                 once the window closes); `orchctl stop --force` resets now.\n",
            );
        }
        other if other.starts_with("already-terminal:") => {
            out.push_str(&format!(
                "{name} is already {}: nothing to do\n",
                other.trim_start_matches("already-terminal:")
            ));
        }
        other => out.push_str(&format!("{name}: {other}\n")),
    }
    if let Some(deps) = opt(v, "dependents") {
        out.push_str(&format!(
            "  dependents: {deps} (they depend on this task and can never start now)\n"
        ));
    }
    let effects = array(v, "effects");
    if !effects.is_empty() {
        out.push('\n');
        out.push_str(&effects_table(effects));
        if effects.iter().any(|e| s(e, "status") == "pending") {
            out.push_str("pending side effects are retried by `orchctl reconcile`\n");
        }
    }
    out
}

/// `claim`: the job taken and, with --exec, the agent started.
pub fn claim(v: &Value) -> String {
    let task = match v.get("work_item_id").and_then(Value::as_str) {
        Some(w) => format!("{w} (task {})", v["task_id"]),
        None => format!("task {}", cell(v.get("task_id"))),
    };
    let mut out = format!(
        "claimed job {} ({}) of {task}: run {}, attempt {}/{}\n",
        v["id"],
        s(v, "agent"),
        v["run_id"],
        n(v, "attempts"),
        n(v, "max_attempts")
    );
    out.push_str(&facts(
        &[
            ("repo", opt(v, "repo")),
            ("branch", opt(v, "branch")),
            ("stage", opt(v, "stage")),
            ("pid", opt(v, "pid")),
            ("log", opt(v, "log")),
            ("worktree", opt(v, "worktree")),
        ],
        2,
    ));
    if truthy(v, "killed_at_launch") {
        out.push_str("  the job was stopped while launching: its agent was killed\n");
    }
    out
}

/// `dispatch`: what was launched, then the slots and what waits, one row per agent.
pub fn dispatch(v: &Value) -> String {
    let dry = truthy(v, "dry_run");
    let launched = array(v, "launched");
    let r = v.get("reaped").cloned().unwrap_or(Value::Null);
    let mut out = format!(
        "{} {} run(s); reap: {} checked, {} alive, {} requeued, {} failed, {} cancelled\n",
        if dry {
            "dry run: would launch"
        } else {
            "launched"
        },
        launched.len(),
        n(&r, "checked"),
        n(&r, "alive"),
        n(&r, "requeued"),
        n(&r, "failed"),
        n(&r, "cancelled")
    );
    if !launched.is_empty() {
        out.push('\n');
        out.push_str(&table_with(
            &[
                ("JOB", "id"),
                ("RUN", "run_id"),
                ("AGENT", "agent"),
                ("TASK", "task_id"),
                ("WORK ITEM", "work_item_id"),
                ("PID", "pid"),
                ("WORKTREE", "worktree"),
            ],
            launched,
        ));
    }
    let no_command: Vec<&str> = array(v, "no_command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut rows = Vec::new();
    if let Some(Value::Object(slots)) = v.get("slots") {
        // Pipeline order, not the JSON object's alphabetical one.
        let mut agents: Vec<(&String, &Value)> = slots.iter().collect();
        agents.sort_by_key(|(a, _)| {
            crate::pipeline::Agent::parse(a).map_or(usize::MAX, |a| a as usize)
        });
        for (agent, sl) in agents {
            let waiting = v["waiting"].get(agent).and_then(Value::as_i64).unwrap_or(0);
            rows.push(serde_json::json!({
                "agent": agent,
                "running": sl["running"],
                "limit": sl["limit"],
                "waiting": if waiting >= crate::dispatch::WAITING_CAP {
                    format!("{waiting}+")
                } else {
                    waiting.to_string()
                },
                "command": if no_command.contains(&agent.as_str()) { "none" } else { "set" },
            }));
        }
    }
    let total = v.get("total").cloned().unwrap_or(Value::Null);
    rows.push(serde_json::json!({
        "agent": "in all",
        "running": total["running"],
        "limit": total["limit"],
    }));
    out.push('\n');
    out.push_str(&table_with(
        &[
            ("AGENT", "agent"),
            ("RUNNING", "running"),
            ("LIMIT", "limit"),
            ("WAITING", "waiting"),
            ("COMMAND", "command"),
        ],
        &rows,
    ));
    for e in array(v, "errors") {
        out.push_str(&format!(
            "launch failed: {}\n",
            e.as_str().unwrap_or_default()
        ));
    }
    out
}

/// `complete`: what the run's outcome did to the job and the task.
pub fn complete(v: &Value) -> String {
    let job = v.get("job").filter(|j| !j.is_null());
    let mut out = match job {
        Some(j) => format!(
            "job {} run {}: {}\n",
            j["id"],
            cell(j.get("run_id")),
            s(v, "note")
        ),
        None => format!("{}\n", s(v, "note")),
    };
    if s(v, "note") == "stale-run" {
        out.push_str(
            "  nothing changed: that run is not the job's current run, or the job is finished\n",
        );
    }
    let next = v
        .get("next_job")
        .filter(|j| !j.is_null())
        .map(|j| format!("job {} ({}) queued", j["id"], s(j, "agent")));
    out.push_str(&facts(
        &[
            ("job status", job.and_then(|j| opt(j, "status"))),
            (
                "task",
                v.get("task")
                    .filter(|t| !t.is_null())
                    .map(|t| format!("{}  {}", task_name(t), s(t, "stage"))),
            ),
            ("next", next),
        ],
        2,
    ));
    let effects = array(v, "effects");
    if !effects.is_empty() {
        out.push('\n');
        out.push_str(&effects_table(effects));
    }
    out
}

/// `reap`: counts, then one row per job judged dead.
pub fn reap(v: &Value) -> String {
    let mut out = format!(
        "{}checked {} running job(s): {} alive, {} requeued, {} failed, {} cancelled\n",
        if truthy(v, "dry_run") {
            "dry run: "
        } else {
            ""
        },
        n(v, "checked"),
        n(v, "alive"),
        n(v, "requeued"),
        n(v, "failed"),
        n(v, "cancelled")
    );
    let jobs = array(v, "jobs");
    if !jobs.is_empty() {
        out.push('\n');
        out.push_str(&table_with(
            &[
                ("JOB", "job_id"),
                ("RUN", "run_id"),
                ("TASK", "task_id"),
                ("ACTION", "action"),
                ("WHY", "reason"),
            ],
            jobs,
        ));
    }
    out
}

/// `reconcile`: the counts of each pass, then the errors.
pub fn reconcile(v: &Value) -> String {
    let ob = v.get("outbox").cloned().unwrap_or(Value::Null);
    let mut out = String::from("reconcile:\n");
    out.push_str(&facts(
        &[
            (
                "terminal tasks skipped",
                Some(n(v, "skipped_terminal").to_string()),
            ),
            (
                "deferred stops applied",
                Some(n(v, "deferred_applied").to_string()),
            ),
            (
                "deferred stops waiting",
                Some(n(v, "deferred_waiting").to_string()),
            ),
            (
                "orphaned leases released",
                Some(n(v, "leases_released").to_string()),
            ),
            (
                "side effects retried",
                Some(format!(
                    "{} done, {} still pending, {} failed, {} busy",
                    n(&ob, "done"),
                    n(&ob, "pending"),
                    n(&ob, "failed"),
                    n(&ob, "busy")
                )),
            ),
            (
                "plane",
                match v.get("plane").filter(|p| !p.is_null()) {
                    Some(p) => Some(format!(
                        "{} checked, {} stopped, {} deferred, {} deleted, {} unlinked, \
                         {} outside the stop scope, {} requests",
                        n(p, "checked"),
                        n(p, "stopped"),
                        n(p, "deferred"),
                        n(p, "deleted"),
                        n(p, "unlinked"),
                        n(p, "stop_disabled"),
                        n(p, "requests")
                    )),
                    None => Some("not configured".into()),
                },
            ),
        ],
        2,
    ));
    let mut errors: Vec<Value> = array(v, "errors").to_vec();
    if let Some(p) = v.get("plane") {
        errors.extend(array(p, "errors").iter().cloned());
    }
    if !errors.is_empty() {
        out.push_str("\nerrors:\n");
        out.push_str(&indented(2, || {
            table_with(&[("TASK", "task_id"), ("ERROR", "error")], &errors)
        }));
    }
    out
}

/// `deploy-begin`: the window is open.
pub fn deploy_begin(v: &Value) -> String {
    let name = v
        .get("task")
        .map(task_name)
        .unwrap_or_else(|| "task".into());
    let lease = v
        .get("lease")
        .filter(|l| !l.is_null())
        .map(|l| format!("{} held by {}", s(l, "repo"), s(l, "branch")));
    let mut out = format!("{name}: deploy window open ({})\n", s(v, "note"));
    out.push_str(&facts(
        &[("merge lease", lease), ("deploy", opt(v, "marker"))],
        2,
    ));
    out.push_str("  run `orchctl finalize-deploy --outcome success|failure` when the step ends\n");
    out
}

/// `finalize-deploy`: how the window closed and what happened to the task.
pub fn finalize_deploy(v: &Value) -> String {
    let name = v
        .get("task")
        .filter(|t| !t.is_null())
        .map(task_name)
        .unwrap_or_else(|| "task".into());
    let mut out = format!("{name}: deploy {} - {}\n", s(v, "outcome"), s(v, "note"));
    out.push_str(&facts(
        &[
            ("lease released", opt(v, "lease_released")),
            ("marker cleared", opt(v, "marker_cleared")),
            ("stage", v.get("task").and_then(|t| opt(t, "stage"))),
        ],
        2,
    ));
    let jobs = array(v, "jobs");
    if !jobs.is_empty() {
        out.push('\n');
        out.push_str(&table_with(&JOB_COLUMNS, &job_rows(jobs)));
    }
    let effects = array(v, "effects");
    if !effects.is_empty() {
        out.push('\n');
        out.push_str(&effects_table(effects));
    }
    out
}

/// `event`: what the delivery did, to which task.
pub fn event(v: &Value) -> String {
    let mut out = match opt(v, "note") {
        Some(note) => format!("{} ({note})\n", s(v, "action")),
        None => format!("{}\n", s(v, "action")),
    };
    let task = v
        .get("task")
        .filter(|t| !t.is_null())
        .map(|t| format!("{}  {}", task_name(t), s(t, "stage")));
    let job = v
        .get("job")
        .filter(|j| !j.is_null())
        .map(|j| format!("{} ({}, {})", j["id"], s(j, "agent"), s(j, "status")));
    out.push_str(&facts(
        &[
            ("state", opt(v, "state")),
            ("task", task),
            ("job", job),
            ("event", opt(v, "event")),
            ("delivery", opt(v, "delivery")),
        ],
        2,
    ));
    out
}

/// `migrate`: from which version to which.
pub fn migrate(v: &Value) -> String {
    let (from, to) = (n(v, "from"), n(v, "to"));
    if from == to {
        format!("{}: schema already at version {to}\n", s(v, "db"))
    } else {
        format!(
            "{}: schema migrated from version {from} to {to}\n",
            s(v, "db")
        )
    }
}

/// A block of the queue snapshot that could not be read.
fn block_error(b: &Value) -> Option<String> {
    b.get("error").and_then(Value::as_str).map(one_line)
}

fn on_off(b: &Value) -> &'static str {
    if truthy(b, "enabled") {
        "on"
    } else {
        "off"
    }
}

/// The lists of `queue`'s `awaiting` block: key, words in the summary line, section title.
const AWAITING: [(&str, &str, &str); 4] = [
    (
        "approval",
        "awaiting approval",
        "awaiting approval (approve / reject):",
    ),
    (
        "deploy_confirmation",
        "awaiting deploy confirmation",
        "awaiting deploy confirmation (confirm-deploy):",
    ),
    (
        "failed",
        "failed",
        "failed, awaiting a retry (retry / stop):",
    ),
    (
        "blocked_by_cancelled",
        "blocked by a cancelled dependency",
        "blocked by a cancelled dependency (stop them):",
    ),
];

/// `queue`: one line per block, then the tables dashboards show.
pub fn queue(v: &Value) -> String {
    let null = Value::Null;
    let get = |k: &str| v.get(k).unwrap_or(&null);
    let mut lines: Vec<(&str, Option<String>)> = Vec::new();

    let counts = get("counts");
    lines.push((
        "jobs",
        Some(match block_error(counts) {
            Some(e) => format!("unavailable: {e}"),
            None => ["queued", "running", "done", "failed", "cancelled"]
                .iter()
                .map(|k| format!("{} {k}", n(counts, k)))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    ));

    let gate = get("serial_gate");
    let leases = array(gate, "leases");
    lines.push((
        "serial gate",
        Some(match block_error(gate) {
            Some(e) => format!("{}, leases unavailable: {e}", on_off(gate)),
            None => format!("{}, {} merge lease(s) held", on_off(gate), leases.len()),
        }),
    ));

    let deps = get("task_deps");
    let blocked = array(deps, "blocked");
    lines.push((
        "task deps",
        Some(match block_error(deps) {
            Some(e) => format!("{}, blocked tasks unavailable: {e}", on_off(deps)),
            None => format!(
                "{}, {} task(s) waiting on others",
                on_off(deps),
                blocked.len()
            ),
        }),
    ));

    let labels = get("auto_labels");
    lines.push(("auto labels", Some(on_off(labels).to_string())));

    let ob = get("outbox");
    lines.push((
        "outbox",
        Some(match block_error(ob) {
            Some(e) => format!("unavailable: {e}"),
            None => format!("{} pending, {} failed", n(ob, "pending"), n(ob, "failed")),
        }),
    ));

    let stop = get("stop");
    let scope = match array(stop, "repos") {
        [] => "all repos".to_string(),
        repos => repos
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "),
    };
    lines.push((
        "stop",
        Some(match block_error(stop) {
            Some(e) => format!("{} ({scope}), stops unavailable: {e}", on_off(stop)),
            None => format!(
                "{} ({scope}), {} cancelled, {} deferred pending",
                on_off(stop),
                n(stop, "cancelled_count"),
                n(stop, "deferred_pending")
            ),
        }),
    ));
    let waiting = get("awaiting");
    let awaiting_counts = waiting.get("counts").unwrap_or(&null);
    lines.push((
        "awaiting",
        match block_error(waiting) {
            Some(e) => Some(format!("unavailable: {e}")),
            // Nothing waits: no line (the sections below say who waits, when anyone does).
            None if AWAITING.iter().all(|(k, _, _)| n(awaiting_counts, k) == 0) => None,
            None => Some(
                AWAITING
                    .iter()
                    .map(|(k, words, _)| format!("{} {words}", n(awaiting_counts, k)))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        },
    ));
    if let Some(e) = v
        .get("errors")
        .and_then(|e| e.get("recent"))
        .and_then(Value::as_str)
    {
        lines.push(("recent jobs", Some(format!("unavailable: {}", one_line(e)))));
    }
    // Several hosts on PostgreSQL (SPEC §12): how many are alive.
    let hosts = array(v, "hosts");
    if let Some(e) = v
        .get("errors")
        .and_then(|e| e.get("hosts"))
        .and_then(Value::as_str)
    {
        lines.push(("hosts", Some(format!("unavailable: {}", one_line(e)))));
    } else if v.get("hosts").is_some() {
        let alive = hosts.iter().filter(|h| h["alive"] == true).count();
        lines.push((
            "hosts",
            Some(format!("{alive} alive, {} dead", hosts.len() - alive)),
        ));
    }

    let mut out = facts(&lines, 0);
    let mut section = |title: &str, body: &dyn Fn() -> String| {
        out.push('\n');
        out.push_str(title);
        out.push('\n');
        out.push_str(&indented(2, body));
    };
    if !leases.is_empty() {
        section("merge leases:", &|| {
            table_with(
                &[
                    ("REPO", "repo"),
                    ("TASK", "task_id"),
                    ("SINCE", "acquired_at"),
                    ("BRANCH", "branch"),
                ],
                leases,
            )
        });
    }
    if !blocked.is_empty() {
        section("blocked tasks:", &|| {
            table_with(
                &[("TASK", "task_id"), ("WAITING ON", "waiting_on")],
                blocked,
            )
        });
    }
    for (key, _, title) in AWAITING {
        let rows = array(waiting, key);
        if !rows.is_empty() {
            section(title, &|| {
                table_with(
                    &[
                        ("TASK", "id"),
                        ("WORK ITEM", "work_item_id"),
                        ("STAGE", "stage"),
                        ("SINCE", "since"),
                        ("REPO", "repo"),
                    ],
                    rows,
                )
            });
        }
    }
    if !hosts.is_empty() {
        section("hosts:", &|| {
            table_with(
                &[
                    ("HOST", "id"),
                    ("ALIVE", "alive"),
                    ("RUNNING", "running"),
                    ("LAST SEEN", "last_seen_at"),
                ],
                hosts,
            )
        });
    }
    let recent = array(v, "recent");
    if !recent.is_empty() {
        section("recent jobs:", &|| {
            table_with(&JOB_COLUMNS, &job_rows(recent))
        });
    }
    let items = array(ob, "items");
    if !items.is_empty() {
        section("open side effects:", &|| {
            table_with(
                &[
                    ("ID", "id"),
                    ("TASK", "task_id"),
                    ("SIDE EFFECT", "kind"),
                    ("STATUS", "status"),
                    ("TRIES", "attempts"),
                    ("NEXT TRY", "next_attempt_at"),
                    ("LAST ERROR", "last_error"),
                ],
                items,
            )
        });
    }
    let stops = array(stop, "recent");
    if !stops.is_empty() {
        section("recent stops:", &|| {
            table_with(
                &[
                    ("TASK", "id"),
                    ("WORK ITEM", "work_item_id"),
                    ("REPO", "repo"),
                    ("CANCELLED", "cancelled_at"),
                    ("REASON", "cancel_reason"),
                ],
                stops,
            )
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_trim() {
        let t = table(
            &["id", "name"],
            &[
                json!({"id": 1, "name": "a"}),
                json!({"id": 100, "name": null}),
            ],
        );
        assert_eq!(t, "ID   NAME\n1    a\n100  -\n");
    }

    #[test]
    fn long_cells_are_cut_except_in_the_last_column() {
        let long = "x".repeat(100);
        let t = table(&["a", "b"], &[json!({"a": long, "b": long})]);
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.starts_with(&format!("{}~  ", "x".repeat(MAX_CELL - 1))),
            "{row}"
        );
        assert!(row.ends_with(&long));
    }

    #[test]
    fn with_a_width_the_widest_columns_are_cut_to_one_width_and_rigid_ones_kept() {
        let rows = [json!({
            "id": 7, "agent": "developer", "at": "2026-01-02T03:04:05Z",
            "repo": "r".repeat(40), "error": "e".repeat(200),
        })];
        let cols = [
            ("ID", "id"),
            ("AGENT", "agent"),
            ("AT", "at"),
            ("REPO", "repo"),
            ("ERROR", "error"),
        ];
        let t = layout(Some(60), || table_with(&cols, &rows));
        for l in t.lines() {
            assert!(l.chars().count() <= 60, "{t}");
        }
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.starts_with("7   developer  2026-01-02T03:04:05Z  rrr"),
            "{t}"
        );
        assert!(row.ends_with("e~"), "{t}");
        assert_eq!(t.lines().count(), 2, "never wrapped: {t}");
        // Without a width the same table keeps its length (the last column whole).
        let full = table_with(&cols, &rows);
        assert!(full.lines().nth(1).unwrap().ends_with(&"e".repeat(200)));
    }

    #[test]
    fn column_widths_fit_exactly_when_they_can() {
        // Gaps: 2 × 2 = 4; 30 - 4 = 26 left for the three columns.
        assert_eq!(fit_columns(&[3, 50, 50], &[3, 4, 4], 30), vec![3, 12, 11]);
        assert_eq!(fit_columns(&[3, 5, 6], &[3, 4, 4], 30), vec![3, 5, 6]);
        // Floors that do not fit come back as they are (the line is cut later).
        assert_eq!(
            fit_columns(&[20, 20, 20], &[20, 20, 4], 30),
            vec![20, 20, 4]
        );
    }

    #[test]
    fn lines_longer_than_the_width_are_cut_not_wrapped() {
        assert_eq!(fit_lines("abcdef\nab\nabcdefgh", 5), "abcd~\nab\nabcd~");
        let text = layout(Some(10), || "a line that is far too long\n".into());
        assert_eq!(text, "a line th~\n");
        // `key  value` lines cut the value.
        let f = layout(Some(20), || facts(&[("title", Some("x".repeat(50)))], 2));
        assert_eq!(f, format!("  title  {}~\n", "x".repeat(10)));
    }

    #[test]
    fn times_lose_their_fraction_only() {
        assert_eq!(
            short_time("2026-01-02T03:04:05.678Z"),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(short_time("2026-01-02T03:04:05Z"), "2026-01-02T03:04:05Z");
        assert_eq!(short_time("not a time.Z"), "not a time.Z");
    }

    #[test]
    fn objects_print_as_key_value_lines() {
        let s = generic(&json!({"ok": true, "note": "cancelled", "task": {"id": 3}}));
        assert_eq!(s, "note  cancelled\nok    yes\ntask:\n  id  3\n");
    }

    #[test]
    fn a_queue_block_with_an_error_says_so() {
        let q = json!({
            "counts": {"queued": 1, "running": 0, "done": 2, "failed": 0, "cancelled": 0},
            "serial_gate": {"enabled": true, "leases": []},
            "task_deps": {"enabled": false, "blocked": []},
            "auto_labels": {"enabled": false},
            "recent": [],
            "outbox": {"pending": 0, "failed": 0, "items": []},
            "stop": {"enabled": true, "repos": ["a", "b"], "cancelled_count": 0, "recent": [],
                     "error": "no such table: tasks"},
        });
        assert_eq!(
            queue(&q),
            "jobs         1 queued, 0 running, 2 done, 0 failed, 0 cancelled\n\
             serial gate  on, 0 merge lease(s) held\n\
             task deps    off, 0 task(s) waiting on others\n\
             auto labels  off\n\
             outbox       0 pending, 0 failed\n\
             stop         on (a, b), stops unavailable: no such table: tasks\n"
        );
    }

    #[test]
    fn unexpected_shapes_do_not_panic() {
        for v in [
            json!(null),
            json!([]),
            json!({}),
            json!("x"),
            json!({"task": 3}),
        ] {
            for f in [
                task_list,
                task_log,
                task_show,
                task_add,
                stop,
                claim,
                complete,
                reap,
                reconcile,
                deploy_begin,
                finalize_deploy,
                operator,
                migrate,
                queue,
                event,
                generic,
            ] {
                let _ = f(&v);
            }
        }
    }
}
