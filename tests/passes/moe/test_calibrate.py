"""moe-calibrate: statistics that add up, never-routed experts reported, traces kept, held-out text refused."""
from __future__ import annotations

import math

import pytest
import torch

from memc.capture.inputs import resized_inputs
from memc.errors import ConfigError
from memc.passes.base import PassContext
from memc.passes.moe.calibrate import CALIBRATION_KEY, CalibrateOptions, MoECalibrate, calibration_text
from memc.passes.moe.detect import DetectMoE
from memc.passes.moe.rewrite import mask_experts


def _calibrated(program, samples: int = 2):
    ctx = PassContext(seed=0, calibration=[resized_inputs(program, {}, 10 + i) for i in range(samples)])
    program = DetectMoE().run(program, ctx).program
    return MoECalibrate(CalibrateOptions(text="samples")).run(program, ctx).program, ctx


@pytest.mark.parametrize("name", ["qwen3-moe", "deepseek-v3", "handwritten"])
def test_statistics_add_up(name, captured):
    program, ctx = _calibrated(captured(name))
    calib = program.annotations[CALIBRATION_KEY]
    tokens = sum(inp[0].shape[0] * inp[0].shape[1] for inp in ctx.calibration)
    for site, layer in zip(program.annotations["sites.moe"], calib.layers):
        assert layer.trace.shape == (tokens, site.top_k) and layer.trace.dtype == torch.int16
        assert int(layer.count.sum()) == tokens * site.top_k  # every token picks k experts
        counts = torch.bincount(layer.trace.long().flatten(), minlength=site.num_experts)
        assert torch.equal(counts.double(), layer.count)  # the trace and the counts agree
        # soft frequency = the gate weights the graph applied; renormalised routers' weights sum to 1 per token
        if site.renormalize:
            assert float(layer.soft.sum()) == pytest.approx(tokens * site.scaling, rel=1e-5)
        assert torch.allclose(layer.gates.sum(0).double().sum(), layer.soft.sum(), rtol=1e-5)
        routed = layer.count > 0
        assert torch.all(layer.ean[routed] > 0) and torch.all(torch.isfinite(layer.reap[routed]))
        assert float(layer.tcess.sum()) <= site.top_k * max(site.scaling, 1.0) + 1e-6


def test_never_routed_experts_are_reported(captured):
    program = captured("qwen3-moe")
    site = DetectMoE().run(program, PassContext()).program.annotations["sites.moe"][0]
    mask_experts(program.module, site, kept=[0, 1, 2])  # expert 3's logit at -inf: no token can choose it
    program, _ = _calibrated(program)
    layer = program.annotations[CALIBRATION_KEY].layers[0]
    assert layer.never_routed == [3]
    assert math.isnan(float(layer.reap[3])) and float(layer.count[3]) == 0
    summary = program.annotations[CALIBRATION_KEY].summary()
    assert summary["never_routed"]["model.layers.0.mlp"] == [3]


def test_train_split_text_and_refusals(tmp_path):
    assert len(calibration_text("trainsplit:prose", "x")) > 100_000
    with pytest.raises(ConfigError, match="held-out"):
        calibration_text("heldout:code", "moe-calibrate.text")
    from memc.reference import corpus

    leaked = tmp_path / "leak.txt"
    doc = next(d for d in corpus.split("code", held_out=True) if len(d.data) > 2000)
    leaked.write_bytes(b"my notes\n" + doc.data)
    with pytest.raises(ConfigError, match="contains held-out code text"):
        calibration_text(str(leaked), "moe-calibrate.text")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        calibration_text(str(empty), "moe-calibrate.text")
