"""MemoryCachingAttention: every fast form (chunked-parallel forward, prefill, recurrent step, ONNX) against the
plain-torch token-by-token reference (memc/nn/naive.py), plus the sanity reductions and the state contract."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memc.errors import ConfigError
from memc.nn import MemoryCachingAttention, MemoryCachingConfig, MemoryCachingState
from memc.nn.naive import naive_memory_caching

HQ, HKV, D, HID = 4, 2, 8, 12
TOL = 1e-5


def make(cfg: MemoryCachingConfig, *, perturb: bool = True, seed: int = 0, hkv: int = HKV,
         scale: float | None = None) -> MemoryCachingAttention:
    """A float64 layer; ``perturb`` moves every trainable parameter off its init so the router delta, tau, b and
    the feature maps all matter (at init B = 0, tau = 1, b = 0 would hide mistakes in their handling)."""
    torch.manual_seed(seed)
    mod = MemoryCachingAttention(cfg, num_heads=HQ, num_kv_heads=hkv, head_dim=D, hidden_size=HID, scale=scale)
    mod = mod.double().eval()
    if perturb:
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return mod


def inputs(batch: int, t: int, seed: int = 1, hkv: int = HKV, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(batch, HQ, t, D), r(batch, hkv, t, D), r(batch, hkv, t, D), r(batch, t, HID)


def run_steps(mod, q, k, v, x, state=None, start: int = 0):
    state = state if state is not None else mod.init_state(q.shape[0], dtype=q.dtype)
    ys = []
    for t in range(start, q.shape[2]):
        sl = slice(t, t + 1)
        y, state = mod.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], x[:, sl], state)
        ys.append(y)
    return torch.cat(ys, dim=2), state


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item() if a.numel() else 0.0


# --- 1. segment 1 at init reproduces full causal softmax attention ---------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_segment_one_is_full_softmax_attention(window, hkv):
    cfg = MemoryCachingConfig(window=window, segment=1, feature_dim=6, variant="gated")
    mod = make(cfg, perturb=False, hkv=hkv)
    with torch.no_grad():  # any positive feature map reads a one-token segment back exactly
        mod.phi_q.weight.add_(torch.randn_like(mod.phi_q.weight))
        mod.phi_k.weight.add_(torch.randn_like(mod.phi_k.weight))
    q, k, v, x = inputs(2, 29, hkv=hkv)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL
    mod.memory_enabled = False  # and the ablation is not: older tokens are gone
    assert maxdiff(mod(q, k, v, x), ref) > 1e-2


def test_window_covering_the_sequence_is_full_attention():
    mod = make(MemoryCachingConfig(window=40, segment=4, feature_dim=6))
    q, k, v, x = inputs(2, 40)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL


def test_memory_disabled_is_window_softmax():
    mod = make(MemoryCachingConfig(window=5, segment=3, feature_dim=6))
    mod.memory_enabled = False
    q, k, v, x = inputs(2, 37)
    t = torch.arange(37)
    band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL


# --- 2. parallel == naive == step for every variant, with GQA, odd lengths, caps ---------------------------------
CAPS = [(0, "merge"), (2, "merge"), (3, "evict"), (1, "merge"), (1, "evict")]


@pytest.mark.parametrize("variant", ["gated", "residual", "soup", "sparse"])
@pytest.mark.parametrize("cap,policy", CAPS)
@pytest.mark.parametrize("t", [37, 50, 4])
def test_parallel_naive_step_agree(variant, cap, policy, t):
    cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=6, variant=variant, top_k=2, max_segments=cap,
                              cap_policy=policy)
    mod = make(cfg)
    q, k, v, x = inputs(2, t)
    ref = naive_memory_caching(mod, q, k, v, x)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL


@pytest.mark.parametrize("variant", ["gated", "soup", "sparse"])
def test_sparse_top_k_below_cap_and_wide_segments(variant):
    cfg = MemoryCachingConfig(window=7, segment=4, feature_dim=16, variant=variant, top_k=2, max_segments=4)
    mod = make(cfg)
    q, k, v, x = inputs(3, 61)
    ref = naive_memory_caching(mod, q, k, v, x)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL


@pytest.mark.parametrize("hkv,rank,scale,feature_dim", [(1, 8, None, 6), (4, 0, 0.3, 16), (2, 3, 0.5, 2 * D)])
def test_head_layouts_router_rank_scale_agree(hkv, rank, scale, feature_dim):
    """MQA / no GQA, no router delta, a custom scale, the identity-initialised feature map (F / 2 == D)."""
    for variant in ("gated", "soup"):
        cfg = MemoryCachingConfig(window=4, segment=3, feature_dim=feature_dim, variant=variant, router_rank=rank,
                                  max_segments=2)
        mod = make(cfg, hkv=hkv, scale=scale)
        q, k, v, x = inputs(2, 29, hkv=hkv)
        ref = naive_memory_caching(mod, q, k, v, x)
        assert maxdiff(mod(q, k, v, x), ref) <= TOL
        assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL
        assert mod.scale == (scale if scale is not None else D**-0.5)
        assert (mod.router_a is None) == (rank == 0)


@pytest.mark.parametrize("variant", ["gated", "sparse"])
def test_memory_disabled_forms_agree(variant):
    mod = make(MemoryCachingConfig(window=5, segment=3, feature_dim=6, variant=variant, max_segments=2))
    mod.memory_enabled = False
    q, k, v, x = inputs(2, 37)
    ref = naive_memory_caching(mod, q, k, v, x)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL


def test_variants_and_caps_differ():
    """The options change the output (a test that the reference and the fast form agree is void otherwise)."""
    q, k, v, x = inputs(2, 50)
    outs = {}
    for variant in ("gated", "residual", "soup", "sparse"):
        for cap, policy in CAPS:
            cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=6, variant=variant, top_k=2,
                                      max_segments=cap, cap_policy=policy)
            outs[variant, cap, policy] = make(cfg)(q, k, v, x)
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if {a[0], b[0]} == {"sparse", "gated"} and a[1:] == b[1:] and 0 < a[1] <= 2:
                continue  # top_k = 2 >= cap: sparse reads every slot, like gated
            assert maxdiff(outs[a], outs[b]) > 1e-6, (a, b)


# --- 3. prefill then step == forward (the decode path) ----------------------------------------------------------
@pytest.mark.parametrize("variant", ["gated", "residual", "soup", "sparse"])
@pytest.mark.parametrize("cap,policy", [(0, "merge"), (2, "merge"), (2, "evict")])
@pytest.mark.parametrize("t1", [1, 4, 5, 8, 9, 23])
def test_prefill_then_step_is_forward(variant, cap, policy, t1):
    cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=6, variant=variant, top_k=1, max_segments=cap,
                              cap_policy=policy)
    mod = make(cfg)
    q, k, v, x = inputs(2, 37)
    full = mod(q, k, v, x)
    y1, state = mod.prefill(q[:, :, :t1], k[:, :, :t1], v[:, :, :t1], x[:, :t1])
    stepped = run_steps(mod, q[:, :, :t1], k[:, :, :t1], v[:, :, :t1], x[:, :t1])[1]
    for name, a, b in zip(MemoryCachingState.names(), state.tensors(), stepped.tensors()):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert maxdiff(a.double(), b.double()) <= TOL, name
    y2, _ = run_steps(mod, q, k, v, x, state=state, start=t1)
    assert maxdiff(torch.cat([y1, y2], dim=2), full) <= TOL


# --- 4. the state: fixed shapes with a cap, nbytes ---------------------------------------------------------------
def test_state_shapes_do_not_depend_on_length():
    cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=6, max_segments=3)
    mod = make(cfg)
    specs = set()
    for t in (1, 4, 9, 37, 50):
        q, k, v, x = inputs(2, t)
        _, state = mod.prefill(q, k, v, x)
        specs.add(tuple(state.spec()))
    specs.add(tuple(run_steps(mod, *inputs(2, 50))[1].spec()))
    specs.add(tuple(mod.init_state(2, dtype=torch.float64).spec()))
    assert len(specs) == 1
    spec = dict((n, (s, d)) for n, s, d in specs.pop())
    b, h, w, f, m = 2, HKV, 5, 6, 3
    assert spec["win_k"] == ((b, h, w, D), torch.float64)
    assert spec["slot_s"] == ((b, h, m, f, D), torch.float64)
    assert spec["t"] == ((), torch.int64)
    state = mod.init_state(b, dtype=torch.float32)
    floats = 2 * b * h * w * D + b * h * (f * D + f + D + 1) + b * h * m * (f * D + f + D + 1)
    assert state.nbytes() == 4 * floats + 8
    assert len(state.tensors()) == len(MemoryCachingState.names())
    again = MemoryCachingState.from_tensors(state.tensors())
    assert all(a is b for a, b in zip(again.tensors(), state.tensors()))


def test_unbounded_state_grows_one_slot_per_segment():
    mod = make(MemoryCachingConfig(window=5, segment=3, feature_dim=6))
    _, state = mod.prefill(*inputs(1, 37))
    assert state.slot_s.shape[2] == (37 - 1 - 5) // 3  # closed segments after 37 tokens
    assert state.open_n[0, 0].item() == (37 - 1 - 5) % 3 + 1


# --- 5. export: torch.export with a dynamic length, ONNX (opset 23) == torch; step exports ----------------------
class Site(torch.nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, q, k, v, x):
        return self.mod(q, k, v, x)


class Step(torch.nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, q, k, v, x, *state):
        y, new = self.mod.step(q, k, v, x, MemoryCachingState.from_tensors(state))
        return (y, *new.tensors())


def _float32(cfg: MemoryCachingConfig) -> MemoryCachingAttention:
    return make(cfg).float()


@pytest.mark.parametrize("router", ["mean_key", "phi_window"])
def test_parallel_form_exports_to_onnx_with_dynamic_length(router):
    from memc.codegen.onnx import lower_exported
    import onnxruntime as ort

    cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=8, variant="sparse", top_k=2, max_segments=3,
                              router=router)
    mod = _float32(cfg)
    args = inputs(2, 23, dtype=torch.float32)
    seq = torch.export.Dim("seq", min=1, max=4096)
    dims = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "x": {1: seq}}
    ep = torch.export.export(Site(mod), args, dynamic_shapes=dims, strict=False)
    names = ["q", "k", "v", "x"]
    model = lower_exported(ep, args, names, ["y"], {n: {2 if n != "x" else 1: "seq"} for n in names}, opset=23)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in (23, 1, 4, 41):
        a = inputs(2, t, seed=t, dtype=torch.float32)
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, a)})[0]
        assert np.abs(got - mod(*a).detach().numpy()).max() <= 1e-4, t


@pytest.mark.parametrize("router", ["mean_key", "phi_window"])
def test_step_exports_with_state_as_tensors_and_runs_in_onnxruntime(router):
    from memc.codegen.onnx import lower_exported
    import onnxruntime as ort

    cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=8, variant="gated", max_segments=2, router=router)
    mod = _float32(cfg)
    q, k, v, x = inputs(2, 20, dtype=torch.float32)
    state = mod.init_state(2)
    args = (q[:, :, :1], k[:, :, :1], v[:, :, :1], x[:, :1], *state.tensors())
    ep = torch.export.export(Step(mod), args, strict=False)
    names = ["q", "k", "v", "x", *MemoryCachingState.names()]
    model = lower_exported(ep, args, names, ["y", *(f"new_{n}" for n in MemoryCachingState.names())], {}, opset=23)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run = ep.module()
    ref = mod(q, k, v, x)
    flat, flat_ort = state.tensors(), [a.numpy() for a in state.tensors()]
    for t in range(20):
        token = (q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], x[:, t:t + 1])
        y, *flat = run(*token, *flat)
        assert maxdiff(y, ref[:, :, t:t + 1]) <= 1e-5
        assert [tuple(a.shape) for a in flat] == [s for _, s, _ in state.spec()]
        y_ort, *flat_ort = sess.run(None, dict(zip(names, [a.numpy() for a in token] + flat_ort)))
        assert np.abs(y_ort - ref[:, :, t:t + 1].detach().numpy()).max() <= 1e-4, t


class Prefill(torch.nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, q, k, v, x):
        y, state = self.mod.prefill(q, k, v, x)
        return (y, *state.tensors())


def test_prefill_exports_with_dynamic_length():
    mod = _float32(MemoryCachingConfig(window=5, segment=3, feature_dim=8, variant="soup", max_segments=3))
    seq = torch.export.Dim("seq", min=1, max=4096)
    dims = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "x": {1: seq}}
    run = torch.export.export(Prefill(mod), inputs(2, 23, dtype=torch.float32), dynamic_shapes=dims,
                              strict=False).module()
    for t in (23, 1, 4, 40):
        a = inputs(2, t, seed=t, dtype=torch.float32)
        y, state = mod.prefill(*a)
        for got, want in zip(run(*a), (y, *state.tensors())):
            assert maxdiff(got.double(), want.double()) <= 1e-5


# --- 6. training: gradients, window dropout -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["gated", "residual", "soup", "sparse"])
def test_gradients_reach_every_trainable_parameter(variant):
    cfg = MemoryCachingConfig(window=4, segment=3, feature_dim=6, variant=variant, top_k=2, max_segments=2)
    mod = make(cfg).train()
    q, k, v, x = inputs(2, 30)
    mod(q, k, v, x).square().sum().backward()
    names = {n for n, _ in mod.named_parameters()}
    expected = {"phi_q.weight", "phi_k.weight", "router_a.weight", "router_b.weight", "log_tau", "router_bias"}
    assert names == expected
    for name, p in mod.named_parameters():
        if variant == "residual" and name in ("router_a.weight", "router_b.weight", "log_tau"):
            assert p.grad is None  # the residual router ignores the query by definition
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_router_grads_at_init_and_float32_stability():
    cfg = MemoryCachingConfig(window=4, segment=3, feature_dim=6)
    mod = MemoryCachingAttention(cfg, num_heads=HQ, num_kv_heads=HKV, head_dim=D, hidden_size=HID).train()
    q, k, v, x = (a * 30 for a in inputs(2, 30, dtype=torch.float32))  # large logits: the running max matters
    y = mod(q, k, v, x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert mod.router_b.weight.grad.abs().sum() > 0  # B starts at zero but learns
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters())


def test_window_dropout_only_in_training_and_seeded():
    cfg = MemoryCachingConfig(window=6, segment=3, feature_dim=6, window_dropout=0.5)
    mod = make(cfg)
    q, k, v, x = inputs(2, 30)
    plain = dataclasses.replace(cfg, window_dropout=0.0)
    ref = make(plain)
    ref.load_state_dict(mod.state_dict())
    assert maxdiff(mod.eval()(q, k, v, x), ref(q, k, v, x)) == 0
    mod.train()
    torch.manual_seed(7)
    a = mod(q, k, v, x)
    torch.manual_seed(7)
    b = mod(q, k, v, x)
    c = mod(q, k, v, x)
    assert maxdiff(a, b) == 0
    assert maxdiff(a, c) > 1e-3 and maxdiff(a, ref(q, k, v, x)) > 1e-3
    assert maxdiff(a[:, :, :1], ref(q, k, v, x)[:, :, :1]) == 0  # token 0 only sees itself, never dropped


def test_hedgehog_feature_map_init_and_positivity():
    from memc.nn.feature_maps import HedgehogFeatureMap

    ident = HedgehogFeatureMap(3, D, 2 * D)
    assert torch.equal(ident.weight, torch.eye(D).expand(3, D, D))
    a, b = HedgehogFeatureMap(2, D, 6), HedgehogFeatureMap(2, D, 6)
    assert torch.equal(a.weight, b.weight) and a.weight.shape == (2, D, 3)  # fixed seeded projection
    phi = a(torch.randn(1, 2, 5, D, generator=torch.Generator().manual_seed(0)) * 10)
    assert phi.shape == (1, 2, 5, 6) and (phi > 0).all()
    assert torch.allclose(phi.sum(-1), torch.full((1, 2, 5), 2.0))


# --- 7. bad options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("window", 0), ("segment", 0), ("feature_dim", 7), ("feature_dim", 0), ("top_k", 0), ("variant", "linear"),
    ("max_segments", -1), ("cap_policy", "lru"), ("router_rank", -2), ("window_dropout", 1.0), ("window", 2.5),
])
def test_bad_config_names_the_option(option, value):
    kwargs = {"window": 4, "segment": 2, option: value}
    with pytest.raises(ValueError, match=option) as err:
        MemoryCachingConfig(**kwargs)
    assert isinstance(err.value, ConfigError)


def test_bad_head_layout_names_the_option():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MemoryCachingAttention(MemoryCachingConfig(window=4, segment=2), num_heads=4, num_kv_heads=3, head_dim=8,
                               hidden_size=8)


@pytest.mark.parametrize("variant", ["gated", "soup"])
def test_read_weights_keep_finite_gradients_when_the_memory_is_far_below_the_window(variant):
    """Router logits ~100 below the running max make e^{r - m} subnormal; soup once divided by its sum and got
    inf / NaN gradients there (ref-llama's soup distillation diverged). Forward values keep the mixture read."""
    mod = MemoryCachingAttention(MemoryCachingConfig(window=4, segment=4, feature_dim=8, variant=variant),
                                 num_heads=1, num_kv_heads=1, head_dim=4, hidden_size=4)
    r = torch.tensor([[[[-100.0, -101.0, float("-inf")]]]], requires_grad=True)
    den = torch.tensor([[[[0.5, 2.0, 0.0]]]], requires_grad=True)
    a, mass = mod.read_weights(r, den, torch.zeros(1, 1, 1))
    (a.sum() * 1e30 + mass.sum() * 1e30).backward()
    assert torch.isfinite(r.grad).all() and torch.isfinite(den.grad).all()
    if variant == "soup":  # a_i = e_i / (sum_j w_j den_j), w = softmax(r)
        w = torch.softmax(torch.tensor([-100.0, -101.0]), 0)
        dbar = float((w * torch.tensor([0.5, 2.0])).sum())
        assert a[0, 0, 0, 0].item() * dbar == pytest.approx(torch.exp(torch.tensor(-100.0)).item(), rel=1e-3)


# --- 8. the phi_mass router (r = log(phi_q . z) / tau + b) --------------------------------------------------------
@pytest.mark.parametrize("variant", ["gated", "soup", "sparse"])
@pytest.mark.parametrize("cap,policy", CAPS)
@pytest.mark.parametrize("t", [37, 4])
@pytest.mark.parametrize("router", ["phi_mass", "key_phi", "phi_window"])
def test_mass_routers_parallel_naive_step_agree(variant, cap, policy, t, router):
    cfg = MemoryCachingConfig(window=5, segment=3, feature_dim=6, variant=variant, top_k=2, max_segments=cap,
                              cap_policy=policy, router=router)
    mod = make(cfg)
    q, k, v, x = inputs(2, t)
    ref = naive_memory_caching(mod, q, k, v, x)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], ref) <= TOL
    y1, state = mod.prefill(q[:, :, :t // 2], k[:, :, :t // 2], v[:, :, :t // 2], x[:, :t // 2])
    y2, _ = run_steps(mod, q, k, v, x, state=state, start=t // 2)
    assert maxdiff(torch.cat([y1, y2], dim=2), ref) <= TOL


def test_phi_mass_router_at_tau_one_is_the_lolcats_hybrid():
    """tau = 1: every read slot's weight e^r / (phi_q . z) is e^b, so gated is window softmax + e^b-scaled linear
    attention over all memory tokens (computed here directly, in plain torch)."""
    cfg = MemoryCachingConfig(window=4, segment=3, feature_dim=6, variant="gated", router="phi_mass")
    mod = make(cfg, hkv=HQ)
    with torch.no_grad():
        mod.log_tau.zero_()
    q, k, v, x = inputs(2, 23, hkv=HQ)
    t = q.shape[2]
    pos = torch.arange(t)
    s = (q @ k.transpose(-1, -2)) * mod.scale
    win = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 4)
    e = torch.exp(s).masked_fill(~win, 0.0)
    lin = (mod.phi_q(q) @ mod.phi_k(k).transpose(-1, -2)) * (pos[None, :] <= pos[:, None] - 4)
    lin = lin * torch.exp(mod.router_bias)[None, :, None, None]
    want = ((e + lin) @ v) / (e + lin).sum(-1, keepdim=True)
    assert maxdiff(mod(q, k, v, x), want) <= TOL


def test_phi_mass_router_differs_from_mean_key_and_has_no_router_query():
    q, k, v, x = inputs(2, 37)
    base = dict(window=5, segment=3, feature_dim=6, variant="sparse", top_k=2)
    a = make(MemoryCachingConfig(**base))
    b = make(MemoryCachingConfig(**base, router="phi_mass"))
    c = make(MemoryCachingConfig(**base, router="key_phi"))
    assert b.router_a is None and b.router_b is None and c.router_a is not None
    ya, yb, yc = a(q, k, v, x), b(q, k, v, x), c(q, k, v, x)
    assert min(maxdiff(ya, yb), maxdiff(ya, yc), maxdiff(yb, yc)) > 1e-6
    b.train()
    b(q, k, v, x).square().sum().backward()
    for name, p in b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cfg", [dict(router="softmax"), dict(router="phi_mass", variant="residual"),
                                 dict(router="key_phi", variant="residual"),
                                 dict(router="phi_window", variant="residual")])
def test_bad_router_names_the_option(cfg):
    with pytest.raises(ConfigError, match="'router'"):
        MemoryCachingConfig(window=4, segment=3, **cfg)


def test_phi_window_router_follows_the_window_logits_scale():
    """phi_window measures the memory against the window's top logit: scaling q (every logit) leaves the output of
    a one-token-window layer unchanged, where phi_mass's memory share moves with the window logit."""
    q, k, v, x = inputs(1, 20)
    base = dict(window=1, segment=3, feature_dim=6, variant="gated")
    win = make(MemoryCachingConfig(**base, router="phi_window"))
    mass = make(MemoryCachingConfig(**base, router="phi_mass"))
    for mod in (win, mass):
        with torch.no_grad():
            mod.phi_q.weight.zero_()  # phi_q(q) stops depending on q: only the logits' scale changes below
    hot = v.repeat_interleave(HQ // HKV, dim=1)  # window 1: the window-only output is the token's own value
    share = lambda mod, c: maxdiff(mod(q * c, k, v, x), hot)  # noqa: E731
    assert abs(share(win, 1.0) - share(win, 40.0)) < 1e-9 and share(win, 1.0) > 1e-3
    assert abs(share(mass, 1.0) - share(mass, 40.0)) > 1e-3
