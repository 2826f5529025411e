"""Helpers shared by the benchmark (``generate``) and the world (``world``) writers.

Random streams, the draw of a view's season and weather, JPEG encoding, and the staged output
folder that makes a crash leave the previous output (or nothing), never half of a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from imlnet.errors import ImlnetError

DEFAULT_WEATHER = {
    "clear": 0.5,
    "haze": 0.15,
    "fog": 0.07,
    "rain": 0.12,
    "snow": 0.06,
    "night": 0.10,
}
DEFAULT_SEASONS = {"spring": 0.25, "summer": 0.25, "autumn": 0.25, "winter": 0.25}


def random_stream(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """An independent random stream per ``(seed, index, purpose)``.

    Why: every city, target and flight draws from its own stream, so the output does not depend
    on the order, the process or the device that renders it.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 16 + stream)


def draw(table: dict[str, float], gen: torch.Generator) -> str:
    """One name of ``table`` drawn with probability proportional to its weight."""
    names = list(table)
    weights = torch.tensor([table[n] for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(weights, 1, generator=gen))]


def draw_conditions(
    seasons: dict[str, float], weather: dict[str, float], gen: torch.Generator
) -> tuple[str, str]:
    """A ``(season, weather)`` pair; falling snow outside winter becomes rain (or clear)."""
    season, sky = draw(seasons, gen), draw(weather, gen)
    if sky == "snow" and season != "winter":
        sky = "rain" if weather.get("rain", 0) > 0 else "clear"
    return season, sky


def encode_jpeg(img: torch.Tensor, quality: int) -> bytes:
    """``(3, H, W)`` float image in [0, 1] -> JPEG bytes (4:4:4, no metadata, deterministic)."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path, tag: str) -> int | None:
    """The process id in a staging name ``.<name>.<tag>-<pid>-...``, or None."""
    rest = path.name.split(f".{tag}-", 1)[-1]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def recover_staging(out: Path) -> None:
    """Clean up after a run of the same output that was killed (SIGKILL, power loss).

    A killed run leaves ``.<name>.partial-<pid>-*`` (its unfinished output: removed) and, in the
    non-atomic fallback swap only, ``.<name>.old-<pid>`` (the previous output: put back when
    ``out`` is missing, removed when ``out`` is there). Folders of live processes are left alone.
    """
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.partial-*"):
        pid = _owner(path, "partial")
        if pid is not None and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
    for path in out.parent.glob(f".{out.name}.old-*"):
        pid = _owner(path, "old")
        if pid is None or _pid_alive(pid):
            continue
        if out.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.rename(out)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def publish(tmp: Path, out: Path) -> None:
    """Make the finished folder ``tmp`` the new ``out``.

    With an existing ``out`` the two are swapped in one atomic step where the system allows it
    (Linux), so a crash at any moment leaves the old or the new output at ``out``; elsewhere the
    old folder is renamed aside first and :func:`recover_staging` puts it back after a crash.
    """
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` that replaces ``out`` when the block succeeds.

    An interrupted run leaves no half dataset behind and an existing ``out`` untouched (it is
    refused unless ``overwrite``); leftovers of a killed run are cleaned up first.

    Raises:
        ImlnetError: ``out`` exists, is not empty, and ``overwrite`` is False.
    """
    recover_staging(out)
    if out.exists() and not out.is_dir():
        raise ImlnetError(f"{out} is a file, not a folder; choose a folder for the output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ImlnetError(
            f"{out} exists and is not empty; choose another folder or pass "
            "--overwrite to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
