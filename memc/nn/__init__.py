"""memc's own torch modules, which passes insert into programs and codegen lowers: memory-caching attention,
quantized linear / embedding."""
from memc.nn.mc_state import MemoryCachingState
from memc.nn.memory_caching import MemoryCachingAttention, MemoryCachingConfig, MemoryCachingConfigError

__all__ = ["MemoryCachingAttention", "MemoryCachingConfig", "MemoryCachingConfigError", "MemoryCachingState"]
