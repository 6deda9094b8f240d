"""``[output] hf_checkpoint``: write the compiled program's weights as a Hugging Face checkpoint (hf/ in the output)
that ``from_pretrained`` loads, with config.json's expert count updated after uniform expert pruning, and check
that transformers' model computes the same logits as the program."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memc.errors import MemcError, VerificationError
from memc.program import Program
from memc.tokenizer_files import copy_tokenizer

HF_DIR = "hf"
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def check_hf_checkpoint(program: Program) -> None:
    """Refuse what a single HF config cannot describe, before anything is written."""
    if program.source.kind != "hf":
        raise MemcError(f"output.hf_checkpoint: needs a Hugging Face model directory as the source, got a {program.source.kind} model")
    pruned = program.annotations.get("moe.pruned")
    if pruned and not pruned["uniform"]:
        raise MemcError(
            "output.hf_checkpoint: the experts were pruned non-uniformly "
            f"({sorted(set(pruned['experts'].values()))} experts per layer) and a Hugging Face config holds one count",
            hint='use prune-experts budget = "uniform", or set [output] hf_checkpoint = false',
        )


def write_hf_checkpoint(program: Program, out_dir: Path, atol: float) -> dict[str, Any]:
    """Write ``out_dir/hf`` and verify it against the program on its example inputs; returns what was checked."""
    import transformers
    from safetensors.torch import save_file

    check_hf_checkpoint(program)
    source = Path(program.source.path)
    target = out_dir / HF_DIR
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    pruned = program.annotations.get("moe.pruned")
    if pruned:
        count = next(iter(pruned["experts"].values()))
        for key in EXPERT_KEYS:
            if key in config:
                config[key] = count
    config["dtype"] = str(next(program.module.parameters()).dtype).replace("torch.", "")
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_config = transformers.AutoConfig.from_pretrained(target, local_files_only=True)
    cls = getattr(transformers, hf_config.architectures[0])
    with torch.device("meta"):
        expected = set(cls(hf_config).state_dict())
    state = {k: v.detach().contiguous().clone() for k, v in program.module.state_dict().items() if k in expected}
    tied = sorted(expected - set(state))
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    for name in ("generation_config.json",):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    copy_tokenizer(source, target)
    from memc.capture.hf import load_pretrained

    model = load_pretrained(target, program.source.task).model
    ids = program.example_inputs
    with torch.no_grad():
        if program.source.task == "causal-lm":
            got = model(input_ids=ids[0], use_cache=False).logits
        else:
            got = model(input_ids=ids[0], attention_mask=ids[1]).last_hidden_state
    want = program(*ids)[0]
    diff = float((got.double() - want.double()).abs().max())
    if diff > atol:
        raise VerificationError(f"output.hf_checkpoint: transformers' model from {HF_DIR}/ differs from the program by "
                                f"max |Δ| {diff:.3g} > atol {atol:g}")
    return {"dir": HF_DIR, "max_abs_diff": diff, "experts": config.get(next((k for k in EXPERT_KEYS if k in config), ""), None),
            "tied_or_derived": tied, "bytes": sum(f.stat().st_size for f in target.iterdir())}
