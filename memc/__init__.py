"""memc: compile PyTorch models into smaller, faster deployable ones."""
from __future__ import annotations

from typing import Any

from memc.errors import MemcError

__version__ = "0.1.0"
__all__ = ["MemcError", "Program", "__version__"]


def __getattr__(name: str) -> Any:
    # Program pulls in torch; keep `import memc` light so onnxruntime-only processes (deployment, benchmarks of
    # the artifact) never load torch.
    if name == "Program":
        from memc.program import Program

        return Program
    raise AttributeError(f"module 'memc' has no attribute {name!r}")
