"""eliminate-dead-code, TVM style: build a Before graph and the Expected graph, run the pass, compare structure."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from memc.passes.base import PassContext, registered_passes
from memc.passes.cleanup import EliminateDeadCode
from memc.passes.instruments import VerifyInstrument
from memc.passes.manager import PassManager
from memc.program import Program, SourceInfo

aten = torch.ops.aten


def _structure(gm: GraphModule) -> list[tuple[str, str]]:
    """The graph as (op, target) pairs: what the pass did, independent of node names and generated code."""
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def _program(gm: GraphModule, inputs: tuple[torch.Tensor, ...]) -> Program:
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return Program(gm, inputs, names, ["out"], {}, SourceInfo("test", "factory", ""))


def _root(**tensors: torch.Tensor) -> nn.Module:
    root = nn.Module()
    for name, t in tensors.items():
        setattr(root, name, nn.Parameter(t, requires_grad=False))
    return root


def before() -> GraphModule:
    """x @ w + b, plus a dead branch reading its own weight, a dead op, an orphan parameter and an orphan buffer."""
    g = torch.manual_seed(0)
    root = _root(
        w=torch.randn(4, 3, generator=g),
        b=torch.randn(3, generator=g),
        dead_w=torch.randn(4, 8, generator=g),  # read only by the dead branch
    )
    graph = Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    b = graph.get_attr("b")
    dead_w = graph.get_attr("dead_w")
    mm = graph.call_function(aten.mm.default, (x, w))
    graph.call_function(aten.mm.default, (x, dead_w))  # dead: result unused
    graph.call_function(aten.relu.default, (x,))  # dead
    out = graph.call_function(aten.add.Tensor, (mm, b))
    graph.output((out,))
    gm = GraphModule(root, graph)  # copies only the attributes get_attr nodes read: add the orphans afterwards
    gm.register_parameter("orphan", nn.Parameter(torch.randn(16, 16, generator=g), requires_grad=False))
    gm.register_buffer("buf_orphan", torch.zeros(10, dtype=torch.int64))
    return gm


def expected() -> GraphModule:
    g = torch.manual_seed(0)
    root = _root(w=torch.randn(4, 3, generator=g), b=torch.randn(3, generator=g))
    graph = Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    b = graph.get_attr("b")
    mm = graph.call_function(aten.mm.default, (x, w))
    out = graph.call_function(aten.add.Tensor, (mm, b))
    graph.output((out,))
    return GraphModule(root, graph)


def test_is_registered():
    assert registered_passes()["eliminate-dead-code"] is EliminateDeadCode
    assert EliminateDeadCode.tolerance == 0.0


def test_removes_dead_nodes_and_their_weights():
    gm = before()
    reference = copy.deepcopy(gm)
    x = torch.randn(5, 4, generator=torch.manual_seed(1))

    result = EliminateDeadCode().run(_program(gm, (x,)), PassContext())

    after = result.program.module
    assert _structure(after) == _structure(expected())
    assert {k for k, _ in after.named_parameters()} == {"w", "b"}
    assert dict(after.named_buffers()) == {}
    torch.testing.assert_close(after(x), reference(x), rtol=0, atol=0)
    assert result.changed is True
    assert result.metrics["nodes_removed"] == 3  # get_attr dead_w, the dead mm, the dead relu
    assert result.metrics["bytes_freed"] == (4 * 8 + 16 * 16) * 4 + 10 * 8


def test_nothing_dead_reports_unchanged():
    gm = expected()
    structure = _structure(gm)
    x = torch.randn(5, 4)
    out = gm(x)
    result = EliminateDeadCode().run(_program(gm, (x,)), PassContext())
    assert result.changed is False
    assert result.metrics == {"nodes_removed": 0, "bytes_freed": 0}
    assert _structure(result.program.module) == structure
    torch.testing.assert_close(result.program.module(x), out, rtol=0, atol=0)


def test_unused_submodule_weights_are_freed():
    gm = expected()
    gm.add_module("unused", nn.Linear(8, 8))  # a whole module no node reads
    result = EliminateDeadCode().run(_program(gm, (torch.randn(2, 4),)), PassContext())
    assert result.changed is True
    assert result.metrics == {"nodes_removed": 0, "bytes_freed": (8 * 8 + 8) * 4}
    assert not hasattr(result.program.module, "unused")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.spare = nn.Linear(6, 6)  # never called

    def forward(self, x):
        torch.sin(x)  # result dropped: a dead node in the captured graph
        return self.lin(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.block(x)))


def test_on_a_torch_export_capture_through_the_pass_manager():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    gm = torch.export.export(_Net().eval(), (x,)).module()
    expected_out = gm(x)
    program = _program(gm, (x,))
    live_ops = [s for s in _structure(gm) if s != ("call_function", "aten.sin.default")]

    program = PassManager([EliminateDeadCode()], [VerifyInstrument((x,), 1e-6)]).run(program, PassContext())

    after = program.module
    assert ("call_function", "aten.sin.default") not in _structure(after)
    assert [s for s in _structure(after) if s[0] != "get_attr"] == [s for s in live_ops if s[0] != "get_attr"]
    assert {k for k, _ in after.named_parameters()} == {"block.lin.weight", "block.lin.bias", "head.weight", "head.bias"}
    torch.testing.assert_close(after(x), expected_out, rtol=0, atol=0)
    (record,) = program.log
    assert record.name == "eliminate-dead-code" and record.changed is True
    assert record.metrics["bytes_freed"] == (6 * 6 + 6) * 4
    assert record.metrics["nodes_removed"] >= 3  # sin and the two get_attr nodes of the spare Linear
    assert record.metrics["verify_max_abs_diff"] == 0.0

    again = PassManager([EliminateDeadCode()]).run(program, PassContext())
    assert again.log[-1].changed is False
    assert again.log[-1].metrics == {"nodes_removed": 0, "bytes_freed": 0}
