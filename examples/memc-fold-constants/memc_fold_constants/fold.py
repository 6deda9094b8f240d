"""fold-constants: evaluate, once at compile time, every part of the graph that depends only on constants.

``program.module`` is the ``torch.fx.GraphModule`` that ``torch.export``'s ``ep.module()`` returns: weights and
buffers are read by ``get_attr`` nodes, everything else is ``call_function`` nodes calling ATen ops. A node is
*constant* when it calls a pure, deterministic op and every input is a constant (a ``get_attr`` tensor, a Python
literal, or another constant node). The pass

1. evaluates the constant nodes in graph order (no graph is traced: the real ops run on the real tensors),
2. finds each maximal constant subgraph's *boundary*: constant nodes read by a non-constant node or the output,
3. replaces every boundary with a ``get_attr`` of a new buffer holding its value (or with the existing attribute
   when the value *is* that attribute, e.g. a no-op ``.to(float32)``), and
4. erases the folded nodes, and drops the weights only they read.

Never folded: ops with side effects (``aten._assert_*``, mutating ops), random or uninitialised results
(``rand*``, ``dropout``, ``bernoulli``, ``empty*``...), anything reading a symbolic size, higher-order ops, and
results larger than ``max_bytes`` (their constant inputs become the boundary instead, so a big weight is never
copied into a second, transformed copy). Constant subgraphs nobody reads are left for ``eliminate-dead-code``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from memc.passes.base import Pass, PassContext, PassResult
from memc.program import Program
from memc.schema import option

# ATen base names never evaluated at compile time, on top of what torch itself calls impure (mutating ops, the
# side-effect list of torch.fx, ops tagged nondeterministic_seeded): the list keeps the rule visible and holds for
# ops whose tags are incomplete.
_NEVER_PREFIXES = ("_assert", "sym_constrain_range", "rand", "empty", "new_empty")
_NEVER_SUBSTRINGS = ("dropout",)
_NEVER_NAMES = frozenset({
    "bernoulli", "binomial", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal",
    "poisson", "random", "rrelu", "rrelu_with_noise", "uniform", "_standard_gamma", "_sample_dirichlet",
    "_local_scalar_dense", "item", "_print", "resize", "set",
})
_PYTHON_FOLDABLE = frozenset({operator.getitem})  # the only non-ATen callable folded: picking one of many outputs


def op_name(target: Any) -> str:
    """``aten.cat.default`` for an OpOverload, the qualified name of anything else."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def never_folded(target: Any) -> str | None:
    """Why ``target`` must never be evaluated at compile time, or None if it may be."""
    if target in _PYTHON_FOLDABLE:
        return None
    if not isinstance(target, torch._ops.OpOverload):
        return "not an ATen op"  # higher-order ops, Python functions: unknown semantics
    base = target._schema.name.split("::")[-1]
    if (base.startswith(_NEVER_PREFIXES) or any(s in base for s in _NEVER_SUBSTRINGS) or base in _NEVER_NAMES
            or torch.Tag.nondeterministic_seeded in target.tags):
        return "side effect, randomness or uninitialised memory"
    if target._schema.is_mutable:
        return "mutates an input"
    return None


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _alias_key(t: torch.Tensor) -> tuple | None:
    """Identity of a dense tensor's view of memory: equal keys read exactly the same elements."""
    if t.layout != torch.strided or t.is_meta:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


_NOT_CONSTANT = object()


class FoldConstants(Pass):
    """Evaluate subgraphs that depend only on weights and literals once; replace them by constants."""

    name = "fold-constants"
    tolerance = 0.0  # the same ops on the same tensors: results are bit-identical

    @dataclass
    class Config:
        max_bytes: int = option(
            64 * 1024 * 1024,
            "largest folded result kept as a new constant, in bytes; bigger ones stay computed at run time, "
            "which bounds the memory a fold can add (e.g. W.t() stored next to a W still read elsewhere)",
        )
        skip_ops: list[str] = option(
            factory=list, doc='ops never folded, by packet or overload name: ["aten.cat"], ["aten.cat.default"]'
        )

        def validate(self) -> None:
            if self.max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
            for name in self.skip_ops:
                if "." not in name:
                    raise ValueError(f"skip_ops entry {name!r} is not an op name like 'aten.cat' or 'aten.cat.default'")

    # -- which nodes are constant -------------------------------------------------------------------------------
    def _skipped_by_user(self, target: Any) -> bool:
        if not self.config.skip_ops:
            return False
        names = {op_name(target)}
        if isinstance(target, torch._ops.OpOverload):
            names.add(str(target.overloadpacket))
        return bool(names & set(self.config.skip_ops))

    def _evaluate(self, gm: GraphModule, node: Node, values: dict[Node, Any]) -> Any:
        """The node's value if it is constant, else ``_NOT_CONSTANT``."""
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            return value if isinstance(value, torch.Tensor) else _NOT_CONSTANT
        if node.op != "call_function" or never_folded(node.target) or self._skipped_by_user(node.target):
            return _NOT_CONSTANT
        if not all(n in values for n in node.all_input_nodes):
            return _NOT_CONSTANT
        leaves = pytree.tree_leaves((node.args, node.kwargs))
        if any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves):
            return _NOT_CONSTANT
        args, kwargs = map_arg((node.args, node.kwargs), values.__getitem__)
        try:
            return node.target(*args, **kwargs)
        except Exception:  # an op that cannot run eagerly here is simply left in the graph
            return _NOT_CONSTANT

    # -- the pass ------------------------------------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gm = program.module
        graph = gm.graph
        nodes = list(graph.nodes)
        position = {n: i for i, n in enumerate(nodes)}

        values: dict[Node, Any] = {}
        with torch.no_grad(), ctx.progress(len(nodes), "fold-constants: evaluating constant nodes") as advance:
            for node in nodes:
                value = self._evaluate(gm, node, values)
                if value is not _NOT_CONSTANT:
                    values[node] = value
                advance(1)

        # A result equal to an attribute read earlier (a no-op cast, a full slice) reuses that attribute.
        attribute_of: dict[tuple, Node] = {}
        for node in nodes:
            if node.op == "get_attr" and node in values:
                key = _alias_key(values[node])
                if key is not None:
                    attribute_of.setdefault(key, node)

        def existing(node: Node) -> Node | None:
            value = values[node]
            key = _alias_key(value) if isinstance(value, torch.Tensor) else None
            src = attribute_of.get(key) if key is not None else None
            return src if src is not None and position[src] < position[node] else None

        folded = {n for n in values if n.op == "call_function"}

        def read_outside(node: Node) -> bool:
            return any(u not in folded for u in node.users)

        # A boundary that cannot become a constant (not a tensor, or over max_bytes) is un-folded; its constant
        # inputs then become boundaries themselves. Repeat until every boundary can be materialised.
        too_large: set[Node] = set()
        while True:
            demote = []
            for node in folded:
                if not read_outside(node) or existing(node) is not None:
                    continue
                value = values[node]
                if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
                    demote.append(node)
                elif _nbytes(value) > self.config.max_bytes:
                    demote.append(node)
                    too_large.add(node)
            if not demote:
                break
            folded.difference_update(demote)

        boundaries = sorted((n for n in folded if read_outside(n)), key=position.__getitem__)

        # The subgraphs that feed the boundaries (constant nodes and the get_attr nodes they read).
        cone: set[Node] = set()
        stack = list(boundaries)
        while stack:
            node = stack.pop()
            if node in cone:
                continue
            cone.add(node)
            stack.extend(node.all_input_nodes)

        created = reused = bytes_created = 0
        for node in boundaries:
            replacement = existing(node)
            if replacement is not None:
                reused += 1
            else:
                # clone() keeps the strides of dense results (a transposed weight stays transposed), so kernels
                # reading the constant see the same memory layout as before and results stay bit-identical.
                constant = values[node].detach().clone()
                name = _unique_attr(gm, f"_folded_{node.name}")
                gm.register_buffer(name, constant)
                with graph.inserting_before(node):
                    replacement = graph.get_attr(name)
                _copy_meta(node, replacement, constant)
                created += 1
                bytes_created += _nbytes(constant)
            node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user not in folded)

        erased = 0
        unread: set[str] = set()
        for node in reversed(nodes):
            if node in cone and not node.users:
                if node.op == "get_attr":
                    unread.add(node.target)
                else:
                    erased += 1
                graph.erase_node(node)
        dropped, bytes_freed = _drop_attributes(gm, unread)
        gm.recompile()

        metrics = {
            "nodes_folded": erased,
            "constants_created": created,
            "bytes_created": bytes_created,
            "constants_reused": reused,
            "attributes_dropped": dropped,
            "bytes_freed": bytes_freed,
            "skipped_over_max_bytes": len(too_large),
        }
        return PassResult(program, bool(boundaries), metrics)


def _unique_attr(gm: GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _copy_meta(old: Node, new: Node, constant: torch.Tensor) -> None:
    """Keep what later passes and error messages use: the owning module and a fake value of the constant."""
    for key in ("nn_module_stack", "stack_trace", "from_node"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    fake_mode = getattr(old.meta.get("val"), "fake_mode", None)
    if fake_mode is not None:
        try:
            new.meta["val"] = fake_mode.from_tensor(constant, static_shapes=True)
        except Exception:  # metadata only: a missing value never changes what the program computes
            pass


def _drop_attributes(gm: GraphModule, targets: set[str]) -> tuple[int, int]:
    """Delete the attributes no get_attr node reads any more; returns (how many, bytes no longer held)."""
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed: list[torch.Tensor] = []
    for target in sorted(targets - still_read):
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor):
            removed.append(value)
            delattr(owner, attr)
    kept = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    kept |= {
        t.untyped_storage().data_ptr()
        for n in gm.graph.nodes
        if n.op == "get_attr" and isinstance(t := _fetch_attr(gm, n.target), torch.Tensor)
    }
    freed: dict[int, int] = {}
    for t in removed:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in kept:
            freed[ptr] = t.untyped_storage().nbytes()
    return len(removed), sum(freed.values())
