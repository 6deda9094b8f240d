"""memc.runtime.DecodeEngine: prefill / step / greedy generate over decode.onnx, with clear errors for bad state.

Greedy tokens are compared with transformers' own ``generate`` (``do_sample=False``, ``use_cache=True``) on the
original model loaded independently of memc.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from memc.runtime.engine import DecodeEngine, DecodeStateError, decode_logits
from tests.helpers import LAYERS, MAX_POS, REPO_ROOT, VOCAB, load_hf_original

GENERATE_FAMILIES = ["llama", "qwen2", "mixtral", "gpt2"]
NEW_TOKENS = 8


def _prompt(batch: int, seq: int, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def _hf_greedy(model, prompt: np.ndarray, new: int) -> np.ndarray:
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, use_cache=True, pad_token_id=0,
        )
    return out.numpy()


@pytest.fixture(scope="module")
def engine(decode_artifact) -> DecodeEngine:
    return DecodeEngine(decode_artifact("llama"))


@pytest.mark.parametrize("name", GENERATE_FAMILIES)
def test_greedy_generate_matches_transformers(name, tiny_hf, decode_artifact):
    model = load_hf_original(tiny_hf(name))
    eng = DecodeEngine(decode_artifact(name))
    prompt = _prompt(2, 6)
    expected = _hf_greedy(model, prompt, NEW_TOKENS)
    got = eng.generate(prompt, NEW_TOKENS)
    assert got.shape == (2, 6 + NEW_TOKENS)
    np.testing.assert_array_equal(got, expected, err_msg=f"{name}: greedy tokens differ from transformers")
    # one row given as a 1-D prompt gives a 1-D result, equal to that row of the batch
    np.testing.assert_array_equal(eng.generate(prompt[1], NEW_TOKENS), expected[1])


def test_prefill_and_step_shapes(engine):
    assert engine.num_layers == LAYERS and engine.vocab_size == VOCAB and engine.max_seq_len == MAX_POS
    logits, state = engine.prefill(_prompt(3, 5))
    assert logits.shape == (3, 5, VOCAB) and logits.dtype == np.float32
    assert len(state) == 2 * LAYERS
    assert all(s.shape == (3, 2, 5, 8) for s in state)
    for token in (np.array([1, 2, 3]), np.array([[1], [2], [3]])):
        logits2, state2 = engine.step(token, state)
        assert logits2.shape == (3, 1, VOCAB)
        assert all(s.shape == (3, 2, 6, 8) for s in state2)
    assert engine.prefill([4, 5, 6])[0].shape == (1, 3, VOCAB)  # a plain list is one row
    assert engine.step(7, engine.prefill([4, 5, 6])[1])[0].shape == (1, 1, VOCAB)  # an int token for one row
    assert all(s.shape == (2, 2, 0, 8) for s in engine.empty_state(2))


def test_chunked_prefill_equals_one_prefill(engine):
    """forward() continues from any state with any number of tokens: two chunks == one prefill."""
    ids = _prompt(2, 12)
    whole, state_whole = engine.prefill(ids)
    first, state = engine.prefill(ids[:, :5])
    second, state = engine.forward(ids[:, 5:], state)
    np.testing.assert_allclose(np.concatenate([first, second], 1), whole, atol=1e-5)
    for a, b in zip(state, state_whole):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(decode_logits(engine, ids, 4), whole, atol=1e-4)


def test_state_stays_in_place_and_branches_copy(engine):
    """A step extends the state's own buffer (no copy of the cache); stepping an older state again copies first,
    so every state returned stays valid."""
    assert engine.kv_layout == "preallocated"
    ids = _prompt(1, 9)
    _, a = engine.prefill(ids[:, :6])
    _, b = engine.step(ids[:, 6], a)
    assert b[0].base is a[0].base and b[0].shape == (1, 2, 7, 8)  # the same buffer, one token longer
    other = np.array([(int(ids[0, 6]) + 1) % VOCAB])
    branch_logits, c = engine.step(other, a)  # a branch from a: must not overwrite b's token 6
    assert c[0].base is not a[0].base
    after_b, _ = engine.step(ids[:, 7], b)
    np.testing.assert_allclose(after_b[:, -1], engine.prefill(ids[:, :8])[0][:, -1], atol=1e-5)
    branched = np.concatenate([ids[:, :6], other[None]], 1)
    np.testing.assert_allclose(branch_logits[:, -1], engine.prefill(branched)[0][:, -1], atol=1e-5)


def test_the_decode_loop_path_equals_the_checked_path(engine):
    """Steps fed the engine's own last state skip re-checking it and reuse its bound buffers; the same steps fed
    copies (checked, copied into new buffers, by a second engine) give the same logits. Then two interleaved loops,
    each stepping a state the engine did not return last, keep their buffers apart."""
    checked = DecodeEngine(engine.path)
    ids = _prompt(1, 12)
    _, fast = engine.prefill(ids[:, :4])
    slow = [a.copy() for a in fast]
    for t in range(4, 8):
        base = fast[0].base
        got, fast = engine.step(ids[:, t], fast)
        want, slow = checked.step(ids[:, t], [a.copy() for a in slow])
        np.testing.assert_array_equal(got, want)
        assert fast[0].base is base  # in place
    _, other = engine.prefill(ids[:, :7])
    for t in range(8, 12):
        base = fast[0].base
        got, fast = engine.step(ids[:, t], fast)
        other_logits, other = engine.step(ids[:, t - 1], other)
        assert fast[0].base is base and other[0].base is not base  # each still in place, in its own buffer
    np.testing.assert_allclose(got[:, -1], engine.prefill(ids)[0][:, -1], atol=1e-5)
    np.testing.assert_allclose(other_logits[:, -1], engine.prefill(ids[:, :11])[0][:, -1], atol=1e-5)


def test_each_steps_logits_keep_their_values(engine, monkeypatch):
    """A step's logits are a slot of their own (memc.runtime.logit_slots), never written again: every earlier
    step's logits still equal a fresh prefill's, also across a new block of slots (3 slots a block here)."""
    import memc.runtime.logit_slots as logit_slots

    monkeypatch.setattr(logit_slots, "BLOCK_BYTES", 3 * VOCAB * 4)
    fresh = DecodeEngine(engine.path)
    ids = _prompt(1, 12, seed=5)
    _, state = fresh.prefill(ids[:, :4])
    kept = []
    for t in range(4, 12):
        logits, state = fresh.step(ids[:, t], state)
        kept.append(logits)
    assert len({k.ctypes.data for k in kept}) == len(kept)
    for t, logits in zip(range(4, 12), kept):
        np.testing.assert_allclose(logits[:, -1], engine.prefill(ids[:, : t + 1])[0][:, -1], atol=1e-5)


def test_a_changed_state_list_is_checked_again(engine):
    _, state = engine.prefill(_prompt(1, 4))
    _, state = engine.step(1, state)
    _, state = engine.step(np.array([2]), state)  # the decode loop's path from here on
    with pytest.raises(DecodeStateError, match=rf"token ids must be in \[0, {VOCAB}\)"):
        engine.step(np.array([VOCAB]), state)
    state[0] = state[0][:, :, :3]  # the engine's own list, one array replaced
    with pytest.raises(DecodeStateError, match=r"state\[1\] \(past_value_0\) has shape"):
        engine.step(2, state)


def test_buffers_grow_past_their_capacity(engine, monkeypatch):
    import memc.runtime.kv_buffers as kv_buffers

    monkeypatch.setattr(kv_buffers, "CAPACITY_STEP", 4)
    ids = _prompt(2, 14)
    _, state = engine.prefill(ids[:, :5])
    assert state[0].base.shape[2] == 8  # rounded up to the step
    parts = []
    for t in range(5, 14):
        logits, state = engine.step(ids[:, t], state)
        parts.append(logits)
    assert state[0].base.shape[2] >= 14  # doubled on the way
    whole = engine.prefill(ids)[0]
    np.testing.assert_allclose(np.concatenate(parts, 1), whole[:, 5:], atol=1e-4)


def test_generate_stops_at_eos(engine):
    prompt = _prompt(1, 4)[0]
    free = engine.generate(prompt, 6)
    eos = int(free[5])  # the second generated token
    stopped = engine.generate(prompt, 6, eos_token_id=eos)
    first_eos = 4 + list(free[4:]).index(eos)
    np.testing.assert_array_equal(stopped, free[: first_eos + 1])
    assert engine.generate(prompt, 0).tolist() == prompt.tolist()


# -- errors -------------------------------------------------------------------------------------------------------
def test_state_count_mismatch(engine):
    _, state = engine.prefill(_prompt(1, 4))
    expected = rf"state has {2 * LAYERS - 1} arrays; this decode graph takes {2 * LAYERS}"
    with pytest.raises(DecodeStateError, match=expected):
        engine.step(1, state[:-1])
    with pytest.raises(DecodeStateError, match="list of present arrays"):
        engine.step(1, {"past_key_0": state[0]})


def test_state_shape_mismatch(engine):
    _, state = engine.prefill(_prompt(1, 4))
    bad = list(state)
    bad[3] = bad[3][:, :, :3]  # past_value_1 one token short
    with pytest.raises(DecodeStateError, match=r"state\[3\] \(past_value_1\) has shape \(1, 2, 3, 8\); expected "
                                               r"\(batch=1, heads=2, past=4, head_dim=8\)"):
        engine.step(1, bad)
    bad = list(state)
    bad[0] = np.zeros((1, 4, 4, 8), np.float32)  # wrong number of heads
    with pytest.raises(DecodeStateError, match=r"state\[0\] \(past_key_0\).*heads=2"):
        engine.step(1, bad)
    with pytest.raises(DecodeStateError, match=r"batch=2"):  # two tokens for a one-row state
        engine.step([1, 2], state)
    bad = [s.astype(np.float64) for s in state]
    with pytest.raises(DecodeStateError, match=r"state\[0\] \(past_key_0\) has dtype float64; the graph takes float32"):
        engine.step(1, bad)
    bad = list(state)
    bad[2] = torch.from_numpy(bad[2])
    with pytest.raises(DecodeStateError, match=r"state\[2\] \(past_key_1\) is a Tensor, not a numpy array"):
        engine.step(1, bad)


def test_token_errors(engine):
    _, state = engine.prefill(_prompt(1, 4))
    with pytest.raises(DecodeStateError, match="one token per row"):
        engine.step(np.array([[1, 2]]), state)
    with pytest.raises(DecodeStateError, match="integer token ids"):
        engine.prefill(np.array([[0.5, 1.0]]))
    with pytest.raises(DecodeStateError, match=rf"token ids must be in \[0, {VOCAB}\)"):
        engine.step(VOCAB, state)
    with pytest.raises(DecodeStateError, match=r"input_ids must have shape \[batch, seq\]"):
        engine.prefill(np.zeros((1, 0), np.int64))


def test_maximum_length(engine):
    _, state = engine.prefill(_prompt(1, MAX_POS))
    with pytest.raises(DecodeStateError, match=rf"past {MAX_POS} \+ 1 new token\(s\) exceeds the model's maximum "
                                               rf"sequence length {MAX_POS}"):
        engine.step(1, state)


def test_not_a_decode_graph(tiny_hf, compiled, tmp_path):
    res = compiled(str(tiny_hf("llama")))
    assert res.rc == 0, res.explain()
    with pytest.raises(DecodeStateError, match="not a memc decode graph|expected past_key_i"):
        DecodeEngine(res.onnx_path)
    with pytest.raises(FileNotFoundError, match="no decode graph"):
        DecodeEngine(tmp_path)


def test_engine_does_not_import_torch(decode_artifact):
    """A deployment process needs numpy + onnxruntime only."""
    code = textwrap.dedent(f"""
        import sys
        from memc.runtime import DecodeEngine
        engine = DecodeEngine({str(decode_artifact("llama"))!r}, threads=1)
        out = engine.generate([1, 2, 3], 4)
        assert out.shape == (7,), out.shape
        out = engine.generate([[1, 2, 3]] * 2, 4, temperature=0.9, top_k=5, top_p=0.9, seed=1)  # sampled, batch 2
        assert out.shape == (2, 7), out.shape
        assert "torch" not in sys.modules, "memc.runtime imported torch"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("chunk", [4, 5])
def test_prompts_run_in_chunks_with_the_same_logits(decode_artifact, chunk):
    """A one-row prompt longer than prefill_chunk runs in chunks (each attending to the cache the earlier ones
    wrote; a last chunk of one token with 21 tokens in chunks of 5): the same logits and state as one call."""
    whole = DecodeEngine(decode_artifact("llama"), prefill_chunk=0)
    chunked = DecodeEngine(decode_artifact("llama"), prefill_chunk=chunk)
    ids = _prompt(1, 21)
    want, want_state = whole.prefill(ids)
    calls = []
    run = chunked._run
    chunked._run = lambda piece, *a: calls.append(piece.shape[1]) or run(piece, *a)
    got, state = chunked.prefill(ids)
    del chunked._run
    assert calls == [chunk] * (21 // chunk) + ([21 % chunk] if 21 % chunk else [])
    assert got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, b in zip(state, want_state):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # and it goes on from there: steps, then another long piece, then the returned logits are still intact
    step, state = chunked.step(np.array([3]), state)
    more, state = chunked.forward(ids[:, :9], state)
    ref = whole.prefill(np.concatenate([ids, [[3]], ids[:, :9]], 1))[0]
    np.testing.assert_allclose(np.concatenate([got, step, more], 1), ref, atol=1e-4)
