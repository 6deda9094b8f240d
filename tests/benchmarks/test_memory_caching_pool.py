"""benchmarks/memory_caching_pool.py: its replay of the distillation's windows is what the pass really read, and
the pool rule picks the smallest pool that closes enough of the gap on both position ranges."""
from __future__ import annotations

import numpy as np

import benchmarks.memory_caching_pool as pool
from memc.passes.attention.distill import DistillAttention
from memc.passes.base import PassContext, create_pass
from memc.passes.manager import PassManager
from tests.eval.conftest import save_tiny_llama
from tests.helpers import captured


def test_replayed_windows_are_the_ones_distillation_read(tmp_path, monkeypatch) -> None:
    seen: list[np.ndarray] = []
    real = DistillAttention._batch

    def spy(tokens, seq, batch, rng):
        out = real(tokens, seq, batch, rng)
        seen.extend(r.numpy() for r in out)
        return out

    monkeypatch.setattr(DistillAttention, "_batch", staticmethod(spy))
    opts = {"text": "trainsplit:code", "steps": 5, "batch": 2, "seq_len": 48, "eval_windows": 2}
    passes = [create_pass("detect-attention", {}, "p[0]"),
              create_pass("memory-caching", {"variant": "select", "window": 4, "segment": 4, "max_tokens": 6}, "p[1]"),
              create_pass("distill-attention", opts, "p[2]")]
    program = PassManager(passes).run(captured(save_tiny_llama(tmp_path / "llama")), PassContext(seed=3))
    metrics = program.log[-1].metrics
    monkeypatch.setattr(DistillAttention, "_batch", staticmethod(real))
    from memc.eval.text import load_train_text

    tokens = np.frombuffer(load_train_text("trainsplit:code", "t"), dtype=np.uint8).astype(np.int64)  # byte model
    train = tokens[: metrics["tokens_available"]]
    rows = pool.read_rows(train, tokens, opts, metrics, seed=3)
    assert len(seen) == 2 * 5 and len(rows) == len(seen) + 2
    assert all(np.array_equal(a, b) for a, b in zip(rows, seen))
    assert np.array_equal(np.concatenate(rows[-2:]), tokens[-96:])  # the held-back evaluation windows
    assert not np.array_equal(pool.read_rows(train, tokens, opts, metrics, seed=4)[0], seen[0])


def test_rule_takes_the_smallest_pool_closing_enough_on_both_ranges() -> None:
    closes = {32: [0.7, 0.5], 64: [0.62, 0.61], 128: [0.8, 0.9]}
    assert pool.choose(closes) == 64  # 32 misses on positions >= 512
    assert pool.choose(closes, share=0.85) == 128
    assert pool.choose(closes, share=0.95) == 128  # none meets it: the largest
