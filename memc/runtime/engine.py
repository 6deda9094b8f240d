"""A small decode engine over memc's decode graph (``decode.onnx``): prefill, step and generate.

The graph (memc.codegen.decode) takes ``input_ids [batch, seq]`` plus its state inputs ``past_*`` and returns
``logits [batch, seq, vocab]`` plus the matching ``present_*`` outputs, fed back as the next call's past. The state
layout (names, shapes with the symbolic dims ``batch`` and ``past``, dtypes) is read from the graph's
``memc.state`` metadata (the same list report.json records under ``target.decode.state``): KV caches
``past_key_i`` / ``past_value_i`` [batch, heads, past, head_dim] grow with the context; memory-caching states
``past_mc_<field>_i`` (``past_sel_<field>_i`` for the select variant; kind ``mc`` both) have fixed shapes. Prefill
is the same graph from the empty state (zero-length past axes, zeros elsewhere: every state layout's empty value);
a graph with a static seq of 1 (memory-caching sites) is fed a prompt token by token.

KV layouts (``memc.kv_cache`` metadata): ``concat`` graphs return grown presents; ``preallocated`` graphs
(onnxruntime GroupQueryAttention) take KV buffers of a capacity plus ``past_length`` and write the new tokens in
place. The engine hides the difference: a state's KV arrays are always [batch, heads, past, head_dim]; for a
preallocated graph they are views of buffers the engine owns, bound to the graph's inputs and outputs with
onnxruntime I/O binding, so a step copies one token's keys / values, not the cache. A buffer is reused only by
the state that reaches its end; stepping an older state again (branching) copies the buffer first, so every
state returned stays valid. A long one-row prompt runs in chunks (PREFILL_CHUNK). Every run flushes denormal floats
to zero on the calling thread and restores its float mode after (memc.targets.session / float_env).

numpy + onnxruntime only: a deployment process never imports torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from memc.runtime.kv_buffers import Buffers, Last
from memc.runtime.logit_slots import LogitSlots
from memc.targets.session import create_session

DECODE_FILE = "decode.onnx"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}

# A one-row prompt longer than this runs through a preallocated (GroupQueryAttention) graph in chunks of this many
# tokens, each attending to the cache the earlier ones wrote: onnxruntime's CPU GroupQueryAttention computes a
# prompt's whole [S, S] score matrix and then masks the upper half, so chunks skip most of that half. ref-llama,
# 990 tokens, one thread, AVX-512 Xeon: 10,245 tok/s in one call, 11,408 / 11,693 / 10,967 / 10,576 in chunks of
# 512 / 256 / 128 / 64 (torch eager 9,979); the logits are bit-identical. 0: one call.
PREFILL_CHUNK = 256

State = list  # list[np.ndarray]: the present arrays of the last call, in state order, fed back as the past


class DecodeStateError(ValueError):
    """Inputs or state that do not fit the decode graph (wrong count, shape, dtype or length)."""


@dataclass(frozen=True)
class StateSpec:
    """One state input of the graph: its name, shape (ints and the symbols ``batch`` / ``past``), element type."""

    name: str
    shape: tuple
    dtype: type
    kind: str = "kv"  # kv (grows along ``past``) | mc (fixed size)

    @property
    def output(self) -> str:
        return "present_" + self.name[len("past_"):]

    def nbytes(self, batch: int, past: int) -> int:
        """Bytes of this tensor for ``batch`` rows after ``past`` tokens (fixed for memory-caching state)."""
        sizes = [batch if d == "batch" else past if d == "past" else d for d in self.shape]
        return int(np.prod(sizes, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def empty(self, batch: int) -> np.ndarray:
        return np.zeros([batch if d == "batch" else 0 if d == "past" else d for d in self.shape], dtype=self.dtype)


def check_state(specs: Sequence[StateSpec], state: Sequence[np.ndarray], batch: int) -> int:
    """Validate ``state`` (arrays in the order of ``specs``) for a batch of ``batch`` rows; returns its past length (0
    without a KV cache). Shared by every engine over a state layout."""
    if not isinstance(state, (list, tuple)):
        raise DecodeStateError(
            f"state must be the list of present arrays from the last call, got {type(state).__name__}"
        )
    if len(state) != len(specs):
        raise DecodeStateError(
            f"state has {len(state)} arrays; this decode graph takes {len(specs)} "
            f"({', '.join(s.name for s in specs[:4])}, ...)"
        )
    past = None
    for i, (array, spec) in enumerate(zip(state, specs)):
        if not isinstance(array, np.ndarray):
            raise DecodeStateError(f"state[{i}] ({spec.name}) is a {type(array).__name__}, not a numpy array")
        if array.dtype != spec.dtype:
            raise DecodeStateError(
                f"state[{i}] ({spec.name}) has dtype {array.dtype}; the graph takes {np.dtype(spec.dtype)}"
            )
        if past is None and "past" in spec.shape and array.ndim == len(spec.shape):
            past = int(array.shape[spec.shape.index("past")])
        want = tuple(batch if d == "batch" else past if d == "past" else d for d in spec.shape)
        if array.shape != want:
            labels = ("batch", "heads", "past", "head_dim") if spec.kind == "kv" and len(want) == 4 else spec.shape
            names = ", ".join(f"{label}={size}" if isinstance(label, str) else str(size)
                              for label, size in zip(labels, want))
            raise DecodeStateError(
                f"state[{i}] ({spec.name}) has shape {tuple(array.shape)}; expected ({names}): every state "
                "array must match the token batch and share one past length"
            )
    return int(past or 0)


class DecodeEngine:
    """Drive a decode graph with one onnxruntime session.

    ``path``: ``decode.onnx`` or a directory holding it. ``threads`` > 0 pins onnxruntime's intra-op threads.
    """

    def __init__(self, path: str | Path, threads: int = 0, prefill_chunk: int = PREFILL_CHUNK):
        path = Path(path)
        self.prefill_chunk = prefill_chunk
        self.path = path / DECODE_FILE if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"no decode graph at {self.path}")
        self.session = create_session(self.path, threads)
        inputs = self.session.get_inputs()
        if not inputs or inputs[0].name != "input_ids":
            raise DecodeStateError(f"{self.path} is not a memc decode graph: its first input is not input_ids")
        meta = self.session.get_modelmeta().custom_metadata_map
        kv = json.loads(meta["memc.kv_cache"]) if meta.get("memc.kv_cache") else {}
        self.kv_layout: str | None = kv.get("layout")
        self.length_input: str | None = kv.get("length_input") if self.kv_layout == "preallocated" else None
        if self.length_input:
            if len(inputs) < 2 or inputs[1].name != self.length_input:
                raise DecodeStateError(f"{self.path}: memc.kv_cache names the length input {self.length_input!r}, "
                                       "which is not the graph's second input")
            inputs = [inputs[0], *inputs[2:]]
        specs = self._specs(meta.get("memc.state"), inputs[1:])
        if not specs:
            raise DecodeStateError(f"{self.path} is not a memc decode graph: it has no state inputs after input_ids")
        self.state_specs: list[StateSpec] = specs
        self.output_names = ["logits", *(s.output for s in specs)]
        found = [o.name for o in self.session.get_outputs()]
        if found != self.output_names:
            raise DecodeStateError(f"{self.path}: outputs {found}; a decode graph returns {self.output_names}")
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab_size: int | None = vocab if isinstance(vocab, int) else None
        self._logits_dtype = _ORT_DTYPES.get(self.session.get_outputs()[0].type, np.float32)
        seq = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
        self.single_token = seq == 1
        has_past = any("past" in s.shape for s in specs)
        if self.kv_layout is None and has_past:
            self.kv_layout = "concat"
        # bounded-state graphs have no context limit of their own
        self.max_seq_len: int | None = (int(meta.get("memc.max_seq_len", "0")) or None) if has_past else None
        # a hard limit, unlike max_seq_len (which speed runs lift): attention's rotary table has this many positions
        self.max_positions: int | None = int(kv.get("rotary_positions") or 0) or None
        self._buffers = Buffers()
        self._io = self.session.io_binding() if self.length_input else None
        self._bound: dict[tuple[str, bool], np.ndarray] = {}
        self._io_shape: tuple[int, int] | None = None
        self._io_cache: tuple = ()
        self._logit_slots = LogitSlots(self._logits_dtype)
        self._last: Last | None = None
        self._all_kv = all(s.kind == "kv" for s in self.state_specs)

    def _specs(self, recorded: str | None, inputs: list) -> list[StateSpec]:
        """The state layout from the graph's metadata, checked against its inputs (or read from the inputs)."""
        specs = []
        layout = json.loads(recorded) if recorded else None
        if layout is not None and len(layout) != len(inputs):
            raise DecodeStateError(f"{self.path}: memc.state lists {len(layout)} tensors, the graph takes "
                                   f"{len(inputs)} state inputs")
        for i, value in enumerate(inputs):
            if value.type not in _ORT_DTYPES:
                raise DecodeStateError(f"{self.path}: state {value.name} has element type {value.type}, "
                                       f"which numpy cannot hold (supported: {sorted(_ORT_DTYPES)})")
            if layout is not None:
                entry = layout[i]
                # a preallocated buffer's capacity axis is the state's past axis: the engine passes views
                shape = tuple("past" if d == "capacity" else d for d in entry["shape"])
                if entry["name"] != value.name or len(shape) != len(value.shape) or np.dtype(entry["dtype"]) != \
                        np.dtype(_ORT_DTYPES[value.type]):
                    raise DecodeStateError(f"{self.path}: input {i + 1} is {value.name} {value.shape} "
                                           f"{value.type}; memc.state records {entry}")
                specs.append(StateSpec(value.name, shape, _ORT_DTYPES[value.type], entry.get("kind", "kv")))
                continue
            shape = tuple(d if isinstance(d, int) else ("batch" if a == 0 else "past") for a, d in enumerate(value.shape))
            if not value.name.startswith("past_"):
                raise DecodeStateError(f"{self.path}: state input {value.name} does not start with past_")
            specs.append(StateSpec(value.name, shape, _ORT_DTYPES[value.type]))
        return specs

    @property
    def num_layers(self) -> int:
        return len({s.name.rsplit("_", 1)[-1] for s in self.state_specs})

    # -- state -----------------------------------------------------------------------------------------------------
    def empty_state(self, batch: int = 1) -> State:
        """The state before the first token: zero-length past axes, zeros elsewhere."""
        return [s.empty(batch) for s in self.state_specs]

    def state_bytes(self, state: Sequence[np.ndarray]) -> int:
        return int(sum(a.nbytes for a in state))

    def state_bytes_at(self, context: int, batch: int = 1) -> int:
        """The state's bytes after ``context`` tokens, from the layout alone (KV grows, memory-caching is fixed)."""
        return sum(s.nbytes(batch, context) for s in self.state_specs)

    @property
    def bounded_state(self) -> bool:
        """True when no state tensor grows with the context (every site memory-caching with a capped state)."""
        return not any("past" in s.shape for s in self.state_specs)

    def check_state(self, state: Sequence[np.ndarray], batch: int) -> int:
        """Validate ``state`` for a batch of ``batch`` rows; returns its past length (0 without a KV cache)."""
        return check_state(self.state_specs, state, batch)

    # -- running ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _ids(ids: np.ndarray | Sequence[int] | int, what: str) -> np.ndarray:
        if type(ids) is np.ndarray and ids.dtype == np.int64:  # the common case, cheaply
            return ids
        arr = np.asarray(ids)
        if not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise DecodeStateError(f"{what} must be integer token ids, got dtype {arr.dtype}")
        return arr.astype(np.int64, copy=False)

    def forward(self, input_ids: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, State]:
        """Run ``input_ids [batch, seq]`` after ``state``: logits [batch, seq, vocab] and the new state."""
        ids = self._ids(input_ids, "input_ids")
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise DecodeStateError(f"input_ids must have shape [batch, seq] with both >= 1, got {tuple(ids.shape)}")
        last = self._last if self._last is not None and self._last.is_(state, ids.shape[0]) else None
        past = last.past if last is not None else self.check_state(state, ids.shape[0])
        if self.max_seq_len is not None and past + ids.shape[1] > self.max_seq_len:
            raise DecodeStateError(
                f"past {past} + {ids.shape[1]} new token(s) exceeds the model's maximum sequence length "
                f"{self.max_seq_len}"
            )
        if self.max_positions is not None and past + ids.shape[1] > self.max_positions:
            raise DecodeStateError(
                f"past {past} + {ids.shape[1]} new token(s) exceeds the {self.max_positions} positions of this "
                "decode graph's rotary table (memc.kv_cache rotary_positions)"
            )
        if self.vocab_size is not None and ids.size and not self._ids_in_vocab(ids):
            raise DecodeStateError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        # a one-token graph, or GroupQueryAttention continuing a batch > 1 cache: the sequence goes token by token;
        # a long one-row prompt through GroupQueryAttention goes in chunks (PREFILL_CHUNK)
        by_token = self.single_token or (self.length_input is not None and ids.shape[0] > 1 and past > 0)
        if by_token and ids.shape[1] > 1:
            return self._in_pieces(ids, state, past, last, 1)
        chunk = self.prefill_chunk
        if self.length_input is not None and ids.shape[0] == 1 and 0 < chunk < ids.shape[1]:
            return self._in_pieces(ids, state, past, last, chunk)
        return self._run(ids, state, past, last)

    def _in_pieces(self, ids: np.ndarray, state: Sequence[np.ndarray], past: int, last: Last | None,
                   size: int) -> tuple[np.ndarray, State]:
        """A sequence in pieces of ``size`` tokens, each continuing the last one's state. The logits go into one
        array: a piece of several tokens (one row) has onnxruntime write its rows there directly."""
        batch, seq = ids.shape
        logits = np.empty((batch, seq, self.vocab_size), self._logits_dtype) if self.vocab_size else None
        for start in range(0, seq, size):
            piece = ids[:, start:start + size]
            rows = None if logits is None else logits[:, start:start + piece.shape[1]]
            out, state = self._run(piece, state, past + start, last, rows if piece.shape[1] > 1 else None)
            if logits is None:  # a graph of dynamic vocabulary: known from the first piece
                logits = np.empty((batch, seq, out.shape[2]), out.dtype)
                rows = logits[:, start:start + piece.shape[1]]
            if rows is not out:
                rows[...] = out
            last = self._last if self._last is not None and self._last.state is state else None
        return logits, state

    def _ids_in_vocab(self, ids: np.ndarray) -> bool:
        if ids.size == 1:  # a decode step: two numpy reductions cost more than the rest of the check
            return 0 <= int(ids.reshape(-1)[0]) < self.vocab_size
        return bool(ids.min() >= 0 and ids.max() < self.vocab_size)

    def _run(self, ids: np.ndarray, state: Sequence[np.ndarray], past: int, last: Last | None,
             logits_out: np.ndarray | None = None) -> tuple[np.ndarray, State]:
        """``last``: the engine's last state when ``state`` is it (checked when it was made; not checked again).
        ``logits_out``: where a preallocated graph writes the logits of a call of more than one token."""
        if self.length_input:
            if last is not None and self._all_kv and last.buffers and last.capacity >= past + ids.shape[1]:
                return self._continue_in_place(ids, last, logits_out)
            return self._run_in_place(ids, state, past, last, logits_out)
        feeds = {"input_ids": ids}
        feeds.update((spec.name, array) for spec, array in zip(self.state_specs, state))
        logits, *present = self.session.run(self.output_names, feeds)
        if self.kv_layout is not None:
            self._last = Last(present, tuple(present), ids.shape[0], past + ids.shape[1])
        return logits, present

    def _bind(self, name: str, array: np.ndarray, output: bool) -> None:
        """Bind ``array``'s memory to an input or output; skipped when that very array is bound already (the KV
        buffers and the persistent token / length / logits arrays of a decode loop: rebinding costs more than a
        small model's layer)."""
        if self._bound.get((name, output)) is array:
            return
        bind = self._io.bind_output if output else self._io.bind_input
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self._bound[(name, output)] = array

    def _io_arrays(self, batch: int, seq: int,
                   logits_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """input_ids, past_length and logits arrays for a call of this shape, reused from the last such call; the
        logits of a call of more than one token are ``logits_out`` or a new array every time (returned as they
        are, see _out)."""
        fresh = self._io_shape != (batch, seq)
        if fresh or (seq > 1 and self.vocab_size):
            if not self.vocab_size:
                logits = None
            elif seq > 1 and logits_out is not None:
                logits = logits_out
            else:
                logits = np.empty((batch, seq, self.vocab_size), self._logits_dtype)
            ids_in, length = (np.empty((batch, seq), np.int64), np.zeros((), np.int64)) if fresh else self._io_cache[:2]
            self._io_cache = (ids_in, length, logits)
            self._io_shape = (batch, seq)
        return self._io_cache

    def _out(self, logits: np.ndarray) -> np.ndarray:
        """What a call returns of its bound logits: a step's are copied into a slot of their own (the array is
        bound again for the next step; memc.runtime.logit_slots); a prompt's (seq > 1: e.g. 16 MB for ref-llama
        at 1k tokens) are not, as their array is used once, so a prefill does not stream them through the caches
        a second time."""
        if logits.shape[1] > 1:
            return logits
        out = self._logit_slots.take(logits.shape[0], logits.shape[2])
        np.copyto(out, logits)
        return out

    def _loop_step(self, token: np.ndarray, last: Last) -> tuple[np.ndarray, State] | None:
        """step() in a decode loop: ``token`` [batch] int64 after the engine's own last state, whose buffers (and
        the token / length / logits arrays of a one-token call) are bound already. None when anything is not so
        (the general path then checks, binds, or says what is wrong)."""
        n = last.past + 1
        if n > last.capacity or (self.max_seq_len is not None and n > self.max_seq_len) or not self._all_kv \
                or (self.max_positions is not None and n > self.max_positions) \
                or self._io_shape != (last.batch, 1) or not last.is_(last.state, last.batch) \
                or self.vocab_size is None or not self._ids_in_vocab(token):
            return None
        ids_in, length, logits = self._io_cache
        if logits is None:
            return None
        ids_in[:, 0] = token
        length[...] = last.past
        return self._run_bound(last, last.batch, 1, logits)

    def _continue_in_place(self, ids: np.ndarray, last: Last,
                           logits_out: np.ndarray | None = None) -> tuple[np.ndarray, State]:
        """The decode loop's path: the last state's buffers are bound already and have room; only the token, the
        length and the new views change (what a step costs in Python matters next to a small model's layers)."""
        batch, seq = ids.shape
        ids_in, length, logits = self._io_arrays(batch, seq, logits_out)
        ids_in[...] = ids
        length[...] = last.past
        self._bind("input_ids", ids_in, False)
        self._bind(self.length_input, length, False)
        if logits is None:
            return self._run_in_place(ids, last.state, last.past, last, logits_out)
        self._bind("logits", logits, True)
        return self._run_bound(last, batch, seq, logits)

    def _run_bound(self, last: Last, batch: int, seq: int, logits: np.ndarray) -> tuple[np.ndarray, State]:
        """Run with everything bound (``last``'s buffers, the ids, the length and ``logits``); the new last state
        is views of the same buffers, ``seq`` positions longer."""
        self.session.run_with_iobinding(self._io)
        n = last.past + seq
        new_state = [b[:, :, :n] for b in last.buffers]
        views = tuple(new_state)
        self._last = Last(new_state, views, batch, n, last.buffers, views, last.capacity)
        return self._out(logits), new_state

    def _run_in_place(self, ids: np.ndarray, state: Sequence[np.ndarray], past: int, last: Last | None,
                      logits_out: np.ndarray | None = None) -> tuple[np.ndarray, State]:
        """A preallocated graph through I/O binding: KV buffers are the past inputs and the present outputs."""
        batch, seq = ids.shape
        old, self._last = self._last, None  # the bindings change: no state is "bound already" until the run is over
        ids_in, length, logits = self._io_arrays(batch, seq, logits_out)
        ids_in[...] = ids
        length[...] = past
        self._bind("input_ids", ids_in, False)
        self._bind(self.length_input, length, False)
        if logits is not None:
            self._bind("logits", logits, True)
        else:  # onnxruntime allocates it
            self._io.bind_output("logits", "cpu")
            self._bound.pop(("logits", True), None)
        new_state: State = []
        buffers = []
        keep = []  # alive until the run is over
        for spec, array in zip(self.state_specs, state):
            if spec.kind == "kv":
                buf = self._buffers.buffer_for(array, past + seq, self.max_seq_len, old)
                self._bind(spec.name, buf, False)
                self._bind(spec.output, buf, True)
                buffers.append(buf)
                new_state.append(buf[:, :, :past + seq])
            else:
                array = array if array.flags.c_contiguous else array.copy()  # (ascontiguousarray makes 0-d 1-d)
                out = np.empty_like(array)
                keep += [array, out]
                self._bind(spec.name, array, False)
                self._bind(spec.output, out, True)
                new_state.append(out)
        self.session.run_with_iobinding(self._io)
        buffers = tuple(buffers)
        self._buffers.leave(old, buffers)
        views = tuple(a for a, s in zip(new_state, self.state_specs) if s.kind == "kv")
        self._last = Last(new_state, tuple(new_state), batch, past + seq, buffers, views)
        out = self._io.get_outputs()[0].numpy() if logits is None else self._out(logits)
        del keep
        return out, new_state

    def prefill(self, input_ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, State]:
        """Prompt ``[batch, seq]`` (or ``[seq]`` for one row) -> logits [batch, seq, vocab] and the state."""
        ids = self._ids(input_ids, "input_ids")
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        return self.forward(ids, self.empty_state(ids.shape[0] if ids.ndim else 1))

    def step(self, token: np.ndarray | Sequence[int] | int, state: Sequence[np.ndarray]) -> tuple[np.ndarray, State]:
        """One new token per row (an int, ``[batch]`` or ``[batch, 1]``) -> logits [batch, 1, vocab] and the state."""
        last = self._last
        if last is not None and state is last.state and last.buffers and type(token) is np.ndarray \
                and token.dtype == np.int64 and token.shape == (last.batch,):
            done = self._loop_step(token, last)
            if done is not None:
                return done
        tok = self._ids(token, "token")
        if tok.ndim > 2 or (tok.ndim == 2 and tok.shape[1] != 1):
            raise DecodeStateError(
                f"step takes one token per row ([batch] or [batch, 1]), got shape {tuple(tok.shape)}"
            )
        return self.forward(tok.reshape(-1, 1), state)

    def generate(
        self,
        prompt_ids: np.ndarray | Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = 0,
        stop_ids: Sequence[int] = (),
    ) -> np.ndarray:
        """The prompt followed by up to ``max_new_tokens`` tokens (same rank as the prompt): greedy at
        ``temperature`` 0, else sampled (top-k, top-p, ``seed``; memc.runtime.sampling).

        Rows that produced ``eos_token_id`` or one of ``stop_ids`` keep emitting it and generation stops once every
        row has; it also stops at the model's context limit. memc.runtime.generate.Generation streams the same loop
        and records its timings.
        """
        from memc.runtime.generate import Generation
        from memc.runtime.sampling import SamplingConfig

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise DecodeStateError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        if max_new_tokens == 0:
            return self._ids(prompt_ids, "prompt_ids")
        stops = [*stop_ids, *([] if eos_token_id is None else [eos_token_id])]
        return Generation(self, prompt_ids, max_new_tokens, sampling, stops).run()


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
