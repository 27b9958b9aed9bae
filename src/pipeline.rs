//! The stage map of SPEC §1: which agent works which stage, what is terminal.
//!
//! Pure functions, no I/O: the modules that move tasks (complete, event, deploy) ask here
//! so the pipeline's shape is written down once.

pub const STAGES: [&str; 6] = [
    "analysis",
    "development",
    "review",
    "deploy",
    "done",
    "cancelled",
];

/// Stages a task may be created in.
pub const LIVE_STAGES: [&str; 4] = ["analysis", "development", "review", "deploy"];

/// Nothing ever changes a terminal task again.
pub fn is_terminal(stage: &str) -> bool {
    matches!(stage, "done" | "cancelled")
}

/// `development`, `review` or `deploy`.
pub fn is_mid_pipeline(stage: &str) -> bool {
    matches!(stage, "development" | "review" | "deploy")
}

/// The agent that works a stage.
pub fn agent_for_stage(stage: &str) -> Option<&'static str> {
    match stage {
        "analysis" => Some("analyst"),
        "development" => Some("developer"),
        "review" => Some("reviewer"),
        "deploy" => Some("deployer"),
        _ => None,
    }
}

/// The agent queued when a task enters `stage` by itself (a task entering `deploy` parks
/// awaiting Confirm Deploy, so it gets none).
pub fn entry_agent(stage: &str) -> Option<&'static str> {
    match stage {
        "deploy" => None,
        s => agent_for_stage(s),
    }
}

/// Where a successful job of `agent` moves a task in `stage`: `Some(next)` for a stage
/// move, `None` when the task parks where it is.
pub fn next_stage_after_success(stage: &str, agent: &str) -> Option<&'static str> {
    match (stage, agent) {
        ("development", "developer") => Some("review"),
        ("review", "reviewer") => Some("deploy"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_map() {
        assert_eq!(agent_for_stage("deploy"), Some("deployer"));
        assert_eq!(entry_agent("deploy"), None);
        assert_eq!(entry_agent("development"), Some("developer"));
        assert_eq!(
            next_stage_after_success("development", "developer"),
            Some("review")
        );
        assert_eq!(
            next_stage_after_success("review", "reviewer"),
            Some("deploy")
        );
        assert_eq!(next_stage_after_success("analysis", "analyst"), None);
        assert!(is_terminal("cancelled") && is_terminal("done") && !is_terminal("deploy"));
        assert!(is_mid_pipeline("review") && !is_mid_pipeline("analysis"));
    }
}
