//! `orchctl dispatch` (SPEC §13): what a timer runs on each agent host, so that agents
//! run by themselves.
//!
//! One pass: the reap pass of §5 (dead runs free their slots), then, while an agent that
//! has a command (`ORCH_AGENT_CMD_<AGENT>`) has a free slot (`ORCH_AGENT_SLOTS_<AGENT>`,
//! `ORCH_MAX_AGENTS` in all), claim its oldest eligible job and launch it exactly as
//! `claim --exec` does (one claim transaction each, the slots counted inside it, so
//! concurrent passes never exceed them). It reports what it launched, reap's counts, the
//! slots and what is left waiting. `--dry-run` makes the same claims in a transaction that
//! is rolled back and launches nothing. An agent without a command is never launched here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::claim::{self, Claimed};
use crate::error::bad_input;
use crate::jobs::{self, ReapOptions, ReapReport};
use crate::names;
use crate::pipeline::Agent;
use crate::store::ClaimFilter;
use crate::worktree::{self, Place};
use crate::Ctx;

/// Eligible queued jobs are counted up to this many per agent: `waiting` says "at least
/// this many" beyond it, and its cost stays bounded however long the queue grows.
pub const WAITING_CAP: i64 = 100;

#[derive(Debug, Clone, Default)]
pub struct DispatchRequest {
    /// Only these agents (empty: every agent).
    pub agents: Vec<String>,
    pub repo: Option<String>,
    pub dry_run: bool,
}

/// One agent's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Slots {
    pub running: i64,
    pub limit: i64,
}

/// What `dispatch` did (SPEC §13).
#[derive(Debug, Clone, Serialize)]
pub struct DispatchResult {
    pub dry_run: bool,
    /// The runs started (with `--dry-run`: the ones that would be).
    pub launched: Vec<Claimed>,
    /// The reap pass's counts.
    pub reaped: ReapReport,
    /// Per agent: its running jobs and its limit (`ORCH_AGENT_SLOTS_<AGENT>`).
    pub slots: BTreeMap<String, Slots>,
    /// `ORCH_MAX_AGENTS`, and the jobs running in all.
    pub total: Slots,
    /// Per agent with eligible queued jobs left: how many (no free slot, or no command),
    /// counted up to [`WAITING_CAP`].
    pub waiting: BTreeMap<String, i64>,
    /// Agents that have no command: `dispatch` never launches them.
    pub no_command: Vec<String>,
    /// Launches that failed (their attempt was given back).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

pub fn dispatch(ctx: &Ctx, req: &DispatchRequest) -> Result<DispatchResult> {
    if let Some(r) = &req.repo {
        names::validate_repo(r)?;
    }
    let mut agents: Vec<Agent> = Vec::new();
    for a in &req.agents {
        let agent = Agent::parse(a).ok_or_else(|| bad_input(format!("unknown agent {a:?}")))?;
        if !agents.contains(&agent) {
            agents.push(agent);
        }
    }
    if agents.is_empty() {
        agents = Agent::ALL.to_vec();
    }
    let config = &ctx.config;
    let reaped = jobs::reap(
        ctx,
        ReapOptions {
            dry_run: req.dry_run,
            recover: false,
        },
    )?;
    let limits: Vec<(String, i64)> = agents
        .iter()
        .filter(|a| config.agent_cmd(**a).is_some())
        .map(|a| (a.as_str().to_string(), config.slots_of(*a)))
        .collect();
    let filter = ClaimFilter {
        agents: Vec::new(),
        repo: req.repo.clone(),
        task_deps: config.task_deps,
        serial_gate: config.serial_gate,
    };
    let mut launched = Vec::new();
    let mut errors = Vec::new();
    // Every successful launch fills a slot, so at most ORCH_MAX_AGENTS claims can succeed;
    // a launch that fails gives its attempt back, and is not tried again in this pass.
    let max_claims = config.max_agents.max(0) as usize;
    // A pass on a busy host has nothing to claim: when no agent with a command has a free
    // slot, the claim transaction is skipped (a slot freed meanwhile is filled by the
    // supervisor whose run ended, or by the next pass).
    let before = ctx
        .store
        .read(|r| r.running_by_agent(ctx.config.host_scope()))?;
    let total_before: i64 = before.iter().map(|(_, n)| n).sum();
    let free = total_before < config.max_agents
        && limits.iter().any(|(agent, limit)| {
            before
                .iter()
                .find(|(a, _)| a == agent)
                .map_or(0, |(_, n)| *n)
                < *limit
        });
    if !free {
        // Nothing to launch.
    } else if req.dry_run {
        launched = ctx.store.write_rolled_back(|w| {
            let mut would = Vec::new();
            while would.len() < max_claims {
                let sc = w.claim_in_slots(&filter, &limits, config.max_agents, ctx.host())?;
                let Some(job) = sc.job else { break };
                let mut c = claim::started(w, job)?;
                c.worktree = planned_worktree(ctx, &c);
                would.push(c);
            }
            Ok(would)
        })?;
    } else {
        for _ in 0..max_claims {
            let claimed = ctx.store.write(|w| {
                let sc = w.claim_in_slots(&filter, &limits, config.max_agents, ctx.host())?;
                sc.job.map(|job| claim::started(w, job)).transpose()
            })?;
            let Some(mut c) = claimed else { break };
            let argv = Agent::parse(&c.agent)
                .and_then(|a| config.agent_cmd(a))
                .map(<[String]>::to_vec)
                .unwrap_or_default();
            match claim::launch_run(ctx, &mut c, &argv, false) {
                Ok(()) => launched.push(c),
                Err(e) => errors.push(config.scrub(&format!(
                    "job {} run {} ({}): {e:#}",
                    c.id, c.run_id, c.agent
                ))),
            }
        }
    }
    let launched_any = !launched.is_empty() && !req.dry_run;
    let (running, mut waiting) = ctx.store.read(|r| {
        let running = if launched_any {
            r.running_by_agent(ctx.config.host_scope())?
        } else {
            before.clone()
        };
        let mut waiting = BTreeMap::new();
        for a in &agents {
            let n = r.count_eligible_queued(&filter, a.as_str(), WAITING_CAP)?;
            if n > 0 {
                waiting.insert(a.as_str().to_string(), n);
            }
        }
        Ok((running, waiting))
    })?;
    let running_of = |agent: &str| {
        running
            .iter()
            .find(|(a, _)| a == agent)
            .map_or(0, |(_, n)| *n)
    };
    let mut slots = BTreeMap::new();
    for a in &agents {
        slots.insert(
            a.as_str().to_string(),
            Slots {
                running: running_of(a.as_str()),
                limit: config.slots_of(*a),
            },
        );
    }
    // With --dry-run the would-be launches are not running: count them as if they were.
    if req.dry_run {
        for c in &launched {
            if let Some(s) = slots.get_mut(&c.agent) {
                s.running += 1;
            }
            if let Some(n) = waiting.get_mut(&c.agent) {
                *n -= 1;
            }
        }
        waiting.retain(|_, n| *n > 0);
    }
    let total_running: i64 = running.iter().map(|(_, n)| n).sum::<i64>()
        + if req.dry_run {
            launched.len() as i64
        } else {
            0
        };
    Ok(DispatchResult {
        dry_run: req.dry_run,
        launched,
        reaped,
        slots,
        total: Slots {
            running: total_running,
            limit: config.max_agents,
        },
        waiting,
        no_command: agents
            .iter()
            .filter(|a| config.agent_cmd(**a).is_none())
            .map(|a| a.as_str().to_string())
            .collect(),
        errors,
    })
}

/// The folder a launch of `c` would give its agent (for `--dry-run`).
fn planned_worktree(ctx: &Ctx, c: &Claimed) -> Option<PathBuf> {
    match worktree::place_for(&ctx.config, &c.agent, &c.repo, false) {
        Place::Worktree => c
            .work_item_id
            .as_deref()
            .and_then(|wi| worktree::worktree_path(&ctx.config, &c.repo, wi).ok()),
        Place::Clone => Some(worktree::clone_dir(&ctx.config, &c.repo)),
        Place::Inherited => None,
    }
}
