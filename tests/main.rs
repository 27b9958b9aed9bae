//! One test binary (SPEC: one link step). Every test runs on the backend that
//! `ORCH_TEST_BACKEND` picks for the whole run (`sqlite`, the default, or `postgres`; see
//! tests/common/mod.rs); `scripts/test` runs the suite once on each.

mod cli;
mod common;
mod dispatch;
mod docs;
mod event;
mod event_hostile;
mod fault;
mod harness;
mod hostile;
mod hosts;
mod lifecycle;
mod operator;
mod ops;
mod probe;
mod queue;
mod reliability;
mod secrets;
mod sqlite_only;
mod stop;
mod torture;
mod ux;
