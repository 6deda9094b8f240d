"""Atomic output directories: everything is written into a hidden sibling staging directory that is renamed into
place only when the whole compile succeeded, so a failure never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from memc.errors import MemcError

MARKER = ".memc-output"


def check_output_dir(final: Path) -> None:
    """Refuse, before any work, to replace a directory memc did not create."""
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / MARKER).exists())):
        raise MemcError(
            f"output directory {final} exists and was not created by memc; refusing to replace it",
            hint="choose another -o DIR or remove it",
        )


@contextlib.contextmanager
def staged_output_dir(final: Path) -> Iterator[Path]:
    check_output_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should look like any other directory
    try:
        (staging / MARKER).write_text("written by memc; this directory is replaced on the next compile\n")
        yield staging
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp file + rename) so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path``'s content to; it is renamed over ``path`` only when the block
    succeeds (and removed otherwise), so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; the result should look like any other file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
