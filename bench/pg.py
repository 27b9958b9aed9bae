"""The PostgreSQL section of bench/run (SPEC §10, §12).

A real cluster of Debian's `postgresql` package in bench/data/pg (initdb and the server run
as the `postgres` user when this runs as root), reached over a Unix socket, `fsync=off` so
that the figures are the clients' own costs, not the disk's.

1. `claim` vs `psql` running the equivalent single claim statement (`FOR UPDATE SKIP
   LOCKED`) on the same database of 100k queued jobs, interleaved, fresh processes each.
2. 8 claim loops split across two host ids over 20k queued jobs: every job claimed exactly
   once, no false "nothing to claim" (exit 3 while more than a handful of jobs are still
   queued), no error surfaced; the rate.
"""

import glob
import os
import shutil
import subprocess
import threading
import time

# The claim orchctl makes, as one statement: the oldest eligible queued job (the task live,
# no STOP pending, its dependencies done, the serial gate), locked with SKIP LOCKED, taken
# with a run id from the sequence.
CLAIM_SQL = """
WITH picked AS (
    SELECT j.id FROM jobs j LEFT JOIN tasks t ON t.id = j.task_id
    WHERE j.status = 'queued'
      AND (j.task_id IS NULL OR (t.stage NOT IN ('done', 'cancelled') AND t.cancel_requested_at IS NULL))
      AND NOT EXISTS (SELECT 1 FROM task_deps d LEFT JOIN tasks dt ON dt.id = d.depends_on
                      WHERE d.task_id = j.task_id AND dt.stage IS DISTINCT FROM 'done')
      AND (j.agent <> 'deployer' OR NOT EXISTS (SELECT 1 FROM merge_leases l
                      WHERE l.repo = j.repo AND l.branch IS DISTINCT FROM t.branch))
    ORDER BY j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED)
UPDATE jobs SET status = 'running', run_id = nextval('run_ids'), attempts = attempts + 1,
       claimed_at = orch_now(), host = 'psql'
FROM picked WHERE jobs.id = picked.id
RETURNING jobs.id, jobs.agent, jobs.repo, jobs.task_id, jobs.run_id, jobs.attempts;
"""


def pg_bin():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    raise SystemExit("the PostgreSQL section needs Debian's postgresql package "
                     "(apt-get install postgresql): no initdb found")


class Cluster:
    """A throwaway cluster in `root`, stopped by stop()."""

    def __init__(self, root, log):
        self.root = root
        self.data = os.path.join(root, "data")
        self.sock = root
        self.bin = pg_bin()
        self.as_postgres = os.geteuid() == 0
        if os.path.exists(root):
            self._pg_ctl("stop", "-m", "immediate", check=False)
            shutil.rmtree(root)
        os.makedirs(root)
        if self.as_postgres:
            shutil.chown(root, "postgres", "postgres")
        log("starting a PostgreSQL cluster for the benchmark ...")
        self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust",
                  "-U", "postgres", "--no-locale", "-E", "UTF8", quiet=True)
        self._pg_ctl("start", "-w", "-l", os.path.join(root, "server.log"), "-o",
                     f"-k {self.sock} -c listen_addresses='' -c fsync=off "
                     f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")

    def _cmd(self, *argv):
        argv = list(argv)
        return (["runuser", "-u", "postgres", "--"] + argv) if self.as_postgres else argv

    def _run(self, *argv, quiet=False, check=True):
        return subprocess.run(self._cmd(*argv), check=check,
                              stdout=subprocess.DEVNULL if quiet else None,
                              stderr=subprocess.DEVNULL if quiet else None)

    def _pg_ctl(self, *args, check=True):
        if not os.path.exists(self.data):
            return
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, *args,
                  quiet=True, check=check)

    def stop(self):
        self._pg_ctl("stop", "-m", "fast", check=False)

    def url(self, db):
        return f"postgresql:///{db}?host={self.sock}&user=postgres"

    def psql(self, db, sql):
        r = subprocess.run([os.path.join(self.bin, "psql"), "-X", "-q", "-A", "-t",
                            "-v", "ON_ERROR_STOP=1", "-h", self.sock, "-U", "postgres",
                            "-d", db, "-c", sql], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"psql failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def psql_argv(self, db, sql):
        return [os.path.join(self.bin, "psql"), "-X", "-q", "-A", "-t", "-h", self.sock,
                "-U", "postgres", "-d", db, "-c", sql]


def load_jobs(cluster, binary, env, db, n, spawn):
    """A fresh database `db` with the orchctl schema and `n` queued developer jobs, each of
    a task in development (no dependencies, no leases: every job is eligible)."""
    cluster.psql("postgres", f"DROP DATABASE IF EXISTS {db}")
    cluster.psql("postgres", f"CREATE DATABASE {db}")
    e = dict(env, ORCH_DB_URL=cluster.url(db))
    r = spawn([binary, "migrate"], e)
    if r.code != 0:
        raise SystemExit(f"orchctl migrate on PostgreSQL failed: {r.err.strip()}")
    cluster.psql(db, f"""
        INSERT INTO tasks (work_item_id, repo, branch, stage)
            SELECT 'B-' || g, 'bench', 'feature/B-' || g, 'development' FROM generate_series(1, {n}) g;
        INSERT INTO jobs (agent, repo, task_id) SELECT 'developer', 'bench', id FROM tasks ORDER BY id;""")
    cluster.psql(db, "VACUUM ANALYZE")
    return e


def floor(cluster, binary, env, rounds, spawn, interleave):
    env = load_jobs(cluster, binary, env, "floor", 100_000, spawn)
    env["ORCH_HOST_ID"] = "bench"

    def check(r, what):
        if r.code != 0 or not r.out.strip():
            raise SystemExit(f"{what} did not claim a job ({r.code}): {r.err.strip()}")
        return r

    cases = {
        "orchctl claim": lambda: check(spawn([binary, "claim"], env), "orchctl"),
        "psql claim statement": lambda: check(
            spawn(cluster.psql_argv("floor", CLAIM_SQL), env), "psql"),
    }
    return interleave(cases, rounds, warmup=3)


def loops(cluster, binary, env, spawn, n_jobs=20_000, n_loops=8, limit=None):
    env = load_jobs(cluster, binary, env, "loops", n_jobs, spawn)
    lock = threading.Lock()
    claimed, false_nothing, errors = [], [], []
    count = [0]
    hosts = ["host-a", "host-b"]

    def queued_left():
        return int(cluster.psql("loops", "SELECT count(*) FROM jobs WHERE status = 'queued'"))

    def loop(i):
        e = dict(env, ORCH_HOST_ID=hosts[i % 2])
        while True:
            with lock:
                if limit is not None and count[0] >= limit:
                    return
                count[0] += 1
            r = spawn([binary, "claim"], e)
            if r.code == 0:
                with lock:
                    claimed.append(r.json()["id"])
            elif r.code == 3:
                left = queued_left()
                if left > n_loops:
                    with lock:
                        false_nothing.append(left)
                return
            else:
                with lock:
                    errors.append(f"{r.code}: {r.err.strip()}")

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n_loops)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    db_running, multi, per_host = cluster.psql("loops", """
        SELECT count(*), count(*) FILTER (WHERE attempts <> 1),
               string_agg(DISTINCT host, ',')
        FROM jobs WHERE status = 'running'""").split("|")
    return {
        "claims": len(claimed), "wall": wall, "rate": len(claimed) / wall,
        "double": len(claimed) - len(set(claimed)) + int(multi or 0),
        "db_running": int(db_running), "hosts": per_host,
        "false_nothing": len(false_nothing), "false_nothing_left": false_nothing[:3],
        "errors": len(errors), "examples": errors[:3], "queued_left": queued_left(),
        "loops": n_loops, "jobs": n_jobs,
    }


def section(data_dir, binary, env, rounds, quick, spawn, interleave, log):
    cluster = Cluster(os.path.join(data_dir, "pg"), log)
    try:
        log("claim vs psql on PostgreSQL (100k jobs) ...")
        fl = floor(cluster, binary, env, rounds, spawn, interleave)
        log("8 claim loops across two host ids on PostgreSQL ...")
        lp = loops(cluster, binary, env, spawn, n_jobs=2_000 if quick else 20_000)
        version = cluster.psql("postgres", "SHOW server_version")
    finally:
        cluster.stop()
    return {"floor": fl, "loops": lp, "version": version}


def report(p, verdict, pg, med, ms):
    p("### 9. PostgreSQL (SPEC §12): claim vs psql; 8 claim loops across two hosts")
    p("")
    fl = pg["floor"]
    o = med([r.wall for r in fl["orchctl claim"]])
    q = med([r.wall for r in fl["psql claim statement"]])
    p(f"PostgreSQL {pg['version']} over a Unix socket, fsync off, 100k queued jobs; "
      f"{len(fl['orchctl claim'])} interleaved runs each (fresh processes).")
    p("")
    p("| contender | wall ms | CPU ms |")
    p("|---|---:|---:|")
    for name, runs in fl.items():
        p(f"| {name} | {ms(med([r.wall for r in runs]))} | {ms(med([r.cpu for r in runs]))} |")
    p("")
    p(f"orchctl claim ÷ psql = **{o / q:.2f}×** (target ≤ 1.3×)")
    verdict(o / q <= 1.3, f"PostgreSQL claim ≤ 1.3× psql's claim statement: {o / q:.2f}×")
    lp = pg["loops"]
    p("")
    p(f"{lp['loops']} claim loops (hosts {lp['hosts']}) over {lp['jobs']} queued jobs: "
      f"{lp['claims']} claims in {lp['wall']:.1f} s = **{lp['rate']:.0f} claims/s**; "
      f"double claims {lp['double']}, false \"nothing to claim\" {lp['false_nothing']}, "
      f"errors {lp['errors']}, jobs left queued {lp['queued_left']}, running in the "
      f"database {lp['db_running']}.")
    if lp["examples"]:
        p(f"Errors, e.g.: {lp['examples']}")
    ok = (lp["double"] == 0 and lp["false_nothing"] == 0 and lp["errors"] == 0
          and lp["claims"] == lp["jobs"] and lp["db_running"] == lp["jobs"])
    verdict(ok, f"8 loops, two hosts: every job claimed once ({lp['claims']}/{lp['jobs']}), "
                f"no false nothing-to-claim, no error; {lp['rate']:.0f} claims/s")
    p("")
