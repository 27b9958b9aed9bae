//! Validation of names that reach git, paths and URLs (SPEC §4).
//!
//! Every repo and branch name is checked here before it is stored or used, so nothing
//! later can join `..` into a path, pass an option to git, or smuggle a control character
//! into a ref. Failures are bad input (exit 65) and name the offending value.

use anyhow::Result;

use crate::error::bad_input;

/// A repo name: `[A-Za-z0-9._-]+`, not `.` or `..`.
pub fn validate_repo(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad_input(format!(
            "invalid repo name {name:?}: use letters, digits, '.', '_' and '-' (not '.' or '..')"
        )))
    }
}

/// Why `name` is not a valid branch name under git's ref-format rules
/// (`git check-ref-format --branch`), or `None` when it is.
pub fn branch_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 255 {
        return Some("it is longer than 255 bytes");
    }
    if name.starts_with('-') {
        return Some("it starts with '-'");
    }
    if name == "@" {
        return Some("it is '@'");
    }
    // `git check-ref-format --branch` refuses it: it would shadow the symbolic HEAD.
    if name == "HEAD" {
        return Some("it is 'HEAD'");
    }
    if name.contains("..") {
        return Some("it contains '..'");
    }
    if name.contains("@{") {
        return Some("it contains '@{'");
    }
    if name.contains("//") {
        return Some("it contains '//'");
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Some("it starts or ends with '/'");
    }
    if name.ends_with('.') {
        return Some("it ends with '.'");
    }
    for b in name.bytes() {
        if b < 0x20 || b == 0x7f {
            return Some("it contains a control character");
        }
        if matches!(b, b' ' | b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\') {
            return Some("it contains one of ' ', '~', '^', ':', '?', '*', '[', '\\'");
        }
    }
    for part in name.split('/') {
        if part.starts_with('.') {
            return Some("a '/'-separated part starts with '.'");
        }
        if part.ends_with(".lock") {
            return Some("a '/'-separated part ends with '.lock'");
        }
    }
    None
}

pub fn validate_branch(name: &str) -> Result<()> {
    match branch_problem(name) {
        None => Ok(()),
        Some(why) => Err(bad_input(format!("invalid branch name {name:?}: {why}"))),
    }
}

/// A work item id such as `ORCH-310`: printable, no whitespace, no `#` (the tombstone
/// separator), at most 200 bytes.
pub fn validate_work_item(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.contains('#')
        && id.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(bad_input(format!(
            "invalid work item id {id:?}: no whitespace, control characters or '#'"
        )))
    }
}

/// A lowercase ASCII slug of a title: runs of anything else become one `-`, at most 40
/// characters, never ending in `-`.
pub fn slug(title: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
            if out.len() >= 40 {
                break;
            }
        } else {
            dash = true;
        }
    }
    out.trim_end_matches('-').to_string()
}

/// `feature/<WORK-ITEM>-<slug of the title>`, or `feature/<WORK-ITEM>` without a title.
pub fn default_branch_name(work_item: &str, title: Option<&str>) -> String {
    match title.map(slug).filter(|s| !s.is_empty()) {
        Some(s) => format!("feature/{work_item}-{s}"),
        None => format!("feature/{work_item}"),
    }
}

/// Shell-style glob match (`*`, `?`) for `ORCH_PROTECTED_BRANCHES`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for ok in ["orchestrator", "enduro-trails", "a.b_c-1"] {
            assert!(validate_repo(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a;b", "$(id)", "a\nb"] {
            assert!(validate_repo(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn branch_names_follow_git() {
        for ok in ["feature/ORCH-1-x", "main", "fix/a.b", "release-1.2"] {
            assert_eq!(branch_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "-x",
            "a..b",
            "a@{b",
            "a b",
            "a\u{0}b",
            "a\tb",
            "/a",
            "a/",
            "a//b",
            "a.lock",
            "x/.hidden",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[b",
            "a\\b",
            "a.",
            "@",
            "HEAD",
        ] {
            assert!(branch_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn slugs_and_default_branches() {
        assert_eq!(
            slug("Deploy billing-service v2.4.1 to production"),
            "deploy-billing-service-v2-4-1-to-product"
        );
        assert_eq!(slug("  Über   große Änderung! "), "ber-gro-e-nderung");
        assert_eq!(default_branch_name("ORCH-1", None), "feature/ORCH-1");
        assert_eq!(
            default_branch_name("ORCH-1", Some("Fix it")),
            "feature/ORCH-1-fix-it"
        );
        assert_eq!(default_branch_name("ORCH-1", Some("!!!")), "feature/ORCH-1");
    }

    #[test]
    fn globs() {
        assert!(glob_match("release/*", "release/1.0"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("hot?ix", "hotfix"));
        assert!(!glob_match("release/*", "feature/release/1"));
        assert!(glob_match("prod", "prod") && !glob_match("prod", "production"));
    }
}
