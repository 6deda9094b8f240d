"""memc: compile PyTorch models into smaller, faster deployable ones."""
from memc.errors import MemcError
from memc.program import Program

__version__ = "0.1.0"
__all__ = ["MemcError", "Program", "__version__"]
