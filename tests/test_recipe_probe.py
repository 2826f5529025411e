"""bench/recipe_probe.py, the loop behind docs/benchmarks.md's demo-recipe curves, runs the real
model and objective end to end and writes the curve it reports."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "bench" / "recipe_probe.py"


def _run(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(PROBE), *args])
    runpy.run_path(str(PROBE), run_name="__main__")


def test_probe_trains_the_full_model_and_writes_its_curve(synth, tmp_path, monkeypatch) -> None:
    out = tmp_path / "curve.json"
    args = ["--data", str(synth), "--size", "32", "--batch", "3", "--steps", "4", "--warmup", "2"]
    args += ["--muml-channels", "8", "--w-infonce", "1", "--threads", "1", "--out", str(out)]
    args += ["--eval-every", "0"]  # before every step and at the end
    _run(monkeypatch, args)
    result = json.loads(out.read_text())
    assert result["args"]["w_infonce"] == 1.0 and result["args"]["steps"] == 4
    curve = result["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3, 4]
    assert curve[0]["min"] == 0 and curve[-1]["min"] > 0  # training time, growing
    for point in curve:  # percentages of real evaluations, within their range
        for key in ("d2s_R1", "d2s_AP", "s2d_AP", "train_R1"):
            assert 0.0 <= point[key] <= 100.0, key


def test_probe_colour_histogram_baseline(synth, monkeypatch, capsys) -> None:
    _run(monkeypatch, ["--colour-histogram", "--data", str(synth), "--size", "32"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("R@1" in line and "AP" in line for line in lines)
