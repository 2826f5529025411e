"""Training IML-Net with Lightning, and the ``imlnet fit/validate/test`` commands (LightningCLI).

Lightning does the loop, DDP, mixed precision, checkpoints, progress and logs; this file holds only
what is specific to the method: the IML-Net objective per batch, the retrieval metrics of the
official University-1652 protocol at validation/test time, and the export of the best model as
safetensors (:meth:`imlnet.models.imlnet.IMLNet.save_pretrained`) for the serving commands.

Resuming: the checkpoint carries torch's global random state, and the training loader's position
within its epoch (:class:`imlnet.data.datamodule.CrossViewDataModule` gives a resumable loader), so
a run killed mid-epoch and resumed from its last checkpoint ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from imlnet.checkpoints import (
    READ_ERRORS,
    ValidateSkippedEpochEnd,
    find_last_checkpoint,
    read_error,
    use_atomic_checkpoints,
)
from imlnet.errors import ConfigError
from imlnet.evaluation import evaluate_views
from imlnet.inference import embed, view_domain
from imlnet.losses import IMLNetObjective
from imlnet.models.backbone import UnitFeatures
from imlnet.models.cache import PrefixCache, dihedral
from imlnet.models.imlnet import IMLNet


def training_losses(
    model: IMLNet,
    objective: IMLNetObjective,
    drone: torch.Tensor,
    satellite: torch.Tensor,
    labels: torch.Tensor,
    prefixes: tuple[UnitFeatures, UnitFeatures] | None = None,
) -> dict[str, torch.Tensor]:
    """One training step's named loss parts: the model runs once, the objective scores its output.

    Args:
        model: the network; objective: the loss parts and weights.
        drone: ``(B, 3, H, W)``; satellite: ``(B, 3, H, W)``; labels: ``(B,)``.
        prefixes: cached frozen-unit features of ``drone`` and ``satellite``
            (:class:`~imlnet.models.cache.PrefixCache`), or None to compute them.

    Returns:
        :meth:`IMLNetObjective.forward`'s parts, ``"total"`` included.
    """
    out = model.forward_train(
        drone,
        satellite,
        labels,
        crop_units=objective.next_crop_units(),
        reconstruct_satellite=objective.reconstruct_satellite,
        prefixes=prefixes,
        crop_rows=objective.crop_rows,
    )
    return objective(out, satellite, labels)


class IMLNetModule(L.LightningModule):
    """IML-Net training and evaluation, built from its parts.

    With LightningCLI a config names the parts (``model.model`` and ``model.objective`` as
    ``class_path``/``init_args``; ``num_classes`` is linked from the data module), so the module
    does not repeat their arguments (configs/*.yaml).

    Args:
        model: the network (:class:`~imlnet.models.imlnet.IMLNet`).
        objective: the losses, weights and switches (:class:`~imlnet.losses.IMLNetObjective`);
            default: DRCL, IRN and MUML terms with unit weights.
        optimizer: ``"sgd"`` (the University-1652 baseline: momentum, nesterov) or ``"adamw"``.
        lr: learning rate of the new layers; the pretrained backbone gets ``lr * backbone_lr_mult``.
        unit_lr_mult: four multipliers of ``lr``, one per encoder unit (U1 first), in place of
            ``backbone_lr_mult`` (discriminative fine-tuning: early, generic units move less).
            Frozen units (``IMLNet(freeze_units=k)``) have no gradients whatever their rate.
        weight_decay, momentum: of the optimiser (momentum: SGD only).
        scheduler: ``"step"`` (x ``gamma`` every ``step_size`` epochs, the baseline), ``"cosine"``
            (to 0 at ``trainer.max_epochs``) or ``"none"``; ``warmup_epochs`` of linear warm-up.
        eval_protocol: ``"official"`` University-1652 protocol or ``"sample4geo"``.
        monitor: the metric that picks the exported model.
        export_dir: where the best model is saved as safetensors (default: ``<log dir>/export``).
        channels_last: NHWC memory format for the model, the batches and the cached prefixes
            (faster convolutions with AMP on GPUs, and with oneDNN on CPUs: a 1.3x step for
            the demo's model in fp32, docs/benchmarks.md).
        cache_frozen: compute the frozen units' features (``IMLNet(freeze_units=k)``) of every
            training image once, before the first step, and resume the encoder after them
            (:class:`~imlnet.models.cache.PrefixCache`). Needs ``data.augment: false``: the
            cache holds the images as they are, the satellite images at four rotations by 90
            degrees, one of which the module draws per pair (its augmentation). MUML crops are
            new images and pass the whole encoder.
        cache_flips: with ``cache_frozen``, also cache every training image mirrored left to
            right (twice the cache and its build time) and draw, per pair, whether the drone
            image is mirrored and which of the eight symmetries of the square the satellite
            image takes (the flip augmentation of the University-1652 baseline, exact).
    """

    def __init__(
        self,
        model: IMLNet,
        objective: IMLNetObjective | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        backbone_lr_mult: float = 0.1,
        unit_lr_mult: Sequence[float] | None = None,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: Literal["step", "cosine", "none"] = "step",
        step_size: int = 80,
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        eval_protocol: Literal["official", "sample4geo"] = "official",
        monitor: str = "val/R@1",
        export_dir: str | None = None,
        channels_last: bool = False,
        cache_frozen: bool = False,
        cache_flips: bool = False,
    ) -> None:
        super().__init__()
        if cache_flips and not cache_frozen:
            raise ConfigError(
                "cache_flips mirrors the cached frozen features: set cache_frozen: true as well "
                "(without the cache, data.augment: true flips the images itself)"
            )
        # The parts are modules (saved in the state dict); their arguments are in the CLI's
        # config.yaml and in the exported model's config.json.
        self.save_hyperparameters(ignore=["model", "objective"])
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.objective = objective if objective is not None else IMLNetObjective()
        self._features: dict[int, list[torch.Tensor]] = {}
        self._labels: dict[int, list[torch.Tensor]] = {}
        self._cache: PrefixCache | None = None

    # ------------------------------------------------------------------ training
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def on_fit_start(self) -> None:
        if self.hparams.cache_frozen and self._cache is None:
            self._cache = self._build_cache()

    def use_cache(self, cache: PrefixCache | None) -> None:
        """Train from ``cache`` (the frozen features of the same frozen weights and training
        images, e.g. another run's ``frozen_cache``) instead of building one at fit start."""
        self._cache = cache

    @property
    def frozen_cache(self) -> PrefixCache | None:
        """The frozen-unit features the module trains from (``cache_frozen``), once built."""
        return self._cache

    def _build_cache(self) -> PrefixCache:
        if not self.model.freeze_units:
            raise ConfigError(
                "cache_frozen needs frozen units: set model.init_args.freeze_units >= 1 "
                "(or cache_frozen: false)"
            )
        dm = getattr(self.trainer, "datamodule", None)
        train = getattr(dm, "train_set", None)
        if train is None or not hasattr(train, "drone_files"):
            raise ConfigError("cache_frozen needs a CrossViewDataModule's training set")
        if getattr(dm, "augment", False):
            raise ConfigError(
                "cache_frozen caches the training images as they are: set data.augment: false "
                "(the module then rotates each satellite image by a random multiple of 90 "
                "degrees, which the cache holds)"
            )
        from imlnet.data.images import read_image

        drone_t, sat_t = self._symmetries()
        items = []
        for bid in train.classes:
            items += [(str(p), "drone", t) for p in train.drone_files[bid] for t in drone_t]
            items += [(str(p), "satellite", t) for p in train.satellite_files[bid] for t in sat_t]
        transforms = {"drone": train.drone_transform, "satellite": train.satellite_transform}

        def load(path: str, domain: str) -> torch.Tensor:
            image = read_image(path)
            transform = transforms[domain]
            return transform(image) if transform is not None else image

        return PrefixCache.build(
            self.model, items, load, device=self.device, progress=self.trainer.is_global_zero
        )

    def _symmetries(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The :func:`~imlnet.models.cache.dihedral` symmetries cached per drone and satellite
        image: rotations of the satellite image, and with ``cache_flips`` the mirrored ones."""
        if self.hparams.get("cache_flips"):
            return (0, 4), tuple(range(8))
        return (0,), (0, 1, 2, 3)

    @staticmethod
    def _draw(images: torch.Tensor, allowed: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
        """Each image under a symmetry drawn from ``allowed`` (with the global generator, so a
        resumed run draws the same; nothing is drawn when there is one choice)."""
        if len(allowed) == 1:
            return images, [allowed[0]] * images.shape[0]
        picks = torch.tensor(allowed)[torch.randint(len(allowed), (images.shape[0],))].tolist()
        return torch.stack([dihedral(x, t) for x, t in zip(images, picks, strict=True)]), picks

    def _cached_inputs(self, batch: dict[str, Any]):
        """Drone and satellite images under a random cached symmetry each, and both prefixes."""
        drone_t, sat_t = self._symmetries()
        sat, pick_s = self._draw(batch["satellite"], sat_t)
        drone, pick_d = self._draw(batch["drone"], drone_t)
        assert self._cache is not None
        prefixes = tuple(
            replace(feats, maps=tuple(self._prepare(m) for m in feats.maps))
            for feats in (
                self._cache.get(batch["drone_path"], pick_d, self.device),
                self._cache.get(batch["satellite_path"], pick_s, self.device),
            )
        )
        return drone, sat, prefixes

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        drone, satellite, prefixes = batch["drone"], batch["satellite"], None
        if self._cache is not None:
            drone, satellite, prefixes = self._cached_inputs(batch)
        parts = training_losses(
            self.model,
            self.objective,
            self._prepare(drone),
            self._prepare(satellite),
            batch["label"],
            prefixes,
        )
        bs = batch["label"].shape[0]
        for name, value in parts.items():
            self.log(
                f"train/{name}",
                value.detach(),
                batch_size=bs,
                prog_bar=name == "total",
                on_step=True,
                on_epoch=True,
                sync_dist=True,  # epoch means over all processes (nothing to do in one)
            )
        return parts["total"]

    # ------------------------------------------------------------------ evaluation
    def _views(self, stage: str) -> tuple[str, ...]:
        dm = getattr(self.trainer, "datamodule", None)
        default = (
            ("query_drone", "gallery_satellite")
            if stage == "val"
            else ("query_drone", "gallery_satellite", "query_satellite", "gallery_drone")
        )
        return tuple(getattr(dm, f"{stage}_views", default))

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, idx: int) -> None:
        """Official feature (:func:`imlnet.inference.embed`), kept on the device to gather."""
        x = self._prepare(batch["image"])
        domain = view_domain(self._views(stage)[idx])
        feat = embed(self.model, x, domain, batch_size=len(x), device=x.device)
        self._features.setdefault(idx, []).append(feat.to(self.device))
        self._labels.setdefault(idx, []).append(batch["label"])

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def _collect(self, stage: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per view: all features and labels, across processes, in dataset order.

        Lightning shards evaluation sets with ``DistributedSampler(shuffle=False)``: rank r gets
        items r, r + W, r + 2W, ... padded with repeats to equal length. Gathering and
        interleaving the ranks restores the order; cutting at the dataset length drops the
        repeats, so the metrics are exactly those of a single process.
        """
        out = {}
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, Sequence) else [loaders]
        for idx, view in enumerate(self._views(stage)):
            feats = torch.cat(self._features.pop(idx, [torch.empty(0, 0, device=self.device)]))
            labels = torch.cat(self._labels.pop(idx, [torch.empty(0, device=self.device)]))
            if self.trainer.world_size > 1:
                feats = self.all_gather(feats).transpose(0, 1).reshape(-1, feats.shape[-1])
                labels = self.all_gather(labels).transpose(0, 1).reshape(-1)
                n = len(loaders[idx].dataset)
                feats, labels = feats[:n], labels[:n]
            out[view] = (feats, labels)
        return out

    def _log_retrieval(self, stage: str) -> None:
        views = {v: fl for v, fl in self._collect(stage).items() if fl[0].numel()}
        results = evaluate_views(views, protocol=self.hparams.eval_protocol)
        for direction, metrics in results.items():
            prefix = f"{stage}/" if direction == "drone->satellite" else f"{stage}/s2d_"
            for key, value in metrics.items():
                self.log(
                    f"{prefix}{key}",
                    float(value),
                    prog_bar=key == "R@1" and stage == "val",
                    # identical on every process (features are gathered first): the mean of
                    # equal values is exact, and it tells Lightning the value is global
                    sync_dist=True,
                )

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        backbone_ids = {id(p) for p in self.model.backbone_parameters()}
        rest = [p for p in self.parameters() if id(p) not in backbone_ids and p.requires_grad]
        if hp.unit_lr_mult is not None:
            mults = [float(m) for m in hp.unit_lr_mult]
            if len(mults) != 4 or any(m < 0 for m in mults):
                raise ValueError(f"unit_lr_mult must be four rates >= 0, got {hp.unit_lr_mult}")
            groups = [
                {"params": [p for p in params if p.requires_grad], "lr": hp.lr * m}
                for params, m in zip(self.model.unit_parameters(), mults, strict=True)
            ]
        else:
            backbone = [p for p in self.parameters() if id(p) in backbone_ids and p.requires_grad]
            groups = [{"params": backbone, "lr": hp.lr * hp.backbone_lr_mult}]
        groups = [g for g in groups if g["params"]] + [{"params": rest, "lr": hp.lr}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                groups, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.momentum > 0
            )
        else:
            opt = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        max_epochs = max(1, int(getattr(self.trainer, "max_epochs", None) or 1))
        warm = hp.warmup_epochs

        def factor(epoch: int) -> float:
            f = 1.0
            if hp.scheduler == "step":
                f = hp.gamma ** (epoch // max(1, hp.step_size))
            elif hp.scheduler == "cosine":
                f = 0.5 * (1 + math.cos(math.pi * min(epoch, max_epochs) / max_epochs))
            if warm and epoch < warm:
                f *= (epoch + 1) / (warm + 1)
            return float(f)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoints
    def setup(self, stage: str) -> None:
        # before any checkpoint is read or written: atomic saves, one-line read errors
        use_atomic_checkpoints(self.trainer)

    def configure_callbacks(self) -> list[Callback]:
        export = ExportBest(self.hparams.monitor, self.hparams.export_dir)
        return [export, ValidateSkippedEpochEnd()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only torch's global generator drives training (dropout); data augmentation is seeded
        # per item by the data module. A byte tensor keeps the checkpoint weights_only-loadable.
        checkpoint["imlnet_torch_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("imlnet_torch_rng")
        if state is not None:  # continue the random stream where the interrupted run left it
            torch.set_rng_state(state)


class ExportBest(Callback):
    """Save the model as safetensors + config whenever the monitored metric improves.

    Without validation (no monitored value), the model is exported at the end of training.
    """

    def __init__(self, monitor: str = "val/R@1", export_dir: str | None = None) -> None:
        self.monitor, self.export_dir = monitor, export_dir
        self.best: float | None = None

    def _dir(self, trainer: L.Trainer) -> Path:
        if self.export_dir:
            return Path(self.export_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def _export(self, trainer: L.Trainer, module: IMLNetModule) -> None:
        # Every process asks for the folder: under DDP ``trainer.log_dir`` is a broadcast, so
        # asking on rank 0 alone would leave it waiting for the others forever.
        folder = self._dir(trainer)
        size = getattr(getattr(trainer, "datamodule", None), "image_size", None)
        if trainer.is_global_zero:
            module.model.save_pretrained(folder, meta={"image_size": size} if size else None)

    def on_validation_end(self, trainer: L.Trainer, module: IMLNetModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        if self.best is None or float(value) > self.best:
            self.best = float(value)
            self._export(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: IMLNetModule) -> None:
        if self.best is None:
            self._export(trainer, module)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


def best_checkpoint(monitor: str = "val/R@1") -> ModelCheckpoint:
    """Lightning checkpoints of the best model by ``monitor`` and the last one (for resuming)."""
    return ModelCheckpoint(
        monitor=monitor,
        mode="max",
        save_last=True,
        filename="best-{epoch:03d}",
        auto_insert_metric_name=False,
    )


class IMLNetCLI(LightningCLI):
    """LightningCLI with the number of classes linked from the data to the network."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments(
            "data.num_classes", "model.model.init_args.num_classes", apply_on="instantiate"
        )

    def before_fit(self) -> None:
        # --ckpt_path last: also the earlier runs' folders (a versioned logger starts a new one)
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer)
            if found is not None:
                config["ckpt_path"] = str(found)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path first (weights_only) for its hyperparameters
        try:
            super()._parse_ckpt_path()
        except READ_ERRORS as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise read_error(path, err) from err


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> IMLNetCLI:
    """``imlnet fit|validate|test --config CONFIG.yaml [--section.key value ...]``.

    Default callbacks (added to a config's ``trainer.callbacks``, not replaced by them: LightningCLI
    appends ``trainer_defaults`` callbacks): the best and last checkpoints by ``val/R@1`` in
    ``<log dir>/checkpoints``; the model adds the safetensors export of the best model and
    :class:`~imlnet.checkpoints.ValidateSkippedEpochEnd`. ``--ckpt_path last`` also looks in
    the earlier runs' folders (:func:`~imlnet.checkpoints.find_last_checkpoint`).
    """
    from imlnet.data.datamodule import CrossViewDataModule

    return IMLNetCLI(
        IMLNetModule,
        CrossViewDataModule,
        args=list(args) if args is not None else None,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [best_checkpoint()]},
    )
