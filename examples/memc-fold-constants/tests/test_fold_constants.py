"""fold-constants, tested the TVM way: a Before program, the pass, and the Expected program written by hand.

Both programs are captured with torch.export exactly as memc captures models, then compared structurally: node
names are ignored, nodes refer to each other by position, arguments are normalised against the op schema, and each
``get_attr`` stands for what it holds (shape, dtype and a hash of its bytes), so a folded constant must be
bit-identical to the one written in Expected. Every run goes through memc's PassManager with its verification
instrument at tolerance 0, so "outputs unchanged" is checked on every test that runs the pass.
"""
from __future__ import annotations

import hashlib
import operator
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.node import map_arg

from memc.errors import ConfigError
from memc.passes.base import PassContext
from memc.passes.instruments import VerifyInstrument
from memc.passes.manager import PassManager
from memc.program import Program, SourceInfo
from memc.schema import describe_fields, from_dict
from memc_fold_constants import FoldConstants

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

aten = torch.ops.aten
PACKAGE = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fetch(gm: nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def structure(gm: GraphModule) -> list[tuple]:
    """The graph as plain data (see the module docstring)."""
    seq = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(seq)}

    def ref(node: torch.fx.Node):
        if node.op == "get_attr":
            t = _fetch(gm, node.target)
            return ("const", tuple(t.shape), str(t.dtype), _digest(t))
        return ("%", index[node])

    rows = []
    for n in seq:
        args, kwargs = n.args, n.kwargs
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            norm = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
            if norm is not None:
                args, kwargs = norm.args, norm.kwargs
        target = str(n.target) if n.op == "call_function" else n.target
        rows.append((n.op, target, map_arg((tuple(args), dict(kwargs)), ref)))
    return rows


def assert_structural_equal(actual: GraphModule, expected: GraphModule) -> None:
    assert structure(actual) == structure(expected), (
        f"graphs differ\n--- actual ---{actual.code}\n--- expected ---{expected.code}"
    )


def program_of(module: nn.Module | GraphModule, *inputs: torch.Tensor) -> Program:
    """A Program the way memc captures one (torch.export, then ep.module()); hand-built graphs are used as is."""
    gm = module if isinstance(module, GraphModule) else torch.export.export(module.eval(), inputs).module()
    names = [f"input{i}" for i in range(len(inputs))]
    return Program(gm, inputs, names, ["output"], {}, SourceInfo("test", "factory", ""))


def run_fold(program: Program, verify: bool = True, **options):
    """Run fold-constants through memc's PassManager (exact verification on); returns (program, its record)."""
    instruments = [VerifyInstrument(program.example_inputs, atol=0.0)] if verify else []
    fold = FoldConstants(from_dict(FoldConstants.Config, options, "pipeline[0]"))
    program = PassManager([fold], instruments).run(program, PassContext())
    record = program.log[-1]
    assert record.name == "fold-constants"
    return program, record


def outputs(program: Program) -> tuple[torch.Tensor, ...]:
    return program(*program.example_inputs)


def assert_same_outputs(before: tuple[torch.Tensor, ...], after: tuple[torch.Tensor, ...]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def attributes(gm: nn.Module) -> set[str]:
    return {name for name, _ in list(gm.named_parameters()) + list(gm.named_buffers())}


def metrics_of(record) -> dict:
    return {k: v for k, v in record.metrics.items() if k != "verify_max_abs_diff"}


# -- a weight transposed and scaled in forward(): one constant -------------------------------------------------------


class TransposeScaleBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, generator=_gen(0)))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return torch.matmul(x, self.w.t() * self.scale)


class TransposeScaleExpected(nn.Module):
    def __init__(self, before: TransposeScaleBefore):
        super().__init__()
        self.register_buffer("folded", (before.w.t() * before.scale).detach().contiguous())

    def forward(self, x):
        return torch.matmul(x, self.folded)


def test_weight_transpose_times_scale_becomes_one_constant():
    x = torch.randn(2, 8, generator=_gen(1))
    before_module = TransposeScaleBefore()
    program = program_of(before_module, x)
    reference = outputs(program)

    program, record = run_fold(program)

    assert_structural_equal(program.module, program_of(TransposeScaleExpected(before_module), x).module)
    assert_same_outputs(reference, outputs(program))
    assert record.changed is True
    assert metrics_of(record) == {
        "nodes_folded": 2,  # aten.t, aten.mul
        "constants_created": 1,
        "bytes_created": 8 * 4 * 4,
        "constants_reused": 0,
        "attributes_dropped": 2,  # w and scale: nothing else reads them
        "bytes_freed": 4 * 8 * 4 + 4,
        "skipped_over_max_bytes": 0,
    }
    assert record.metrics["verify_max_abs_diff"] == 0.0
    assert attributes(program.module) == {"_folded_mul"}


def test_skip_ops_keeps_the_named_op():
    x = torch.randn(2, 8, generator=_gen(1))
    before_module = TransposeScaleBefore()

    class Expected(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("t", before_module.w.t().detach().contiguous())
            self.register_buffer("scale", before_module.scale.clone())

        def forward(self, x):
            return torch.matmul(x, self.t * self.scale)

    program, record = run_fold(program_of(before_module, x), skip_ops=["aten.mul"])

    assert_structural_equal(program.module, program_of(Expected(), x).module)
    assert metrics_of(record)["nodes_folded"] == 1
    assert metrics_of(record)["attributes_dropped"] == 1  # w; scale is still read by the kept mul


# -- only the constant part of a computation folds; each boundary becomes its own constant ---------------------------


class PartialBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, generator=_gen(2)))
        self.b = nn.Parameter(torch.randn(8, generator=_gen(3)))

    def forward(self, x):
        return torch.relu(x * (self.w.exp() + 1.0)) + self.b.neg()


class PartialExpected(nn.Module):
    def __init__(self, before: PartialBefore):
        super().__init__()
        self.register_buffer("gain", (before.w.exp() + 1.0).detach())
        self.register_buffer("bias", before.b.neg().detach())

    def forward(self, x):
        return torch.relu(x * self.gain) + self.bias


def test_input_dependent_nodes_stay_and_each_boundary_gets_a_constant():
    x = torch.randn(3, 8, generator=_gen(4))
    before_module = PartialBefore()
    program = program_of(before_module, x)
    reference = outputs(program)

    program, record = run_fold(program)

    assert_structural_equal(program.module, program_of(PartialExpected(before_module), x).module)
    assert_same_outputs(reference, outputs(program))
    m = metrics_of(record)
    assert (m["nodes_folded"], m["constants_created"], m["bytes_created"]) == (3, 2, 2 * 8 * 4)


# -- a no-op cast of a buffer (the rotary inv_freq pattern in HF Llama) reuses the buffer ----------------------------


class NoOpCastBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))

    def forward(self, y):
        return y * self.inv_freq.to(torch.float32)


class NoOpCastExpected(nn.Module):
    """The cast is gone; the dtype assertion torch.export put in front of it is a side effect and stays."""

    def __init__(self, before: NoOpCastBefore):
        super().__init__()
        self.register_buffer("inv_freq", before.inv_freq.clone())

    def forward(self, y):
        aten._assert_tensor_metadata.default(self.inv_freq, dtype=torch.float32, device=torch.device("cpu"),
                                             layout=torch.strided)
        return y * self.inv_freq


def test_noop_cast_is_folded_onto_the_existing_buffer():
    y = torch.randn(3, 8, generator=_gen(5))
    before_module = NoOpCastBefore()
    program = program_of(before_module, y)
    buffer = program.module.inv_freq
    reference = outputs(program)

    program, record = run_fold(program)

    assert_structural_equal(program.module, program_of(NoOpCastExpected(before_module), y).module)
    assert_same_outputs(reference, outputs(program))
    assert metrics_of(record) == {
        "nodes_folded": 1, "constants_created": 0, "bytes_created": 0, "constants_reused": 1,
        "attributes_dropped": 0, "bytes_freed": 0, "skipped_over_max_bytes": 0,
    }
    assert program.module.inv_freq is buffer  # not copied


# -- side effects and randomness are never folded --------------------------------------------------------------------


def side_effect_graph(folded: bool) -> GraphModule:
    """x + rand_like(w) + dropout(w) + bernoulli(w) + zeros_like(empty_like(w)) + 2w, with asserts on w and 2w.

    Only ``2 * w`` is constant. With ``folded`` the graph is the Expected one: ``2 * w`` is a constant attribute.
    """
    root = nn.Module()
    w = torch.rand(4, generator=_gen(6))
    root.register_buffer("w", w)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    source = graph.get_attr("w")
    if folded:
        root.register_buffer("two_w", 2.0 * w)
        twice = graph.get_attr("two_w")
    else:
        twice = graph.call_function(aten.mul.Tensor, (source, 2.0))
    graph.call_function(aten._assert_tensor_metadata.default, (source,), {"dtype": torch.float32})
    graph.call_function(aten._assert_tensor_metadata.default, (twice,), {"dtype": torch.float32})
    rand = graph.call_function(aten.rand_like.default, (source,))
    dropout = graph.call_function(operator.getitem, (graph.call_function(aten.native_dropout.default, (source, 0.5, True)), 0))
    coin = graph.call_function(aten.bernoulli.p, (source, 0.5))
    zeros = graph.call_function(aten.zeros_like.default, (graph.call_function(aten.empty_like.default, (source,)),))
    out = x
    for term in (rand, dropout, coin, zeros, twice):
        out = graph.call_function(aten.add.Tensor, (out, term))
    graph.output(out)
    return GraphModule(root, graph)


def _targets(gm: GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_side_effects_randomness_and_uninitialised_memory_are_never_folded():
    x = torch.randn(4, generator=_gen(7))
    program = program_of(side_effect_graph(folded=False), x)
    torch.manual_seed(0)
    reference = outputs(program)
    kept = [t for t in _targets(program.module) if t != "aten.mul.Tensor"]

    program, record = run_fold(program, verify=False)  # random outputs: compared below under the same seed

    assert_structural_equal(program.module, side_effect_graph(folded=True))
    assert _targets(program.module) == kept  # asserts, rand_like, native_dropout, bernoulli, empty_like... in order
    torch.manual_seed(0)
    assert_same_outputs(reference, outputs(program))
    assert metrics_of(record)["nodes_folded"] == 1  # only 2 * w
    assert metrics_of(record)["attributes_dropped"] == 0  # w is still read by the random ops


def test_dead_constant_nodes_are_left_for_eliminate_dead_code():
    root = nn.Module()
    root.register_buffer("w", torch.ones(4))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(aten.mul.Tensor, (graph.get_attr("w"), 2.0))  # constant, but nobody reads it
    graph.output(graph.call_function(aten.add.Tensor, (x, 1.0)))
    gm = GraphModule(root, graph)
    before = structure(gm)

    program, record = run_fold(program_of(gm, torch.zeros(4)))

    assert structure(program.module) == before
    assert record.changed is False and metrics_of(record)["nodes_folded"] == 0


# -- max_bytes: a folded result over the limit is not stored; its (smaller) inputs become the constant instead -------


class BroadcastBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.randn(1, 64, generator=_gen(8)))

    def forward(self, z):
        return z + self.s.exp().expand(64, 64)


class BroadcastExpected(nn.Module):
    """max_bytes below 64x64 floats: the broadcast stays at run time, exp(s) (256 bytes) is folded."""

    def __init__(self, before: BroadcastBefore):
        super().__init__()
        self.register_buffer("exp_s", before.s.exp().detach())

    def forward(self, z):
        return z + self.exp_s.expand(64, 64)


class BroadcastFullyFolded(nn.Module):
    def __init__(self, before: BroadcastBefore):
        super().__init__()
        self.register_buffer("full", before.s.exp().expand(64, 64).detach().contiguous())

    def forward(self, z):
        return z + self.full


def test_max_bytes_keeps_large_results_computed_at_run_time():
    z = torch.randn(64, 64, generator=_gen(9))
    before_module = BroadcastBefore()
    program = program_of(before_module, z)
    reference = outputs(program)

    program, record = run_fold(program, max_bytes=1024)

    assert_structural_equal(program.module, program_of(BroadcastExpected(before_module), z).module)
    assert_same_outputs(reference, outputs(program))
    m = metrics_of(record)
    assert (m["nodes_folded"], m["constants_created"], m["bytes_created"], m["skipped_over_max_bytes"]) == (1, 1, 256, 1)
    assert all(t.numel() * t.element_size() <= 1024 for t in program.module.buffers())


def test_max_bytes_zero_folds_nothing_new():
    z = torch.randn(64, 64, generator=_gen(9))
    program = program_of(BroadcastBefore(), z)
    before = structure(program.module)

    program, record = run_fold(program, max_bytes=0)

    assert structure(program.module) == before
    assert record.changed is False
    assert metrics_of(record)["skipped_over_max_bytes"] == 2  # expand (16 KiB), then exp (256 B)


def test_default_max_bytes_folds_the_broadcast():
    z = torch.randn(64, 64, generator=_gen(9))
    before_module = BroadcastBefore()

    program, record = run_fold(program_of(before_module, z))

    assert_structural_equal(program.module, program_of(BroadcastFullyFolded(before_module), z).module)
    assert metrics_of(record)["bytes_created"] == 64 * 64 * 4


# -- options and registration --------------------------------------------------------------------------------------


def test_options_are_validated_with_their_key_path():
    with pytest.raises(ConfigError, match=r"pipeline\[0\]: max_bytes must be >= 0"):
        from_dict(FoldConstants.Config, {"max_bytes": -1}, "pipeline[0]")
    with pytest.raises(ConfigError, match=r"pipeline\[0\]\.max_bytes: expected int"):
        from_dict(FoldConstants.Config, {"max_bytes": "64MiB"}, "pipeline[0]")
    with pytest.raises(ConfigError, match=r"pipeline\[0\]: skip_ops entry 'cat'"):
        from_dict(FoldConstants.Config, {"skip_ops": ["cat"]}, "pipeline[0]")
    with pytest.raises(ConfigError, match="did you mean 'max_bytes'"):
        from_dict(FoldConstants.Config, {"max_byte": 1}, "pipeline[0]")
    docs = {name: doc for name, _, _, doc in describe_fields(FoldConstants.Config)}
    assert set(docs) == {"max_bytes", "skip_ops"} and all(docs.values())


def test_entry_point_names_the_pass_class():
    data = tomllib.loads((PACKAGE / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["entry-points"]["memc.passes"] == {"fold-constants": "memc_fold_constants:FoldConstants"}
    assert FoldConstants.name == "fold-constants" and FoldConstants.tolerance == 0.0


def test_the_demo_model_folds_its_weight_transposes():
    sys.path.insert(0, str(PACKAGE))
    try:
        import demo_model
    finally:
        sys.path.remove(str(PACKAGE))
    module, inputs = demo_model.build()
    program = program_of(module, *inputs)

    program, record = run_fold(program)

    m = metrics_of(record)
    assert (m["nodes_folded"], m["constants_created"], m["attributes_dropped"]) == (5, 2, 3)
    assert not any(str(n.target) == "aten.t.default" for n in program.module.graph.nodes)


# -- a real model: the rotary embedding of a tiny Hugging Face Llama --------------------------------------------------


def test_tiny_llama_rotary_inv_freq_cast_is_folded(tmp_path):
    transformers = pytest.importorskip("transformers")
    from memc.capture import capture
    from memc.config import parse_config

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    program = capture(str(tmp_path / "llama"), parse_config({"inputs": {"seq_len": 8}}), trust_pickle=False)

    def casts_of_inv_freq(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.to.")
                and any(a.op == "get_attr" and a.target.endswith("inv_freq") for a in n.all_input_nodes)]

    def dtype_asserts(gm):
        return [n.name for n in gm.graph.nodes if str(n.target) == "aten._assert_tensor_metadata.default"]

    assert len(casts_of_inv_freq(program.module)) == 1
    asserts = dtype_asserts(program.module)
    reference = outputs(program)

    program, record = run_fold(program)

    assert casts_of_inv_freq(program.module) == []
    assert_same_outputs(reference, outputs(program))
    m = metrics_of(record)
    assert record.changed and m["nodes_folded"] >= 1 and m["constants_reused"] >= 1
    assert asserts and dtype_asserts(program.module) == asserts  # every assertion torch.export inserted stays
