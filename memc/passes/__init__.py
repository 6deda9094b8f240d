"""memc passes: the contract (base), the manager, instruments, and the built-in passes."""
from memc.passes.base import NoOptions, Pass, PassContext, PassResult, register_pass, registered_passes
from memc.passes.manager import PassManager

__all__ = ["NoOptions", "Pass", "PassContext", "PassManager", "PassResult", "register_pass", "registered_passes"]
