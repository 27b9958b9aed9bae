//! A small blocking HTTP layer over ureq: bounded time, statuses as values, bodies capped.
//!
//! Error texts name the method and the URL without its query or credentials: tokens travel
//! in headers and are never part of a URL, so nothing here can leak one. Redirects are
//! never followed: a 3xx comes back as an answer like any other status. Following one
//! would send a token header to wherever the `Location` points, and would turn a DELETE or
//! a POST into a GET whose 200 then passes for a deletion or a posted comment.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986 unreserved characters is encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Percent-encodes each `/`-separated segment of `path`, keeping the slashes.
pub fn segments(path: &str) -> String {
    path.split('/').map(segment).collect::<Vec<_>>().join("/")
}

/// An HTTP answer of any status.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    /// A 3xx: the server wants the request sent elsewhere, which orchctl never does.
    pub fn is_redirect(&self) -> bool {
        (300..400).contains(&self.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent("orchctl")
        .build()
        .into()
}

const MAX_BODY: u64 = 8 << 20;

fn answer(resp: ureq::http::Response<ureq::Body>) -> Result<Answer, String> {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp
        .into_body()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(Answer {
        status,
        body,
        headers,
    })
}

/// Sends a request; `Err` only for transport failures (refused, timeout, TLS).
pub fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    json: Option<&serde_json::Value>,
) -> Result<Answer, String> {
    let what = format!("{method} {}", redact(url));
    let result = match method {
        "GET" | "DELETE" => {
            let mut req = if method == "GET" {
                agent.get(url)
            } else {
                agent.delete(url)
            };
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.call()
        }
        _ => {
            let mut req = match method {
                "POST" => agent.post(url),
                "PATCH" => agent.patch(url),
                _ => agent.put(url),
            };
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            match json {
                Some(body) => req
                    .header("Content-Type", "application/json")
                    .send(body.to_string().as_bytes()),
                None => req.send_empty(),
            }
        }
    };
    match result {
        Ok(resp) => answer(resp).map_err(|e| format!("{what}: {e}")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The URL as error texts show it: no query string, and no `user:password@` (an operator
/// may have put credentials into `ORCH_GITEA_URL` or `ORCH_PLANE_URL`).
fn redact(url: &str) -> String {
    let url = url.split('?').next().unwrap_or(url);
    without_userinfo(url).unwrap_or_else(|| url.to_string())
}

/// `url` without the `user:password@` of its authority; `None` when it has none.
pub fn without_userinfo(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(format!("{scheme}://{}", &rest[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_segments_are_encoded_one_by_one() {
        assert_eq!(segments("feature/ORCH-1-x"), "feature/ORCH-1-x");
        assert_eq!(segments("feature/a b#c"), "feature/a%20b%23c");
        assert_eq!(segment("a/b"), "a%2Fb");
    }

    #[test]
    fn error_texts_show_no_credentials_or_query() {
        assert_eq!(
            redact("https://bot:hunter2@gitea.example/api/v1/x?token=abc"),
            "https://gitea.example/api/v1/x"
        );
        assert_eq!(redact("http://h:3000/a@b"), "http://h:3000/a@b");
        assert_eq!(redact("http://h/p"), "http://h/p");
        assert_eq!(
            without_userinfo("postgres://u:p@db:5432/orch?sslmode=require").as_deref(),
            Some("postgres://db:5432/orch?sslmode=require")
        );
        assert_eq!(without_userinfo("http://h/a@b"), None);
        assert_eq!(without_userinfo("not a url"), None);
    }
}
