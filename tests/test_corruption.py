"""University-WX corruptions (deterministic per image and seed) and ``evaluate --by/--corrupt``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imlnet.cli import main as cli_main
from imlnet.evaluation import cli, evaluate_retrieval
from imlnet.evaluation.corruption import (
    CONDITIONS,
    UnknownConditionError,
    corrupt,
    parse_conditions,
)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((72, 64), Image.BICUBIC))


def test_every_condition_is_deterministic_per_image_and_seed(image):
    for condition in CONDITIONS:
        a = corrupt(image, condition, "test/query_drone/0001/image-01.jpeg", seed=0)
        assert a.shape == image.shape and a.dtype == np.uint8
        again = corrupt(image.copy(), condition, "test/query_drone/0001/image-01.jpeg", seed=0)
        np.testing.assert_array_equal(a, again)
        if condition == "normal":
            np.testing.assert_array_equal(a, image)
            continue
        assert np.abs(a.astype(int) - image).mean() > 1.0, condition  # it does something
        if condition in ("dark", "overexposure"):
            continue  # only their brightness channel is drawn: fixed for the same image
        other_seed = corrupt(image, condition, "test/query_drone/0001/image-01.jpeg", seed=1)
        other_image = corrupt(image, condition, "test/query_drone/0001/image-02.jpeg", seed=0)
        assert not np.array_equal(a, other_seed), condition
        assert not np.array_equal(a, other_image), condition


def test_dark_is_darker_and_overexposure_brighter(image):
    assert corrupt(image, "dark", "k").mean() < 0.6 * image.mean()
    assert corrupt(image, "overexposure", "k").mean() > 1.2 * image.mean()


def test_conditions_figure_shows_every_condition(image):
    from imlnet.evaluation.robustness import conditions_figure

    fig = conditions_figure(image)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == list(CONDITIONS)


def test_condition_names():
    assert parse_conditions("wx") == list(CONDITIONS) and len(CONDITIONS) == 10
    assert parse_conditions("rain,fog, over-exposure,fog") == ["fog", "rain", "overexposure"]
    with pytest.raises(UnknownConditionError, match=r"hail.*fog_rain"):
        parse_conditions("fog,hail")
    with pytest.raises(UnknownConditionError):
        corrupt(np.zeros((4, 4, 3), np.uint8), "hail", "k")


# --------------------------------------------------------------------------- the command
class FakeModel:
    """``encode``: a fixed linear map of the pooled image, different per domain."""

    def __init__(self):
        g = torch.Generator().manual_seed(9)
        self.w = {d: torch.randn(3 * 4 * 4, 6, generator=g) for d in ("drone", "satellite")}

    def encode(self, x, domain):
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w[domain]


def _dataset(root: Path) -> None:
    """3 buildings, 4 drone views each (+ a gallery distractor), with a metadata.json."""
    rng = np.random.default_rng(3)
    locations = {}
    for b in ("0001", "0002", "0003", "0009"):
        views = []
        for k in range(4):
            name = f"image-{k + 1:02d}.jpeg"
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            for view in ("query_drone", "gallery_drone"):
                if view == "query_drone" and b == "0009":
                    continue
                (root / "test" / view / b).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / "test" / view / b / name)
            views.append(
                {
                    "file": name,
                    "season": ("summer", "winter")[k % 2],
                    "weather": "clear",
                    "altitude_m": 60.0 + 30 * k,
                    "pitch_deg": 45.0,
                }
            )
        locations[b] = {"views": views}
        sat = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        for view in ("gallery_satellite", "query_satellite"):
            if view == "query_satellite" and b == "0009":
                continue
            (root / "test" / view / b).mkdir(parents=True, exist_ok=True)
            Image.fromarray(sat).save(root / "test" / view / b / f"{b}.jpg")
    (root / "metadata.json").write_text(json.dumps({"locations": locations}))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_evaluate_by_and_corrupt_end_to_end(tmp_path, monkeypatch, capsys):
    from imlnet.inference import LoadedModel, eval_transform

    data = tmp_path / "data"
    _dataset(data)
    before = _files(data)
    monkeypatch.setattr(
        cli, "load_model", lambda c, d="auto", *, image_size=None: LoadedModel(
            FakeModel(), 32, eval_transform(32)
        )
    )  # fmt: skip

    def run(out: str, seed: int = 0) -> dict:
        argv = ["--checkpoint", "ckpt", "--data", str(data), "--device", "cpu", "--quiet"]
        argv += ["--workers", "0", "--by", "season,altitude", "--bins", "altitude=0,50,100,200"]
        argv += ["--corrupt", "fog,dark,normal", "--corrupt-seed", str(seed)]
        argv += ["--report-dir", str(tmp_path / out), "--out", str(tmp_path / out / "r.json")]
        argv += ["--save-corrupted", str(tmp_path / out / "images")]
        assert cli.main(argv) == 0
        return json.loads((tmp_path / out / "r.json").read_text())

    first = run("a")
    printed = capsys.readouterr().out
    assert "satellite->drone (gallery: group), by season" in printed and "Robustness" in printed
    assert "| 0-50 m | 0 | - |" in printed  # an empty altitude group, reported
    assert _files(data) == before  # nothing written into the dataset
    for name in ("breakdown.json", "breakdown.png", "corruption.json", "corruption.png"):
        assert (tmp_path / "a" / name).is_file(), name
    saved = tmp_path / "a" / "images" / "fog" / "query_drone" / "0001" / "image-01.png"
    assert saved.is_file()
    assert not (tmp_path / "a" / "images" / "normal").exists()
    # the per-group numbers are evaluate_retrieval on the subset of the saved clean features
    report = first["corruption"]["all"]
    assert report["conditions"]["normal"] == report["clean"] == first["results"]
    summary = report["summary"]["drone->satellite"]
    mean = np.mean(
        [report["conditions"][c]["drone->satellite"]["R@1"] for c in report["conditions"]]
    )
    assert summary["mean R@1"] == pytest.approx(mean)
    assert summary["drop R@1"] == pytest.approx(first["results"]["drone->satellite"]["R@1"] - mean)
    # reproducible across runs; another seed gives other fog
    assert run("b")["corruption"] == first["corruption"]
    other = Image.open(saved).tobytes()
    run("c", seed=1)
    assert (
        Image.open(tmp_path / "c" / "images" / "fog/query_drone/0001/image-01.png").tobytes()
        != other
    )
    by = first["breakdown"]["all"]["results"]["season"]["drone->satellite"]
    assert by["summer"]["n"] == by["winter"]["n"] == 6


def test_metric_equality_through_the_command(tmp_path, monkeypatch):
    from imlnet.data.university1652 import University1652Test
    from imlnet.evaluation import extract_features
    from imlnet.inference import LoadedModel, eval_transform

    data = tmp_path / "data"
    _dataset(data)
    model = FakeModel()
    monkeypatch.setattr(
        cli, "load_model", lambda c, d="auto", *, image_size=None: LoadedModel(
            model, 32, eval_transform(32)
        )
    )  # fmt: skip
    out = tmp_path / "r.json"
    argv = ["--checkpoint", "x", "--data", str(data), "--device", "cpu", "--quiet", "--by"]
    assert cli.main([*argv, "altitude", "--report-dir", str(tmp_path), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["breakdown"]["all"]["results"]["altitude"]["drone->satellite"]
    ds = University1652Test(data, "query_drone", transform=eval_transform(32))
    qf, ql = extract_features(model, torch.utils.data.DataLoader(ds, batch_size=5), progress=False)
    gs = University1652Test(data, "gallery_satellite", transform=eval_transform(32))
    gf, gl = extract_features(
        model, torch.utils.data.DataLoader(gs), domain="satellite", progress=False
    )
    first_views = torch.tensor([p.name == "image-01.jpeg" for p, _ in ds.samples])  # 60 m
    want = evaluate_retrieval(qf[first_views], ql[first_views], gf, gl)
    assert {k: got["50-75 m"][k] for k in want} == pytest.approx(want)


def test_unknown_names_exit_2_with_the_list(tmp_path, capsys):
    base = ["evaluate", "--checkpoint", "x", "--data", str(tmp_path)]
    assert cli_main([*base, "--corrupt", "hail"]) == 2
    assert "error: unknown corruption condition(s) ['hail']" in capsys.readouterr().err
    assert cli_main([*base, "--by", "humidity"]) == 2
    assert "choose from season" in capsys.readouterr().err
    assert cli_main([*base, "--by", "season", "--bins", "season=4"]) == 2
    assert "--bins 'season=4'" in capsys.readouterr().err


def test_by_from_a_saved_features_file_equals_the_model_run(tmp_path, monkeypatch):
    from imlnet.inference import LoadedModel, eval_transform

    data = tmp_path / "data"
    _dataset(data)
    monkeypatch.setattr(
        cli, "load_model", lambda c, d="auto", *, image_size=None: LoadedModel(
            FakeModel(), 32, eval_transform(32)
        )
    )  # fmt: skip
    common = ["--device", "cpu", "--quiet", "--by", "season,altitude"]
    feats = tmp_path / "f.npz"
    argv = ["--checkpoint", "x", "--data", str(data), *common, "--save-features", str(feats)]
    assert (
        cli.main([*argv, "--report-dir", str(tmp_path / "a"), "--out", str(tmp_path / "a.json")])
        == 0
    )
    argv = ["--features", str(feats), "--data", str(data), *common]
    assert (
        cli.main([*argv, "--report-dir", str(tmp_path / "b"), "--out", str(tmp_path / "b.json")])
        == 0
    )
    a = json.loads((tmp_path / "a.json").read_text())["breakdown"]
    b = json.loads((tmp_path / "b.json").read_text())["breakdown"]
    assert a == b and a["all"]["results"]["altitude"]["drone->satellite"]
    # a features file without paths cannot be broken down: a clear message
    np.savez(tmp_path / "old.npz", **{k: v for k, v in np.load(feats).items() if "_paths" not in k})
    argv = [
        "evaluate",
        "--features",
        str(tmp_path / "old.npz"),
        "--data",
        str(data),
        "--by",
        "season",
    ]
    assert cli_main([*argv, "--report-dir", str(tmp_path / "c")]) == 2


def test_sues200_altitude_is_each_setting(tmp_path, monkeypatch, capsys):
    from imlnet.inference import LoadedModel, eval_transform

    rng = np.random.default_rng(5)
    for altitude in (150, 300):
        for view, per in (("query_drone", 2), ("gallery_satellite", 1), ("query_satellite", 1),
                          ("gallery_drone", 2)):  # fmt: skip
            for b in ("0001", "0002"):
                folder = tmp_path / "sues" / "Testing" / str(altitude) / view / b
                folder.mkdir(parents=True)
                for k in range(per):
                    pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{k}.png")
    monkeypatch.setattr(
        cli, "load_model", lambda c, d="auto", *, image_size=None: LoadedModel(
            FakeModel(), 32, eval_transform(32)
        )
    )  # fmt: skip
    argv = ["--checkpoint", "x", "--data", str(tmp_path / "sues"), "--dataset", "sues200"]
    argv += ["--altitudes", "150", "300", "--device", "cpu", "--quiet", "--by", "altitude"]
    assert (
        cli.main([*argv, "--report-dir", str(tmp_path / "r"), "--out", str(tmp_path / "r.json")])
        == 0
    )
    got = json.loads((tmp_path / "r.json").read_text())["breakdown"]
    assert list(got["150m"]["results"]["altitude"]["drone->satellite"]) == ["150-175 m"]
    assert list(got["300m"]["results"]["altitude"]["drone->satellite"]) == ["300-325 m"]
    assert (tmp_path / "r" / "300m" / "breakdown.png").is_file()


def test_multi_domain_report_equals_the_command(tmp_path, monkeypatch):
    from imlnet.evaluation.multidomain import multi_domain_report
    from imlnet.inference import LoadedModel, eval_transform

    data = tmp_path / "data"
    _dataset(data)
    model = FakeModel()
    monkeypatch.setattr(
        cli, "load_model", lambda c, d="auto", *, image_size=None: LoadedModel(
            model, 32, eval_transform(32)
        )
    )  # fmt: skip
    argv = ["--checkpoint", "x", "--data", str(data), "--device", "cpu", "--quiet"]
    argv += ["--by", "season,pitch", "--corrupt", "wind,dark", "--out", str(tmp_path / "r.json")]
    assert cli.main([*argv, "--report-dir", str(tmp_path / "cli")]) == 0
    want = json.loads((tmp_path / "r.json").read_text())
    rep = multi_domain_report(
        model, data, image_size=32, by=["season", "pitch"], corrupt="wind,dark", out=tmp_path / "m"
    )
    assert rep["breakdown"]["results"] == want["breakdown"]["all"]["results"]
    for direction, summary in want["corruption"]["all"]["summary"].items():
        assert rep["corruption"]["summary"][direction] == pytest.approx(summary)
    assert {Path(f).name for f in rep["breakdown"]["files"] + rep["corruption"]["files"]} == {
        "breakdown.json", "breakdown.png", "corruption.json", "corruption.png"
    }  # fmt: skip
