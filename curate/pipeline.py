"""`curate run RECIPE.yaml`: the whole pipeline, one YAML recipe, one run directory.

A recipe names a dataset, a model, a run directory and the steps to run, in
this order (each optional): ``score``, ``features``, ``filter``, ``export``,
``train``, ``eval``, ``report``. Each step's settings sit under its own key and
go straight to the library function that does the work::

    run_dir: runs/demo
    dataset: data/demo/pairs.jsonl
    model: smollm2-135m-instruct
    steps: [score, features, filter, export, train, eval, report]
    filter: {ches_drop_top: 10, max_flip_prob: 0.9}
    train: {max_train_pairs: 64, common: {lr: 5.0e-6}, runs: {dpo: {loss: dpo}}}

Layout of the run directory: ``RUN/`` holds the pairs, scores and features;
``RUN/curated/`` the filtered set, ``RUN/export/`` its export,
``RUN/train/NAME/`` each training run, ``RUN/eval/NAME/`` its evaluation,
``RUN/report.html`` the report and ``RUN/pipeline.json`` what ran.

Resuming: every step's fingerprint hashes its settings, the dataset and model,
and the fingerprint of the step before it. A step whose fingerprint matches
the one recorded in ``pipeline.json`` and whose outputs exist is skipped; a
changed step reruns, and so does every step after it. A training run killed
half way resumes from its last checkpoint. The report is always rewritten.

Checking: before any step runs, every section's keys and values are checked
against what they feed (``TrainConfig``, ``FeatureSettings``, the step
functions' parameters), and right after loading, before any model, against
the number of pairs; errors name the recipe key. ``train.runs`` names are
slugs (they become directories), and every delete goes through
:func:`curate.fsutil.remove_inside`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from curate.errors import CurateError
from curate.fsutil import check_slug, remove_inside
from curate.rundir import (CURATED_DIR, CURATION, EVAL_DIR, EVAL_SUMMARY, EXPORT_DIR, FEATURES_TABLE, HOLDOUT, PAIRS,
                           SCORES, TRAIN_DIR)

STEPS = ("score", "features", "filter", "export", "train", "eval", "report")
GLOBAL_KEYS = ("name", "description", "run_dir", "dataset", "load", "model", "device", "seed", "steps")
STATE = "pipeline.json"


# ------------------------------------------------------------------ recipes
def yaml_load(text: str) -> Any:
    """YAML with one fix: '5e-6' is a float (PyYAML's YAML 1.1 rules read it as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9]*[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$"
                   r"|^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_train_pairs=16' -> (['train', 'max_train_pairs'], 16); values are read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CurateError(f"--set {text!r} is not KEY=VALUE; write e.g. --set dataset=path/to/pairs.jsonl")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [part.strip() for part in key.split(".")], value


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``recipe`` with each ``KEY.SUB=VALUE`` set (dicts are created on the way)."""
    recipe = copy.deepcopy(recipe)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in GLOBAL_KEYS and path[0] not in STEPS:
            raise CurateError(f"--set {text!r}: unknown recipe key {path[0]!r}; "
                              f"use one of {', '.join(GLOBAL_KEYS + STEPS)}")
        node = recipe
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise CurateError(f"--set {text!r}: {part!r} is {child!r}, not a section with keys")
            node = child
        node[path[-1]] = value
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply ``--set`` overrides, and check it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))
        hint = f" (shipped recipes: {', '.join('pipelines/' + s for s in shipped)})" if shipped else ""
        raise CurateError(f"recipe {path} does not exist; pass the path of a YAML recipe{hint}")
    try:
        recipe = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CurateError(f"{path} is not valid YAML ({exc}); fix the recipe file") from None
    if not isinstance(recipe, dict):
        raise CurateError(f"{path} must be a YAML mapping of recipe keys (run_dir, dataset, steps, ...)")
    recipe = apply_overrides(recipe, overrides)
    check_recipe(recipe, path)
    return recipe


def check_recipe(recipe: dict[str, Any], path: Path | str = "the recipe") -> None:
    unknown = sorted(set(recipe) - set(GLOBAL_KEYS) - set(STEPS))
    if unknown:
        raise CurateError(f"{path}: unknown keys {unknown}; a recipe has {', '.join(GLOBAL_KEYS + STEPS)}")
    steps = recipe.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CurateError(f"{path}: 'steps' must list the steps to run, e.g. [score, filter, report]")
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise CurateError(f"{path}: unknown steps {bad}; choose from {', '.join(STEPS)}")
    if [s for s in STEPS if s in steps] != list(steps):
        raise CurateError(f"{path}: list the steps in pipeline order: {', '.join(s for s in STEPS if s in steps)}")
    for key in ("run_dir", "dataset"):
        if not recipe.get(key):
            raise CurateError(f"{path}: set '{key}' in the recipe or with --set {key}=...")
    for step in steps:
        if not isinstance(recipe.get(step) or {}, dict):
            raise CurateError(f"{path}: the '{step}' section must be a mapping of settings")
    runs = (recipe.get("train") or {}).get("runs") if isinstance(recipe.get("train"), dict) else None
    if runs is not None and not isinstance(runs, dict):
        raise CurateError(f"{path}: train.runs must map a run name to its settings, e.g. {{dpo: {{loss: dpo}}}}")
    for name in runs or {}:  # each becomes RUN/train/NAME and RUN/eval/NAME
        check_slug(name, f"{path}: train.runs key")


def fingerprint(previous: str, step: str, recipe: dict[str, Any]) -> str:
    """Hash of what a step's result depends on: the data, the model, its settings and the step before it."""
    relevant = {
        "previous": previous, "step": step, "dataset": recipe["dataset"], "load": recipe.get("load") or {},
        "model": recipe.get("model"), "seed": recipe.get("seed", 0), "settings": recipe.get(step) or {},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ steps
@dataclass
class Context:
    """What a step sees: the recipe, the run directory, and whether to show progress."""

    recipe: dict[str, Any]
    run: Path
    quiet: bool = False
    fresh: bool = False  # settings, inputs or --force changed since its outputs were written: they are stale

    def settings(self, step: str) -> dict[str, Any]:
        return dict(self.recipe.get(step) or {})

    @property
    def model(self) -> str:
        return self.recipe.get("model") or "smollm2-135m-instruct"

    @property
    def device(self) -> str:
        return self.recipe.get("device") or "auto"

    @property
    def seed(self) -> int:
        return int(self.recipe.get("seed", 0))


@dataclass
class Step:
    """``run(ctx) -> summary``; ``done(ctx)``: are its outputs on disk?"""

    name: str
    run: Callable[[Context], dict[str, Any]]
    done: Callable[[Context], bool]
    always: bool = False  # rerun every time (cheap, reflects the current state)


def check_settings(step: str, settings: dict[str, Any], allowed: Any) -> None:
    """Refuse a misspelt setting with one sentence naming the recipe key, instead of a TypeError deep in a call."""
    import inspect

    from curate.config import unknown_key_error

    if isinstance(allowed, (set, frozenset, tuple)):
        names = set(allowed)
    elif dataclasses.is_dataclass(allowed):
        names = {f.name for f in dataclasses.fields(allowed)}
    else:
        names = set(inspect.signature(allowed).parameters)
    error = unknown_key_error(settings, names, lambda key: f"{step}.{key}")
    if error is not None:
        raise error


TRAIN_KEYS = ("data", "common", "runs", "max_train_pairs")
EXPORT_KEYS = ("format", "split")
REPORT_KEYS = ("out", "title")
EVAL_OWN_KEYS = ("data", "max_pairs")


def train_configs(recipe: dict[str, Any]) -> dict[str, Any]:
    """Each train run's TrainConfig (common settings under its own), checked: errors name the recipe key."""
    from curate.config import from_mapping
    from curate.train.config import TrainConfig

    train = dict(recipe.get("train") or {})
    common = train.get("common") or {}
    if not isinstance(common, dict):
        raise CurateError("train.common must be a mapping of training settings, e.g. {lr: 1.0e-6, batch_size: 8}")
    configs = {}
    for name, options in _runs_of(train).items():
        options = options or {}
        if not isinstance(options, dict):
            raise CurateError(f"train.runs.{name} must be a mapping of training settings, e.g. {{loss: dpo}}")

        def key(field: str, options=options, name=name) -> str:
            return f"train.runs.{name}.{field}" if field in options else f"train.common.{field}"

        cfg = from_mapping(TrainConfig, {"seed": int(recipe.get("seed", 0)), **common, **options}, key)
        cfg.validate(key)
        configs[name] = cfg
    return configs


def _runs_of(train: dict[str, Any]) -> dict[str, Any]:
    runs = train.get("runs") or {"dpo": {"loss": "dpo"}}
    if not isinstance(runs, dict):
        raise CurateError("train.runs must map a run name to its settings, e.g. {dpo: {loss: dpo}}")
    return runs


def check_all_settings(recipe: dict[str, Any]) -> None:
    """Check every listed step's keys and values before the first one runs (a typo in eval must not wait for scoring)."""
    from curate.config import from_mapping
    from curate.eval import evaluate
    from curate.features import FeatureSettings
    from curate.score import parse_scores, score

    steps = recipe["steps"]
    section = lambda name: dict(recipe.get(name) or {})  # noqa: E731
    def parameters(fn, *reserved: str) -> set[str]:  # what the pipeline sets itself is not a step setting
        import inspect

        return set(inspect.signature(fn).parameters) - set(reserved)

    if "score" in steps:
        check_settings("score", section("score"), parameters(score, "dataset_or_run", "out", "model", "device", "lm"))
        try:
            parse_scores(section("score").get("scores", ("ches", "logps")))
        except CurateError as exc:
            raise CurateError(f"score.scores: {exc}") from None
    if "features" in steps:
        cfg = from_mapping(FeatureSettings, section("features"), lambda key: f"features.{key}")
        if not 1 <= cfg.k <= cfg.n_features:
            raise CurateError(f"features.k must be between 1 and features.n_features ({cfg.n_features}), got {cfg.k}")
    if "filter" in steps:
        check_settings("filter", section("filter"), FILTER_KEYS)
        try:  # every rule, --where text included, parses before any model loads
            filter_rules(section("filter"))
        except CurateError as exc:
            raise CurateError(f"filter: {exc}") from None
        _check_filter_inputs(recipe)
    if "export" in steps:
        check_settings("export", section("export"), EXPORT_KEYS)
    if "train" in steps:
        check_settings("train", section("train"), TRAIN_KEYS)
        if section("train").get("data", "curated") not in ("curated", "all"):
            raise CurateError(f"train.data must be 'curated' or 'all', got {section('train')['data']!r}")
        _max_train_pairs_setting(section("train").get("max_train_pairs"))
        train_configs(recipe)
    if "eval" in steps:
        check_settings("eval", section("eval"),
                       parameters(evaluate, "model", "ref", "data", "out", "scores", "device") | set(EVAL_OWN_KEYS))
        if section("eval").get("data", "train") not in ("train", "holdout"):
            raise CurateError(f"eval.data must be 'train' or 'holdout', got {section('eval')['data']!r}")
    if "report" in steps:
        check_settings("report", section("report"), REPORT_KEYS)


# which score (score.scores) or step makes the column each filter setting reads
SCORE_COLUMNS = {"ches": ("ln_ches", "ches"), "logps": ("logp_chosen", "logp_rejected"),
                 "reward": ("rm_margin_mean", "rm_margin_std"), "noise": ("flip_prob", "flip_prob_conservative")}
FILTER_NEEDS = {"ches_threshold": "ln_ches", "ches_drop_top": "ln_ches", "ches_keep_lowest": "ln_ches",
                "min_strength": "rm_margin_mean", "max_margin_std": "rm_margin_std",
                "max_flip_prob": "flip_prob_conservative", "soft_labels": "flip_prob_conservative"}


def _scores_making(column: str) -> list[str]:
    """The score names that make ``column``, the one it belongs to first."""
    makers = [name for name, columns in SCORE_COLUMNS.items() if column in columns]
    if set(makers) & {"reward", "noise"}:  # the ensemble and the noise estimates are computed together
        makers += [name for name in ("reward", "noise") if name not in makers]
    return makers


def _check_filter_inputs(recipe: dict[str, Any]) -> None:
    """A filter setting whose column the recipe's score step will not make names the score to add."""
    if "score" not in recipe["steps"]:
        return  # the columns may already be in the run directory; curation names what is missing
    from curate.score import parse_scores

    scores = set(parse_scores((recipe.get("score") or {}).get("scores", ("ches", "logps"))))
    settings = dict(recipe.get("filter") or {})
    needs = {key: FILTER_NEEDS[key] for key in settings if key in FILTER_NEEDS and settings[key] not in (None, False)}
    if settings.get("ches_column"):
        needs = {k: (settings["ches_column"] if v == "ln_ches" else v) for k, v in needs.items()}
    if settings.get("weights") in ("strength", "madpo"):
        needs["weights"] = "rm_margin_mean"
    for key, column in needs.items():
        makers = _scores_making(column)
        if makers and not scores & set(makers):
            raise CurateError(f"filter.{key} needs the {column} column, which score.scores {sorted(scores)} does "
                              f"not make: add {makers[0]} to score.scores")
    if settings.get("features") and "features" not in recipe["steps"]:
        raise CurateError("filter.features needs SAE features: add features to steps (before filter)")


def check_against_data(recipe: dict[str, Any], n_pairs: int, device_type: str) -> None:
    """Settings that only the loaded pairs can rule out, checked before the first model loads."""
    steps = recipe["steps"]
    if "features" in steps:
        from curate.config import from_mapping
        from curate.features import FeatureSettings

        cfg = from_mapping(FeatureSettings, dict(recipe.get("features") or {}), lambda key: f"features.{key}")
        available = int(n_pairs * (1 - cfg.val_fraction))  # at most this many pairs train the SAE
        if available < 2 * cfg.n_features:
            raise CurateError(
                f"features.n_features is {cfg.n_features} but only about {available} of the {n_pairs} pairs train "
                f"the SAE (it needs 2 x n_features): set features.n_features to at most {max(1, available // 2)}")
    if "train" in steps:
        check_train_pairs(recipe, n_pairs, device_type, f"{n_pairs} pairs loaded")


def check_train_pairs(recipe: dict[str, Any], n_pairs: int, device_type: str, source: str) -> None:
    """Every train run's batch size against the pairs that can reach it (``source`` says where they come from)."""
    max_pairs = dict(recipe.get("train") or {}).get("max_train_pairs")
    limit = _max_train_pairs_value(max_pairs, device_type)
    reach = min(n_pairs, limit) if limit else n_pairs
    for name, cfg in train_configs(recipe).items():
        options = ((recipe.get("train") or {}).get("runs") or {}).get(name) or {}
        pairs = min(reach, cfg.limit) if cfg.limit else reach
        if cfg.batch_size > pairs:
            key = f"train.runs.{name}.batch_size" if "batch_size" in options else "train.common.batch_size"
            raise CurateError(f"{key} is {cfg.batch_size} but at most {pairs} pairs reach train run {name} "
                              f"({source}, train.max_train_pairs {max_pairs if max_pairs is not None else 'all'}): "
                              f"lower {key}")


def _train_runs(ctx: Context) -> dict[str, dict[str, Any]]:
    return _runs_of(ctx.settings("train"))


def load_step(ctx: Context) -> dict[str, Any]:
    """Read the dataset into RUN/pairs.parquet and RUN/quarantine.parquet."""
    from curate.rundir import LoadSection, RunDir, dataset_fingerprint, resolve_pairs

    options = dict(ctx.recipe.get("load") or {})
    loaded = resolve_pairs(str(ctx.recipe["dataset"]), **options)
    run = RunDir(ctx.run)
    if ctx.fresh:  # other data: scores of the old pairs must not linger in the join
        remove_inside(ctx.run / SCORES, ctx.run)
    run.write_pairs(loaded.pairs, loaded.quarantine)
    info = {k: v for k, v in loaded.info.items() if k not in ("source", "kind")}
    run.write_section(LoadSection.from_dict({**info, "dataset": str(ctx.recipe["dataset"]), "options": options,
                                             "fingerprint": dataset_fingerprint(loaded.pairs),
                                             "pairs": loaded.pairs.height, "quarantined": loaded.quarantine.height}))
    return {"pairs": loaded.pairs.height, "quarantined": loaded.quarantine.height}


def score_step(ctx: Context) -> dict[str, Any]:
    """CHES and log-probs with the policy model; with ``scores: [..., reward, noise]`` the ensemble and flips too."""
    from curate.score import score

    cfg = ctx.settings("score")
    # the reward ensemble and the features step embed the same replies: one cache for both
    cfg["reward_options"] = {"cache_dir": ctx.run / "cache", **(cfg.get("reward_options") or {})}
    if ctx.fresh:  # columns of other settings (or of the features step) must not outlive them
        remove_inside(ctx.run / SCORES, ctx.run)
    table = score(ctx.run, out=ctx.run, model=ctx.model, device=ctx.device, **cfg)
    out: dict[str, Any] = {"pairs": table.height}
    for name in ("ln_ches", "rm_margin_mean", "flip_prob"):
        if name in table.columns:
            out[f"median {name}"] = table[name].median()
    return out


def _score_done(ctx: Context) -> bool:
    """Every requested score's columns exist for every pair, and the manifest lists those scores."""
    from curate.rundir import RunDir, ScoreSection
    from curate.score import parse_scores

    run = RunDir(ctx.run)
    wanted = parse_scores(ctx.settings("score").get("scores", ("ches", "logps")))
    recorded = set((run.section(ScoreSection) or ScoreSection()).scores)
    if not set(wanted) <= recorded:
        return False
    scores = run.scores()
    columns = [c for name in wanted for c in SCORE_COLUMNS[name][:1]]
    if any(c not in scores.columns for c in columns):
        return False
    pair_ids = set(run.pairs()["pair_id"].to_list())
    return pair_ids <= set(scores["pair_id"].to_list())


def features_step(ctx: Context) -> dict[str, Any]:
    from curate.features import FeatureSettings, run_features

    settings = FeatureSettings(**{"seed": ctx.seed, **ctx.settings("features")})
    result = run_features(ctx.run, settings=settings, show_progress=not ctx.quiet)
    return {k: result.summary.get(k) for k in ("auc_sae", "auc_probe_length", "auc_length", "signal_fraction")}


FILTER_RULE_KEYS = ("ches_threshold", "ches_column", "ches_drop_top", "ches_keep_lowest", "min_strength",
                    "max_margin_std", "max_flip_prob", "noise_action")
FILTER_KEYS = FILTER_RULE_KEYS + ("features", "where", "weights", "soft_labels", "holdout")


def filter_rules(cfg: dict[str, Any]) -> list[Any]:
    """The curation rules of a recipe's ``filter`` section (the same specs the CLI flags give)."""
    from curate.curation import rules_from_options

    return rules_from_options(
        **{k: (str(cfg[k]) if k not in ("ches_column", "noise_action") else cfg[k]) for k in FILTER_RULE_KEYS
           if cfg.get(k) is not None},
        features=[str(f) for f in cfg.get("features") or ()], where=[str(w) for w in cfg.get("where") or ()],
    )


def filter_step(ctx: Context) -> dict[str, Any]:
    from curate.curation import filter_run

    cfg = ctx.settings("filter")
    rules = filter_rules(cfg)
    summary = filter_run(ctx.run, rules, ctx.run / CURATED_DIR, weights=cfg.get("weights", "none"),
                         soft_labels=bool(cfg.get("soft_labels", False)), holdout=float(cfg.get("holdout", 0.0)),
                         force=True)
    return summary["counts"]


def export_step(ctx: Context) -> dict[str, Any]:
    from curate.export import export_curated

    cfg = ctx.settings("export")
    summary = export_curated(ctx.run / CURATED_DIR, cfg.get("format", "parquet"), ctx.run / EXPORT_DIR,
                             split=cfg.get("split", "train"), force=True)
    return {"pairs": summary["pairs"], "format": cfg.get("format", "parquet"), "out": summary["out"]}


def _training_data(ctx: Context) -> Path:
    source = ctx.settings("train").get("data", "curated")
    if source not in ("curated", "all"):
        raise CurateError(f"train.data must be 'curated' or 'all', got {source!r}")
    return ctx.run / CURATED_DIR if source == "curated" and "filter" in ctx.recipe["steps"] else ctx.run


CPU_TRAIN_PAIRS = 64  # max_train_pairs "auto" on a CPU: SmolLM2-135M trains at well under 1 pair/s there


def _max_train_pairs_setting(value: Any) -> Any:
    if value in (None, "all", "auto") or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise CurateError(f"train.max_train_pairs must be a positive number, 'all' or 'auto', got {value!r}")


def _max_train_pairs_value(value: Any, device_type: str) -> int | None:
    value = _max_train_pairs_setting(value)
    if value in (None, "all"):
        return None
    if value == "auto":
        return None if device_type != "cpu" else CPU_TRAIN_PAIRS
    return value


def max_train_pairs(ctx: Context) -> int | None:
    """train.max_train_pairs as a limit: a number, 'all' / null (no limit), or 'auto' (64 on a CPU, all on a GPU)."""
    value = ctx.settings("train").get("max_train_pairs")
    if value == "auto":
        from curate.models import resolve_device

        return _max_train_pairs_value(value, resolve_device(ctx.device).type)
    return _max_train_pairs_value(value, "cpu")


def train_step(ctx: Context) -> dict[str, Any]:
    """Each entry of train.runs, on the first max_train_pairs pairs; finished runs are kept, killed ones resume."""
    from curate.train.loop import train

    limit = max_train_pairs(ctx)
    out: dict[str, Any] = {}
    for name, config in train_configs(ctx.recipe).items():
        target = ctx.run / TRAIN_DIR / check_slug(name, "train.runs key")
        if ctx.fresh:
            remove_inside(target, ctx.run)
        if (target / "final").is_dir():
            out[name] = {"skipped": "already trained"}
            continue
        # a run dir left by a killed run of the same settings resumes (from step 0 if no checkpoint was written)
        resume = target.is_dir() and any(target.iterdir())
        if config.limit is None:
            config = dataclasses.replace(config, limit=limit)
        result = train(_training_data(ctx), out=target, model=ctx.model, resume=resume, progress=not ctx.quiet,
                       device=ctx.device, config=config)
        out[name] = {"steps": result.steps, "final_loss": result.final_loss,
                     "reward_accuracy": result.last_metrics.get("reward_accuracy")}
    return out


def _train_done(ctx: Context) -> bool:
    return all((ctx.run / TRAIN_DIR / name / "final").is_dir() for name in _train_runs(ctx))


def eval_step(ctx: Context) -> dict[str, Any]:
    """Each trained policy against the base model on the pairs it trained on (or the holdout)."""
    from curate.eval import evaluate
    from curate.rundir import RunDir

    cfg = ctx.settings("eval")
    which = cfg.pop("data", "train")
    max_pairs = cfg.pop("max_pairs", None)
    if which == "train":
        limit = max_train_pairs(ctx)
        pairs = RunDir(_training_data(ctx)).table()
        pairs = pairs.head(limit) if limit else pairs
    elif which == "holdout":
        path = ctx.run / CURATED_DIR / HOLDOUT
        if not path.exists():
            raise CurateError("eval.data is 'holdout' but the filter set no pairs aside: set filter.holdout (e.g. 0.1)")
        import polars as pl

        pairs = pl.read_parquet(path)
    else:
        raise CurateError(f"eval.data must be 'train' or 'holdout', got {which!r}")
    if max_pairs:
        pairs = pairs.head(int(max_pairs))
    out = {}
    for name in _train_runs(ctx):
        summary = evaluate(ctx.run / TRAIN_DIR / name / "final", ctx.model, pairs, out=ctx.run / EVAL_DIR / name,
                           scores=ctx.run, device=ctx.device, **{"seed": ctx.seed, **cfg})
        out[name] = {"ranking_accuracy": summary["ranking_accuracy"],
                     "mean_delta_chosen": summary["displacement"]["mean_delta_chosen"]}
    return out


def _eval_done(ctx: Context) -> bool:
    return all((ctx.run / EVAL_DIR / name / EVAL_SUMMARY).is_file() for name in _train_runs(ctx))


def report_step(ctx: Context) -> dict[str, Any]:
    from curate.report import write_report

    cfg = ctx.settings("report")
    summary = write_report(ctx.run, cfg.get("out"), title=cfg.get("title") or ctx.recipe.get("name"))
    return {"out": summary["out"], "sections": summary["sections"], "headline": summary["headline"]}


STEP_TABLE: dict[str, Step] = {
    "load": Step("load", load_step, lambda ctx: (ctx.run / PAIRS).is_file()),
    "score": Step("score", score_step, _score_done),
    "features": Step("features", features_step, lambda ctx: (ctx.run / FEATURES_TABLE).is_file()),
    "filter": Step("filter", filter_step, lambda ctx: (ctx.run / CURATED_DIR / CURATION).is_file()),
    "export": Step("export", export_step, lambda ctx: (ctx.run / EXPORT_DIR / "README.md").is_file()),
    "train": Step("train", train_step, _train_done),
    "eval": Step("eval", eval_step, _eval_done),
    "report": Step("report", report_step, lambda ctx: False, always=True),
}


# ------------------------------------------------------------------ running
@dataclass
class PipelineState:
    """RUN/pipeline.json: per step, the fingerprint it ran with, its summary and how long it took."""

    path: Path
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, run: Path) -> "PipelineState":
        path = run / STATE
        data = json.loads(path.read_text()) if path.exists() else {}
        return cls(path, data.get("steps", {}))

    def record(self, step: str, info: dict[str, Any], recipe: dict[str, Any]) -> None:
        from curate.rundir import write_json

        self.steps[step] = info
        write_json({"recipe": recipe, "steps": self.steps}, self.path)


def run_pipeline(recipe_path: str | Path, overrides: Sequence[str] = (), *, quiet: bool = False, force: bool = False,
                 console: Any = None, steps: dict[str, Step] | None = None) -> dict[str, Any]:
    """Run a recipe's steps into its run directory; return what each step did and the headline numbers.

    ``force`` reruns every step. ``steps`` replaces the step implementations
    (tests use it). Progress and a summary go to ``console`` (a rich Console)
    unless ``quiet``.
    """
    from curate.env import configure

    configure()
    recipe = load_recipe(recipe_path, overrides)
    if steps is None:
        check_all_settings(recipe)
    table = steps or STEP_TABLE
    run = Path(recipe["run_dir"]).expanduser()
    if run.is_dir() and any(run.iterdir()) and not (run / STATE).exists():
        raise CurateError(f"{run} already holds files that `curate run` did not write; "
                          f"choose a new run_dir (--set run_dir=...) or empty it")
    run.mkdir(parents=True, exist_ok=True)
    state = PipelineState.read(run)
    say = (lambda *a: None) if console is None else console.print
    say(f"[bold]curate run[/] {recipe_path} → {run}")

    t_start = time.perf_counter()
    previous, results = "", []
    order = ["load"] + list(recipe["steps"])
    upstream_ran = False
    for i, name in enumerate(order):
        if name != "load" and order[i - 1] == "load" and (run / PAIRS).is_file():
            _check_loaded_pairs(recipe, run)
        step = table[name]
        if name == "train" and step is STEP_TABLE["train"]:
            _check_curated_pairs(recipe, run)
        fp = fingerprint(previous, name, recipe)
        previous = fp
        recorded = state.steps.get(name, {})
        # fresh: earlier outputs of this step are stale (settings or inputs changed); otherwise a
        # half-finished step may resume (e.g. training from its last checkpoint).
        fresh = force or upstream_ran or recorded.get("fingerprint") != fp
        ctx = Context(recipe, run, quiet=quiet, fresh=fresh)
        if not fresh and recorded.get("finished") and not step.always and step.done(ctx):
            say(f"[dim][{i}/{len(order) - 1}] {name}: done earlier, skipped[/]")
            results.append({"step": name, "status": "skipped", "seconds": 0.0, "summary": recorded.get("summary")})
            continue
        say(f"[bold cyan][{i}/{len(order) - 1}] {name}[/]")
        state.record(name, {"fingerprint": fp, "started": _now()}, recipe)
        t0 = time.perf_counter()
        summary = step.run(ctx)
        seconds = round(time.perf_counter() - t0, 1)
        state.record(name, {"fingerprint": fp, "finished": _now(), "seconds": seconds, "summary": summary}, recipe)
        results.append({"step": name, "status": "ran", "seconds": seconds, "summary": summary})
        upstream_ran = upstream_ran or not step.always

    report = next((r["summary"] for r in results if r["step"] == "report"), None)
    return {
        "recipe": str(recipe_path), "run_dir": str(run), "steps": results,
        "seconds": round(time.perf_counter() - t_start, 1),
        "report": report["out"] if report else None,
        "headline": report["headline"] if report else {},
    }


def _pairs_and_device(recipe: dict[str, Any], directory: Path) -> tuple[int, str]:
    """How many pairs ``directory`` holds, and the type of the device the recipe runs on."""
    import polars as pl

    from curate.models import resolve_device

    n_pairs = pl.scan_parquet(directory / PAIRS).select(pl.len()).collect().item()
    return n_pairs, resolve_device(recipe.get("device") or "auto").type


def _check_loaded_pairs(recipe: dict[str, Any], run: Path) -> None:
    """After the load step, before any model: the settings the number of pairs can rule out."""
    check_against_data(recipe, *_pairs_and_device(recipe, run))


def _check_curated_pairs(recipe: dict[str, Any], run: Path) -> None:
    """Before training (after the filter): the batch sizes against the pairs the filter kept."""
    data = _training_data(Context(recipe, run))
    if (data / PAIRS).is_file():
        n_pairs, device_type = _pairs_and_device(recipe, data)
        what = "pairs kept by the filter" if data != run else "pairs in the run"
        check_train_pairs(recipe, n_pairs, device_type, f"{n_pairs} {what}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def render_summary(result: dict[str, Any], console: Any) -> None:
    """The one-screen summary printed at the end of `curate run`."""
    from rich.table import Table

    steps = Table(title=f"curate run: {result['run_dir']} ({_duration(result['seconds'])})")
    steps.add_column("step")
    steps.add_column("status")
    steps.add_column("time", justify="right")
    steps.add_column("result")
    for row in result["steps"]:
        steps.add_row(row["step"], row["status"], _duration(row["seconds"]), _brief(row["step"], row["summary"]))
    console.print(steps)
    if result["headline"]:
        numbers = Table(title="headline numbers", show_header=False)
        numbers.add_column("what")
        numbers.add_column("value", justify="right")
        for key, value in result["headline"].items():
            numbers.add_row(key, _short(value))
        console.print(numbers)
    if result["report"]:
        console.print(f"[bold green]report:[/] {result['report']}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _brief(step: str, summary: Any) -> str:
    """One line of a step's summary for the table."""
    if not isinstance(summary, dict):
        return ""
    if step == "report":
        return summary.get("out", "")
    flat = []
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {_short(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
            flat.append(f"{key}: {inner}")
        elif not isinstance(value, list) and value is not None:
            flat.append(f"{key} {_short(value)}")
    text = "; ".join(flat)
    return text if len(text) <= 100 else text[:97] + "..."


