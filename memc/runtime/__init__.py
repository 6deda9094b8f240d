"""Deployment-side runtime: drives memc artifacts with onnxruntime and numpy only (no torch import)."""
from memc.runtime.artifact import CompiledModel, load
from memc.runtime.engine import DecodeEngine, DecodeStateError, decode_logits

__all__ = ["CompiledModel", "DecodeEngine", "DecodeStateError", "decode_logits", "load"]
