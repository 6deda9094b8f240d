"""Run an fx graph on real inputs and keep the values of chosen nodes (what analysis passes read)."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, names: Collection[str]):
        super().__init__(gm)
        self.names = set(names)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def node_values(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], names: Collection[str]) -> dict[str, Any]:
    """``{node name: value}`` for ``names`` after running ``gm`` on ``inputs`` (no gradients)."""
    recorder = _Recorder(gm, names)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values
