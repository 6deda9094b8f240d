"""ExpertCacheEngine: an MoE model with C experts per layer in fast slots, the others loaded on demand.

Runs an artifact's ``expert_cache/`` (memc.codegen.expert_cache): segment graphs cut at every MoE router, one
experts graph per MoE layer that reads its experts from slot buffers ``[C, ...]``, and ``experts.bin``, one
contiguous record per (layer, expert), memory-mapped. Per call and MoE layer the host reads the router's top-k ids
from the segment, splits the tokens into groups whose experts fit in the C slots together (memc.runtime.
expert_slots.token_groups; a decode step is one group), makes each group's experts resident (LRU: a miss copies
the record from the store into the least recently used slot no token of the group needs), maps ids to slots and
runs the experts graph on the group's rows. Every token's output is what the full model computes, for any C >= k.

The state (KV caches) and the prefill / step / generate interface are those of memc.runtime.DecodeEngine, so
memc.runtime.generate.Generation and ``memc generate`` drive either. numpy + onnxruntime only (no torch).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memc.runtime.engine import DecodeStateError, StateSpec, check_state
from memc.runtime.expert_slots import SlotCache, token_groups
from memc.targets.session import create_session

DIR = "expert_cache"
MANIFEST = "expert_cache.json"
FORMAT = "memc.expert_cache/1"


@dataclass
class _Layer:
    """One MoE layer: its experts graph, slot buffers, store views and slot cache."""

    session: Any
    inputs: list[dict]
    rows: list[str]  # segment outputs the experts graph reads, per row input
    ids: str
    out: str
    store: list[np.ndarray]  # per expert tensor: [E, ...] view of the memory-mapped store
    buffers: list[np.ndarray]  # per expert tensor: [C, ...] slot buffer
    cache: SlotCache
    load_seconds: float = 0.0

    def __post_init__(self) -> None:
        by_role = lambda role: [s["name"] for s in self.inputs if s["role"] == role]  # noqa: E731
        self.row_inputs, self.slots_input = by_role("rows"), by_role("slots")[0]
        self.ids_input = (by_role("ids") or [None])[0]
        self.weight_feeds = dict(zip(by_role("weight"), self.buffers))

    def load(self, loads: list[tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        for expert, slot in loads:
            for store, buf in zip(self.store, self.buffers):
                buf[slot] = store[expert]
        self.load_seconds += time.perf_counter() - t0


class ExpertCacheEngine:
    """Drive an expert-cache artifact. ``path``: the artifact directory (or its ``expert_cache/``); ``slots``
    overrides the compiled slot count (k..E); ``threads`` > 0 pins onnxruntime's intra-op threads; ``trace``
    records every call's top-k ids per layer (``self.trace``) for offline replacement studies."""

    def __init__(self, path: str | Path, threads: int = 0, slots: int | None = None, trace: bool = False):
        path = Path(path)
        root = path if (path / MANIFEST).is_file() else path / DIR
        file = root / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"no expert cache at {path} (no {DIR}/{MANIFEST})")
        manifest = json.loads(file.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise DecodeStateError(f"{file}: format {manifest.get('format')!r}; this memc reads {FORMAT!r}")
        self.root, self.manifest = root, manifest
        self.slots = int(slots if slots is not None else manifest["slots"])
        self.vocab_size: int | None = manifest.get("vocab_size") or None
        self.max_seq_len: int | None = manifest.get("max_seq_len") or None
        self.state_specs = [StateSpec(s["name"], tuple("past" if d == "capacity" else d for d in s["shape"]),
                                      np.dtype(s["dtype"]).type, s.get("kind", "kv")) for s in manifest["state"]]
        self.output_names = manifest["outputs"]
        self._presents = [s.output for s in self.state_specs]
        self.segments = [(create_session(root / s["file"], threads), s["inputs"], s["outputs"])
                         for s in manifest["segments"]]
        store = manifest["store"]
        self._mmap = np.memmap(root / store["file"], dtype=np.uint8, mode="r")
        self.layers: list[_Layer] = []
        for entry, layer in zip(manifest["experts"], store["layers"]):
            experts, k = int(layer["experts"]), int(layer["top_k"])
            if not k <= self.slots <= experts:
                raise DecodeStateError(f"slots must be in {k}..{experts} for MoE layer {layer['layer']} "
                                       f"({layer['site']}: {experts} experts, top-{k}), got {self.slots}")
            views, buffers = [], []
            for t in layer["tensors"]:
                dtype = np.dtype(t["dtype"])
                shape = [int(d) for d in t["shape"]]
                inner = np.empty(shape, dtype).strides
                views.append(np.ndarray((experts, *shape), dtype, buffer=self._mmap,
                                        offset=int(layer["offset"]) + int(t["offset"]),
                                        strides=(int(layer["record_bytes"]), *inner)))
                buffers.append(np.zeros((self.slots, *shape), dtype))
            self.layers.append(_Layer(create_session(root / entry["file"], threads), entry["inputs"], entry["rows"],
                                      entry["ids"], entry["out"], views, buffers, SlotCache(self.slots, experts)))
        self.trace: list[list[np.ndarray]] | None = [[] for _ in self.layers] if trace else None
        self.single_token = False
        self.bounded_state = False

    # -- facts -----------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def empty_state(self, batch: int = 1) -> list[np.ndarray]:
        return [s.empty(batch) for s in self.state_specs]

    def state_bytes(self, state: Sequence[np.ndarray]) -> int:
        return int(sum(a.nbytes for a in state))

    def state_bytes_at(self, context: int, batch: int = 1) -> int:
        return sum(s.nbytes(batch, context) for s in self.state_specs)

    def reset_stats(self) -> None:
        for layer in self.layers:
            layer.cache.stats = type(layer.cache.stats)()
            layer.load_seconds = 0.0

    def stats(self) -> dict[str, Any]:
        """Hit rate per layer (requests: distinct experts per token group; a decode step is one group), loads, and
        bytes: slot buffers + segment weights resident, against every expert resident."""
        per = [{"layer": i, **l.cache.stats.as_dict(), "load_ms": 1e3 * l.load_seconds} for i, l in enumerate(self.layers)]
        requests = sum(p["requests"] for p in per)
        hits = sum(p["hits"] for p in per)
        segment_bytes = sum(s["weight_bytes"] for s in self.manifest["segments"])
        slot_bytes = sum(b.nbytes for l in self.layers for b in l.buffers)
        all_experts = sum(v.nbytes // v.shape[0] * v.shape[0] for l in self.layers for v in l.store)
        return {
            "slots": self.slots, "layers": per, "hit_rate": hits / requests if requests else None,
            "requests": requests, "loads": sum(p["loads"] for p in per),
            "bytes_resident": segment_bytes + slot_bytes, "bytes_full": segment_bytes + all_experts,
            "slot_bytes": slot_bytes, "segment_bytes": segment_bytes,
        }

    # -- running ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _ids(ids: Any, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise DecodeStateError(f"{what} must be integer token ids, got dtype {arr.dtype}")
        return arr.astype(np.int64, copy=False)

    def _experts(self, i: int, env: dict[str, np.ndarray]) -> np.ndarray:
        layer = self.layers[i]
        ids = env[layer.ids]
        if self.trace is not None:
            self.trace[i].append(ids.copy())
        rows = [env[r] for r in layer.rows]
        groups = token_groups(ids, self.slots, layer.cache.resident)
        out = None
        for group in groups:
            sub = ids if len(groups) == 1 else ids[group]
            needed = list(dict.fromkeys(int(e) for e in sub.reshape(-1)))
            layer.load(layer.cache.admit(needed))
            feeds = dict(layer.weight_feeds)
            feeds[layer.slots_input] = layer.cache.lookup()[sub]
            if layer.ids_input:
                feeds[layer.ids_input] = sub
            for name, value in zip(layer.row_inputs, rows):
                feeds[name] = value if len(groups) == 1 else value[group]
            (y,) = layer.session.run(None, feeds)
            if len(groups) == 1:
                return y
            if out is None:
                out = np.empty((ids.shape[0], *y.shape[1:]), y.dtype)
            out[group] = y
        return out

    def forward(self, input_ids: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``input_ids [batch, seq]`` after ``state`` -> logits [batch, seq, vocab] and the new state."""
        ids = self._ids(input_ids, "input_ids")
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise DecodeStateError(f"input_ids must have shape [batch, seq] with both >= 1, got {tuple(ids.shape)}")
        past = check_state(self.state_specs, state, ids.shape[0])
        if self.max_seq_len is not None and past + ids.shape[1] > self.max_seq_len:
            raise DecodeStateError(f"past {past} + {ids.shape[1]} new token(s) exceeds the model's maximum sequence "
                                   f"length {self.max_seq_len}")
        if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DecodeStateError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        env: dict[str, np.ndarray] = {"input_ids": ids}
        env.update((s.name, a) for s, a in zip(self.state_specs, state))
        for s, (session, inputs, outputs) in enumerate(self.segments):
            values = session.run(outputs, {n: env[n] for n in inputs})
            env.update(zip(outputs, values))
            if s < len(self.layers):
                env[self.layers[s].out] = self._experts(s, env)
        logits = env[self.output_names[0]]
        return logits, [env[name] for name in self._presents]

    def prefill(self, input_ids: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        ids = self._ids(input_ids, "input_ids")
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        return self.forward(ids, self.empty_state(ids.shape[0]))

    def step(self, token: Any, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        tok = self._ids(token, "token")
        if tok.ndim > 2 or (tok.ndim == 2 and tok.shape[1] != 1):
            raise DecodeStateError(f"step takes one token per row ([batch] or [batch, 1]), got shape {tuple(tok.shape)}")
        return self.forward(tok.reshape(-1, 1), state)

    def generate(self, prompt_ids: Any, max_new_tokens: int, eos_token_id: int | None = None, **sampling: Any
                 ) -> np.ndarray:
        """As DecodeEngine.generate (greedy at temperature 0, else sampled)."""
        from memc.runtime.generate import Generation
        from memc.runtime.sampling import SamplingConfig

        if max_new_tokens == 0:
            return self._ids(prompt_ids, "prompt_ids")
        stops = [*sampling.pop("stop_ids", ()), *([] if eos_token_id is None else [eos_token_id])]
        return Generation(self, prompt_ids, max_new_tokens, SamplingConfig(**sampling), stops).run()


def has_expert_cache(path: str | Path) -> bool:
    path = Path(path)
    return (path / DIR / MANIFEST).is_file() or (path / MANIFEST).is_file()
