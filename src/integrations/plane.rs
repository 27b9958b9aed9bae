//! Plane's REST API v1 (SPEC §6): states, project identifier, work items (paged), comments.
//!
//! Every request carries `X-Api-Key` and is bounded in time. Plane allows 60 requests a
//! minute per key: when `X-RateLimit-Remaining` reaches 0 the client waits for
//! `X-RateLimit-Reset` before the next request, and a 429 is waited out once — but never
//! longer than `max_wait` (an event must be answered within seconds; reconcile may wait
//! longer). Comments carry `external_source: "orchctl"` and a unique `external_id`, so a
//! retried comment answers 409 instead of being posted twice. A client may carry a
//! deadline: past it no new request is sent and no rate-limit wait begins, so a Plane that
//! answers slowly, page after page, cannot hold a webhook delivery past Plane's own
//! patience; a page cursor Plane has already given is never followed again.

use std::cell::Cell;
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::http::{self, segment, Answer};
use super::EffectError;
use crate::config::Plane;

/// One workflow state of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaneState {
    pub id: String,
    pub name: String,
    pub group: Option<String>,
}

/// The parts of a work item orchctl reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaneIssue {
    pub id: String,
    pub name: Option<String>,
    pub sequence_id: Option<i64>,
    /// The state id (`state` is a UUID string, or an object with `?expand=state`).
    pub state_id: Option<String>,
    pub state_name: Option<String>,
}

impl PlaneIssue {
    pub fn from_json(v: &Value) -> Option<PlaneIssue> {
        let (state_id, state_name) = match v.get("state") {
            Some(Value::String(s)) => (Some(s.clone()), None),
            Some(Value::Object(o)) => (
                o.get("id").and_then(Value::as_str).map(String::from),
                o.get("name").and_then(Value::as_str).map(String::from),
            ),
            _ => (None, None),
        };
        Some(PlaneIssue {
            id: v.get("id")?.as_str()?.to_string(),
            name: v.get("name").and_then(Value::as_str).map(String::from),
            sequence_id: v.get("sequence_id").and_then(Value::as_i64),
            state_id,
            state_name,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommentOutcome {
    Posted,
    AlreadyPosted,
    /// Plane answered 404: the issue was deleted (reconcile cancels such tasks and their
    /// farewell comment has nowhere to go; retrying cannot help).
    IssueGone,
}

pub struct PlaneClient<'a> {
    cfg: &'a Plane,
    agent: ureq::Agent,
    max_wait: Duration,
    /// No request starts, and no wait begins that would end, after this instant.
    deadline: Option<Instant>,
    /// Requests left in the current window and when it resets (unix seconds).
    remaining: Cell<Option<i64>>,
    reset_at: Cell<Option<u64>>,
    requests: Cell<u32>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `X-RateLimit-Reset` as unix seconds; small values are read as "seconds from now".
fn reset_time(value: &str) -> Option<u64> {
    let n: f64 = value.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let n = n.ceil() as u64;
    Some(if n > 1_000_000_000 { n } else { unix_now() + n })
}

impl<'a> PlaneClient<'a> {
    pub fn new(cfg: &'a Plane, timeout: Duration, max_wait: Duration) -> Self {
        PlaneClient {
            cfg,
            agent: http::agent(timeout),
            max_wait,
            deadline: None,
            remaining: Cell::new(None),
            reset_at: Cell::new(None),
            requests: Cell::new(0),
        }
    }

    /// The same client, bounded by `deadline` (see the module's doc).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// How many HTTP requests this client has sent.
    pub fn requests(&self) -> u32 {
        self.requests.get()
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/api/v1/workspaces/{}/{}",
            self.cfg.url,
            segment(&self.cfg.workspace),
            path
        )
    }

    fn seconds_until_reset(&self) -> u64 {
        self.reset_at
            .get()
            .map(|r| r.saturating_sub(unix_now()).max(1))
            .unwrap_or(60)
    }

    fn out_of_time(&self, wait: Duration) -> bool {
        self.deadline.is_some_and(|d| Instant::now() + wait >= d)
    }

    fn pause_or_fail(&self, wait: u64, why: &str) -> Result<(), EffectError> {
        if Duration::from_secs(wait) <= self.max_wait
            && !self.out_of_time(Duration::from_secs(wait))
        {
            std::thread::sleep(Duration::from_secs(wait));
            Ok(())
        } else {
            Err(EffectError {
                permanent: false,
                message: format!("Plane rate limit: {why}; retry in {wait}s"),
                retry_after_secs: Some(wait as i64),
            })
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, EffectError> {
        if self.remaining.get() == Some(0) {
            self.pause_or_fail(
                self.seconds_until_reset(),
                "no requests left in this minute",
            )?;
        }
        let url = self.url(path);
        let key = self.cfg.token.as_ref().map(|t| t.expose().to_string());
        let mut headers = vec![("Accept", "application/json")];
        if let Some(k) = &key {
            headers.push(("X-Api-Key", k.as_str()));
        }
        let mut retried = false;
        loop {
            if self.out_of_time(Duration::ZERO) {
                return Err(EffectError::retry(format!(
                    "Plane did not answer within this command's time budget ({} request(s) sent)",
                    self.requests.get()
                )));
            }
            self.requests.set(self.requests.get() + 1);
            let answer = http::send(&self.agent, method, &url, &headers, body)
                .map_err(|e| EffectError::retry(format!("Plane unreachable: {e}")))?;
            if let Some(r) = answer
                .header("X-RateLimit-Remaining")
                .and_then(|v| v.trim().parse().ok())
            {
                self.remaining.set(Some(r));
            }
            if let Some(t) = answer.header("X-RateLimit-Reset").and_then(reset_time) {
                self.reset_at.set(Some(t));
            }
            if answer.status == 429 {
                let wait = answer
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or_else(|| self.seconds_until_reset());
                if retried {
                    return Err(EffectError {
                        permanent: false,
                        message: "Plane rate limit (HTTP 429)".into(),
                        retry_after_secs: Some(wait as i64),
                    });
                }
                self.pause_or_fail(wait, "HTTP 429")?;
                retried = true;
                continue;
            }
            return Ok(answer);
        }
    }

    fn get_json(&self, path: &str) -> Result<Option<Value>, EffectError> {
        let a = self.call("GET", path, None)?;
        match a.status {
            200 => serde_json::from_str(&a.body).map(Some).map_err(|e| {
                EffectError::retry(format!("Plane sent invalid JSON for {path}: {e}"))
            }),
            404 => Ok(None),
            s => Err(status_error(s, path)),
        }
    }

    /// Follows Plane's cursor pagination (`next_page_results` / `next_cursor`).
    fn get_pages(&self, path: &str, per_page: u32) -> Result<Option<Vec<Value>>, EffectError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        let mut seen: HashSet<String> = HashSet::new();
        for _ in 0..10_000 {
            let mut p = format!("{path}?per_page={per_page}");
            if let Some(c) = &cursor {
                p.push_str("&cursor=");
                p.push_str(&segment(c));
            }
            let Some(page) = self.get_json(&p)? else {
                return Ok(None);
            };
            match page.get("results") {
                Some(Value::Array(items)) => out.extend(items.iter().cloned()),
                _ => {
                    // An unpaginated answer is a plain list; anything else (an error
                    // object from a proxy) is not a listing, and must not pass for an
                    // empty one.
                    let Value::Array(items) = page else {
                        return Err(EffectError::retry(format!(
                            "Plane answered HTTP 200 for {path} with something that is not a listing"
                        )));
                    };
                    out.extend(items);
                    return Ok(Some(out));
                }
            }
            let more = page
                .get("next_page_results")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            match page.get("next_cursor").and_then(Value::as_str) {
                // A cursor seen before would go round in circles: Plane is broken, and a
                // partial listing must not pass for a whole one.
                Some(next) if more && !seen.insert(next.to_string()) => {
                    return Err(EffectError::retry(format!(
                        "Plane repeated the page cursor {next:?} while listing {path}"
                    )))
                }
                Some(next) if more => cursor = Some(next.to_string()),
                _ => return Ok(Some(out)),
            }
        }
        Ok(Some(out))
    }

    /// The workflow states of a project.
    pub fn states(&self, project_id: &str) -> Result<Vec<PlaneState>, EffectError> {
        let path = format!("projects/{}/states/", segment(project_id));
        let items = self.get_pages(&path, 1000)?.ok_or_else(|| {
            EffectError::permanent(format!("Plane project {project_id} not found"))
        })?;
        Ok(items
            .iter()
            .filter_map(|s| {
                Some(PlaneState {
                    id: s.get("id")?.as_str()?.to_string(),
                    name: s.get("name")?.as_str()?.to_string(),
                    group: s.get("group").and_then(Value::as_str).map(String::from),
                })
            })
            .collect())
    }

    /// A project's identifier (`ORCH` in `ORCH-310`).
    pub fn project_identifier(&self, project_id: &str) -> Result<String, EffectError> {
        let path = format!("projects/{}/", segment(project_id));
        let p = self.get_json(&path)?.ok_or_else(|| {
            EffectError::permanent(format!("Plane project {project_id} not found"))
        })?;
        p.get("identifier")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| EffectError::retry("Plane project has no identifier"))
    }

    /// Every work item of a project, a page at a time (None when the project is gone).
    pub fn issues(&self, project_id: &str) -> Result<Option<Vec<PlaneIssue>>, EffectError> {
        let path = format!("projects/{}/issues/", segment(project_id));
        Ok(self
            .get_pages(&path, 100)?
            .map(|items| items.iter().filter_map(PlaneIssue::from_json).collect()))
    }

    /// One work item; `None` only when Plane answers 404 for it (deleted). A 200 whose
    /// body is not that work item (a proxy's error object, another issue, a changed API)
    /// is an error: reading it as "gone" would cancel a live task and kill its agent.
    pub fn issue(
        &self,
        project_id: &str,
        issue_id: &str,
    ) -> Result<Option<PlaneIssue>, EffectError> {
        let path = format!(
            "projects/{}/issues/{}/?expand=state",
            segment(project_id),
            segment(issue_id)
        );
        let Some(body) = self.get_json(&path)? else {
            return Ok(None);
        };
        match PlaneIssue::from_json(&body) {
            Some(issue) if issue.id == issue_id => Ok(Some(issue)),
            Some(other) => Err(EffectError::retry(format!(
                "Plane answered issue {} when asked for issue {issue_id}",
                other.id
            ))),
            None => Err(EffectError::retry(format!(
                "Plane answered HTTP 200 for issue {issue_id} with something that is not a work item"
            ))),
        }
    }

    /// Adds a comment; 409 (same `external_id` already posted) counts as done.
    pub fn add_comment(
        &self,
        project_id: &str,
        issue_id: &str,
        html: &str,
        external_id: &str,
    ) -> Result<CommentOutcome, EffectError> {
        let path = format!(
            "projects/{}/issues/{}/comments/",
            segment(project_id),
            segment(issue_id)
        );
        let body = json!({
            "comment_html": html,
            "external_source": "orchctl",
            "external_id": external_id,
        });
        let a = self.call("POST", &path, Some(&body))?;
        match a.status {
            200 | 201 => Ok(CommentOutcome::Posted),
            409 => Ok(CommentOutcome::AlreadyPosted),
            404 => Ok(CommentOutcome::IssueGone),
            400 | 403 => Err(EffectError::permanent(format!(
                "Plane refused the comment (HTTP {})",
                a.status
            ))),
            s => Err(status_error(s, "comments")),
        }
    }
}

fn status_error(status: u16, what: &str) -> EffectError {
    let redirect = if (300..400).contains(&status) {
        " (a redirect, not followed)"
    } else {
        ""
    };
    let msg = format!("Plane answered HTTP {status}{redirect} for {what}");
    if matches!(status, 400 | 403) {
        EffectError::permanent(msg)
    } else {
        EffectError::retry(msg)
    }
}

/// Escapes text for `comment_html`.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_state_as_uuid_or_expanded_object() {
        let plain: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/plane/issue_get.json"))
                .unwrap();
        let i = PlaneIssue::from_json(&plain).unwrap();
        assert_eq!(
            i.state_id.as_deref(),
            Some("aaaaaaaa-aaaa-4aaa-8aaa-000000000004")
        );
        assert_eq!(i.sequence_id, Some(42));
        let expanded: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/plane/issue_get_expand_state.json"
        ))
        .unwrap();
        let e = PlaneIssue::from_json(&expanded).unwrap();
        assert_eq!(e.state_name.as_deref(), Some("STOP"));
        assert_eq!(e.state_id, i.state_id);
    }

    #[test]
    fn reset_header_as_epoch_or_delta() {
        let now = unix_now();
        assert_eq!(reset_time(&format!("{}", now + 30)), Some(now + 30));
        let d = reset_time("5").unwrap();
        assert!(d >= now + 5 && d <= now + 6);
        assert_eq!(reset_time("soon"), None);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(html_escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }
}
