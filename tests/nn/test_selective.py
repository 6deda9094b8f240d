"""SelectiveMemoryAttention: parallel form and recurrent step against the plain-python streaming reference, the
reductions (window only, all kept = full attention), the fixed state layout, and ONNX export of both forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memc.errors import ConfigError
from memc.nn.naive_selective import naive_selective
from memc.nn.selective import SelectiveConfig, SelectiveMemoryAttention
from memc.nn.selective_state import SelectiveState

HQ, HKV, D, HID = 4, 2, 8, 12
TOL = 1e-5


def make(cfg: SelectiveConfig, hkv: int = HKV, seed: int = 0) -> SelectiveMemoryAttention:
    torch.manual_seed(seed)
    return SelectiveMemoryAttention(cfg, num_heads=HQ, num_kv_heads=hkv, head_dim=D, hidden_size=HID).double().eval()


def inputs(batch: int, t: int, seed: int = 1, hkv: int = HKV, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(batch, HQ, t, D), r(batch, hkv, t, D), r(batch, hkv, t, D), r(batch, t, HID)


def run_steps(mod, q, k, v, x):
    state = mod.init_state(q.shape[0], dtype=q.dtype)
    ys = []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        y, state = mod.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], x[:, sl], state)
        ys.append(y)
    return torch.cat(ys, dim=2), state


def maxdiff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


CONFIGS = [
    SelectiveConfig(window=4, segment=3, keep=1),  # unbounded, one per segment
    SelectiveConfig(window=4, segment=3, keep=2, max_tokens=3),  # capped: eviction happens from 2 segments on
    SelectiveConfig(window=5, segment=4, max_tokens=5),  # every token a candidate, global top-5
    SelectiveConfig(window=3, segment=5, keep=2, max_tokens=1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"w{c.window}s{c.segment}k{c.keep}m{c.max_tokens}")
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_parallel_and_step_match_the_streaming_reference(cfg, hkv):
    mod = make(cfg, hkv=hkv)
    q, k, v, x = inputs(2, 31, hkv=hkv)  # 31: not a multiple of the segment
    ref = naive_selective(mod, q, k, v, x)
    assert maxdiff(mod(q, k, v, x), ref) <= TOL
    y, state = run_steps(mod, q, k, v, x)
    assert maxdiff(y, ref) <= TOL
    window_only = F.scaled_dot_product_attention(q, k, v, attn_mask=_band(31, cfg.window), enable_gqa=True)
    assert maxdiff(ref, window_only) > 1e-3  # the memory is read
    # the empty state is all zeros: a runtime knowing only shapes and dtypes makes it (memc.runtime.engine)
    assert not any(a.any() for a in mod.init_state(2, torch.float64).tensors())
    if cfg.max_tokens:  # fixed layout: nothing grew
        assert [s for _, s, _ in state.spec()] == [s for _, s, _ in mod.init_state(2, torch.float64).spec()]
        assert int((state.pool_pos > 0).sum(-1).max()) == cfg.max_tokens  # pool_pos: position + 1, 0 = empty


def _band(t: int, w: int) -> torch.Tensor:
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= i) & (i - j < w)


def test_keeping_every_token_is_full_attention_and_ablation_is_the_window():
    mod = make(SelectiveConfig(window=4, segment=3))
    q, k, v, x = inputs(2, 26)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert maxdiff(mod(q, k, v, x), full) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], full) <= TOL
    mod.memory_enabled = False
    band = F.scaled_dot_product_attention(q, k, v, attn_mask=_band(26, 4), enable_gqa=True)
    assert maxdiff(mod(q, k, v, x), band) <= TOL
    assert maxdiff(run_steps(mod, q, k, v, x)[0], band) <= TOL


def test_the_pool_keeps_the_highest_salience_tokens():
    mod = make(SelectiveConfig(window=2, segment=4, keep=1, max_tokens=2))
    x = torch.zeros(1, 20, HID, dtype=torch.float64)
    with torch.no_grad():  # salience = x[..., 0] for every head
        mod.scorer[0].weight.zero_(); mod.scorer[0].bias.zero_(); mod.scorer[0].weight[:, 0] = 1.0
        mod.scorer[2].weight.zero_(); mod.scorer[2].bias.zero_(); mod.scorer[2].weight[:, 0] = 1.0
    x[0, [1, 6, 9, 13], 0] = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    _, state = run_steps(mod, *inputs(1, 20)[:3], x)
    # segments 0..3 closed; 6 and 13 evicted / outranked (pool_pos is position + 1)
    assert sorted(p - 1 for p in state.pool_pos[0, 0].tolist()) == [1, 9]
    vis = mod.visible(mod.salience(x))[0, 0, 19]
    assert vis[[1, 9]].all() and not vis[[6, 13]].any()


def test_bad_options_name_the_option():
    for bad, name in ((dict(window=0, segment=2), "window"), (dict(window=2, segment=0), "segment"),
                      (dict(window=2, segment=3, keep=4), "keep"), (dict(window=2, segment=3, max_tokens=-1), "max_tokens")):
        with pytest.raises(ConfigError, match=name):
            SelectiveConfig(**bad)


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
        y, new = self.mod.step(q, k, v, x, SelectiveState.from_tensors(state))
        return (y, *new.tensors())


def test_parallel_form_exports_to_onnx_with_dynamic_length():
    from memc.codegen.onnx import lower_exported
    import onnxruntime as ort

    mod = make(SelectiveConfig(window=5, segment=3, keep=2, max_tokens=4)).float()
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


def test_step_exports_with_state_as_tensors_and_runs_in_onnxruntime():
    from memc.codegen.onnx import lower_exported
    import onnxruntime as ort

    mod = make(SelectiveConfig(window=4, segment=3, keep=2, max_tokens=3)).float()
    q, k, v, x = inputs(1, 20, dtype=torch.float32)
    state = mod.init_state(1)
    args = (q[:, :, :1], k[:, :, :1], v[:, :, :1], x[:, :1], *state.tensors())
    ep = torch.export.export(Step(mod), args, strict=False)
    names = ["q", "k", "v", "x", *SelectiveState.names()]
    model = lower_exported(ep, args, names, ["y", *(f"new_{n}" for n in SelectiveState.names())], {}, opset=23)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = mod(q, k, v, x).detach().numpy()
    flat = [a.numpy() for a in state.tensors()]
    for t in range(20):
        token = [a.numpy() for a in (q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], x[:, t:t + 1])]
        y, *flat = sess.run(None, dict(zip(names, token + flat)))
        assert np.abs(y - ref[:, :, t:t + 1]).max() <= 1e-4, t
