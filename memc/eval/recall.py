"""Long-range recall probe: a key -> value pair is planted in real text and queried ``distance`` tokens later.

Each trial is one window of ``context`` tokens: filler text, the line ``<key> = '<value>'``, ``distance`` tokens
of filler, then ``<key> = '`` and the value again. The score is teacher-forced: the fraction of value tokens the
model predicts (argmax) correctly at the query, and the fraction of values it gets entirely right. A control run
plants a *different* key, so the value cannot be recalled: its accuracy is the model's prior (about 1/26 for a
byte-level model), and the gap between the two is what recall adds. Pieces are encoded separately with the
model's codec (raw bytes, or its tokenizer), so distances and positions are exact in tokens; for a byte-level
model a token is a byte.
"""
from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from memc.errors import MemcError
from memc.eval.backends import Backend
from memc.eval.perplexity import check_context
from memc.eval.text import encode_bytes

VALUE_LEN = 6
KEY_LEN = 7  # "k_" + 5 letters
# bytes of a trial that are not filler: the planted line, the query and the value with its closing quote. A
# token spans at least one byte, so this bounds the token count too.
OVERHEAD = (1 + KEY_LEN + 4 + VALUE_LEN + 2) + (1 + KEY_LEN + 4) + (VALUE_LEN + 1)

Encode = Callable[[bytes], np.ndarray]


def check_distances(distances: list[int], context: int) -> None:
    """Fail before any model work when a distance cannot fit one window."""
    too_far = [d for d in distances if d > context - OVERHEAD]
    if too_far:
        raise MemcError(
            f"recall distance(s) {too_far} do not fit in a context of {context} tokens "
            f"(the longest is {context - OVERHEAD})"
        )


@dataclass
class RecallPoint:
    distance: int
    trials: int
    token_accuracy: float
    exact: float
    control_token_accuracy: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Trial:
    ids: np.ndarray  # (context,) int64
    first: int  # position of the value's first token
    value_tokens: int


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=n))


@dataclass(frozen=True)
class Pair:
    """One key -> value pair, each piece encoded on its own: the planted line ``\\n<key> = '<value>'\\n``, the
    query ``\\n<key> = '`` and the answer (the value, then the closing quote). A control pair plants a different
    key with a different value, so its answer cannot be recalled."""

    plant: np.ndarray
    query: np.ndarray
    value: np.ndarray
    quote: np.ndarray

    @property
    def answer(self) -> np.ndarray:
        return np.concatenate([self.value, self.quote])


def make_pair(rng: np.random.Generator, encode: Encode, control: bool = False) -> Pair:
    """A random pair in the probe's format (the recall probe and recall training both draw theirs here)."""
    key, value = "k_" + _word(rng, 5), _word(rng, VALUE_LEN)
    planted_key = "k_" + _word(rng, 5) if control else key
    plant = encode(f"\n{planted_key} = '{value if not control else _word(rng, VALUE_LEN)}'\n".encode())
    return Pair(plant, encode(f"\n{key} = '".encode()), encode(value.encode()), encode(b"'"))


def splice(filler: np.ndarray, inserts: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """`filler` with each piece inserted before filler token `at` (offsets ascending): pieces never cut a filler
    token, and the tokens between two pieces are exactly the filler between their offsets."""
    parts, last = [], 0
    for at, piece in inserts:
        parts += [filler[last:at], piece]
        last = at
    parts.append(filler[last:])
    return np.concatenate(parts).astype(np.int64)


def _trial(
    filler: np.ndarray, rng: np.random.Generator, distance: int, context: int, control: bool, encode: Encode
) -> Trial:
    pair = make_pair(rng, encode, control)
    prefix_len = context - len(pair.plant) - distance - len(pair.query) - len(pair.answer)
    if prefix_len < 0:
        raise MemcError(f"recall distance {distance} does not fit in a context of {context} tokens")
    start = int(rng.integers(0, len(filler) - prefix_len - distance))
    window = filler[start : start + prefix_len + distance]
    ids = splice(window, [(prefix_len, pair.plant), (prefix_len + distance, np.concatenate([pair.query, pair.answer]))])
    return Trial(ids, context - len(pair.answer), len(pair.value))


def _score(backend: Backend, trials: list[Trial]) -> tuple[float, float]:
    """(fraction of value tokens predicted, fraction of values entirely predicted), one batch for all trials."""
    logits = backend.forward({"input_ids": np.stack([t.ids for t in trials])})
    hits, exact = 0, 0
    for row, t in zip(logits, trials):
        pred = row[t.first - 1 : t.first - 1 + t.value_tokens].argmax(-1)
        right = pred == t.ids[t.first : t.first + t.value_tokens]
        hits += int(right.sum())
        exact += bool(right.all())
    return hits / sum(t.value_tokens for t in trials), exact / len(trials)


def recall_probe(
    backend: Backend, filler: bytes, distances: list[int], context: int, trials: int = 16, seed: int = 0,
    encode: Encode | None = None,
) -> list[RecallPoint]:
    """Accuracy by distance; `encode` is the model's text codec (default: raw bytes, for vocabularies >= 256)."""
    if backend.info.task != "causal-lm":
        raise MemcError("the recall probe needs a causal LM")
    if encode is None:
        if (backend.info.vocab_size or 0) < 256:
            raise MemcError("the recall probe needs the model's tokenizer or a byte-level vocabulary (>= 256)")
        encode = encode_bytes
    check_context(backend, context)
    check_distances(distances, context)
    filler_ids = encode(filler)
    if len(filler_ids) < 2 * context:
        raise MemcError(
            f"the filler text has {len(filler_ids)} tokens; the recall probe needs at least {2 * context}"
        )
    points = []
    for distance in distances:
        scores = {}
        for control in (False, True):
            rng = np.random.default_rng([seed, distance, int(control)])
            batch = [_trial(filler_ids, rng, distance, context, control, encode) for _ in range(trials)]
            scores[control] = _score(backend, batch)
        points.append(RecallPoint(distance, trials, scores[False][0], scores[False][1], scores[True][0]))
    return points
