"""``imlnet index MAP.tif``: one pass from the raster, sharded with Lightning, resumable."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import imlnet
from conftest import clear_world
from imlnet.cli import main as cli_main
from imlnet.geo.gallery import GalleryIndex
from imlnet.geo.tiling import tile_geotiff
from imlnet.models.imlnet import IMLNet

SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("onepass")
    clear_world(root, seed=5)
    torch.manual_seed(0)
    model = IMLNet(3, backbone="resnet18", irn=False, muml=False, descriptor_dim=16)
    folder = model.save_pretrained(root / "model", {"image_size": SIZE})
    return SimpleNamespace(root=root, tif=root / "world" / "world.tif", model=folder)


def index_args(world: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return [
        "index", str(world.tif), "--tile-size-m", "100", "--stride-m", "50",
        "--checkpoint", str(world.model), "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def vectors(gallery: GalleryIndex) -> np.ndarray:
    return gallery._index.reconstruct_n(0, gallery.count)


def test_one_pass_gives_the_two_pass_gallery(world: SimpleNamespace, tmp_path: Path) -> None:
    """Same rows (but the image path) and descriptors as `imlnet tile` (PNG) + `imlnet index`."""
    tiles = tile_geotiff(
        world.tif, tmp_path / "tiles", tile_size_m=100, stride_m=50, out_px=SIZE,
        image_format="png", progress=False,
    )  # fmt: skip
    two = imlnet.build_index(imlnet.load_model(world.model, "cpu"), tiles, progress=False)
    assert cli_main(index_args(world, tmp_path / "one", "--shard-size", "7")) == 0
    one = GalleryIndex.load(tmp_path / "one")
    assert one.count == two.count == len(tiles.rows) == 121
    for a, b in zip(one.metadata, two.metadata, strict=True):
        assert a.pop("path").endswith(f"world.tif::{a['tile_id']}")
        b.pop("path")
        assert a == b
    np.testing.assert_allclose(vectors(one), vectors(two), atol=1e-5)
    assert one.manifest()["checkpoint_hash"] == two.manifest()["checkpoint_hash"]
    assert not list(tmp_path.glob(".one.shards-*"))  # the shards go once the gallery is saved


def test_two_processes_give_the_one_process_gallery(world: SimpleNamespace, tmp_path: Path) -> None:
    assert cli_main(index_args(world, tmp_path / "single", "--shard-size", "16")) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    argv = index_args(world, tmp_path / "ddp", "--shard-size", "16")
    argv += ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run(
        [sys.executable, "-m", "imlnet.cli", *argv],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gallery ") == 1  # rank 0 alone merges and reports
    single, ddp = GalleryIndex.load(tmp_path / "single"), GalleryIndex.load(tmp_path / "ddp")
    assert single.metadata == ddp.metadata
    np.testing.assert_allclose(vectors(single), vectors(ddp), atol=1e-6)


def test_a_killed_job_resumes_from_its_shards(world: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    argv = [sys.executable, "-m", "imlnet.cli", *index_args(world, out, "--shard-size", "4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    shards: list[Path] = []
    while not shards and proc.poll() is None and time.monotonic() < deadline:
        shards = list(tmp_path.glob(".gallery.shards-*/chunk-*.npz"))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob(".gallery.shards-*/chunk-*.npz")}
    assert first and not (out / "manifest.json").exists(), "the kill came too late"
    total = 31  # chunks of 4 of 121 windows
    assert len(first) < total
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reused = 4 * len(first)  # the last chunk (1 window) is never among the first
    assert f"embedded {121 - reused} windows, {reused} from an earlier run's shards" in rerun.stdout
    assert cli_main(index_args(world, tmp_path / "whole", "--shard-size", "4")) == 0
    resumed, whole = GalleryIndex.load(out), GalleryIndex.load(tmp_path / "whole")
    assert resumed.metadata == whole.metadata
    np.testing.assert_allclose(vectors(resumed), vectors(whole), atol=1e-6)


def test_verification_reads_the_raster_of_a_one_pass_gallery(
    world: SimpleNamespace, tmp_path: Path
) -> None:
    """No tile files: verification reads each hit's window from the source raster."""
    argv = index_args(world, tmp_path / "g")
    argv[argv.index("100")], argv[argv.index("50")] = "300", "150"  # 9 tiles, all verified
    assert cli_main(argv) == 0
    with open(world.root / "world" / "truth.csv", newline="") as handle:
        truth = list(csv.DictReader(handle))
    views = [str(world.root / "world" / row["image"]) for row in truth]
    out = tmp_path / "out"
    assert cli_main([
        "localize", *views, "--index", str(tmp_path / "g"), "--checkpoint", str(world.model),
        "--k", "9", "--verify", "9", "--truth", str(world.root / "world" / "truth.csv"),
        "--out-dir", str(out), "--quiet", "--no-map",
    ]) == 0  # fmt: skip
    with open(out / "fixes.csv", newline="") as handle:
        fixes = list(csv.DictReader(handle))
    assert all(f["verified"] == "1" for f in fixes), fixes
    assert max(float(f["aim_error_m"]) for f in fixes) < 25.0


def test_raster_arguments_are_checked(
    world: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = index_args(world, tmp_path / "g")
    no_size = [a for a in args if a not in ("--tile-size-m", "100")]
    assert cli_main(no_size) == 2
    assert "needs --tile-size-m and --stride-m" in capsys.readouterr().err
    assert cli_main([*args, "--append"]) == 2
    assert "--append takes tile folders" in capsys.readouterr().err
    mixed = [*args[:2], str(tmp_path), *args[2:]]
    assert cli_main(mixed) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main([*args, "--shard-size", "0"]) == 2
    assert "--shard-size must be >= 1" in capsys.readouterr().err
