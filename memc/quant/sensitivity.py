"""Sensitivity of the model output to quantizing one tensor group (q/k/v; gate/up; a tied embedding + LM head)
with one candidate format, all others left in float.

Two scores, both against the original model's own predictions (no labels needed):

* ``fisher``: sum over tokens of (dL/dY)^2 (Y_q - Y)^2 at every output Y the group produces, L the cross-entropy of
  labels sampled from the original model (the Fisher approximation of the KL; one backward per calibration batch;
  modelopt's auto_quantize score). Y_q - Y = X (W_q - W)^T is exact for a linear, so no extra forwards.
* ``kl``: the mean KL(original || quantized) of the output distribution with only that group quantized
  (one forward per group, candidate and batch; needs no backward).
* ``mse``: forward-only too, the output's squared error relative to its mean square: for encoders, whose output
  is a hidden state rather than a distribution.

Scores are made non-increasing in bytes per group (more bytes never scores worse), as modelopt does.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memc.program import Program
from memc.quant.formats import Format, parse_format
from memc.quant.record import Observer, first_output
from memc.quant.rtn import RANGE_RULE, rtn
from memc.quant.sites import TieGroup, WeightTensor


@dataclass
class SensitivityTable:
    groups: list[list[str]]  # member tensor names per group
    group_names: list[str]
    candidates: list[str]
    scores: list[list[float]]  # [group][candidate], monotone
    raw_scores: list[list[float]]
    bytes: list[list[int]]  # [group][candidate] in the target's container
    kind: str
    target: str

    def as_dict(self) -> dict:
        return asdict(self)


def _params(program: Program) -> dict[str, torch.Tensor]:
    out = dict(program.module.named_parameters(remove_duplicate=False))
    out.update(dict(program.module.named_buffers(remove_duplicate=False)))
    return out


def cache_key(program: Program, calib: list[tuple], candidates: list[str], kind: str, target: str, seed: int) -> str:
    h = hashlib.sha256(f"v1|{RANGE_RULE}|{kind}|{target}|{seed}|{','.join(candidates)}".encode())
    for name, t in sorted(program.module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for sample in calib:
        for t in sample:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _kl_job(program: Program, weights: dict[str, WeightTensor], members: list[str], fmt: Format, calib: list[tuple],
            reference: list[torch.Tensor], kind: str = "kl") -> float:
    params = _params(program)
    saved = {m: params[weights[m].targets[0]].detach().clone() for m in members}
    try:
        with torch.no_grad():
            for m in members:
                params[weights[m].targets[0]].copy_(rtn(saved[m], fmt).dequantize())
            total, count = 0.0, 0
            for sample, ref in zip(calib, reference):
                out = first_output(program.module(*sample)).double()
                if kind == "kl":
                    logp = torch.log_softmax(out, -1)
                    total += float((ref.exp() * (ref - logp)).sum())
                    count += ref[..., 0].numel()
                else:
                    total += float((out - ref).pow(2).sum() / ref.pow(2).mean())
                    count += ref.numel()
        return total / max(count, 1)
    finally:
        with torch.no_grad():
            for m in members:
                params[weights[m].targets[0]].copy_(saved[m])


def _forward_scores(program, weights, jobs, groups, fmts, calib, kind) -> dict[tuple[int, int], float]:
    with torch.no_grad():
        reference = [first_output(program.module(*s)).double() for s in calib]
    if kind == "kl":
        reference = [torch.log_softmax(r, -1) for r in reference]
    return {(g, c): _kl_job(program, weights, groups[g], fmts[c], calib, reference, kind) for g, c in jobs}


def _fisher_scores(program, weights, jobs, groups, fmts, calib, seed) -> dict[tuple[int, int], float]:
    """One forward + backward per sample; then each job's score from the recorded inputs and output gradients."""
    params = _params(program)
    uses = {u.node: (w.name, u.kind) for w in weights.values() for u in w.uses}
    deltas: dict[tuple[str, int], torch.Tensor] = {}
    for g, c in jobs:
        for m in groups[g]:
            w = params[weights[m].targets[0]].detach().float()
            deltas[m, c] = rtn(w, fmts[c]).dequantize() - w
    scores = {job: 0.0 for job in jobs}
    gen = torch.Generator().manual_seed(seed)
    for sample in calib:
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def on_output(node: str, y: torch.Tensor) -> None:
            y.retain_grad()
            outputs[node] = y

        obs = Observer(program.module, set(uses), on_input=lambda n, x: inputs.__setitem__(n, x.detach()),
                       on_output=on_output)
        with torch.enable_grad():
            for p in params.values():
                p.requires_grad_(p.is_floating_point())
            logits = first_output(obs.run(*sample)).float()
            flat = logits.reshape(-1, logits.shape[-1])
            labels = torch.multinomial(torch.softmax(flat.detach().double(), -1), 1, generator=gen).squeeze(-1)
            torch.nn.functional.cross_entropy(flat, labels, reduction="sum").backward()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for g, c in jobs:
            s = 0.0
            for m in groups[g]:
                d = deltas[m, c]
                for node, (name, kind) in uses.items():
                    if name != m or outputs[node].grad is None:
                        continue
                    x = inputs[node]
                    dy = x.float() @ d.T if kind == "linear" else torch.nn.functional.embedding(x, d)
                    s += float((outputs[node].grad.double().pow(2) * dy.double().pow(2)).sum())
            scores[g, c] += s
    return scores


def score_jobs(program, weights, groups, candidates, calib, kind, seed, jobs) -> dict[tuple[int, int], float]:
    fmts = [parse_format(c) for c in candidates]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process: 2 workers == 1 worker, bit for bit
    try:
        if kind in ("kl", "mse"):
            return _forward_scores(program, weights, jobs, groups, fmts, calib, kind)
        return _fisher_scores(program, weights, jobs, groups, fmts, calib, seed)
    finally:
        torch.set_num_threads(threads)


def _worker(rank: int, world: int, port: int, args: tuple, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        program, weights, groups, candidates, calib, kind, seed, jobs = args
        mine = score_jobs(program, weights, groups, candidates, calib, kind, seed, jobs[rank::world])
        gathered: list = [None] * world
        dist.all_gather_object(gathered, sorted(mine.items()))
        if rank == 0:
            merged = {tuple(k): v for part in gathered for k, v in part}
            torch.save(merged, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_scores(program, weights, groups, candidates, calib, kind, seed, workers=1) -> dict[tuple[int, int], float]:
    """Every (group, non-keep candidate) score; ``workers`` > 1 splits the grid over processes (gloo)."""
    jobs = [(g, c) for g in range(len(groups)) for c, name in enumerate(candidates) if name != "keep"]
    if workers <= 1:
        return score_jobs(program, weights, groups, candidates, calib, kind, seed, jobs)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="memc-sensitivity-") as tmp:
        out = os.path.join(tmp, "scores.pt")
        args = (program, weights, groups, candidates, calib, kind, seed, jobs)
        # fork: the workers inherit the program (an exported GraphModule does not pickle for spawn)
        mp.start_processes(_worker, args=(workers, _free_port(), args, out), nprocs=workers, join=True,
                           start_method="fork")
        return torch.load(out)


def monotone(scores: list[float], nbytes: list[int]) -> list[float]:
    """Non-increasing in bytes: a candidate never scores worse than a cheaper one."""
    order = sorted(range(len(scores)), key=lambda i: (nbytes[i], -scores[i]))
    out = list(scores)
    best = math.inf
    for i in order:
        best = min(best, scores[i])
        out[i] = best
    return out


def build_table(
    program: Program, weights: list[WeightTensor], groups: list[TieGroup], candidates: list[str], calib: list[tuple],
    kind: str, target: str, seed: int, workers: int = 1, cache_dir: str = "",
) -> tuple[SensitivityTable, bool]:
    """The sensitivity table, from the disk cache when the model, calibration and candidates are unchanged."""
    path = None
    if cache_dir:
        key = cache_key(program, calib, candidates, kind, target, seed)
        path = Path(cache_dir).expanduser() / f"{key}.json"
        if path.is_file():
            return SensitivityTable(**json.loads(path.read_text())), True
    by_name = {w.name: w for w in weights}
    members = [g.members for g in groups]
    fmts = [parse_format(c) for c in candidates]
    nbytes = [[sum(f.nbytes(by_name[m].shape, target) for m in g) for f in fmts] for g in members]
    raw = compute_scores(program, by_name, members, candidates, calib, kind, seed, workers)
    raw_table = [[0.0 if candidates[c] == "keep" else raw[g, c] for c in range(len(candidates))] for g in range(len(members))]
    table = SensitivityTable(
        members, [g.name for g in groups], list(candidates), [monotone(r, b) for r, b in zip(raw_table, nbytes)],
        raw_table, nbytes, kind, target,
    )
    if path is not None:
        from memc.atomic import write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, table.as_dict())
    return table, False
