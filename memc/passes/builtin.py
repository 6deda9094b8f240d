"""Importing this module registers memc's built-in passes."""
from memc.passes import cleanup  # noqa: F401
from memc.passes.moe import detect  # noqa: F401
