"""Crashes mid-write (issue 13, point 5): ``imlnet tile`` and ``imlnet index --append`` killed.

One subprocess imports the package once, then forks one child per scenario. The child runs the
real command with a trap that sends itself SIGKILL at a chosen moment (the n-th tile image
saved, the n-th descriptor batch, FAISS writing the index, between the two renames of the
folder swap, after the swap); the parent then opens the output with the package's readers and
reports. What was on disk before must be intact and readable (or the new result complete), and
rerunning the same command must finish the job and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

SERVER = textwrap.dedent(
    """
    import json, os, shutil, signal, sys
    from pathlib import Path

    import faiss
    import PIL.Image
    import torch

    from imlnet import inference
    from imlnet.cli import main
    from imlnet.geo.gallery import GalleryIndex
    from imlnet.geo.tables import read_tileset
    from imlnet.io import recover_staged_dir

    class FakeModel:
        descriptor_dim, radius, config = 16, 1.0, {"backbone": "fake"}

        def encode(self, x, domain):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4)[:, :1].flatten(1)

    def to_tensor(image):
        return torch.from_numpy(__import__("numpy").asarray(image.resize((16, 16)), "float32")
                                .transpose(2, 0, 1).copy() / 255)

    TRAPS = {
        "save": (PIL.Image.Image, "save"),
        "encode": (FakeModel, "encode"),
        "write_index": (faiss, "write_index"),
        "replace": (os, "replace"),
        "rename": (os, "rename"),
        "rmtree": (shutil, "rmtree"),
    }

    def run(argv, trap=None, at=0):
        pid = os.fork()
        if pid == 0:  # the child: the command, killed at the trap
            inference.load_model = lambda c, *a, **k: inference.LoadedModel(
                FakeModel(), 16, to_tensor, Path(c)
            )
            if trap:
                owner, name = TRAPS[trap]
                original, calls = getattr(owner, name), [0]

                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original(*args, **kwargs)

                setattr(owner, name, wrapper)
            sys.stdout = open(os.devnull, "w")
            os._exit(main(argv))
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def state(kind, out):
        try:
            if kind == "tile":
                tiles = read_tileset(out)
                missing = [r["path"] for r in tiles.rows if not tiles.image_path(r).is_file()]
                return {"count": len(tiles), "missing": len(missing)}
            return {"count": GalleryIndex.load(out).count}
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"}

    def digest(out):
        h = __import__("hashlib").sha256()
        for p in sorted(Path(out).rglob("*")) if Path(out).is_dir() else []:
            h.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
        return h.hexdigest()[:16]

    def siblings(out):
        return sorted(p.name for p in Path(out).parent.iterdir() if p.name.startswith("."))

    spec = json.loads(sys.argv[1])
    report = []
    for step in spec["steps"]:
        if step.get("clean"):
            recover_staged_dir(step["out"])
        code = run(step["argv"], step.get("trap"), step.get("at", 0))
        found = state(step["kind"], step["out"])  # (the reader may repair a swap first)
        report.append({"code": code, **found, "digest": digest(step["out"]),
                       "leftovers": siblings(step["out"])})
    print(json.dumps(report))
    """
)


def write_raster(path: Path, seed: int, x0: float = 480_000) -> Path:
    data = np.random.default_rng(seed).integers(1, 255, (3, 128, 128), dtype=np.uint8)
    profile = dict(driver="GTiff", width=128, height=128, count=3, dtype="uint8")
    with rasterio.open(
        path, "w", crs="EPSG:32632", transform=from_origin(x0, 5_300_000, 0.5, 0.5), **profile
    ) as ds:
        ds.write(data)
    return path


def serve(tmp_path: Path, steps: list[dict]) -> list[dict]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(script), json.dumps({"steps": steps})],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_killed_tile_and_index_append_leave_old_output_and_rerun_finishes(tmp_path: Path) -> None:
    src_a, src_b = write_raster(tmp_path / "a.tif", 0), write_raster(tmp_path / "b.tif", 1, 9e5)
    tiles, gallery = tmp_path / "out" / "tiles", tmp_path / "out2" / "gallery"
    tiles_b = tmp_path / "out3" / "tiles_b"
    quiet = ["--image-size", "16", "--quiet"]
    coarse = ["tile", str(src_a), str(tiles), "--tile-size-m", "16", "--stride-m", "16", *quiet]
    fine = ["tile", str(src_a), str(tiles), "--tile-size-m", "16", "--stride-m", "8", *quiet]
    index = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(gallery), "--workers", "0"]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"w")
    tile_b = ["tile", str(src_b), str(tiles_b), "--tile-size-m", "16", "--stride-m", "16", *quiet]
    append = ["index", str(tiles_b), *index, "--append", "--quiet", "--batch-size", "4"]
    t, g = {"kind": "tile", "out": str(tiles)}, {"kind": "index", "out": str(gallery)}
    steps = [
        {**t, "argv": coarse},  # the tile folder before: 16 tiles
        {**t, "argv": fine, "trap": "save", "at": 20, "clean": True},  # while writing tiles
        {**t, "argv": fine, "trap": "replace", "at": 3, "clean": True},  # staged, before swap
        {**t, "argv": fine, "trap": "rmtree", "at": 1, "clean": True},  # swapped, old not gone
        {**t, "argv": coarse, "trap": "rename", "at": 1, "clean": True},  # between the renames
        {**t, "argv": coarse},  # the rerun, with the leftovers of the kill
        {"kind": "tile", "out": str(tiles_b), "argv": tile_b},
        {**g, "argv": ["index", str(tiles), *index, "--quiet"]},  # the gallery before: 16
        {**g, "argv": append, "trap": "encode", "at": 2, "clean": True},  # while embedding
        {**g, "argv": append, "trap": "write_index", "at": 1, "clean": True},  # while saving
        {**g, "argv": append, "trap": "rename", "at": 1, "clean": True},  # between the renames
        {**g, "argv": append},  # the rerun, with the leftovers of the kill
    ]
    report = serve(tmp_path, steps)
    killed = -9
    before = report[0]
    assert before["code"] == 0 and before["count"] == 16 and before["missing"] == 0
    for step in report[1:3]:  # killed before the swap: the old tile set, byte for byte
        assert step["code"] == killed and step["digest"] == before["digest"], step
    assert report[3]["code"] == killed and report[3]["count"] == 49  # the new set, complete
    assert report[3]["missing"] == 0
    # killed between the renames: the reader puts the previous set (49 tiles) back
    assert report[4]["code"] == killed and report[4]["digest"] == report[3]["digest"]
    assert report[5]["code"] == 0 and report[5]["digest"] == before["digest"]  # rerun: same
    assert report[5]["leftovers"] == [] and report[5]["count"] == 16
    gallery_before = report[7]
    assert gallery_before["code"] == 0 and gallery_before["count"] == 16
    for step in report[8:11]:  # killed while embedding, writing, swapping: the old gallery
        assert step["code"] == killed and step["digest"] == gallery_before["digest"], step
    assert report[11]["code"] == 0 and report[11]["count"] == 32  # the rerun appends
    assert report[11]["leftovers"] == []
