//! Reading a delivery's payload (SPEC §6): every field a route needs is read and checked
//! before anything is written, and a malformed body is exit 65 naming the JSON path that
//! was wrong (`data.state`, `activity.new_value` …). Nothing here touches the database.

use anyhow::Result;
use serde_json::Value;

use super::EventNote;
use crate::config::Config;
use crate::error::bad_input;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value at a dotted `path`; `None` when it (or a parent) is absent or null. A parent
/// that is present but not an object is an error naming that parent's path.
pub(super) fn lookup<'v>(root: &'v Value, path: &str) -> Result<Option<&'v Value>> {
    let mut cur = root;
    let mut walked = String::new();
    for part in path.split('.') {
        match cur {
            Value::Object(map) => match map.get(part) {
                None | Some(Value::Null) => return Ok(None),
                Some(v) => cur = v,
            },
            other => {
                return Err(bad_input(format!(
                    "malformed Plane delivery: `{walked}` must be an object, got {}",
                    type_name(other)
                )))
            }
        }
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
    }
    Ok(Some(cur))
}

pub(super) fn missing(path: &str) -> anyhow::Error {
    bad_input(format!("malformed Plane delivery: `{path}` is missing"))
}

pub(super) fn mistyped(path: &str, want: &str, got: &Value) -> anyhow::Error {
    bad_input(format!(
        "malformed Plane delivery: `{path}` must be {want}, got {}",
        type_name(got)
    ))
}

pub(super) fn opt_str<'v>(root: &'v Value, path: &str) -> Result<Option<&'v str>> {
    match lookup(root, path)? {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(mistyped(path, "a string", other)),
    }
}

pub(super) fn req_str<'v>(root: &'v Value, path: &str) -> Result<&'v str> {
    opt_str(root, path)?.ok_or_else(|| missing(path))
}

pub(super) fn req_object(root: &Value, path: &str) -> Result<()> {
    match lookup(root, path)? {
        None => Err(missing(path)),
        Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(mistyped(path, "an object", other)),
    }
}

pub(super) fn req_i64(root: &Value, path: &str) -> Result<i64> {
    match lookup(root, path)? {
        None => Err(missing(path)),
        Some(v) => v.as_i64().ok_or_else(|| mistyped(path, "an integer", v)),
    }
}

/// A Plane id that becomes a key: non-empty, no `#` (the tombstone separator), no
/// control characters.
pub(super) fn plane_key<'v>(root: &'v Value, path: &str) -> Result<&'v str> {
    let id = req_str(root, path)?;
    if id.trim().is_empty() || id.contains('#') || id.chars().any(char::is_control) {
        return Err(bad_input(format!(
            "malformed Plane delivery: `{path}` is not a usable id ({id:?})"
        )));
    }
    Ok(id)
}

/// A work item that moved to a state (or was created in one).
#[derive(Debug, Clone)]
pub(super) struct StateChange {
    pub(super) created: bool,
    pub(super) issue_id: String,
    pub(super) project_id: Option<String>,
    pub(super) state_id: String,
    /// The name the payload gives that very state id; `None` when `data` is newer than
    /// the change (its state is another one) or carries only the id.
    pub(super) state_name: Option<String>,
}

pub(super) enum Intake {
    Ignore(EventNote),
    State(StateChange),
}

/// Reads what the delivery asks for, validating every field the route needs.
pub(super) fn read_intake(v: &Value, event: &str) -> Result<Intake> {
    if event != "issue" {
        return Ok(Intake::Ignore(EventNote::OtherEvent(event.into())));
    }
    let action = req_str(v, "action")?;
    let created = match action {
        "updated" => false,
        "created" => true,
        other => return Ok(Intake::Ignore(EventNote::OtherAction(other.into()))),
    };
    let issue_id = plane_key(v, "data.id")?.to_string();
    let project_id = opt_str(v, "data.project")?.map(String::from);
    let (state_id, state_name) = if created {
        match lookup(v, "data.state")? {
            None => return Err(missing("data.state")),
            Some(Value::String(id)) => (id.clone(), None),
            Some(Value::Object(_)) => (
                req_str(v, "data.state.id")?.to_string(),
                opt_str(v, "data.state.name")?.map(String::from),
            ),
            Some(other) => return Err(mistyped("data.state", "an object or a string", other)),
        }
    } else {
        req_object(v, "activity")?;
        match opt_str(v, "activity.field")? {
            Some("state_id" | "state") => {}
            other => {
                let field = other.unwrap_or("none").to_string();
                return Ok(Intake::Ignore(EventNote::OtherField(field)));
            }
        }
        let new_value = req_str(v, "activity.new_value")?.to_string();
        // `data` is serialized when the webhook is sent, so it may already show a later
        // state: its name counts only when its id is the one this change set.
        let name = match lookup(v, "data.state")? {
            Some(Value::Object(_)) if opt_str(v, "data.state.id")? == Some(new_value.as_str()) => {
                opt_str(v, "data.state.name")?.map(String::from)
            }
            None | Some(Value::Object(_) | Value::String(_)) => None,
            // Anything else is a malformed payload, not a reason to ask Plane for names.
            Some(other) => return Err(mistyped("data.state", "an object or a string", other)),
        };
        (new_value, name)
    };
    Ok(Intake::State(StateChange {
        created,
        issue_id,
        project_id,
        state_id,
        state_name,
    }))
}

pub(super) fn is_echo(config: &Config, v: &Value) -> bool {
    let Some(bot) = &config.bot_user_id else {
        return false;
    };
    lookup(v, "activity.actor.id")
        .ok()
        .flatten()
        .and_then(Value::as_str)
        == Some(bot.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_name_what_is_wrong() {
        let v: Value =
            serde_json::from_str(r#"{"activity": {"new_value": 7, "field": null}, "data": "x"}"#)
                .unwrap();
        let e = req_str(&v, "activity.new_value").unwrap_err();
        assert!(format!("{e}").contains("`activity.new_value` must be a string, got a number"));
        let e = req_str(&v, "data.id").unwrap_err();
        assert!(format!("{e}").contains("`data` must be an object"), "{e}");
        let e = req_str(&v, "activity.field").unwrap_err();
        assert!(format!("{e}").contains("`activity.field` is missing"));
        assert_eq!(crate::error::exit_kind(&e), crate::error::ExitKind::DataErr);
    }
}
