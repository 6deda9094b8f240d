"""Deployment-side runtime: drives memc artifacts with onnxruntime and numpy only (no torch import)."""
from memc.runtime.artifact import CompiledModel, load
from memc.runtime.engine import DecodeEngine, DecodeStateError, decode_logits
from memc.runtime.expert_cache import ExpertCacheEngine
from memc.runtime.generate import Generation, generate
from memc.runtime.sampling import Sampler, SamplingConfig, SamplingError

__all__ = [
    "CompiledModel", "DecodeEngine", "DecodeStateError", "ExpertCacheEngine", "Generation", "Sampler", "SamplingConfig", "SamplingError",
    "decode_logits", "generate", "load",
]
