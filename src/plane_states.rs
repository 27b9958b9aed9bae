//! Plane's workflow states as orchctl reads them, shared by `event` (a delivery names a
//! state id) and `reconcile`'s Plane pass (a listed work item carries one): the
//! per-project cache of state names in the database, its refresh from Plane's states
//! API, and the [`Route`] a state name stands for (SPEC §6; the names are configurable
//! and compared without regard to case or surrounding blanks).

use anyhow::Result;

use crate::config::Config;
use crate::integrations::plane::PlaneClient;
use crate::integrations::EffectError;
use crate::Ctx;

/// What a Plane state means to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Stop,
    ToAnalyse,
    Approved,
    Rejected,
    ConfirmDeploy,
}

impl Route {
    /// The route of state `name`, if it is one of the configured names.
    pub fn of(config: &Config, name: &str) -> Option<Route> {
        let s = &config.states;
        let is = |want: &str| name.trim().eq_ignore_ascii_case(want.trim());
        if is(&s.stop) {
            Some(Route::Stop)
        } else if is(&s.to_analyse) {
            Some(Route::ToAnalyse)
        } else if is(&s.approved) {
            Some(Route::Approved)
        } else if is(&s.rejected) {
            Some(Route::Rejected)
        } else if is(&s.confirm_deploy) {
            Some(Route::ConfirmDeploy)
        } else {
            None
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Route::Stop => "stop",
            Route::ToAnalyse => "to-analyse",
            Route::Approved => "approved",
            Route::Rejected => "rejected",
            Route::ConfirmDeploy => "confirm-deploy",
        }
    }
}

/// The cached name of a project's state, if known.
pub fn cached(ctx: &Ctx, project: &str, state_id: &str) -> Result<Option<String>> {
    ctx.store.read(|r| r.plane_state_name(project, state_id))
}

/// Fetches a project's states and replaces its cache.
pub fn refresh(ctx: &Ctx, client: &PlaneClient, project: &str) -> Result<(), EffectError> {
    let states = client.states(project)?;
    let rows: Vec<(String, String, Option<String>)> = states
        .into_iter()
        .map(|s| (s.id, s.name, s.group))
        .collect();
    ctx.store
        .write(|w| w.cache_plane_states(project, &rows))
        .map_err(|e| EffectError::retry(format!("caching the states: {e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_configurable_and_case_blind() {
        let mut c = Config::from_lookup(&|_| None).unwrap();
        assert_eq!(Route::of(&c, "STOP"), Some(Route::Stop));
        assert_eq!(Route::of(&c, " to analyse "), Some(Route::ToAnalyse));
        assert_eq!(Route::of(&c, "Done"), None);
        c.states.stop = "Halt".into();
        assert_eq!(Route::of(&c, "STOP"), None);
        assert_eq!(Route::of(&c, "halt"), Some(Route::Stop));
    }
}
