"""Benchmark case functions for tests/benchmarks/test_harness.py, importable by name in a spawned child."""
from __future__ import annotations

import os


def ok_case(n: int, label: str = "x") -> dict:
    data = bytearray(n * 1024 * 1024)  # touch n MiB so the child's peak RSS reflects it
    for i in range(0, len(data), 4096):
        data[i] = 1
    return {"n": n, "label": label, "pid": os.getpid(), "sum": sum(data[::4096])}


def failing_case() -> dict:
    raise ValueError("the case broke on purpose")


def exiting_case() -> dict:
    os._exit(7)  # dies without reporting (like a segfault or the OOM killer)


def unpicklable_case() -> dict:
    return {"fn": lambda: None}
