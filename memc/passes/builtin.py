"""Importing this module registers memc's built-in passes."""
from memc.passes import cleanup  # noqa: F401
from memc.passes.quant import quantize  # noqa: F401
from memc.passes.quant import allocate, sensitivity  # noqa: F401
