"""Roofline pictures of the benchmarks' JSON lines (issue 22): PNG bar charts of GB/s per group,
one bar per implementation (fusebuild and each peer), against the memory-copy bandwidth of the
same run (a black line over each group's bars).

    python benchmarks/plot.py RESULTS.jsonl... [-o DIR]

Reads the rows of cpu_bench.py, reduction_bench.py and gpu_bench.py (JSON lines, or a JSON list
of rows): every row with an `impl` and a `GBps` is a bar. A case is its group (or op), dtype,
shape and thread count; its copy bandwidth is the median of `GBps / frac_of_copy` over its rows
(of both runs of benchmarks/thp.py, whose `<impl>+thp` bars stand beside `<impl>`), else the copy
row of its run (`copy_bw` per thread count, `cpu_copy` / `gpu_copy` per case, `copy`). One chart
per input file, section (`what`), dtype and thread count: DIR/<file>-<what>-<dtype>[-<n>t].png,
each path printed. Needs matplotlib (the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections import defaultdict

COPY_ROWS = ("copy_bw", "cpu_copy", "gpu_copy", "copy")


def read_rows(path: str) -> list[dict]:
    """The rows of a JSON-lines file, or of a file holding one JSON list of rows."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        rows = json.loads(text)
    if isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], list):
        rows = rows[0]
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: expected JSON lines or a JSON list of rows")
    return [r for r in rows if isinstance(r, dict)]


def _name(row: dict) -> str:
    return str(next((row[k] for k in ("group", "op", "case", "name") if k in row), "?"))


def _shape(row: dict) -> str:
    shape = row.get("shape", "")
    return "x".join(map(str, shape)) if isinstance(shape, list) else str(shape)


def _case(row: dict) -> tuple:
    return _name(row), str(row.get("dtype", "")), _shape(row), row.get("threads")


def _copy_of_run(rows: list[dict]) -> dict:
    """Copy bandwidth rows by what they apply to: a case, a thread count, or the whole run."""
    found: dict = {}
    for r in rows:
        if r.get("what") in COPY_ROWS and isinstance(r.get("GBps"), (int, float)):
            key = (_case(r) if r["what"] in ("cpu_copy", "gpu_copy") else
                   ("threads", r.get("threads")) if r["what"] == "copy_bw" else "run")
            found[key] = float(r["GBps"])
    return found


def charts(rows: list[dict]) -> dict[tuple, dict]:
    """{(what, dtype, threads): {"cases": {case: {impl: GBps}}, "copy": {case: GBps}}}."""
    copies = _copy_of_run(rows)
    out: dict[tuple, dict] = {}
    implied: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        gbps = r.get("GBps")
        if "impl" not in r or not isinstance(gbps, (int, float)) or r.get("what") in COPY_ROWS:
            continue
        case = _case(r)
        chart = out.setdefault((str(r.get("what", "cpu")), case[1], case[3]),
                               {"cases": {}, "copy": {}})
        chart["cases"].setdefault(case, {})[str(r["impl"])] = float(gbps)
        frac = r.get("frac_of_copy")
        if isinstance(frac, (int, float)) and frac > 0:
            implied[case].append(gbps / frac)
    for chart in out.values():
        for case in chart["cases"]:
            copy = (statistics.median(implied[case]) if implied[case] else
                    copies.get(case, copies.get(("threads", case[3]), copies.get("run"))))
            if copy is not None:
                chart["copy"][case] = copy
    return out


def _labels(cases: list[tuple]) -> list[str]:
    """Group names, with the shape where a name appears with several shapes."""
    names = [c[0] for c in cases]
    return [f"{c[0]}\n{c[2]}" if names.count(c[0]) > 1 and c[2] else c[0] for c in cases]


def plot(chart: dict, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(chart["cases"])
    impls = list(dict.fromkeys(i for c in cases for i in chart["cases"][c]))
    bases = list(dict.fromkeys(i.removesuffix("+thp") for i in impls))
    impls.sort(key=lambda i: (i.removesuffix("+thp") != "fusebuild",     # fusebuild first,
                              bases.index(i.removesuffix("+thp")), i.endswith("+thp")))  # +thp
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(min(24.0, max(7.0, 0.25 * len(cases) * len(impls) + 4)), 4.5))
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, c in enumerate(cases)
              if impl in chart["cases"][c]]
        ys = [chart["cases"][c][impl] for c in cases if impl in chart["cases"][c]]
        ax.bar(xs, ys, width, label=impl)
    for i, case in enumerate(cases):
        if case in chart["copy"]:
            ax.hlines(chart["copy"][case], i - 0.45, i + 0.45, colors="black", linewidth=2,
                      label="copy" if i == next(j for j, c in enumerate(cases)
                                                if c in chart["copy"]) else None)
    ax.set_xticks(range(len(cases)), _labels(cases), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))     # beside the axes
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON-lines (or JSON) output of a benchmark")
    ap.add_argument("-o", "--out-dir", default=".", help="folder of the PNG files (default .)")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    written = 0
    for file in args.files:
        stem = os.path.splitext(os.path.basename(file))[0]
        for (what, dtype, threads), chart in sorted(charts(read_rows(file)).items(), key=str):
            suffix = f"-{threads}t" if threads is not None else ""
            name = re.sub(r"[^\w.+-]", "_", f"{stem}-{what}-{dtype or 'all'}{suffix}")
            path = os.path.join(args.out_dir, name + ".png")
            plot(chart, f"{stem}: {what} {dtype}{f', {threads} threads' if suffix else ''}", path)
            print(path)
            written += 1
    if not written:
        print("no rows with an impl and GBps: nothing to plot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
