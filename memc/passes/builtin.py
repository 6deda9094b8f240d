"""Importing this module registers memc's built-in passes."""
from memc.passes import cleanup  # noqa: F401
from memc.passes.attention import detect  # noqa: F401
from memc.passes.attention import distill  # noqa: F401
from memc.passes.attention import memory_caching  # noqa: F401
from memc.passes.quant import allocate, quantize, sensitivity  # noqa: F401
from memc.passes.moe import calibrate, patterns, prune  # noqa: F401
from memc.passes.moe import detect as detect_moe  # noqa: F401
