//! Tests about SQLite by nature — its query plans (`EXPLAIN QUERY PLAN`, tests/plans.rs)
//! and its write-ahead log (tests/wal.rs) — on `Env::sqlite()` whatever the run's backend.
//! The PostgreSQL pass of `scripts/test` skips every test whose name holds `sqlite_only`:
//! these modules, and the single `sqlite_only_…` tests in the other files.

#[path = "plans.rs"]
mod plans;
#[path = "wal.rs"]
mod wal;
