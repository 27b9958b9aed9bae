//! The orchctl binary: parse, open, dispatch, render, and map every error to an exit code
//! in one place (SPEC §9). Nothing below `main` prints.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use orchctl::cli::{Cli, Command, DeployOutcomeArg, Format, ParseError, TaskCommand};
use orchctl::config::{scrub_env, Environment};
use orchctl::error::{self, ExitKind};
use orchctl::pipeline::Trigger;
use orchctl::{
    claim, deploy, dispatch, event, jobs, metrics, prune, queue, reconcile, render, stop, tasks,
    transitions, Config, Ctx, DbTarget,
};

/// What a successful command hands back to be printed.
struct Output {
    json: Value,
    /// A text layout of its own; `None` uses the generic one.
    text: Option<fn(&Value) -> String>,
    warning: Option<String>,
    /// Printed as it is, whatever the format (the Prometheus text of `metrics`).
    raw: Option<String>,
}

fn out<T: Serialize>(value: &T) -> Result<Output> {
    Ok(Output {
        json: serde_json::to_value(value)?,
        text: None,
        warning: None,
        raw: None,
    })
}

/// Output printed verbatim in every format.
fn raw(text: String) -> Output {
    Output {
        json: Value::Null,
        text: None,
        warning: None,
        raw: Some(text),
    }
}

/// A result with its own text layout.
fn laid_out<T: Serialize>(value: &T, text: fn(&Value) -> String) -> Result<Output> {
    let mut o = out(value)?;
    o.text = Some(text);
    Ok(o)
}

/// A usage error as SPEC §9's one line, plus a hint line: clap's message without its
/// `error:` prefix, with the indented details (missing arguments, possible values) joined
/// in; clap's tips, the subcommand's usage and where its help is make the hint.
fn usage_error(e: &clap::Error) -> (String, Option<String>) {
    let rendered = e.render().to_string();
    let mut lines = rendered.lines();
    let mut message = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_string();
    let mut hints: Vec<String> = Vec::new();
    let mut details: Vec<String> = Vec::new();
    let mut path: Vec<String> = Vec::new();
    for line in lines {
        let t = line.trim();
        if let Some(tip) = t.strip_prefix("tip: ") {
            hints.push(tip.to_string());
        } else if let Some(usage) = t.strip_prefix("Usage: ") {
            // "orchctl task show [OPTIONS] <TASK>": the words before the first argument.
            path = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['-', '<', '[']))
                .map(String::from)
                .collect();
        } else if t.is_empty() || t.starts_with("For more information") {
            continue;
        } else if line.starts_with(' ') {
            details.push(t.to_string());
        }
    }
    if !details.is_empty() {
        message = format!("{message}: {}", details.join(", "));
    }
    // clap's own usage line lists the arguments given through the environment too, so the
    // subcommand's plain usage is rendered again.
    let mut cmd = orchctl::cli::command();
    cmd.build();
    let mut sub = &cmd;
    if path.is_empty() {
        // Some errors (an invalid value) carry no usage line: find the subcommand in argv.
        path.push("orchctl".into());
        for arg in std::env::args().skip(1).take_while(|a| a != "--") {
            if let Some(s) = sub.find_subcommand(&arg) {
                sub = s;
                path.push(arg);
            }
        }
    } else {
        for name in path.iter().skip(1) {
            match sub.find_subcommand(name) {
                Some(s) => sub = s,
                None => break,
            }
        }
    }
    let usage = sub.clone().render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage: ");
    hints.push(format!("usage: {usage}"));
    hints.push(format!("see '{} --help'", path.join(" ")));
    (message, Some(hints.join("; ")))
}

/// Prints `err` as SPEC §9's one line (+ hint) and returns its exit code.
fn fail(err: &anyhow::Error) -> ExitCode {
    // Messages are built from names and ids, never tokens; scrubbing is the backstop for
    // text that came from outside (git's stderr, a server's answer).
    eprintln!("orchctl: {}", scrub_env(&format!("{err:#}")));
    if let Some(h) = error::hint(err) {
        eprintln!("orchctl: hint: {}", scrub_env(&h));
    }
    ExitCode::from(error::exit_kind(err).code())
}

/// The width text output must fit: `COLUMNS` when set, else the terminal's (stdout's, or
/// stderr's when stdout is piped into a pager); `None` when there is no terminal.
fn text_width(env: &Environment) -> Option<usize> {
    env.columns().or_else(|| {
        terminal_size::terminal_size_of(std::io::stdout())
            .or_else(|| terminal_size::terminal_size_of(std::io::stderr()))
            .map(|(w, _)| w.0 as usize)
            .filter(|&w| w > 0)
    })
}

fn main() -> ExitCode {
    // A run's supervisor (SPEC §13) is this binary exec'd by a launcher, not a command
    // people type: it has no command line of its own to parse.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Every run this process launches (claim --exec, dispatch, a supervisor's own dispatch
    // pass) is supervised by this very binary.
    orchctl::claim::set_supervisor_program("/proc/self/exe".into());
    if args.first().is_some_and(|a| a == orchctl::supervisor::ARG) {
        return ExitCode::from(orchctl::supervisor::main(&args));
    }
    // Every ORCH_* variable is read (an undecodable value refused) and every switch
    // variable checked before clap parses, so clap only ever sees values that passed.
    let environment = match Environment::capture() {
        Ok(env) => env,
        Err(err) => return fail(&err),
    };
    let cli = match orchctl::cli::try_parse(&environment) {
        Ok(c) => c,
        Err(ParseError::Config(err)) => return fail(&err),
        Err(ParseError::Usage(e)) => {
            use clap::error::ErrorKind;
            if !e.use_stderr() {
                // --help and --version.
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                // `orchctl` or `orchctl task` alone: the help is the useful answer.
                let _ = e.print();
            } else {
                // clap quotes the offending argument, which may be a pasted token.
                let (message, hint) = usage_error(&e);
                eprintln!("orchctl: {}", scrub_env(&message));
                if let Some(h) = hint {
                    eprintln!("orchctl: hint: {}", scrub_env(&h));
                }
            }
            return ExitCode::from(ExitKind::Usage.code());
        }
    };
    let format = cli.format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Json
    });
    if std::io::stderr().is_terminal() {
        // A person is watching: say why a stop does not return yet.
        orchctl::integrations::process::set_wait_reporter(|w| {
            eprintln!(
                "orchctl: waiting up to {} s for agent pid {} to exit after SIGTERM \
                 (SIGKILL then; ORCH_STOP_GRACE_SECS)",
                w.grace.as_secs_f64(),
                w.pid
            );
        });
    }
    let width = text_width(&environment);
    match run(cli, &environment) {
        Ok(Some(output)) => emit(output, format, width),
        Ok(None) => ExitCode::from(ExitKind::NothingToClaim.code()),
        Err(err) => fail(&err),
    }
}

fn emit(output: Output, format: Format, width: Option<usize>) -> ExitCode {
    if let Some(w) = &output.warning {
        eprintln!("orchctl: warning: {}", scrub_env(w));
    }
    let text = match (output.raw, format) {
        (Some(raw), _) => raw,
        (None, Format::Json) => format!("{}\n", output.json),
        // Titles and reasons come from Plane and operators: a terminal must not receive
        // their escape sequences (JSON escapes them by itself).
        (None, Format::Text) => render::printable(&render::layout(width, || match output.text {
            Some(f) => f(&output.json),
            None => render::generic(&output.json),
        })),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`orchctl queue | head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orchctl: writing the result: {e}");
            ExitCode::from(ExitKind::Failure.code())
        }
    }
}

/// `Ok(None)` means "nothing to claim" (exit 3).
fn run(cli: Cli, environment: &Environment) -> Result<Option<Output>> {
    let config = Config::from_environment(environment)?;
    let target = match cli.db_url.filter(|u| !u.trim().is_empty()) {
        Some(url) => DbTarget::Postgres(url),
        None => DbTarget::Sqlite(cli.db.unwrap_or_else(orchctl::default_db_path)),
    };
    let ctx = match Ctx::open_target(&target, config.clone()) {
        Ok(ctx) => ctx,
        // SPEC §8: queue always prints and exits 0 — dashboards poll it — also when the
        // database cannot be opened as usual (a full disk refuses the -wal/-shm files
        // SQLite creates at open). A database newer than this binary stays exit 78.
        Err(e) => match &cli.command {
            Command::Queue(q) if error::exit_kind(&e) != ExitKind::Config => {
                let (json, warning) = queue::snapshot_despite(&target, &config, q.recent, &e);
                let mut o = laid_out(&json, render::queue)?;
                o.warning = Some(warning);
                return Ok(Some(o));
            }
            _ => return Err(e),
        },
    };
    if ctx.store.created() {
        // A mistyped ORCH_DB_PATH (or URL) must not go unnoticed as an empty pipeline.
        eprintln!(
            "orchctl: created a new database at {}",
            scrub_env(&ctx.store.describe())
        );
    }
    let output = match cli.command {
        Command::Migrate => {
            // After a bulk load by another tool: what tasks wait for is settled here.
            ctx.store.settle_waits()?;
            laid_out(
                &json!({
                    "ok": true,
                    "from": ctx.store.opened_version(),
                    "to": ctx.store.schema_version()?,
                    "db": ctx.store.describe(),
                }),
                render::migrate,
            )?
        }
        Command::Task(TaskCommand::Add(a)) => {
            let repo = a.repo.clone();
            let mut o = laid_out(
                &tasks::add(
                    &ctx,
                    &tasks::AddTask {
                        repo: a.repo,
                        work_item: a.work_item,
                        plane_id: a.plane_id,
                        project_id: a.project_id,
                        branch: a.branch,
                        title: a.title,
                        stage: Some(a.stage),
                        depends_on: a.depends_on,
                    },
                )?,
                render::task_add,
            )?;
            o.warning = tasks::missing_clone_warning(&ctx.config, &repo);
            o
        }
        Command::Task(TaskCommand::Show(t)) => {
            laid_out(&tasks::show(&ctx, &t.task)?, render::task_show)?
        }
        Command::Task(TaskCommand::List(l)) => laid_out(
            &tasks::list(&ctx, l.stage.as_deref(), l.repo.as_deref(), l.limit)?,
            render::task_list,
        )?,
        Command::Task(TaskCommand::Log(t)) => {
            laid_out(&tasks::log(&ctx, &t.task)?, render::task_log)?
        }
        Command::Stop(s) => {
            let r = stop::stop(
                &ctx,
                &s.task,
                &stop::StopOptions::operator(s.reason, s.force),
            )?;
            let mut o = laid_out(&r, render::stop)?;
            o.warning = r.warning.clone();
            o
        }
        Command::Claim(c) => {
            let req = claim::ClaimRequest {
                agents: c.agents,
                repo: c.repo,
                exec: c.command,
            };
            match claim::claim(&ctx, &req)? {
                Some(claimed) => laid_out(&claimed, render::claim)?,
                None => {
                    eprintln!("orchctl: nothing to claim");
                    return Ok(None);
                }
            }
        }
        Command::Dispatch(d) => laid_out(
            &dispatch::dispatch(
                &ctx,
                &dispatch::DispatchRequest {
                    agents: d.agents,
                    repo: d.repo,
                    dry_run: d.dry_run,
                },
            )?,
            render::dispatch,
        )?,
        Command::Complete(c) => {
            let outcome = if c.success {
                jobs::RunOutcome::Success
            } else {
                jobs::RunOutcome::Failure(c.error)
            };
            laid_out(
                &jobs::complete(&ctx, c.job, c.run_id, &outcome)?,
                render::complete,
            )?
        }
        Command::Reap(r) => laid_out(
            &jobs::reap(
                &ctx,
                jobs::ReapOptions {
                    dry_run: r.dry_run,
                    recover: r.recover,
                },
            )?,
            render::reap,
        )?,
        Command::Reconcile => laid_out(&reconcile::reconcile(&ctx)?, render::reconcile)?,
        Command::DeployBegin(t) => laid_out(&deploy::begin(&ctx, &t.task)?, render::deploy_begin)?,
        Command::FinalizeDeploy(f) => laid_out(
            &deploy::finalize(
                &ctx,
                &f.task,
                match f.outcome {
                    DeployOutcomeArg::Success => deploy::Outcome::Success,
                    DeployOutcomeArg::Failure => deploy::Outcome::Failure,
                },
            )?,
            render::finalize_deploy,
        )?,
        Command::Queue(q) => laid_out(&queue::snapshot(&ctx, q.recent), render::queue)?,
        Command::Event(e) => {
            if std::io::stdin().is_terminal() {
                // Not a webhook server's pipe: someone typed the command and would wait on
                // a silent prompt.
                eprintln!(
                    "orchctl: waiting for a Plane delivery body on stdin \
                     (end it with Ctrl-D; a webhook server pipes it in)"
                );
            }
            let body = read_body().context("reading the delivery body from stdin")?;
            laid_out(
                &event::handle(
                    &ctx,
                    &body,
                    &event::Delivery {
                        delivery: e.delivery,
                        event: e.event,
                        signature: e.signature,
                    },
                )?,
                render::event,
            )?
        }
        Command::Approve(t) => operate(&ctx, &t.task, Trigger::Approved, None)?,
        Command::Reject(r) => operate(&ctx, &r.task, Trigger::Rejected, r.reason.as_deref())?,
        Command::ConfirmDeploy(t) => operate(&ctx, &t.task, Trigger::ConfirmDeploy, None)?,
        Command::Retry(t) => operate(&ctx, &t.task, Trigger::Retry, None)?,
        Command::Metrics(m) => {
            let text = metrics::exposition(&metrics::collect(&ctx)?);
            match m.textfile {
                Some(dir) => {
                    metrics::write_textfile(&dir, &text)?;
                    raw(String::new())
                }
                None => raw(text),
            }
        }
        Command::Prune(p) => out(&prune::prune(
            &ctx,
            prune::PruneOptions {
                older_than_days: p.older_than,
                dry_run: p.dry_run,
            },
        )?)?,
    };
    Ok(Some(output))
}

/// An operator's stand-in for a Plane state (SPEC §14).
fn operate(ctx: &Ctx, task: &str, on: Trigger, reason: Option<&str>) -> Result<Output> {
    laid_out(
        &transitions::operate(ctx, task, on, reason)?,
        render::operator,
    )
}

/// Reads stdin, at most 1 MiB (SPEC §6): a larger body is refused, not truncated.
fn read_body() -> Result<Vec<u8>> {
    use std::io::Read;
    const LIMIT: u64 = 1 << 20;
    let mut body = Vec::new();
    std::io::stdin()
        .lock()
        .take(LIMIT + 1)
        .read_to_end(&mut body)?;
    if body.len() as u64 > LIMIT {
        return Err(error::bad_input("the delivery body is larger than 1 MiB"));
    }
    Ok(body)
}
