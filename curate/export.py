"""Write a curated set for training elsewhere, with a data card beside the data.

Formats (``out`` is always a directory; ``SPLIT`` is ``train`` or ``holdout``):

- ``parquet``: ``out/SPLIT.parquet``, the pair schema (``pair_id``, ``prompt``
  as a list of {role, content}, ``chosen``, ``rejected``, ``source``, ``meta``),
  ``prompt_id``, ``flipped``, the loader's extra columns, and ``weight`` /
  ``label_confidence`` when curation wrote them;
- ``jsonl``: ``out/SPLIT.jsonl``, the same columns, one JSON object a line;
- ``hf``: ``out`` is a ``datasets`` ``save_to_disk`` directory of those columns
  (``push_to_hub`` uploads it and the card);
- ``trl``: ``out/SPLIT.parquet`` in TRL's conversational preference format:
  ``prompt`` (list of messages), ``chosen`` and ``rejected`` (each a one-message
  list ``[{"role": "assistant", "content": ...}]``), plus ``pair_id`` and, when
  available, ``weight``, ``label_confidence``, ``curate_margin`` and ``flip_prob``.
  When the run was scored with ``--scores logps`` (and ``ref_logps`` is not
  False), the rows are instead TRL's text format rendered exactly as curate
  scored them, with ``ref_chosen_logps`` / ``ref_rejected_logps``, the
  reference log-probs ``DPOTrainer(precompute_ref_log_probs=True)`` consumes
  (:mod:`curate.trl_reference` says why and how).

``curate_margin`` and ``flip_prob`` in the trl export are oriented to the exported
labels: for a pair curation flipped, the margin is negated and the flip
probability mirrored (and the reference log-probs swapped). ``curate_margin`` is
logit(``p_chosen``) when the run has ``p_chosen`` (a Bradley-Terry logit margin),
else ``rm_margin_mean``. It is not called ``margin``: TRL's RewardTrainer
subtracts a ``margin`` column inside its loss, which would shift a reward model
trained on the export by curate's own estimate.

Every export writes ``out/README.md``: the source dataset, the models and
settings of each score (from the manifest), the rules applied with counts,
flip-rate estimates and a table of the score distributions.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.curation import SECTION, TRAINING_SIGNALS, incomplete_curation, logit
from curate.data.schema import FLIPPED, GROUP_COLUMN, flipped_mask
from curate.errors import CurateError
from curate.outdir import check_target, staged_dir
from curate.rundir import CURATION, HOLDOUT, PAIRS, CurationSection, RunDir, atomic_write_bytes, write_parquet

FORMATS = ("parquet", "jsonl", "hf", "trl")
SPLITS = ("train", "holdout")
# How a score changes when chosen and rejected are swapped.
MIRRORED = ("flip_prob", "flip_prob_conservative", "p_chosen", "rm_vote_share")  # x -> 1 - x
NEGATED = ("rm_margin_mean",)  # x -> -x
CARD = "README.md"
MAX_CARD_COLUMNS = 16


# ----------------------------------------------------------------- frames
def oriented_scores(pairs: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """The scores of ``pairs`` (in their order), re-oriented to their exported labels.

    Scores are computed on the source run's labels; for a flipped pair the
    probability-like columns are mirrored and the margins negated.
    """
    if scores.width <= 1:
        return pairs.select("pair_id")
    joined = pairs.select("pair_id").join(scores, on="pair_id", how="left", maintain_order="left")
    flip = pl.Series(flipped_mask(pairs))
    fixes = [
        pl.when(flip).then(1.0 - pl.col(c)).otherwise(pl.col(c)).alias(c) for c in MIRRORED if c in joined.columns
    ] + [pl.when(flip).then(-pl.col(c)).otherwise(pl.col(c)).alias(c) for c in NEGATED if c in joined.columns]
    return joined.with_columns(fixes) if fixes else joined


LOGP_COLUMNS = ("logp_chosen", "logp_rejected")


def has_logps(scores: pl.DataFrame) -> bool:
    return all(c in scores.columns for c in LOGP_COLUMNS)


def oriented_logps(pairs: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """``pair_id``, ``logp_chosen``, ``logp_rejected`` of ``pairs``, swapped for the pairs curation flipped."""
    joined = pairs.select("pair_id").join(scores.select("pair_id", *LOGP_COLUMNS), on="pair_id", how="left",
                                          maintain_order="left")
    flip = pl.Series(flipped_mask(pairs))
    return joined.with_columns(
        logp_chosen=pl.when(flip).then(pl.col("logp_rejected")).otherwise(pl.col("logp_chosen")),
        logp_rejected=pl.when(flip).then(pl.col("logp_chosen")).otherwise(pl.col("logp_rejected")),
    )


def trl_frame(pairs: pl.DataFrame, scores: pl.DataFrame, *, manifest: dict[str, Any] | None = None,
              ref_logps: bool | None = None) -> tuple[pl.DataFrame, dict[str, str]]:
    """TRL's preference columns (+ signals); returns (frame, column notes).

    ``ref_logps`` None: reference columns (and text rows) when the run has
    ``logp_*`` scores; True: required; False: conversational rows, no reference.
    """
    if ref_logps is None:
        ref_logps = has_logps(scores)
    if ref_logps:
        frame, notes = _trl_reference_frame(pairs, scores, manifest or {})
    else:
        assistant = lambda col: pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(col)))  # noqa: E731
        frame = pairs.select("pair_id", "prompt", assistant("chosen").alias("chosen"),
                             assistant("rejected").alias("rejected"))
        notes = {
            "prompt": "the conversation before the reply: a list of {role, content} messages",
            "chosen": "the preferred reply as [{role: assistant, content}]",
            "rejected": "the other reply as [{role: assistant, content}]",
        }
    for col in TRAINING_SIGNALS:
        if col in pairs.columns:
            frame = frame.with_columns(pairs[col])
            notes[col] = _SIGNAL_NOTES[col]
    oriented = oriented_scores(pairs, scores)
    if "p_chosen" in oriented.columns:
        p = oriented["p_chosen"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        frame = frame.with_columns(curate_margin=pl.Series(logit(p)).fill_nan(None))
        notes["curate_margin"] = "logit(p_chosen): Bradley-Terry logit margin of the exported label"
    elif "rm_margin_mean" in oriented.columns:
        frame = frame.with_columns(curate_margin=oriented["rm_margin_mean"])
        notes["curate_margin"] = "rm_margin_mean: reward-ensemble mean margin of the exported label"
    if "flip_prob" in oriented.columns:
        frame = frame.with_columns(flip_prob=oriented["flip_prob"])
        notes["flip_prob"] = "estimated probability that the exported label is wrong"
    return frame, notes


def _trl_reference_frame(pairs: pl.DataFrame, scores: pl.DataFrame,
                         manifest: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, str]]:
    from curate.trl_reference import reference_rows, scoring_tokenizer

    scored = manifest.get("score", {})
    if not has_logps(scores) or not scored.get("model"):
        raise CurateError("the reference columns need a run scored with --scores logps; "
                          "score it first, or export with --no-ref-logps")
    rows = reference_rows(
        pairs, oriented_logps(pairs, scores), tokenizer=scoring_tokenizer(scored["model"]),
        system_prompt=scored.get("system_prompt", "default"),
        max_length=(scored.get("truncation") or {}).get("max_length"),
    )
    frame = pl.concat([pairs.select("pair_id"), rows], how="horizontal")
    model = scored["model"].get("name")
    notes = {
        "prompt": f"the prompt as curate rendered it for {model} (chat template, generation prompt), as text",
        "chosen": "the preferred reply followed by the end-of-turn token, as text",
        "rejected": "the other reply followed by the end-of-turn token, as text",
        "ref_chosen_logps": f"log pi_ref(chosen | prompt) under {model}, summed over the reply tokens (TRL's reference)",
        "ref_rejected_logps": f"log pi_ref(rejected | prompt) under {model} (TRL's reference)",
    }
    return frame, notes


_SIGNAL_NOTES = {
    "weight": "per-pair loss weight from curation (multiplies the pair's loss)",
    "label_confidence": "probability the exported label is right (a per-pair cDPO target)",
}


# ----------------------------------------------------------------- data card
def _scalars(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Flatten a manifest section into (key, value) pairs of short scalars and short lists."""
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict) and depth < 3:
        for key, value in obj.items():
            out += _scalars(value, f"{prefix}{key}.", depth + 1)
    elif isinstance(obj, (str, int, float, bool)) or obj is None:
        text = str(obj)
        if len(text) <= 200:
            out.append((prefix[:-1], obj))
    elif isinstance(obj, list) and len(obj) <= 8 and all(isinstance(v, (str, int, float, bool)) for v in obj):
        out.append((prefix[:-1], obj))
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|").replace("\n", " ")


def _find(manifest: dict[str, Any], words: tuple[str, ...]) -> list[tuple[str, Any]]:
    found = []
    for section, body in manifest.items():
        for key, value in _scalars(body):
            leaf = key.rsplit(".", 1)[-1].lower()
            if any(w in leaf for w in words):
                found.append((f"{section}.{key}", value))
    return found


def distribution_table(scores: pl.DataFrame, max_columns: int = MAX_CARD_COLUMNS) -> list[dict[str, Any]]:
    """count / mean / std / min / q05 / median / q95 / max of each numeric score column.

    SAE feature columns (``sae_f*``) are left out (there are many; the
    features step describes them).
    """
    rows = []
    cols = [
        c for c, t in scores.schema.items()
        if c != "pair_id" and t.is_numeric() and not c.startswith("sae_f")
    ]
    for col in cols[:max_columns]:
        arr = scores[col].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
        row: dict[str, Any] = {"column": col, "n": int(arr.size)}
        if arr.size:
            q = np.quantile(arr, [0.05, 0.5, 0.95])
            row |= {
                "mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()),
                "q05": float(q[0]), "median": float(q[1]), "q95": float(q[2]), "max": float(arr.max()),
            }
        rows.append(row)
    return rows


def data_card(*, manifest: dict[str, Any], pairs: pl.DataFrame, scores: pl.DataFrame, fmt: str, split: str,
              files: list[str], column_notes: dict[str, str]) -> str:
    """The README.md text written beside an export (pure: no I/O)."""
    curation = CurationSection.from_dict(manifest[SECTION]) if SECTION in manifest else None
    n = pairs.height
    lines = [
        "---",
        "tags: [preference-data, dpo, curate]",
        "---",
        "",
        f"# Curated preference data ({split})",
        "",
        f"{n} pairs (prompt, chosen, rejected), exported by `curate export --format {fmt}` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Files: {', '.join(f'`{f}`' for f in files)}.",
        "",
        "## Source",
        "",
    ]
    sources = _find({k: v for k, v in manifest.items() if k != SECTION}, ("dataset", "format", "subset", "split", "revision", "data_files"))
    lines += [f"- {k}: `{_fmt(v)}`" for k, v in sources] or ["- (the run's manifest names no source dataset)"]
    if curation and curation.run:
        lines.append(f"- curated from run directory `{curation.run}`")
    lines += ["", "## Scores: models and settings", ""]
    sections = [k for k in manifest if k != SECTION]
    if not sections:
        lines.append("(the run's manifest records no scoring step)")
    for section in sections:
        lines.append(f"### {section}")
        lines.append("")
        lines += [f"- {k}: `{_fmt(v)}`" for k, v in _scalars(manifest[section])[:30]] or ["- (no settings recorded)"]
        lines.append("")

    lines += ["## Curation", ""]
    if not curation:
        lines.append("These pairs were not curated (no `curation` section in the manifest).")
    else:
        counts, signals = curation.counts, curation.signals
        lines.append(
            "Rules were applied in this order; each selects on the original scores of every pair entering "
            "curation, `changed` counts the pairs it actually changed."
        )
        lines += ["", "| step | rule | action | matched | changed | missing |", "|---|---|---|---|---|---|"]
        for row in curation.per_rule:
            lines.append(
                f"| {row['step']} | {_fmt(row['rule'])} | {row['action']} | {row['matched']} | {row['changed']} | {row['missing']} |"
            )
        lines += [
            "",
            "Counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
            f"Per-pair signals: weights `{signals.get('weights', 'none')}`, "
            f"soft labels `{signals.get('soft_labels', False)}`.",
        ]
        if curation.holdout_fraction:
            lines.append(
                f"A holdout of {curation.holdout_fraction:g} (by pair_id hash, stable across runs) was set aside "
                "before any rule and is not in the training split."
            )
        for warning in curation.warnings:
            lines.append(f"- warning: {warning}")
        lines += ["", "The audit trail (one row per pair and rule, with the values that triggered it) is "
                  f"`{CURATION}` in the curated run directory."]

    lines += ["", "## Flip-rate estimates", ""]
    flip_estimates = _find(manifest, ("flip_rate", "epsilon", "noise_rate", "eps_hat")) + [
        (f"{section}.{key}", value)
        for section, body in manifest.items() if "noise" in section
        for key, value in _scalars(body)
        if key.rsplit(".", 1)[-1] in ("rate", "eps") and isinstance(value, (int, float))
    ]
    lines += [f"- {k}: {_fmt(v)}" for k, v in flip_estimates]
    flipped = int(flipped_mask(pairs).sum())
    lines.append(f"- pairs flipped by curation in this export: {flipped} of {n}" + (f" ({flipped / n:.1%})" if n else ""))
    if "flip_prob" in scores.columns and n:
        fp = oriented_scores(pairs, scores)["flip_prob"].cast(pl.Float64).drop_nulls().drop_nans()
        if fp.len():
            lines.append(
                f"- mean estimated flip probability of the exported labels: {fp.mean():.4f} "
                f"(expected mislabelled pairs: {fp.sum():.1f} of {fp.len()} scored)"
            )

    lines += ["", "## Score distributions", ""]
    lines.append("Over the exported pairs, in the source run's orientation (before any flip).")
    lines.append("")
    table = distribution_table(pairs.select("pair_id").join(scores, on="pair_id", how="left")) if scores.width > 1 else []
    if table:
        keys = ["n", "mean", "std", "min", "q05", "median", "q95", "max"]
        lines += ["| column | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {r['column']} | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in table]
        n_sae = sum(c.startswith("sae_f") for c in scores.columns)
        if n_sae:
            lines += ["", f"({n_sae} SAE feature columns `sae_f*` not shown.)"]
    else:
        lines.append("(no scores)")

    lines += ["", "## Columns", ""]
    lines += [f"- `{c}`: {note}" for c, note in column_notes.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- export
_PAIR_NOTES = {
    "pair_id": "stable id of the prompt and the unordered pair of replies (unchanged by a flip)",
    "prompt": "the conversation before the reply: a list of {role, content} messages",
    "chosen": "the preferred reply (text)",
    "rejected": "the other reply (text)",
    "source": "where the row came from in the source data",
    "meta": "JSON object; a flipped pair's has flipped_by: the rule",
    GROUP_COLUMN: "stable id of the prompt (or the response set): the group a train/test split keeps together",
    FLIPPED: "true where curation swapped chosen and rejected (scores.parquet keeps the source orientation)",
}


EXPORT_OWNED = (CARD, "train.*", "holdout.*", "data-*.arrow", "dataset_info.json", "state.json", ".*.tmp")


def export_curated(curated: str | Path, fmt: str, out: str | Path, *, split: str = "train", force: bool = False,
                   push_to_hub: str | None = None, ref_logps: bool | None = None) -> dict[str, Any]:
    """Export a curated run directory (``curate filter --out``) and write its data card; returns a summary.

    ``ref_logps`` (trl format only): None adds TRL's reference columns when the
    run has log-prob scores, True requires them, False leaves them out.
    """
    if fmt not in FORMATS:
        raise CurateError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if split not in SPLITS:
        raise CurateError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    run = RunDir(curated)
    problem = incomplete_curation(run.path)
    if problem:
        raise CurateError(f"{run.path} is an incomplete curated directory ({problem}): rerun `curate filter` with --force")
    source = run / (PAIRS if split == "train" else HOLDOUT)
    if not source.exists():
        hint = "run `curate filter RUN --out DIR` first" if split == "train" else "run `curate filter` with --holdout"
        raise CurateError(f"{run.path} has no {source.name}: {hint}")
    out = Path(out)
    if out.resolve() == run.path.resolve():
        raise CurateError("--out must not be the curated directory itself: choose a new directory")
    check_target(out, force=force, owned=EXPORT_OWNED, step="curate export")

    pairs = pl.read_parquet(source)
    scores = run.scores()
    manifest = run.manifest()
    data = pairs  # the pair schema, prompt_id, flipped, the loader's extra columns, curation's signals
    notes = {c: _PAIR_NOTES.get(c) or _SIGNAL_NOTES.get(c) or "a column of the source data, kept by the loader "
             "(`--columns keep=`, or the source format's own scores); side-named ones follow the exported labels"
             for c in pairs.columns}

    extra: dict[str, Any] = {}
    with staged_dir(out) as stage:
        if fmt == "trl":
            data, notes = trl_frame(pairs, scores, manifest=manifest, ref_logps=ref_logps)
            notes = {"pair_id": _PAIR_NOTES["pair_id"]} | notes
            if "ref_chosen_logps" in data.columns:
                extra["trl_max_length_needed"] = _longest_sequence(pairs, scores)
            files = [f"{split}.parquet"]
            write_parquet(data, stage / files[0])
        elif fmt == "parquet":
            files = [f"{split}.parquet"]
            write_parquet(data, stage / files[0])
        elif fmt == "jsonl":
            files = [f"{split}.jsonl"]
            atomic_write_bytes(stage / files[0], data.write_ndjson().encode("utf-8"))
        else:
            files = _save_hf(data, stage)
        card = data_card(manifest=manifest, pairs=pairs, scores=scores, fmt=fmt, split=split, files=files,
                         column_notes=notes)
        atomic_write_bytes(stage / CARD, card.encode("utf-8"))  # the card last: a directory with it is complete
    if push_to_hub:
        _push_to_hub(data, out / CARD, push_to_hub, split)
    return {
        "curated": str(run.path), "format": fmt, "split": split, "out": str(out), "files": [*files, CARD],
        "pairs": data.height, "columns": data.columns, "flipped": int(flipped_mask(pairs).sum()),
        "pushed_to": push_to_hub, **extra,
    }


def _longest_sequence(pairs: pl.DataFrame, scores: pl.DataFrame) -> int | None:
    """Longest prompt + reply (tokens) curate scored among ``pairs``: the DPOConfig.max_length TRL needs."""
    needed = ("n_tokens_prompt", "n_tokens_chosen", "n_tokens_rejected")
    if not all(c in scores.columns for c in needed):
        return None
    lengths = pairs.select("pair_id").join(scores.select("pair_id", *needed), on="pair_id", how="left").select(
        pl.col("n_tokens_prompt") + pl.max_horizontal("n_tokens_chosen", "n_tokens_rejected"))
    return int(lengths.to_series().max())


def _save_hf(data: pl.DataFrame, out: Path) -> list[str]:
    import datasets

    datasets.Dataset.from_polars(data).save_to_disk(str(out))
    return sorted(p.name for p in out.iterdir() if p.name != CARD)


def _push_to_hub(data: pl.DataFrame, card: Path, repo: str, split: str) -> None:
    """Upload the export and its card to a hub dataset repo (needs network and a token)."""
    import datasets

    try:
        datasets.Dataset.from_polars(data).push_to_hub(repo, split=split)
        from huggingface_hub import HfApi

        HfApi().upload_file(path_or_fileobj=str(card), path_in_repo=CARD, repo_id=repo, repo_type="dataset")
    except Exception as exc:  # network, auth, permissions: one sentence, the local export is kept
        raise CurateError(f"push to {repo} failed ({type(exc).__name__}: {exc}); the local export is complete") from None


# `from curate import export` gives this module; calling it calls export_curated().
from curate import callable_module  # noqa: E402

callable_module(__name__, "export_curated")
