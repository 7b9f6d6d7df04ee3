"""The `curate` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from curate import validate
from curate.config import cli_options
from curate.errors import CurateError
from curate.train.config import TrainConfig

app = typer.Typer(
    name="curate",
    help="Curate LLM preference data (prompt, chosen, rejected): score, filter, export, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Load, validate and inspect preference datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Validation benchmarks (planted flips, ...).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
_state = {"debug": False, "quiet": False}


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries."),
) -> None:
    from curate.env import configure

    configure()  # before any command imports torch (oneDNN cache, quiet libraries)
    _state["debug"] = debug
    _state["quiet"] = quiet
    if quiet:
        os.environ["CURATE_QUIET"] = "1"


def handle_errors(fn: Callable) -> Callable:
    """Turn CurateError (and missing files) into one red sentence and exit code 2.

    With ``--json`` progress bars are off for the command (CURATE_QUIET), so
    stdout holds only the JSON document; errors and logs go to stderr.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_mode = kwargs.get("as_json") is True
        before = os.environ.get("CURATE_QUIET")
        if json_mode:
            os.environ["CURATE_QUIET"] = "1"
        try:
            return fn(*args, **kwargs)
        except (CurateError, FileNotFoundError, FileExistsError) as exc:
            if _state["debug"]:
                raise
            from rich.markup import escape  # messages may hold brackets: pip install 'curate[ray]', ['a']

            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        finally:
            if json_mode and before is None:
                os.environ.pop("CURATE_QUIET", None)

    return wrapper


def json_safe(obj):
    """``obj`` with NaN / infinities as null and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def emit_json(obj) -> None:
    """Print exactly one strict JSON document on stdout."""
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def show(summary: Any, as_json: bool, render: Callable[[Console], Any]) -> None:
    """``summary`` as JSON with --json, else ``render(console)`` unless --quiet."""
    if as_json:
        emit_json(summary)
    elif not _state["quiet"]:
        render(Console())


# ---------------------------------------------------------------- data
# Options several commands share, defined once so their names and help cannot drift (the format
# names come from curate.data.formats).
FORMAT = typer.Option("auto", "--format", help=(
    "Row format: auto (detected from the first record), hh, hh-prompt, prompt-chosen-rejected, messages, "
    "implicit-prompt, openai-dpo, sharegpt, orca-dpo, shp, pku-saferlhf, helpsteer2, stack-exchange, "
    "ultrafeedback-raw, nectar, kto (unpaired data, refused), columns (--columns a=,b=,label=)."))
COLUMNS = typer.Option(None, help=(
    "Column mapping KEY=COL,...: prompt, chosen, rejected, system, a, b, label, label_means "
    "(a-preferred|b-preferred|index|sign), keep (an extra column to keep; repeatable); COL may be a dotted "
    "path like input.messages."))
LABEL_COLUMN = typer.Option(
    None, help="Label that chooses the side: pku-saferlhf better_response_id (default) or safer_response_id.")
STRATEGY = typer.Option("best-random-lower", help=(
    "How response sets (ultrafeedback-raw, nectar) become pairs: best-random-lower, best-worst or all."))
SUBSET = typer.Option(None, help="Hub subset / data_dir, e.g. harmless-base.")
SPLIT = typer.Option(None, help="Split to load (default: train for hub data).")
DTYPE = typer.Option("auto", help="auto (bf16-mixed where bf16 is fast, else fp32), fp32, bf16 (bf16 weights: half the memory, but train recomputes its reference) or bf16-mixed (fp32 weights, bf16 arithmetic: what train uses).")
DEVICE = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ...")
MAX_LENGTH = typer.Option(None, help="Token limit per prompt+reply (default: the model's context).")
SYSTEM_PROMPT = typer.Option("default", help="'default' (the template's own), 'none', or a text.")
AS_JSON = typer.Option(False, "--json", help="Print the summary as JSON.")


@data_app.command("inspect")
@handle_errors
def data_inspect(
    dataset: str = typer.Argument(..., help="Hub name (hh-rlhf, ultrafeedback, org/name) or a local file/dir."),
    subset: Optional[str] = SUBSET,
    split: Optional[str] = SPLIT,
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    fmt: str = FORMAT,
    columns: Optional[str] = COLUMNS,
    label_column: Optional[str] = LABEL_COLUMN,
    strategy: str = STRATEGY,
    keep_empty: bool = typer.Option(False, help="Keep pairs whose reply is empty instead of quarantining them."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows."),
    streaming: bool = typer.Option(False, help="Stream hub data instead of downloading it whole (use with --limit)."),
    model: Optional[str] = typer.Option(None, help="Also report token lengths under this model's tokenizer."),
    system_prompt: str = SYSTEM_PROMPT,
    max_length: Optional[int] = typer.Option(None, help="With --model: count pairs whose reply alone exceeds this."),
    out: Optional[Path] = typer.Option(None, help="Write pairs.parquet and quarantine.parquet here."),
    as_json: bool = AS_JSON,
) -> None:
    """Count pairs, list quarantined rows with reasons, and show length statistics."""
    validate.integer("--limit", limit, example="100")
    from curate.data.inspect import inspect_dataset, render_inspection

    summary = inspect_dataset(
        dataset, subset=subset, split=split, revision=revision, fmt=fmt, columns=columns, label_column=label_column,
        strategy=strategy, keep_empty=keep_empty, limit=limit, streaming=streaming, model=model, system_prompt=system_prompt,
        max_length=max_length, out=out,
    )
    if as_json:
        emit_json(summary)
    else:
        render_inspection(summary, Console())


@data_app.command("overlap")
@handle_errors
def data_overlap(
    left: str = typer.Argument(..., help="First dataset (e.g. the train file)."),
    right: str = typer.Argument(..., help="Second dataset (e.g. the test file)."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Count pairs and prompts shared by two datasets (train/test leakage)."""
    from curate.data import load_pairs
    from curate.data.inspect import overlap

    stats = overlap(load_pairs(left).pairs, load_pairs(right).pairs)
    if as_json:
        emit_json(stats)
    else:
        Console().print(f"{stats['shared_pairs']} shared pairs and {stats['shared_prompts']} shared prompts "
                        f"({stats['left_pairs']} pairs in {left}, {stats['right_pairs']} in {right})")


# ---------------------------------------------------------------- score
# (issue 3/4: `curate score` goes here)
@app.command("score")
@handle_errors
def score_cmd(
    dataset: str = typer.Option(..., help="Hub name (hh-rlhf, ultrafeedback, org/name), a local file, or a run directory."),
    out: Optional[Path] = typer.Option(None, help="Run directory to write to (default: the --dataset run directory)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Causal LM: bundled alias, hub id or local path."),
    scores: str = typer.Option("ches,logps", help="Comma-separated: ches, logps, reward, noise."),
    limit: Optional[int] = typer.Option(None, help="Score at most this many pairs (a quick look)."),
    batch_size: str = typer.Option("auto", help="Pairs per batch, or 'auto' (fill a token budget; back off on GPU OOM)."),
    token_budget: Optional[int] = typer.Option(None, help="Padded tokens per batch with --batch-size auto."),
    dtype: str = DTYPE,
    device: str = DEVICE,
    max_length: Optional[int] = MAX_LENGTH,
    system_prompt: str = SYSTEM_PROMPT,
    prefix_sharing: Optional[bool] = typer.Option(
        None, "--prefix-sharing/--no-prefix-sharing",
        help="Run each prompt once and reuse its KV cache for both replies (default: on CPU yes, on GPU no)."),
    shard_size: int = typer.Option(512, help="Pairs per resumable shard."),
    subset: Optional[str] = SUBSET,
    split: Optional[str] = SPLIT,
    fmt: str = FORMAT,
    columns: Optional[str] = COLUMNS,
    label_column: Optional[str] = LABEL_COLUMN,
    strategy: str = STRATEGY,
    revision: Optional[str] = typer.Option(None, help="Model revision (branch, tag or commit)."),
    reward_model: list[str] = typer.Option([], "--reward-model", help="Pretrained reward model for --scores reward (repeatable)."),
    priors: bool = typer.Option(True, "--priors/--no-priors",
                                help="--scores reward: add the shipped reward priors that apply (trained on HH-RLHF)."),
    as_json: bool = AS_JSON,
    force: bool = typer.Option(False, "--force", help="Replace a run directory that holds another dataset (and its scores)."),
    engine: str = typer.Option("local", help="local (this process) or ray (Ray Data workers; pip install 'curate[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
    num_workers: int = typer.Option(1, help="--engine ray: scorer workers, each loading the model once."),
    gpus_per_worker: float = typer.Option(0, help="--engine ray: GPUs per worker (0: CPU workers, one core each)."),
) -> None:
    """Score pairs with a causal LM: CHES, LN-CHES, log-probs (resumable; writes RUN/scores.parquet)."""
    validate.integer("--limit", limit, example="100")
    validate.integer("--token-budget", token_budget, example="16384")
    validate.integer("--max-length", max_length, example="1024")
    validate.integer("--shard-size", shard_size, example="512")
    validate.dtype(dtype, ("auto", "fp32", "bf16", "bf16-mixed"))
    validate.device(device)
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) >= 1):
        raise CurateError(f"--batch-size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    from curate.score import render_score_summary, score, score_summary

    reward_options = {"reward_models": reward_model, "priors": priors}
    score(
        dataset, out=out, model=model, scores=scores, limit=limit, batch_size=batch_size, token_budget=token_budget,
        dtype=dtype, device=device, max_length=max_length, system_prompt=system_prompt,
        prefix_sharing=prefix_sharing, shard_size=shard_size, subset=subset, split=split, fmt=fmt,
        columns=columns, label_column=label_column, strategy=strategy, revision=revision, reward_options=reward_options,
        engine=engine, ray_address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker, force=force,
    )
    summary = score_summary(out or dataset)
    show(summary, as_json, lambda console: render_score_summary(summary, console))


# issue 17: `curate pairs` (pairs from response sets, optionally by pool-CHES)
@app.command("pairs")
@handle_errors
def pairs_cmd(
    data: str = typer.Argument(..., help="Response sets: UltraFeedback raw, Nectar, or a long prompt/response/score table."),
    out: Path = typer.Option(..., help="Run directory to write pairs, quarantine, scores and the manifest to."),
    strategy: str = typer.Option("best-random-lower",
                                 help="best-random-lower | best-worst | all | min-ches | max-margin-low-ches"),
    model: Optional[str] = typer.Option(None, help="Causal LM for LN-CHES (default for CHES strategies: smollm2-135m-instruct)."),
    min_margin: float = typer.Option(0.0, help="Pair only replies whose ratings differ by at least this (ties never)."),
    max_pairs_per_prompt: Optional[int] = typer.Option(None, help="Pairs per prompt (default 1; 'all': every valid pair)."),
    seed: int = typer.Option(0, help="Seed of the random choices (best-random-lower)."),
    fmt: str = typer.Option("auto", "--format", help="auto | ultrafeedback-raw | nectar | long"),
    columns: Optional[str] = typer.Option(None, help="Long table columns: prompt=COL,response=COL,score=COL."),
    rating: str = typer.Option("mean", help="UltraFeedback rating: mean, overall_score, fine-grained_score or an aspect."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many records."),
    dtype: str = DTYPE,
    device: str = DEVICE,
    max_length: Optional[int] = MAX_LENGTH,
    system_prompt: str = SYSTEM_PROMPT,
    token_budget: Optional[int] = typer.Option(None, help="Padded tokens per forward batch."),
    shard_size: int = typer.Option(256, help="Prompts per resumable shard."),
    prefix_sharing: Optional[bool] = typer.Option(
        None, "--prefix-sharing/--no-prefix-sharing",
        help="Run each prompt once for all its replies (default: on CPU yes, on GPU no)."),
    as_json: bool = AS_JSON,
) -> None:
    """Build preference pairs from response sets (k rated replies per prompt) into a run directory."""
    from curate.pairs.strategies import STRATEGIES

    validate.choice("--strategy", strategy, STRATEGIES)
    validate.number("--min-margin", min_margin, low=0, example="1")
    validate.integer("--max-pairs-per-prompt", max_pairs_per_prompt, example="2")
    validate.integer("--limit", limit, example="100")
    validate.integer("--max-length", max_length, example="1024")
    validate.integer("--token-budget", token_budget, example="4096")
    validate.integer("--shard-size", shard_size, example="256")
    validate.dtype(dtype, ("auto", "fp32", "bf16", "bf16-mixed"))
    validate.device(device)
    from curate.pairs.build import build_pairs, pairs_summary, render_pairs_summary

    build_pairs(data, out=out, strategy=strategy, model=model, min_margin=min_margin,
                max_pairs_per_prompt=max_pairs_per_prompt, seed=seed, fmt=fmt, columns=columns, rating=rating,
                limit=limit, device=device, dtype=dtype, max_length=max_length, system_prompt=system_prompt,
                token_budget=token_budget, shard_size=shard_size, prefix_sharing=prefix_sharing)
    summary = pairs_summary(out)
    show(summary, as_json, lambda console: render_pairs_summary(summary, console))


# issue 4: `curate bench noise` (planted-flip validation of the noise estimators)
@bench_app.command("noise")
@handle_errors
def bench_noise_cmd(
    dataset: Optional[str] = typer.Option(None, help="Hub name or local file of pairs (or use --run)."),
    run: Optional[Path] = typer.Option(None, help="Run directory: its pairs and, if present, its pooled policy states."),
    flip_rates: str = typer.Option("0,0.1,0.2,0.3", help="Planted flip rates, comma-separated, each in [0, 0.5)."),
    seed: int = typer.Option(0, help="Seed of the planted flips and the orientations."),
    embedder: str = typer.Option("all-minilm-l6-v2", help="Reply-embedding model for the heads ('none' to skip)."),
    text_stats: bool = typer.Option(True, help="Use text statistics (length, markers) as a head feature set."),
    reward_model: list[str] = typer.Option([], "--reward-model", help="Pretrained reward model id or path (repeatable)."),
    folds: int = typer.Option(5, help="Folds of the cross-fitted heads."),
    split_seeds: str = typer.Option("0,1,2", help="Seeds of the repeated k-fold splits (one member set each)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many pairs of --dataset."),
    device: str = typer.Option("auto", help="Device for the embedder / reward models."),
    cache_dir: Optional[Path] = typer.Option(None, help="Embedding cache directory."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON to this file."),
) -> None:
    """Plant random flips at each rate, retrain the reward heads, and score every noise estimator."""
    from rich.table import Table

    from curate.bench_noise import benchmark_dataset
    from curate.rundir import write_json

    rates = validate.numbers("--flip-rates", flip_rates, low=0.0, high=0.5, high_open=True)
    try:
        seeds = [int(s) for s in split_seeds.split(",") if s.strip()]
    except ValueError:
        raise CurateError("--split-seeds takes comma-separated whole numbers, e.g. 0,1,2") from None
    validate.integer("--folds", folds, low=2, example="5")
    validate.integer("--limit", limit, example="200")
    validate.device(device)
    result = benchmark_dataset(
        dataset, run=str(run) if run else None, flip_rates=rates, seed=seed,
        embedder=None if embedder.lower() == "none" else embedder, text_stats=text_stats,
        reward_models=reward_model, seeds=seeds, folds=folds, limit=limit, device=device, cache_dir=cache_dir,
    )
    if json_out is not None:
        write_json(result, json_out)
    if _state["quiet"]:
        return
    table = Table(title=f"planted flips on {result['dataset']} ({result['n_pairs']} pairs)")
    for col in ("estimator", "planted", "estimated", "natural", "true", "AUROC"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in result["results"]:
        name = r["estimator"] + (" (default)" if r["estimator"] == result["default_estimator"] else "")
        table.add_row(name, fmt(r["planted_rate"]), fmt(r["estimated_rate"]), fmt(r["natural_rate"]),
                      fmt(r.get("true_rate")), fmt(r["auroc"]))
    Console().print(table)
    truth = result.get("known_truth")
    if truth:
        table = Table(title=f"known truth: labels resampled from a BT model on these features "
                            f"(Bayes AUC {truth['bayes_auc']:.3f}), flipped at known rates")
        for col in ("estimator", "true rate", "estimated", "90% interval", "flip_prob ECE", "AUROC"):
            table.add_column(col, justify="left" if col == "estimator" else "right")
        for r in truth["results"]:
            interval = "-" if "interval" not in r else f"{r['interval'][0]:.3f}-{r['interval'][1]:.3f}"
            name = r["estimator"] + (" (default)" if r["estimator"] == result["default_estimator"] else "")
            table.add_row(name, fmt(r["true_rate"]), fmt(r["estimated_rate"]), interval, fmt(r["ece"]),
                          fmt(r["auroc_wrong_label"]))
        Console().print(table)


# ---------------------------------------------------------------- features
# (issue 5: `curate features` goes here)
@app.command("features")
@handle_errors
def features_cmd(
    run: Optional[Path] = typer.Argument(None, help="Existing run directory with pairs.parquet (or use --dataset/--out)."),
    dataset: Optional[str] = typer.Option(None, help="Hub name or local file to load into --out first."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to create or reuse when --dataset is given."),
    subset: Optional[str] = SUBSET,
    split: Optional[str] = SPLIT,
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows of --dataset."),
    embedder: str = typer.Option("all-minilm-l6-v2", help="Sentence-embedding model: the bundled default, a hub id or a path."),
    n_features: int = typer.Option(32, "--n-features", help="Dictionary size M."),
    k: int = typer.Option(4, "--k", help="Active features per pair K (per-example, signed)."),
    prefixes: str = typer.Option("8,32", help="Matryoshka prefix widths, comma-separated ('' for a plain AbsTopK SAE)."),
    epochs: int = typer.Option(50, help="Maximum SAE epochs (early stopping on validation reconstruction)."),
    lr: float = typer.Option(2e-3, help="SAE learning rate (WIMHF: 5e-4, for 10k+ pairs; too slow for a few thousand)."),
    batch_size: int = typer.Option(256, help="SAE batch size."),
    val_fraction: float = typer.Option(0.2, help="Fraction of prompts held out of SAE training (early stopping)."),
    cv_folds: int = typer.Option(5, help="Folds (grouped by prompt) of the cross-fitted validation AUCs."),
    seed: int = typer.Option(0, help="Seed for the split, the orientations and the SAE."),
    device: str = typer.Option("auto", help="Device for the embedder and the SAE (auto, cpu, cuda)."),
    top: int = typer.Option(10, help="How many features to print (most significant first)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary and feature table as JSON."),
) -> None:
    """Learn signed SAE features of e(chosen) - e(rejected) and test which ones annotators rewarded (WIMHF)."""
    from curate.features import FeatureSettings, run_features

    if dataset is not None and out is None and run is None:
        raise CurateError("--dataset needs --out RUN: the directory to write the pairs and features into")
    if run is not None and out is not None and Path(run) != Path(out):
        raise CurateError("give the run directory once: either as RUN or as --out")
    target = run if run is not None else out
    if target is None:
        raise CurateError("name a run directory: `curate features RUN` or `curate features --dataset D --out RUN`")
    validate.integer("--n-features", n_features, example="32")
    validate.integer("--k", k, example="4")
    if k > n_features:
        raise CurateError(f"--k {k} is more than --n-features {n_features}: K active features must fit in the dictionary")
    validate.integer("--epochs", epochs, example="50")
    validate.number("--lr", lr, low=0.0, low_open=True, example="2e-3")
    validate.integer("--batch-size", batch_size, example="256")
    validate.fraction("--val-fraction", val_fraction, allow_zero=False, example="0.2")
    validate.integer("--cv-folds", cv_folds, low=2, example="5")
    validate.integer("--limit", limit, example="1000")
    validate.integer("--top", top, low=0, example="10")
    validate.device(device)
    try:
        widths = tuple(int(p) for p in prefixes.split(",") if p.strip())
    except ValueError:
        raise CurateError(f"--prefixes must be comma-separated integers such as 8,32, not {prefixes!r}") from None
    settings = FeatureSettings(
        n_features=n_features, k=k, prefixes=widths, batch_size=batch_size, lr=lr, max_epochs=epochs,
        val_fraction=val_fraction, cv_folds=cv_folds, seed=seed, embedder=embedder, device=device,
    )
    load_kwargs = {key: value for key, value in dict(subset=subset, split=split, limit=limit).items() if value is not None}
    result = run_features(target, dataset=dataset, settings=settings, load_kwargs=load_kwargs,
                          show_progress=not (_state["quiet"] or as_json))
    if as_json:
        emit_json({"summary": result.summary, "features": result.table.drop("examples").to_dicts()})
    elif not _state["quiet"]:
        _render_features(result, Console(), top, target)


def _render_features(result, out: Console, top: int, run: Path) -> None:
    from rich.table import Table

    s = result.summary

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    table = Table(title=f"curate features: top {top} of {result.table.height} by p-value "
                        "(Δwin = how much more often the reply with more of the feature wins, length-controlled)")
    for name, justify in (("f", "right"), ("prev", "right"), ("Δwin", "right"), ("p (Bonf.)", "right"),
                          ("description: n-grams of the reply with more / less of it", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in result.table.sort("p_value").head(top).iter_rows(named=True):
        table.add_row(str(row["feature"]), f"{row['prevalence']:.2f}", f"{row['win_rate_delta']:+.3f}",
                      f"{row['p_bonferroni']:.2g}", row["description"])
    out.print(table)
    out.print(
        f"validation AUC (cross-fitted, {s['n_pairs']} pairs): SAE+length {fmt(s['auc_sae'])}, probe {fmt(s['auc_probe'])}, "
        f"probe+length {fmt(s['auc_probe_length'])}, length {fmt(s['auc_length'])}"
    )
    out.print(f"signal fraction {fmt(s['signal_fraction'])}, beyond length {fmt(s['signal_fraction_beyond_length'])}")
    if s.get("auc_note"):
        out.print(f"[yellow]note:[/] {s['auc_note']}")
    out.print(f"wrote {run}/features.parquet, features_summary.json, sae/ and sae_f* columns in scores.parquet")


# ---------------------------------------------------------------- filter / export
# (issue 6: `curate filter`, `curate export` go here)
_RULE_HELP = "Append ':drop', ':flip' or ':reweight=F' to choose this rule's action"


@app.command("filter")
@handle_errors
def filter_cmd(
    run: Path = typer.Argument(..., help="Run directory with pairs.parquet and scores.parquet."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the curated set (a new run directory)."),
    ches_threshold: Optional[str] = typer.Option(
        None, help="Drop pairs with CHES above X (absolute, model-specific; the summary shows the column's quantiles). "
        "':reweight=F' instead of dropping."),
    ches_column: str = typer.Option("ln_ches", help="CHES column for the CHES rules: ln_ches (length-normalised) or ches."),
    ches_drop_top: Optional[str] = typer.Option(None, help="Drop the PCT percent of pairs with the highest CHES."),
    ches_keep_lowest: Optional[str] = typer.Option(None, help="Keep only the PCT percent with the lowest CHES (paper: 5-15)."),
    min_strength: Optional[str] = typer.Option(None, help=f"Pairs with rm_margin_mean below X. {_RULE_HELP}, e.g. 0:flip."),
    max_margin_std: Optional[str] = typer.Option(None, help=f"Pairs with rm_margin_std above X. {_RULE_HELP}."),
    max_flip_prob: Optional[str] = typer.Option(None, help=f"Pairs with flip_prob above X. {_RULE_HELP}, e.g. 0.9:flip."),
    noise_action: str = typer.Option("drop", help="Default action of the strength/noise rules: drop, flip, reweight[=F]."),
    feature: Optional[list[str]] = typer.Option(
        None, "--feature", help="FEATURE:ACTION-top=N (or -bottom, N or N%), e.g. 7:drop-top=100, 7:flip-top=50. Repeatable."),
    where: Optional[list[str]] = typer.Option(
        None, "--where", help="Polars expression over the pair and score columns, e.g. \"pl.col('rm_margin_std') > 2\" "
        "or \"(flip_prob > 0.6) & (rm_vote_share < 0.3)\" (bare names are columns; combine with & | ~); optional "
        "':flip' / ':reweight=F' suffix (default drop). Repeatable."),
    weights: str = typer.Option(
        "none", help="Write a per-pair 'weight' column: strength = 2*sigmoid(rm_margin_mean); madpo = MADPO weight of "
        "logit(p_chosen) (it returns to 1 for margins below -ln 999: drop or flip those first); none."),
    soft_labels: bool = typer.Option(False, "--soft-labels", help="Write 'label_confidence' = 1 - flip_prob (mirrored if flipped)."),
    holdout: float = typer.Option(0.0, help="Set aside this fraction of pairs (by pair_id hash) before any rule."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what each rule would do; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out directory."),
    as_json: bool = AS_JSON,
) -> None:
    """Drop, flip or reweight pairs by their scores, in order: CHES, strength/noise, --feature, --where.

    Every rule selects on the original scores of all pairs entering curation
    (percentages are of those pairs); a dropped pair stays dropped, a pair
    flips at most once, reweight factors multiply. The audit trail goes to
    OUT/curation.parquet.
    """
    from curate.curation import WEIGHT_SCHEMES, filter_run, rules_from_options

    validate.fraction("--holdout", holdout, example="0.1")
    validate.choice("--weights", weights, WEIGHT_SCHEMES)
    rules = rules_from_options(
        ches_threshold=ches_threshold, ches_column=ches_column, ches_drop_top=ches_drop_top,
        ches_keep_lowest=ches_keep_lowest, min_strength=min_strength, max_margin_std=max_margin_std,
        max_flip_prob=max_flip_prob, noise_action=noise_action, features=feature or (), where=where or (),
    )
    summary = filter_run(run, rules, out, weights=weights, soft_labels=soft_labels, holdout=holdout,
                         dry_run=dry_run, force=force)
    show(summary, as_json, lambda console: _render_filter(summary, console))


def _render_filter(summary: dict, out: Console) -> None:
    from rich.table import Table

    table = Table(title="curate filter" + (" (dry run: nothing written)" if summary["dry_run"] else ""))
    table.add_column("step", justify="right")
    table.add_column("rule", min_width=16, overflow="fold")
    counts = ["matched", "changed"] + (["missing"] if any(r["missing"] for r in summary["per_rule"]) else [])
    table.add_column("action")
    for col in counts:
        table.add_column(col, justify="right")
    table.add_column("q05/q50/q95 of column", justify="right", min_width=16, overflow="fold")
    for row in summary["per_rule"]:
        q = row.get("quantiles") or {}
        qs = "/".join(f"{q[k]:.3g}" for k in ("q05", "q50", "q95")) if q else ""
        table.add_row(str(row["step"]), row["rule"], row["action"], *(str(row[c]) for c in counts), qs)
    out.print(table)
    if len(summary["per_rule"]) > 1:
        overlap = Table(title="overlap: pairs matched by both steps")
        overlap.add_column("step")
        for row in summary["per_rule"]:
            overlap.add_column(str(row["step"]), justify="right")
        for row, counts in zip(summary["per_rule"], summary["overlaps"]):
            overlap.add_row(str(row["step"]), *map(str, counts))
        out.print(overlap)
    out.print("counts: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()))
    for warning in summary["warnings"]:
        out.print(f"[yellow]warning:[/] {warning}")
    if summary.get("out"):
        out.print(f"wrote {summary['out']}")


@app.command("export")
@handle_errors
def export_cmd(
    curated: Path = typer.Argument(..., help="Curated directory written by `curate filter --out`."),
    fmt: str = typer.Option(..., "--format", help="parquet | jsonl | hf (save_to_disk dir) | trl (conversational)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the data and its README.md data card into."),
    split: str = typer.Option("train", help="train (the curated pairs) or holdout (the untouched pairs set aside)."),
    push_to_hub: Optional[str] = typer.Option(None, help="Also upload to this hub dataset repo (needs network and a token)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out directory."),
    as_json: bool = AS_JSON,
    ref_logps: Optional[bool] = typer.Option(
        None, "--ref-logps/--no-ref-logps",
        help="--format trl: TRL reference columns ref_chosen_logps/ref_rejected_logps (default: when the run has logps)."),
) -> None:
    """Write curated pairs as parquet, jsonl, a datasets dir or TRL's format, with a data card."""
    from curate.export import FORMATS, SPLITS, export_curated

    validate.choice("--format", fmt, FORMATS)
    validate.choice("--split", split, SPLITS)

    summary = export_curated(curated, fmt, out, split=split, force=force, push_to_hub=push_to_hub,
                             ref_logps=ref_logps)
    show(summary, as_json, lambda console: console.print(
        f"exported {summary['pairs']} pairs ({summary['flipped']} flipped) as {fmt} to {summary['out']}: "
        + ", ".join(summary["files"])))

# ---------------------------------------------------------------- train
# (issue 7: `curate train` goes here)
@app.command("train")
@handle_errors
@cli_options(TrainConfig)
def train_cmd(
    data: str = typer.Argument(..., help="Curated/run directory (pairs.parquet), a local file, or a hub dataset name."),
    model: str = typer.Option("smollm2-135m-instruct", help="Policy (and reference) model: bundled alias, local path or hub id."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: DATA/train for a directory, else runs/train)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint (--lr may change)."),
    force: bool = typer.Option(False, "--force", help="Replace the training run already in --out."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = AS_JSON,
    config: TrainConfig = None,
) -> None:
    """Train DPO-family or SparsePO losses on curated pairs, using their weights and soft labels."""
    from curate.train import train

    if out is None:
        out = Path(data) / "train" if Path(data).is_dir() else Path("runs") / "train"
    validate.device(device)
    result = train(data, out=out, model=model, resume=resume, force=force, device=device,
                   progress=not (_state["quiet"] or as_json), config=config)
    loss = config.loss
    summary = {"out": str(result.out), "final_model": str(result.final_dir), "steps": result.steps,
               "final_loss": result.final_loss, "epsilon": result.info["epsilon"], "pairs": result.info["pairs"],
               "prompt_truncated": result.info["prompt_truncated"],
               "left_out_reply_too_long": result.info["left_out_reply_too_long"], "last": result.last_metrics}
    if as_json:
        emit_json(summary)
    elif not _state["quiet"]:
        from rich.table import Table

        table = Table(title=f"curate train --loss {loss}")
        table.add_column("")
        table.add_column("value", justify="right")
        for key in ("pairs", "steps", "final_loss", "epsilon", "prompt_truncated", "left_out_reply_too_long"):
            table.add_row(key, f"{summary[key]:.4g}" if isinstance(summary[key], float) else str(summary[key]))
        for key in ("reward_accuracy", "margin", "chosen_logps", "rejected_logps", "mask_sparsity"):
            if key in result.last_metrics:
                table.add_row(f"last step {key}", f"{result.last_metrics[key]:.4g}")
        Console().print(table)
        Console().print(f"final model: {result.final_dir}  (metrics: {result.out / 'metrics.jsonl'})")


# ---------------------------------------------------------------- eval
# (issue 8: `curate eval` goes here)
@app.command("eval")
@handle_errors
def eval_cmd(
    model: str = typer.Option(..., "--model", help="The trained policy: a checkpoint dir (e.g. TRAIN/final) or a model name."),
    ref: str = typer.Option("smollm2-135m-instruct", "--ref", help="The reference it was trained from."),
    data: str = typer.Option(..., "--data", help="Pairs to evaluate on: a run/curated dir, holdout.parquet, or a dataset."),
    out: Path = typer.Option(..., "--out", help="Directory for eval.json and per-pair eval.parquet."),
    beta: float = typer.Option(0.1, help="beta of the implicit reward beta*(log pi - log pi_ref)."),
    betas: str = typer.Option("0.01,0.05,0.1,0.5,1,5", help="Comma-separated beta sweep for the idealised ranking accuracy."),
    alpha: float = typer.Option(1 - 1e-3, help="Fraction of raters preferring the chosen reply, for the idealised accuracy."),
    scores: Optional[Path] = typer.Option(None, help="Run dir or scores.parquet with ln_ches for these pairs (optional)."),
    generate: int = typer.Option(0, help="Sample replies to N prompts from both models: refusal rate and win rate."),
    max_new_tokens: int = typer.Option(128, help="Tokens per sampled reply (--generate)."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (--generate); 0 is greedy."),
    seed: int = typer.Option(0, help="Seed for choosing and sampling the --generate prompts."),
    system_prompt: str = SYSTEM_PROMPT,
    max_length: Optional[int] = typer.Option(None, help="Token limit per sequence (default: the model's context)."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per forward (default: a token budget)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 (default: log-prob changes are small), bf16 or bf16-mixed."),
    as_json: bool = AS_JSON,
) -> None:
    """Ranking accuracy, idealised accuracy, implicit rewards and likelihood displacement of MODEL vs REF."""
    from curate.eval import evaluate, summary_rows

    validate.number("--beta", beta, low=0.0, low_open=True, example="0.1")
    beta_sweep = validate.numbers("--betas", betas, low=0.0, low_open=True)
    validate.number("--alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True, example="0.999")
    validate.integer("--generate", generate, low=0, example="32")
    validate.integer("--max-new-tokens", max_new_tokens, example="128")
    validate.number("--temperature", temperature, low=0.0, example="0.7")
    validate.integer("--max-length", max_length, low=2, example="1024")
    validate.integer("--batch-size", batch_size, example="8")
    validate.device(device)
    validate.dtype(dtype, ("fp32", "bf16", "bf16-mixed"))
    summary = evaluate(
        model, ref, data, out=out, beta=beta, betas=beta_sweep, alpha=alpha, scores=scores, generate=generate,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, system_prompt=system_prompt,
        max_length=max_length, batch_size=batch_size, device=device, dtype=dtype,
    )
    if as_json:
        emit_json({k: v for k, v in summary.items() if k != "generation"} | (
            {"generation": {k: v for k, v in summary["generation"].items() if k != "samples"}}
            if "generation" in summary else {}))
    elif not _state["quiet"]:
        from rich.table import Table

        table = Table(title=f"curate eval: {summary['data']['pairs_evaluated']} pairs")
        for col in ("metric", "reference", "policy"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for row in summary_rows(summary):
            table.add_row(*row)
        console_out = Console()
        console_out.print(table)
        for note in summary["notes"]:
            console_out.print(f"[yellow]note:[/] {note}")
        console_out.print(f"wrote {out / 'eval.json'} and {out / 'eval.parquet'}")

# ---------------------------------------------------------------- report / run
# (issue 9: `curate report`, `curate run` go here)
@app.command("report")
@handle_errors
def report_cmd(
    run: Path = typer.Argument(..., help="Run directory (curated, train/ and eval/ directories inside it are found too)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: RUN/report.html)."),
    title: Optional[str] = typer.Option(None, help="Page title (default: the run directory's name)."),
    as_json: bool = AS_JSON,
) -> None:
    """Write one self-contained HTML report (opens offline) of everything the run computed."""
    from curate.report import write_report

    summary = write_report(run, out, title=title)
    show(summary, as_json, lambda console: console.print(
        f"wrote {summary['out']} ({summary['bytes'] / 1e6:.1f} MB): sections " + ", ".join(summary["sections"])
        + f"; {summary['plots']} plots"))


@app.command("run")
@handle_errors
def run_cmd(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. pipelines/demo.yaml or pipelines/hh-rlhf.yaml."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a recipe setting, KEY=VALUE with dots for nesting, e.g. --set dataset=PATH "
        "--set train.max_train_pairs=16. Repeatable."),
    force: bool = typer.Option(False, "--force", help="Rerun every step, even those finished with the same settings."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary (same as curate --quiet)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no progress bars; step lines go to stderr)."),
) -> None:
    """Run a recipe's steps (score, features, filter, export, train, eval, report) into one run directory.

    Steps finished earlier with the same settings are skipped; a changed step
    reruns with every step after it; a killed training run resumes from its
    last checkpoint. Ends with a summary, the headline numbers and the report path.
    """
    from curate.pipeline import render_summary, run_pipeline

    quiet = quiet or _state["quiet"]
    if quiet or as_json:  # progress bars would write into the JSON on stdout
        os.environ["CURATE_QUIET"] = "1"
    result = run_pipeline(recipe, set_ or [], quiet=quiet or as_json, force=force,
                          console=None if quiet else console)
    if as_json:
        emit_json(result)
    elif not quiet:
        render_summary(result, Console())


if __name__ == "__main__":
    app()
