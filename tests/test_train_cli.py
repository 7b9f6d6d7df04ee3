"""`curate train` on a curated directory: --epsilon auto, --json summary, clear errors."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.rundir import RunDir

runner = CliRunner()


@pytest.fixture
def curated(tmp_path):
    from tests.test_train_loop import make_pairs

    pairs = make_pairs(8).with_columns(flip_prob=pl.Series([0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2]),
                                       weight=pl.lit(1.0))
    run = RunDir(tmp_path / "curated")
    run.write_pairs(pairs, pl.DataFrame())
    return run.path


def test_train_cli_cdpo_epsilon_auto_json(curated, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = runner.invoke(app, ["train", str(curated), "--model", str(tiny_model_dir), "--loss", "cdpo", "--epsilon", "auto",
                                 "--weights", "weight", "--batch-size", "4", "--max-steps", "2", "--bf16", "off",
                                 "--lr", "1e-3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epsilon"] == pytest.approx(0.15)
    assert summary["steps"] == 2 and summary["out"] == str(curated / "train")
    assert (curated / "train" / "final" / "config.json").exists()
    assert len((curated / "train" / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_cli_errors_are_one_sentence(curated, tiny_model_dir):
    result = runner.invoke(app, ["train", str(curated), "--model", str(tiny_model_dir), "--loss", "nope"])
    assert result.exit_code == 2 and "unknown --loss" in result.output
    result = runner.invoke(app, ["train", str(curated), "--model", str(tiny_model_dir), "--soft-labels", "label_confidence"])
    assert result.exit_code == 2 and "label_confidence" in result.output
