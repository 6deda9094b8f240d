"""Long-range recall probe: a key -> value pair is planted in real text and queried ``distance`` bytes later.

Each trial is one window of ``context`` bytes: filler text, the line ``<key> = '<value>'``, ``distance`` bytes of
filler, then ``<key> = '`` and the value again. The score is teacher-forced: the fraction of value characters the
model predicts (argmax) correctly at the query, and the fraction of values it gets entirely right. A control run
plants a *different* key, so the value cannot be recalled: its accuracy is the model's prior (about 1/26), and
the gap between the two is what recall adds. Byte-level models only (positions are byte offsets).
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass

import numpy as np

from memc.errors import MemcError
from memc.eval.backends import Backend
from memc.eval.perplexity import check_context

VALUE_LEN = 6
KEY_LEN = 7  # "k_" + 5 letters
# bytes of a trial that are not filler: the planted line, the query and the value with its closing quote
OVERHEAD = (1 + KEY_LEN + 4 + VALUE_LEN + 2) + (1 + KEY_LEN + 4) + (VALUE_LEN + 1)


def check_distances(distances: list[int], context: int) -> None:
    """Fail before any model work when a distance cannot fit one window."""
    too_far = [d for d in distances if d > context - OVERHEAD]
    if too_far:
        raise MemcError(
            f"recall distance(s) {too_far} do not fit in a context of {context} bytes "
            f"(the longest is {context - OVERHEAD})"
        )


@dataclass
class RecallPoint:
    distance: int
    trials: int
    char_accuracy: float
    exact: float
    control_char_accuracy: float

    def as_dict(self) -> dict:
        return asdict(self)


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=n))


def _trial(filler: bytes, rng: np.random.Generator, distance: int, context: int, control: bool) -> tuple[bytes, int]:
    key, value = "k_" + _word(rng, 5), _word(rng, VALUE_LEN)
    planted_key = "k_" + _word(rng, 5) if control else key
    plant = f"\n{planted_key} = '{value if not control else _word(rng, VALUE_LEN)}'\n".encode()
    query = f"\n{key} = '".encode()
    tail = value.encode() + b"'"
    prefix_len = context - len(plant) - distance - len(query) - len(tail)
    if prefix_len < 0:
        raise MemcError(f"recall distance {distance} does not fit in a context of {context} bytes")
    start = int(rng.integers(0, len(filler) - prefix_len - distance))
    prefix = filler[start : start + prefix_len]
    gap = filler[start + prefix_len : start + prefix_len + distance]
    seq = prefix + plant + gap + query + tail
    return seq, len(seq) - len(tail)  # position of the first value byte


def recall_probe(
    backend: Backend, filler: bytes, distances: list[int], context: int, trials: int = 16, seed: int = 0
) -> list[RecallPoint]:
    if backend.info.task != "causal-lm" or (backend.info.vocab_size or 0) < 256:
        raise MemcError("the recall probe needs a byte-level causal LM (vocabulary >= 256)")
    check_context(backend, context)
    check_distances(distances, context)
    if len(filler) < 2 * context:
        raise MemcError(f"the filler text has {len(filler)} bytes; the recall probe needs at least {2 * context}")
    points = []
    for distance in distances:
        scores = {}
        for control in (False, True):
            rng = np.random.default_rng([seed, distance, int(control)])
            seqs, firsts = zip(*(_trial(filler, rng, distance, context, control) for _ in range(trials)))
            ids = np.frombuffer(b"".join(seqs), dtype=np.uint8).astype(np.int64).reshape(trials, context)
            logits = backend.forward({"input_ids": ids})
            first = firsts[0]  # identical for all trials by construction
            pred = logits[:, first - 1 : first - 1 + VALUE_LEN].argmax(-1)
            truth = ids[:, first : first + VALUE_LEN]
            scores[control] = ((pred == truth).mean(), (pred == truth).all(-1).mean())
        points.append(
            RecallPoint(distance, trials, float(scores[False][0]), float(scores[False][1]), float(scores[True][0]))
        )
    return points
