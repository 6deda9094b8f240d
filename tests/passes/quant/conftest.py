"""A captured tiny Llama (tied embedding / LM head) shared by the quantization pass tests; tests get a deep copy."""
from __future__ import annotations

import copy

import pytest

from memc.capture import capture
from memc.config import ToolchainConfig


@pytest.fixture(scope="session")
def _tiny_llama_program(tiny_llama_dir):
    cfg = ToolchainConfig()
    cfg.inputs.seq_len = 16
    return capture(str(tiny_llama_dir), cfg)


@pytest.fixture
def tiny_llama_program(_tiny_llama_program):
    p = _tiny_llama_program
    return p.replace(module=copy.deepcopy(p.module), annotations=dict(p.annotations), log=[])
