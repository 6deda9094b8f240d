"""Train-split text with planted key -> value lines, for distilling memory-caching layers on the recall model.

``python -m memc.reference.recall_text --out /tmp/recall-train.txt`` writes the first ``--bytes`` of the train
split's code with a line ``k_xxxxx = 'vvvvvv'`` (the recall probe's format) planted about every ``--every`` bytes
and repeated, as the query with its answer, 1..``--max-gap`` bytes later (~3.5 bytes a token: up to ~900 tokens).
Distillation on plain code never shows a layer a token that must be fetched from far back; this text does, in
every window, and it is train-split text only (the distill pass refuses held-out text). Lines are inserted
whole, between filler lines, so the filler is never cut.
"""
from __future__ import annotations

import argparse
import bisect
from pathlib import Path

import numpy as np

from memc.atomic import atomic_file
from memc.eval.recall import VALUE_LEN, _word
from memc.reference import corpus
from memc.reference.recall import head


def pair_line(rng: np.random.Generator) -> bytes:
    return f"k_{_word(rng, 5)} = '{_word(rng, VALUE_LEN)}'\n".encode()


def planted_text(filler: bytes, rng: np.random.Generator, every: int = 300, max_gap: int = 3200) -> bytes:
    """`filler` (whole lines) with a planted line before the filler line at about every `every` bytes and the
    same line again before the first filler line at least 1..max_gap bytes later (always a later line)."""
    if every < 1 or max_gap < 1:
        raise ValueError(f"every and max_gap must be >= 1, got {every}, {max_gap}")
    lines = filler.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(x) for x in lines[:-1]]).tolist()
    inserts: list[tuple[int, int, bytes]] = []  # (before filler line, order, line)
    at = int(rng.integers(0, every))
    while at < len(filler):
        i = bisect.bisect_left(starts, at)
        gap = int(rng.integers(1, max_gap + 1))
        j = max(i + 1, bisect.bisect_left(starts, at + gap))
        if j >= len(lines):
            break
        line = pair_line(rng)
        inserts += [(i, len(inserts), line), (j, len(inserts) + 1, line)]
        at += int(rng.integers(every // 2, every + every // 2 + 1))
    inserts.sort()
    out, k = [], 0
    for n, text in enumerate(lines):
        while k < len(inserts) and inserts[k][0] == n:
            out.append(inserts[k][2])
            k += 1
        out.append(text)
    return b"".join(out)


def train_filler() -> bytes:
    """The train split's code without the train documents that contain a held-out document verbatim (a file
    that occurs in both splits): the distill pass refuses a text file holding held-out text."""
    held = [d.data for d in corpus.split("code", True) if len(d.data) >= 64]
    return corpus.join(tuple(d for d in corpus.split("code", False) if not any(h in d.data for h in held)))


def write(out: Path, n_bytes: int = 2_000_000, seed: int = 0, every: int = 300, max_gap: int = 3200) -> dict:
    """Write the planted text of the first n_bytes of train_filler(); returns its recipe (for a report)."""
    data = planted_text(head(train_filler(), n_bytes), np.random.default_rng(seed), every, max_gap)
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return {"source": "trainsplit:code", "filler_bytes": n_bytes, "seed": seed, "every": every,
            "max_gap": max_gap, "bytes": len(data)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bytes", type=int, default=2_000_000, help="filler: the first BYTES of the train split's code")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--max-gap", type=int, default=3200)
    a = p.parse_args(argv)
    print(write(a.out, a.bytes, a.seed, a.every, a.max_gap))


if __name__ == "__main__":
    main()
