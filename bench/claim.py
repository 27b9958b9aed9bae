#!/usr/bin/env python3
"""`orchctl claim` as a Python script would do it: the standard sqlite3 module running
the same SQL as the sqlite3-shell floor (bench/claim.sql), printing the job as JSON.
Exit 3 when nothing is eligible, like orchctl."""

import json
import os
import sqlite3
import sys

SQL = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "claim.sql")).read()


def main():
    db = sys.argv[1]
    conn = sqlite3.connect(db, isolation_level=None, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    job = None
    cur = conn.cursor()
    # The script's statements, one at a time (the RETURNING row is the claimed job).
    for stmt in (s.strip() for s in SQL.split(";\n")):
        lines = [l for l in stmt.splitlines() if not l.lstrip().startswith("--")]
        stmt = "\n".join(lines).strip().rstrip(";")
        if not stmt:
            continue
        cur.execute(stmt)
        if stmt.startswith("UPDATE"):
            row = cur.fetchone()
            if row is not None:
                job = dict(zip([d[0] for d in cur.description], row))
            cur.fetchall()
    conn.close()
    if job is None:
        print("nothing to claim", file=sys.stderr)
        sys.exit(3)
    print(json.dumps(job))


if __name__ == "__main__":
    main()
