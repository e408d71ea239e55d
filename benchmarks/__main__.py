"""Run the benchmarks: `python -m benchmarks [workload ...]` prints a table and writes JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import journal_bench, options_bench, otel_bench, workloads
from .harness import Row, report
from .targets import evaluate

WORKLOADS = {
    "latency": workloads.latency,
    "throughput": workloads.throughput,
    "plans": workloads.plans,
    "memory": workloads.memory,
    "output": workloads.output,
    "cancel": workloads.cancel_and_timeout,
    "startup": workloads.startup,
    "ray": workloads.ray_backend,
    "otel": otel_bench.otel_overhead,
    "options": options_bench.options_overhead,
    "journal": journal_bench.journal,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument(
        "workloads", nargs="*", metavar="workload", help=f"any of {', '.join(WORKLOADS)}; all by default"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.json"))
    args = parser.parse_args()
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    rows: list[Row] = []
    for name in args.workloads or list(WORKLOADS):
        print(f"running {name} ...", flush=True)
        rows += WORKLOADS[name]()
        workloads.clear_logs()
    report(rows, args.out, evaluate(rows))


if __name__ == "__main__":
    main()
