"""Layout clean-up around GroupQueryAttention: the Reshape / Transpose nodes that converting between torch's
[B, H, S, D] heads and GroupQueryAttention's [B, S, H * D] leave behind.

A decode step of a small model is dominated by per-node overhead, not arithmetic, so these nodes cost as much as a
matmul. Rules (to a fixpoint; a value that is a graph output is never removed):

* two Transposes that compose to the identity -> nothing;
* Reshape of a Reshape -> one Reshape (an outer 0 "copy" entry only where the inner one kept that dim);
* a Reshape whose input and output shapes are known and equal (dims as ints or the same symbolic names) -> nothing;
* Reshape [B, S, H*D] -> [B, S, H, D] -> Transpose -> 4-D RotaryEmbedding -> Transpose -> Reshape [B, S, H*D]
  -> one 3-D RotaryEmbedding (``num_heads`` = H) on the [B, S, H*D] input (opset 23).

Shapes come from the exporter's value_info; values made by contrib ops are not trusted (their inferred shapes
are placeholders), except GroupQueryAttention's output, which has its query's shape, and MatMulNBits' output
([..., N] from its input and N attribute: the rotary rule then applies to quantized projections too).
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

MSFT = "com.microsoft"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.outputs = {o.name for o in self.g.output}
        self.consts = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        for n in self.g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.shapes: dict[str, tuple] = {}
        for v in list(self.g.value_info) + list(self.g.input) + list(self.g.output):
            t = v.type.tensor_type
            if t.HasField("shape"):
                self.shapes[v.name] = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value")
                                                                            else None) for d in t.shape.dim)
        self.reindex()

    def reindex(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.users: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def shape(self, name: str) -> tuple | None:
        node = self.producer.get(name)
        if node is not None and node.domain == MSFT:
            if node.op_type == "GroupQueryAttention" and name == node.output[0]:
                return self.shape(node.input[0])
            if node.op_type == "MatMulNBits":  # [..., K] x [K, N] -> [..., N]
                a = self.shape(node.input[0])
                n = next((x.i for x in node.attribute if x.name == "N"), 0)
                return a[:-1] + (int(n),) if a is not None and n else None
            return None
        s = self.shapes.get(name)
        if s is None or not s or any(d is None or d == "" or d == 0 for d in s):  # 0: a literal shape, not real
            return None
        return s

    def only_user(self, name: str):
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.users.get(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _transposes(g: _Graph) -> bool:
    for n in g.g.node:
        if n.op_type != "Transpose" or n.output[0] in g.outputs or not g.users.get(n.output[0]):
            continue
        first = g.producer.get(n.input[0])
        if first is None or first.op_type != "Transpose":
            continue
        p1, p2 = _perm(first), _perm(n)
        if p1 is None or p2 is None or [p1[i] for i in p2] != list(range(len(p1))):
            continue
        g.rename_uses(n.output[0], first.input[0])
        return True
    return False


def _allowzero(node) -> bool:
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def _reshapes(g: _Graph) -> bool:
    for n in g.g.node:
        if n.op_type != "Reshape" or not g.users.get(n.output[0]):
            continue
        src, out = n.input[0], n.output[0]
        a, b = g.shape(src), g.shape(out)
        if a is not None and a == b and out not in g.outputs:  # identity
            g.rename_uses(out, src)
            return True
        inner = g.producer.get(src)
        if inner is None or inner.op_type != "Reshape" or inner is n:
            continue
        target = g.consts.get(n.input[1])
        if not _allowzero(n) and target is not None and (target == 0).any():
            # 0 copies the input's dim: the same dims only if the inner Reshape kept them there
            x, y = g.shape(inner.input[0]), g.shape(inner.output[0])
            zeros = [int(i) for i in (target == 0).nonzero()[0]]
            if x is None or y is None or any(i >= min(len(x), len(y)) or x[i] != y[i] for i in zeros):
                continue
        n.input[0] = inner.input[0]  # a Reshape's result depends only on its input's elements and the shape
        return True
    return False


def _rotary(g: _Graph) -> bool:
    for n in g.g.node:
        if n.op_type != "RotaryEmbedding" or n.domain not in ("", "ai.onnx") or len([i for i in n.input if i]) != 3 \
                or not g.users.get(n.output[0]):
            continue
        t1 = g.producer.get(n.input[0])
        t2 = g.only_user(n.output[0])
        if t1 is None or t1.op_type != "Transpose" or _perm(t1) != [0, 2, 1, 3] or t2 is None or \
                t2.op_type != "Transpose" or _perm(t2) != [0, 2, 1, 3]:
            continue
        r_in = g.producer.get(t1.input[0])
        r_out = g.only_user(t2.output[0])
        if r_in is None or r_in.op_type != "Reshape" or r_out is None or r_out.op_type != "Reshape":
            continue
        x3, heads4 = g.shape(r_in.input[0]), g.shape(r_in.output[0])
        if x3 is None or heads4 is None or len(x3) != 3 or len(heads4) != 4 or g.shape(r_out.output[0]) != x3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs["num_heads"] = int(heads4[2])
        fused = helper.make_node("RotaryEmbedding", [r_in.input[0], n.input[1], n.input[2]], [r_out.output[0] + "_3d"],
                                 name=(n.name or "rotary") + "_3d", **attrs)
        fused.metadata_props.extend(n.metadata_props)
        index = list(g.g.node).index(n)
        g.g.node.insert(index, fused)
        g.reindex()
        g.rename_uses(r_out.output[0], fused.output[0])
        return True
    return False


def _drop_dead(g: _Graph) -> None:
    while True:
        g.reindex()
        dead = [n for n in g.g.node if not any(o in g.users or o in g.outputs for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.g.node.remove(n)


def simplify_gqa_layouts(model: onnx.ModelProto) -> int:
    """Apply the rules when the model has GroupQueryAttention; returns how many nodes went away."""
    if not any(n.op_type == "GroupQueryAttention" and n.domain == MSFT for n in model.graph.node):
        return 0
    before = len(model.graph.node)
    g = _Graph(model)
    rotary = any(o.domain in ("", "ai.onnx") and o.version >= 23 for o in model.opset_import)
    for _ in range(10_000):
        changed = _transposes(g) or _reshapes(g) or (rotary and _rotary(g))
        if not changed:
            break
        _drop_dead(g)
    _drop_dead(g)
    return before - len(model.graph.node)
