//! Configuration from `ORCH_*` environment variables (SPEC §11).
//!
//! Read once per process into a plain struct that is passed down explicitly, so library
//! callers and tests never depend on the process environment. A value that does not parse
//! is a configuration error (exit 78). Tokens are wrapped in [`Secret`], whose `Debug`
//! never shows the value.
//!
//! [`Environment`] is the one reader of `ORCH_*` variables: configuration, secrets and the
//! variables of command-line flags alike. It refuses a value that is not UTF-8 instead of
//! reading it as unset (an undecodable webhook secret must not turn the signature check
//! off), and [`parse_bool`] is the one reading of a boolean, for configuration and
//! per-command switches alike: a typo is exit 78, never "on".

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::error::{config_err, Coded};
use crate::pipeline::Agent;

/// Variables holding secrets: removed from the environment of every child orchctl starts
/// (agents, git, the notify hook), which never need orchctl's own credentials.
pub const SECRET_VARS: [&str; 4] = [
    "ORCH_GITEA_TOKEN",
    "ORCH_PLANE_API_TOKEN",
    "ORCH_PLANE_WEBHOOK_SECRET",
    "ORCH_DB_PASSWORD",
];

/// The longest duration any `ORCH_*` variable may ask for: one day.
pub const MAX_SECS: i64 = 86_400;

/// Every configuration variable as `(name, default, meaning)`, for people: README's table,
/// the example environment file (scripts/orchctl.env) and the man page are checked against
/// it and against the names this module reads (tests/docs.rs). An empty default means
/// unset. Per-command flags have variables of their own, shown by `--help`.
#[rustfmt::skip]
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("ORCH_DB_PATH", "$XDG_STATE_HOME/orchctl/orch.db", "the SQLite database (same as --db); its folder is created"),
    ("ORCH_DB_URL", "", "a postgres:// or postgresql:// URL (same as --db-url): the PostgreSQL database every host shares, instead of the SQLite file; a password in it is a secret"),
    ("ORCH_DB_PASSWORD", "", "the PostgreSQL password, when it is not in ORCH_DB_URL (secret)"),
    ("ORCH_HOST_ID", "the hostname", "this host's name among the hosts sharing a PostgreSQL database: only it signals the agents it launched"),
    ("ORCH_HOST_DEAD_SECS", "900", "a host unseen this long is dead: another host's reconcile ends its runs and fails its side effects"),
    ("ORCH_FORMAT", "text on a terminal, else json", "output format: json or text (same as --format)"),
    ("ORCH_REPOS_DIR", "$XDG_STATE_HOME/orchctl/repos", "where the clones live: <dir>/<repo>; worktrees are removed from them"),
    ("ORCH_LOG_DIR", "$XDG_STATE_HOME/orchctl/logs", "agent output of claim --exec: job-<id>-run-<run>.log"),
    ("ORCH_GITEA_URL", "", "Gitea base URL; unset = remote branches are deleted with git push --delete"),
    ("ORCH_GITEA_OWNER", "", "owner (user or organisation) of the repos on Gitea; required with ORCH_GITEA_URL"),
    ("ORCH_GITEA_TOKEN", "", "Gitea API token (secret; needs write access to the repos)"),
    ("ORCH_PROTECTED_BRANCHES", "", "comma-separated globs of branches never deleted; main, master and the default branch always are"),
    ("ORCH_PLANE_URL", "", "Plane base URL; unset = the Plane integration is off and comments are skipped"),
    ("ORCH_PLANE_WORKSPACE", "", "Plane workspace slug; required with ORCH_PLANE_URL"),
    ("ORCH_PLANE_API_TOKEN", "", "Plane API key, sent as X-Api-Key (secret)"),
    ("ORCH_PLANE_WEBHOOK_SECRET", "", "Plane webhook secret; when set every delivery must carry a valid signature (secret)"),
    ("ORCH_PLANE_BOT_USER_ID", "", "the Plane user orchctl acts as: its own changes are ignored"),
    ("ORCH_REPO_MAP", "", "<plane project id>=<repo>,... : the repo of a new task"),
    ("ORCH_DEFAULT_REPO", "", "the repo of a new task whose project is not in ORCH_REPO_MAP"),
    ("ORCH_PROJECT_IDENTIFIERS", "", "<plane project id>=<IDENT>,... : the ORCH in ORCH-310 (else asked from Plane)"),
    ("ORCH_STATE_STOP", "STOP", "Plane state that stops a task"),
    ("ORCH_STATE_TO_ANALYSE", "To Analyse", "Plane state that starts a pipeline"),
    ("ORCH_STATE_APPROVED", "Approved", "Plane state that approves an analysis"),
    ("ORCH_STATE_REJECTED", "Rejected", "Plane state that sends work back"),
    ("ORCH_STATE_CONFIRM_DEPLOY", "Confirm Deploy", "Plane state that starts the deployer"),
    ("ORCH_STOP_ENABLED", "on", "kill switch of Plane's STOP state (an operator's orchctl stop always applies)"),
    ("ORCH_STOP_REPOS", "", "comma-separated repos Plane's STOP applies to; empty = all"),
    ("ORCH_STOP_GRACE_SECS", "10", "seconds between SIGTERM and SIGKILL when an agent is stopped"),
    ("ORCH_SERIAL_GATE", "on", "one deploy per repo: a deployer job needs the repo's merge lease"),
    ("ORCH_TASK_DEPS", "on", "a task's jobs wait until the tasks it depends on are done"),
    ("ORCH_NOTIFY_CMD", "", "command run with each notification as JSON on stdin (split like a shell, never run by one)"),
    ("ORCH_OUTBOX_MAX_ATTEMPTS", "10", "tries of a side effect before it is marked failed"),
    ("ORCH_OUTBOX_BACKOFF_SECS", "15", "first retry delay of a side effect; doubles per try, at most an hour"),
    ("ORCH_BUSY_TIMEOUT_MS", "5000", "how long to wait for a busy database before giving up (exit 75)"),
    ("ORCH_CLAIM_TIMEOUT_SECS", "3600", "a running job without a pid counts as dead after this long"),
    ("ORCH_HTTP_TIMEOUT_SECS", "10", "bound on each request to Gitea or Plane"),
    ("ORCH_GIT_TIMEOUT_SECS", "60", "bound on each git command"),
    ("ORCH_AGENT_CMD_ANALYST", "", "the analyst's command for dispatch (split like a shell line, never run by one); unset = dispatch never launches an analyst"),
    ("ORCH_AGENT_CMD_DEVELOPER", "", "the developer's command for dispatch; unset = dispatch never launches a developer"),
    ("ORCH_AGENT_CMD_REVIEWER", "", "the reviewer's command for dispatch; unset = dispatch never launches a reviewer"),
    ("ORCH_AGENT_CMD_DEPLOYER", "", "the deployer's command for dispatch; unset = dispatch never launches a deployer"),
    ("ORCH_AGENT_SLOTS_ANALYST", "1", "at most this many analyst runs at once"),
    ("ORCH_AGENT_SLOTS_DEVELOPER", "1", "at most this many developer runs at once"),
    ("ORCH_AGENT_SLOTS_REVIEWER", "1", "at most this many reviewer runs at once"),
    ("ORCH_AGENT_SLOTS_DEPLOYER", "1", "at most this many deployer runs at once"),
    ("ORCH_MAX_AGENTS", "4", "at most this many agent runs at once in all (dispatch fills slots up to it)"),
    ("ORCH_WORKTREES_DIR", "$XDG_STATE_HOME/orchctl/worktrees", "where the tasks' worktrees are made: <dir>/<repo>/<work item>"),
    ("ORCH_WORKTREE_AGENTS", "developer,reviewer,deployer", "agents that run in the task's worktree (none = no agent); the others run in the clone"),
    ("ORCH_DELETE_BRANCH_ON_DONE", "off", "also delete the remote branch when a task is done (its worktree and local branch always go)"),
    ("ORCH_LOG_MAX_BYTES", "52428800", "agent output kept per run in its log (50 MiB), then one truncation line and the rest dropped"),
];

/// The variables of each agent: its command for `dispatch` and its number of slots.
pub const AGENT_VARIABLES: [(Agent, &str, &str); 4] = [
    (
        Agent::Analyst,
        "ORCH_AGENT_CMD_ANALYST",
        "ORCH_AGENT_SLOTS_ANALYST",
    ),
    (
        Agent::Developer,
        "ORCH_AGENT_CMD_DEVELOPER",
        "ORCH_AGENT_SLOTS_DEVELOPER",
    ),
    (
        Agent::Reviewer,
        "ORCH_AGENT_CMD_REVIEWER",
        "ORCH_AGENT_SLOTS_REVIEWER",
    ),
    (
        Agent::Deployer,
        "ORCH_AGENT_CMD_DEPLOYER",
        "ORCH_AGENT_SLOTS_DEPLOYER",
    ),
];

/// A token or key: usable, never printable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Gitea {
    pub url: String,
    pub owner: String,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Plane {
    pub url: String,
    pub workspace: String,
    pub token: Option<Secret>,
}

/// Plane state names that drive the pipeline (SPEC §6).
#[derive(Debug, Clone)]
pub struct StateNames {
    pub stop: String,
    pub to_analyse: String,
    pub approved: String,
    pub rejected: String,
    pub confirm_deploy: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub repos_dir: PathBuf,
    pub log_dir: PathBuf,
    pub gitea: Option<Gitea>,
    pub protected_branches: Vec<String>,
    pub plane: Option<Plane>,
    pub webhook_secret: Option<Secret>,
    pub bot_user_id: Option<String>,
    pub repo_map: Vec<(String, String)>,
    pub default_repo: Option<String>,
    pub project_identifiers: Vec<(String, String)>,
    pub states: StateNames,
    pub stop_enabled: bool,
    pub stop_repos: Vec<String>,
    pub stop_grace: Duration,
    pub serial_gate: bool,
    pub task_deps: bool,
    pub notify_cmd: Option<Vec<String>>,
    pub outbox_max_attempts: i64,
    /// First retry delay of a failed side effect; doubles per attempt (capped at an hour).
    pub outbox_backoff_secs: i64,
    pub busy_timeout_ms: u64,
    pub claim_timeout_secs: i64,
    /// Bound on every HTTP request to Gitea or Plane.
    pub http_timeout: Duration,
    /// Bound on every git child process.
    pub git_timeout: Duration,
    /// The command `dispatch` launches for each agent that has one (`ORCH_AGENT_CMD_*`).
    pub agent_cmds: Vec<(Agent, Vec<String>)>,
    /// How many runs of each agent may run at once (`ORCH_AGENT_SLOTS_*`).
    pub agent_slots: Vec<(Agent, i64)>,
    /// How many agent runs may run at once in all (`ORCH_MAX_AGENTS`).
    pub max_agents: i64,
    /// Where the tasks' worktrees are made: `<dir>/<repo>/<work item>`.
    pub worktrees_dir: PathBuf,
    /// The agents that run in the task's worktree; the others run in the clone.
    pub worktree_agents: Vec<Agent>,
    /// A task that is done loses its remote branch too.
    pub delete_branch_on_done: bool,
    /// Agent output kept per run in its log.
    pub log_max_bytes: u64,
    /// Every value of [`SECRET_VARS`] that is set, whether or not its integration is
    /// configured: a token is scrubbed from text even when its URL is missing. The
    /// password of `ORCH_DB_URL` is one of them.
    pub secret_values: Vec<Secret>,
    /// This host's id among the hosts sharing a database (`ORCH_HOST_ID`, else the
    /// hostname).
    pub host_id: String,
    /// A host unseen this long is dead (`ORCH_HOST_DEAD_SECS`).
    pub host_dead_secs: i64,
    /// The PostgreSQL password when it is not in the URL (`ORCH_DB_PASSWORD`).
    pub db_password: Option<Secret>,
    /// Whether several hosts share the store (PostgreSQL): then a process is only judged
    /// and signalled by the host that launched it. On SQLite — one machine's file — every
    /// run is this host's, whatever host id it was recorded under. Set when the store is
    /// opened ([`crate::Ctx::open_target`]).
    pub hosts_shared: bool,
}

/// This host's id: `ORCH_HOST_ID`, else the hostname. It names the host in the database
/// and in `queue`, so it is printable text without blanks.
fn host_id(configured: Option<String>) -> Result<String> {
    let id = match configured {
        Some(v) => v.trim().to_string(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| "localhost".into()),
    };
    if id.len() > 255 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(config_err(format!(
            "ORCH_HOST_ID={id:?} is not a host id (printable text without blanks, at most 255 bytes)"
        )));
    }
    Ok(id)
}

/// The password written into a database URL (`postgres://user:password@host/db`, or a
/// `password=` parameter), as written and percent-decoded, for scrubbing: it is a secret
/// wherever it appears.
pub fn url_passwords(url: &str) -> Vec<String> {
    let Some(raw) = url_password_raw(url) else {
        return Vec::new();
    };
    let decoded = percent_encoding::percent_decode_str(&raw)
        .decode_utf8_lossy()
        .into_owned();
    let mut out = vec![raw];
    if decoded != out[0] {
        out.push(decoded);
    }
    out
}

/// `ORCH_DB_URL` as a child process gets it (SPEC §12: agents call `orchctl complete`):
/// the user and everything else kept, the password — in the user info or a `password=`
/// parameter — taken out.
pub fn db_url_without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.is_empty() && !kv.starts_with("password="))
                .collect();
            if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

fn url_password_raw(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r)?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let from_userinfo = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw.to_string());
    let from_query = url.split_once('?').and_then(|(_, q)| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("password="))
            .map(String::from)
    });
    from_userinfo.or(from_query).filter(|p| !p.is_empty())
}

/// The default state folder: `$XDG_STATE_HOME/orchctl` or `~/.local/state/orchctl`.
pub fn state_dir(get: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    state_dir_from(
        get("XDG_STATE_HOME").map(OsString::from),
        get("HOME").map(OsString::from),
    )
}

/// [`state_dir`] from the process environment. `HOME` and `XDG_STATE_HOME` are paths, read
/// as bytes: a folder name that is not UTF-8 is still that folder, never `.`.
pub fn process_state_dir() -> PathBuf {
    state_dir_from(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
}

fn state_dir_from(xdg: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if let Some(x) = xdg.filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("orchctl");
    }
    let home = home.unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/state/orchctl")
}

/// The spellings [`parse_bool`] accepts, as they appear in messages.
pub const BOOL_WORDS: &str = "1/0, true/false, on/off or yes/no";

/// Parses the boolean spellings of SPEC §11: `1/0`, `true/false`, `on/off`, `yes/no`, in
/// any case; blanks around the word are ignored, any other character (a Latin-1 or Unicode
/// no-break space included) makes it no boolean. `name` is the variable, for the message.
/// An empty value means unset and is the caller's to handle.
pub fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_ascii_lowercase()
        .as_str()
    {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(config_err(format!(
            "{name}={value:?} is not a boolean (use {BOOL_WORDS}; empty = unset)"
        ))),
    }
}

/// Whether `value` counts as unset: empty or only blanks.
pub fn is_blank(value: &str) -> bool {
    value
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .is_empty()
}

/// The process environment as orchctl reads it, captured once: every `ORCH_*` variable,
/// decoded, plus `COLUMNS`. Capturing refuses (exit 78, naming the variables, never their
/// values) any `ORCH_*` value that is not valid UTF-8: such a value cannot be what the
/// operator meant, and reading it as unset would silently drop a secret, a protected-branch
/// list or a kill switch. `main` captures it before parsing the command line, so the
/// variables clap reads for flags are refused the same way, before anything is opened.
#[derive(Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets: only the names.
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

/// Variables outside `ORCH_*` that orchctl reads through [`Environment`].
const OTHER_VARS: [&str; 1] = ["COLUMNS"];

impl Environment {
    /// Reads the process environment.
    pub fn capture() -> Result<Environment> {
        Environment::from_os_pairs(std::env::vars_os())
    }

    /// Builds the environment from `(name, value)` pairs, as the process has them.
    pub fn from_os_pairs(pairs: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Self> {
        let (env, mut undecodable) = Environment::decode(pairs);
        if undecodable.is_empty() {
            return Ok(env);
        }
        undecodable.sort();
        let what = if undecodable.len() == 1 {
            "holds a value that is"
        } else {
            "hold values that are"
        };
        Err(Coded::new(
            crate::error::ExitKind::Config,
            format!(
                "{} {what} not valid UTF-8 and cannot be read",
                undecodable.join(", ")
            ),
        )
        .with_hint(
            "save the environment file as UTF-8 (a Latin-1 byte, such as a no-break space, \
             is the usual cause)",
        )
        .into())
    }

    /// The decodable variables, and the names of the `ORCH_*` ones that are not UTF-8.
    fn decode(pairs: impl IntoIterator<Item = (OsString, OsString)>) -> (Environment, Vec<String>) {
        let mut vars = BTreeMap::new();
        let mut undecodable = Vec::new();
        for (name, value) in pairs {
            // A name that is not UTF-8 is no variable orchctl reads.
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with("ORCH_") && !OTHER_VARS.contains(&name) {
                continue;
            }
            match value.into_string() {
                Ok(v) => {
                    vars.insert(name.to_string(), v);
                }
                // COLUMNS is only a layout hint: an undecodable one is ignored.
                Err(_) if !name.starts_with("ORCH_") => {}
                Err(_) => undecodable.push(name.to_string()),
            }
        }
        (Environment { vars }, undecodable)
    }

    /// Builds the environment from decoded pairs (tests, library callers).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Environment {
        Environment {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `name`, if set (possibly empty).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// The value of `name` when it is set and not blank.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !is_blank(v))
    }

    /// Every variable whose name starts with `prefix`, in name order.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.vars
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The boolean variable `name`: `default` when unset or blank; exit 78 when it is no
    /// boolean.
    pub fn boolean(&self, name: &str, default: bool) -> Result<bool> {
        match self.value(name) {
            Some(v) => parse_bool(name, v),
            None => Ok(default),
        }
    }

    /// The text width `COLUMNS` asks for, when it is a positive number.
    pub fn columns(&self) -> Option<usize> {
        self.value("COLUMNS")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    }
}

fn csv(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn pairs(name: &str, value: Option<String>) -> Result<Vec<(String, String)>> {
    csv(value)
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(config_err(format!(
                "{name}: {item:?} is not of the form <key>=<value>"
            ))),
        })
        .collect()
}

impl Config {
    /// Reads the process environment (refusing undecodable values, see [`Environment`]).
    pub fn from_env() -> Result<Config> {
        Config::from_environment(&Environment::capture()?)
    }

    /// Reads configuration from a captured environment; the default folders come from the
    /// process's `XDG_STATE_HOME` / `HOME`.
    pub fn from_environment(env: &Environment) -> Result<Config> {
        Config::read(&|k| env.get(k).map(String::from), process_state_dir())
    }

    /// Reads configuration through `get` (tests pass a map), `HOME` included.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        Config::read(get, state_dir(get))
    }

    fn read(get: &dyn Fn(&str) -> Option<String>, state: PathBuf) -> Result<Config> {
        // Only ASCII blanks make a value empty: a lone Unicode no-break space in a secret
        // is a value, not a reason to switch the signature check off.
        let nonempty = |k: &str| get(k).filter(|v| !is_blank(v));
        let boolean = |k: &str, default: bool| -> Result<bool> {
            match nonempty(k) {
                Some(v) => parse_bool(k, &v),
                None => Ok(default),
            }
        };
        let number = |k: &str, default: i64, min: i64| -> Result<i64> {
            match nonempty(k) {
                Some(v) => match v.trim().parse::<i64>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => Err(config_err(format!(
                        "{k}={v:?} is not a whole number >= {min}"
                    ))),
                },
                None => Ok(default),
            }
        };
        // Durations are bounded: a deadline of "now + 1e20 s" cannot be represented, and
        // no wait orchctl does makes sense beyond a day.
        let secs = |k: &str, default: f64| -> Result<Duration> {
            match nonempty(k) {
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(n) if (0.0..=MAX_SECS as f64).contains(&n) => Ok(Duration::from_secs_f64(n)),
                    _ => Err(config_err(format!(
                        "{k}={v:?} is not a number of seconds between 0 and {MAX_SECS}"
                    ))),
                },
                None => Ok(Duration::from_secs_f64(default)),
            }
        };
        let gitea = match nonempty("ORCH_GITEA_URL") {
            Some(url) => Some(Gitea {
                url: url.trim().trim_end_matches('/').to_string(),
                owner: nonempty("ORCH_GITEA_OWNER").ok_or_else(|| {
                    config_err("ORCH_GITEA_URL is set but ORCH_GITEA_OWNER is not")
                })?,
                token: nonempty("ORCH_GITEA_TOKEN").map(Secret::new),
            }),
            None => None,
        };
        let plane = match nonempty("ORCH_PLANE_URL") {
            Some(url) => Some(Plane {
                url: url.trim().trim_end_matches('/').to_string(),
                workspace: nonempty("ORCH_PLANE_WORKSPACE").ok_or_else(|| {
                    config_err("ORCH_PLANE_URL is set but ORCH_PLANE_WORKSPACE is not")
                })?,
                token: nonempty("ORCH_PLANE_API_TOKEN").map(Secret::new),
            }),
            None => None,
        };
        let notify_cmd =
            match nonempty("ORCH_NOTIFY_CMD") {
                Some(cmd) => match shlex::split(&cmd) {
                    Some(argv) if !argv.is_empty() => Some(argv),
                    _ => return Err(config_err(
                        "ORCH_NOTIFY_CMD does not split into a command line (unbalanced quotes?)",
                    )),
                },
                None => None,
            };
        let state_name = |k: &str, default: &str| nonempty(k).unwrap_or_else(|| default.into());
        let mut agent_cmds = Vec::new();
        let mut agent_slots = Vec::new();
        for (agent, cmd_var, slots_var) in AGENT_VARIABLES {
            if let Some(cmd) = nonempty(cmd_var) {
                match shlex::split(&cmd) {
                    Some(argv) if !argv.is_empty() => agent_cmds.push((agent, argv)),
                    _ => {
                        return Err(config_err(format!(
                            "{cmd_var} does not split into a command line (unbalanced quotes?)"
                        )))
                    }
                }
            }
            agent_slots.push((agent, number(slots_var, 1, 0)?));
        }
        let worktree_agents = match nonempty("ORCH_WORKTREE_AGENTS") {
            None => vec![Agent::Developer, Agent::Reviewer, Agent::Deployer],
            Some(v) if v.trim().eq_ignore_ascii_case("none") => Vec::new(),
            Some(v) => csv(Some(v))
                .iter()
                .map(|a| {
                    Agent::parse(a).ok_or_else(|| {
                        config_err(format!(
                            "ORCH_WORKTREE_AGENTS: {a:?} is not an agent (analyst, developer, reviewer, deployer, or none)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };

        Ok(Config {
            repos_dir: nonempty("ORCH_REPOS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| state.join("repos")),
            log_dir: nonempty("ORCH_LOG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| state.join("logs")),
            gitea,
            protected_branches: csv(get("ORCH_PROTECTED_BRANCHES")),
            plane,
            webhook_secret: nonempty("ORCH_PLANE_WEBHOOK_SECRET").map(Secret::new),
            bot_user_id: nonempty("ORCH_PLANE_BOT_USER_ID"),
            repo_map: pairs("ORCH_REPO_MAP", get("ORCH_REPO_MAP"))?,
            default_repo: nonempty("ORCH_DEFAULT_REPO"),
            project_identifiers: pairs(
                "ORCH_PROJECT_IDENTIFIERS",
                get("ORCH_PROJECT_IDENTIFIERS"),
            )?,
            states: StateNames {
                stop: state_name("ORCH_STATE_STOP", "STOP"),
                to_analyse: state_name("ORCH_STATE_TO_ANALYSE", "To Analyse"),
                approved: state_name("ORCH_STATE_APPROVED", "Approved"),
                rejected: state_name("ORCH_STATE_REJECTED", "Rejected"),
                confirm_deploy: state_name("ORCH_STATE_CONFIRM_DEPLOY", "Confirm Deploy"),
            },
            stop_enabled: boolean("ORCH_STOP_ENABLED", true)?,
            stop_repos: csv(get("ORCH_STOP_REPOS")),
            stop_grace: secs("ORCH_STOP_GRACE_SECS", 10.0)?,
            serial_gate: boolean("ORCH_SERIAL_GATE", true)?,
            task_deps: boolean("ORCH_TASK_DEPS", true)?,
            notify_cmd,
            outbox_max_attempts: number("ORCH_OUTBOX_MAX_ATTEMPTS", 10, 1)?,
            outbox_backoff_secs: number("ORCH_OUTBOX_BACKOFF_SECS", 15, 0)?,
            busy_timeout_ms: match number("ORCH_BUSY_TIMEOUT_MS", 5000, 0)? {
                ms if ms <= MAX_SECS * 1000 => ms as u64,
                ms => {
                    return Err(config_err(format!(
                        "ORCH_BUSY_TIMEOUT_MS={ms} is longer than a day ({} ms)",
                        MAX_SECS * 1000
                    )))
                }
            },
            claim_timeout_secs: number("ORCH_CLAIM_TIMEOUT_SECS", 3600, 0)?,
            http_timeout: secs("ORCH_HTTP_TIMEOUT_SECS", 10.0)?,
            git_timeout: secs("ORCH_GIT_TIMEOUT_SECS", 60.0)?,
            agent_cmds,
            agent_slots,
            max_agents: number("ORCH_MAX_AGENTS", 4, 0)?,
            worktrees_dir: nonempty("ORCH_WORKTREES_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| state.join("worktrees")),
            worktree_agents,
            delete_branch_on_done: boolean("ORCH_DELETE_BRANCH_ON_DONE", false)?,
            log_max_bytes: number("ORCH_LOG_MAX_BYTES", 50 << 20, 0)? as u64,
            secret_values: SECRET_VARS
                .iter()
                .filter_map(|k| get(k))
                .map(|v| Secret::new(v.trim()))
                .chain(
                    get("ORCH_DB_URL")
                        .map(|u| url_passwords(&u))
                        .unwrap_or_default()
                        .into_iter()
                        .map(Secret::new),
                )
                .collect(),
            host_id: host_id(nonempty("ORCH_HOST_ID"))?,
            host_dead_secs: number("ORCH_HOST_DEAD_SECS", 900, 1)?,
            db_password: nonempty("ORCH_DB_PASSWORD").map(|v| Secret::new(v.trim())),
            hosts_shared: false,
        })
    }

    /// Whether `job`'s process, if any, is one this host may judge and signal: on a shared
    /// store only the launching host's; on SQLite every one.
    pub fn runs_here(&self, job: &crate::model::Job) -> bool {
        !self.hosts_shared || job.runs_on(&self.host_id)
    }

    /// The host an effect about `job`'s process (or the worktree it ran in) is bound to:
    /// its host on a shared store; none on SQLite.
    pub fn bind_to(&self, host: Option<&str>) -> Option<String> {
        if self.hosts_shared {
            host.map(String::from)
        } else {
            None
        }
    }

    /// This host, where hosts are told apart (a shared store); `None` on SQLite.
    pub fn host_scope(&self) -> Option<&str> {
        self.hosts_shared.then_some(self.host_id.as_str())
    }

    /// The command `dispatch` launches for `agent`, when it has one.
    pub fn agent_cmd(&self, agent: Agent) -> Option<&[String]> {
        self.agent_cmds
            .iter()
            .find(|(a, _)| *a == agent)
            .map(|(_, argv)| argv.as_slice())
    }

    /// How many runs of `agent` may run at once.
    pub fn slots_of(&self, agent: Agent) -> i64 {
        self.agent_slots
            .iter()
            .find(|(a, _)| *a == agent)
            .map_or(1, |(_, n)| *n)
    }

    /// Whether `agent` runs in the task's worktree (else in the clone).
    pub fn in_worktree(&self, agent: &str) -> bool {
        self.worktree_agents.iter().any(|a| a.as_str() == agent)
    }

    /// Whether Plane's STOP state may stop a task of `repo` (kill switch and scope, SPEC §3).
    pub fn stop_applies(&self, repo: &str) -> bool {
        self.stop_enabled
            && (self.stop_repos.is_empty() || self.stop_repos.iter().any(|r| r == repo))
    }

    /// The repo a new task of a Plane project goes to (`ORCH_REPO_MAP`, else `ORCH_DEFAULT_REPO`).
    pub fn repo_for_project(&self, project_id: &str) -> Option<&str> {
        self.repo_map
            .iter()
            .find(|(p, _)| p == project_id)
            .map(|(_, r)| r.as_str())
            .or(self.default_repo.as_deref())
    }

    /// Every secret value configured, for scrubbing text that came from the outside world.
    pub fn secrets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.secret_values.iter().map(Secret::expose).collect();
        if let Some(t) = self.gitea.as_ref().and_then(|g| g.token.as_ref()) {
            out.push(t.expose());
        }
        if let Some(t) = self.plane.as_ref().and_then(|p| p.token.as_ref()) {
            out.push(t.expose());
        }
        if let Some(s) = &self.webhook_secret {
            out.push(s.expose());
        }
        out.retain(|s| !s.is_empty());
        // Longest first, so a secret that contains another is replaced whole.
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out.dedup();
        out
    }

    /// Replaces every configured secret in `text` by `***` (server error bodies, git stderr).
    pub fn scrub(&self, text: &str) -> String {
        scrub_text(&self.secrets(), text)
    }
}

/// Replaces each of `secrets` in `text` by `***`.
pub fn scrub_text(secrets: &[&str], text: &str) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

/// Scrubs the secrets of the process environment from `text`: for error messages printed
/// when no [`Config`] could be built. Reads through [`Environment`] too, keeping the
/// decodable secrets even when another variable could not be decoded.
pub fn scrub_env(text: &str) -> String {
    let (env, _) = Environment::decode(std::env::vars_os());
    env.scrub(text)
}

impl Environment {
    /// Replaces the value of every secret variable in `text` by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let url_pw = self
            .get("ORCH_DB_URL")
            .map(url_passwords)
            .unwrap_or_default();
        let mut values: Vec<&str> = SECRET_VARS
            .iter()
            .filter_map(|k| self.get(k))
            .map(|v| v.trim())
            .chain(url_pw.iter().map(String::as_str))
            .collect();
        values.sort_by_key(|s| std::cmp::Reverse(s.len()));
        scrub_text(&values, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn a_database_url_loses_its_password_and_keeps_the_rest() {
        assert_eq!(
            db_url_without_password("postgresql://orch:s3cret@db:5432/o?sslmode=require"),
            "postgresql://orch@db:5432/o?sslmode=require"
        );
        assert_eq!(
            db_url_without_password("postgres:///o?host=/run/pg&password=s3cret&user=orch"),
            "postgres:///o?host=/run/pg&user=orch"
        );
        assert_eq!(
            db_url_without_password("postgresql://db/o"),
            "postgresql://db/o"
        );
        assert_eq!(
            url_passwords("postgresql://orch:p%40ss@db/o"),
            ["p%40ss", "p@ss"]
        );
        assert_eq!(url_passwords("postgres:///o?password=x&host=/s"), ["x"]);
        assert!(url_passwords("postgresql://orch@db/o").is_empty());
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = cfg(&[("HOME", "/home/op")]).unwrap();
        assert!(c.stop_enabled && c.serial_gate && c.task_deps);
        assert_eq!(c.stop_grace, Duration::from_secs(10));
        assert_eq!(c.outbox_max_attempts, 10);
        assert_eq!(c.busy_timeout_ms, 5000);
        assert_eq!(c.claim_timeout_secs, 3600);
        assert_eq!(c.states.confirm_deploy, "Confirm Deploy");
        assert_eq!(
            c.repos_dir,
            PathBuf::from("/home/op/.local/state/orchctl/repos")
        );
    }

    #[test]
    fn booleans_accept_the_four_spellings_in_any_case_and_nothing_else() {
        for (v, want) in [
            ("1", true),
            ("0", false),
            ("true", true),
            ("False", false),
            ("ON", true),
            ("off", false),
            ("Yes", true),
            ("NO", false),
            (" off\t", false),
            ("", true),
            ("  ", true),
        ] {
            assert_eq!(
                cfg(&[("ORCH_STOP_ENABLED", v)]).unwrap().stop_enabled,
                want,
                "{v:?}"
            );
        }
        for v in [
            "maybe",
            "y",
            "n",
            "t",
            "f",
            "2",
            "-1",
            "offf",
            "of",
            "off\u{a0}",
            "\u{a0}off",
            "o n",
        ] {
            let err = cfg(&[("ORCH_SERIAL_GATE", v)]).unwrap_err();
            assert_eq!(
                crate::error::exit_kind(&err),
                crate::error::ExitKind::Config,
                "{v:?}"
            );
            assert!(err.to_string().starts_with("ORCH_SERIAL_GATE="), "{err}");
        }
    }

    #[test]
    fn an_undecodable_orch_value_is_refused_naming_it_never_read_as_unset() {
        use std::os::unix::ffi::OsStringExt;
        let os = |s: &str| OsString::from(s);
        let raw = |b: &[u8]| OsString::from_vec(b.to_vec());
        let err = Environment::from_os_pairs([
            (os("ORCH_PLANE_WEBHOOK_SECRET"), raw(b"s\xe9cret")),
            (os("ORCH_STOP_ENABLED"), raw(b"off\xa0")),
            (os("ORCH_REPOS_DIR"), os("/srv/repos")),
        ])
        .unwrap_err();
        assert_eq!(
            crate::error::exit_kind(&err),
            crate::error::ExitKind::Config
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("ORCH_PLANE_WEBHOOK_SECRET, ORCH_STOP_ENABLED hold values"),
            "{msg}"
        );
        assert!(!msg.contains("cret"), "never the value: {msg}");
        // Other variables are not orchctl's to judge; an odd COLUMNS is only ignored.
        let env = Environment::from_os_pairs([
            (os("LANG"), raw(b"\xff")),
            (os("COLUMNS"), raw(b"8\xff")),
            (os("ORCH_TASK_DEPS"), os("off")),
        ])
        .unwrap();
        assert_eq!(env.columns(), None);
        assert!(!Config::from_environment(&env).unwrap().task_deps);
    }

    #[test]
    fn a_unicode_blank_secret_is_a_value_not_unset() {
        let c = cfg(&[("ORCH_PLANE_WEBHOOK_SECRET", "\u{a0}")]).unwrap();
        assert!(c.webhook_secret.is_some());
        let c = cfg(&[("ORCH_PLANE_WEBHOOK_SECRET", " \t")]).unwrap();
        assert!(c.webhook_secret.is_none());
    }

    #[test]
    fn durations_out_of_range_are_configuration_errors_not_panics() {
        for (k, v) in [
            ("ORCH_STOP_GRACE_SECS", "1e20"),
            ("ORCH_STOP_GRACE_SECS", "1e18"),
            ("ORCH_STOP_GRACE_SECS", "NaN"),
            ("ORCH_STOP_GRACE_SECS", "inf"),
            ("ORCH_STOP_GRACE_SECS", "-1"),
            ("ORCH_HTTP_TIMEOUT_SECS", "86401"),
            ("ORCH_GIT_TIMEOUT_SECS", "1e300"),
            ("ORCH_BUSY_TIMEOUT_MS", "3000000000"),
            ("ORCH_BUSY_TIMEOUT_MS", "99999999999999999999"),
        ] {
            let err = cfg(&[(k, v)]).unwrap_err();
            assert_eq!(
                crate::error::exit_kind(&err),
                crate::error::ExitKind::Config,
                "{k}={v}"
            );
        }
        let c = cfg(&[
            ("ORCH_STOP_GRACE_SECS", "86400"),
            ("ORCH_BUSY_TIMEOUT_MS", "86400000"),
        ])
        .unwrap();
        assert_eq!(c.stop_grace, Duration::from_secs(86_400));
        assert_eq!(c.busy_timeout_ms, 86_400_000);
    }

    #[test]
    fn stop_scope_is_a_csv_of_repos() {
        let c = cfg(&[("ORCH_STOP_REPOS", "enduro-trails, other")]).unwrap();
        assert!(c.stop_applies("enduro-trails"));
        assert!(!c.stop_applies("orchestrator"));
        let off = cfg(&[("ORCH_STOP_ENABLED", "off")]).unwrap();
        assert!(!off.stop_applies("orchestrator"));
    }

    #[test]
    fn secrets_are_not_debug_printed_and_are_scrubbed() {
        let c = cfg(&[
            ("ORCH_GITEA_URL", "http://g/"),
            ("ORCH_GITEA_OWNER", "o"),
            ("ORCH_GITEA_TOKEN", "tok-123"),
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("tok-123"));
        assert_eq!(c.scrub("bad token tok-123!"), "bad token ***!");
        assert_eq!(c.gitea.unwrap().url, "http://g");
        // A token is scrubbed even when its integration is not configured.
        let c = cfg(&[
            ("ORCH_PLANE_API_TOKEN", "plane-tok"),
            ("ORCH_GITEA_TOKEN", "gitea-tok"),
        ])
        .unwrap();
        assert!(c.plane.is_none() && c.gitea.is_none());
        assert_eq!(c.scrub("x plane-tok y"), "x *** y");
    }
}
