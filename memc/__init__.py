"""memc: compile PyTorch models into smaller, faster deployable ones.

``memc.compile(...)`` (memc.api) compiles from Python; ``memc.load(artifact_dir)`` (memc.runtime.artifact) runs a
compiled artifact with onnxruntime and numpy only.
"""
from __future__ import annotations

from typing import Any

from memc.errors import MemcError

__version__ = "0.1.0"
__all__ = ["CompileResult", "MemcError", "Program", "__version__", "compile", "load"]

# name -> module: imported on first use, so `import memc` stays light and deployment processes (memc.load, benchmarks
# of the artifact) never load torch.
_LAZY = {
    "Program": "memc.program",
    "compile": "memc.api",
    "CompileResult": "memc.api",
    "load": "memc.runtime.artifact",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'memc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
