"""Importing this module registers memc's built-in passes."""
from memc.passes import cleanup  # noqa: F401
from memc.passes.moe import calibrate, detect, prune  # noqa: F401
