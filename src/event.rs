//! Plane intake: `orchctl event` and reconcile's Plane pass (SPEC §6).

use anyhow::Result;
use serde::Serialize;

use crate::reconcile::TaskError;
use crate::Ctx;

/// The headers of a delivery, passed as flags or environment.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub delivery: Option<String>,
    pub event: Option<String>,
    pub signature: Option<String>,
}

/// What reconcile's Plane pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanePass {
    pub checked: usize,
    pub stopped: usize,
    pub deleted: usize,
    pub requests: u32,
    pub errors: Vec<TaskError>,
}

/// Handles one delivery body.
pub fn handle(_ctx: &Ctx, _body: &[u8], _d: &Delivery) -> Result<serde_json::Value> {
    anyhow::bail!("orchctl event is not built yet (issue: Plane intake)")
}

/// Reconcile's Plane pass.
pub fn plane_pass(_ctx: &Ctx) -> Result<PlanePass> {
    anyhow::bail!("the Plane pass of reconcile is not built yet (issue: Plane intake)")
}
