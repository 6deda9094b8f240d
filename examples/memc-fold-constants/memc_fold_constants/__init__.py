"""memc-fold-constants: an example memc plugin that adds the ``fold-constants`` pass.

memc finds the pass through the ``memc.passes`` entry point declared in this package's pyproject.toml; nothing
here registers it by hand.
"""
from memc_fold_constants.fold import FoldConstants

__all__ = ["FoldConstants"]
__version__ = "0.1.0"
