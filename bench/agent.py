#!/usr/bin/env python3
"""A well-behaved agent for the stop-latency benchmark: it announces that it is ready,
then waits; on SIGTERM it writes the CLOCK_MONOTONIC time of its exit and exits at once.

Usage: agent.py MARKER   (writes MARKER.ready when running, MARKER when exiting)"""

import os
import signal
import sys
import time


def main():
    marker = sys.argv[1]

    def on_term(_sig, _frame):
        t = time.monotonic()
        with open(marker + ".tmp", "w") as f:
            f.write(repr(t))
        os.rename(marker + ".tmp", marker)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    open(marker + ".ready", "w").close()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
