"""Crashes mid-training (issue 13, point 5): ``imlnet fit`` killed with SIGKILL, then resumed.

One subprocess imports the package once, then forks one child per run. The child runs the real
command (``imlnet.cli.main(["fit", ...])``) with a trap that sends itself SIGKILL at a chosen
moment: mid-epoch (before a training step), just after a checkpoint is written, while one is
being written (the bytes in the temporary file, not yet renamed), while the best model is being
exported. One more run is the ``imlnet`` console command in its own interpreter, killed from
outside at a seeded random moment once its first checkpoint exists. After each kill the parent
opens what is on disk with the package's readers (the last checkpoint with ``weights_only``,
the export with ``IMLNet.from_pretrained``), then reruns the same command with
``--ckpt_path last``: the final weights and the exported safetensors must equal, bit for bit,
those of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from test_training import TINY_MODEL

SERVER = textwrap.dedent(
    """
    import hashlib, json, os, random, signal, subprocess, sys, time
    from pathlib import Path

    import safetensors.torch
    import torch

    import imlnet.checkpoints
    import imlnet.io
    from imlnet.checkpoints import AtomicCheckpointIO
    from imlnet.cli import main
    from imlnet.errors import ImlnetError
    from imlnet.models.imlnet import IMLNet
    from imlnet.training import IMLNetModule

    TRAPS = {  # name -> (owner, attribute, kill before or after the call)
        "step": (IMLNetModule, "training_step", "before"),
        "saved": (AtomicCheckpointIO, "save_checkpoint", "after"),
        "writing": (imlnet.checkpoints.torch, "save", "after"),
        "exporting": (safetensors.torch, "save_file", "after"),
    }

    def trapped(trap, at):
        owner, name, when = TRAPS[trap]
        original, calls = getattr(owner, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = original(*args, **kwargs)
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(owner, name, wrapper)

    def status(code):
        return -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)

    def run(argv, trap=None, at=0):
        pid = os.fork()
        if pid == 0:  # the child: the command, killed at the trap
            if trap:
                trapped(trap, at)
            sys.stdout = sys.stderr = open("stderr.txt", "a")  # in the run's folder
            os._exit(main(argv))
        return status(os.waitpid(pid, 0)[1])

    def external(argv, seed):
        # the console command in its own interpreter, killed from outside at a random moment
        # after its first checkpoint is on disk
        last = Path(spec["ckpt_dir"]) / "last.ckpt"
        proc = subprocess.Popen([sys.executable, "-m", "imlnet.cli", *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not last.exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        return proc.wait()

    def digest(state):
        h = hashlib.sha256()
        for key in sorted(state):
            h.update(key.encode() + state[key].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def state(run_dir):
        # every checkpoint file on disk read back (the config's folder ckpt/, the CLI's default
        # best/last callback's checkpoints/), and the export
        out = {"files": {}, "steps": {}, "broken": {}}
        for folder in ("ckpt", "checkpoints"):
            where = Path(run_dir) / folder
            out["files"][folder] = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
            for name in out["files"][folder]:
                if name.startswith("."):
                    continue
                try:
                    ckpt = AtomicCheckpointIO().load_checkpoint(where / name)
                except ImlnetError as err:
                    out["broken"][f"{folder}/{name}"] = str(err)
                    continue
                out["steps"][f"{folder}/{name}"] = ckpt["global_step"]
                if name == "last.ckpt":  # --ckpt_path last takes the newest last.ckpt
                    out.setdefault("mtimes", {})[folder] = (where / name).stat().st_mtime_ns
                if f"{folder}/{name}" == "ckpt/last.ckpt":
                    out["step"], out["weights"] = ckpt["global_step"], digest(ckpt["state_dict"])
        export = Path(run_dir) / "export"
        if export.is_dir() and any(export.iterdir()):
            out["export_files"] = sorted(p.name for p in export.iterdir())
            try:
                IMLNet.from_pretrained(export)
                weights = (export / "model.safetensors").read_bytes()
                out["export"] = hashlib.sha256(weights).hexdigest()[:16]
            except ImlnetError as err:
                out["export_error"] = str(err)
        return out

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    report = []
    for step in spec["steps"]:
        os.chdir(step["dir"])
        argv = ["fit", "--config", spec["config"], *step.get("args", [])]
        if "external" in step:
            code = external(argv, step["external"])
        else:
            code = run(argv, step.get("trap"), step.get("at", 0))
        report.append({"code": code, **state(step["dir"])})
    print(json.dumps(report))
    """
)


def fit_config(path: Path, data: Path) -> Path:
    """Two epochs of three steps on the tiny synthetic set, a checkpoint after every step.

    Paths are relative to the run's folder (each run is started in its own), so one config
    serves every run; the checkpoint folder is fixed so that ``--ckpt_path last`` finds it.
    """
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "default_root_dir": ".",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": "ckpt",
                        "save_last": True,
                        "save_top_k": 0,
                        "every_n_train_steps": 1,
                    },
                }
            ],
        },
        "model": {
            **TINY_MODEL,
            "optimizer": "adamw",
            "lr": 1e-3,
            "export_dir": "export",
        },
        "data": {
            "root": str(data),
            "dataset": "synthetic",
            "image_size": 32,
            "batch_size": 2,
            "sample_num": 2,
            "eval_batch_size": 16,
            "num_workers": 0,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def serve(tmp_path: Path, config: Path, steps: list[dict]) -> list[dict]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    for step in steps:
        Path(step["dir"]).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    spec = {"config": str(config), "steps": steps, "ckpt_dir": str(tmp_path / "external" / "ckpt")}
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


STEPS_PER_EPOCH = 3  # 3 training buildings x sample_num 2 / batch 2
# The checkpoint writes of a run, in order (ckpt/ is the config's every-step callback,
# checkpoints/ the CLI's default best + last callback, written after each validation):
#   1-3: ckpt/last.ckpt at steps 1-3; epoch 1 validated, exported (export/model.safetensors);
#   4, 5: checkpoints/best-000.ckpt, checkpoints/last.ckpt (step 3);
#   6-8: ckpt/last.ckpt at steps 4-6; epoch 2 validated, exported if better; 9, 10: checkpoints/.
KILLS = {  # run -> (trap, call at which the run is killed)
    "mid_epoch": ("step", 5),  # before the second step of epoch 2: ckpt/last.ckpt is step 4
    "after_save": ("saved", 3),  # step 3's checkpoint written, nothing after it
    "writing_best": ("writing", 4),  # checkpoints/best-000.ckpt in its temporary file
    "writing_last": ("writing", 6),  # step 4's ckpt/last.ckpt in its temporary file
    "while_exporting": ("exporting", 1),  # the first export in its temporary file
}


def validation_skipped(cut: dict) -> bool:
    """Whether the resume starts from a checkpoint written at the last training step of an
    epoch, before that epoch's validation.

    Lightning does not rerun that validation on resume (it moves on to the next epoch), so
    without :class:`imlnet.checkpoints.ValidateSkippedEpochEnd` the epoch's R@1 never reaches
    the export callback and the resumed run could export another epoch's model.
    """
    newest = max(cut["mtimes"], key=cut["mtimes"].get)
    return newest == "ckpt" and cut["steps"]["ckpt/last.ckpt"] % STEPS_PER_EPOCH == 0


@pytest.mark.timeout(900)
def test_killed_training_resumes_to_the_same_weights(synth: Path, tmp_path: Path) -> None:
    config = fit_config(tmp_path / "fit.yaml", synth)
    resume = ["--ckpt_path", "last"]
    steps: list[dict] = [{"dir": str(tmp_path / "full")}]
    for name, (trap, at) in KILLS.items():
        run = str(tmp_path / name)
        steps += [{"dir": run, "trap": trap, "at": at}, {"dir": run, "args": resume}]
    run = str(tmp_path / "external")
    steps += [{"dir": run, "external": 13}, {"dir": run, "args": resume}]
    report = serve(tmp_path, config, steps)
    names = [*KILLS, "external"]
    pairs = zip(report[1::2], report[2::2], strict=True)
    full, runs = report[0], dict(zip(names, pairs, strict=True))
    assert full["code"] == 0 and full["step"] == 2 * STEPS_PER_EPOCH, full
    assert full["files"]["ckpt"] == ["last.ckpt"] and "export" in full, full
    killed = -9
    for name, (cut, resumed) in runs.items():
        # what is on disk after the kill: every checkpoint whole, readable without pickles
        assert cut["code"] == killed, (name, cut)
        assert cut["broken"] == {} and "ckpt/last.ckpt" in cut["steps"], (name, cut)
        # an export, if any, is whole (only the run killed while exporting has none yet)
        if name != "while_exporting":
            assert "export_error" not in cut, (name, cut)
        # rerun with --ckpt_path last: the same weights as the run never interrupted
        assert resumed["code"] == 0 and resumed["broken"] == {}, (name, resumed)
        assert resumed["step"] == full["step"], (name, resumed)
        assert resumed["weights"] == full["weights"], (name, resumed, full)
        assert resumed["export"] == full["export"], (name, resumed, full)
        for folder, files in resumed["files"].items():  # no temporary checkpoint left
            assert not [f for f in files if f.startswith(".")], (name, folder, files)
        assert resumed["export_files"] == ["config.json", "model.safetensors"], (name, resumed)
    assert runs["mid_epoch"][0]["step"] == STEPS_PER_EPOCH + 1
    assert not validation_skipped(runs["mid_epoch"][0])
    assert not validation_skipped(runs["writing_last"][0])  # the validation-end last.ckpt
    assert validation_skipped(runs["after_save"][0])  # and still the same export
    assert runs["after_save"][0]["step"] == STEPS_PER_EPOCH
    # killed with a checkpoint in its temporary file: the previous one is on disk, whole
    cut = runs["writing_best"][0]
    assert cut["files"]["checkpoints"][0].startswith(".best-000.ckpt."), cut
    assert "checkpoints/best-000.ckpt" not in cut["steps"] and cut["step"] == STEPS_PER_EPOCH
    cut = runs["writing_last"][0]
    assert cut["files"]["ckpt"][0].startswith(".last.ckpt.") and cut["step"] == STEPS_PER_EPOCH
    # killed while the first export was written: the folder holds only its temporary file
    cut = runs["while_exporting"][0]
    assert cut["step"] == STEPS_PER_EPOCH and "export" not in cut, cut
    assert all(f.startswith(".model.") for f in cut["export_files"]), cut


ACROSS = textwrap.dedent(
    """
    import json, os, shutil, signal, sys, tempfile
    from pathlib import Path

    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from imlnet.checkpoints import AtomicCheckpointIO
    from imlnet.errors import CheckpointError

    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def attempt(io, target):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "step": 1}, target)
        pid = os.fork()
        if pid == 0:  # killed while the file is copied to (or renamed onto) its target
            shutil._fastcopy_sendfile = shutil.copyfileobj = kill
            os.replace = kill  # (shutil.move tries os.rename first: EXDEV, then copies)
            io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "step": 2}, target)
            os._exit(0)
        os.waitpid(pid, 0)
        try:
            return AtomicCheckpointIO().load_checkpoint(target)["step"]
        except CheckpointError as err:
            return str(err)

    folder = Path(sys.argv[1])
    before = set(os.listdir(tempfile.gettempdir()))
    report = {
        "lightning": attempt(TorchCheckpointIO(), folder / "lightning" / "last.ckpt"),
        "atomic": attempt(AtomicCheckpointIO(), folder / "atomic" / "last.ckpt"),
        "atomic_files": sorted(os.listdir(folder / "atomic")),
    }
    left = set(os.listdir(tempfile.gettempdir())) - before
    for name in left:  # Lightning's temporary copy, left in $TMPDIR by the kill
        os.unlink(os.path.join(tempfile.gettempdir(), name))
    report["tmpdir_leftovers"] = len(left)
    print(json.dumps(report))
    """
)


def test_a_kill_while_saving_across_file_systems(tmp_path: Path) -> None:
    """Lightning's own save with ``$TMPDIR`` on another file system (a tmpfs /tmp) is a copy
    onto ``last.ckpt``: a kill during it leaves a broken checkpoint and a file in ``$TMPDIR``.
    The atomic save leaves the previous checkpoint, whole, and one temporary file beside it."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a /dev/shm on another file system than the test folder")
    script = tmp_path / "across.py"
    script.write_text(ACROSS)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TMPDIR": str(shm)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "cannot read the checkpoint" in str(report["lightning"]), report  # truncated to 0
    assert report["tmpdir_leftovers"] == 1, report
    assert report["atomic"] == 1, report  # the previous checkpoint
    assert report["atomic_files"][0].startswith(".last.ckpt.") and len(report["atomic_files"]) == 2


def test_ckpt_path_last_finds_the_earlier_runs_checkpoint(synth: Path, tmp_path: Path) -> None:
    """With a logger that numbers its versions (as configs/*.yaml), the rerun's own checkpoint
    folder is ``version_1/checkpoints``, new and empty: ``--ckpt_path last`` must still resume
    from ``version_0``'s ``last.ckpt`` (Lightning alone warned and trained from scratch)."""
    from imlnet.training import cli_main

    config = fit_config(tmp_path / "fit.yaml", synth)
    cfg = yaml.safe_load(config.read_text())
    runs = tmp_path / "runs"
    cfg["trainer"].pop("callbacks")  # the CLI's default best + last checkpoints only
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(runs), "name": "imlnet"},
    }
    cfg["trainer"].update(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    cfg["model"]["export_dir"] = str(tmp_path / "export")
    config.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(config)])
    first = runs / "imlnet" / "version_0" / "checkpoints" / "last.ckpt"
    assert first.is_file()
    cli = cli_main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(first)
