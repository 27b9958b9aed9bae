//! Who owns a branch now: the read that keeps an older task's cleanup (its worktree
//! removal, its remote branch deletion) off a branch a live task has taken up since.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::Reader;

impl<'c> Reader<'c> {
    /// A live task other than `except` whose branch is `branch` of `repo` (through the
    /// partial index of live tasks' branches: the cost follows the live set, not history).
    pub fn live_task_on_branch(
        &self,
        repo: &str,
        branch: &str,
        except: Option<i64>,
    ) -> Result<Option<i64>> {
        self.c
            .prepare_cached(
                "SELECT id FROM tasks
                 WHERE repo = ?1 AND branch = ?2 AND stage NOT IN ('done', 'cancelled')
                   AND id IS NOT ?3
                 LIMIT 1",
            )?
            .query_row(params![repo, branch, except], |r| r.get(0))
            .optional()
            .with_context(|| format!("looking up the live task on branch {branch} of {repo}"))
    }
}
