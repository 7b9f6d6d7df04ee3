"""Exports: formats, orientation of the signals, the data card, round trips, and TRL accepting the trl export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.curation import ches_drop_top_rule, filter_run, max_flip_prob_rule
from curate.data.schema import pairs_frame
from curate.errors import CurateError
from curate.export import distribution_table, export_curated
from curate.rundir import RunDir

N = 12


def write_run(path: Path) -> RunDir:
    pairs = pairs_frame(
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {i}?"}],
         "chosen": f"good answer {i}", "rejected": f"bad answer {i}", "meta": {"row": i}}
        for i in range(N)
    )
    i = np.arange(N, dtype=float)
    scores = pl.DataFrame({
        "pair_id": pairs["pair_id"], "ln_ches": i, "p_chosen": 0.9 - i * 0.07, "flip_prob": i / 12,
        "rm_margin_mean": 1.0 - i * 0.2, "sae_f0": i,
    })
    run = RunDir(path)
    run.write_pairs(pairs, pl.DataFrame())
    run.merge_scores(scores)
    run.update_manifest("score", {"dataset": "synthetic.jsonl", "model": "tiny-random", "settings": {"batch_size": 4}})
    run.update_manifest("noise", {"estimators": {"em": {"flip_rate": 0.123}, "cleanlab": {"rate": 0.2}}})
    return run


@pytest.fixture()
def curated(tmp_path) -> Path:
    write_run(tmp_path / "run")
    # drop rows 11 (top 1/12 of ln_ches), flip rows 9, 10 (flip_prob 0.75, 0.83 > 0.7)
    filter_run(tmp_path / "run", [ches_drop_top_rule(100 / 12), max_flip_prob_rule("0.7:flip")], tmp_path / "cur",
               weights="madpo", soft_labels=True)
    return tmp_path / "cur"


def rows_by_id(frame: pl.DataFrame) -> dict[str, dict]:
    return {r["pair_id"]: r for r in frame.iter_rows(named=True)}


def test_trl_export_shape_and_orientation(curated, tmp_path):
    summary = export_curated(curated, "trl", tmp_path / "trl")
    assert summary["pairs"] == N - 1 and summary["flipped"] == 2
    data = pl.read_parquet(tmp_path / "trl" / "train.parquet")
    assert data.columns == ["pair_id", "prompt", "chosen", "rejected", "weight", "label_confidence", "curate_margin", "flip_prob"]
    rows = {r["chosen"][0]["content"]: r for r in data.iter_rows(named=True)}
    row10 = rows["bad answer 10"]  # flipped: p_chosen 0.2 -> margin logit(0.8), flip_prob 10/12 -> 2/12
    assert row10["rejected"] == [{"role": "assistant", "content": "good answer 10"}]
    assert row10["prompt"][-1] == {"role": "user", "content": "question 10?"}
    assert row10["curate_margin"] == pytest.approx(math.log(0.8 / 0.2))
    assert row10["flip_prob"] == pytest.approx(2 / 12)
    assert row10["label_confidence"] == pytest.approx(1 - 2 / 12)
    row0 = rows["good answer 0"]
    assert row0["curate_margin"] == pytest.approx(math.log(0.9 / 0.1)) and row0["flip_prob"] == 0.0


def test_data_card(curated, tmp_path):
    export_curated(curated, "parquet", tmp_path / "pq")
    card = (tmp_path / "pq" / "README.md").read_text()
    assert "synthetic.jsonl" in card and "tiny-random" in card
    assert "| 1 | ches-drop-top" in card and "| 2 | max-flip-prob flip_prob_conservative > 0.7 | flip | 3 | 2 | 0 |" in card
    assert "noise.estimators.em.flip_rate: 0.123" in card and "noise.estimators.cleanlab.rate: 0.2" in card
    assert "flipped by curation in this export: 2 of 11" in card
    # mean ln_ches over the 11 exported pairs (0..10) is 5
    assert "| ln_ches | 11 | 5 |" in card
    assert "sae_f*" in card and "| sae_f0 |" not in card


def test_distribution_table_values():
    table = distribution_table(pl.DataFrame({"pair_id": ["a", "b", "c"], "x": [1.0, 2.0, None], "name": ["u", "v", "w"]}))
    assert len(table) == 1
    assert table[0] | {} == {"column": "x", "n": 2, "mean": 1.5, "std": 0.5, "min": 1.0, "q05": 1.05,
                             "median": 1.5, "q95": 1.95, "max": 2.0}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "hf", "trl"])
def test_round_trip_with_datasets_and_curate_loader(curated, tmp_path, fmt):
    import datasets

    from curate.data import load_pairs

    out = tmp_path / fmt
    export_curated(curated, fmt, out)
    expected = rows_by_id(RunDir(curated).pairs())
    if fmt == "hf":
        loaded = datasets.load_from_disk(str(out))
        target = str(out)
    else:
        name = "train.jsonl" if fmt == "jsonl" else "train.parquet"
        loaded = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=str(out / name), split="train")
        target = str(out / name)
    assert sorted(loaded["pair_id"]) == sorted(expected)

    ours = load_pairs(target)
    assert ours.quarantine.height == 0
    got = rows_by_id(ours.pairs)
    assert set(got) == set(expected)  # same pair_ids, recomputed by the loader from the content
    for pid, row in expected.items():
        assert (got[pid]["chosen"], got[pid]["rejected"]) == (row["chosen"], row["rejected"])
        assert got[pid]["prompt"] == row["prompt"]
    flipped = [r for r in expected.values() if r["flipped"]]
    assert len(flipped) == 2 and all(r["chosen"].startswith("bad") for r in flipped)


def test_holdout_split_and_refusals(tmp_path):
    write_run(tmp_path / "run")
    filter_run(tmp_path / "run", [], tmp_path / "cur", holdout=0.3)
    held = pl.read_parquet(tmp_path / "cur" / "holdout.parquet")
    summary = export_curated(tmp_path / "cur", "jsonl", tmp_path / "eval", split="holdout")
    assert summary["pairs"] == held.height
    assert summary["pairs"] + RunDir(tmp_path / "cur").pairs().height == N
    with pytest.raises(CurateError, match="--force"):
        export_curated(tmp_path / "cur", "jsonl", tmp_path / "eval")
    with pytest.raises(CurateError, match="--format"):
        export_curated(tmp_path / "cur", "csv", tmp_path / "x")
    with pytest.raises(CurateError, match="curate filter"):
        export_curated(tmp_path / "run_missing", "jsonl", tmp_path / "y")


def test_cli_export(curated, tmp_path):
    result = CliRunner().invoke(app, ["export", str(curated), "--format", "trl", "--out", str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["train.parquet", "README.md"]
    again = CliRunner().invoke(app, ["export", str(curated), "--format", "trl", "--out", str(tmp_path / "t")])
    assert again.exit_code == 2 and "--force" in again.output


def test_real_hh_pairs_filter_export_and_reload(tmp_path, hh_path):
    """Real HH-RLHF pairs (multi-turn prompts, odd characters) through filter -> trl export -> both loaders."""
    import datasets

    from curate.data import load_pairs

    loaded = load_pairs(str(hh_path), limit=300)
    run = RunDir(tmp_path / "run")
    run.write_pairs(loaded.pairs, loaded.quarantine)
    rng = np.random.default_rng(0)
    run.merge_scores(pl.DataFrame({"pair_id": loaded.pairs["pair_id"], "flip_prob": rng.uniform(size=loaded.pairs.height),
                                   "ln_ches": rng.normal(size=loaded.pairs.height)}))
    filter_run(run.path, [ches_drop_top_rule(10), max_flip_prob_rule("0.8:flip")], tmp_path / "cur", soft_labels=True)
    curated = RunDir(tmp_path / "cur").pairs()
    export_curated(tmp_path / "cur", "trl", tmp_path / "trl")
    back = load_pairs(str(tmp_path / "trl" / "train.parquet"))
    assert back.quarantine.height == 0
    assert sorted(back.pairs["pair_id"]) == sorted(curated["pair_id"])
    got, want = rows_by_id(back.pairs), rows_by_id(curated)
    assert all(got[p]["chosen"] == want[p]["chosen"] for p in want)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "trl" / "train.parquet"), split="train")
    assert ds.num_rows == curated.height and isinstance(ds[0]["prompt"], list)


def test_trl_dpo_trainer_trains_a_step_on_the_trl_export(curated, tmp_path):
    trl = pytest.importorskip("trl")
    import datasets
    import torch

    from curate.models import tiny_causal_lm

    export_curated(curated, "trl", tmp_path / "trl")
    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "trl" / "train.parquet"), split="train")
    policy = tiny_causal_lm(seed=0)
    before = [p.detach().clone() for p in policy.model.parameters()]
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, bf16=False,
        max_length=64, dataloader_num_workers=0,
    )
    reference = tiny_causal_lm(seed=0).model  # a hub-free reference (TRL would otherwise reload the policy by name)
    trainer = trl.DPOTrainer(model=policy.model, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=policy.tokenizer)
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, policy.model.parameters()))


def test_push_to_hub_uploads_the_data_and_the_card(curated, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    calls = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, split: calls.append(("data", repo, split, self.num_rows)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file",
                        lambda self, **kw: calls.append(("card", kw["repo_id"], kw["path_in_repo"], kw["repo_type"])))
    summary = export_curated(curated, "hf", tmp_path / "hf", push_to_hub="me/curated")
    assert calls == [("data", "me/curated", "train", N - 1), ("card", "me/curated", "README.md", "dataset")]
    assert summary["pushed_to"] == "me/curated"

    def offline(self, repo, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", offline)
    with pytest.raises(CurateError, match="local export is complete"):
        export_curated(curated, "hf", tmp_path / "hf", push_to_hub="me/curated", force=True)


def test_loaded_columns_survive_filter_and_export_and_follow_flips(tmp_path):
    run = write_run(tmp_path / "run")
    pairs = run.pairs().with_columns(
        prompt_id=pl.format("p{}", pl.int_range(pl.len())), score_chosen=pl.lit(7.0), score_rejected=pl.lit(2.0),
        rating_margin=pl.lit(5.0), domain=pl.lit("askscience"))
    run.write_pairs(pairs, pl.DataFrame())
    run.update_manifest("load", {"dataset": "shp.jsonl", "format": "shp"})
    filter_run(run.path, [max_flip_prob_rule("0.7:flip")], tmp_path / "cur")  # flips rows 9, 10, 11
    export_curated(tmp_path / "cur", "parquet", tmp_path / "pq")
    data = pl.read_parquet(tmp_path / "pq" / "train.parquet")
    assert data.columns == [*pairs.columns, "flipped"]
    assert data["prompt_id"].to_list() == [f"p{i}" for i in range(N)]
    assert data["flipped"].to_list() == [False] * 9 + [True] * 3
    assert data["score_chosen"].to_list() == [7.0] * 9 + [2.0] * 3
    assert data["score_rejected"].to_list() == [2.0] * 9 + [7.0] * 3
    assert data["rating_margin"].to_list() == [5.0] * 9 + [-5.0] * 3
    assert data["domain"].to_list() == ["askscience"] * N
    card = (tmp_path / "pq" / "README.md").read_text()
    assert "- load.format: `shp`" in card and "- `domain`: a column of the source data" in card
