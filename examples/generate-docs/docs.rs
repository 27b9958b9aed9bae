//! Renders the man pages and shell completions from `orchctl::cli::command()`.
//!
//! Shared by the `generate-docs` example, which writes them into `man/` and
//! `completions/`, and by the staleness test (tests/docs.rs), which renders them in memory
//! and compares with the committed files. Pure: it takes the clap command, returns
//! `(relative path, bytes)` pairs and touches no file, so both sides render exactly alike.

#![allow(dead_code)]

use std::path::PathBuf;

use clap::ArgAction;
use clap_complete::Shell;
use roff::{bold, italic, roman, Inline, Roff};

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
    let mut buf = with_synopsis(buf, cmd);
    buf.extend(extra_sections(cmd, parent).to_roff().into_bytes());
    out.push((PathBuf::from("man").join(format!("{name}.1")), buf));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, Some(cmd), out);
    }
}

/// The page with clap_mangen's SYNOPSIS (flag names only) replaced by [`synopsis`].
fn with_synopsis(page: Vec<u8>, cmd: &clap::Command) -> Vec<u8> {
    let page = String::from_utf8(page).expect("clap_mangen renders UTF-8");
    let start = page.find(".SH SYNOPSIS\n").expect("a SYNOPSIS section");
    let end = page[start + 1..]
        .find("\n.SH ")
        .map(|i| start + 1 + i + 1)
        .unwrap_or(page.len());
    let mut r = Roff::new();
    r.control("SH", ["SYNOPSIS"]);
    r.text(synopsis(cmd));
    format!("{}{}{}", &page[..start], r.to_roff(), &page[end..]).into_bytes()
}

/// A SYNOPSIS line in SPEC §11's style: option values (`--db PATH`), one-of choices
/// (`--success | --failure`, `--format json|text`), repeatable options (`[--agent A]...`)
/// and a trailing command (`[--exec -- CMD ARGS...]`). The global options are shown once,
/// before the command path.
pub fn synopsis(cmd: &clap::Command) -> Vec<Inline> {
    let path = cmd.get_bin_name().unwrap_or(cmd.get_name()).to_string();
    let mut words = path.split(' ');
    let mut line = vec![bold(words.next().unwrap_or("orchctl"))];
    let visible = |a: &&clap::Arg| {
        !a.is_hide_set() && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
    };
    let globals: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(visible)
        .filter(|a| a.is_global_set())
        .collect();
    // The two places the state can live are alternatives (`[--db PATH | --db-url URL]`,
    // SPEC §11): the URL wins when both are given.
    let mut i = 0;
    while i < globals.len() {
        line.push(roman(" "));
        let a = globals[i];
        match globals.get(i + 1) {
            Some(b) if a.get_id() == "db" && b.get_id() == "db_url" => {
                line.push(roman("["));
                line.extend(option(a, false));
                line.push(roman(" | "));
                line.extend(option(b, false));
                line.push(roman("]"));
                i += 2;
            }
            _ => {
                line.extend(option(a, true));
                i += 1;
            }
        }
    }
    for w in words {
        line.push(roman(" "));
        line.push(bold(w));
    }
    let own: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(visible)
        .filter(|a| !a.is_global_set())
        .collect();
    for a in own.iter().filter(|a| a.is_positional() && !a.is_last_set()) {
        line.push(roman(" "));
        let name = value_name(a);
        if a.is_required_set() {
            line.push(italic(name));
        } else {
            line.extend([roman("["), italic(name), roman("]")]);
        }
    }
    // Groups of one-of choices (the derive's own group of every field is not one).
    let groups: Vec<(Vec<String>, bool)> = cmd
        .get_groups()
        .filter(|g| !(*g).clone().is_multiple())
        .map(|g| {
            (
                g.get_args().map(|id| id.to_string()).collect(),
                g.is_required_set(),
            )
        })
        .collect();
    let trailing: Vec<&&clap::Arg> = own.iter().filter(|a| a.is_last_set()).collect();
    let mut done: Vec<String> = Vec::new();
    for (at, a) in own.iter().enumerate() {
        if a.is_positional() {
            continue;
        }
        let id = a.get_id().to_string();
        if done.contains(&id) {
            continue;
        }
        line.push(roman(" "));
        if let Some((members, required)) = groups.iter().find(|(m, _)| m.contains(&id)) {
            line.push(roman(if *required { "(" } else { "[" }));
            for (i, m) in members.iter().enumerate() {
                let arg = own
                    .iter()
                    .find(|x| x.get_id().as_str() == m)
                    .expect("a group member");
                if i > 0 {
                    line.push(roman(" | "));
                }
                line.extend(option(arg, false));
                done.push(m.clone());
            }
            line.push(roman(if *required { ")" } else { "]" }));
            continue;
        }
        // The switch declared right before the trailing command introduces it
        // (`--exec -- CMD ARGS...`).
        let takes = own.get(at + 1).filter(|t| t.is_last_set());
        match takes {
            Some(t) => {
                line.push(roman("["));
                line.extend(option(a, false));
                line.extend([roman(" "), bold("--"), roman(" ")]);
                line.extend(trailing_words(t));
                line.push(roman("]"));
                done.push(t.get_id().to_string());
            }
            None => line.extend(option(a, !a.is_required_set())),
        }
        done.push(id);
    }
    for t in trailing {
        if !done.contains(&t.get_id().to_string()) {
            line.extend([roman(" ["), bold("--"), roman(" ")]);
            line.extend(trailing_words(t));
            line.push(roman("]"));
        }
    }
    if cmd.has_subcommands() {
        line.extend([roman(" "), italic("COMMAND")]);
    }
    line
}

/// `CMD ARGS...` for the trailing command.
fn trailing_words(a: &clap::Arg) -> Vec<Inline> {
    vec![
        italic(value_name(a)),
        roman(" "),
        italic("ARGS"),
        roman("..."),
    ]
}

/// What an argument's value is called: the value name given in cli.rs, else its choices
/// (`json|text`), else its id in capitals (which clap also takes as the value name).
fn value_name(a: &clap::Arg) -> String {
    let id = a.get_id().as_str().to_uppercase();
    let named = a
        .get_value_names()
        .map(|names| names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .filter(|names| *names != [id.clone()]);
    if let Some(names) = named {
        return names.join(" ");
    }
    let choices: Vec<String> = a
        .get_possible_values()
        .into_iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_string())
        .collect();
    if choices.is_empty() {
        id
    } else {
        choices.join("|")
    }
}

/// `--db PATH`, `[--db PATH]`, `[--agent A]...`, `--force`.
fn option(a: &clap::Arg, optional: bool) -> Vec<Inline> {
    let flag = match (a.get_long(), a.get_short()) {
        (Some(l), _) => format!("--{l}"),
        (None, Some(c)) => format!("-{c}"),
        (None, None) => a.get_id().to_string(),
    };
    let mut out = Vec::new();
    if optional {
        out.push(roman("["));
    }
    out.push(bold(flag));
    let takes_value = a.get_num_args().is_some_and(|n| n.takes_values());
    if takes_value {
        out.push(roman(" "));
        out.push(italic(value_name(a)));
    }
    if optional {
        out.push(roman("]"));
    }
    if matches!(a.get_action(), ArgAction::Append) {
        out.push(roman("..."));
    }
    out
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
             example is scripts/orchctl.env). Booleans accept 1/0, true/false, on/off and \
             yes/no in any case (empty = unset); anything else, or a value that is not \
             UTF-8, is exit 78 naming the variable. Every flag of a command also has a \
             variable, shown with the flag; text output fits the terminal's width, or \
             COLUMNS when set.",
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
