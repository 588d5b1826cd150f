"""Atomic file writes: a temporary file in the target's folder, then a rename, so a crash at any
moment leaves the old file or the new one, never a torn one. Imports nothing heavy (dataset_tools
uses it too)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Iterable


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """`open()` for writing whose result appears at `path` only when the block ends without error.
    The temporary file is `.tmp-*<ext>` beside `path` (checkpoint clean-up looks for that name)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; datasets and checkpoints are shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file's bytes (which tokenizer a checkpoint was trained with); None when no path
    is given or it is not a file."""
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> int:
    """One line per item (a newline added to each); returns how many were written."""
    count = 0
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
            count += 1
    return count


def replace_folder(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the finished folder `tmp` at `dst`: a reader sees the old folder or the new one, never a
    half-written one (for an instant, none: os.replace cannot swap two folders in one step)."""
    dst = os.fspath(dst)
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
