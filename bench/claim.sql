-- The floor: `orchctl claim` done by the sqlite3 shell, as one statement in one
-- BEGIN IMMEDIATE transaction with orchctl's connection settings. It picks the same job
-- (oldest eligible queued: task live, no STOP pending, dependencies done, the serial gate
-- for deployers), makes the same update, writes the same audit row and prints the same
-- fields. `bench/claim.py` runs this very text through Python's sqlite3 module.
PRAGMA busy_timeout = 5000;
PRAGMA foreign_keys = ON;
PRAGMA synchronous = FULL;
BEGIN IMMEDIATE;
UPDATE jobs SET status = 'running',
       run_id = (SELECT coalesce(max(run_id), 0) + 1 FROM jobs),
       attempts = attempts + 1, claimed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
       pid = NULL, proc_start = NULL, finished_at = NULL
 WHERE status = 'queued' AND id = (
       SELECT j.id FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id
        WHERE j.status = 'queued'
          AND (j.task_id IS NULL OR (t.stage NOT IN ('done', 'cancelled')
                                     AND t.cancel_requested_at IS NULL))
          AND NOT EXISTS (SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                           WHERE d.task_id = j.task_id AND dt.stage IS NOT 'done')
          AND (j.agent <> 'deployer' OR NOT EXISTS (
                SELECT 1 FROM merge_leases l WHERE l.repo = j.repo AND l.branch IS NOT t.branch))
        ORDER BY j.id LIMIT 1)
RETURNING id, agent, repo, task_id, status, run_id, attempts, max_attempts,
          (SELECT work_item_id FROM tasks WHERE id = task_id) AS work_item_id,
          (SELECT branch FROM tasks WHERE id = task_id) AS branch,
          (SELECT stage FROM tasks WHERE id = task_id) AS stage;
INSERT INTO task_events (task_id, at, kind, detail)
SELECT task_id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'job_claimed',
       json_object('job_id', id, 'run_id', run_id, 'agent', agent, 'attempt', attempts)
  FROM jobs WHERE run_id = (SELECT max(run_id) FROM jobs);
COMMIT;
