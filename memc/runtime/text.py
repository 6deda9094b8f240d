"""Text in and out of a compiled artifact: its shipped tokenizer, and a stream of decoded text with stop strings.

``memc compile`` copies the source directory's tokenizer files beside the artifact (memc.tokenizer_files), so an
artifact reads and writes text on its own. ``tokenizer.json`` is read with the ``tokenizers`` library (no torch);
other formats (sentencepiece ``tokenizer.model``, ``vocab.txt`` ...) go through transformers' AutoTokenizer.
Ids are encoded without special tokens, as memc's evaluation encodes text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from memc.errors import ArtifactError
from memc.tokenizer_files import TOKENIZER_FILES, has_tokenizer

_HINT = ("memc ships the source model's tokenizer files beside the artifact when the Hugging Face directory has "
         f"them ({', '.join(TOKENIZER_FILES)}); recompile from such a directory, or copy the tokenizer files in")


class ArtifactTokenizer:
    """``encode(text) -> int64 ids`` and ``decode(ids) -> text`` with the artifact's tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 eos_token_id: int | None, kind: str):
        self._encode, self._decode = encode, decode
        self.eos_token_id = eos_token_id
        self.kind = kind

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])


def _special_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def byte_tokenizer() -> ArtifactTokenizer:
    """A byte-level model's text codec (ids = UTF-8 bytes), as memc eval reads text for such models."""
    return ArtifactTokenizer(lambda text: list(text.encode("utf-8")),
                             lambda ids: bytes(ids).decode("utf-8", errors="replace"), None, "bytes")


def load_tokenizer(directory: str | Path, vocab_size: int | None = None) -> ArtifactTokenizer:
    """The tokenizer shipped in ``directory``; without one, raw UTF-8 bytes for a model whose vocabulary is exactly
    the 256 byte values (byte-level models such as ref-moe ship no tokenizer); ArtifactError otherwise."""
    directory = Path(directory)
    if not has_tokenizer(directory):
        if vocab_size == 256:
            return byte_tokenizer()
        raise ArtifactError(f"{directory} has no tokenizer, so text cannot be turned into token ids", hint=_HINT)
    config_file = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{config_file} is not readable JSON: {exc}") from None
    eos = _special_token(config, "eos_token")
    if (directory / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ArtifactError("reading tokenizer.json needs the `tokenizers` package",
                                hint="pip install 'memc[hf]'") from None
        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:
            raise ArtifactError(f"{directory / 'tokenizer.json'} is not a readable tokenizer: {exc}") from None
        return ArtifactTokenizer(
            lambda text: tok.encode(text, add_special_tokens=False).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=False),
            tok.token_to_id(eos) if eos else None, "tokenizers",
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ArtifactError(f"{directory}: its tokenizer files could not be loaded: {type(exc).__name__}: {exc}",
                            hint="pip install 'memc[hf]' (transformers reads tokenizer.model / vocab files)") from None
    return ArtifactTokenizer(
        lambda text: tok(text, add_special_tokens=False)["input_ids"],
        lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        tok.eos_token_id, "transformers",
    )


class TextStream:
    """New tokens in, printable text out, for one sequence.

    Each push decodes every token so far (a byte-level BPE may split one character over several tokens) and returns
    the text not yet returned, holding back an incomplete character (decoded as U+FFFD) and any tail that could be
    the start of a stop string. When a stop string appears, the text ends just before it and ``stopped`` is set.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self.stopped = False

    def _held_back(self, text: str) -> int:
        hold = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        full = self._decode(self.ids)
        cuts = [full.find(s) for s in self.stops if s in full]
        if cuts:
            self.stopped = True
            final = full[:min(cuts)]
        else:
            final = full[:len(full) - self._held_back(full)]
        if not final.startswith(self.text):  # a tokenizer whose decode of a prefix is not a prefix: wait
            return ""
        out = final[len(self.text):]
        self.text = final
        return out

    def finish(self) -> str:
        """The text held back at the end (nothing after a stop string)."""
        if self.stopped:
            return ""
        full = self._decode(self.ids)
        out = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += out
        return out
