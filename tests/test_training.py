"""Training with Lightning: the CLI, export, exact resume, DDP on two CPU processes, overfitting."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from imlnet.cli import main as imlnet_main
from imlnet.data.datamodule import CrossViewDataModule
from imlnet.demo import DEMO_CONFIG, recipe_run
from imlnet.losses import IMLNetObjective
from imlnet.models.imlnet import IMLNet
from imlnet.resources import config_path
from imlnet.training import IMLNetModule, best_checkpoint, cli_main

REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"backbone": "resnet18", "muml_channels": 16, "descriptor_dim": 32}
TINY_OBJECTIVE = {"crop_units": "random"}
#: the ``model`` section of a config: the module built from its parts
TINY_MODEL = {
    "model": {"class_path": "imlnet.models.IMLNet", "init_args": TINY_NET},
    "objective": {"class_path": "imlnet.losses.IMLNetObjective", "init_args": TINY_OBJECTIVE},
}


def _config(tmp: Path, root: Path, **trainer) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "default_root_dir": str(tmp / "run"),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / "run"), "name": "logs"},
            },
            **trainer,
        },
        "model": TINY_MODEL,
        "data": {
            "root": str(root),
            "dataset": "synthetic",
            "image_size": 32,
            "batch_size": 3,
            "eval_batch_size": 16,
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _evaluate(export: Path, root: Path, out: Path) -> dict[str, dict[str, float]]:
    """``imlnet evaluate`` of an exported model on the synthetic set: its JSON results."""
    args = ["--checkpoint", str(export), "--data", str(root), "--dataset", "synthetic"]
    args += ["--out", str(out), "--num-workers", "0"]  # input size: the one saved with the model
    assert imlnet_main(["evaluate", *args]) == 0
    return json.loads(out.read_text())["results"]


def test_cli_fit_exports_best_model_and_metrics_match_evaluate(
    synth: Path, tmp_path: Path, capsys
) -> None:
    cfg = _config(tmp_path, synth)
    assert imlnet_main(["fit", "--config", str(cfg)]) == 0
    log_dir = tmp_path / "run" / "logs" / "version_0"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    export = log_dir / "export"
    model = IMLNet.from_pretrained(export)
    assert model.config["backbone"] == "resnet18" and model.descriptor_dim == 32
    assert model.input_size() == 32  # the training size, the commands' default input size
    val = [r for r in _metrics(log_dir) if r["val/R@1"]][-1]
    # The standalone evaluator on the exported model gives the validation numbers exactly.
    d2s = _evaluate(export, synth, tmp_path / "eval.json")["drone->satellite"]
    assert d2s["R@1"] == pytest.approx(float(val["val/R@1"]), abs=1e-4)
    assert d2s["AP"] == pytest.approx(float(val["val/AP"]), abs=1e-4)
    assert "satellite->drone" in capsys.readouterr().out
    # `imlnet test` reports both directions.
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert imlnet_main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 0
    tested = _metrics(tmp_path / "run" / "logs" / "version_1")[-1]
    # one epoch: the last checkpoint is the exported (best) model, so the numbers agree
    both = _evaluate(export, synth, tmp_path / "eval2.json")
    for prefix, direction in (("test/", "drone->satellite"), ("test/s2d_", "satellite->drone")):
        for key in ("R@1", "AP"):
            expected = both[direction][key]
            assert float(tested[prefix + key]) == pytest.approx(expected, abs=1e-4), prefix + key


class _Crash(Exception):
    pass


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise _Crash


def _fit(
    root: Path, out: Path, ckpt: str | None = None, crash_at: int | None = None, max_epochs: int = 2
) -> IMLNetModule:
    L.seed_everything(0, verbose=False)
    dm = CrossViewDataModule(
        root=str(root),
        dataset="synthetic",
        image_size=32,
        batch_size=2,
        sample_num=2,
        eval_batch_size=16,
        seed=0,
    )
    module = IMLNetModule(
        IMLNet(dm.num_classes, **TINY_NET),
        IMLNetObjective(**TINY_OBJECTIVE),
        optimizer="adamw",
        lr=1e-3,
        export_dir=str(out / "export"),
    )
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=out / "ckpt", save_last=True, every_n_train_steps=1
        )
    ]
    if crash_at is not None:
        callbacks.append(_CrashAt(crash_at))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        default_root_dir=str(out),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    if crash_at is None:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    else:
        with pytest.raises(_Crash):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module


def test_resume_mid_epoch_ends_like_an_uninterrupted_run(synth: Path, tmp_path: Path) -> None:
    full = _fit(synth, tmp_path / "full")
    per_epoch = 3  # 3 training buildings x sample_num 2 / batch 2
    _fit(synth, tmp_path / "cut", crash_at=per_epoch + 2)  # killed in the second epoch
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == per_epoch + 1  # mid-epoch
    resumed = _fit(synth, tmp_path / "cut", ckpt=str(last))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    full_metrics = full.trainer.callback_metrics
    resumed_metrics = resumed.trainer.callback_metrics
    assert float(full_metrics["val/R@1"]) == float(resumed_metrics["val/R@1"])
    assert float(full_metrics["val/AP"]) == float(resumed_metrics["val/AP"])


def test_ddp_on_two_cpu_processes_gives_single_process_metrics(synth: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, synth, devices=2, strategy="ddp")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "imlnet.cli", "fit", "--config", str(cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = tmp_path / "run" / "logs" / "version_0"
    val = [r for r in _metrics(log_dir) if r["val/R@1"]][-1]
    # Gathered across the two processes, in dataset order, without the sampler's padding: the
    # exported model evaluated in one process gives the same numbers.
    d2s = _evaluate(log_dir / "export", synth, tmp_path / "eval.json")["drone->satellite"]
    assert d2s["R@1"] == pytest.approx(float(val["val/R@1"]), abs=1e-4)
    assert d2s["AP"] == pytest.approx(float(val["val/AP"]), abs=1e-4)


def test_tiny_model_overfits_a_few_locations(synth: Path, tmp_path: Path) -> None:
    """Train and test on the same locations, without augmentation: R@1 = 100 % both ways.

    It fails when the batch norm statistics of training and evaluation disagree (drone and
    satellite batches normalised apart in training, stalled at 89 % / 67 % here).
    """
    root = tmp_path / "same"
    shutil.copytree(synth / "train", root / "train")
    for view, src in (
        ("query_drone", "drone"),
        ("gallery_drone", "drone"),
        ("query_satellite", "satellite"),
        ("gallery_satellite", "satellite"),
    ):
        shutil.copytree(synth / "train" / src, root / "test" / view)
    L.seed_everything(0, verbose=False)
    dm = CrossViewDataModule(
        root=str(root),
        dataset="synthetic",
        image_size=32,
        batch_size=6,
        sample_num=8,
        eval_batch_size=16,
        augment=False,
        seed=0,
    )
    net = IMLNet(
        dm.num_classes, backbone="resnet18", irn=False, muml=False, descriptor_dim=32, dropout=0.0
    )
    module = IMLNetModule(
        net,
        IMLNetObjective(),
        optimizer="adamw",
        lr=3e-3,
        scheduler="cosine",
        export_dir=str(tmp_path / "export"),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert float(metrics["test/R@1"]) == 100.0
    assert float(metrics["test/s2d_R@1"]) == 100.0


CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
ROWS = sorted(p.stem for p in (REPO / "configs" / "ablations").glob("*.yaml"))


def _objective_args(objective: IMLNetObjective) -> dict[str, object]:
    """The objective's constructor arguments, read back from the object."""
    w = objective.weights
    return {
        "triplet": objective.triplet,
        "margin": objective.margin,
        "crop_units": objective.crop_units,
        "crop_rows": objective.crop_rows,
        "seed": objective.seed,
        "w_rec": w["rec"],
        "w_rec_satellite": w["rec_satellite"],
        "w_drcl": w["triplet"],
        "w_id": w["id"],
        "w_crop": w["id_crops"],
        "w_infonce": w["infonce"],
        "rec_turns": objective.rec_turns,
    }


def _load(configs: list[Path], synth: Path, tmp_path: Path):
    """The CLI's objects for ``configs`` on the tiny synthetic data, without running anything."""
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--data.root", str(synth), "--model.model.init_args.pretrained", "false"]
    args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    if any(c.name == "sues200.yaml" for c in configs):
        args += ["--data.dataset", "synthetic"]  # no SUES-200 folder here
    return cli_main(args, run=False)


def _expected(configs: list[Path]) -> dict[str, dict]:
    """What the YAML files say, later files overriding earlier ones, per part."""
    want: dict[str, dict] = {"model": {}, "objective": {}, "module": {}}
    for config in configs:
        with open(config) as handle:
            section = yaml.safe_load(handle)["model"]
        for part in ("model", "objective"):
            want[part].update((section.get(part) or {}).get("init_args") or {})
        want["module"].update({k: v for k, v in section.items() if k not in ("model", "objective")})
    return want


def _check(cli, want: dict[str, dict]) -> None:
    module = cli.model
    assert isinstance(module.model, IMLNet) and isinstance(module.objective, IMLNetObjective)
    assert module.model.config["num_classes"] == cli.datamodule.num_classes  # linked
    for key, value in want["model"].items():
        if key != "pretrained":
            assert module.model.config[key] == value, key
    objective = _objective_args(module.objective)
    for key, value in want["objective"].items():
        assert objective[key] == value, key
    for key, value in want["module"].items():
        assert module.hparams[key] == value, key


def test_every_config_is_covered() -> None:
    assert CONFIGS == ["demo.yaml", "sues200.yaml", "university1652.yaml"]
    assert ROWS == [
        "baseline",
        "drcl",
        "full",
        "full_plus_infonce",
        "infonce",
        "irn",
        "muml",
        "paper_heads",
    ]


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_load(config: str, synth: Path, tmp_path: Path) -> None:
    files = [REPO / "configs" / config]
    want = _expected(files)
    assert want["model"] and want["module"]  # the file sets the network and the optimisation
    _check(_load(files, synth, tmp_path), want)


@pytest.mark.parametrize("base", ["university1652.yaml", "sues200.yaml"])
def test_lite0_variant_of_the_dataset_configs(base: str, synth: Path, tmp_path: Path) -> None:
    """configs/backbones/efficientnet_lite0.yaml swaps the backbone, keeps the dataset recipe."""
    files = [REPO / "configs" / base, REPO / "configs" / "backbones" / "efficientnet_lite0.yaml"]
    cli = _load(files, synth, tmp_path)
    _check(cli, _expected(files))
    model = cli.model.model
    assert model.config["backbone"] == "tf_efficientnet_lite0"
    assert model.config["last_stages"] == "dilated"
    assert model.irn_enabled and model.muml_enabled
    assert cli.model.hparams["lr"] == _expected(files[:1])["module"]["lr"]


@pytest.mark.parametrize("row", ROWS)
def test_ablation_rows(row: str, synth: Path, tmp_path: Path) -> None:
    for base in ("demo.yaml", "university1652.yaml"):
        files = [REPO / "configs" / base, REPO / "configs" / "ablations" / f"{row}.yaml"]
        cli = _load(files, synth, tmp_path)
        _check(cli, _expected(files))
        model = cli.model
        full = ("full", "infonce", "paper_heads", "full_plus_infonce")
        assert model.model.irn_enabled == (row in ("irn", *full))
        assert model.model.muml_enabled == (row in ("muml", *full))
        assert model.model.config["muml_head"] == ("paper" if row == "paper_heads" else "pooled")
        triplet = {"drcl": "drcl", "full": "drcl", "paper_heads": "drcl", "infonce": "infonce"}
        triplet = triplet.get(row, "drcl" if row == "full_plus_infonce" else "none")
        assert model.objective.triplet == triplet
        beside = model.objective.weights["infonce"]
        assert beside == (1.0 if row == "full_plus_infonce" else 0.0)  # the paper's rows: off
        assert (model.objective.infonce is not None) == (row in ("infonce", "full_plus_infonce"))
        # the row changes only its switches: the base's recipe stays
        assert model.hparams["lr"] == _expected(files[:1])["module"]["lr"]


def test_demo_and_ablation_train_the_demo_config(synth: Path, tmp_path: Path) -> None:
    """``recipe_run`` is configs/demo.yaml with the demo's own flags and a row on top."""
    kw = {"size": 32, "batch_size": 3, "sample_num": 2, "seed": 5, "backbone": "resnet18"}
    kw["pretrained"] = "false"  # the recipe's ImageNet weights are EfficientNet-Lite0's
    row = REPO / "configs" / "ablations" / "drcl.yaml"
    dm, module = recipe_run(
        synth, **kw, crop_units="all", export_dir=tmp_path / "x", overlays=[row]
    )
    want = _expected([config_path(DEMO_CONFIG), row])
    want["model"]["backbone"] = "resnet18"
    want["model"]["pretrained"] = False
    want["objective"]["crop_units"] = "all"
    want["objective"]["seed"] = 5  # each seed draws its own crop units
    cli = SimpleNamespace(model=module, datamodule=dm)
    _check(cli, want)
    assert module.model.config["muml_channels"] == 128 and not module.model.muml_enabled
    assert (dm.image_size, dm.batch_size, dm.sample_num, dm.seed) == (32, 3, 2, 5)
    assert dm.eval_batch_size == 128  # from the config
    assert module.hparams["export_dir"] == str(tmp_path / "x")


def test_best_checkpoint_monitors_retrieval() -> None:
    ckpt = best_checkpoint()
    assert ckpt.monitor == "val/R@1" and ckpt.mode == "max" and ckpt.save_last


def test_demo_anywhere_reaches_both_of_its_benchmarks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``imlnet demo --anywhere S``: its benchmark and the other city's centre that share of
    their locations on ground points (imlnet synth --anywhere); the default stays landmarks."""
    from imlnet import demo
    from imlnet.data.synthetic import generate as G

    seen = []
    monkeypatch.setattr(G, "generate", lambda cfg, out, **kw: seen.append(cfg) or Path(out))
    for argv, share in (([], 0.0), (["--anywhere", "0.5"], 0.5)):
        args = demo.build_parser().parse_args(["--out", str(tmp_path), *argv])
        demo._synthesise(args, tmp_path)
        other = demo.other_city_config(args)
        assert seen[-1].anywhere == other.anywhere == share
        assert other.seed == seen[-1].seed + 1000 and other.n_test == 90
