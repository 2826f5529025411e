"""Bad files (issue 13, points 6 and 7): every geo command gets one line or reads the file.

Fuzz-style: truncated and zero-byte JPEGs, a PNG with a .jpg name, 16-bit, palette and CMYK
images and a decompression-bomb header go to ``imlnet index`` (as tiles) and ``imlnet localize``
(as queries); broken rasters go to ``imlnet tile``. Each bad file gives one line naming it and
exit 2; each valid one is read (16-bit values scaled, not clipped). And no file a user might have
downloaded is unpickled: every ``torch.load`` passes ``weights_only=True``, and a ``.pth`` /
``.ckpt`` holding a pickle payload is refused without running it.
"""

from __future__ import annotations

import ast
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_origin

from imlnet import inference
from imlnet.cli import main as cli_main
from imlnet.errors import CheckpointError
from imlnet.geo.tables import read_tileset
from imlnet.inference import LoadedModel, read_image

REPO = Path(__file__).resolve().parents[1]
RGB = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_images(folder: Path) -> dict[str, Path]:
    """One file per case; the ``bad_`` ones cannot be read, the others are valid images."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = folder / "ok.jpg"
    Image.fromarray(RGB).save(ok, quality=90)
    files = {"ok": ok}
    files["bad_truncated"] = folder / "truncated.jpg"
    files["bad_truncated"].write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    files["bad_zero"] = folder / "zero.jpg"
    files["bad_zero"].write_bytes(b"")
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 px RGB
    files["bad_bomb"] = folder / "bomb.png"
    files["bad_bomb"].write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    files["png_named_jpg"] = folder / "png.jpg"
    Image.fromarray(RGB).save(files["png_named_jpg"], format="PNG")
    files["sixteen_bit"] = folder / "sixteen.png"
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(
        files["sixteen_bit"]
    )
    files["palette"] = folder / "palette.png"
    Image.fromarray(RGB).convert("P").save(files["palette"])
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(RGB).convert("CMYK").save(files["cmyk"])
    return files


MESSAGES = {
    "bad_truncated": "cannot decode image (image file is truncated",
    "bad_zero": "cannot decode image (cannot identify image file",
    "bad_bomb": "image too large to decode safely",
}


def test_reader_on_every_case(tmp_path: Path) -> None:
    files = bad_images(tmp_path)
    messages = MESSAGES
    for case, path in files.items():
        if case in messages:
            with pytest.raises(inference.ImageReadError) as info:
                read_image(path)
            assert str(info.value).startswith(f"{path}: ") and messages[case] in str(info.value)
            assert "\n" not in str(info.value)
        else:
            image = read_image(path)
            assert image.mode == "RGB" and image.size == (32, 32)
    # 16-bit: 6000 / 65535 of full scale is 23 of 255 (PIL's own convert would give 255)
    grey = np.asarray(read_image(files["sixteen_bit"]))[..., 0].ravel()
    assert list(grey[[1, 100, 500, 1000]]) == [0, 23, 117, 233]


class FakeModel:
    descriptor_dim, radius, config = 16, 1.0, {"backbone": "fake"}

    def encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4)[:, :1].flatten(1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((16, 16)), np.float32).transpose(2, 0, 1) / 255)


@pytest.fixture
def gallery_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(
        inference, "load_model", lambda *a, **k: LoadedModel(FakeModel(), 16, to_tensor)
    )
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"w")
    data = np.random.default_rng(1).integers(1, 255, (3, 64, 64), np.uint8)
    profile = dict(driver="GTiff", width=64, height=64, count=3, dtype="uint8")
    transform = from_origin(480_000, 5_300_000, 0.5, 0.5)
    with rasterio.open(
        tmp_path / "map.tif", "w", crs="EPSG:32632", transform=transform, **profile
    ) as ds:
        ds.write(data)
    argv = ["tile", str(tmp_path / "map.tif"), str(tmp_path / "tiles"), "--quiet"]
    assert cli_main([*argv, "--tile-size-m", "8", "--stride-m", "8", "--image-size", "32"]) == 0
    return {"root": tmp_path, "tiles": read_tileset(tmp_path / "tiles")}


@pytest.mark.timeout(120)
def test_index_and_localize_on_every_bad_image(
    gallery_setup: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    root, tiles = gallery_setup["root"], gallery_setup["tiles"]
    files = bad_images(root / "cases")
    common = ["--checkpoint", str(root / "ckpt"), "--quiet"]
    target = tiles.image_path(tiles.rows[0])
    original = target.read_bytes()
    for case, path in files.items():
        for workers in ("0", "1") if case == "bad_truncated" else ("0",):
            # index: the first tile replaced by the case (same name, as a user's copy might be)
            target.write_bytes(path.read_bytes())
            out = root / f"gallery-{case}-{workers}"
            argv = ["index", str(tiles.root), "--out", str(out), *common, "--workers", workers]
            code = cli_main(argv)
            err = capsys.readouterr().err.strip()
            if case.startswith("bad_"):
                assert code == 2 and not out.exists(), (case, err)
                assert err.startswith(f"imlnet index: error: {target}: ") and "\n" not in err
                assert (
                    MESSAGES[case] in err
                )  # cannot decode image / image too large to decode safely
            else:
                assert code == 0 and err == "", (case, err)
    target.write_bytes(original)
    gallery = root / "gallery"
    assert cli_main(["index", str(tiles.root), "--out", str(gallery), *common]) == 0
    for case, path in files.items():
        out = root / f"loc-{case}"
        argv = ["localize", str(path), "--index", str(gallery), *common, "--workers", "0"]
        code = cli_main([*argv, "--out-dir", str(out)])
        captured = capsys.readouterr()
        if case.startswith("bad_"):
            err = captured.err.strip()
            assert code == 2 and not out.exists(), (case, err)
            assert err.startswith(f"imlnet localize: error: {path}: ") and "\n" not in err
            assert MESSAGES[case] in err  # cannot decode image / image too large to decode safely
        else:
            assert code == 0 and (out / "results.csv").is_file(), (case, captured.err)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tile_on_broken_rasters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.tif"
    data = np.random.default_rng(2).integers(1, 255, (3, 64, 64), np.uint8)
    profile = dict(driver="GTiff", width=64, height=64, count=3, dtype="uint8")
    transform = from_origin(480_000, 5_300_000, 0.5, 0.5)
    with rasterio.open(good, "w", crs="EPSG:32632", transform=transform, **profile) as ds:
        ds.write(data)
    cases = {
        "zero.tif": b"",
        "truncated.tif": good.read_bytes()[: good.stat().st_size // 3],
        "png.tif": png_bytes(),
        "text.tif": b"this is not a raster\n" * 10,
    }
    seen: dict[str, str] = {}
    for name, content in cases.items():
        src = tmp_path / name
        src.write_bytes(content)
        out = tmp_path / f"out-{name}"
        code = cli_main(["tile", str(src), str(out), "--tile-size-m", "8", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and not out.exists(), (name, err)
        assert err.startswith(f"imlnet tile: error: {src}: ") and "\n" not in err, err
        seen[name] = err
    assert "cannot open as a raster" in seen["zero.tif"] and "cannot open" in seen["text.tif"]
    assert "cannot read the window at column 0, row 0" in seen["truncated.tif"]
    assert "has no georeference" in seen["png.tif"]  # GDAL reads the PNG: no CRS


# -- untrusted files ---------------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``os.makedirs(marker)``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


def torch_load_calls() -> list[tuple[str, int, ast.Call]]:
    """Every ``torch.load(...)`` call in the package and the benchmarks."""
    calls = []
    for path in [*sorted((REPO / "src").rglob("*.py")), *sorted((REPO / "bench").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
            ):
                calls.append((str(path.relative_to(REPO)), node.lineno, node))
    return calls


def test_every_torch_load_is_weights_only() -> None:
    calls = torch_load_calls()
    assert calls, "expected at least the backbone's weights reader"
    for where, line, node in calls:
        flags = {k.arg: k.value for k in node.keywords}
        flag = flags.get("weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}:{line}"
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_pickle_payloads_are_refused_without_running(tmp_path: Path, suffix: str) -> None:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from imlnet.models.backbone import load_weights_file

    marker = tmp_path / "payload-ran"
    zipped = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}, zipped)
    legacy = tmp_path / f"legacy{suffix}"
    legacy.write_bytes(pickle.dumps(Payload(marker)))
    for path in (zipped, legacy):
        # the backbone's pretrained-weights reader (--model.init_args... pretrained=<file>)
        with pytest.raises(CheckpointError, match=rf"{path.name}"):
            load_weights_file(path)
        # what the trainer does with --ckpt_path (Lightning's default checkpoint reader)
        with pytest.raises(pickle.UnpicklingError):
            TorchCheckpointIO().load_checkpoint(path)
        assert not marker.exists()
