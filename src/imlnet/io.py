"""Atomic file writing: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any


def _umask_mode() -> int:
    """The permission bits a plain ``open()`` would give a new file (mkstemp gives 0600)."""
    return _dir_mode() & 0o666


def _dir_mode() -> int:
    """The permission bits a plain ``mkdir()`` would give a new folder (mkdtemp gives 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    The temporary file lives in the same directory so that the final ``os.replace`` is atomic on
    POSIX file systems. On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for libraries that want a file name, then rename.

    Use it for writers that take a path rather than a handle (PIL, rasterio, FAISS, safetensors).
    The temporary name keeps the suffix of ``path`` so that format detection by suffix works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (sorted keys, UTF-8, trailing newline)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_texts_atomically(files: Mapping[str | os.PathLike[str], str]) -> None:
    """Write several text files so that a failure leaves none of them changed.

    Every file is first written and synced under a temporary name beside its target; only when
    all are on disk are they renamed into place, one after the other. An exception (disk full,
    permission) before that point leaves every target as it was. A crash during the renames
    leaves each file whole, old or new.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, _umask_mode())
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def _siblings(path: Path, kind: str) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"))


def recover_staged_dir(path: str | os.PathLike[str], *, clean: bool = True) -> None:
    """Repair what a killed :func:`staged_dir` left beside ``path``.

    A kill between the two renames of the swap leaves ``path`` missing and its previous content
    in ``.<name>.old-*``: it is moved back. With ``clean`` (writers, before they start), the
    leftovers of killed runs (staging folders, old copies) are removed as well; readers pass
    ``clean=False`` so that a writer's staging folder in progress is left alone.
    """
    path = Path(path).absolute()  # "." has no name and no sibling
    olds = _siblings(path, "old")
    if olds and not path.exists():
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rename(olds[-1], path)
            olds = olds[:-1]
    if clean:
        for leftover in [*olds, *_siblings(path, "staging")]:
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` whole.

    Why: a command that writes many files (tiles, a gallery) must leave its output folder as
    it was when it fails or is killed half-way. Everything is written into the staging folder;
    at the end the old folder is renamed aside, the staging folder renamed to ``path`` and the
    old one removed. On an exception the staging folder is removed and ``path`` is untouched.
    A kill between the two renames is repaired by :func:`recover_staged_dir`, which this calls
    first. The caller decides whether ``path`` may be replaced (it must hold only the
    command's own files: they are all replaced).
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_staged_dir(path)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    try:
        yield stage
        os.chmod(stage, _dir_mode())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # path is a folder: replaces the empty placeholder
            try:
                os.rename(stage, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
