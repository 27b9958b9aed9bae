//! The generated and written documentation stays true: man pages and completions equal
//! what the CLI renders now (and the shells and `man` accept them), and README, the example
//! environment file and the cron/systemd examples name every variable, exit code and
//! command they should.

#[path = "../examples/generate-docs/docs.rs"]
mod generate;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::Env;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Generated files that differ from the committed ones, and committed ones not generated.
fn stale(files: &[(PathBuf, Vec<u8>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, bytes) in files {
        if std::fs::read(root().join(rel)).ok().as_deref() != Some(bytes.as_slice()) {
            out.push(rel.display().to_string());
        }
    }
    let wanted: BTreeSet<&PathBuf> = files.iter().map(|(p, _)| p).collect();
    for dir in generate::DIRS {
        for e in std::fs::read_dir(root().join(dir)).unwrap().flatten() {
            let rel = Path::new(dir).join(e.file_name());
            if !wanted.contains(&rel) {
                out.push(format!("{} (not generated)", rel.display()));
            }
        }
    }
    out
}

#[test]
fn man_pages_and_completions_are_current() {
    let files = generate::generated(orchctl::cli::command());
    let stale = stale(&files);
    assert!(
        stale.is_empty(),
        "stale generated files: {stale:?}\nrun: cargo run --example generate-docs"
    );
    // One page per command, `task add` and friends included.
    for page in [
        "orchctl",
        "orchctl-migrate",
        "orchctl-task",
        "orchctl-task-add",
        "orchctl-task-show",
        "orchctl-task-list",
        "orchctl-task-log",
        "orchctl-stop",
        "orchctl-claim",
        "orchctl-complete",
        "orchctl-reap",
        "orchctl-reconcile",
        "orchctl-deploy-begin",
        "orchctl-finalize-deploy",
        "orchctl-queue",
        "orchctl-event",
        "orchctl-metrics",
        "orchctl-prune",
    ] {
        let rel = PathBuf::from(format!("man/{page}.1"));
        assert!(files.iter().any(|(p, _)| *p == rel), "no page {page}");
    }
}

/// The staleness check above notices a changed command line: a flag added (in memory)
/// changes the subcommand's page and all three completions.
#[test]
fn a_new_flag_makes_the_committed_files_stale() {
    let cmd = orchctl::cli::command().mut_subcommand("stop", |s| {
        s.arg(
            clap::Arg::new("brand-new")
                .long("brand-new")
                .help("A flag nobody documented"),
        )
    });
    let stale = stale(&generate::generated(cmd));
    for f in [
        "man/orchctl-stop.1",
        "completions/orchctl.bash",
        "completions/_orchctl",
        "completions/orchctl.fish",
    ] {
        assert!(
            stale.iter().any(|s| s == f),
            "{f} not seen as stale: {stale:?}"
        );
    }
    assert!(
        !stale.iter().any(|s| s == "man/orchctl-queue.1"),
        "{stale:?}"
    );
}

/// The tools the documentation checks run, with the Debian package that has each: `.ci/run`
/// and `scripts/test` install the missing ones (a test checks that they do).
const TOOLS: [(&str, &str); 5] = [
    ("bash", "bash"),
    ("zsh", "zsh"),
    ("fish", "fish"),
    ("man", "man-db"),
    ("systemd-analyze", "systemd"),
];

/// Fails the calling test when `tool` is not installed: a check that cannot run must not
/// pass as if it had (`.ci/run` installs every tool of [`TOOLS`]).
fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let package = TOOLS
        .iter()
        .find(|(t, _)| *t == tool)
        .map_or(tool, |(_, p)| *p);
    assert!(
        found,
        "{tool} is not installed, so its check cannot run: apt-get install {package} \
         (.ci/run and scripts/test install it)"
    );
}

/// A missing tool fails its check (it used to return early and pass).
#[test]
fn a_missing_tool_fails_its_check_instead_of_passing() {
    let missing = std::panic::catch_unwind(|| require("orchctl-no-such-shell"));
    let message = missing.expect_err("a missing tool must fail the test");
    let text = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        text.contains("orchctl-no-such-shell is not installed"),
        "{text}"
    );
    require("sh");
}

#[test]
fn ci_and_the_test_script_install_every_tool_the_checks_need() {
    for script in [".ci/run", "scripts/test"] {
        let text = read(script);
        for (tool, package) in TOOLS {
            assert!(
                text.contains(&format!("{tool}:{package}")),
                "{script} does not install {package} (for {tool})"
            );
        }
    }
}

/// The PostgreSQL pass needs PostgreSQL's server, whose binaries Debian keeps off `PATH`
/// (/usr/lib/postgresql/<version>/bin): both scripts look there and install `postgresql`
/// when it is missing, and the test script runs the suite on both backends, the second
/// skipping the SQLite-only tests by name.
#[test]
fn ci_and_the_test_script_install_postgresql_and_run_both_backends() {
    for script in [".ci/run", "scripts/test"] {
        let text = read(script);
        assert!(
            text.contains("/usr/lib/postgresql/*/bin/initdb")
                && text.contains("missing+=(postgresql)"),
            "{script} does not install postgresql when its server is missing"
        );
    }
    let test = read("scripts/test");
    assert!(test.contains("passes=(sqlite postgres)"), "{test}");
    assert!(
        test.contains("ORCH_TEST_BACKEND=$backend cargo test --locked"),
        "{test}"
    );
    assert!(test.contains("skip=(--skip sqlite_only)"), "{test}");
    assert!(
        read(".ci/run").trim_end().ends_with("exec scripts/test"),
        "CI runs the test script"
    );
}

fn sh(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What bash completes for the words `line` (the last one being completed).
fn bash_completes(line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let script = format!(
        "source completions/orchctl.bash && COMP_WORDS=({}) COMP_CWORD={} \
         COMP_LINE='{line}' COMP_POINT={} && _orchctl orchctl '{}' '{}' && \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let (ok, out, err) = sh("bash", &["-c", &script]);
    assert!(ok, "{err}");
    let mut v: Vec<String> = out.lines().map(String::from).collect();
    v.sort();
    v
}

/// What fish completes for `line`.
fn fish_completes(line: &str) -> Vec<String> {
    let (ok, out, err) = sh(
        "fish",
        &[
            "-c",
            &format!("source completions/orchctl.fish; complete -C '{line}'"),
        ],
    );
    assert!(ok, "{err}");
    let mut v: Vec<String> = out
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// `--agent` and `--stage` complete the names the command accepts, not file names, in all
/// three shells.
#[test]
fn completions_offer_agent_and_stage_names() {
    require("bash");
    require("fish");
    let agents = sorted(&orchctl::cli::agent_names());
    let stages = sorted(&orchctl::pipeline::STAGES);
    let live = sorted(&orchctl::pipeline::LIVE_STAGES);
    for (line, want) in [
        ("orchctl claim --agent ", &agents),
        ("orchctl dispatch --agent ", &agents),
        ("orchctl task list --stage ", &stages),
        ("orchctl task add --stage ", &live),
    ] {
        assert_eq!(&bash_completes(line), want, "bash: {line}");
        assert_eq!(&fish_completes(line), want, "fish: {line}");
    }
    let zsh = read("completions/_orchctl");
    // Every --agent of zsh's completion (claim's and dispatch's) offers the names.
    let agent_specs: Vec<&str> = zsh.lines().filter(|l| l.contains("--agent=")).collect();
    assert_eq!(agent_specs.len(), 2, "claim and dispatch: {agent_specs:?}");
    for line in agent_specs {
        assert!(
            line.contains(&format!(":({})", orchctl::cli::agent_names().join(" "))),
            "{line}"
        );
    }
    for (spec, names) in [
        ("--agent=", orchctl::cli::agent_names().join(" ")),
        ("--stage=[Only tasks", orchctl::pipeline::STAGES.join(" ")),
        (
            "--stage=[Stage to start",
            orchctl::pipeline::LIVE_STAGES.join(" "),
        ),
    ] {
        let line = zsh
            .lines()
            .find(|l| l.contains(spec))
            .unwrap_or_else(|| panic!("_orchctl: no {spec}"));
        assert!(line.contains(&format!(":({names})")), "{line}");
    }
}

/// SYNOPSIS lines show option values, one-of choices and the trailing command, as SPEC §11
/// writes them.
#[test]
fn man_synopsis_lines_show_values_choices_and_the_trailing_command() {
    require("man");
    let synopsis = |page: &str| -> String {
        let out = Command::new("man")
            .args(["-l", &format!("man/{page}.1")])
            .current_dir(root())
            .env("MANWIDTH", "300")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines().skip_while(|l| l.trim() != "SYNOPSIS").skip(1);
        lines.next().unwrap_or_default().trim().to_string()
    };
    let globals = "orchctl [--db PATH | --db-url URL] [--format json|text]";
    for (page, want) in [
        ("orchctl", format!("{globals} COMMAND")),
        (
            "orchctl-complete",
            format!("{globals} complete JOB --run-id R (--success | --failure) [--error TEXT]"),
        ),
        (
            "orchctl-claim",
            format!("{globals} claim [--agent A]... [--repo R] [--exec -- CMD ARGS...]"),
        ),
        (
            "orchctl-finalize-deploy",
            format!("{globals} finalize-deploy TASK --outcome success|failure"),
        ),
        (
            "orchctl-stop",
            format!("{globals} stop TASK [--reason TEXT] [--force]"),
        ),
        (
            "orchctl-task-add",
            format!(
                "{globals} task add --repo R --work-item ID [--plane-id ID] [--project-id ID] \
                 [--branch B] [--title T] [--stage S] [--depends-on TASK]..."
            ),
        ),
        (
            "orchctl-task-list",
            format!("{globals} task list [--stage S] [--repo R] [--limit N]"),
        ),
    ] {
        assert_eq!(synopsis(page), want, "{page}");
    }
}

#[test]
fn bash_accepts_and_registers_the_completion() {
    let (ok, _, err) = sh("bash", &["-n", "completions/orchctl.bash"]);
    assert!(ok, "{err}");
    let (ok, out, err) = sh(
        "bash",
        &[
            "-c",
            "source completions/orchctl.bash && complete -p orchctl && \
             COMP_WORDS=(orchctl task a) COMP_CWORD=2 COMP_LINE='orchctl task a' COMP_POINT=14 \
             && _orchctl orchctl a task && echo \"${COMPREPLY[@]}\"",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("-F _orchctl orchctl"), "{out}");
    assert!(out.lines().last() == Some("add"), "{out}");
}

#[test]
fn zsh_accepts_and_registers_the_completion() {
    require("zsh");
    let (ok, _, err) = sh("zsh", &["-n", "completions/_orchctl"]);
    assert!(ok, "{err}");
    let (ok, out, err) = sh(
        "zsh",
        &[
            "-f",
            "-c",
            "fpath=(completions $fpath); autoload -U compinit; compinit -u -D; \
             print -r -- ${_comps[orchctl]}",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "_orchctl");
}

#[test]
fn fish_accepts_the_completion_and_completes_subcommands() {
    require("fish");
    let (ok, _, err) = sh("fish", &["--no-execute", "completions/orchctl.fish"]);
    assert!(ok, "{err}");
    let (ok, out, err) = sh(
        "fish",
        &[
            "-c",
            "source completions/orchctl.fish; complete -C 'orchctl finalize-deploy 1 --outcome '",
        ],
    );
    assert!(ok, "{err}");
    let mut values: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    values.sort();
    assert_eq!(values, vec!["failure", "success"], "{out}");
}

#[test]
fn man_renders_every_page_without_warnings() {
    require("man");
    for e in std::fs::read_dir(root().join("man")).unwrap().flatten() {
        let path = e.path();
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            path.display()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS"] {
            assert!(text.contains(section), "{}: no {section}", path.display());
        }
    }
    let out = Command::new("man")
        .args(["-l", "man/orchctl.1"])
        .current_dir(root())
        .env("MANWIDTH", "200")
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (name, _, _) in orchctl::config::VARIABLES {
        assert!(text.contains(name), "orchctl(1) ENVIRONMENT lacks {name}");
    }
}

/// The names `"ORCH_..."` written in a source file.
fn orch_names(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for piece in source.split('"').skip(1).step_by(2) {
        // `"ORCH_"` alone is the prefix (the environment reader's), not a variable.
        if piece.starts_with("ORCH_")
            && piece.len() > "ORCH_".len()
            && piece.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        {
            out.insert(piece.to_string());
        }
    }
    out
}

/// Every variable config.rs reads is documented in `config::VARIABLES`, and nothing else
/// is, besides the global flags' variables (--db, --format) that the CLI reads.
#[test]
fn the_variable_list_matches_what_config_reads() {
    let source = read("src/config.rs");
    let start = source
        .find("pub const VARIABLES")
        .expect("config::VARIABLES");
    let end = start
        + source[start..]
            .find("\n];\n")
            .expect("the end of VARIABLES");
    let code = format!("{}{}", &source[..start], &source[end..]);
    let mut read_by_code = orch_names(&code);
    read_by_code.extend(["ORCH_DB_PATH".to_string(), "ORCH_FORMAT".to_string()]);
    let documented: BTreeSet<String> = orchctl::config::VARIABLES
        .iter()
        .map(|(n, _, _)| n.to_string())
        .collect();
    assert_eq!(
        documented, read_by_code,
        "config::VARIABLES vs the names config.rs reads"
    );
    assert!(documented.len() >= 33);
}

#[test]
fn the_example_environment_file_has_every_variable_with_its_default() {
    let text = read("scripts/orchctl.env");
    let lines: Vec<&str> = text.lines().collect();
    for (name, default, _) in orchctl::config::VARIABLES {
        let at = lines
            .iter()
            .position(|l| l.trim_start_matches('#').starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("scripts/orchctl.env lacks {name}"));
        if default.is_empty() {
            continue;
        }
        // The default is on the line itself or in the comment block right above it.
        let mut block = vec![lines[at].replace('"', "")];
        let is_variable = |l: &str| l.trim_start_matches('#').starts_with("ORCH_");
        for l in lines[..at]
            .iter()
            .rev()
            .take_while(|l| l.starts_with('#') && !is_variable(l))
        {
            block.push(l.to_string());
        }
        assert!(
            block.iter().any(|l| l.contains(default)),
            "scripts/orchctl.env: {name} does not show its default {default:?}"
        );
    }
}

/// The example file is valid configuration once sourced by sh (as the cron lines do).
#[test]
fn the_example_environment_file_is_valid_configuration() {
    let env = Env::new();
    // On a PostgreSQL run, its URL too (which then wins over the path).
    let url = env
        .db_url()
        .map(|u| format!("ORCH_DB_URL='{u}' "))
        .unwrap_or_default();
    let script = format!(
        "set -a; . '{}'; set +a; \
         {url}ORCH_DB_PATH='{}' ORCH_REPOS_DIR='{}' ORCH_LOG_DIR='{}' exec '{}' --format json queue",
        root().join("scripts/orchctl.env").display(),
        env.db.display(),
        env.repos.display(),
        env.logs.display(),
        crate::common::BIN
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stop"]["enabled"], true);
}

#[test]
fn readme_documents_every_variable_exit_code_and_the_two_commands() {
    let readme = read("README.md");
    for (name, default, _) in orchctl::config::VARIABLES {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("README's configuration table lacks {name}"));
        assert!(
            row.contains(default),
            "README: {name} row does not show {default:?}"
        );
    }
    for (code, meaning) in orchctl::cli::EXIT_CODES {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {code} |")))
            .unwrap_or_else(|| panic!("README's exit code table lacks {code}"));
        assert!(row.contains(meaning), "README exit {code}: {row}");
    }
    // The per-command variables of every flag.
    let mut cmd = orchctl::cli::command();
    cmd.build();
    fn envs(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for a in cmd.get_arguments() {
            if let Some(e) = a.get_env() {
                out.insert(e.to_string_lossy().into_owned());
            }
        }
        for s in cmd.get_subcommands() {
            envs(s, out);
        }
    }
    let mut all = BTreeSet::new();
    envs(&cmd, &mut all);
    for e in all {
        assert!(
            readme.contains(&format!("`{e}`")),
            "README does not mention {e}"
        );
    }
    // The two commands, as written, exist and are executable.
    for script in ["scripts/demo", "scripts/test"] {
        assert!(
            readme.contains(&format!("```sh\n{script}\n```")),
            "README: {script}"
        );
        let mode = std::fs::metadata(root().join(script)).unwrap();
        assert!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o111 != 0);
    }
    assert!(readme.contains("cargo install --path ."));
    assert!(readme.contains("docs/plane-webhook.md"));
}

#[test]
fn cron_lines_and_systemd_units_run_the_right_commands() {
    let cron = read("scripts/cron/orchctl");
    let jobs: Vec<&str> = cron
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && !l.trim().is_empty()
                && !l.contains("SHELL=")
                && !l.starts_with("PATH=")
        })
        .collect();
    assert_eq!(jobs.len(), 5, "{jobs:?}");
    for (line, command) in
        jobs.iter()
            .zip(["dispatch", "reap", "reconcile", "prune", "reap --recover"])
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let user_at = if fields[0] == "@reboot" { 1 } else { 5 };
        assert_eq!(fields[user_at], "orchctl", "{line}");
        let cmd = fields[user_at + 1..].join(" ");
        assert!(
            cmd.contains(&format!("orchctl --format json {command} >>")),
            "{line}"
        );
        assert!(cmd.contains(". /etc/orchctl/env"), "{line}");
        let (ok, _, err) = sh("sh", &["-n", "-c", &cmd]);
        assert!(ok, "{line}: {err}");
    }
    assert!(jobs[4].starts_with("@reboot"));
    // dispatch runs on cron's finest tick, every minute.
    assert!(jobs[0].starts_with("*   *  *   *   *"), "{}", jobs[0]);
    // The daily prune runs once a day.
    let prune: Vec<&str> = jobs[3].split_whitespace().take(5).collect();
    assert!(
        prune[0].parse::<u8>().is_ok() && prune[1].parse::<u8>().is_ok() && prune[2..] == ["*"; 3],
        "{}",
        jobs[3]
    );

    for (unit, command) in [
        ("orchctl-dispatch.service", "dispatch"),
        ("orchctl-reap.service", "reap"),
        ("orchctl-reconcile.service", "reconcile"),
        ("orchctl-recover.service", "reap --recover"),
        ("orchctl-prune.service", "prune"),
    ] {
        let text = read(&format!("scripts/systemd/{unit}"));
        assert!(
            text.contains(&format!(
                "ExecStart=/usr/local/bin/orchctl --format json {command}\n"
            )),
            "{unit}"
        );
        assert!(text.contains("EnvironmentFile=/etc/orchctl/env"), "{unit}");
        assert!(text.contains("Type=oneshot"), "{unit}");
    }
    for timer in [
        "orchctl-dispatch.timer",
        "orchctl-reap.timer",
        "orchctl-reconcile.timer",
    ] {
        let text = read(&format!("scripts/systemd/{timer}"));
        assert!(
            text.contains("OnUnitActiveSec=") && text.contains("WantedBy=timers.target"),
            "{timer}"
        );
    }
    // Every 15 s, and the agents dispatch starts are not killed when it exits.
    assert!(read("scripts/systemd/orchctl-dispatch.timer").contains("OnUnitActiveSec=15s\n"));
    assert!(read("scripts/systemd/orchctl-dispatch.service").contains("KillMode=process\n"));
    let text = read("scripts/systemd/orchctl-prune.timer");
    assert!(
        text.contains("OnCalendar=daily\n") && text.contains("WantedBy=timers.target"),
        "orchctl-prune.timer"
    );
}

/// systemd itself parses the units (with ExecStart pointed at the built binary, since
/// verify checks that the program exists).
#[test]
fn systemd_analyze_verifies_the_units() {
    require("systemd-analyze");
    let env = Env::new();
    let dir = env.path().join("units");
    std::fs::create_dir_all(&dir).unwrap();
    // The units; the webhook server's drop-in folder is checked below.
    let names: Vec<String> = std::fs::read_dir(root().join("scripts/systemd"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in &names {
        let text = read(&format!("scripts/systemd/{name}"))
            .replace("/usr/local/bin/orchctl", crate::common::BIN)
            .replace(
                "/etc/orchctl/env",
                &root().join("scripts/orchctl.env").display().to_string(),
            )
            .replace("User=orchctl\n", "")
            .replace("Group=orchctl\n", "");
        std::fs::write(dir.join(name), text).unwrap();
    }
    // verify also checks that each Documentation=man:... page exists: ours, installed
    // into a private MANPATH.
    let man1 = env.path().join("manpath/man1");
    std::fs::create_dir_all(&man1).unwrap();
    for e in std::fs::read_dir(root().join("man")).unwrap().flatten() {
        std::fs::copy(e.path(), man1.join(e.file_name())).unwrap();
    }
    let mut paths: Vec<String> = names
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect();
    // The webhook server's drop-in, on Debian's own unit (package `webhook`).
    let debian_unit = Path::new("/lib/systemd/system/webhook.service");
    assert!(
        debian_unit.exists(),
        "{} is missing: apt-get install webhook (scripts/test and .ci/run install it)",
        debian_unit.display()
    );
    std::fs::copy(debian_unit, dir.join("webhook.service")).unwrap();
    std::fs::create_dir_all(dir.join("webhook.service.d")).unwrap();
    let drop_in = read("scripts/systemd/webhook.service.d/orchctl.conf")
        .replace(
            "/etc/orchctl/env",
            &root().join("scripts/orchctl.env").display().to_string(),
        )
        .replace("User=orchctl\n", "")
        .replace("Group=orchctl\n", "");
    std::fs::write(dir.join("webhook.service.d/orchctl.conf"), drop_in).unwrap();
    paths.push(dir.join("webhook.service").display().to_string());
    let names: Vec<String> = names
        .into_iter()
        .chain(["webhook.service".to_string(), "orchctl.conf".to_string()])
        .collect();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .env("MANPATH", env.path().join("manpath"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Offline (no systemd running, e.g. in a container) verify may complain about the
    // manager itself; only complaints about our units count.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .collect();
    assert!(ours.is_empty(), "{stderr}");
}
