"""`curate run`: recipes, overrides, and which steps a rerun skips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from curate import pipeline
from curate.errors import CurateError

REPO = Path(__file__).resolve().parents[1]
ALL_STEPS = ["score", "features", "filter", "export", "train", "eval", "report"]


def write_recipe(tmp_path: Path, **extra) -> Path:
    recipe = {"run_dir": str(tmp_path / "run"), "dataset": "data.jsonl", "model": "m", "steps": ALL_STEPS,
              "filter": {"ches_drop_top": 10}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class FakeSteps:
    """Steps that write a marker file and log their calls (with the context's `fresh` flag)."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail = fail

    def table(self) -> dict[str, pipeline.Step]:
        return {name: pipeline.Step(name, self._runner(name), self._done(name), always=name == "report")
                for name in ["load"] + ALL_STEPS}

    def _runner(self, name):
        def run(ctx):
            self.calls.append((name, ctx.fresh))
            if name == self.fail:
                raise RuntimeError(f"{name} was killed")
            (ctx.run / f"{name}.done").write_text("x")
            return {"out": str(ctx.run / "report.html"), "headline": {"pairs": 3}} if name == "report" else {"ok": 1}
        return run

    @staticmethod
    def _done(name):
        return lambda ctx: (ctx.run / f"{name}.done").exists()

    def ran(self) -> list[str]:
        names = [name for name, _ in self.calls]
        self.calls.clear()
        return names


# ------------------------------------------------------------------ overrides and recipes
def test_overrides_set_nested_keys_with_yaml_values():
    recipe = {"dataset": "a", "train": {"runs": {"dpo": {"loss": "dpo"}}}}
    out = pipeline.apply_overrides(recipe, [
        "dataset=../shared/x.jsonl.gz", "train.max_train_pairs=16", "train.runs.dpo.lr=5e-6",
        "steps=[score, report]", "filter.max_flip_prob=0.9:flip", "eval.generate=0",
    ])
    assert out["dataset"] == "../shared/x.jsonl.gz"
    assert out["train"]["max_train_pairs"] == 16 and out["train"]["runs"]["dpo"] == {"loss": "dpo", "lr": 5e-6}
    assert out["steps"] == ["score", "report"]
    assert out["filter"] == {"max_flip_prob": "0.9:flip"} and out["eval"] == {"generate": 0}
    assert recipe["dataset"] == "a" and "max_train_pairs" not in recipe["train"]  # the input is not mutated


@pytest.mark.parametrize("bad, message", [
    ("dataset", "not KEY=VALUE"),
    ("colour=red", "unknown recipe key 'colour'"),
    ("dataset.sub=1", "not a section"),
])
def test_bad_overrides_say_what_to_write(bad, message):
    with pytest.raises(CurateError, match=message):
        pipeline.apply_overrides({"dataset": "a"}, [bad])


@pytest.mark.parametrize("change, message", [
    ({"steps": ["report", "score"]}, "pipeline order: score, report"),
    ({"steps": ["score", "clean"]}, r"unknown steps \['clean'\]"),
    ({"steps": []}, "'steps' must list"),
    ({"dataset": None}, "set 'dataset'"),
    ({"trian": {}}, r"unknown keys \['trian'\]"),
])
def test_recipe_mistakes_are_one_clear_error(tmp_path, change, message):
    path = write_recipe(tmp_path, **change)
    with pytest.raises(CurateError, match=message):
        pipeline.load_recipe(path)


def test_missing_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(CurateError, match="pipelines/demo.yaml"):
        pipeline.load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "hh-rlhf.yaml"])
def test_shipped_recipes_are_valid(name):
    recipe = pipeline.load_recipe(REPO / "pipelines" / name)
    assert recipe["steps"] == ALL_STEPS
    assert set(recipe["train"]["runs"]) == {"dpo", "sparsepo"}
    # the filter settings are real curate filter options
    pipeline.check_all_settings(recipe)  # every setting is one the library functions take


# ------------------------------------------------------------------ resuming
def test_a_rerun_skips_finished_steps_and_reruns_what_changed(tmp_path):
    fake = FakeSteps()
    recipe = write_recipe(tmp_path)
    first = pipeline.run_pipeline(recipe, steps=fake.table())
    assert fake.ran() == ["load"] + ALL_STEPS
    assert [s["status"] for s in first["steps"]] == ["ran"] * 8 and first["headline"] == {"pairs": 3}

    pipeline.run_pipeline(recipe, steps=fake.table())
    assert fake.ran() == ["report"]  # the report always reflects the current state

    # a filter setting changed: filter and everything after it rerun, with fresh outputs
    pipeline.run_pipeline(recipe, ["filter.ches_drop_top=20"], steps=fake.table())
    assert fake.calls == [(s, True) for s in ["filter", "export", "train", "eval", "report"]]
    fake.ran()

    # an output went missing: that step and the ones after it rerun
    (tmp_path / "run" / "train.done").unlink()
    pipeline.run_pipeline(recipe, ["filter.ches_drop_top=20"], steps=fake.table())
    assert fake.ran() == ["train", "eval", "report"]

    pipeline.run_pipeline(recipe, ["filter.ches_drop_top=20"], force=True, steps=fake.table())
    assert fake.ran() == ["load"] + ALL_STEPS


def test_a_killed_step_resumes_without_discarding_its_work(tmp_path):
    recipe = write_recipe(tmp_path)
    with pytest.raises(RuntimeError, match="train was killed"):
        pipeline.run_pipeline(recipe, steps=FakeSteps(fail="train").table())
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert "finished" in state["steps"]["export"] and "finished" not in state["steps"]["train"]

    fake = FakeSteps()
    pipeline.run_pipeline(recipe, steps=fake.table())
    # same settings, nothing upstream reran: train continues (fresh=False lets it resume from checkpoints)
    assert fake.calls[0] == ("train", False)
    assert [name for name, _ in fake.calls] == ["train", "eval", "report"]


def test_refuses_a_run_dir_it_did_not_write(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("x")
    with pytest.raises(CurateError, match="did not write"):
        pipeline.run_pipeline(write_recipe(tmp_path), steps=FakeSteps().table())


# ------------------------------------------------------------------ the real steps, without models
def fake_score(ctx):
    """Deterministic stand-in for `score`: the real filter, export and report steps run on its columns."""
    from curate.rundir import RunDir

    run = RunDir(ctx.run)
    ids = run.pairs()["pair_id"]
    n = len(ids)
    run.merge_scores(pl.DataFrame({"pair_id": ids, "ln_ches": np.linspace(-10, 0, n),
                                   "rm_margin_mean": np.linspace(-1, 2, n), "rm_margin_std": np.full(n, 0.5),
                                   "flip_prob": np.linspace(0, 1, n)}))
    return {"pairs": n}


def test_load_filter_export_report_on_the_demo_data(tmp_path):
    table = dict(pipeline.STEP_TABLE, score=pipeline.Step("score", fake_score, pipeline.STEP_TABLE["score"].done))
    recipe = write_recipe(tmp_path, dataset=str(REPO / "data" / "demo" / "pairs.jsonl"),
                          steps=["score", "filter", "export", "report"],
                          filter={"ches_drop_top": 10, "max_flip_prob": "0.95", "holdout": 0.1},
                          export={"format": "jsonl"})
    result = pipeline.run_pipeline(recipe, steps=table)
    run = tmp_path / "run"
    pairs = pl.read_parquet(run / "pairs.parquet").height
    counts = result["steps"][2]["summary"]
    assert counts["input"] == pairs and counts["kept"] == pl.read_parquet(run / "curated" / "pairs.parquet").height
    assert counts["kept"] < counts["curated_input"] < pairs
    assert (run / "export" / "train.jsonl").read_text().count("\n") == counts["kept"]
    assert result["report"] == str(run / "report.html") and (run / "report.html").stat().st_size > 1_000_000
    assert result["headline"]["kept after curation"] == counts["kept"]
    assert {"curation", "ches"} <= set(pipeline_sections(run))


def pipeline_sections(run: Path) -> list[str]:
    from curate.report import build_sections, load_inputs

    return [s.id for s in build_sections(load_inputs(run))]


@pytest.mark.parametrize("value, device, expected", [
    (48, "cpu", 48), ("all", "cpu", None), (None, "cpu", None), ("auto", "cpu", pipeline.CPU_TRAIN_PAIRS),
])
def test_max_train_pairs(value, device, expected):
    ctx = pipeline.Context({"train": {"max_train_pairs": value}, "device": device}, Path("."))
    assert pipeline.max_train_pairs(ctx) == expected


@pytest.mark.parametrize("value", [0, -3, "many", 2.5, True])
def test_max_train_pairs_refuses_nonsense(value):
    ctx = pipeline.Context({"train": {"max_train_pairs": value}}, Path("."))
    with pytest.raises(CurateError, match="max_train_pairs"):
        pipeline.max_train_pairs(ctx)


# ------------------------------------------------------------------ the CLI
def test_cli_run_json_and_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from curate.cli import app

    fake = FakeSteps()
    monkeypatch.setattr(pipeline, "STEP_TABLE", fake.table())
    monkeypatch.setenv("CURATE_QUIET", "0")  # restored after the test (--json sets it)
    recipe = write_recipe(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(recipe), "--set", "filter.ches_drop_top=5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [s["step"] for s in out["steps"]] == ["load"] + ALL_STEPS and out["headline"] == {"pairs": 3}

    result = runner.invoke(app, ["run", str(recipe), "--set", "trian.lr=1"])
    assert result.exit_code == 2 and "unknown recipe key 'trian'" in result.output
    assert "Traceback" not in result.output


def test_cli_report_json(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    run = tmp_path / "run"
    run.mkdir()
    from curate.data.schema import pairs_frame, quarantine_frame
    from curate.rundir import RunDir

    RunDir(run).write_pairs(pairs_frame([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a b",
                                          "rejected": "c"}]), quarantine_frame([]))
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sections"] == ["dataset"] and summary["out"] == str(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


# ------------------------------------------------------------------ every real step, with a tiny model
@pytest.mark.slow
def test_every_step_end_to_end_with_a_tiny_model(tmp_path, tiny_model_dir):
    """All seven steps through the real library functions: a tiny random llama, MiniLM for the features."""
    recipe = write_recipe(
        tmp_path, dataset=str(REPO / "data" / "demo" / "pairs.jsonl"), model=str(tiny_model_dir), device="cpu",
        load={"limit": 24},
        score={"scores": ["ches", "logps", "reward", "noise"], "dtype": "fp32",
               "reward_options": {"embedder": None, "folds": 2, "seeds": [0]}},
        features={"n_features": 8, "k": 2, "prefixes": [4, 8], "max_epochs": 2, "min_epochs": 1, "val_fraction": 0.25},
        filter={"ches_drop_top": 10},
        export={"format": "parquet"},
        train={"max_train_pairs": 4, "common": {"batch_size": 2, "lr": 1e-3, "bf16": False, "save_every": 0},
               "runs": {"dpo": {"loss": "dpo"}, "sparsepo": {"loss": "sparsepo"}}},
        eval={"data": "train"},
    )
    result = pipeline.run_pipeline(recipe, quiet=True)
    run = tmp_path / "run"
    assert [s["status"] for s in result["steps"]] == ["ran"] * 8
    assert {"ln_ches", "flip_prob", "sae_f0"} <= set(pl.read_parquet(run / "scores.parquet").columns)
    for name in ("dpo", "sparsepo"):
        assert len((run / "train" / name / "metrics.jsonl").read_text().splitlines()) == 2  # 4 pairs / 2 per step
        assert json.loads((run / "eval" / name / "eval.json").read_text())["pairs"] == 4
    assert set(pipeline_sections(run)) == {"dataset", "ches", "ensemble", "noise", "features", "curation", "training"}
    assert result["headline"]["train/dpo final loss"] > 0

    again = pipeline.run_pipeline(recipe, quiet=True)
    assert [s["status"] for s in again["steps"]] == ["skipped"] * 7 + ["ran"]


@pytest.mark.parametrize("override, message", [
    ("train.runs.dpo.learning_rate=1e-5", r"train.runs.dpo.learning_rate is not a setting; the valid keys .*lr"),
    ("eval.bta=0.1", r"eval.bta is not a setting; the valid keys there are alpha, .*beta"),
    ("filter.ches_top=5", r"filter.ches_top is not a setting; the valid keys there are ches_column"),
    ("features.m=8", r"features.m is not a setting; the valid keys there are .*n_features"),
])
def test_a_misspelt_step_setting_fails_before_any_step_runs(tmp_path, override, message):
    with pytest.raises(CurateError, match=message):
        pipeline.run_pipeline(REPO / "pipelines" / "demo.yaml", [f"run_dir={tmp_path / 'run'}", override])
    assert not (tmp_path / "run" / "pairs.parquet").exists()
