"""`curate data inspect` and `curate data overlap`: what is in a dataset, before any model runs."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from curate.data.load import LoadResult, load_pairs
from curate.data.schema import RESERVED_COLUMNS
from curate.errors import CurateError
from curate.rundir import RunDir, write_json

NEAR_DUPLICATE_RATIO = 0.9


def prompt_key(pairs: pl.DataFrame) -> pl.Series:
    """A hash of each pair's prompt (for grouping pairs that share it)."""
    return pairs.select(pl.col("prompt").cast(pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})))
                        .list.eval(pl.element().struct.field("role") + "\x1f" + pl.element().struct.field("content"))
                        .list.join("\x1e").hash()).to_series()


def near_duplicates(pairs: pl.DataFrame, ratio: float = NEAR_DUPLICATE_RATIO) -> pl.DataFrame:
    """Pairs with the same prompt whose two replies are each nearly identical (difflib ratio >= ``ratio``)."""
    keyed = pairs.select("pair_id", "chosen", "rejected").with_columns(prompt_key=prompt_key(pairs))
    found = []
    for group in keyed.group_by("prompt_key"):
        rows = group[1].to_dicts()
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a, b = rows[i], rows[j]
                replies_a, replies_b = sorted((a["chosen"], a["rejected"])), sorted((b["chosen"], b["rejected"]))
                sims = [difflib.SequenceMatcher(None, x, y).ratio() for x, y in zip(replies_a, replies_b)]
                if min(sims) >= ratio:
                    found.append({"pair_id": a["pair_id"], "other_pair_id": b["pair_id"], "similarity": min(sims)})
    return pl.DataFrame(found, schema={"pair_id": pl.Utf8, "other_pair_id": pl.Utf8, "similarity": pl.Float64})


def similar_replies(pairs: pl.DataFrame, ratio: float = NEAR_DUPLICATE_RATIO) -> int:
    """How many pairs have chosen and rejected replies that differ by only a few characters."""
    return sum(difflib.SequenceMatcher(None, c, r).ratio() >= ratio
               for c, r in zip(pairs["chosen"].to_list(), pairs["rejected"].to_list()))


def overlap(left: pl.DataFrame, right: pl.DataFrame) -> dict[str, int]:
    """How many pairs / prompts of ``left`` also occur in ``right`` (e.g. train vs test)."""
    same_pairs = left.join(right.select("pair_id"), on="pair_id", how="semi").height
    lk, rk = set(prompt_key(left).to_list()), set(prompt_key(right).to_list())
    return {"left_pairs": left.height, "right_pairs": right.height, "shared_pairs": same_pairs,
            "shared_prompts": len(lk & rk)}


def _describe(values: pl.Series) -> dict[str, float]:
    if values.len() == 0:
        return {}
    return {"mean": float(values.mean()), "p50": float(values.quantile(0.5)), "p95": float(values.quantile(0.95)),
            "max": float(values.max())}


def length_stats(pairs: pl.DataFrame) -> dict[str, dict[str, float]]:
    prompt_chars = pairs.select(
        pl.col("prompt").list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
    ).to_series()
    return {
        "prompt_chars": _describe(prompt_chars),
        "chosen_chars": _describe(pairs["chosen"].str.len_chars()),
        "rejected_chars": _describe(pairs["rejected"].str.len_chars()),
    }


def replies_over(pairs_chosen: list[int], pairs_rejected: list[int], max_length: int) -> int:
    """Pairs whose longer reply alone leaves no room for a prompt token (scoring skips them)."""
    return sum(max(c, r) + 1 > max_length for c, r in zip(pairs_chosen, pairs_rejected))


def token_stats(pairs: pl.DataFrame, model: str, system_prompt: str = "default",
                max_length: int | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from curate.data.chat import ChatEncoder
    from curate.models import SMOLLM2, bundled_tokenizer_dir

    source = bundled_tokenizer_dir() if model.lower() in (SMOLLM2, "smollm2") else model
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(source), system_prompt=system_prompt)
    prompt_tokens = [len(encoder.prompt_ids(p)) for p in pairs["prompt"].to_list()]
    chosen = [len(encoder.reply_ids(t)) for t in pairs["chosen"].to_list()]
    rejected = [len(encoder.reply_ids(t)) for t in pairs["rejected"].to_list()]
    stats: dict[str, Any] = {"prompt_tokens": _describe(pl.Series(prompt_tokens)),
                             "chosen_tokens": _describe(pl.Series(chosen)), "rejected_tokens": _describe(pl.Series(rejected))}
    if max_length is not None:
        stats["over_max_length"] = {"max_length": max_length, "pairs": replies_over(chosen, rejected, max_length)}
    return stats


def summarise(result: LoadResult) -> dict[str, Any]:
    quarantine = result.quarantine
    reasons = (quarantine.group_by("reason").len().sort("reason").rows() if quarantine.height else [])
    near = near_duplicates(result.pairs)
    return {
        "dataset": result.info.get("dataset"),
        "format": result.info.get("format"),
        "label_column": result.info.get("label_column"),
        "strategy": result.info.get("strategy"),
        "columns": result.info.get("columns"),
        "extra_columns": {name: str(dtype) for name, dtype in result.pairs.schema.items()
                          if name not in RESERVED_COLUMNS},
        "rows": result.info.get("rows"),
        "pairs": result.pairs.height,
        "quarantined": quarantine.height,
        "quarantine_reasons": {reason: n for reason, n in reasons},
        "quarantined_rows": quarantine.select("source", "reason", "detail").to_dicts(),
        "near_duplicates": near.height,
        "similar_reply_pairs": similar_replies(result.pairs),
        "near_duplicate_examples": near.head(10).to_dicts(),
        "lengths": length_stats(result.pairs),
    }


def inspect_dataset(dataset: str, *, model: str | None = None, system_prompt: str = "default",
                    max_length: int | None = None, out: Path | None = None, **load_kwargs: Any) -> dict[str, Any]:
    """Load and validate ``dataset``; return counts, quarantine reasons and length statistics.

    With ``model`` and ``max_length``, also count the pairs whose longer reply alone does not
    fit ``max_length`` tokens (``curate score --max-length`` skips those).
    """
    if max_length is not None and (model is None or max_length < 2):
        raise CurateError("--max-length needs --model (token counts) and at least 2 tokens")
    result = load_pairs(dataset, **load_kwargs)
    summary = summarise(result)
    if model:
        stats = token_stats(result.pairs, model, system_prompt, max_length)
        over = stats.pop("over_max_length", None)
        summary["lengths"].update(stats)
        if over is not None:
            summary["over_max_length"] = over
    if out is not None:
        run = RunDir(out)
        run.write_pairs(result.pairs, result.quarantine)
        run.update_manifest("load", {"dataset": dataset, **result.info})
        write_json(summary, run / "inspect.json")
        summary["written"] = str(out)
    return summary


def render_inspection(summary: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{summary['dataset']}[/] (format {summary['format']}): "
                  f"{summary['rows']} rows -> [green]{summary['pairs']} pairs[/], "
                  f"[yellow]{summary['quarantined']} quarantined[/]")
    if summary.get("label_column"):
        console.print(f"chosen side from label column {summary['label_column']}")
    if summary.get("strategy"):
        console.print(f"response sets paired by strategy {summary['strategy']}")
    if summary.get("extra_columns"):
        console.print("extra columns kept: " + ", ".join(f"{k} ({v})" for k, v in summary["extra_columns"].items()))
    console.print(f"{summary['near_duplicates']} near-duplicate pairs (same prompt, nearly the same two replies); "
                  f"{summary['similar_reply_pairs']} pairs whose chosen and rejected replies are nearly identical")
    over = summary.get("over_max_length")
    if over and over["pairs"]:
        every = over["pairs"] == summary["pairs"]
        console.print(f"[{'bold red' if every else 'yellow'}]{over['pairs']} of {summary['pairs']} pairs have a reply "
                      f"longer than --max-length {over['max_length']} tokens[/]"
                      + (": curate score would skip every pair; raise --max-length" if every else
                         " (curate score skips them)"))
    if summary["quarantined_rows"]:
        table = Table(title="Quarantined rows")
        table.add_column("source", overflow="fold", no_wrap=False, min_width=20)
        table.add_column("reason", no_wrap=True)
        table.add_column("detail")
        for row in summary["quarantined_rows"][:50]:
            table.add_row(row["source"], row["reason"], row["detail"])
        console.print(table)
        if len(summary["quarantined_rows"]) > 50:
            console.print(f"... and {len(summary['quarantined_rows']) - 50} more (see --out / --json)")
        console.print("reasons: " + ", ".join(f"{k}={v}" for k, v in summary["quarantine_reasons"].items()))
    lengths = Table(title="Lengths")
    for col in ("field", "mean", "p50", "p95", "max"):
        lengths.add_column(col, justify="right" if col != "field" else "left")
    for name, stats in summary["lengths"].items():
        if stats:
            lengths.add_row(name, *(f"{stats[k]:.0f}" for k in ("mean", "p50", "p95", "max")))
    console.print(lengths)
    if summary.get("written"):
        console.print(f"wrote pairs.parquet and quarantine.parquet to {summary['written']}")
