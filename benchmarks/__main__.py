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
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("workloads", nargs="*", choices=[*WORKLOADS, []], default=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.json"))
    args = parser.parse_args()
    rows: list[Row] = []
    for name in args.workloads:
        print(f"running {name} ...", flush=True)
        rows += WORKLOADS[name]()
    report(rows, args.out)


if __name__ == "__main__":
    main()
