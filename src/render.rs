//! Text rendering of results for people at a terminal (JSON is serde's job).
//!
//! Objects become `key: value` lines, nested objects are indented, and lists of objects
//! become aligned tables. Commands with a shape people read often (task list, task log,
//! queue) have their own layout on top of these pieces.

use serde_json::{Map, Value};

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("-".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.replace('\n', " ")),
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

/// An aligned table of `rows` with the given columns (missing cells print `-`).
pub fn table(columns: &[&str], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| {
                    r.get(*c)
                        .map(|v| scalar(v).unwrap_or_else(|| v.to_string()))
                        .unwrap_or_else(|| "-".into())
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |items: Vec<String>| -> String {
        let n = items.len();
        items
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
            .join("  ")
    };
    let mut out = line(columns.iter().map(|c| c.to_uppercase()).collect());
    out.push('\n');
    for row in cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
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

fn object(out: &mut String, m: &Map<String, Value>, indent: usize) {
    let pad = " ".repeat(indent);
    let width = m.keys().map(|k| k.len()).max().unwrap_or(0);
    for (k, v) in m {
        if let Some(s) = scalar(v) {
            out.push_str(&format!("{pad}{k:width$}  {s}\n"));
        } else if let Value::Object(inner) = v {
            out.push_str(&format!("{pad}{k}:\n"));
            object(out, inner, indent + 2);
        } else if let Value::Array(items) = v {
            out.push_str(&format!("{pad}{k}:\n"));
            let cols = table_columns(items);
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            for line in table(&cols, items).lines() {
                out.push_str(&format!("{pad}  {line}\n"));
            }
        }
    }
}

/// Any result as text.
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

/// `task list`: one aligned row per task.
pub fn task_list(v: &Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no tasks\n".into();
    }
    table(
        &[
            "id",
            "work_item_id",
            "stage",
            "repo",
            "branch",
            "updated_at",
        ],
        &rows,
    )
}

/// `task log`: the audit trail, one line per event.
pub fn task_log(v: &Value) -> String {
    let mut out = String::new();
    if let Some(t) = v.get("task") {
        out.push_str(&format!(
            "task {} {} ({})\n",
            t["id"],
            t["work_item_id"].as_str().unwrap_or("-"),
            t["stage"].as_str().unwrap_or("-")
        ));
    }
    let rows: Vec<Value> = v
        .get("events")
        .and_then(Value::as_array)
        .map(|evs| {
            evs.iter()
                .map(|e| {
                    let detail = match &e["detail"] {
                        Value::Object(m) => m
                            .iter()
                            .map(|(k, v)| {
                                format!("{k}={}", scalar(v).unwrap_or_else(|| v.to_string()))
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        other => scalar(other).unwrap_or_default(),
                    };
                    serde_json::json!({ "at": e["at"], "kind": e["kind"], "detail": detail })
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(&["at", "kind", "detail"], &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align() {
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
    fn objects_print_as_key_value_lines() {
        let s = generic(&json!({"ok": true, "note": "cancelled", "task": {"id": 3}}));
        assert!(
            s.contains("ok    true") && s.contains("task:\n  id  3"),
            "{s}"
        );
    }
}
