"""Shared test settings (CPU only, few threads, deterministic seeds) and the tiny benchmark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch

torch.set_num_threads(1)


@pytest.fixture
def hub_dir(tmp_path):
    """torch.hub's folder inside tmp_path for one test, restored afterwards."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(old)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic benchmark (6 locations x 3 views at 32 px), made once per test process.

    Tests treat it as read-only (they copy it before changing anything).
    """
    from imlnet.data.synthetic.config import SynthConfig
    from imlnet.data.synthetic.generate import generate
    from imlnet.data.synthetic.scene import SceneConfig

    cfg = SynthConfig(
        locations=6,
        views=3,
        size=32,
        seed=3,
        distractors=1,
        scene=SceneConfig(extent_m=400.0, resolution_m=1.0),
    )
    return generate(cfg, tmp_path_factory.mktemp("data") / "synth", progress=False)


def clear_world(root: Path, seed: int) -> Path:
    """A 600 m synthetic world (summer, clear; 1 m pixels; two 256 px views) under ``root``,
    the conditions in which verification matches: its folder (world.tif, drone/, truth.csv)."""
    from imlnet.data.synthetic.world import WorldConfig, generate_world

    cfg = WorldConfig(
        extent_m=600.0, gsd_m=1.0, views=2, size=256, seed=seed,
        seasons={"summer": 1.0}, weather={"clear": 1.0}, altitude_m=(70.0, 90.0),
    )  # fmt: skip
    return generate_world(cfg, root / "world", progress=False)
