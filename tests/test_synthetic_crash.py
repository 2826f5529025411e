"""``imlnet synth`` killed with SIGKILL at several moments: the previous output stays intact and
readable, and running the same command again finishes the job (issue 13, point 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from imlnet.data.synthetic import generate as G
from imlnet.data.synthetic.config import SynthConfig
from imlnet.data.synthetic.scene import SceneConfig

ARGS = ["--locations", "2", "--distractors", "0", "--views", "2", "--image-size", "32"]
ARGS += ["--city-size-m", "400", "--quiet"]


def _config(seed: int) -> SynthConfig:
    return SynthConfig(
        locations=2, distractors=0, views=2, size=32, seed=seed, scene=SceneConfig(extent_m=400.0)
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status


def _start(out: Path, *extra: str) -> subprocess.Popen:
    src = str(Path(G.__file__).parents[3])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "imlnet.cli", "synth", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """Poll until ``ready()`` or the process ends; True when ``ready()`` came first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("timed out")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_sigkill_at_any_moment_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    G.generate(_config(seed=1), out, progress=False, workers=0)
    before = _snapshot(out)
    partials = lambda: list(tmp_path.glob(".out.partial-*"))  # noqa: E731
    moments = {
        "starting (imports)": lambda: True,
        "staging folder made": lambda: bool(partials()),
        "first city written": lambda: any(p.rglob("*.jpeg") for p in partials()),
        "metadata written, not yet published": lambda: any(
            (p / "metadata.json").exists() for p in partials()
        ),
    }
    hit = {}
    for name, ready in moments.items():
        extra = ["--workers", "2"] if name == "first city written" else ["--workers", "0"]
        proc = _start(out, "--seed", "2", "--overwrite", *extra)
        hit[name] = _wait_for(proc, ready)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The folder holds the previous output byte for byte, or (when the run got there first)
        # the complete new one: never a mix, never nothing.
        now = _snapshot(out)
        assert now == before or G.up_to_date(_config(seed=2), out), name
        if now == before:
            meta = json.loads((out / "metadata.json").read_text())
            for bid, loc in meta["locations"].items():
                folder = "train" if loc["split"] == "train" else "test"
                kind = "satellite" if folder == "train" else "gallery_satellite"
                Image.open(out / folder / kind / bid / f"{bid}.jpg").load()
        # Worker processes do not outlive a killed parent.
        end = time.monotonic() + 10
        while not all(_gone(w) for w in workers) and time.monotonic() < end:
            time.sleep(0.05)
        assert all(_gone(w) for w in workers), (name, workers)
    print(hit)
    assert hit["staging folder made"] and hit["first city written"], hit
    # The same command again: cleans up what the killed runs left and finishes.
    proc = _start(out, "--seed", "2", "--overwrite")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert G.up_to_date(_config(seed=2), out)
    assert not partials() and not list(tmp_path.glob(".out.old-*"))
    # ... and once complete, a third run with the same options is a no-op.
    proc = _start(out, "--seed", "2")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"nothing to do" in text
