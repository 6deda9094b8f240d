"""The ``quant-sensitivity`` pass: per tensor group and candidate format, the damage at the model output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memc.config import TargetConfig
from memc.errors import ConfigError, PassError
from memc.passes.base import Pass, PassContext, PassResult, register_pass
from memc.passes.quant.graph_bytes import measure_graph_bytes
from memc.program import Program
from memc.quant.formats import TARGETS, parse_format
from memc.quant.sensitivity import build_table, cache_key
from memc.quant.sites import find_weights, tie_groups
from memc.schema import option

SENSITIVITY = "quant.sensitivity"
DEFAULT_CANDIDATES = [  # int2-g128 / -g256: what makes 2.5 bits per parameter reachable once the graph's bytes count
    "int2-g16", "int2-g32", "int2-g64", "int4-g32", "int4-g64", "int4-g128", "int8-g64", "int2-g128", "int2-g256", "keep",
]


@dataclass
class SensitivityOptions:
    candidates: list[str] = option(factory=lambda: list(DEFAULT_CANDIDATES), doc="formats to choose from (memc.quant.formats names)")
    score: Literal["fisher", "kl", "mse"] = option(
        "fisher", "fisher: gradient-weighted output error (one backward per batch); kl: forward-only KL of the output "
        "distribution; mse: forward-only relative squared error of the output (encoders)"
    )
    workers: int = option(1, "processes that split the (tensor, candidate) grid (torch.distributed, gloo)")
    cache_dir: str = option("~/.cache/memc/sensitivity", "scores cached here by model + calibration + candidates; '' = off")
    measure_graph: bool = option(True, "lower the program once to measure the artifact's non-weight bytes (cached too)")

    def validate(self) -> None:
        if not self.candidates:
            raise ValueError("candidates must list at least one format")
        for i, c in enumerate(self.candidates):
            try:
                parse_format(c, f"candidates[{i}]")
            except ConfigError as exc:  # from_dict prefixes the pipeline entry's key path
                raise ValueError(str(exc)) from None
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates has duplicates")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")


@register_pass
class QuantSensitivity(Pass):
    """Score every (tensor group, candidate format) by the output damage of quantizing only that group."""

    name = "quant-sensitivity"
    Config = SensitivityOptions
    provides = frozenset({SENSITIVITY})

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        opts = self.config
        target_cfg = ctx.config.target if ctx.config is not None else TargetConfig()
        target = target_cfg.name
        for i, c in enumerate(opts.candidates):
            refused = TARGETS[target].refusal(parse_format(c))
            if refused:
                raise ConfigError(
                    f"quant-sensitivity.candidates[{i}]: format {c!r} cannot be stored by the {target} target ({refused})"
                )
        if not ctx.calibration:
            raise PassError("quant-sensitivity needs calibration samples ([calibration] num_samples >= 1)")
        weights, fixed = find_weights(program)
        if not weights:
            raise PassError("quant-sensitivity: the program has no linear or embedding weights to quantize")
        groups = tie_groups(weights)
        table, cached = build_table(
            program, weights, groups, opts.candidates, ctx.calibration, opts.score, target, ctx.seed, opts.workers,
            opts.cache_dir,
        )
        graph_bytes = None
        if opts.measure_graph:
            graph_bytes = self._graph_bytes(program, weights, table, target_cfg, ctx)
        total_params, param_bytes = program.parameter_stats()
        program.annotations[SENSITIVITY] = {
            "table": table, "graph_bytes": graph_bytes, "fixed_bytes": fixed, "total_params": total_params,
            "original_bytes": param_bytes, "weights": weights, "target": target_cfg,
        }
        return PassResult(program, False, {
            "groups": len(groups), "tensors": len(weights), "candidates": len(opts.candidates), "score": opts.score,
            "workers": opts.workers, "cached": cached, "graph_bytes": graph_bytes,
        })

    def _graph_bytes(self, program, weights, table, target_cfg, ctx) -> int:
        import json
        from pathlib import Path

        from memc.atomic import write_json

        cheapest: dict[str, str] = {}
        for members, row in zip(table.groups, table.bytes):
            c = min((b, i) for i, b in enumerate(row) if table.candidates[i] != "keep")[1] \
                if any(n != "keep" for n in table.candidates) else 0
            for m in members:
                cheapest[m] = table.candidates[c]
        path = None
        if self.config.cache_dir:
            key = cache_key(program, [], sorted(set(cheapest.values())), "graph-v4", f"{target_cfg.name}-{target_cfg.opset}-{target_cfg.optimize}", 0)
            path = Path(self.config.cache_dir).expanduser() / f"graph-{key}.json"
            if path.is_file():
                return int(json.loads(path.read_text())["graph_bytes"])
        value = measure_graph_bytes(program, weights, cheapest, target_cfg)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"graph_bytes": value})
        return value
