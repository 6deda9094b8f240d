"""Example inputs: synthesised from specs, and re-drawn at other sizes to check that dynamic axes really work."""
from __future__ import annotations

import torch

from memc.config import TensorSpec
from memc.program import DimSpec, Program

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def tensor_from_spec(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    dtype = _DTYPES[spec.dtype]
    if dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=gen).bool()
    if not dtype.is_floating_point:
        return torch.randint(0, spec.high or 2, spec.shape, generator=gen, dtype=dtype)
    return torch.randn(spec.shape, generator=gen).to(dtype)


def dims_from_specs(specs: list[TensorSpec], max_size: int | None = None) -> dict[str, dict[int, DimSpec]]:
    return {
        s.name: {int(axis): DimSpec(name, 1, max_size) for axis, name in s.dynamic.items()} for s in specs
    }


def token_inputs(
    names: list[str], batch: int, seq: int, vocab: int, gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """input_ids uniform over the vocabulary; attention_mask with the last row's tail padded (exercises masking)."""
    out = []
    for name in names:
        if name == "input_ids":
            out.append(torch.randint(0, vocab, (batch, seq), generator=gen))
        elif name == "attention_mask":
            mask = torch.ones(batch, seq, dtype=torch.int64)
            if batch > 1 and seq > 2:
                mask[-1, seq - seq // 4 :] = 0
            out.append(mask)
        elif name == "token_type_ids":
            out.append(torch.zeros(batch, seq, dtype=torch.int64))
        else:
            raise ValueError(f"no rule to synthesise token-model input {name!r}")
    return tuple(out)


def resized_inputs(program: Program, sizes: dict[str, int], seed: int) -> tuple[torch.Tensor, ...]:
    """New inputs like the example inputs, with each dynamic dimension name set to ``sizes[name]``."""
    gen = torch.Generator().manual_seed(seed)
    if program.source.task in ("causal-lm", "encoder") and program.source.vocab_size:
        batch = sizes.get("batch", program.example_inputs[0].shape[0])
        seq = sizes.get("seq", program.example_inputs[0].shape[1])
        return token_inputs(program.input_names, batch, seq, program.source.vocab_size, gen)
    out = []
    for name, example in zip(program.input_names, program.example_inputs):
        shape = list(example.shape)
        for axis, dim in program.dynamic_dims.get(name, {}).items():
            shape[axis] = sizes.get(dim.name, shape[axis])
        if example.dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        elif not example.dtype.is_floating_point:
            high = int(example.max()) + 1 if example.numel() else 1
            out.append(torch.randint(0, max(high, 1), shape, generator=gen, dtype=example.dtype))
        else:
            out.append(torch.randn(shape, generator=gen).to(example.dtype))
    return tuple(out)


def alternate_sizes(program: Program) -> dict[str, int]:
    """A different legal value for every dynamic dimension (to prove the artifact is not specialised)."""
    sizes: dict[str, int] = {}
    for name, example in zip(program.input_names, program.example_inputs):
        for axis, dim in program.dynamic_dims.get(name, {}).items():
            current = example.shape[axis]
            bigger = current + 3
            sizes[dim.name] = bigger if dim.max is None or bigger <= dim.max else max(dim.min, current - 1)
    return sizes
