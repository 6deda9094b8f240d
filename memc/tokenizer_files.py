"""The files that make an HF model directory's tokenizer: found for calibration and eval, and shipped beside a
compiled artifact so the artifact can be fed text without its source directory."""
from __future__ import annotations

import shutil
from pathlib import Path

# any one of these means the directory has a tokenizer (transformers' AutoTokenizer does not tell: for a
# directory without them it builds an empty tokenizer that maps every word to [UNK])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")
# read with them when present
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")


def has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def copy_tokenizer(src: Path | None, dst: Path) -> list[str]:
    """Copy src's tokenizer files into dst; the names copied (none when src has no tokenizer)."""
    if not has_tokenizer(src):
        return []
    names = [f for f in TOKENIZER_FILES + COMPANION_FILES if (Path(src) / f).is_file()]
    for name in names:
        shutil.copyfile(Path(src) / name, dst / name)
    return names
