"""PassManager: the requires/provides contract, verification of every pass, crash reports, IR dumps, records."""
from __future__ import annotations

import re
import uuid

import pytest
import torch
from torch import nn

import memc.passes.base as passes_base
from memc.errors import PassError, VerificationError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.cleanup import EliminateDeadCode
from memc.passes.instruments import IRDumpInstrument, Instrument, VerifyInstrument, first_divergence
from memc.passes.manager import PassManager, check_order
from memc.program import PassRecord, Program, SourceInfo

aten = torch.ops.aten


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.lin(x) + y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.head(torch.relu(self.block(x, y)))


def make_program() -> Program:
    torch.manual_seed(0)
    inputs = (torch.randn(3, 4), torch.randn(3, 4))
    gm = torch.export.export(_Net().eval(), inputs).module()
    return Program(gm, inputs, ["x", "y"], ["logits"], {}, SourceInfo("test", "factory", ""))


@pytest.fixture
def register():
    """Register test pass classes under unique names; take them out of the registry afterwards."""
    added: list[str] = []

    def _register(base: str, **attrs) -> type[Pass]:
        name = f"test-{base}-{uuid.uuid4().hex[:8]}"
        attrs.setdefault("run", lambda self, program, ctx: PassResult(program, False))
        cls = register_pass(type(base.title().replace("-", ""), (Pass,), {"name": name, **attrs}))
        added.append(name)
        return cls

    yield _register
    for name in added:
        passes_base._REGISTRY.pop(name, None)
        passes_base._ORIGINS.pop(name, None)


class _Spy(Instrument):
    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def before_pass(self, program, pass_):
        self.events.append(("before", pass_.name))

    def after_pass(self, program, pass_, metrics):
        self.events.append(("after", pass_.name))


def _ran_flag_run(flag: list):
    def run(self, program, ctx):
        flag.append(self.name)
        return PassResult(program, False)

    return run


# -- requires / provides ---------------------------------------------------------------------------------------------


def test_missing_requirement_fails_before_anything_runs(register):
    ran: list[str] = []
    first = register("first", run=_ran_flag_run(ran))
    needy = register("needy", requires=frozenset({"test.sites.attention"}), run=_ran_flag_run(ran))
    spy = _Spy()
    with pytest.raises(PassError) as info:
        PassManager([first(), needy()], [spy]).run(make_program(), PassContext())
    msg = str(info.value)
    assert f"pipeline[1] ('{needy.name}') requires 'test.sites.attention'" in msg
    assert "no registered pass provides it" in msg
    assert ran == [] and spy.events == [], "the check runs before the first pass"


def test_missing_requirement_names_the_pass_that_would_provide_it(register):
    finder = register("finder", provides=frozenset({"test.sites.mlp"}))
    needy = register("needy", requires=frozenset({"test.sites.mlp"}))
    with pytest.raises(PassError, match=re.escape(f"add '{finder.name}' before it")):
        check_order([needy(), finder()], set())


def test_requirements_met_in_order_run(register):
    def provide(self, program, ctx):
        program.annotations["test.sites.mlp"] = ["block"]
        return PassResult(program, False)

    seen = []

    def consume(self, program, ctx):
        seen.append(program.annotations["test.sites.mlp"])
        return PassResult(program, False)

    finder = register("finder", provides=frozenset({"test.sites.mlp"}), run=provide)
    needy = register("needy", requires=frozenset({"test.sites.mlp"}), run=consume)
    program = PassManager([finder(), needy()]).run(make_program(), PassContext())
    assert seen == [["block"]]
    assert [r.name for r in program.log] == [finder.name, needy.name]


def test_annotations_already_on_the_program_count():
    class Needs(Pass):
        name = "test-needs-unregistered"
        requires = frozenset({"test.given"})

        def run(self, program, ctx):
            return PassResult(program, False)

    program = make_program()
    program.annotations["test.given"] = True
    PassManager([Needs()]).run(program, PassContext())
    with pytest.raises(PassError, match="requires 'test.given'"):
        PassManager([Needs()]).run(make_program(), PassContext())


def test_invalidated_annotation_must_be_provided_again(register):
    def provide(self, program, ctx):
        program.annotations["test.sites"] = 1
        return PassResult(program, False)

    finder = register("finder", provides=frozenset({"test.sites"}), run=provide)
    rewriter = register("rewriter", invalidates=frozenset({"test.sites"}))
    needy = register("needy", requires=frozenset({"test.sites"}))
    with pytest.raises(PassError, match=re.escape(f"pipeline[2] ('{needy.name}') requires 'test.sites'")):
        check_order([finder(), rewriter(), needy()], set())
    check_order([finder(), rewriter(), finder(), needy()], set())
    # at run time the invalidated annotation is dropped from the program
    program = PassManager([finder(), rewriter()]).run(make_program(), PassContext())
    assert "test.sites" not in program.annotations


def test_declared_but_unset_provides_fails(register):
    liar = register("liar", provides=frozenset({"test.promised"}))
    with pytest.raises(PassError, match=re.escape(f"pass '{liar.name}' declares it provides ['test.promised']")):
        PassManager([liar()]).run(make_program(), PassContext())


# -- the verification instrument catches a wrong pass ----------------------------------------------------------------


def _add_to_sub(self, program, ctx):
    """A deliberately wrong 'optimization': every aten.add becomes aten.sub."""
    changed = False
    for node in program.module.graph.nodes:
        if node.op == "call_function" and node.target == aten.add.Tensor:
            node.target = aten.sub.Tensor
            changed = True
    return PassResult(program, changed)


def test_wrong_pass_is_caught_naming_the_first_diverging_node(register):
    wrong = register("add-to-sub", run=_add_to_sub)
    program = make_program()
    verify = VerifyInstrument(program.example_inputs, atol=1e-5)
    with pytest.raises(VerificationError) as info:
        PassManager([EliminateDeadCode(), wrong()], [verify]).run(program, PassContext())
    msg = str(info.value)
    assert msg.startswith(f"pass '{wrong.name}' changed the program's outputs by max |Δ|")
    assert "first diverging node 'add' in module 'block'" in msg
    assert "(passes completed before it: eliminate-dead-code)" in msg
    assert info.value.exit_code == 3


def test_wrong_pass_within_its_declared_tolerance_passes(register):
    wrong = register("add-to-sub", run=_add_to_sub, tolerance=1e9)
    program = make_program()
    verify = VerifyInstrument(program.example_inputs, atol=1e-5)
    program = PassManager([wrong()], [verify]).run(program, PassContext())
    assert program.log[0].metrics["verify_max_abs_diff"] > 1e-5


def test_approximate_pass_is_not_verified(register):
    wrong = register("add-to-sub", run=_add_to_sub, tolerance=None)
    program = make_program()
    program = PassManager([wrong()], [VerifyInstrument(program.example_inputs, 1e-5)]).run(program, PassContext())
    assert "verify_max_abs_diff" not in program.log[0].metrics


def test_first_divergence_is_in_graph_order():
    program = make_program()
    before = {"linear": torch.zeros(2), "add": torch.zeros(2), "relu": torch.zeros(2)}
    after = {"linear": torch.zeros(2), "add": torch.ones(2), "relu": torch.ones(2)}
    div = first_divergence(program.module, before, after, atol=0.5)
    assert (div.node, div.module, div.diff) == ("add", "block", 1.0)
    assert first_divergence(program.module, before, before, atol=0.0) is None


def test_output_count_change_is_caught(register):
    def add_output(self, program, ctx):
        out = program.module.graph.output_node()
        x = next(n for n in program.module.graph.nodes if n.op == "placeholder")
        outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        out.args = ((*outs, x),)
        return PassResult(program, True)

    bad = register("extra-output", run=add_output)
    traced = torch.fx.symbolic_trace(_Net())  # a plain FX graph (an exported one fixes its output pytree)
    inputs = (torch.randn(3, 4), torch.randn(3, 4))
    program = Program(traced, inputs, ["x", "y"], ["logits"], {}, SourceInfo("test", "factory", ""))
    with pytest.raises(VerificationError, match=r"changed the number of program outputs \(1 -> 2\)"):
        PassManager([bad()], [VerifyInstrument(program.example_inputs, 1e-5)]).run(program, PassContext())


# -- crashes ---------------------------------------------------------------------------------------------------------


def test_crashing_pass_names_itself_and_what_ran_before(register):
    def crash(self, program, ctx):
        raise RuntimeError("index 7 is out of bounds")

    first = register("first")
    boom = register("boom", run=crash)
    with pytest.raises(PassError) as info:
        PassManager([EliminateDeadCode(), first(), boom()]).run(make_program(), PassContext())
    msg = str(info.value)
    assert msg.startswith(f"pass '{boom.name}' (pipeline[2]) failed: RuntimeError: index 7 is out of bounds")
    assert f"(passes completed before it: eliminate-dead-code, {first.name})" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_crash_in_the_first_pass_says_none_ran(register):
    def crash(self, program, ctx):
        raise KeyError("weight")

    boom = register("boom", run=crash)
    with pytest.raises(PassError, match=re.escape("(passes completed before it: none)")):
        PassManager([boom()]).run(make_program(), PassContext())


def test_pass_leaving_a_malformed_graph_is_reported(register):
    def corrupt(self, program, ctx):
        graph = program.module.graph
        relu = next(n for n in graph.nodes if n.target == aten.relu.default)
        add = next(n for n in graph.nodes if n.target == aten.add.Tensor)
        add.args = (relu, add.args[1])  # use before definition
        return PassResult(program, True)

    bad = register("corrupt", run=corrupt)
    with pytest.raises(PassError, match=re.escape(f"pass '{bad.name}' (pipeline[0]) failed")):
        PassManager([bad()]).run(make_program(), PassContext())


# -- IR dumps and records --------------------------------------------------------------------------------------------


def test_ir_dump_writes_one_file_per_pass(register, tmp_path):
    first = register("first")
    second = register("second")
    program = make_program()
    dumper = IRDumpInstrument(tmp_path / "ir")
    dumper.dump(program, "capture")
    PassManager([EliminateDeadCode(), first(), second()], [dumper]).run(program, PassContext())
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00_capture.py", "01_eliminate-dead-code.py", f"02_{first.name}.py", f"03_{second.name}.py"]
    code = (tmp_path / "ir" / "01_eliminate-dead-code.py").read_text()
    assert "def forward" in code and "torch.ops.aten.add.Tensor" in code


def test_ir_dump_shows_the_rewrite(register, tmp_path):
    wrong = register("add-to-sub", run=_add_to_sub)
    program = make_program()
    dumper = IRDumpInstrument(tmp_path)
    dumper.dump(program, "capture")
    PassManager([wrong()], [dumper]).run(program, PassContext())
    assert "aten.add.Tensor" in (tmp_path / "00_capture.py").read_text()
    after = (tmp_path / f"01_{wrong.name}.py").read_text()
    assert "aten.sub.Tensor" in after and "aten.add.Tensor" not in after


def test_pass_records_and_instrument_order(register):
    def measure(self, program, ctx):
        return PassResult(program, True, {"sites": 2, "ratio": 0.5})

    measured = register("measured", run=measure)
    program = make_program()
    spy = _Spy()
    verify = VerifyInstrument(program.example_inputs, 1e-5)
    program = PassManager([EliminateDeadCode(), measured()], [spy, verify]).run(program, PassContext())

    assert spy.events == [
        ("before", "eliminate-dead-code"), ("after", "eliminate-dead-code"),
        ("before", measured.name), ("after", measured.name),
    ]
    assert [type(r) for r in program.log] == [PassRecord, PassRecord]
    dce, m = program.log
    assert dce.name == "eliminate-dead-code" and dce.options == {}
    assert dce.changed is False and dce.metrics["nodes_removed"] == 0 and dce.metrics["bytes_freed"] == 0
    assert m.name == measured.name and m.changed is True
    assert m.metrics["sites"] == 2 and m.metrics["ratio"] == 0.5
    for record in program.log:
        assert isinstance(record.seconds, float) and record.seconds >= 0
        assert record.metrics["verify_max_abs_diff"] == 0.0


def test_pass_records_keep_options():
    import dataclasses

    @dataclasses.dataclass
    class Config:
        level: int = 3

    class WithOptions(Pass):
        name = "test-with-options-unregistered"

        def run(self, program, ctx):
            return PassResult(program, False)

    WithOptions.Config = Config
    program = PassManager([WithOptions(Config(level=5))]).run(make_program(), PassContext())
    assert program.log[0].options == {"level": 5}


def test_pass_context_progress_without_a_display():
    with PassContext().progress(10, "layers") as advance:
        advance(3)  # a no-op, but callable
    calls = []

    import contextlib

    @contextlib.contextmanager
    def factory(total, description):
        calls.append((total, description))
        yield lambda n=1: calls.append(n)

    with PassContext(progress_factory=factory).progress(4, "layers") as advance:
        advance(2)
    assert calls == [(4, "layers"), 2]
