"""Lightning checkpoints written atomically and read without running code from the file.

Lightning's own :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` serialises a
checkpoint into memory and writes it through an fsspec "transaction": a temporary file made
by :func:`tempfile.mkstemp` in ``$TMPDIR``, moved over the target at the end with
:func:`shutil.move`. When ``$TMPDIR`` is on another file system than the checkpoint folder (a
tmpfs ``/tmp``, a node-local scratch disk beside a network home), that move is a copy into the
target, so a kill during it leaves a truncated ``last.ckpt``; and every killed save leaves a
checkpoint-sized file behind in ``$TMPDIR``. :class:`AtomicCheckpointIO` writes the checkpoint
beside its target (``.last.ckpt.<random>.tmp``), syncs it and renames it over the target: a
kill at any moment leaves the previous checkpoint or the new one, whole. A kill leaves at most
one temporary file, removed by the next save into that folder.

Reading: ``torch.load(weights_only=True)`` unless a caller passes ``weights_only=False``
explicitly (Lightning's own reader passes False for a URL when given nothing), and every way a
checkpoint can be unreadable (missing, truncated, not a checkpoint, a pickle carrying code)
becomes one :class:`~imlnet.errors.CheckpointError` naming the file.

:func:`use_atomic_checkpoints` installs it on a trainer; the IML-Net module does so in its
``setup`` hook, so every ``Trainer`` that trains it (the CLI, the demo, scripts) gets it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from imlnet.errors import CheckpointError
from imlnet.io import atomic_write

__all__ = [
    "READ_ERRORS",
    "AtomicCheckpointIO",
    "ValidateSkippedEpochEnd",
    "find_last_checkpoint",
    "read_error",
    "use_atomic_checkpoints",
]


def _is_local(path: str | os.PathLike[str]) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local(path: str | os.PathLike[str]) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


#: a temporary file of :func:`imlnet.io.atomic_write` for a checkpoint: ``.NAME.ckpt.XXXXXXXX.tmp``
_LEFTOVER = re.compile(r"^\..+\.ckpt\.[a-z0-9_]{8}\.tmp$")


def _remove_leftovers(folder: Path) -> None:
    """Remove the temporary checkpoint files that killed saves left in ``folder``.

    One process writes a run's checkpoints (rank 0 under DDP), one at a time, so a temporary
    file present before a save is a leftover of a run that was killed.
    """
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        if _LEFTOVER.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


#: what ``torch.load`` raises for a file that is missing, truncated, not a checkpoint or refused
READ_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    OSError,
    ValueError,
)


def read_error(path: Any, err: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint ``torch.load`` could not or would not read.

    Args:
        path: the checkpoint file.
        err: one of :data:`READ_ERRORS`.
    """
    if isinstance(err, FileNotFoundError):
        return CheckpointError(
            f"{path}: checkpoint not found; check the path given to --ckpt_path "
            "(or pass --ckpt_path last to resume from the last checkpoint)"
        )
    if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
        return CheckpointError(
            f"{path}: refused: the file holds pickled Python objects besides tensors, "
            "which could run code when loaded, so it was not loaded; resume only from "
            "checkpoints written by imlnet fit"
        )
    return CheckpointError(
        f"{path}: cannot read the checkpoint ({_first_line(err)}); the file is truncated or "
        "not a Lightning checkpoint: resume from another one (the checkpoint folder keeps "
        "last.ckpt and the best ones)"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` with atomic local writes and one-line read errors.

    Remote paths (``s3://``, ...) are written by Lightning's own code, whose object stores
    publish an upload whole.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to a temporary file beside ``path``, sync it, rename it.

        Raises:
            TypeError: ``storage_options`` given (as :class:`TorchCheckpointIO`).
        """
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = _local(path)
        _remove_leftovers(target.parent)
        with atomic_write(target, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True`` unless the caller asks otherwise.

        Raises:
            CheckpointError: the file is missing, truncated, not a checkpoint, or holds
                pickled objects other than tensors and plain containers (refused unread:
                nothing in it runs). One line naming the file.
        """
        safe = True if weights_only is None else weights_only
        try:
            checkpoint = super().load_checkpoint(path, map_location, weights_only=safe)
        except READ_ERRORS as err:
            raise read_error(path, err) from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(
                f"{path}: not a Lightning checkpoint (no state_dict); pass a .ckpt written "
                "by imlnet fit"
            )
        return checkpoint


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was given another plugin.

    Only Lightning's default :class:`TorchCheckpointIO` is replaced; a checkpoint plugin
    chosen in a config (asynchronous, sharded, remote) is kept as it is.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class ValidateSkippedEpochEnd(Callback):
    """Run the validation that resuming from an epoch's last-step checkpoint would skip.

    A checkpoint written at the end of an epoch's last training step (``every_n_train_steps``)
    is on disk before that epoch's validation runs. Resuming from it, Lightning does not run
    that validation: the callbacks that act on it (the export of the best model, the best
    checkpoints) never see the epoch's metrics, and the resumed run can export another
    epoch's model than an uninterrupted one. This callback runs it at the start of the
    resumed run, with the restored weights, as the uninterrupted run did, so the export is the
    same. Not replayed: the end of that epoch, where a ``ModelCheckpoint`` monitoring the
    metric saves when validation runs once per epoch (Lightning has already moved on to the
    next epoch), so the resumed run's ``best-*.ckpt`` can differ from the uninterrupted run's.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate now when the run resumes at the end of an epoch's last training step."""
        loop = trainer.fit_loop.epoch_loop
        if not (
            loop.restarted_on_train_batch_end
            and loop.batch_progress.current.processed >= trainer.num_training_batches
            and loop._should_check_val_epoch()
        ):
            return
        trainer.validating = True
        loop.val_loop.run()
        trainer.training = True


def find_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last.ckpt`` of this run's checkpoint folders and of the earlier runs'.

    For ``--ckpt_path last`` Lightning looks only in the checkpoint folders of the run being
    started; with a logger that numbers its versions (the configs' TensorBoard and CSV
    loggers), the default folder is ``<save_dir>/<name>/version_<N+1>/checkpoints``, new and
    empty, so a rerun after a kill trained from scratch with only a warning. This looks in
    the folders a ``ModelCheckpoint`` was given (``dirpath``), in every version folder of each
    logger, and in ``<default_root_dir>/checkpoints`` without a logger.

    Returns:
        The most recently written ``last.ckpt`` (or ``last-vN.ckpt``), or None.
    """
    folders: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append(Path(callback.dirpath))
    for logger in trainer.loggers:
        if logger.save_dir is not None:
            root = Path(logger.save_dir) / str(logger.name or "")
            folders += sorted(root.glob("*/checkpoints"))
    if not trainer.loggers:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    found = [
        path
        for folder in folders
        for path in folder.glob("last*.ckpt")
        if _LAST.fullmatch(path.name) and path.is_file()
    ]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


_LAST = re.compile(r"last(-v\d+)?\.ckpt")
