"""The percentile windows of benchmarks/exp_displacement.py, by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
import pytest

SPEC = importlib.util.spec_from_file_location(
    "exp_displacement", Path(__file__).resolve().parents[1] / "benchmarks" / "exp_displacement.py")
exp = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(exp)


def test_windows_centre_on_percentiles_and_stay_inside():
    # scores descending in pair order, so the ranking reverses it: rank r holds pair p{99-r}
    scores = pl.DataFrame({"pair_id": [f"p{i:02d}" for i in range(100)], "s": [float(100 - i) for i in range(100)]})
    wins = exp.windows(scores, "s", 10)
    ranks = [[99 - int(pid[1:]) for pid in w] for w in wins]
    # centres round(q/100 * 99) = 0, 25, 50, 74, 99; start = centre - 5, clamped to [0, 90]
    assert [min(r) for r in ranks] == [0, 20, 45, 69, 90]
    assert all(sorted(r) == list(range(min(r), min(r) + 10)) for r in ranks)


def test_windows_refuse_too_few_pairs():
    with pytest.raises(SystemExit, match="fewer than one window"):
        exp.windows(pl.DataFrame({"pair_id": ["a", "b"], "s": [1.0, 2.0]}), "s", 3)
