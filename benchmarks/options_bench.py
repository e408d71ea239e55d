"""What masking secrets costs: executions per second with and without it, and the masker's own speed.

`python -m benchmarks options`. The throughput rows run the same short
command (four lines of output each, so every execution's output goes through
the masker) with no secrets and with ten engine-wide secrets, alternating
rounds. The speed rows mask 1 GiB, in 1 MiB reads as the worker gets them,
once with no secret in it (the usual case: one substring search per secret)
and once with a secret every 64 KiB (every read rewritten).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from cloudops_execution_engine import ExecCommand, ExecutionEngine, ExecutionRequest
from cloudops_execution_engine.actors.secrets import Masker

from .harness import Row, median
from .workloads import _config

_SECRETS = [f"secret-value-{i:02d}-{os.urandom(6).hex()}" for i in range(10)]
_LINES = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(4))
_GIB = 1024**3
_READ = 1024 * 1024


async def _rate(n: int, concurrency: int, secrets: list[str]) -> float:
    config = _config(max_concurrent_executions=concurrency, secrets=secrets)
    async with ExecutionEngine(config) as engine:
        request: dict[str, Any] = {"command": ExecCommand(program="echo", args=[_LINES])}
        start = time.perf_counter()
        ids = [await engine.execute(ExecutionRequest(**request)) for _ in range(n)]
        for eid in ids:
            await engine.wait(eid)
        return n / (time.perf_counter() - start)


def _mask_speed(data: bytes, masker: Masker) -> float:
    """MB/s masking `_GIB` bytes as reads of `data`."""
    reads = _GIB // len(data)
    start = time.perf_counter()
    for _ in range(reads):
        masker.mask(data)
    return _GIB / (time.perf_counter() - start) / 1e6


def options_overhead(n: int = 1000, concurrency: int = 10, rounds: int = 5) -> list[Row]:
    samples: dict[str, list[float]] = {"no secrets": [], "10 secrets": []}
    for round_ in range(rounds):
        order = [[], _SECRETS] if round_ % 2 == 0 else [_SECRETS, []]
        for secrets in order:
            rate = asyncio.run(_rate(n, concurrency, secrets))
            samples["10 secrets" if secrets else "no secrets"].append(rate)
    plain = median(samples["no secrets"])
    rows = [
        Row(
            f"options: throughput echo x{n} @{concurrency}",
            name,
            median(values),
            "exec/s",
            {"vs_no_secrets": round(median(values) / plain, 3), "rounds": [round(v) for v in values]},
        )
        for name, values in samples.items()
    ]
    masker = Masker(_SECRETS)
    clean = (b"the quick brown fox jumps over the lazy dog 0123456789\n" * (_READ // 55 + 1))[:_READ]
    dirty = bytearray(clean)
    for at in range(0, _READ, 64 * 1024):
        secret = _SECRETS[(at // 65536) % len(_SECRETS)].encode()
        dirty[at + 10 : at + 10 + len(secret)] = secret
    for name, data in (("no secret in the output", clean), ("a secret every 64 KiB", bytes(dirty))):
        rows.append(Row("options: masking 1 GiB, 10 secrets", name, _mask_speed(data, masker), "MB/s"))
    return rows
