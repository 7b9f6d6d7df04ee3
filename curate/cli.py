"""The `curate` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from curate.errors import CurateError

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
    _state["debug"] = debug
    _state["quiet"] = quiet
    if quiet:
        os.environ["CURATE_QUIET"] = "1"


def handle_errors(fn: Callable) -> Callable:
    """Turn CurateError (and missing files) into one red sentence and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CurateError, FileNotFoundError, FileExistsError) as exc:
            if _state["debug"]:
                raise
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- data
@data_app.command("inspect")
@handle_errors
def data_inspect(
    dataset: str = typer.Argument(..., help="Hub name (hh-rlhf, ultrafeedback, org/name) or a local file/dir."),
    subset: Optional[str] = typer.Option(None, help="Hub subset / data_dir, e.g. harmless-base."),
    split: Optional[str] = typer.Option(None, help="Split to load (default: train for hub data)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    fmt: str = typer.Option("auto", "--format", help="auto|hh|prompt-chosen-rejected|messages|columns"),
    columns: Optional[str] = typer.Option(None, help="Column mapping, e.g. prompt=question,chosen=good,rejected=bad"),
    keep_empty: bool = typer.Option(False, help="Keep pairs whose reply is empty instead of quarantining them."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows."),
    model: Optional[str] = typer.Option(None, help="Also report token lengths under this model's tokenizer."),
    system_prompt: str = typer.Option("default", help="'default' (the template's own), 'none', or a text."),
    out: Optional[Path] = typer.Option(None, help="Write pairs.parquet and quarantine.parquet here."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Count pairs, list quarantined rows with reasons, and show length statistics."""
    from curate.data.inspect import inspect_dataset, render_inspection

    summary = inspect_dataset(
        dataset, subset=subset, split=split, revision=revision, fmt=fmt, columns=columns,
        keep_empty=keep_empty, limit=limit, model=model, system_prompt=system_prompt, out=out,
    )
    if as_json:
        emit_json(summary)
    else:
        render_inspection(summary, Console())


# ---------------------------------------------------------------- score
# (issue 3/4: `curate score` goes here)

# ---------------------------------------------------------------- features
# (issue 5: `curate features` goes here)

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
        None, "--where", help="Polars expression over the columns, e.g. \"pl.col('rm_margin_std') > 2\"; optional "
        "':flip' / ':reweight=F' suffix (default drop). Repeatable."),
    weights: str = typer.Option("none", help="Write a per-pair 'weight' column: strength | madpo | none."),
    soft_labels: bool = typer.Option(False, "--soft-labels", help="Write 'label_confidence' = 1 - flip_prob (mirrored if flipped)."),
    holdout: float = typer.Option(0.0, help="Set aside this fraction of pairs (by pair_id hash) before any rule."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what each rule would do; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Drop, flip or reweight pairs by their scores, in order: CHES, strength/noise, --feature, --where.

    Every rule selects on the original scores of all pairs entering curation
    (percentages are of those pairs); a dropped pair stays dropped, a pair
    flips at most once, reweight factors multiply. The audit trail goes to
    OUT/curation.parquet.
    """
    from curate.curation import filter_run, rules_from_options

    rules = rules_from_options(
        ches_threshold=ches_threshold, ches_column=ches_column, ches_drop_top=ches_drop_top,
        ches_keep_lowest=ches_keep_lowest, min_strength=min_strength, max_margin_std=max_margin_std,
        max_flip_prob=max_flip_prob, noise_action=noise_action, features=feature or (), where=where or (),
    )
    summary = filter_run(run, rules, out, weights=weights, soft_labels=soft_labels, holdout=holdout,
                         dry_run=dry_run, force=force)
    if as_json:
        emit_json(summary)
    elif not _state["quiet"]:
        _render_filter(summary, Console())


def _render_filter(summary: dict, out: Console) -> None:
    from rich.table import Table

    table = Table(title="curate filter" + (" (dry run: nothing written)" if summary["dry_run"] else ""))
    for col in ("step", "rule", "action", "matched", "changed", "missing", "q05 / q50 / q95"):
        table.add_column(col, justify="left" if col in ("rule", "action") else "right")
    for row in summary["per_rule"]:
        q = row.get("quantiles") or {}
        qs = " / ".join(f"{q[k]:.3g}" for k in ("q05", "q50", "q95")) if q else ""
        table.add_row(str(row["step"]), row["rule"], row["action"], str(row["matched"]), str(row["changed"]),
                      str(row["missing"]), qs)
    out.print(table)
    if len(summary["per_rule"]) > 1:
        overlap = Table(title="pairs matched by both rules (by step)")
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
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write curated pairs as parquet, jsonl, a datasets dir or TRL's format, with a data card."""
    from curate.export import export_curated

    summary = export_curated(curated, fmt, out, split=split, force=force, push_to_hub=push_to_hub)
    if as_json:
        emit_json(summary)
    elif not _state["quiet"]:
        Console().print(
            f"exported {summary['pairs']} pairs ({summary['flipped']} flipped) as {fmt} to {summary['out']}: "
            + ", ".join(summary["files"])
        )

# ---------------------------------------------------------------- train
# (issue 7: `curate train` goes here)

# ---------------------------------------------------------------- eval
# (issue 8: `curate eval` goes here)

# ---------------------------------------------------------------- report / run
# (issue 9: `curate report`, `curate run` go here)


if __name__ == "__main__":
    app()
