"""Run an fx graph on real inputs and keep the values of chosen nodes (what analysis passes and instruments read)."""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, keep: Callable[[torch.fx.Node], bool]):
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and self.keep(n):
            self.values[n.name] = out.detach().clone()
        return out


def record(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], keep: Callable[[torch.fx.Node], bool]) -> tuple[dict[str, torch.Tensor], Any]:
    """(``{node name: tensor}`` for the nodes ``keep`` selects, the graph's output), without gradients."""
    recorder = _Recorder(gm, keep)
    with torch.no_grad():
        out = recorder.run(*inputs)
    return recorder.values, out


def node_values(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], names: Collection[str]) -> dict[str, torch.Tensor]:
    """``{node name: value}`` for ``names`` after running ``gm`` on ``inputs``."""
    wanted = set(names)
    return record(gm, inputs, lambda n: n.name in wanted)[0]
