"""Run the benchmarks: `python -m benchmarks [workload ...]` prints a table and writes JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import workloads
from .harness import Row, report

WORKLOADS = {
    "latency": workloads.latency,
    "throughput": workloads.throughput,
    "plans": workloads.plans,
    "memory": workloads.memory,
    "output": workloads.output,
    "cancel": workloads.cancel_and_timeout,
    "ray": workloads.ray_backend,
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
    report(rows, args.out)


if __name__ == "__main__":
    main()
