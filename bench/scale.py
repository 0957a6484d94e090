"""One engine run at a given number of rows, in its own process: time and peak RSS.

    python -m bench.scale --rows 1000000

prints one JSON line: rows, points, engine seconds, peak resident set size in bytes.
A process of its own makes the RSS that of this run alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from bench.jobs import engine_run, titanic_job
from engine.memory import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--hoist", choices=["on", "off"], default="on")
    args = parser.parse_args(argv)

    # The same malloc settings as the benchmark session that starts this process.
    keep_freed_memory()
    job = titanic_job(args.rows)
    started = time.perf_counter()
    attributions = engine_run(job, hoist=args.hoist == "on")
    seconds = time.perf_counter() - started

    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "rows": args.rows, "points": job.points, "engine_seconds": seconds,
        "peak_rss_bytes": peak, "finite": bool(torch.isfinite(attributions).all()),
        "threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
