//! The orchctl binary: parse, open, dispatch, render, and map every error to an exit code
//! in one place (SPEC §9). Nothing below `main` prints.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

use orchctl::cli::{Cli, Command, DeployOutcomeArg, Format, TaskCommand};
use orchctl::error::{self, ExitKind};
use orchctl::{claim, deploy, event, jobs, queue, reconcile, render, stop, tasks, Config, Ctx};

/// What a successful command hands back to be printed.
struct Output {
    json: Value,
    /// A text layout of its own; `None` uses the generic one.
    text: Option<fn(&Value) -> String>,
    warning: Option<String>,
}

fn out<T: Serialize>(value: &T) -> Result<Output> {
    Ok(Output {
        json: serde_json::to_value(value)?,
        text: None,
        warning: None,
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let format = cli.format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Json
    });
    match run(cli) {
        Ok(Some(output)) => emit(output, format),
        Ok(None) => ExitCode::from(ExitKind::NothingToClaim.code()),
        Err(err) => {
            let kind = error::exit_kind(&err);
            eprintln!("orchctl: {err:#}");
            if let Some(h) = error::hint(&err) {
                eprintln!("orchctl: hint: {h}");
            }
            ExitCode::from(kind.code())
        }
    }
}

fn emit(output: Output, format: Format) -> ExitCode {
    if let Some(w) = &output.warning {
        eprintln!("orchctl: warning: {w}");
    }
    let text = match format {
        Format::Json => format!("{}\n", output.json),
        Format::Text => match output.text {
            Some(f) => f(&output.json),
            None => render::generic(&output.json),
        },
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
fn run(cli: Cli) -> Result<Option<Output>> {
    let config = Config::from_env()?;
    let db = cli.db.unwrap_or_else(orchctl::default_db_path);
    let ctx = Ctx::open(&db, config)?;
    let output = match cli.command {
        Command::Migrate => out(&json!({
            "ok": true,
            "from": ctx.store.opened_version(),
            "to": ctx.store.user_version()?,
            "db": ctx.store.path(),
        }))?,
        Command::Task(TaskCommand::Add(a)) => out(&tasks::add(
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
        )?)?,
        Command::Task(TaskCommand::Show(t)) => out(&tasks::show(&ctx, &t.task)?)?,
        Command::Task(TaskCommand::List(l)) => {
            let mut o = out(&tasks::list(
                &ctx,
                l.stage.as_deref(),
                l.repo.as_deref(),
                l.limit,
            )?)?;
            o.text = Some(render::task_list);
            o
        }
        Command::Task(TaskCommand::Log(t)) => {
            let mut o = out(&tasks::log(&ctx, &t.task)?)?;
            o.text = Some(render::task_log);
            o
        }
        Command::Stop(s) => {
            let r = stop::stop(
                &ctx,
                &s.task,
                &stop::StopOptions::operator(s.reason, s.force),
            )?;
            let mut o = out(&r)?;
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
                Some(claimed) => out(&claimed)?,
                None => {
                    eprintln!("orchctl: nothing to claim");
                    return Ok(None);
                }
            }
        }
        Command::Complete(c) => {
            let outcome = if c.success {
                jobs::RunOutcome::Success
            } else {
                jobs::RunOutcome::Failure(c.error)
            };
            out(&jobs::complete(&ctx, c.job, c.run_id, &outcome)?)?
        }
        Command::Reap(r) => out(&jobs::reap(
            &ctx,
            jobs::ReapOptions {
                dry_run: r.dry_run,
                recover: r.recover,
            },
        )?)?,
        Command::Reconcile => out(&reconcile::reconcile(&ctx)?)?,
        Command::DeployBegin(t) => out(&deploy::begin(&ctx, &t.task)?)?,
        Command::FinalizeDeploy(f) => out(&deploy::finalize(
            &ctx,
            &f.task,
            match f.outcome {
                DeployOutcomeArg::Success => deploy::Outcome::Success,
                DeployOutcomeArg::Failure => deploy::Outcome::Failure,
            },
        )?)?,
        Command::Queue(q) => out(&queue::snapshot(&ctx, q.recent))?,
        Command::Event(e) => {
            let body = read_body().context("reading the delivery body from stdin")?;
            out(&event::handle(
                &ctx,
                &body,
                &event::Delivery {
                    delivery: e.delivery,
                    event: e.event,
                    signature: e.signature,
                },
            )?)?
        }
    };
    Ok(Some(output))
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
