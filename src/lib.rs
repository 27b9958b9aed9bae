//! orchctl: the state keeper and control tool of an AI-agent delivery pipeline.
//!
//! The binary (`main.rs`) parses the command line and renders results; everything else
//! lives here. Data flows one way: a domain module (stop, claim, jobs, dispatch, deploy,
//! reconcile, event, queue, tasks) decides, the store keeps state, the integrations touch
//! the world. A run's supervisor (`supervisor`) is this library too, in a process of its
//! own that the launchers (claim --exec, dispatch) exec.
//! Domain modules return result structs and never print.

pub mod claim;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod dispatch;
pub mod error;
pub mod event;
pub mod integrations;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod names;
pub mod outbox;
pub mod pipeline;
pub mod plane_states;
pub mod prune;
pub mod queue;
pub mod reconcile;
pub mod render;
pub mod stop;
pub mod store;
pub mod supervisor;
pub mod tasks;
pub mod transitions;
pub mod worktree;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub use config::Config;
pub use store::Store;

/// What every command works with: the open database and the configuration.
pub struct Ctx {
    pub store: Store,
    pub config: Config,
    /// Where the store lives (a run's supervisor opens the same).
    pub target: DbTarget,
}

/// Where the state lives: an SQLite file (SPEC §2) or a PostgreSQL database shared by
/// several hosts (SPEC §12).
#[derive(Clone, PartialEq, Eq)]
pub enum DbTarget {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL (libpq's forms). It may hold a password:
    /// its `Debug` never shows it.
    Postgres(String),
}

impl std::fmt::Debug for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbTarget::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            DbTarget::Postgres(_) => f.write_str("Postgres(***)"),
        }
    }
}

impl Ctx {
    /// This host's id (`ORCH_HOST_ID`, else the hostname).
    pub fn host(&self) -> &str {
        &self.config.host_id
    }

    /// Opens (and migrates) the SQLite database at `db` with `config`.
    pub fn open(db: &Path, config: Config) -> Result<Ctx> {
        Ctx::open_target(&DbTarget::Sqlite(db.to_path_buf()), config)
    }

    /// Opens (and migrates) the database `target` names with `config`.
    pub fn open_target(target: &DbTarget, mut config: Config) -> Result<Ctx> {
        config.hosts_shared = matches!(target, DbTarget::Postgres(_));
        let store = match target {
            DbTarget::Sqlite(db) => Store::open(db, config.busy_timeout_ms)?,
            DbTarget::Postgres(url) => Store::Postgres(store::pg::PgStore::open(
                url,
                config.db_password.as_ref().map(config::Secret::expose),
                config.busy_timeout_ms,
                &config.host_id,
                integrations::process::boot_id().as_deref(),
            )?),
        };
        Ok(Ctx {
            store,
            config,
            target: target.clone(),
        })
    }
}

/// The database path: `--db` / `ORCH_DB_PATH`, else `$XDG_STATE_HOME/orchctl/orch.db`.
pub fn default_db_path() -> PathBuf {
    config::process_state_dir().join("orch.db")
}
