"""Metrics per condition (``--by``): equal to evaluate_retrieval on each subset; edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from imlnet.errors import DatasetLayoutError
from imlnet.evaluation import evaluate_retrieval
from imlnet.evaluation.breakdown import (
    D2S,
    S2D,
    UnknownFieldError,
    breakdown,
    breakdown_report,
    format_breakdown,
    group_values,
    parse_bins,
    parse_fields,
    view_conditions,
)


def _views(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_b = 6
    views = {}
    for view, per in (
        ("query_drone", 5),
        ("gallery_satellite", 1),
        ("query_satellite", 1),
        ("gallery_drone", 5),
    ):
        labels = np.repeat(np.arange(n_b), per)
        feats = rng.standard_normal((len(labels), 8)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        views[view] = (feats, labels)
    records = {}
    for view in ("query_drone", "gallery_drone"):
        n = len(views[view][1])
        records[view] = [
            {
                "season": ["winter", "summer", "autumn"][i % 3],
                "weather": "fog" if i == 7 else "clear",  # a group of one image
                "altitude_m": 60.0 + 90.0 * i / (n - 1),
                "pitch_deg": 40.0 + 12.0 * rng.random(),
            }
            for i in range(n)
        ]
    return views, records


def test_each_group_equals_evaluate_retrieval_on_its_subset():
    views, records = _views()
    result = breakdown(views, records, ["season", "weather", "altitude", "pitch"])
    for name in ("season", "weather", "altitude", "pitch"):
        labels_q, _ = group_values(records["query_drone"], name)
        labels_g, _ = group_values(records["gallery_drone"], name)
        qf, ql = views["query_drone"]
        gf, gl = views["gallery_drone"]
        total = 0
        for group, row in result[name][D2S].items():
            mask = np.asarray(labels_q) == group
            total += row["n"]
            if not mask.any():
                continue
            want = evaluate_retrieval(qf[mask], ql[mask], *views["gallery_satellite"])
            assert {k: row[k] for k in want} == pytest.approx(want)
            assert row["n"] == int(mask.sum())
        assert total == len(ql)  # every query is in exactly one group
        for group, row in result[name][S2D].items():
            mask = np.asarray(labels_g) == group
            if mask.any():
                want = evaluate_retrieval(*views["query_satellite"], gf[mask], gl[mask])
                assert {k: row[k] for k in want} == pytest.approx(want)
    # the groups' R@1, weighted by their sizes, is the overall drone->satellite R@1
    overall = evaluate_retrieval(*views["query_drone"], *views["gallery_satellite"])
    rows = result["season"][D2S].values()
    weighted = sum(r["R@1"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    assert weighted == pytest.approx(overall["R@1"])
    assert list(result["season"][D2S]) == ["summer", "autumn", "winter"]  # the seasons' order


def test_single_query_group_and_empty_group_are_reported():
    views, records = _views(1)
    result = breakdown(
        views, records, ["weather", "altitude"], bins={"altitude": [0, 50, 100, 200]}
    )
    fog = result["weather"][D2S]["fog"]
    assert fog["n"] == 1 and fog["R@1"] in (0.0, 100.0)
    empty = result["altitude"][D2S]["0-50 m"]
    assert empty["n"] == 0 and empty["R@1"] is None and empty["AP"] is None
    assert "| 0-50 m | 0 | - | - | - | - | - |" in format_breakdown(result)


def test_bins_and_field_errors():
    assert parse_fields("season, pitch,season") == ["season", "pitch"]
    assert parse_bins(["altitude=30", "pitch=50,40,45"]) == {
        "altitude": 30.0,
        "pitch": [40, 45, 50],
    }
    with pytest.raises(UnknownFieldError, match="choose from season, weather, altitude, pitch"):
        parse_fields("season,humidity")
    for bad in ("season=3", "altitude=", "altitude=x", "altitude=-5", "height=10"):
        with pytest.raises(UnknownFieldError, match="--bins"):
            parse_bins([bad])
    labels, order = group_values([{"pitch_deg": v} for v in (30.0, 41.0, 60.0)], "pitch", [40, 50])
    assert labels == ["<40°", "40-50°", ">=50°"] and order == ["<40°", "40-50°", ">=50°"]
    with pytest.raises(DatasetLayoutError, match="no 'season' recorded"):
        group_values([{"weather": "fog"}], "season")


def test_view_conditions_from_metadata(tmp_path):
    (tmp_path / "metadata.json").write_text(
        '{"locations": {"0007": {"views": [{"file": "image-01.jpeg", "season": "winter"}]}}}'
    )
    got = view_conditions(tmp_path, [tmp_path / "test/query_drone/0007/image-01.jpeg"])
    assert got == [{"file": "image-01.jpeg", "season": "winter"}]
    with pytest.raises(DatasetLayoutError, match="does not describe"):
        view_conditions(tmp_path, [tmp_path / "test/query_drone/0008/image-01.jpeg"])
    with pytest.raises(DatasetLayoutError, match=r"metadata\.json not found"):
        view_conditions(tmp_path / "nowhere", ["a/b.jpeg"])
    assert view_conditions(tmp_path, ["x/1/a.png"], altitude=150) == [{"altitude_m": 150.0}]
    # the location's target kind reaches its views (before --anywhere: a landmark)
    (tmp_path / "metadata.json").write_text(
        '{"locations": {"0007": {"target": {"kind": "point"}, "views": [{"file": "a.jpeg"}]},'
        ' "0009": {"target": {"building_id": 3}, "views": [{"file": "a.jpeg"}]}}}'
    )
    got = view_conditions(tmp_path, ["q/0007/a.jpeg", "q/0009/a.jpeg"])
    assert [r["target"] for r in got] == ["point", "landmark"]
    assert group_values(got, "target") == (["point", "landmark"], ["landmark", "point"])


def test_report_writes_json_and_png(tmp_path):
    views, records = _views(2)
    report = breakdown_report(views, records, ["season", "pitch"], out=tmp_path / "rep")
    assert (tmp_path / "rep" / "breakdown.json").is_file()
    assert (tmp_path / "rep" / "breakdown.png").stat().st_size > 1000
    assert report["table"].startswith("drone->satellite, by season")
    assert report["order"]["season"] == ["summer", "autumn", "winter"]
