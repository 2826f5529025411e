"""The University-1652 protocol: hand-computed cases, a plain loop of the official code, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imlnet import evaluation
from imlnet.errors import DatasetLayoutError
from imlnet.evaluation import (
    buckets,
    cli,
    evaluate_retrieval,
    extract_features,
    format_table,
    good_ranks,
    load_features,
    main,
    ranking,
    save_features,
)


# --------------------------------------------------------------------------- reference loop
def official_loop(qf, ql, gf, gl, protocol="official"):
    """The official evaluate_gpu.py / compute_mAP, one query at a time, written plainly.

    The only deliberate difference: argsort kind="stable" (the documented tie rule).
    """
    qf, gf = np.asarray(qf), np.asarray(gf)
    ql, gl = np.asarray(ql), np.asarray(gl).copy()
    if protocol == "sample4geo":
        gl[~np.isin(gl, ql)] = -1
    cmc_total = np.zeros(len(gl))
    ap_total = 0.0
    for i in range(len(ql)):
        score = gf @ qf[i]
        index = np.argsort(score, kind="stable")[::-1]
        good_index = np.argwhere(gl == ql[i]).flatten()
        junk_index = np.argwhere(gl == -1).flatten()
        if good_index.size == 0 or ql[i] == -1:
            continue
        index = index[np.isin(index, junk_index, invert=True)]
        rows_good = np.argwhere(np.isin(index, good_index)).flatten()
        cmc = np.zeros(len(gl))
        cmc[rows_good[0] :] = 1
        cmc_total += cmc
        ngood = len(good_index)
        for j in range(ngood):
            precision = (j + 1) / (rows_good[j] + 1)
            old_precision = j / rows_good[j] if rows_good[j] != 0 else 1.0
            ap_total += (old_precision + precision) / 2 / ngood
    cmc_total /= len(ql)
    return {
        "R@1": cmc_total[0] * 100,
        "R@5": cmc_total[4] * 100,
        "R@10": cmc_total[9] * 100,
        "R@1%": cmc_total[round(len(gl) * 0.01)] * 100,
        "AP": ap_total / len(ql) * 100,
    }


def assert_metrics_equal(got, want, tol=1e-9):
    assert set(got) == {"R@1", "R@5", "R@10", "R@1%", "AP"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=tol), key


def random_case(seed, n_query, n_gallery, dim, n_labels, *, dyadic, dtype):
    """Random features and labels with junk (-1) on both sides and labels without a match.

    ``dyadic``: small multiples of 1/2 in few dimensions, so every score is exact in any dtype
    and summation order, and equal scores are frequent (the tie rule is exercised).
    """
    rng = np.random.default_rng(seed)
    if dyadic:
        qf = rng.integers(-2, 3, (n_query, dim)) / 2
        gf = rng.integers(-2, 3, (n_gallery, dim)) / 2
    else:
        qf = rng.standard_normal((n_query, dim))
        gf = rng.standard_normal((n_gallery, dim))
    ql = rng.integers(-1, n_labels + 3, n_query)  # some labels absent from the gallery
    gl = rng.integers(-1, n_labels, n_gallery)
    gl[rng.random(n_gallery) < 0.3] = 10_000  # the largest class, matched by no query
    return qf.astype(dtype), ql, gf.astype(dtype), gl


# --------------------------------------------------------------------------- hand-made cases
def test_hand_computed_protocol():
    # One-dimensional features: score = gallery value, so gallery index k has rank k before junk
    # removal (values 250, 249, ..., 1). Gallery of 250: R@1% = CMC[round(2.5)] = CMC[2] (Python
    # rounds half to even; a round-half-up would read CMC[3]).
    n = 250
    gallery = np.arange(n, 0, -1, dtype=np.float64)[:, None]
    labels = 100 + np.arange(n)  # fillers that match no query
    labels[0] = -1  # junk at the top: removed, so every rank below shifts up by one
    labels[[2, 10]] = 1  # query 0: good items at ranks 1 and 9 after junk removal
    labels[3] = 2  # query 1: rank 2
    labels[4] = 3  # query 2: rank 3
    labels[1] = 4  # query 3: rank 0
    queries = np.ones((6, 1))
    qlabels = np.array([1, 2, 3, 4, 999, -1])  # 999: no good item; -1: unknown; both count
    got = evaluate_retrieval(queries, qlabels, gallery, labels)
    # AP per query: q0 = ((0 + 1/2)/2 + (1/9 + 2/10)/2) / 2 = 73/360; q1 = (0 + 1/3)/2 = 1/6;
    # q2 = (0 + 1/4)/2 = 1/8; q3 = (1 + 1)/2 = 1; q4 = q5 = 0. Mean over 6 queries.
    ap = (73 / 360 + 1 / 6 + 1 / 8 + 1) / 6 * 100
    # First good ranks 1, 2, 3, 0, -, -: R@1 = 1/6, R@5 = R@10 = 4/6, R@1% (rank <= 2) = 3/6.
    want = {"R@1": 100 / 6, "R@5": 400 / 6, "R@10": 400 / 6, "R@1%": 50.0, "AP": ap}
    assert_metrics_equal(got, want)
    assert got["AP"] == pytest.approx(24.907407407407, abs=1e-9)
    assert_metrics_equal(got, official_loop(queries, qlabels, gallery, labels))


def test_hand_computed_ties_and_sample4geo():
    # Scores [2, 1, 2, 1, 2]. Stable ascending argsort: [1, 3, 0, 2, 4]; reversed: [4, 2, 0, 3,
    # 1]: among equal scores the larger index ranks first. Goods (label 5): index 2 at rank 1,
    # index 1 at rank 4. AP = ((0 + 1/2)/2 + (1/4 + 2/5)/2) / 2 = 0.2875.
    gallery = np.array([[2.0], [1.0], [2.0], [1.0], [2.0]])
    labels = np.array([9, 5, 5, 8, 9])
    query, qlabel = np.array([[1.0]]), np.array([5])
    got = evaluate_retrieval(query, qlabel, gallery, labels)
    assert_metrics_equal(got, {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "AP": 28.75})
    # round(0.05) = 0: R@1% is CMC[0] here.
    assert got["R@1%"] == 0.0
    # sample4geo: labels 9 and 8 are not query labels, so junk; the goods (order [2, 1]) rank
    # 0 and 1: precision 1 and 1, AP = 100.
    s4g = evaluate_retrieval(query, qlabel, gallery, labels, protocol="sample4geo")
    assert_metrics_equal(s4g, {"R@1": 100.0, "R@5": 100.0, "AP": 100.0})


def test_small_gallery_recall_at_k_means_any_good():
    # Gallery of 3 (the official code would index past its CMC array for R@5): the first good
    # item at rank 2 counts for R@5 and R@10.
    gallery = np.array([[3.0], [2.0], [1.0]])
    got = evaluate_retrieval(np.ones((1, 1)), [7], gallery, [1, 2, 7])
    assert (got["R@1"], got["R@5"], got["R@10"]) == (0.0, 100.0, 100.0)
    assert got["AP"] == pytest.approx((0 / 2 + 1 / 3) / 2 * 100)  # (old 0/2 + precision 1/3) / 2


def test_all_junk_gallery_gives_zero():
    got = evaluate_retrieval(np.ones((2, 1)), [1, 2], np.ones((3, 1)), [-1, -1, -1])
    assert got == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "R@1%": 0.0, "AP": 0.0}


# --------------------------------------------------------------------------- against the loop
@pytest.mark.parametrize("protocol", ["official", "sample4geo"])
@pytest.mark.parametrize(
    ("dtype", "dyadic"), [(np.float32, True), (np.float64, True), (np.float64, False)]
)
def test_equals_official_loop(protocol, dtype, dyadic):
    # Few labels: many good items per query (the bucket path, M > 2). float32 only with exact
    # (dyadic) scores: a float32 score computed by another BLAS kernel may round differently.
    qf, ql, gf, gl = random_case(1, 40, 300, 4, 6, dyadic=dyadic, dtype=dtype)
    want = official_loop(qf, ql, gf, gl, protocol)
    for chunk in (None, 1, 7):
        got = evaluate_retrieval(qf, ql, gf, gl, protocol, chunk_size=chunk)
        assert_metrics_equal(got, want)
    got = evaluate_retrieval(torch.from_numpy(qf), torch.from_numpy(ql), gf, gl, protocol)
    assert_metrics_equal(got, want)


@pytest.mark.parametrize("one_good", [False, True])
def test_block_sizes_do_not_change_results(monkeypatch, one_good):
    # Small blocks (the CPU defaults would use one block for these small cases). Many good
    # items per query: several chunks of queries, each against many blocks of gallery items.
    # One per query: several matrix products, each ranked in several row blocks.
    monkeypatch.setattr(ranking, "RANK_ELEMENTS", 700)  # 2 rows of 300
    monkeypatch.setattr(ranking, "MATMUL_ROWS", 5)
    monkeypatch.setattr(ranking, "BINNED_ROWS", 8)
    monkeypatch.setattr(ranking, "BINNED_COLS", 30)  # blocks of 30 gallery items
    monkeypatch.setattr(ranking, "CHUNK_ELEMENTS", 3000)  # at most 10 rows per product
    qf, ql, gf, gl = random_case(9, 37, 300, 4, 6, dyadic=True, dtype=np.float64)
    if one_good:
        gl = np.random.default_rng(9).permutation(300) - 1  # each label once, one junk
    want = official_loop(qf, ql, gf, gl)
    assert_metrics_equal(evaluate_retrieval(qf, ql, gf, gl), want)


@pytest.mark.parametrize("one_good", [False, True])
def test_parallel_pieces_give_the_same_results(monkeypatch, one_good):
    # Large CPU evaluations run in one piece of queries per thread (here forced for a small
    # one, with three pieces); the torch thread count is restored afterwards.
    monkeypatch.setattr(ranking, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setattr(ranking, "CPU_WORKERS", 3)
    monkeypatch.setattr(ranking, "PIECE_QUERIES", 10)
    qf, ql, gf, gl = random_case(10, 50, 400, 4, 8, dyadic=True, dtype=np.float32)
    if one_good:
        gl = np.random.default_rng(10).permutation(400) - 1
    threads = torch.get_num_threads()
    got = evaluate_retrieval(qf, ql, gf, gl, chunk_size=7)
    assert torch.get_num_threads() == threads
    assert_metrics_equal(got, official_loop(qf, ql, gf, gl))


def test_estimates_outside_their_margin_fall_back_to_whole_rows(monkeypatch):
    # The bucket path estimates the good scores before its pass; where an exact score falls
    # outside the buckets kept for it (here: every estimate is off by 3), the row is ranked
    # again from its whole score row, with the same results.
    calls = []
    good_scores = ranking._good_scores

    def off_by_three(q, g, idx):
        scores, norms = good_scores(q, g, idx)
        return scores + 3.0, norms

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return good_ranks(*args, **kwargs)

    monkeypatch.setattr(ranking, "_good_scores", off_by_three)
    monkeypatch.setattr(ranking, "good_ranks", counted)
    qf, ql, gf, gl = random_case(11, 30, 200, 4, 5, dyadic=True, dtype=np.float32)
    assert_metrics_equal(evaluate_retrieval(qf, ql, gf, gl), official_loop(qf, ql, gf, gl))
    with_good = np.isin(ql, gl[gl != -1]) & (ql != -1)
    assert sum(calls) == with_good.sum() > 0  # every row with a good item was redone


def test_score_in_another_good_items_interval_is_not_exact():
    # Good item 10 is estimated at 0.1 but scores 0.5, inside the interval kept for item 20:
    # every bucket is kept for some good item, yet the ranks are wrong, so the row must be
    # reported as not exact (and the caller ranks it again from its whole score row).
    scores = torch.rand(1, 1000, generator=torch.Generator().manual_seed(0)) * 0.8
    scores[0, 10], scores[0, 20], scores[0, 30] = 0.5, 0.5001, 0.1
    good = torch.tensor([[10, 20, 30]])
    estimate = torch.tensor([[0.1, 0.5001, 0.1]])
    delta = torch.full((1, 3), 1e-6)
    n_good = torch.tensor([3])
    _, ok = buckets.ranks_binned(
        lambda a, b: scores[:, a:b].contiguous(), 1000, 256, estimate, delta, good, n_good
    )
    assert not bool(ok[0])
    exact, ok = buckets.ranks_binned(
        lambda a, b: scores[:, a:b].contiguous(),
        1000,
        256,
        scores[:, [10, 20, 30]],
        torch.zeros(1, 3),
        good,
        n_good,
    )
    assert bool(ok[0]) and torch.equal(exact, good_ranks(scores, good, n_good))


@pytest.mark.parametrize("seed", range(4))
def test_random_ties_equal_the_loop(seed):
    # Integer features in two dimensions: scores are small integers, so nearly every item ties
    # with others, good items too; about 130 good items per query for label 0 (a table of
    # 16-bit entries) and fewer for the others.
    rng = np.random.default_rng(100 + seed)
    qf = rng.integers(-3, 4, (25, 2)).astype(np.float32)
    gf = rng.integers(-3, 4, (500, 2)).astype(np.float32)
    gl = rng.choice([-1, 0, 0, 0, 1, 2, 3, 4, 5], 500)
    ql = rng.integers(-1, 7, 25)
    for protocol in ("official", "sample4geo"):
        want = official_loop(qf, ql, gf, gl, protocol)
        for chunk in (None, 4):
            assert_metrics_equal(
                evaluate_retrieval(qf, ql, gf, gl, protocol, chunk_size=chunk), want
            )


@pytest.mark.parametrize("dyadic", [True, False])
def test_equals_official_loop_one_good_per_query(dyadic):
    # A satellite gallery: one item per label plus distractors (the direct-count path).
    rng = np.random.default_rng(2)
    qf, _, gf, _ = random_case(3, 60, 80, 3, 1, dyadic=dyadic, dtype=np.float64)
    gl = rng.permutation(80) - 1  # labels -1..78, each once: one junk item
    ql = rng.integers(0, 90, 60)  # labels 79..89: no match
    want = official_loop(qf, ql, gf, gl)
    assert_metrics_equal(evaluate_retrieval(qf, ql, gf, gl), want)
    assert_metrics_equal(evaluate_retrieval(qf, ql, gf, gl, chunk_size=11), want)


def test_equals_official_loop_many_buckets():
    # Larger: 30 goods per query over 3000 items, continuous scores, so items share buckets
    # with good items only occasionally (the histogram does most of the work).
    qf, ql, gf, gl = random_case(4, 12, 3000, 8, 100, dyadic=False, dtype=np.float64)
    assert_metrics_equal(evaluate_retrieval(qf, ql, gf, gl), official_loop(qf, ql, gf, gl))


def test_all_scores_equal():
    # Degenerate features: every score ties; the ranking is by gallery index, descending.
    gl = np.array([0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 1, 1])
    ql = np.array([0, 1, 2, 3])
    qf, gf = np.ones((4, 2)), np.ones((12, 2))
    assert_metrics_equal(evaluate_retrieval(qf, ql, gf, gl), official_loop(qf, ql, gf, gl))


@pytest.mark.parametrize("direct_max", [0, 100])
def test_rank_paths_agree_with_argsort(monkeypatch, direct_max):
    # Both rank paths (direct counts, buckets) against the position in a stable argsort.
    monkeypatch.setattr(ranking, "DIRECT_MAX_GOOD", direct_max)
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(-3, 4, (9, 40), generator=g).double()  # many ties
    scores[4] = torch.rand(40, generator=g, dtype=torch.float64)
    good_idx = torch.full((9, 6), 40)
    n_good = torch.tensor([0, 1, 2, 6, 3, 5, 6, 1, 4])
    for r, k in enumerate(n_good.tolist()):
        good_idx[r, :k] = torch.randperm(40, generator=g)[:k].sort().values
    ranks = good_ranks(scores, good_idx, n_good)
    for r, k in enumerate(n_good.tolist()):
        order = np.argsort(scores[r].numpy(), kind="stable")[::-1]
        position = np.argsort(order)
        want = np.sort(position[good_idx[r, :k].numpy()])
        assert ranks[r, :k].tolist() == want.tolist()


def test_input_errors():
    good = (np.ones((2, 3)), [1, 2], np.ones((4, 3)), [1, 2, 3, 4])
    with pytest.raises(DatasetLayoutError, match="dimension"):
        evaluate_retrieval(good[0], good[1], np.ones((4, 2)), good[3])
    with pytest.raises(DatasetLayoutError, match="gallery is empty"):
        evaluate_retrieval(good[0], good[1], np.ones((0, 3)), [])
    with pytest.raises(DatasetLayoutError, match="2 query features but 3"):
        evaluate_retrieval(good[0], [1, 2, 3], good[2], good[3])
    with pytest.raises(DatasetLayoutError, match="integer"):
        evaluate_retrieval(good[0], [1.0, 2.0], good[2], good[3])
    with pytest.raises(DatasetLayoutError, match="NaN"):
        evaluate_retrieval(np.full((2, 3), np.nan), good[1], good[2], good[3])
    with pytest.raises(ValueError, match="protocol"):
        evaluate_retrieval(*good, protocol="cvusa")


# --------------------------------------------------------------------------- features
def test_extract_features_flip_sum_and_normalise():
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(3 * 4 * 5, 7, generator=g)

    def encode(x):  # not flip-invariant: a linear map of the raw pixels
        return x.flatten(1) @ weight

    images = torch.rand(5, 3, 4, 5, generator=g)
    labels = torch.tensor([3, 1, 4, 1, 5])
    loader = [
        {"image": images[:2], "label": labels[:2], "path": ["a", "b"]},
        {"image": images[2:], "label": labels[2:], "path": ["c", "d", "e"]},
    ]
    feats, got_labels = extract_features(encode, loader, progress=False)
    raw = images.flatten(1) @ weight + images.flip(3).flatten(1) @ weight
    np.testing.assert_allclose(feats, raw / raw.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert got_labels.tolist() == [3, 1, 4, 1, 5] and got_labels.dtype == torch.int64
    single, _ = extract_features(encode, [(images, labels)], flip=False, progress=False)
    np.testing.assert_allclose(single, F.normalize(images.flatten(1) @ weight, dim=1), rtol=1e-5)
    with pytest.raises(DatasetLayoutError, match="label"):
        extract_features(encode, [{"image": images}], progress=False)


def test_format_table():
    table = format_table(
        {"drone->satellite": {"R@1": 1.234, "R@5": 2, "R@10": 3, "R@1%": 4, "AP": 5.555}}
    )
    lines = table.splitlines()
    assert lines[0] == "| direction | R@1 | R@5 | R@10 | R@1% | AP |"
    assert lines[2] == "| drone->satellite | 1.23 | 2.00 | 3.00 | 4.00 | 5.55 |"


# --------------------------------------------------------------------------- command line
def features_file(path: Path, prefix: str = "", seed: int = 7) -> dict[str, tuple]:
    views = {}
    for i, view in enumerate(evaluation.VIEWS):
        rng = np.random.default_rng(seed + i)
        n = 30 if view.startswith("query") else 45
        views[view] = (rng.standard_normal((n, 6)).astype(np.float32), rng.integers(-1, 10, n))
    arrays = {}
    for view, (f, lab) in views.items():
        arrays[f"{prefix}{view}_features"] = f  # the documented key names, written by hand
        arrays[f"{prefix}{view}_labels"] = lab
    np.savez(path, **arrays)
    return views


def test_cli_features_file(tmp_path, capsys):
    views = features_file(tmp_path / "f.npz")
    out = tmp_path / "res" / "results.json"
    assert main(["--features", str(tmp_path / "f.npz"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| drone->satellite |" in printed and "| satellite->drone |" in printed
    data = json.loads(out.read_text())
    assert data["protocol"] == "official"
    want = evaluate_retrieval(*views["query_drone"], *views["gallery_satellite"])
    assert data["results"]["drone->satellite"] == pytest.approx(want)
    want = evaluate_retrieval(*views["query_satellite"], *views["gallery_drone"])
    assert data["results"]["satellite->drone"] == pytest.approx(want)
    assert data["sizes"]["all"]["gallery_drone"] == 45


def test_cli_features_per_setting_and_errors(tmp_path, capsys):
    views = features_file(tmp_path / "s.npz", prefix="150m/")
    assert main(["--features", str(tmp_path / "s.npz"), "--protocol", "sample4geo"]) == 0
    assert "| drone->satellite (150m) |" in capsys.readouterr().out
    # save_features writes the same keys; load_features reads them back.
    save_features(tmp_path / "t.npz", {v: tuple(map(torch.as_tensor, views[v])) for v in views})
    loaded = load_features(tmp_path / "t.npz")[""]
    np.testing.assert_array_equal(loaded["gallery_drone"][0], views["gallery_drone"][0])
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        main(["--features", str(tmp_path / "missing.npz")])
    np.savez(tmp_path / "bad.npz", query_drone_features=np.ones((3, 2)))
    with pytest.raises(DatasetLayoutError, match="query_drone_labels"):
        load_features(tmp_path / "bad.npz")
    np.savez(
        tmp_path / "half.npz", query_drone_features=np.ones((3, 2)), query_drone_labels=np.arange(3)
    )
    with pytest.raises(DatasetLayoutError, match="no complete direction"):
        main(["--features", str(tmp_path / "half.npz")])
    from imlnet.cli import main as cli_main  # the console script prints one line, exit code 2

    assert cli_main(["evaluate", "--features", str(tmp_path / "missing.npz")]) == 2


def write_test_views(base: Path, seed: int) -> None:
    """Tiny test views under ``base``: 3 query buildings, a distractor in the galleries."""
    rng = np.random.default_rng(seed)
    counts = {"query_drone": 2, "gallery_satellite": 1, "query_satellite": 1, "gallery_drone": 2}
    for view, per in counts.items():
        buildings = ["0001", "0002", "0003"] + (["0009"] if view.startswith("gallery") else [])
        for b in buildings:
            folder = base / view / b
            folder.mkdir(parents=True)
            for k in range(per):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


class FakeModel:
    """``encode``: a fixed linear map of the pooled image, different per domain."""

    def __init__(self):
        g = torch.Generator().manual_seed(9)
        self.w = {d: torch.randn(3 * 4 * 4, 5, generator=g) for d in ("drone", "satellite")}

    def encode(self, x, domain):
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w[domain]


def fake_loader(model):
    """A stand-in for :func:`imlnet.inference.load_model` that returns ``model``."""
    from imlnet.inference import LoadedModel, eval_transform

    def load(checkpoint, device="auto", *, image_size=None):
        size = image_size or 256
        return LoadedModel(model, size, eval_transform(size))

    return load


def model_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *("--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data")),
        *("--image-size", "32", "--batch-size", "3", "--num-workers", "0", "--device", "cpu"),
        *("--save-features", str(tmp_path / "feats.npz"), "--quiet", *extra),
    ]


def test_cli_model_on_dataset_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("imlnet.data.university1652")
    pytest.importorskip("imlnet.data.transforms")
    from imlnet.data.transforms import build_transforms
    from imlnet.data.university1652 import University1652Test

    write_test_views(tmp_path / "data" / "test", seed=8)
    model = FakeModel()
    monkeypatch.setattr(cli, "load_model", fake_loader(model))
    out = tmp_path / "r.json"
    assert main(model_argv(tmp_path, "--out", str(out))) == 0
    assert "| satellite->drone |" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]

    def feats(view):
        domain = view.split("_")[1]
        ds = University1652Test(
            tmp_path / "data", view, transform=build_transforms(domain, train=False, size=32)
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=2)
        return extract_features(lambda x: model.encode(x, domain), loader, progress=False)

    want = evaluate_retrieval(*feats("query_drone"), *feats("gallery_satellite"))
    assert results["drone->satellite"] == pytest.approx(want)
    saved = load_features(tmp_path / "feats.npz")[""]
    assert saved["gallery_drone"][1].tolist() == [1, 1, 2, 2, 3, 3, 9, 9]
    # --satellite-rotations overrides the model's pooling of satellite descriptors
    assert not hasattr(model, "satellite_rotations")
    assert main(model_argv(tmp_path, "--satellite-rotations", "4")) == 0
    assert model.satellite_rotations == 4


def test_cli_model_sues200_per_altitude(tmp_path, monkeypatch, capsys):
    pytest.importorskip("imlnet.data.sues200")
    for altitude, seed in ((150, 10), (300, 11)):
        write_test_views(tmp_path / "data" / "Testing" / str(altitude), seed)
    monkeypatch.setattr(cli, "load_model", fake_loader(FakeModel()))
    argv = model_argv(tmp_path, "--dataset", "sues200", "--altitudes", "150", "300")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| drone->satellite (150m) |" in printed and "| satellite->drone (300m) |" in printed
    # One features file per altitude, keys prefixed with the altitude; re-evaluating it from
    # the file gives the printed table again.
    for altitude in (150, 300):
        assert set(load_features(tmp_path / f"feats_{altitude}m.npz")) == {f"{altitude}m"}
    assert main(["--features", str(tmp_path / "feats_300m.npz")]) == 0
    again = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "300m" in line] == again.splitlines()[2:]


def test_evaluation_package_has_no_import_circle_and_no_lightning():
    """Static walk of the package's own imports; no module imports Lightning."""
    import ast

    root = Path(evaluation.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            assert not any(m.split(".")[0] == "lightning" for m in mods), path
            deps |= {m.split(".")[2] for m in mods if m.startswith("imlnet.evaluation.")}
        graph[path.stem] = deps - {path.stem}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        assert start not in seen, f"import circle through evaluation/{start}.py"
