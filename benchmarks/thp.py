"""Run a benchmark with torch's CPU allocator both ways: 4 KiB pages (torch's default) and
transparent huge pages (THP_MEM_ALLOC_ENABLE=1, which torch reads when it is imported, hence one
child process per setting). On a VM with THP in `madvise` mode a fresh 64 MiB torch tensor costs
~35 ms of page faults without it, and torch eager runs 2.5-3.5x faster with it (issue 22); numpy,
and so fusebuild's outputs, ask for huge pages themselves (from 4 MiB).

    python benchmarks/thp.py [--out FILE] BENCHMARK.py [ITS ARGUMENTS...]

Prints (and writes to --out) the JSON lines of both runs, each row with `torch_thp` 0 or 1; in
the huge-page run every implementation is renamed `<impl>+thp` (torch_eager+thp, ...), so that
benchmarks/plot.py draws both as bars of one chart.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ENV = "THP_MEM_ALLOC_ENABLE"


def run(script: str, argv: list[str], thp: int) -> list[dict]:
    """The JSON rows `script argv` prints with torch's huge pages off (0) or on (1)."""
    env = {**os.environ, ENV: str(thp)}
    proc = subprocess.run([sys.executable, script, *argv], env=env, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{script} ({ENV}={thp}) exited with {proc.returncode}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        r["torch_thp"] = thp
        if thp and "impl" in r:
            r["impl"] = f"{r['impl']}+thp"
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON lines of both runs to this file")
    ap.add_argument("script", help="the benchmark, e.g. benchmarks/reduction_bench.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = ap.parse_args(argv)
    rows = run(args.script, args.args, 0) + run(args.script, args.args, 1)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    sys.stdout.write(lines)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
