"""A small decode engine over memc's decode graph (``decode.onnx``): prefill, step and greedy generate.

The graph (memc.codegen.decode) takes ``input_ids [batch, seq]`` plus ``past_key_i`` / ``past_value_i``
``[batch, heads, past, head_dim]`` for every layer, and returns ``logits [batch, seq, vocab]`` plus
``present_key_i`` / ``present_value_i`` (past + seq long). The engine's *state* is the list of present arrays in
input order (key_0, value_0, key_1, ...); it is fed back as the next call's past. Prefill is the same graph with
zero-length past arrays.

numpy + onnxruntime only: a deployment process never imports torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from memc.targets.session import create_session

DECODE_FILE = "decode.onnx"
_STATE = re.compile(r"^past_(key|value)_(\d+)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

State = list  # list[np.ndarray]: present_key_0, present_value_0, ... fed back as past_key_0, past_value_0, ...


class DecodeStateError(ValueError):
    """Inputs or state that do not fit the decode graph (wrong count, shape, dtype or length)."""


@dataclass(frozen=True)
class StateSpec:
    """One state input of the graph: its name, static heads and head size, element type."""

    name: str
    heads: int
    head_dim: int
    dtype: type


class DecodeEngine:
    """Drive a decode graph with one onnxruntime session.

    ``path``: ``decode.onnx`` or a directory holding it. ``threads`` > 0 pins onnxruntime's intra-op threads.
    """

    def __init__(self, path: str | Path, threads: int = 0):
        path = Path(path)
        self.path = path / DECODE_FILE if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"no decode graph at {self.path}")
        self.session = create_session(self.path, threads)
        inputs = self.session.get_inputs()
        if not inputs or inputs[0].name != "input_ids":
            raise DecodeStateError(f"{self.path} is not a memc decode graph: its first input is not input_ids")
        specs = []
        for i, value in enumerate(inputs[1:]):
            layer, kind = divmod(i, 2)
            expected = f"past_{('key', 'value')[kind]}_{layer}"
            shape = value.shape
            if value.name != expected or len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise DecodeStateError(
                    f"{self.path}: input {i + 1} is {value.name} {shape}; a decode graph takes {expected} "
                    "[batch, heads, past, head_dim] with static heads and head_dim"
                )
            if value.type not in _ORT_DTYPES:
                raise DecodeStateError(f"{self.path}: state {value.name} has element type {value.type}, "
                                       f"which numpy cannot hold (supported: {sorted(_ORT_DTYPES)})")
            specs.append(StateSpec(value.name, shape[1], shape[3], _ORT_DTYPES[value.type]))
        if not specs or len(specs) % 2:
            raise DecodeStateError(f"{self.path}: expected past_key_i / past_value_i pairs after input_ids")
        self.state_specs: list[StateSpec] = specs
        self.output_names = ["logits", *(s.name.replace("past_", "present_", 1) for s in specs)]
        found = [o.name for o in self.session.get_outputs()]
        if found != self.output_names:
            raise DecodeStateError(f"{self.path}: outputs {found}; a decode graph returns {self.output_names}")
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab_size: int | None = vocab if isinstance(vocab, int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_seq_len: int | None = int(meta.get("memc.max_seq_len", "0")) or None

    @property
    def num_layers(self) -> int:
        return len(self.state_specs) // 2

    # -- state -----------------------------------------------------------------------------------------------------
    def empty_state(self, batch: int = 1) -> State:
        """Zero-length past arrays: the state before the first token."""
        return [np.zeros((batch, s.heads, 0, s.head_dim), dtype=s.dtype) for s in self.state_specs]

    def check_state(self, state: Sequence[np.ndarray], batch: int) -> int:
        """Validate ``state`` for a batch of ``batch`` rows; returns its past length."""
        if not isinstance(state, (list, tuple)):
            raise DecodeStateError(
                f"state must be the list of present arrays from the last call, got {type(state).__name__}"
            )
        if len(state) != len(self.state_specs):
            raise DecodeStateError(
                f"state has {len(state)} arrays; this decode graph takes {len(self.state_specs)} "
                f"(past_key_i and past_value_i for {self.num_layers} layers)"
            )
        past = None
        for i, (array, spec) in enumerate(zip(state, self.state_specs)):
            if not isinstance(array, np.ndarray):
                raise DecodeStateError(f"state[{i}] ({spec.name}) is a {type(array).__name__}, not a numpy array")
            if array.dtype != spec.dtype:
                raise DecodeStateError(
                    f"state[{i}] ({spec.name}) has dtype {array.dtype}; the graph takes {np.dtype(spec.dtype)}"
                )
            length = array.shape[2] if array.ndim == 4 else -1
            if past is None:
                past = length
            if array.ndim != 4 or array.shape != (batch, spec.heads, past, spec.head_dim):
                raise DecodeStateError(
                    f"state[{i}] ({spec.name}) has shape {tuple(array.shape)}; expected "
                    f"(batch={batch}, heads={spec.heads}, past={past}, head_dim={spec.head_dim}): every state array "
                    "must match the token batch and share one past length"
                )
        return int(past or 0)

    # -- running ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _ids(ids: np.ndarray | Sequence[int] | int, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise DecodeStateError(f"{what} must be integer token ids, got dtype {arr.dtype}")
        return arr.astype(np.int64, copy=False)

    def forward(self, input_ids: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, State]:
        """Run ``input_ids [batch, seq]`` after ``state``: logits [batch, seq, vocab] and the new state."""
        ids = self._ids(input_ids, "input_ids")
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise DecodeStateError(f"input_ids must have shape [batch, seq] with both >= 1, got {tuple(ids.shape)}")
        past = self.check_state(state, ids.shape[0])
        if self.max_seq_len is not None and past + ids.shape[1] > self.max_seq_len:
            raise DecodeStateError(
                f"past {past} + {ids.shape[1]} new token(s) exceeds the model's maximum sequence length "
                f"{self.max_seq_len}"
            )
        if self.vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DecodeStateError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        feeds = {"input_ids": ids}
        feeds.update((spec.name, array) for spec, array in zip(self.state_specs, state))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    def prefill(self, input_ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, State]:
        """Prompt ``[batch, seq]`` (or ``[seq]`` for one row) -> logits [batch, seq, vocab] and the state."""
        ids = self._ids(input_ids, "input_ids")
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        return self.forward(ids, self.empty_state(ids.shape[0] if ids.ndim else 1))

    def step(self, token: np.ndarray | Sequence[int] | int, state: Sequence[np.ndarray]) -> tuple[np.ndarray, State]:
        """One new token per row (an int, ``[batch]`` or ``[batch, 1]``) -> logits [batch, 1, vocab] and the state."""
        tok = self._ids(token, "token")
        if tok.ndim > 2 or (tok.ndim == 2 and tok.shape[1] != 1):
            raise DecodeStateError(
                f"step takes one token per row ([batch] or [batch, 1]), got shape {tuple(tok.shape)}"
            )
        return self.forward(tok.reshape(-1, 1), state)

    def generate(
        self, prompt_ids: np.ndarray | Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
    ) -> np.ndarray:
        """Greedy decoding: the prompt followed by up to ``max_new_tokens`` tokens (same rank as the prompt).

        With ``eos_token_id``, rows that produced it keep emitting it and generation stops once every row has.
        """
        prompt = self._ids(prompt_ids, "prompt_ids")
        ids = prompt.reshape(1, -1) if prompt.ndim == 1 else prompt
        out = [ids]
        if max_new_tokens > 0:
            logits, state = self.prefill(ids)
            done = np.zeros(ids.shape[0], dtype=bool)
            for i in range(max_new_tokens):
                token = logits[:, -1].argmax(-1).astype(np.int64)
                if eos_token_id is not None:
                    token = np.where(done, eos_token_id, token)
                    done |= token == eos_token_id
                out.append(token[:, None])
                if i + 1 == max_new_tokens or (eos_token_id is not None and done.all()):
                    break
                logits, state = self.step(token, state)
        result = np.concatenate(out, axis=1)
        return result[0] if prompt.ndim == 1 else result


def decode_logits(engine: DecodeEngine, input_ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of ``input_ids [batch, seq]`` through the engine: one prefill of the first ``prefill`` tokens, then
    one step per remaining token; concatenated to [batch, seq, vocab] (what a single full forward returns)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    logits, state = engine.prefill(ids[:, :prefill])
    parts = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, state = engine.step(ids[:, t], state)
        parts.append(logits)
    return np.concatenate(parts, axis=1)
