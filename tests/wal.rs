//! The write-ahead log across many short processes (SPEC §2, §10). orchctl leaves the log
//! in place when it exits, so a command's commit is its only fsync; the store must still
//! keep the log short, or every later command would pay for reading it at start-up.

use orchctl::claim::{self, ClaimRequest};

use crate::common::Env;

#[test]
fn the_log_stays_short_however_many_commands_write() {
    let env = Env::sqlite();
    let wal = format!("{}-wal", env.db.display());
    let mut largest = 0;
    for i in 0..150 {
        // One command: its own connection, one write, closed (as a process exits).
        env.json(&[
            "task",
            "add",
            "--repo",
            "orchestrator",
            "--work-item",
            &format!("ORCH-{i}"),
            "--stage",
            "development",
        ]);
        let ctx = env.ctx();
        claim::claim(&ctx, &ClaimRequest::default())
            .unwrap()
            .unwrap();
        drop(ctx);
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    // 300 commits write several MiB to the log in all; it is folded back past 1 MiB.
    assert!(largest > 0, "the log was never left in place");
    assert!(
        largest < 2 << 20,
        "the log grew to {largest} bytes across commands"
    );
    // Nothing was lost on the way: every claim is there, every task has its job.
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'running'"),
        150
    );
    assert_eq!(
        env.count("SELECT count(*) FROM tasks WHERE work_item_id LIKE 'ORCH-%'"),
        150
    );
}
