"""The package as a user installs it: recipes as package data, the Python API, model folders.

The wheel test builds the wheel from this checkout, installs it into a fresh virtual
environment (the dependencies already installed here are made visible to it, not
reinstalled) and runs commands from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import imlnet
from imlnet.cli import main as cli_main
from imlnet.errors import CheckpointError, ImlnetError
from imlnet.models.imlnet import IMLNet
from imlnet.resources import config_names, config_path, resolve_config_args

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- recipes
def test_recipes_are_package_data_with_one_copy() -> None:
    names = config_names()
    assert {"demo.yaml", "university1652.yaml", "sues200.yaml"} <= set(names)
    assert "ablations/drcl.yaml" in names and "backbones/efficientnet_lite0.yaml" in names
    packaged = config_path("demo.yaml")
    assert packaged.parent == Path(imlnet.__file__).parent / "configs"
    # the checkout's configs/ is the package's folder, not a copy of it
    assert (REPO / "configs").resolve() == packaged.parent.resolve()
    assert config_path("configs/ablations/drcl") == packaged.parent / "ablations" / "drcl.yaml"
    with pytest.raises(ImlnetError, match=r"no packaged recipe 'nope'.*demo\.yaml"):
        config_path("nope")
    with pytest.raises(ImlnetError, match="no packaged recipe"):
        config_path("../__init__.py")


def test_config_names_resolve_where_no_file_is(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("trainer: {}\n")
    args = ["--config", "demo.yaml", "--config=ablations/irn.yaml", "-c", "mine.yaml"]
    args += ["--config", "missing.yaml", "--data.root", "demo.yaml"]
    out = resolve_config_args(args)
    assert out[1] == str(config_path("demo.yaml"))
    assert out[2] == "--config=" + str(config_path("ablations/irn.yaml"))
    assert out[4] == "mine.yaml"  # a file in the working folder wins
    assert out[6] == "missing.yaml"  # left for jsonargparse to report
    assert out[8] == "demo.yaml"  # only --config values are touched


def test_configs_command_lists_shows_and_copies(tmp_path: Path, capsys) -> None:
    assert cli_main(["configs"]) == 0
    assert "ablations/drcl.yaml" in capsys.readouterr().out
    assert cli_main(["configs", "--show", "demo"]) == 0
    assert capsys.readouterr().out == config_path("demo.yaml").read_text()
    assert cli_main(["configs", "--copy", str(tmp_path / "mine")]) == 0
    copied = sorted(p.relative_to(tmp_path / "mine").as_posix() for p in tmp_path.rglob("*.yaml"))
    assert copied == config_names()
    (tmp_path / "mine" / "demo.yaml").write_text("edited\n")
    assert cli_main(["configs", "--copy", str(tmp_path / "mine")]) == 2  # nothing overwritten
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine" / "demo.yaml").read_text() == "edited\n"


def test_version_and_python_dash_m() -> None:
    from importlib.metadata import version

    assert imlnet.__version__ == version("imlnet")
    out = subprocess.run(
        [sys.executable, "-m", "imlnet", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"imlnet {imlnet.__version__}"


def test_import_is_light_and_the_api_is_in_the_package_face() -> None:
    code = (
        "import sys, imlnet; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert callable(imlnet.localize) and callable(imlnet.build_index); "
        "assert imlnet.load_model.__module__ == 'imlnet.inference'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for name in ("load_model", "embed", "build_index", "localize", "export_onnx"):
        assert ">>> " in getattr(imlnet, name).__doc__, f"{name} has no docstring example"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        imlnet.nope  # noqa: B018


def test_the_readme_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's Python block, on a model folder, a tile folder and one drone image."""
    import shutil

    from test_geo_index import make_tiles

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- readme-example")[1].split("```python\n")[1].split("```")[0]
    assert len(block.strip().splitlines()) <= 6  # the import, a blank line, four calls
    _model(tmp_path).rename(tmp_path / "model")
    tiles = make_tiles(tmp_path, "tiles")
    row = tiles.rows[3]
    shutil.copyfile(tiles.image_path(row), tmp_path / "drone.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    lat, lon, tile_id = capsys.readouterr().out.split()[-3:]
    assert tile_id == row["tile_id"]  # the tile itself, as a query, comes first
    assert abs(float(lat) - float(row["lat"])) < 1e-3 and abs(float(lon) - float(row["lon"])) < 1e-3


# --------------------------------------------------------------------------- model folders
def _model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = IMLNet(3, backbone="resnet18", irn=False, muml=False, descriptor_dim=16)
    return model.save_pretrained(tmp_path / "m", {"image_size": 64})


def test_model_folder_records_what_a_runtime_needs(tmp_path: Path) -> None:
    config = json.loads((_model(tmp_path) / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["format"] == "imlnet-model/1"
    assert config["imlnet_version"] == imlnet.__version__
    assert config["meta"]["image_size"] == 64
    assert config["meta"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert config["meta"]["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_folder_of_a_newer_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    folder = _model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    newer = {**config, "format": "imlnet-model/2", "imlnet_version": "9.0.0"}
    (folder / "config.json").write_text(json.dumps(newer))
    with pytest.raises(CheckpointError) as err:
        IMLNet.from_pretrained(folder)
    message = str(err.value)
    assert str(folder / "config.json") in message and "imlnet 9.0.0" in message
    assert "pip install -U imlnet" in message and "\n" not in message
    (folder / "config.json").write_text(json.dumps({**config, "format": "other/1"}))
    with pytest.raises(CheckpointError, match="not an imlnet model config"):
        IMLNet.from_pretrained(folder)


@pytest.mark.parametrize("which", ["config.json", "model.safetensors"])
def test_truncated_model_files_give_one_message_on_the_command_line(
    tmp_path: Path, which: str, capsys
) -> None:
    folder = _model(tmp_path)
    data = (folder / which).read_bytes()
    (folder / which).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(folder / which)):
        imlnet.load_model(folder)
    code = cli_main(["export", str(folder), "--onnx", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and str(folder / which) in err and len(err.strip().splitlines()) == 1
    assert ("is corrupt or not a safetensors file" in err) or ("is not valid JSON" in err)
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- the wheel
def test_wheel_installs_into_a_fresh_environment_and_runs_outside_the_checkout(
    tmp_path: Path,
) -> None:
    """Build the wheel, install it (no dependencies) into a new venv that sees the installed
    dependencies through a .pth file, and read the packaged recipes from another folder."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(REPO)],
        check=True, capture_output=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("imlnet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "imlnet/configs/demo.yaml" in names and "imlnet/configs/ablations/drcl.yaml" in names
    for static in ("index.html", "app.js", "vendor/leaflet/leaflet.js", "vendor/leaflet/LICENSE"):
        assert f"imlnet/serve/static/{static}" in names, static
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # the dependencies installed here (torch, lightning ...), after the venv's own packages;
    # a plain path in a .pth file: the .pth files inside it (this checkout's editable
    # install) are not processed, so `imlnet` can only come from the wheel
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)

    def run(*argv: str | Path) -> str:
        out = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, cwd=away, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    where = run(python, "-c", "import imlnet; print(imlnet.__file__)")
    assert where.startswith(str(venv)), where
    assert run(venv / "bin" / "imlnet", "--version").strip() == f"imlnet {imlnet.__version__}"
    assert run(python, "-m", "imlnet", "configs", "--show", "demo.yaml") == (
        config_path("demo.yaml").read_text()
    )
    # the demo's recipe, read by the training CLI's parser from the installed package
    printed = run(venv / "bin" / "imlnet", "fit", "--config", "demo.yaml", "--print_config")
    assert "tf_efficientnet_lite0" in printed and "cache_frozen: true" in printed
    # the command that reads the demo's recipe through imlnet.resources
    code = "from imlnet.demo import recipe_trainer; print(recipe_trainer()['max_epochs'])"
    assert int(run(python, "-c", code)) >= 1
    # the smallest whole run: synthesis, training with the packaged recipe, evaluation, maps
    out = run(venv / "bin" / "imlnet", "demo", "--quick", "--out", away / "demo", "--threads", "1")
    # it ends with the command that opens its world on the map
    assert f"imlnet serve --index {away / 'demo' / 'index'} --checkpoint" in out
    metrics = json.loads((away / "demo" / "metrics.json").read_text())
    assert metrics["training"]["steps"] >= 1 and (away / "demo" / "report.md").is_file()
