"""Capture: load a model from any supported source and export it to a Program with torch.export.

Sources: a torch.export archive (.pt2), a Hugging Face model directory, a factory ``package.module:function``,
and a pickled nn.Module (.pt/.pth/.pkl) only when the user explicitly trusts it.
"""
from memc.capture.loaders import capture, resolve_kind

__all__ = ["capture", "resolve_kind"]
