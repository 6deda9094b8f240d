"""The long-range recall probe: how trials are built, and that its score separates a model that can recall from
one that cannot (a fake copying 'oracle' scores 1.0 with a control of ~0; uninformed logits score chance)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from memc.errors import MemcError
from memc.eval.backends import Backend, ModelInfo
from memc.eval.recall import VALUE_LEN, _trial, recall_probe
from memc.eval.text import encode_bytes
from memc.reference import corpus
from tests.eval.conftest import train_bpe

CONTEXT = 256
# plant "\nk_xxxxx = 'vvvvvv'\n" (20) + query "\nk_xxxxx = '" (12) + value and quote (7): 39 bytes of structure
MAX_DISTANCE = CONTEXT - 39
QUERY_RE = re.compile(rb"\n(k_[a-z]{5}) = '([a-z]{6})'$")


@pytest.fixture(scope="module")
def filler() -> bytes:
    return corpus.held_out_bytes("prose")


@pytest.fixture(scope="module")
def filler_ids(filler: bytes) -> np.ndarray:
    return encode_bytes(filler)


class _Fake(Backend):
    name = "fake"

    def __init__(self, max_seq_len: int = 1024, vocab: int = 256):
        self.info = ModelInfo("causal-lm", ["input_ids"], vocab, max_seq_len, 0, None)
        self.shapes: list[tuple[int, ...]] = []


class OracleBackend(_Fake):
    """Predicts, at each position, the byte that followed the previous occurrence of the same 8-byte left context
    (an induction head with perfect memory); with no previous occurrence it predicts byte 0."""

    N = 8

    def forward(self, feeds):
        ids = feeds["input_ids"]
        self.shapes.append(ids.shape)
        logits = np.zeros((*ids.shape, self.info.vocab_size), dtype=np.float32)
        for b, row in enumerate(ids.tolist()):
            last_end: dict[tuple, int] = {}
            for t in range(len(row)):
                pred = 0
                if t + 1 >= self.N:
                    ctx = tuple(row[t + 1 - self.N : t + 1])
                    if ctx in last_end:
                        pred = row[last_end[ctx] + 1]
                    last_end[ctx] = t
                logits[b, t, pred] = 10.0
        return logits


class UninformedBackend(_Fake):
    """Random logits over the lowercase letters, ignoring the input: recall at chance (1/26) with or without key."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def forward(self, feeds):
        ids = feeds["input_ids"]
        logits = np.full((*ids.shape, 256), -10.0, dtype=np.float32)
        logits[..., ord("a") : ord("z") + 1] = self.rng.standard_normal((*ids.shape, 26))
        return logits


# -- construction ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", [0, 16, 100, MAX_DISTANCE])
@pytest.mark.parametrize("control", [False, True])
def test_trial_construction(filler: bytes, filler_ids: np.ndarray, distance: int, control: bool) -> None:
    rng = np.random.default_rng([7, distance, int(control)])
    for _ in range(20):
        t = _trial(filler_ids, rng, distance, CONTEXT, control, encode_bytes)
        seq, first = bytes(t.ids.tolist()), t.first
        assert len(seq) == CONTEXT and t.value_tokens == VALUE_LEN
        # the value is the 6 characters starting at `first`, followed by the closing quote that ends the window
        assert first == CONTEXT - VALUE_LEN - 1
        m = QUERY_RE.search(seq)
        assert m, seq[-30:]
        key, value = m.group(1), m.group(2)
        assert seq[first : first + VALUE_LEN] == value
        plant = b"\n" + key + b" = '" + value + b"'\n"
        query_start = m.start()
        if control:
            assert seq.count(key) == 1  # only in the query: the planted key is a different one
            assert plant not in seq[:query_start]
            planted = re.findall(rb"\n(k_[a-z]{5}) = '([a-z]{6})'\n", seq[:query_start])
            assert len(planted) == 1 and planted[0][0] != key
        else:
            assert seq.count(key) == 2  # once planted, once queried
            assert seq[:query_start].count(plant) == 1
            plant_end = seq.index(plant) + len(plant)
            assert query_start - plant_end == distance  # `distance` bytes of filler between plant and query
            assert seq[plant_end:query_start] in filler


def test_trials_are_deterministic_per_seed(filler_ids: np.ndarray) -> None:
    def ids(seed: int) -> list[int]:
        return _trial(filler_ids, np.random.default_rng([seed, 16, 0]), 16, CONTEXT, False, encode_bytes).ids.tolist()

    assert ids(0) == ids(0) and ids(0) != ids(1)


def test_trial_with_a_bpe_tokenizer_counts_distance_in_tokens() -> None:
    """With a tokenizer, pieces are encoded separately and the gap is `distance` tokens of encoded filler."""
    tok = bpe_tokenizer()
    encode = lambda b: np.asarray(tok.encode(b.decode()).ids, np.int64)  # noqa: E731
    filler_ids = encode(corpus.held_out_bytes("prose")[:20000])
    t = _trial(filler_ids, np.random.default_rng(3), 40, CONTEXT, False, encode)
    assert t.ids.shape == (CONTEXT,)
    text = tok.decode(t.ids.tolist())
    m = re.search(r"\n(k_[a-z]{5}) = '([a-z]{6})'\n", text)
    assert m and text.endswith(f"\n{m.group(1)} = '{m.group(2)}'")
    value_ids = encode(m.group(2).encode())
    assert t.value_tokens == len(value_ids) < VALUE_LEN  # merged letters: fewer tokens than bytes
    assert t.ids[t.first : t.first + t.value_tokens].tolist() == value_ids.tolist()
    plant_ids = encode(m.group(0).encode())
    query_ids = encode(f"\n{m.group(1)} = '".encode())
    plant_end = next(i for i in range(CONTEXT) if t.ids[i - len(plant_ids) : i].tolist() == plant_ids.tolist())
    assert t.first - len(query_ids) - plant_end == 40


def bpe_tokenizer():
    """Trained on letter triples as well as prose, so random lowercase values merge into multi-letter tokens."""
    letters = [" ".join("".join(chr(97 + (i * j) % 26) for j in range(3)) for i in range(400))]
    return train_bpe(letters + [corpus.held_out_bytes("prose")[:50000].decode()], 600)


# -- scoring ---------------------------------------------------------------------------------------------------
def test_oracle_recalls_everything_and_control_nothing(filler: bytes) -> None:
    backend = OracleBackend()
    points = recall_probe(backend, filler, [16, 128, 200], CONTEXT, trials=8, seed=0)
    assert [p.distance for p in points] == [16, 128, 200]
    assert backend.shapes == [(8, CONTEXT)] * 6  # one batch per distance for recall and one for the control
    for p in points:
        assert p.trials == 8
        assert p.token_accuracy == 1.0 and p.exact == 1.0
        assert p.control_token_accuracy <= 0.05


def test_oracle_recalls_through_a_bpe_codec() -> None:
    tok = bpe_tokenizer()
    encode = lambda b: np.asarray(tok.encode(b.decode()).ids, np.int64)  # noqa: E731
    (p,) = recall_probe(OracleBackend(vocab=tok.get_vocab_size()), corpus.held_out_bytes("prose")[:20000], [100],
                        CONTEXT, trials=8, encode=encode)
    assert p.token_accuracy == 1.0 and p.exact == 1.0 and p.control_token_accuracy <= 0.2


def test_uninformed_model_scores_chance(filler: bytes) -> None:
    points = recall_probe(UninformedBackend(), filler, [16, 128], CONTEXT, trials=64, seed=0)
    for p in points:
        # 64 trials x 6 characters = 384 guesses at 1/26 (~0.038): mean ~15 hits, sd ~4
        assert 0.01 <= p.token_accuracy <= 0.08, p
        assert 0.01 <= p.control_token_accuracy <= 0.08, p
        assert p.exact == 0.0


def test_distance_that_does_not_fit_is_a_clear_error(filler: bytes) -> None:
    with pytest.raises(MemcError, match=rf"recall distance\(s\) \[{MAX_DISTANCE + 1}\] do not fit in a context of 256 tokens \(the longest is {MAX_DISTANCE}\)"):
        recall_probe(OracleBackend(), filler, [16, MAX_DISTANCE + 1], CONTEXT, trials=2)
    (p,) = recall_probe(OracleBackend(), filler, [MAX_DISTANCE], CONTEXT, trials=2)  # the longest that fits
    assert p.token_accuracy == 1.0


def test_probe_input_checks(filler: bytes) -> None:
    with pytest.raises(MemcError, match="tokenizer or a byte-level vocabulary"):
        recall_probe(_Fake(vocab=128), filler, [16], CONTEXT)
    with pytest.raises(MemcError, match="longer than the model supports"):
        recall_probe(OracleBackend(max_seq_len=128), filler, [16], CONTEXT)
    with pytest.raises(MemcError, match="filler text has 100 tokens"):
        recall_probe(OracleBackend(), filler[:100], [16], CONTEXT)
