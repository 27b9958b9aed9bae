#!/usr/bin/env python3
"""Fills a database that `orchctl migrate` created with a realistic history.

Usage: gen_db.py DB --jobs N [--queued Q]
       gen_db.py DB --history H --live N      # a live set of N tasks (SPEC §10)

The schema is the real one (made by `orchctl migrate` beforehand); this script only
inserts rows, with set-based SQL so a million jobs take seconds, not minutes.

Layout (ids grow with time, as in a real database):
  * history: finished tasks across 10 repos, oldest first. Per 100 tasks: 92 `done`
    (analyst, developer, reviewer, deployer jobs all `done`), 5 `done` whose developer
    failed once before succeeding (a `failed` job plus a retry), 3 `cancelled` (keys
    tombstoned, last job `cancelled`). Every 20th task depended on its predecessor.
    Two audit rows per job and one per task, finished outbox rows, handled Plane
    deliveries.
  * live work, the same size whatever the history (so growth ratios compare history
    only): tasks in analysis/development/review with one queued job each, 10 queued
    developer jobs blocked by a dependency at the head of the queue, 20 running
    developer jobs, 10 tasks parked in deploy (one holds repo-3's merge lease), 10 in
    analysis awaiting approval.
History fills the database up to N jobs in total.

With --live N the live layer is N tasks in fixed proportions instead, so a database with
200k live tasks and one with 150 differ in nothing but the size of the live set (the
fixed rows below included in N; the proportions apply to the rest):
  * 4% blocked by a dependency on a live analysis task (queued developer, at the head of
    the queue), 46% with a queued job (analysis/development/review as above): half the
    live tasks have a queued job (100k of 200k);
  * 15% parked in deploy awaiting Confirm Deploy, 10% stuck (the developer failed its
    last attempt), the rest (25%) parked in analysis awaiting approval;
  * as in every database: 20 running developer jobs, one merge lease (repo-3), and 10
    deploy windows with a deferred STOP pending (marker initiated).
--history H then sets the history to exactly H jobs (instead of filling up to --jobs).
"""

import argparse
import sqlite3
import sys

AGENTS = ("analyst", "developer", "reviewer", "deployer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--queued", type=int, default=150,
                    help="live tasks with a queued job (split analysis/development/review)")
    ap.add_argument("--running", type=int, default=20)
    ap.add_argument("--live", type=int, default=0,
                    help="a live set of this many tasks in fixed proportions (see above)")
    ap.add_argument("--history", type=int, default=None,
                    help="exactly this many jobs of history (default: fill up to --jobs)")
    ap.add_argument("--jobs", type=int, default=0)
    a = ap.parse_args()

    c = sqlite3.connect(a.db, isolation_level=None)
    if c.execute("PRAGMA user_version").fetchone()[0] < 1:
        sys.exit(f"{a.db}: run `orchctl migrate` first (the schema must be the real one)")
    if c.execute("SELECT count(*) FROM jobs").fetchone()[0]:
        sys.exit(f"{a.db}: not empty")
    # Bulk load: no journal, no fsync. WAL is switched back on at the end.
    c.execute("PRAGMA journal_mode=OFF")
    c.execute("PRAGMA synchronous=OFF")
    c.execute("PRAGMA cache_size=-262144")

    # ---- the live layer, sized first so history can fill the rest -------------------
    live = []  # (stage, [(agent, status)], blocked)
    done3 = [("analyst", "done"), ("developer", "done"), ("reviewer", "done")]
    if a.live:
        # The running jobs and the deploy windows below are part of the N.
        n = max(0, a.live - a.running - 10)
        blocked = max(1, n * 4 // 100)
        q = n // 2 - blocked
        parked_deploy, failed = n * 15 // 100, n * 10 // 100
        parked_analysis = max(0, n - blocked - q - parked_deploy - failed)
    else:
        blocked, q = 10, a.queued
        parked_analysis, parked_deploy, failed = 10, 10, 0
    n_an, n_dev = int(q * 0.4), int(q * 1 / 3)
    n_rev = q - n_an - n_dev
    live += [("development", [("analyst", "done"), ("developer", "queued")], True)] * blocked
    live += [("analysis", [("analyst", "queued")], False)] * n_an
    live += [("development", [("analyst", "done"), ("developer", "queued")], False)] * n_dev
    live += [("review", [("analyst", "done"), ("developer", "done"), ("reviewer", "queued")], False)] * n_rev
    live += [("development", [("analyst", "done"), ("developer", "running")], False)] * a.running
    live += [("deploy", done3, False)] * parked_deploy
    live += [("analysis", [("analyst", "done")], False)] * parked_analysis
    live += [("development", [("analyst", "done"), ("developer", "failed")], False)] * failed
    if a.live:
        live += [("deploy", done3 + [("deployer", "running")], False)] * 10
    live_jobs = sum(len(j) for _, j, _ in live)
    hist_jobs = a.history if a.history is not None else max(0, a.jobs - live_jobs)

    # ---- history: task classes by id % 100 ---------------------------------------------
    # class 0 = done (4 jobs), 1 = done with a failed developer run (5), 2 = cancelled (3)
    c.executescript("""
        CREATE TEMP TABLE slots (cls INTEGER, k INTEGER, agent TEXT, status TEXT, attempts INTEGER);
        INSERT INTO slots VALUES
          (0,1,'analyst','done',1),(0,2,'developer','done',1),(0,3,'reviewer','done',1),(0,4,'deployer','done',1),
          (1,1,'analyst','done',1),(1,2,'developer','failed',2),(1,3,'developer','done',1),
          (1,4,'reviewer','done',1),(1,5,'deployer','done',1),
          (2,1,'analyst','done',1),(2,2,'developer','done',1),(2,3,'reviewer','cancelled',0);
    """)
    c.execute("BEGIN")
    per100 = 92 * 4 + 5 * 5 + 3 * 3
    hist_tasks = hist_jobs * 100 // per100
    # Task i: created 2 years ago + i steps; one step = 2 years / total tasks.
    total_tasks = hist_tasks + len(live)
    step = 730.0 / max(total_tasks, 1)  # days
    c.execute("""
        CREATE TEMP TABLE hist AS
        WITH RECURSIVE seq(i) AS (SELECT 1 WHERE :n > 0 UNION ALL SELECT i + 1 FROM seq WHERE i < :n)
        SELECT i, CASE WHEN i % 100 < 3 THEN 2 WHEN i % 100 < 8 THEN 1 ELSE 0 END AS cls,
               julianday('now') - 730.0 + i * :step AS t
        FROM seq""", {"n": hist_tasks, "step": step})
    ts = "strftime('%Y-%m-%dT%H:%M:%fZ', {})"
    c.execute(f"""
        INSERT INTO tasks (id, plane_id, work_item_id, plane_issue_id, project_id, repo, branch,
                           title, stage, created_at, updated_at, cancelled_at, cancel_reason)
        SELECT i,
               'p-' || i || CASE cls WHEN 2 THEN '#cancelled-' || i ELSE '' END,
               'ORCH-' || i || CASE cls WHEN 2 THEN '#cancelled-' || i ELSE '' END,
               'p-' || i || CASE cls WHEN 2 THEN '#cancelled-' || i ELSE '' END,
               'proj-' || (i % 10), 'repo-' || (i % 10),
               'feature/ORCH-' || i || '-improve-the-widget-' || (i % 97),
               'Improve the widget, part ' || i,
               CASE cls WHEN 2 THEN 'cancelled' ELSE 'done' END,
               {ts.format('t')}, {ts.format('t + 0.5')},
               CASE cls WHEN 2 THEN {ts.format('t + 0.5')} END,
               CASE cls WHEN 2 THEN 'stopped by an operator' END
        FROM hist""")
    c.execute("""
        INSERT INTO task_deps (task_id, depends_on) SELECT i, i - 1 FROM hist WHERE i % 20 = 0""")
    c.execute(f"""
        INSERT INTO jobs (agent, repo, task_id, status, pid, proc_start, run_id, attempts,
                          max_attempts, created_at, claimed_at, finished_at, error)
        SELECT s.agent, 'repo-' || (h.i % 10), h.i, s.status,
               CASE WHEN s.status = 'cancelled' THEN NULL ELSE 10000 + (h.i * 7 + s.k) % 30000 END,
               CASE WHEN s.status = 'cancelled' THEN NULL ELSE 100000 + h.i * 10 + s.k END,
               NULL, s.attempts, 2,
               {ts.format('h.t + s.k * 0.1')},
               CASE WHEN s.attempts > 0 THEN {ts.format('h.t + s.k * 0.1 + 0.01')} END,
               {ts.format('h.t + s.k * 0.1 + 0.05')},
               CASE s.status WHEN 'failed' THEN 'tests failed' WHEN 'cancelled' THEN 'stopped by an operator' END
        FROM hist h JOIN slots s ON s.cls = h.cls
        ORDER BY h.i, s.k""")
    # Run ids: one per claimed run, unique, in claim order.
    c.execute("UPDATE jobs SET run_id = id WHERE attempts > 0")

    # ---- live tasks and jobs (appended: the newest ids) ------------------------------
    first_live = hist_tasks + 1
    tasks, jobs, deps = [], [], []
    analysis_live = []
    for n, (stage, js, is_blocked) in enumerate(live):
        tid = first_live + n
        tasks.append((tid, f"p-{tid}", f"ORCH-{tid}", f"p-{tid}", f"proj-{tid % 10}",
                      f"repo-{tid % 10}", f"feature/ORCH-{tid}-live-work-{tid % 97}",
                      f"Live work {tid}", stage))
        if stage == "analysis" and js[-1][1] == "queued":
            analysis_live.append(tid)
        if is_blocked:
            deps.append(tid)
        for agent, status in js:
            jobs.append((agent, f"repo-{tid % 10}", tid, status,
                         0 if status == "queued" else (2 if status == "failed" else 1)))
    c.executemany(f"""
        INSERT INTO tasks (id, plane_id, work_item_id, plane_issue_id, project_id, repo, branch,
                           title, stage, created_at, updated_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {ts.format("'now', '-1 day'")}, {ts.format("'now', '-1 day'")})""",
                  tasks)
    # Blocked tasks wait for a live analysis task (not done).
    c.executemany("INSERT INTO task_deps (task_id, depends_on) VALUES (?, ?)",
                  [(t, analysis_live[k % len(analysis_live)]) for k, t in enumerate(deps)])
    c.executemany(f"""
        INSERT INTO jobs (agent, repo, task_id, status, attempts, max_attempts, created_at,
                          claimed_at, finished_at)
        VALUES (?1, ?2, ?3, ?4, ?5, 2, {ts.format("'now', '-1 day'")},
                CASE WHEN ?5 > 0 THEN {ts.format("'now', '-1 day'")} END,
                CASE WHEN ?4 IN ('done', 'failed') THEN {ts.format("'now', '-1 day'")} END)""", jobs)
    c.execute("UPDATE jobs SET run_id = id WHERE run_id IS NULL AND attempts > 0")
    # Running jobs were claimed just now (reap judges pid-less runs by age).
    now = ts.format("'now'")
    c.execute(f"UPDATE jobs SET claimed_at = {now} WHERE status = 'running'")
    c.execute(f"""
        INSERT INTO merge_leases (repo, branch, task_id, acquired_at)
        SELECT repo, branch, id, {ts.format("'now'")} FROM tasks
        WHERE stage = 'deploy' AND repo = 'repo-3' ORDER BY id LIMIT 1""")
    if a.live:
        # Deploy windows open (their deployer runs) with a STOP waiting for them.
        c.execute(f"""
            INSERT INTO deploy_markers (repo, work_item_id, state, task_id, set_at)
            SELECT t.repo, t.work_item_id, 'initiated', t.id, {ts.format("'now'")}
            FROM tasks t JOIN jobs j ON j.task_id = t.id
            WHERE t.stage = 'deploy' AND j.agent = 'deployer' AND j.status = 'running'""")
        c.execute(f"""
            UPDATE tasks SET cancel_requested_at = {ts.format("'now'")},
                             cancel_reason = 'stopped during its deploy'
            WHERE id IN (SELECT task_id FROM deploy_markers)""")

    # ---- audit trail, outbox, deliveries ---------------------------------------------
    c.execute(f"""
        INSERT INTO task_events (task_id, at, kind, detail)
        SELECT task_id, coalesce(claimed_at, created_at),
               CASE k WHEN 1 THEN 'job_claimed' ELSE 'job_' || status END,
               json_object('job_id', id, 'run_id', run_id, 'agent', agent)
        FROM jobs, (SELECT 1 AS k UNION ALL SELECT 2)
        ORDER BY jobs.id, k""")
    c.execute("""
        INSERT INTO task_events (task_id, at, kind, detail)
        SELECT id, created_at, 'task_created', json_object('repo', repo, 'stage', 'analysis')
        FROM tasks ORDER BY id""")
    c.execute(f"""
        INSERT INTO outbox (task_id, kind, payload, status, attempts, result, created_at, updated_at)
        SELECT t.id, e.kind, json_object('repo', t.repo, 'branch', t.branch), 'done', 1, e.result,
               coalesce(t.cancelled_at, t.updated_at), coalesce(t.cancelled_at, t.updated_at)
        FROM tasks t JOIN (SELECT 'remove_worktree' AS kind, 'removed 1 worktree(s)' AS result, 'cancelled' AS st
                           UNION ALL SELECT 'delete_remote_branch', 'deleted on Gitea', 'cancelled'
                           UNION ALL SELECT 'plane_comment', 'comment posted', 'cancelled'
                           UNION ALL SELECT 'plane_comment', 'comment posted', 'done') e
             ON e.st = t.stage
        ORDER BY t.id""")
    c.execute("""
        INSERT INTO plane_deliveries (body_sha256, delivery_id, event, action, task_id, received_at)
        SELECT lower(hex(randomblob(32))), 'd-' || id || '-' || k, 'issue', 'started', id, created_at
        FROM tasks, (SELECT 1 AS k UNION ALL SELECT 2)""")
    # The counters the triggers keep must match the rows (they fired on every insert).
    bad = c.execute("""
        SELECT count(*) FROM (SELECT status, count(*) AS n FROM jobs GROUP BY status) g
        LEFT JOIN job_counts j USING (status) WHERE j.n IS NOT g.n""").fetchone()[0]
    if bad:
        sys.exit("job_counts does not match the jobs table")
    has_task_counts = c.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'task_counts'").fetchone()[0]
    bad = has_task_counts and c.execute("""
        SELECT count(*) FROM (SELECT stage, count(*) AS n FROM tasks GROUP BY stage) g
        LEFT JOIN task_counts t USING (stage) WHERE t.n IS NOT g.n""").fetchone()[0]
    if bad:
        sys.exit("task_counts does not match the tasks table")
    c.execute("COMMIT")
    # No ANALYZE: orchctl never runs it, so the planner must do without statistics here too.
    c.execute("PRAGMA journal_mode=WAL")
    counts = dict(c.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
    total = sum(counts.values())
    print(f"{a.db}: {total} jobs {counts}, "
          f"{c.execute('SELECT count(*) FROM tasks').fetchone()[0]} tasks, "
          f"{c.execute('SELECT count(*) FROM task_events').fetchone()[0]} events")
    c.close()


if __name__ == "__main__":
    main()
