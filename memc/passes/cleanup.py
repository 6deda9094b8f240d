"""Graph clean-up passes that every pipeline can use; they never change results."""
from __future__ import annotations

import torch

from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.program import Program


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """Delete parameters / buffers / constants no get_attr node reads; returns the number of bytes freed.

    A submodule called by a call_module node (memc's own layers, inserted by rewrites) owns its weights.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    freed = 0
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or name.startswith(called):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        freed += tensor.numel() * tensor.element_size()
        delattr(owner, attr)
    gm.delete_all_unused_submodules()
    return freed


@register_pass
class EliminateDeadCode(Pass):
    """Remove nodes whose results are never used, and the weights only they read."""

    name = "eliminate-dead-code"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gm = program.module
        before = len(gm.graph.nodes)
        changed = gm.graph.eliminate_dead_code()
        freed = _drop_unused_attributes(gm)
        gm.recompile()
        removed = before - len(gm.graph.nodes)
        return PassResult(program, changed or freed > 0, {"nodes_removed": removed, "bytes_freed": freed})
