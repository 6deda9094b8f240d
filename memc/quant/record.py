"""Run a program's graph while observing chosen nodes (their input activation, output, gradients)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import Interpreter


class Observer(Interpreter):
    """Calls ``on_input(node_name, x)`` with the activation input of each watched linear / embedding node, and
    ``on_output(node_name, y)`` with its output, before the rest of the graph runs."""

    def __init__(
        self, gm: torch.fx.GraphModule, watch: set[str],
        on_input: Callable[[str, torch.Tensor], None] | None = None,
        on_output: Callable[[str, torch.Tensor], None] | None = None,
    ):
        super().__init__(gm)
        self.watch = watch
        self.on_input = on_input
        self.on_output = on_output

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.watch and self.on_input is not None:
            x = self.env[n.args[0]] if n.target is torch.ops.aten.linear.default else self.env[n.args[1]]
            self.on_input(n.name, x)
        out = super().run_node(n)
        if n.name in self.watch and self.on_output is not None:
            self.on_output(n.name, out)
        return out


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
