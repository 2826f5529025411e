"""The Lightning data module: University-1652, SUES-200 or the synthetic benchmark.

The training loader is seeded and resumable:

- :class:`EpochSampler` orders the items by a permutation drawn from ``(seed, epoch)`` and
  shards it over the processes of a distributed run itself. It is a
  ``DistributedSampler``, so Lightning's ``use_distributed_sampler`` leaves it alone (it would
  otherwise wrap it and shuffle again with its own seed). ``set_epoch`` (Lightning calls it each
  epoch) also moves the dataset to that epoch, which picks the drone images and augmentations.
- :class:`ResumableDataLoader` counts the batches it has handed out and saves
  ``{epoch, batches}`` in Lightning checkpoints (``state_dict``/``load_state_dict``); resumed
  from a mid-epoch checkpoint it skips the batches already seen, so the run continues with the
  batches an uninterrupted run of the same seed would have seen.

Evaluation loaders are plain, in dataset order: validation ``[query_drone, gallery_satellite]``,
test ``[query_drone, gallery_satellite, query_satellite, gallery_drone]`` (:attr:`val_views`,
:attr:`test_views`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from imlnet.data.folders import PairedViewDataset, ViewDataset
from imlnet.data.images import check_policy
from imlnet.data.seeding import derive_seed
from imlnet.data.sues200 import SUES200Test, SUES200Train, check_altitude
from imlnet.data.transforms import build_transforms
from imlnet.data.university1652 import TEST_VIEWS, University1652Test, University1652Train

DATASETS = ("university1652", "sues200", "synthetic")


class EpochSampler(DistributedSampler):
    """A seeded shuffle per epoch, sharded over ``num_replicas`` processes.

    Epoch ``e`` visits a permutation of the dataset drawn from ``(seed, e)``; with several
    processes, the permutation is padded by repetition to a multiple of ``num_replicas`` and
    process ``rank`` takes every ``num_replicas``-th item from position ``rank`` (as torch's
    ``DistributedSampler``), so the ranks together see each item once per epoch.

    Args:
        dataset: the training dataset (its ``set_epoch`` is called by :meth:`set_epoch`).
        num_replicas: number of processes (1 without distribution).
        rank: this process's rank.
        seed: seed of the permutations.
        shuffle: False visits items in order (for debugging).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation, and the dataset's drone choices for that epoch."""
        if int(epoch) != self.epoch:
            self._skip = 0  # a pending resume offset belongs to the epoch it was saved in
        self.epoch = int(epoch)
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(self.epoch)

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next iteration only (resuming)."""
        self._skip = max(0, int(count))

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch, in order (without any skip)."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        if self.total_size > n:
            order += (order * (self.total_size // max(n, 1) + 1))[: self.total_size - n]
        return order[: self.total_size][self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.indices()[skip:])


class _CountingIterator:
    """Wraps a DataLoader iterator and counts the batches it hands out."""

    def __init__(self, loader: ResumableDataLoader, inner: Iterator[Any]) -> None:
        self.loader, self.inner = loader, inner

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.loader._batches += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose position survives a checkpoint.

    ``state_dict()`` is ``{"epoch", "batches", "num_replicas", "batch_size", "length"}``, where
    ``batches`` is the number of batches handed out in the current epoch; Lightning saves it with
    the fit loop and passes it back to ``load_state_dict`` before resuming. The next iteration
    then starts at that epoch's batch ``batches`` (or at the next epoch if the saved one was
    complete). ``len()`` stays the full epoch's, as Lightning expects of resumed loaders.
    """

    sampler: EpochSampler

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches = 0

    def __iter__(self) -> _CountingIterator:  # type: ignore[override]
        self._batches = self.sampler._skip // self.batch_size if self.batch_size else 0
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.sampler.epoch,
            "batches": self._batches,
            "num_replicas": self.sampler.num_replicas,
            "batch_size": int(self.batch_size or 0),
            "length": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        same = (
            state.get("num_replicas") == self.sampler.num_replicas
            and state.get("batch_size") == self.batch_size
            and state.get("length") == len(self.dataset)  # type: ignore[arg-type]
        )
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if batches >= len(self):  # saved at the end of an epoch: resume at the next one
            epoch, batches = epoch + 1, 0
        if not same and batches:
            warnings.warn(
                "the training loader's checkpoint was saved with another batch size, number of "
                "processes or dataset size; resuming at the start of the epoch instead of batch "
                f"{batches}",
                stacklevel=2,
            )
            batches = 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip_next(batches * int(self.batch_size or 1))
        self._batches = batches


class CrossViewDataModule(L.LightningDataModule):
    """Training pairs and evaluation views of one cross-view benchmark.

    Args:
        root: the dataset folder (University-1652's ``train/``+``test/`` parent, the SUES-200
            folder, or the output of ``imlnet synth``).
        dataset: ``"university1652"``, ``"sues200"`` or ``"synthetic"`` (our generated
            benchmark, in the University-1652 layout).
        altitude: SUES-200 flight altitude, 150/200/250/300 m (ignored otherwise).
        image_size: side of the square model input in pixels.
        batch_size: training pairs per batch (per process).
        eval_batch_size: images per evaluation batch.
        num_workers: image decoding processes per loader.
        sample_num: repetitions of each building per epoch (satellite oversampling).
        weather_prob: probability of weather augmentation of training drone images.
        augment: random augmentation of training images (crop, flip, satellite rotation);
            False trains on the evaluation transform (overfitting checks, debugging).
        on_bad_image: ``"raise"`` or ``"skip"`` unreadable images.
        seed: seed of the shuffling, the drone choice and the augmentations.
    """

    val_views: tuple[str, ...] = ("query_drone", "gallery_satellite")
    test_views: tuple[str, ...] = TEST_VIEWS

    def __init__(
        self,
        root: str,
        dataset: Literal["university1652", "sues200", "synthetic"] = "university1652",
        altitude: int = 150,
        image_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        sample_num: int = 1,
        weather_prob: float = 0.0,
        augment: bool = True,
        on_bad_image: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if dataset == "sues200":
            check_altitude(altitude)
        for name, value in (
            ("image_size", image_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("sample_num", sample_num),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= weather_prob <= 1.0:
            raise ValueError(f"weather_prob must be in [0, 1], got {weather_prob}")
        check_policy(on_bad_image)
        self.save_hyperparameters()
        self.root, self.dataset, self.altitude = root, dataset, int(altitude)
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.eval_batch_size, self.num_workers = int(eval_batch_size), int(num_workers)
        self.sample_num, self.weather_prob = int(sample_num), float(weather_prob)
        self.augment = bool(augment)
        self.on_bad_image, self.seed = on_bad_image, int(seed)
        self.train_set: PairedViewDataset | None = None
        self.val_sets: list[ViewDataset] = []
        self.test_sets: list[ViewDataset] = []
        self._num_classes: int | None = None

    # -- datasets ----------------------------------------------------------------------------
    def _train_dataset(self, with_transforms: bool = True) -> PairedViewDataset:
        kw: dict[str, Any] = {
            "sample_num": self.sample_num,
            "on_bad_image": self.on_bad_image,
            "seed": self.seed,
        }
        if with_transforms:
            kw["drone_transform"] = build_transforms(
                "drone",
                self.augment,
                self.image_size,
                weather_prob=self.weather_prob if self.augment else 0.0,
                seed=self.seed,
            )
            kw["satellite_transform"] = build_transforms("satellite", self.augment, self.image_size)
        if self.dataset == "sues200":
            return SUES200Train(self.root, self.altitude, **kw)
        return University1652Train(self.root, **kw)

    def _view_dataset(self, view: str) -> ViewDataset:
        domain = "drone" if view.endswith("drone") else "satellite"
        transform = build_transforms(domain, False, self.image_size)  # type: ignore[arg-type]
        kw: dict[str, Any] = {"transform": transform, "on_bad_image": self.on_bad_image}
        if self.dataset == "sues200":
            return SUES200Test(self.root, self.altitude, view, **kw)  # type: ignore[arg-type]
        return University1652Test(self.root, view, **kw)  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        """Number of training buildings, from the folder names (no image is decoded)."""
        if self._num_classes is None:
            train = self.train_set or self._train_dataset(with_transforms=False)
            self._num_classes = len(train.classes)
        return self._num_classes

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` ("fit", "validate", "test"; None: all)."""
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._train_dataset()
            self._num_classes = len(self.train_set.classes)
        if stage in ("fit", "validate", None) and not self.val_sets:
            self.val_sets = [self._view_dataset(v) for v in self.val_views]
        if stage in ("test", None) and not self.test_sets:
            self.test_sets = [self._view_dataset(v) for v in self.test_views]

    # -- loaders -----------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        """(number of processes, this rank) of the current run."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer else None
        if kwargs:
            return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded, shuffled, resumable training batches of ``drone``, ``satellite``, ``label``."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        replicas, rank = self._replicas()
        sampler = EpochSampler(self.train_set, num_replicas=replicas, rank=rank, seed=self.seed)
        return ResumableDataLoader(
            self.train_set,
            sampler=sampler,
            batch_size=self.batch_size,
            # a batch of one breaks batch norm and the batch-hard triplet: drop the last partial
            # batch when there is at least one full batch
            drop_last=len(sampler) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            # its own generator: creating an iterator must not draw from the global random state,
            # or a run resumed mid-epoch would continue with shifted dropout masks
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _eval_loader(self, dataset: ViewDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),  # leave the global RNG alone
        )

    def val_dataloader(self) -> list[DataLoader]:
        """``[query_drone, gallery_satellite]`` loaders of ``image``, ``label``, ``path``."""
        if not self.val_sets:
            self.setup("validate")
        return [self._eval_loader(d) for d in self.val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        """Loaders of the four views, in the order of :attr:`test_views`."""
        if not self.test_sets:
            self.setup("test")
        return [self._eval_loader(d) for d in self.test_sets]
