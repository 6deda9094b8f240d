"""Recall training (memc.reference.recall): its windows plant pairs in the probe's exact format at the drawn
distances, the probe's own trial keeps distances exact in tokens, and a short run is deterministic."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from memc.eval.recall import VALUE_LEN, _trial, make_pair, splice
from memc.eval.text import encode_bytes
from memc.reference import corpus, tokenizer
from memc.reference.recall import (BASE, RecallSettings, Stage, attention_loss, new_model, recall_window, repeat_window,
                                   sample_batch, train_loop, value_pool)

FILLER0 = 100_000  # synthetic filler ids start here: above every real id, so filler tokens are recognisable


@pytest.fixture(scope="module")
def encode():
    tok = tokenizer.load_tokenizer(BASE)
    return lambda b: tokenizer.encode(b, tok)


def synthetic_filler(n: int = 20_000) -> np.ndarray:
    return np.arange(FILLER0, FILLER0 + n, dtype=np.int64)


def test_splice_inserts_before_the_given_filler_token() -> None:
    pieces = [(0, np.array([1])), (2, np.array([2, 3])), (2, np.array([4])), (4, np.array([5]))]
    ids = splice(np.array([10, 11, 12, 13]), pieces)
    assert ids.tolist() == [1, 10, 11, 2, 3, 4, 12, 13, 5]


@pytest.mark.parametrize("distance", [16, 300, 896])
def test_probe_trial_gap_is_distance_filler_tokens(encode, distance: int) -> None:
    """The probe (`_trial`) over ref-llama's tokenizer: between the planted line and the query lie exactly
    `distance` tokens, all filler, and the window is a contiguous slice of the filler around the pieces."""
    rng = np.random.default_rng([5, distance])
    t = _trial(synthetic_filler(), rng, distance, 1024, False, encode)
    pair = make_pair(np.random.default_rng([5, distance]), encode)  # the same draw: the probe's own pair
    ids = t.ids
    assert len(ids) == 1024 and t.first == 1024 - len(pair.answer) and t.value_tokens == len(pair.value)
    is_filler = ids >= FILLER0
    fill = ids[is_filler]
    assert (np.diff(fill) == 1).all()  # one contiguous slice of filler, never cut
    real = ids[~is_filler]
    assert real.tolist() == np.concatenate([pair.plant, pair.query, pair.answer]).tolist()
    plant_end = int(np.flatnonzero(~is_filler)[len(pair.plant) - 1]) + 1
    query_start = plant_end + distance
    assert is_filler[plant_end:query_start].all() and not is_filler[query_start]


def test_recall_window_plants_probe_format_pairs(encode) -> None:
    """Several pairs per training window, each exactly make_pair's pieces, queried after 1..max_distance filler
    tokens; the answer mask covers exactly each query's value and closing quote."""
    rng = np.random.default_rng(3)
    length, pairs, max_distance = 1025, 5, 128
    ids, mask, source = recall_window(synthetic_filler(), rng, length, pairs, max_distance, encode)
    assert ids.shape == (length,) and mask.shape == (length,)
    is_filler = ids >= FILLER0
    assert (np.diff(ids[is_filler]) == 1).all()
    first = make_pair(np.random.default_rng(3), encode)  # the window's first pair: the same draw
    seq = ids.tolist()

    def find(piece: np.ndarray, after: int = 0) -> int:
        p = piece.tolist()
        return next(i for i in range(after, len(seq) - len(p) + 1) if seq[i : i + len(p)] == p)

    plant = find(first.plant)
    query = find(np.concatenate([first.query, first.answer]), plant + 1)
    assert 1 <= is_filler[plant + len(first.plant) : query].sum() <= max_distance
    # decode, each filler token as "#": 5 planted lines, each key queried once afterwards with its value
    tok = tokenizer.load_tokenizer(BASE)
    breaks = np.flatnonzero(np.diff(is_filler.astype(int))) + 1
    text = "".join("#" * len(r) if r[0] >= FILLER0 else tok.decode(r.tolist()) for r in np.split(ids, breaks))
    keys = re.findall(r"\n(k_[a-z]{5}) = '", text)
    assert len(keys) == 2 * pairs and len(set(keys)) == pairs
    values = []
    for key in set(keys):
        plant_at = text.index(f"\n{key} = '")
        query_at = text.index(f"\n{key} = '", plant_at + 1)
        value = re.match(r"[a-z]{6}", text[plant_at + len(key) + 5 :]).group(0)
        assert text[plant_at:].startswith(f"\n{key} = '{value}'\n")
        assert text[query_at:].startswith(f"\n{key} = '{value}'")
        values.append(value)
    answer_text = tok.decode(ids[mask].tolist())
    assert sorted(answer_text.split("'")[:-1]) == sorted(values) and all(len(v) == VALUE_LEN for v in values)
    # every answer token has a source: an earlier, equal token of a planted line, right after the same key
    answer_at = np.flatnonzero(mask)
    assert (np.flatnonzero(source >= 0) == answer_at).all()
    src = source[answer_at]
    assert (src < answer_at).all() and (ids[src] == ids[answer_at]).all() and not is_filler[src].any()
    assert (ids[src - 1] == ids[answer_at - 1]).all() and (ids[src - 2] == ids[answer_at - 2]).all()


def test_repeat_window_repeats_one_run_of_train_tokens() -> None:
    data = np.arange(1000, 2000)
    runs = set()
    for seed in range(20):
        ids, mask, source = repeat_window(data, np.random.default_rng(seed), 129, 48)
        run = int(np.argmax(mask))
        assert ids.shape == mask.shape == source.shape == (129,) and 8 <= run <= 48 and mask[run:].all()
        assert (source[:run] == -1).all() and (ids[source[run:]] == ids[run:]).all()
        assert set(ids.tolist()) <= set(data.tolist())
        assert (ids[run:] == ids[: 129 - run]).all()
        runs.add(run)
    assert len(runs) > 5  # the run length varies: no fixed offset solves the copy


def test_value_pool_is_probe_value_tokens(encode) -> None:
    """The pool holds the tokens of probe-style values only (lowercase letters), multi-letter ones included,
    and the same seed draws the same pool."""
    tok = tokenizer.load_tokenizer(BASE)
    pool = value_pool(encode)
    assert np.array_equal(pool, value_pool(encode))
    pieces = {tok.decode([int(i)]) for i in np.unique(pool)}
    assert all(re.fullmatch(r"[a-z]+", p) for p in pieces)
    assert sum(len(p) > 1 for p in pieces) > 50 and set("abcxyz") <= pieces


def test_repeat_share_turns_pair_windows_into_copy_windows() -> None:
    """In a pair stage, repeat_share = 1 makes every window a repeat window (every repeated token a copy target,
    no LM loss), half of them from the value pool; at share 0 every window holds planted pairs."""
    data, values = synthetic_filler(), np.arange(50, 80)
    streams = {"code": data, "prose": data, "values": values}
    stage = Stage(0.0, 128, 100, 2)
    rng = np.random.default_rng(0)
    s = RecallSettings(tokens_per_step=128, repeat_share=1.0)
    from_values = 0
    for _ in range(12):
        ids, weights, answers, sources = sample_batch(rng, streams, stage, s, encode_bytes)
        row, w, a, src = ids[0].numpy(), weights[0].numpy(), answers[0].numpy(), sources[0].numpy()
        run = int(np.argmax(a)) + 1  # answers[p] marks token p + 1
        assert 8 <= run <= 64 and a[run - 1 :].all() and not a[: run - 1].any()
        assert (row[run:] == row[:-run]).all() and (w[a] == s.answer_weight).all() and (w[~a] == 0).all()
        assert (row[src[a]] == row[1:][a]).all()
        from_values += bool(np.isin(row, values).all())
    assert 2 <= from_values <= 10
    s0 = RecallSettings(tokens_per_step=128, repeat_share=0.0)
    for _ in range(4):
        ids, _, answers, _ = sample_batch(rng, streams, stage, s0, encode_bytes)
        assert int(answers.sum()) >= 2 * (VALUE_LEN + 1)  # two queried values with their quotes (bytes)


def tiny_llama(seed: int = 0):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg._attn_implementation = "eager"  # attention_loss reads the probabilities
        return T.LlamaForCausalLM(cfg)


def run_tiny(seed: int) -> tuple[dict, dict]:
    model = tiny_llama()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    data = encode_bytes(corpus.train_bytes("code")[:50_000])
    s = RecallSettings(tokens_per_step=128, stages=(Stage(0.0, 64, 16, 0), Stage(0.5, 64, 24, 1)), token_dims=16)
    train_loop(model, {"code": data, "prose": data}, encode_bytes, 3, seed, s, np.ones(256, np.int64))
    return init, model.state_dict()


def test_three_steps_are_deterministic_and_train_every_parameter() -> None:
    init, a = run_tiny(0)
    _, b = run_tiny(0)
    _, c = run_tiny(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(not torch.equal(a[k], init[k]) for k in a if "rotary" not in k)
    # split_residual held through training: embeddings in channels 0..15, layer 0 writes only to 16..31
    assert (a["model.embed_tokens.weight"][:, 16:] == 0).all() and a["model.embed_tokens.weight"][:, :16].abs().sum() > 0
    for k in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert (a[k][:16] == 0).all() and a[k][16:].abs().sum() > 0


def test_new_model_reads_ref_llamas_tokens_and_is_seeded() -> None:
    """From scratch on ref-llama's tokenizer: the vocabulary covers every id it emits; the seed fixes the
    weights and leaves the caller's global RNG alone."""
    tok = tokenizer.load_tokenizer(BASE)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = new_model(0), new_model(0), new_model(1)
    assert torch.equal(torch.rand(1), expected)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_attention_loss_is_zero_on_the_target_pattern_only() -> None:
    """Layer 0 head h on the token offsets[h] back, layer 1 head 0 on each copy's source: one-hot there gives
    ~0; a uniform causal pattern gives more; positions without a source are not supervised."""
    t, offsets = 12, (1, 2)
    sources = torch.full((1, t), -1)
    sources[0, 7], sources[0, 9] = 3, 5
    exact = [torch.zeros(1, 2, t, t), torch.zeros(1, 2, t, t)]
    for h, off in enumerate(offsets):
        exact[0][0, h, torch.arange(off, t), torch.arange(t - off)] = 1.0
    exact[1][0, 0, 7, 3] = exact[1][0, 0, 9, 5] = 1.0
    assert float(attention_loss(exact, sources, offsets, (0,))) < 1e-6
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    flat = [uniform.expand(1, 2, t, t)] * 2
    assert float(attention_loss(flat, sources, offsets, (0,))) > 1.0
    exact[1][0, 0, 8, 0] = 0.0  # no source at 8: its row does not matter
    assert float(attention_loss(exact, sources, offsets, (0,))) < 1e-6
