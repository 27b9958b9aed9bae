//! Renders the man pages and shell completions from `orchctl::cli::command()`.
//!
//! Shared by the `generate-docs` example, which writes them into `man/` and
//! `completions/`, and by the staleness test (tests/docs.rs), which renders them in memory
//! and compares with the committed files. Pure: it takes the clap command, returns
//! `(relative path, bytes)` pairs and touches no file, so both sides render exactly alike.

#![allow(dead_code)]

use std::path::PathBuf;

use clap_complete::Shell;
use roff::{bold, roman, Roff};

/// The folders the generated files live in (relative to the repository root).
pub const DIRS: [&str; 2] = ["man", "completions"];

/// Every generated file for `cmd` (normally `orchctl::cli::command()`).
pub fn generated(cmd: clap::Command) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut man_cmd = cmd.clone().disable_help_subcommand(true);
    man_cmd.build();
    man_pages(&man_cmd, None, &mut out);
    for (shell, file) in [
        (Shell::Bash, "orchctl.bash"),
        (Shell::Zsh, "_orchctl"),
        (Shell::Fish, "orchctl.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "orchctl", &mut buf);
        out.push((PathBuf::from("completions").join(file), buf));
    }
    out.sort();
    out
}

/// One page for `cmd` and, recursively, for each of its subcommands.
fn man_pages(
    cmd: &clap::Command,
    parent: Option<&clap::Command>,
    out: &mut Vec<(PathBuf, Vec<u8>)>,
) {
    let name = page_name(cmd);
    // The help's short exit-code line is replaced by a proper EXIT STATUS section.
    let page = clap_mangen::Man::new(
        cmd.clone()
            .after_help(None::<&str>)
            .after_long_help(None::<&str>),
    )
    .manual("orchctl manual");
    let mut buf = Vec::new();
    page.render(&mut buf).expect("rendering into memory");
    buf.extend(extra_sections(cmd, parent).to_roff().into_bytes());
    out.push((PathBuf::from("man").join(format!("{name}.1")), buf));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, Some(cmd), out);
    }
}

/// `orchctl-task-add` for `orchctl task add` (clap sets it when the command is built).
fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name().unwrap_or(cmd.get_name()).to_string()
}

fn extra_sections(cmd: &clap::Command, parent: Option<&clap::Command>) -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in orchctl::cli::EXIT_CODES {
        r.control("TP", [])
            .text([bold(code.to_string())])
            .text([roman(meaning)]);
    }
    if parent.is_none() {
        r.control("SH", ["ENVIRONMENT"]);
        r.text([roman(
            "Configuration comes from these variables (systemd EnvironmentFile= works; an \
             example is scripts/orchctl.env). Booleans accept 1/0, true/false and on/off. \
             Every flag of a command also has a variable, shown with the flag.",
        )]);
        for (name, default, meaning) in orchctl::config::VARIABLES {
            let default = if default.is_empty() { "unset" } else { default };
            r.control("TP", [])
                .text([bold(*name), roman(format!(" (default: {default})"))])
                .text([roman(*meaning)]);
        }
        r.control("SH", ["FILES"]);
        r.control("TP", [])
            .text([bold("$XDG_STATE_HOME/orchctl/orch.db")])
            .text([roman(
                "The database when neither --db nor ORCH_DB_PATH is given \
             (~/.local/state/orchctl/orch.db without XDG_STATE_HOME).",
            )]);
    }
    let mut see_also: Vec<String> = Vec::new();
    if let Some(p) = parent {
        see_also.push(page_name(p));
    }
    see_also.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(page_name),
    );
    if !see_also.is_empty() {
        r.control("SH", ["SEE ALSO"]);
        let list: Vec<String> = see_also.iter().map(|n| format!("{n}(1)")).collect();
        r.text([roman(list.join(", "))]);
    }
    r
}
