"""The bytes an ONNX artifact stores besides the quantized tensors (graph, names, norms, constants), measured by
lowering the program once with every tensor at its cheapest candidate."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from memc.config import TargetConfig
from memc.passes.quant.apply import apply_quantization
from memc.program import Program
from memc.quant.formats import parse_format
from memc.quant.rtn import rtn
from memc.quant.sites import WeightTensor


def measure_graph_bytes(program: Program, weights: list[WeightTensor], cheapest: dict[str, str],
                        target: TargetConfig) -> int:
    """model.onnx bytes minus the quantized tensors' bytes, for this program at ``target``'s opset."""
    from memc.targets.onnxruntime import MODEL_FILE, OnnxRuntimeTarget

    trial = program.replace(module=copy.deepcopy(program.module), annotations={}, log=[])
    params = dict(trial.module.named_parameters(remove_duplicate=False))
    params.update(dict(trial.module.named_buffers(remove_duplicate=False)))
    quantized = {
        w.name: rtn(params[w.targets[0]].detach(), parse_format(cheapest[w.name]))
        for w in weights if cheapest.get(w.name, "keep") != "keep"
    }
    stored = apply_quantization(trial, weights, quantized)
    cfg = copy.deepcopy(target)
    cfg.decode_graph = False
    with tempfile.TemporaryDirectory(prefix="memc-graph-bytes-") as tmp:
        t = OnnxRuntimeTarget(cfg)
        t.build(trial, Path(tmp))
        size = (Path(tmp) / MODEL_FILE).stat().st_size
    kept = sum(w.numel * 4 for w in weights if cheapest.get(w.name, "keep") == "keep")
    return size - stored - kept
