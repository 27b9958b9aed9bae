//! Which task holds a unique key: for messages that name the task a new one collides with.
//!
//! Reads only, through the unique indexes on `work_item_id` and `plane_id`.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::{task_row, Reader, TASK_COLS};
use crate::model::Task;

impl<'c> Reader<'c> {
    /// The task whose `work_item_id` is `work_item_id` or whose `plane_id` is `plane_id`
    /// (the work item first). Tombstoned keys carry a suffix and so never match.
    pub fn task_holding_keys(
        &self,
        work_item_id: Option<&str>,
        plane_id: Option<&str>,
    ) -> Result<Option<Task>> {
        self.c
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE id = (
                     SELECT id FROM tasks WHERE work_item_id = ?1
                     UNION ALL SELECT id FROM tasks WHERE plane_id = ?2
                     LIMIT 1)"
            ))?
            .query_row(params![work_item_id, plane_id], task_row)
            .optional()
            .context("looking up the task holding a key")
    }
}
