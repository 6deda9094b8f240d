"""Calibration / verification samples: random inputs shaped like the example, or windows of real text."""
from __future__ import annotations

from pathlib import Path

import torch

from memc.capture.inputs import resized_inputs
from memc.config import CalibrationConfig, InputsConfig
from memc.errors import ConfigError
from memc.program import Program
from memc.tokenizer_files import has_tokenizer



def _tokenize(text: str, program: Program, how: str) -> list[int]:
    model_dir = Path(program.source.path)
    found = program.source.kind == "hf" and has_tokenizer(model_dir)
    if how == "auto":
        how = "hf" if found else "bytes"
    if how == "hf":
        if not found:
            raise ConfigError(f"calibration.tokenizer: 'hf' needs tokenizer files in the model directory {model_dir}")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)(text)["input_ids"]
    vocab = program.source.vocab_size or 0
    if vocab < 256:
        raise ConfigError(
            f"calibration.tokenizer: byte-level tokens need a vocabulary of >= 256, the model has {vocab}",
            hint="give a model directory with a tokenizer, or use calibration.source = \"random\"",
        )
    return list(text.encode("utf-8"))


def calibration_text(source: str) -> str:
    """``trainsplit:code`` / ``trainsplit:prose`` (the reference corpus's train split) or a UTF-8 file; held-out
    text is refused (see memc.eval.text.load_train_text)."""
    from memc.eval.text import load_train_text

    return load_train_text(source, "calibration.source").decode("utf-8")


def calibration_samples(
    program: Program, cfg: CalibrationConfig, inputs: InputsConfig, seed: int
) -> list[tuple[torch.Tensor, ...]]:
    if cfg.source == "random":
        return [resized_inputs(program, {}, seed + 1 + i) for i in range(cfg.num_samples)]
    if program.source.task not in ("causal-lm", "encoder"):
        raise ConfigError("calibration.source: text calibration needs a token model (HF causal-lm or encoder)")
    path = Path(cfg.source)
    text = calibration_text(cfg.source)
    tokens = _tokenize(text, program, cfg.tokenizer)
    seq = cfg.seq_len or inputs.seq_len
    need = seq * inputs.batch
    if len(tokens) < need:
        raise ConfigError(f"calibration.source: {path} has {len(tokens)} tokens; one sample needs {need}")
    stride = max((len(tokens) - need) // max(cfg.num_samples - 1, 1), 1)
    samples = []
    for i in range(cfg.num_samples):
        start = min(i * stride, len(tokens) - need)
        ids = torch.tensor(tokens[start : start + need], dtype=torch.int64).view(inputs.batch, seq)
        extra = [torch.ones_like(ids)] if "attention_mask" in program.input_names else []
        samples.append((ids, *extra))
    return samples
