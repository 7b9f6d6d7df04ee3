"""`curate pairs` end to end on a tiny model: run directory, pool-CHES choice, forward count, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.data.response_sets import load_response_sets
from curate.pairs.build import build_pairs
from curate.pairs.strategies import valid_pairs
from curate.rundir import RunDir
from curate.score import score

FIXTURES = Path(__file__).parent / "fixtures" / "pairs"
REPO = Path(__file__).resolve().parents[1]


def _count_sequences(model):
    rows: list[int] = []
    handle = model.base_model.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return rows, handle


def _reference_ln_ches(tiny_lm, sets: pl.DataFrame, tmp_path: Path) -> dict[tuple[str, str, str], float]:
    """LN-CHES of every valid pair, each scored as a pair by `curate score` (the per-pair engine)."""
    rows = []
    for (_pid,), group in sets.group_by("prompt_id", maintain_order=True):
        group = group.sort("response_index")
        valid = valid_pairs(group["score"].to_numpy())
        for i, j in zip(*np.nonzero(valid)):
            rows.append({"prompt": group["prompt"][0].to_list(), "chosen": group["response"][int(i)],
                         "rejected": group["response"][int(j)]})
    path = tmp_path / "all_valid_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = RunDir(tmp_path / "reference")
    score(str(path), out=run.path, lm=tiny_lm, scores=("ches",), prefix_sharing=False)
    table = run.table()
    return {(json.dumps(r["prompt"]), r["chosen"], r["rejected"]): r["ln_ches"] for r in table.iter_rows(named=True)}


def test_min_ches_on_nectar_picks_the_lowest_ln_ches_valid_pair_with_k_forwards(tiny_lm, single_torch_thread,
                                                                              tmp_path):
    data = FIXTURES / "nectar.jsonl"
    rows, handle = _count_sequences(tiny_lm.model)
    try:
        pairs = build_pairs(str(data), out=tmp_path / "run", strategy="min-ches", lm=tiny_lm, shard_size=1,
                            prefix_sharing=False)
    finally:
        handle.remove()
    sets = load_response_sets(str(data))
    assert sum(rows) == sets.height == 10  # 7 + 3 responses: one decoder sequence each

    reference = _reference_ln_ches(tiny_lm, sets, tmp_path)
    run = RunDir(tmp_path / "run")
    table = run.table()
    assert table.height == 2 and set(table["prompt_id"]) == set(sets["prompt_id"])
    for row in table.iter_rows(named=True):
        key = json.dumps(row["prompt"])
        candidates = {k: v for k, v in reference.items() if k[0] == key}
        best = min(candidates, key=candidates.get)
        assert (row["chosen"], row["rejected"]) == best[1:]
        assert row["ln_ches"] == pytest.approx(candidates[best], rel=1e-4)
    manifest = run.manifest()["pairs"]
    assert manifest["pool"]["n_shards"] == 2 and manifest["n_pairs"] == 2

    # resumable: a rerun pools nothing and writes the same pairs
    rows, handle = _count_sequences(tiny_lm.model)
    try:
        again = build_pairs(str(data), out=tmp_path / "run", strategy="min-ches", lm=tiny_lm, shard_size=1)
    finally:
        handle.remove()
    assert rows == [] and again.equals(pairs)
    assert run.manifest()["pairs"]["pool"]["shards_resumed"] == 2
    # a run killed before its second shard was written pools only that shard's 3 responses
    (run / "shards" / "pool-00001.npz").unlink()
    assert build_pairs(str(data), out=run.path, strategy="min-ches", lm=tiny_lm, shard_size=1,
                       prefix_sharing=False).equals(pairs)
    assert run.manifest()["pairs"]["pool"]["responses_pooled_this_session"] == 3

    # `curate score` accepts the run and computes the same LN-CHES for the chosen pairs
    before = run.scores().sort("pair_id")
    score(run.path, lm=tiny_lm, scores=("ches",))
    after = run.scores().sort("pair_id")
    np.testing.assert_allclose(after["ln_ches"].to_numpy(), before["ln_ches"].to_numpy(), rtol=1e-4)


def test_cli_end_to_end_on_a_saved_tiny_model(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CURATE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "curate.cli", "pairs", str(FIXTURES / "ultrafeedback_raw.jsonl"),
           "--strategy", "max-margin-low-ches", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
           "--out", str(tmp_path / "run"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n_pairs"] == 2 and summary["format"] == "ultrafeedback-raw" and summary["n_quarantined"] == 2
    run = RunDir(tmp_path / "run")
    pairs = run.pairs()
    # largest mean-rating margin: 5 vs 1.5 and 5 vs 1
    assert sorted(pairs["rating_margin"].to_list()) == [3.5, 4.0]
    assert set(run.scores().columns) >= {"pair_id", "ln_ches", "ches"}

    bad = subprocess.run(cmd[:5] + ["--strategy", "nope", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--strategy must be one of" in bad.stderr


def test_without_a_model_no_scores_are_written(tmp_path):
    pairs = build_pairs(str(FIXTURES / "long.csv"), out=tmp_path / "run", strategy="all",
                        columns="prompt=question,response=answer,score=rating")
    # rain: 0.9 > 0.7 > 0.2 = 0.2 -> 5 valid pairs; math: 1 > 0 -> 1
    assert pairs.height == 6 and not (tmp_path / "run" / "scores.parquet").exists()
    assert RunDir(tmp_path / "run").quarantine()["reason"].to_list() == ["missing_score"]
