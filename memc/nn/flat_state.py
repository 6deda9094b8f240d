"""What every recurrent decode state shares: a dataclass of plain tensors with a fixed field order.

The order is the graph's: decode graphs take and return a state as this flat list of tensors (memc.codegen
.decode_rewrite), so ``tensors`` / ``from_tensors`` must agree with the dataclass's fields, which ``checked``
asserts once per class.
"""
from __future__ import annotations

from dataclasses import fields
from typing import ClassVar, TypeVar

import torch

S = TypeVar("S", bound="FlatState")


class FlatState:
    FIELDS: ClassVar[tuple[str, ...]]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return cls.FIELDS

    def tensors(self) -> list[torch.Tensor]:
        """The state as an ordered flat list (the order of ``names()``), e.g. for ONNX inputs/outputs."""
        return [getattr(self, name) for name in self.FIELDS]

    @classmethod
    def from_tensors(cls: type[S], tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> S:
        if len(tensors) != len(cls.FIELDS):
            raise ValueError(f"{cls.__name__}.from_tensors: expected {len(cls.FIELDS)} tensors {cls.FIELDS}, "
                             f"got {len(tensors)}")
        return cls(*tensors)

    def spec(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every tensor, in order."""
        return [(name, tuple(t.shape), t.dtype) for name, t in zip(self.FIELDS, self.tensors())]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self: S) -> S:
        return type(self)(*(t.clone() for t in self.tensors()))


def checked(cls: type[S]) -> type[S]:
    """Class decorator (after @dataclass): the dataclass's fields are FIELDS, in order."""
    assert tuple(f.name for f in fields(cls)) == cls.FIELDS, (cls.__name__, cls.FIELDS)
    return cls
