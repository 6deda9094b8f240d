"""Fixtures of the MoE pass tests: captured Programs of every MoE family, built once per session."""
from __future__ import annotations

from typing import Callable

import pytest

from memc.capture import capture
from memc.config import ToolchainConfig
from memc.program import Program

HANDWRITTEN_MOE = "tests.fixtures.moe:loop_moe_model"
MOE_NAMES = ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v3", "gpt-oss", "handwritten"]


@pytest.fixture(scope="session")
def moe_source(tiny_hf) -> Callable[[str], str]:
    def get(name: str) -> str:
        return HANDWRITTEN_MOE if name == "handwritten" else str(tiny_hf(name))

    return get


@pytest.fixture(scope="session")
def captured(moe_source) -> Callable[[str], Program]:
    """captured(name) -> a fresh Program (re-captured each call is slow, so the capture is cached and copied)."""
    import copy

    cache: dict[str, Program] = {}

    def get(name: str) -> Program:
        if name not in cache:
            cache[name] = capture(moe_source(name), ToolchainConfig())
        p = cache[name]
        return p.replace(module=copy.deepcopy(p.module), annotations={}, log=[])

    return get
