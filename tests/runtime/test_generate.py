"""memc.runtime.generate: the greedy / sampled generate loop over a DecodeEngine (KV and bounded memory-caching).

Sampled runs are checked against the loop written out by hand (prefill, then Sampler + step per token with the
same seed), greedy against argmax decoding; stop ids, the context limit and bad state end as documented.
"""
from __future__ import annotations

import numpy as np
import pytest

from memc.runtime.engine import DecodeEngine, DecodeStateError
from memc.runtime.generate import Generation, generate
from memc.runtime.sampling import Sampler, SamplingConfig
from tests.helpers import MAX_POS, VOCAB


def _prompt(batch: int, seq: int, seed: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


@pytest.fixture(scope="module")
def kv(decode_artifact) -> DecodeEngine:
    return DecodeEngine(decode_artifact("llama"))


@pytest.fixture(scope="module")
def mc(mc_compiled) -> DecodeEngine:
    return DecodeEngine(mc_compiled.out_dir)


def _by_hand(engine: DecodeEngine, prompt: np.ndarray, new: int, cfg: SamplingConfig) -> np.ndarray:
    sampler = Sampler(cfg)
    logits, state = engine.prefill(prompt)
    out = []
    for i in range(new):
        token = sampler(logits[:, -1])
        out.append(token)
        if i + 1 < new:
            logits, state = engine.step(token, state)
    return np.concatenate([prompt, np.stack(out, 1)], 1)


@pytest.mark.parametrize("which", ["kv", "mc"])
def test_sampled_generation_equals_the_loop_by_hand(which, request):
    engine = request.getfixturevalue(which)
    prompt = _prompt(2, 5)
    cfg = SamplingConfig(0.9, top_k=20, top_p=0.9, seed=3)
    got = generate(engine, prompt, 12, cfg)
    np.testing.assert_array_equal(got, _by_hand(engine, prompt, 12, cfg))
    np.testing.assert_array_equal(got, engine.generate(prompt, 12, temperature=0.9, top_k=20, top_p=0.9, seed=3))
    assert not np.array_equal(got, generate(engine, prompt, 12, SamplingConfig(0.9, top_k=20, top_p=0.9, seed=4)))
    # greedy = temperature 0 = argmax decoding = the old greedy generate
    greedy = generate(engine, prompt, 12)
    np.testing.assert_array_equal(greedy, _by_hand(engine, prompt, 12, SamplingConfig(0.0)))
    np.testing.assert_array_equal(greedy, generate(engine, prompt, 12, SamplingConfig(1.0, top_k=1, seed=9)))


def test_generation_records_timings_and_state(kv):
    run = Generation(kv, _prompt(1, 6)[0], 5)
    seen = [t.copy() for t in run]
    assert len(seen) == 5 and all(t.shape == (1,) for t in seen)
    assert run.stop_reason == "max_new_tokens" and run.result().shape == (11,)
    t = run.timings()
    assert t["prefill_tokens"] == 6 and t["decode_steps"] == 4 and t["prefill_tokens_per_s"] > 0
    assert 0 < t["decode_ms_median"] and 0 < t["decode_ms_per_token"]
    assert run.state_bytes == kv.state_bytes_at(6 + 4) == 2 * 2 * 2 * 8 * 4 * 10  # layers, K+V, heads, dim, f32
    with pytest.raises(RuntimeError, match="runs once"):
        list(run)


def test_caller_can_stop_early(kv):
    run = Generation(kv, _prompt(1, 3), 50)
    for i, _ in enumerate(run):
        if i == 2:
            break
    assert run.stop_reason == "caller" and len(run.tokens) == 3 and len(run.step_seconds) == 2


def test_stop_ids_per_row(kv):
    prompt = _prompt(2, 4, seed=8)
    free = generate(kv, prompt, 8)
    stop = int(free[0, 6])  # row 0's third new token
    stopped = generate(kv, prompt, 8, stop_ids=[stop])
    row0 = list(free[0, 4:]).index(stop)
    row1 = list(free[1, 4:]).index(stop) if stop in free[1, 4:] else None
    end = 4 + max(row0, row1 if row1 is not None else 7) + 1
    assert stopped.shape[1] == end
    np.testing.assert_array_equal(stopped[0, :4 + row0 + 1], free[0, :4 + row0 + 1])
    assert (stopped[0, 4 + row0:] == stop).all()  # a finished row repeats its stop token
    run = Generation(kv, prompt[:1], 8, stop_ids=[stop])
    run.run()
    assert run.stop_reason == "stop_id" and len(run.tokens) == row0 + 1


def test_context_limit(kv):
    run = Generation(kv, _prompt(1, MAX_POS - 3)[0], 10)
    assert run.run().shape == (MAX_POS,) and run.stop_reason == "limit" and len(run.tokens) == 3
    with pytest.raises(DecodeStateError, match=rf"the prompt is {MAX_POS} tokens; the model's context is {MAX_POS} "
                                               rf"positions .* at most {MAX_POS - 1} tokens"):
        Generation(kv, _prompt(1, MAX_POS), 1)


def test_bounded_state_has_no_limit(mc):
    assert mc.bounded_state and mc.max_seq_len is None
    assert mc.state_bytes_at(0) == mc.state_bytes_at(10**6) > 0
    run = Generation(mc, _prompt(1, 4), 30)
    run.run()
    assert run.stop_reason == "max_new_tokens" and len(run.tokens) == 30 and run.state_bytes == mc.state_bytes_at(0)


def test_bad_arguments(kv):
    with pytest.raises(DecodeStateError, match="max_new_tokens must be an int >= 1, got 0"):
        Generation(kv, [1, 2], 0)
    with pytest.raises(DecodeStateError, match="seq >= 1"):
        Generation(kv, np.zeros((1, 0), np.int64), 3)
    assert kv.generate([1, 2], 0).tolist() == [1, 2]


def test_memory_caching_state_that_does_not_fit_is_refused(mc):
    _, state = mc.prefill(_prompt(1, 3))
    bad = list(state)
    bad[1] = np.zeros((1, *bad[1].shape[1:-1], bad[1].shape[-1] + 1), bad[1].dtype)  # win_k one dim too wide
    with pytest.raises(DecodeStateError, match=r"state\[1\] \(past_mc_win_k_0\) has shape"):
        mc.step(1, bad)
    with pytest.raises(DecodeStateError, match=r"expected \(batch=2"):
        mc.step([1, 2], state)  # two rows for a one-row state
    bad = list(state)
    bad[0] = bad[0].astype(np.int32)  # the token counter t
    with pytest.raises(DecodeStateError, match=r"state\[0\] \(past_mc_t_0\) has dtype int32; the graph takes int64"):
        mc.step(1, bad)
