"""The engines benchmarks.decode runs in turns, behind one interface: ``prefill(ids) -> (last logits [1, V],
state)``, ``step(token, state) -> (logits, state)``, ``synth(length, prefilled)`` (a state of that context, for the
longer-context columns), ``state_bytes(state)``, ``name`` and ``disk`` (bytes on disk).

torch eager (transformers, DynamicCache), memc's DecodeEngine over a decode.onnx, and onnxruntime-genai (its model
builder's output, optionally run inside memc's denormal flush).
"""
from __future__ import annotations

import json
from pathlib import Path


class TorchEager:
    name = "torch eager (DynamicCache)"

    def __init__(self, model: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa",
                                                      local_files_only=True).eval()
        self.cfg = self.m.config
        self.disk = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))

    def prefill(self, ids):
        with self.torch.no_grad():
            out = self.m(input_ids=self.torch.from_numpy(ids), use_cache=True)
        return out.logits[:, -1].numpy(), out.cache

    def step(self, token, cache):
        with self.torch.no_grad():
            out = self.m(input_ids=self.torch.from_numpy(token.reshape(1, 1)), cache=cache, use_cache=True)
        return out.logits[:, -1].numpy(), out.cache

    def synth(self, length: int, _prefilled):
        from transformers import DynamicCache

        torch, c = self.torch, self.cfg
        gen = torch.Generator().manual_seed(length)
        cache = DynamicCache()
        shape = (1, c.num_key_value_heads, length, c.head_dim)
        for layer in range(c.num_hidden_layers):
            cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
        return cache

    def state_bytes(self, cache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class Memc:
    def __init__(self, artifact: str, name: str, segment: int | None = None):
        from memc.runtime.engine import DecodeEngine

        self.name = name
        self.e = DecodeEngine(artifact, threads=1)
        self.e.max_seq_len = None  # contexts beyond the trained positions: speed and state only
        self.disk = (Path(artifact) / "decode.onnx").stat().st_size
        self.segment = segment

    def prefill(self, ids):
        logits, state = self.e.prefill(ids)
        return logits[:, -1], state

    def step(self, token, state):
        logits, state = self.e.step(token.reshape(1), state)
        return logits[:, -1], state

    def synth(self, length: int, prefilled):
        import numpy as np

        rng = np.random.default_rng(length)
        if self.e.kv_layout is not None:
            return [rng.standard_normal((1, s.shape[1], length, s.shape[3])).astype(s.dtype) for s in self.e.state_specs]
        out = []
        for spec, array in zip(self.e.state_specs, prefilled):  # the prefilled state, counters set to `length`
            _, prefix, rest = spec.name.split("_", 2)  # past_mc_<field>_<layer> | past_sel_<field>_<layer>
            field, layer = rest.rsplit("_", 1)
            if field == "t":  # both layouts: tokens seen
                array = np.array(length, dtype=array.dtype)
            elif prefix == "mc":  # gated / sparse...: the open segment's fill and every cached-segment slot full
                window = next(a for s, a in zip(self.e.state_specs, prefilled) if s.name == f"past_mc_win_k_{layer}")
                closed = max(0, length - window.shape[2])
                if field == "open_n":
                    array = np.full_like(array, closed % self.segment)
                elif field == "slot_n":
                    array = np.full_like(array, self.segment)
                    array[..., 0] = max(self.segment,
                                        closed - closed % self.segment - self.segment * (array.shape[-1] - 1))
            # select (past_sel_*): the prefilled window, open segment and full pool stand for any later context;
            # a step's work (one softmax over window + segment + pool, the pool's close) does not depend on it
            out.append(array)
        return out

    def state_bytes(self, state) -> int:
        return self.e.state_bytes(state)


class Genai:
    def __init__(self, path: str, name: str):
        import onnxruntime_genai as og

        self.og, self.name, self.path = og, name, path
        self.m = og.Model(path)
        cfg = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        self.max_length = cfg["context_length"]
        d = cfg["decoder"]
        # its KV buffers are allocated for max_length (past_present_share_buffer)
        self.buffer = 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * self.max_length * d["head_size"] * 4
        self.disk = sum(p.stat().st_size for p in Path(path).glob("model.onnx*"))

    def prefill(self, ids):
        import numpy as np

        params = self.og.GeneratorParams(self.m)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        g = self.og.Generator(self.m, params)
        g.append_tokens(ids.astype(np.int32))
        return np.asarray(g.get_logits())[:, -1], g

    def step(self, token, g):  # genai picks the greedy token itself; `token` is only checked by the agreement
        g.generate_next_token()
        return None, g

    def tokens(self, g, prompt: int) -> list[int]:
        return [int(t) for t in g.get_sequence(0)[prompt:]]

    def state_bytes(self, g) -> int:
        return self.buffer


class GenaiFlushed(Genai):
    """The same genai model, each call inside memc's denormal flush (one thread: genai's session runs on the
    calling thread, so the scope covers its work)."""

    def prefill(self, ids):
        from memc.targets.float_env import flushed

        with flushed():
            return super().prefill(ids)

    def step(self, token, g):
        from memc.targets.float_env import flushed

        with flushed():
            return super().step(token, g)
