"""Bad files for training, ``imlnet evaluate`` and ``imlnet visualize`` (issue 13, points 6, 7).

The cases of :func:`test_bad_files.bad_images` (truncated and zero-byte JPEGs, a PNG named
.jpg, 16-bit, palette and CMYK images, a decompression-bomb header) go into a training set's
satellite images and a test view's query images (the data module's loaders, ``imlnet fit``,
``imlnet evaluate``) and to ``imlnet visualize`` as a query and as a gallery image. Each bad
file gives one line naming it, exit 2 for a command, also when DataLoader worker processes
decode the images; each valid one is read. ``imlnet fit --ckpt_path`` and a backbone's
``pretrained=<file>`` refuse a pickle with a payload, and an unreadable checkpoint, in one line
naming the file.
"""

from __future__ import annotations

import pickle
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from imlnet.cli import main as cli_main
from imlnet.data.datamodule import CrossViewDataModule
from imlnet.data.folders import ViewDataset
from imlnet.errors import CheckpointError, ImageReadError
from imlnet.models.imlnet import IMLNet
from test_bad_files import MESSAGES, Payload, _png_chunk, bad_images
from test_training import TINY_NET


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported (untrained) tiny model: what ``imlnet evaluate/visualize`` load."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "export"
    return IMLNet(3, **TINY_NET).save_pretrained(folder, meta={"image_size": 32})


def first_file(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*") if p.is_file())[0]


@pytest.fixture
def data(synth: Path, tmp_path: Path) -> dict[str, Path]:
    """A copy of the set; the files the cases replace (same name, as a user's copy might be)."""
    root = shutil.copytree(synth, tmp_path / "synth")
    return {
        "root": root,
        "satellite": first_file(root / "train" / "satellite"),
        "query": first_file(root / "test" / "query_drone"),
        "cases": bad_images(tmp_path / "cases"),
    }


def _cases(files: dict[str, Path]) -> list[tuple[str, Path, int]]:
    """(case, file, workers): every case in the main process, the truncated one in a worker."""
    return [(c, p, 0) for c, p in files.items()] + [("bad_truncated", files["bad_truncated"], 1)]


def _one_line(err: str, prefix: str, case: str, why: str) -> None:
    assert err.startswith(prefix) and "\n" not in err.strip(), (case, err)
    assert MESSAGES[case] in err and why in err, (case, err)


@pytest.mark.timeout(300)
def test_data_module_on_every_bad_image(data: dict[str, Path]) -> None:
    originals = {k: data[k].read_bytes() for k in ("satellite", "query")}
    for case, path, workers in _cases(data["cases"]):
        why = {"bad_bomb": "image too large to decode safely"}.get(case, "cannot decode image")
        for key in ("satellite", "query"):
            data[key].write_bytes(path.read_bytes())
        dm = CrossViewDataModule(
            root=str(data["root"]),
            dataset="synthetic",
            image_size=32,
            batch_size=1,  # every building in every epoch (the last batch is dropped)
            eval_batch_size=4,
            num_workers=workers,
        )
        dm.setup("fit")
        loaders = {"satellite": [dm.train_dataloader()], "query": dm.val_dataloader()[:1]}
        for key, found in loaders.items():
            if case.startswith("bad_"):
                with pytest.raises(ImageReadError) as info:
                    for loader in found:
                        list(loader)
                why = {"bad_bomb": "image too large to decode safely"}.get(
                    case, "cannot decode image"
                )
                _one_line(str(info.value), f"{data[key]}: ", case, why)
            else:
                batches = [b for loader in found for b in loader]
                images = [b["drone" if key == "satellite" else "image"] for b in batches]
                assert all(x.shape[1:] == (3, 32, 32) for x in images), (case, key)
    for key, content in originals.items():
        data[key].write_bytes(content)


def fit_config(path: Path, root: Path, workers: int = 0) -> Path:
    """One short epoch on the tiny set; no logger, no checkpoint folder of its own."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "default_root_dir": str(path.parent / "run"),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
        },
        "model": {
            "model": {"class_path": "imlnet.models.IMLNet", "init_args": TINY_NET},
            "export_dir": str(path.parent / "export"),
        },
        "data": {
            "root": str(root),
            "dataset": "synthetic",
            "image_size": 32,
            "batch_size": 1,  # every building in the epoch (the last batch is dropped)
            "eval_batch_size": 4,
            "num_workers": workers,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(300)
def test_fit_on_a_bad_image_and_on_bad_checkpoints(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a training image that cannot be decoded, read in a DataLoader worker: one line, exit 2
    data["satellite"].write_bytes(data["cases"]["bad_truncated"].read_bytes())
    config = fit_config(tmp_path / "bad-image.yaml", data["root"], workers=1)
    assert cli_main(["fit", "--config", str(config)]) == 2
    _one_line(
        capsys.readouterr().err.strip(),
        f"imlnet fit: error: {data['satellite']}: ",
        "bad_truncated",
        "cannot decode image",
    )
    shutil.copyfile(data["cases"]["ok"], data["satellite"])
    # --ckpt_path: a pickle carrying code (zip and legacy format), empty, truncated, missing
    marker = tmp_path / "payload-ran"
    ckpts = {"evil": tmp_path / "evil.ckpt", "legacy": tmp_path / "legacy.ckpt"}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}, ckpts["evil"])
    ckpts["legacy"].write_bytes(pickle.dumps(Payload(marker)))
    ckpts["empty"] = tmp_path / "empty.ckpt"
    ckpts["empty"].write_bytes(b"")
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    ckpts["truncated"] = tmp_path / "truncated.ckpt"
    ckpts["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    ckpts["missing"] = tmp_path / "missing.ckpt"
    expected = {
        "evil": "refused: the file holds pickled Python objects besides tensors",
        "legacy": "refused: the file holds pickled Python objects besides tensors",
        "empty": "cannot read the checkpoint",
        "truncated": "cannot read the checkpoint",
        "missing": "checkpoint not found",
    }
    config = fit_config(tmp_path / "fit.yaml", data["root"])
    for case, path in ckpts.items():
        code = cli_main(["fit", "--config", str(config), "--ckpt_path", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2, (case, err)
        assert err.startswith(f"imlnet fit: error: {path}: ") and "\n" not in err, (case, err)
        assert expected[case] in err and "weights_only" not in err, (case, err)
    assert not marker.exists()


def test_backbone_weights_refusal_is_one_line(tmp_path: Path) -> None:
    from imlnet.models.backbone import load_weights_file

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}, evil)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(evil.read_bytes()[:100])
    for path, text in (
        (evil, "refused: the weights file holds pickled Python objects"),
        (truncated, "cannot read the weights file"),
    ):
        with pytest.raises(CheckpointError) as info:
            load_weights_file(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and text in message, message
        assert "\n" not in message and "weights_only" not in message, message
    assert not marker.exists()


@pytest.mark.timeout(300)
def test_evaluate_on_every_bad_image(
    data: dict[str, Path], model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "--checkpoint", str(model_dir), "--data", str(data["root"])]
    args += ["--dataset", "synthetic", "--quiet", "--batch-size", "8"]
    for case, path, workers in _cases(data["cases"]):
        data["query"].write_bytes(path.read_bytes())
        code = cli_main([*args, "--workers", str(workers)])
        captured = capsys.readouterr()
        if case.startswith("bad_"):
            assert code == 2, (case, captured.err)
            why = {"bad_bomb": "image too large to decode safely"}.get(case, "cannot decode image")
            prefix = f"imlnet evaluate: error: {data['query']}: "
            _one_line(captured.err.strip(), prefix, case, why)
        else:
            assert code == 0 and "R@1" in captured.out, (case, captured.err)


@pytest.mark.timeout(300)
def test_visualize_on_every_bad_image(
    data: dict[str, Path], model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery = shutil.copytree(data["root"] / "test" / "gallery_satellite", tmp_path / "gallery")
    target = first_file(gallery)
    good = first_file(data["root"] / "test" / "gallery_drone")
    common = ["--checkpoint", str(model_dir), "--k", "2"]
    for case, path in data["cases"].items():
        why = {"bad_bomb": "image too large to decode safely"}.get(case, "cannot decode image")
        out = tmp_path / f"out-{case}"
        # as the query
        code = cli_main(["visualize", str(path), *common, "--out", str(out)])
        captured = capsys.readouterr()
        if case.startswith("bad_"):
            assert code == 2 and not out.exists(), (case, captured.err)
            _one_line(captured.err.strip(), f"imlnet visualize: error: {path}: ", case, why)
        else:
            assert code == 0 and len(list(out.glob("*.png"))) == 2, (case, captured.err)
        # as a gallery image
        target.write_bytes(path.read_bytes())
        argv = ["visualize", str(good), *common, "--gallery", str(gallery)]
        code = cli_main([*argv, "--out", str(tmp_path / f"grid-{case}")])
        captured = capsys.readouterr()
        if case.startswith("bad_"):  # (after the progress bar of the gallery's embedding)
            assert code == 2 and "Traceback" not in captured.err, (case, captured.err)
            last = captured.err.strip().splitlines()[-1]
            _one_line(last, f"imlnet visualize: error: {target}: ", case, why)
        else:
            assert code == 0, (case, captured.err)


def test_skipped_evaluation_images_on_every_bad_image(data: dict[str, Path]) -> None:
    """``on_bad_image="skip"``: each unreadable query is a junk item (label -1, a black image),
    with one warning naming it; a damaged file whose header claims 144 M pixels (under PIL's
    bomb limit, so only a warning) gets a 256 x 256 placeholder, not 1.7 GB of zeros."""
    huge = data["root"] / "huge.png"
    header = struct.pack(">IIBBBBB", 12_000, 12_000, 8, 2, 0, 0, 0)
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    files = {**data["cases"], "bad_huge_header": huge}
    view = ViewDataset({"0001": list(files.values())}, "query_drone", on_bad_image="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [view[i] for i in range(len(view))]
    for (case, path), item in zip(files.items(), items, strict=True):
        if case.startswith("bad_"):
            assert int(item["label"]) == -1 and float(item["image"].abs().sum()) == 0, case
            said = [str(w.message) for w in caught if str(path) in str(w.message)]
            assert said and said[0].startswith(f"skipping unreadable image {path}: "), case
        else:
            assert int(item["label"]) == 1 and item["image"].shape == (3, 32, 32), case
    assert items[-1]["image"].shape == (3, 256, 256)
    assert sorted(view.skipped) == sorted(str(p) for c, p in files.items() if c.startswith("bad_"))
