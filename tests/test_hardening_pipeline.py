"""`curate run` hardening: slugs and safe deletes, recipes that fail before any model loads, score reuse."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate import pipeline
from curate.errors import CurateError
from curate.fsutil import check_slug, remove_inside

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.yaml"
HH = REPO / "pipelines" / "hh-rlhf.yaml"


# ---------------------------------------------------------------- names and deletes
def make_victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def test_a_traversal_run_name_is_refused_and_the_victim_survives(tmp_path):
    victim = make_victim(tmp_path)
    recipe = {"run_dir": str(tmp_path / "a" / "run"), "dataset": "d.jsonl", "steps": ["train"],
              "train": {"runs": {"../../victim": {"loss": "dpo"}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(CurateError, match=r"train.runs key: '../../victim' is not a valid name"):
        pipeline.run_pipeline(path)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "a").exists()


def test_the_train_step_itself_refuses_a_traversal_name(tmp_path):
    """Even with the recipe check bypassed, the fresh-run delete cannot reach outside the run dir."""
    victim = make_victim(tmp_path)
    run = tmp_path / "a" / "run"
    run.mkdir(parents=True)
    recipe = {"run_dir": str(run), "dataset": "d", "steps": ["train"], "train": {"runs": {"../../victim": {}}}}
    with pytest.raises(CurateError, match="not a valid name"):
        pipeline.train_step(pipeline.Context(recipe, run, fresh=True))
    assert (victim / "precious.txt").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "Dpo", "", "a..b", "x\\y", 3])
def test_non_slugs_are_refused(name):
    with pytest.raises(CurateError, match="some.key"):
        check_slug(name, "some.key")


@pytest.mark.parametrize("name", ["dpo", "sparsepo-l1", "run_2", "v1.5"])
def test_slugs_pass(name):
    assert check_slug(name, "k") == name


def test_remove_inside_refuses_paths_outside_and_symlinked_escapes(tmp_path):
    victim = make_victim(tmp_path)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for outside in (victim, root / ".." / "victim", root):
        with pytest.raises(CurateError, match="refusing to delete"):
            remove_inside(outside, root)
    (root / "link").symlink_to(victim, target_is_directory=True)
    assert remove_inside(root / "link", root)  # the link goes, not what it points to
    assert (victim / "precious.txt").exists() and not (root / "link").exists()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(CurateError, match="refusing"):
        remove_inside(root / "escape" / "victim", root)
    assert remove_inside(root / "sub", root) and not (root / "sub").exists()
    assert remove_inside(root / "missing", root) is False


# ---------------------------------------------------------------- recipes fail early, naming the recipe key
@pytest.mark.parametrize("override, message", [
    ("train.common.batch_size=eight", r"train.common.batch_size must be an integer, got 'eight'"),
    ("train.common.lr=.nan", "train.common.lr must be a finite number"),
    ("train.runs.dpo.loss=nope", r"unknown train.runs.dpo.loss 'nope'"),
    ("train.runs.dpo.beta=-1", r"train.runs.dpo.beta must be > 0"),
    ("train.common.keep_checkpoints=0", "train.common.keep_checkpoints must be > 0"),
    ("train.data=everything", "train.data must be 'curated' or 'all'"),
    ("features.prefixes=[a]", "features.prefixes must be a list"),
    ("features.k=99", "features.k must be between 1 and features.n_features"),
    ("score.sores=[ches]", r"score.sores is not a setting; the valid keys there are .*scores"),
    ("score.scores=[ches,magic]", r"score.scores: unknown score name"),
    ("export.fmt=jsonl", r"export.fmt is not a setting; the valid keys there are format, split"),
    ("eval.data=test", "eval.data must be 'train' or 'holdout'"),
    ("report.ttle=x", r"report.ttle is not a setting"),
    ("filter.where=['deserialize(\"x\")']", r"filter: .*deserialize"),
    ("filter.where=['ln_ches >']", r"filter: "),
    ("filter.max_flip_prob=1.5", r"filter: .*probability in \[0, 1\]"),
])
def test_bad_recipe_values_fail_before_loading(tmp_path, override, message):
    with pytest.raises(CurateError, match=message):
        pipeline.run_pipeline(DEMO, [f"run_dir={tmp_path / 'run'}", override])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["score.scores=[ches,logps]", "filter.max_flip_prob=0.8"],
     r"filter.max_flip_prob needs the flip_prob_conservative column, .*add noise to score.scores"),
    (["score.scores=[logps]"], r"filter.ches_drop_top needs the ln_ches column.*add ches to score.scores"),
    (["score.scores=[ches,logps]", "filter.max_flip_prob=null", "filter.min_strength=0.5"],
     "filter.min_strength needs the rm_margin_mean column.*add reward"),
])
def test_a_filter_rule_names_the_score_that_makes_its_column(tmp_path, overrides, message):
    with pytest.raises(CurateError, match=message):
        pipeline.run_pipeline(DEMO, [f"run_dir={tmp_path / 'run'}", *overrides])


def hh_overrides(tmp_path: Path, hh_path: Path, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"dataset={hh_path}", "load.limit=60", "device=cpu", *extra]


@pytest.mark.parametrize("extra, message", [
    ((), r"features.n_features is 32 but only about 48 of the 60 pairs train the SAE.*at most 24"),
    (("features.n_features=8", "train.common.batch_size=100"),
     r"train.common.batch_size is 100 but at most 60 pairs reach train run dpo.*lower train.common.batch_size"),
    (("features.n_features=8", "train.max_train_pairs=4"), r"train.common.batch_size is 8 but at most 4 pairs"),
    (("features.n_features=8", "train.runs.sparsepo.batch_size=61"), r"lower train.runs.sparsepo.batch_size"),
])
def test_recipe_on_too_few_pairs_stops_before_scoring(tmp_path, hh_path, extra, message):
    """The hh-rlhf recipe on 60 HH pairs: stopped after loading, before any model, naming the recipe key."""
    with pytest.raises(CurateError, match=message):
        pipeline.run_pipeline(HH, hh_overrides(tmp_path, hh_path, *extra))
    run = tmp_path / "run"
    assert (run / "pairs.parquet").is_file() and not (run / "scores.parquet").exists()
    assert set(pipeline.PipelineState.read(run).steps) == {"load"}


# ---------------------------------------------------------------- one config source for the recipe's train section
def test_every_train_setting_is_a_recipe_key_and_every_key_a_setting(tmp_path):
    from curate.train.config import TrainConfig

    base = pipeline.load_recipe(DEMO, [f"run_dir={tmp_path / 'run'}"])
    for f in dataclasses.fields(TrainConfig):
        value = {"loss": "sparsepo", "epsilon": 0.0, "bf16": False, "weights": "weight",
                 "lora_alpha": 8.0, "max_steps": 3, "limit": 10}.get(f.name, f.default)
        recipe = {**base, "train": {**base["train"], "common": {**base["train"]["common"], f.name: value},
                                    "runs": {"only": {}}}}
        pipeline.check_all_settings(recipe)
        assert all(getattr(c, f.name) == value for c in pipeline.train_configs(recipe).values()), f.name
    recipe = {**base, "train": {**base["train"], "common": {"no_such_setting": 1}}}
    with pytest.raises(CurateError, match="train.common.no_such_setting is not a setting"):
        pipeline.check_all_settings(recipe)


def test_run_settings_override_common_ones(tmp_path):
    recipe = pipeline.load_recipe(DEMO, [f"run_dir={tmp_path / 'run'}", "train.runs.dpo.lr=1e-4"])
    configs = pipeline.train_configs(recipe)
    assert configs["dpo"].lr == 1e-4 and configs["sparsepo"].lr == 2e-5 and configs["dpo"].batch_size == 4


# ---------------------------------------------------------------- score step done
def _scored_run(tmp_path: Path, scores: list[str], columns: dict[str, list], pairs: int = 3) -> pipeline.Context:
    from curate.rundir import RunDir
    from tests.test_train_loop import make_pairs

    run = RunDir(tmp_path / "run")
    table = make_pairs(pairs)
    run.write_pairs(table, pl.DataFrame())
    ids = table["pair_id"].to_list()
    run.merge_scores(pl.DataFrame({"pair_id": ids[:len(next(iter(columns.values())))], **columns}))
    run.update_manifest("score", {"scores": scores})
    return pipeline.Context({"score": {"scores": scores}, "steps": ["score"]}, run.path)


def test_a_logps_only_score_step_counts_as_done(tmp_path):
    ctx = _scored_run(tmp_path, ["logps"], {"logp_chosen": [1.0, 2.0, 3.0], "logp_rejected": [1.0, 2.0, 3.0]})
    assert pipeline._score_done(ctx)
    ctx.recipe["score"]["scores"] = ["ches", "logps"]  # ches was never made
    assert not pipeline._score_done(ctx)


def test_a_score_step_missing_pairs_is_not_done(tmp_path):
    ctx = _scored_run(tmp_path, ["logps"], {"logp_chosen": [1.0, 2.0], "logp_rejected": [1.0, 2.0]})
    assert not pipeline._score_done(ctx)


# ---------------------------------------------------------------- environment setup in one place
def test_configure_sets_defaults_and_keeps_the_users(monkeypatch):
    from curate.env import configure

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    configure()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_every_entry_point_configures(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from curate.cli import app

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    CliRunner().invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == "8"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    with pytest.raises(CurateError):
        pipeline.run_pipeline(tmp_path / "missing.yaml")
    assert os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == "8"


def test_deletes_in_the_package_go_through_remove_inside():
    import re

    raw = re.compile(r"rmtree\(|\.unlink\(|shutil\.move\(|os\.remove\(")  # (os.rmdir: empty dirs only)
    offenders = sorted(str(p.relative_to(REPO)) for p in (REPO / "curate").rglob("*.py")
                       if raw.search(p.read_text()) and p.name != "fsutil.py")
    assert not offenders, f"delete through curate.fsutil.remove_inside in {offenders}"


def test_batch_size_is_checked_against_the_pairs_the_filter_kept(tmp_path):
    from curate.rundir import RunDir
    from tests.test_train_loop import make_pairs

    run = tmp_path / "run"
    RunDir(run / pipeline.CURATED_DIR).write_pairs(make_pairs(5), pl.DataFrame())
    recipe = pipeline.load_recipe(DEMO, [f"run_dir={run}", "train.max_train_pairs=all", "device=cpu",
                                         "train.runs.dpo.batch_size=6"])
    with pytest.raises(CurateError, match=r"train.runs.dpo.batch_size is 6 but at most 5 pairs reach train run dpo "
                                          r"\(5 pairs kept by the filter, train.max_train_pairs all\)"):
        pipeline._check_curated_pairs(recipe, run)
    pipeline._check_curated_pairs(pipeline.load_recipe(DEMO, [f"run_dir={run}", "device=cpu"]), run)  # 4 <= 5
