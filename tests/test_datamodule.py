"""The data module: loaders, batch keys, the seeded sharded sampler, and resuming mid-epoch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from imlnet.data.datamodule import CrossViewDataModule, EpochSampler, ResumableDataLoader
from test_data_sues200 import make_split
from test_data_university1652 import TRAIN_IDS, make_university


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_university(tmp_path_factory.mktemp("dm"))


def _dm(root: Path, **kw: object) -> CrossViewDataModule:
    args = {"dataset": "synthetic", "image_size": 32, "batch_size": 2, "eval_batch_size": 4}
    return CrossViewDataModule(str(root), **{**args, **kw})  # type: ignore[arg-type]


def test_num_classes_without_setup(root: Path) -> None:
    dm = _dm(root)
    assert dm.num_classes == len(TRAIN_IDS) and dm.train_set is None


def test_train_loader_batches(root: Path) -> None:
    dm = _dm(root, sample_num=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 2 * len(TRAIN_IDS) // 2
    batch = batches[0]
    assert set(batch) == {"drone", "satellite", "label", "building", "drone_path", "satellite_path"}
    assert batch["drone"].shape == batch["satellite"].shape == (2, 3, 32, 32)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert sorted(labels) == sorted(list(range(len(TRAIN_IDS))) * 2)  # each building twice
    assert float(batch["drone"].min()) < 0  # normalised


def test_augment_off_trains_on_the_evaluation_transform(root: Path) -> None:
    plain, augmented = _dm(root, augment=False), _dm(root)
    plain.setup("fit")
    augmented.setup("fit")
    for dm, random in ((plain, False), (augmented, True)):
        for transform in (dm.train_set.drone_transform, dm.train_set.satellite_transform):
            assert ("RandomCrop" in repr(transform)) == random
    assert not torch.equal(plain.train_set[0]["satellite"], augmented.train_set[0]["satellite"])


def test_eval_loaders_and_views(root: Path) -> None:
    dm = _dm(root)
    dm.setup("validate")
    val = dm.val_dataloader()
    assert dm.val_views == ("query_drone", "gallery_satellite") and len(val) == 2
    assert [len(v.dataset) for v in val] == [4, 3]
    batch = next(iter(val[0]))
    assert set(batch) == {"image", "label", "path"}
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [
        200,
        200,
        201,
        201,
    ]
    dm.setup("test")
    test = dm.test_dataloader()
    assert dm.test_views == ("query_drone", "gallery_satellite", "query_satellite", "gallery_drone")
    assert [v.dataset.view for v in test] == list(dm.test_views)
    assert [len(v.dataset) for v in test] == [4, 3, 2, 6]
    # evaluation order is the dataset order, every time
    first = [b["label"] for b in test[3]]
    assert torch.equal(torch.cat(first), torch.cat([b["label"] for b in test[3]]))


def test_sues200_module(tmp_path: Path) -> None:
    make_split(tmp_path, alts=(250,))
    dm = CrossViewDataModule(str(tmp_path), dataset="sues200", altitude=250, image_size=32)
    assert dm.num_classes == 3
    dm.setup("test")
    assert [len(d) for d in dm.test_sets] == [4, 5, 2, 10]
    with pytest.raises(ValueError, match="altitude"):
        CrossViewDataModule(str(tmp_path), dataset="sues200", altitude=100)


def test_invalid_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="dataset"):
        _dm(root, dataset="cvusa")
    with pytest.raises(ValueError, match="batch_size"):
        _dm(root, batch_size=0)
    with pytest.raises(ValueError, match="on_bad_image"):
        _dm(root, on_bad_image="ignore")


def test_sampler_is_seeded_per_epoch_and_shards() -> None:
    data = list(range(11))
    a, b = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    assert isinstance(a, DistributedSampler)  # so Lightning does not wrap it again
    assert list(a) == list(b) and sorted(a) == data
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == data
    assert list(EpochSampler(data, seed=4)) != list(b)
    shards = [EpochSampler(data, num_replicas=3, rank=r, seed=3) for r in range(3)]
    for s in shards:
        s.set_epoch(1)
    got = [list(s) for s in shards]
    assert all(len(g) == 4 for g in got)  # 11 padded to 12
    assert set().union(*got) == set(data)
    merged = [got[i % 3][i // 3] for i in range(11)]
    assert merged == list(a)  # the ranks interleave the single-process order


def test_sampler_epoch_moves_the_dataset(root: Path) -> None:
    dm = _dm(root)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(4)
    assert dm.train_set is not None and dm.train_set.epoch == 4


def test_loader_state_skips_seen_batches(root: Path) -> None:
    dm = _dm(root, sample_num=3)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [b["building"] for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 2
    fresh = _dm(root, sample_num=3).train_dataloader()
    fresh.load_state_dict(state)
    assert [b["building"] for b in fresh] == full[2:]
    assert [b["building"] for b in fresh] == full  # the skip applies to one iteration only
    end = _dm(root, sample_num=3).train_dataloader()
    end.load_state_dict({**state, "batches": len(loader)})  # saved at the end of epoch 1
    assert end.sampler.epoch == 2
    assert len(list(end)) == len(loader)


class _Recorder(L.LightningModule):
    """Records which buildings (and which drone pixels) each training step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, tuple[str, ...], float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total = round(float(batch["drone"].sum()), 2)
        self.seen.append((self.current_epoch, tuple(batch["building"]), total))
        return (self.w * batch["drone"].mean()).sum() + self.w.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kw: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=3,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("stop", [5, 4])  # mid-epoch, and exactly at an epoch's end
def test_resume_from_checkpoint_sees_the_same_batches(
    root: Path, tmp_path: Path, stop: int
) -> None:
    """Interrupted after ``stop`` steps and resumed == uninterrupted (order, drones, augment)."""
    ckpt = tmp_path / "stop.ckpt"

    class SaveAt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == stop:
                trainer.save_checkpoint(ckpt)

    def dm() -> CrossViewDataModule:
        return _dm(root, sample_num=2, seed=5)  # 8 items, 4 batches per epoch

    full = _Recorder()
    _trainer().fit(full, dm())
    first = _Recorder()
    _trainer(max_steps=stop, callbacks=[SaveAt()]).fit(first, dm())
    rest = _Recorder()
    _trainer().fit(rest, dm(), ckpt_path=ckpt)
    assert len(full.seen) == 12 and len(first.seen) == stop
    assert first.seen + rest.seen == full.seen
    assert len({s[1] for s in full.seen}) > 4  # the order does change across epochs


def test_loader_type(root: Path) -> None:
    loader = _dm(root).train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochSampler)
    assert loader.drop_last  # 4 items, batch 2: full batches only
    small = _dm(root, batch_size=16).train_dataloader()
    assert not small.drop_last and len(small) == 1  # fewer items than a batch: keep them
