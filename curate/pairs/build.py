"""`curate pairs`: response sets in, a run directory of chosen pairs out.

Writes ``RUN/pairs.parquet`` (the pair schema plus ``prompt_id``,
``score_chosen``, ``score_rejected``, ``rating_margin``), ``RUN/quarantine.parquet``
(records and responses refused, with the reason), ``RUN/manifest.json``
(section ``pairs``) and, when a model ran, ``RUN/scores.parquet`` with the
``ln_ches`` and ``ches`` of each chosen pair and its reply token counts. The
run is what `curate score`, `filter`, `train` read.

A model runs for the CHES strategies and whenever ``model`` is given: each
response is encoded once (its prompt cut from the left when prompt + reply
exceed ``max_length``; a reply that alone does not fit is quarantined as
``reply_over_context``) and pooled once (:func:`curate.pairs.pooling.pool_response_sets`),
so each reply's tokens run through the model once, whatever the strategy: a
set of k responses costs k decoder sequences (``prefix_sharing=False``) or
one prompt pass and k reply passes (``True``, the default on CPU).

Resuming: the sets are pooled in fixed shards of ``shard_size`` prompts, each
written atomically to ``RUN/shards/pool-NNNNN.npz``; a rerun with the same data,
model and encoding settings skips finished shards (``RUN/shards/pool-plan.json``
records them; other settings start the shards afresh).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from curate.data.response_sets import read_response_sets
from curate.data.schema import GROUP_COLUMN, quarantine_frame
from curate.env import progress_bar
from curate.errors import CurateError
from curate.fsutil import remove_inside
from curate.pairs.pooling import pool_response_sets
from curate.pairs.strategies import CHES_STRATEGIES, DEFAULT_STRATEGY, STRATEGIES, select_pairs
from curate.rundir import SCORES, SHARDS, RunDir, atomic_write_bytes, fresh_shards, write_parquet
from curate.scores.ches import ches_matrix
from curate.scores.engine import resolve_prefix_sharing

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SHARD_SIZE = 256  # prompts per resumable shard
PLAN = "pool-plan.json"


def _shard_path(run: RunDir, k: int) -> Path:
    return run / SHARDS / f"pool-{k:05d}.npz"


def _sets_digest(sets: pl.DataFrame) -> str:
    text = "\n".join(f"{p}\t{r}\t{h}" for p, r, h in zip(
        sets[GROUP_COLUMN], sets["response_index"], sets["response"].map_elements(
            lambda s: hashlib.sha256(s.encode()).hexdigest()[:12], return_dtype=pl.Utf8)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode(encoder, sets: pl.DataFrame) -> tuple[list, list[dict[str, Any]], int]:
    """(prompt ids, reply ids) per response (None where refused), the quarantine rows of refused ones,
    and how many prompts were cut to fit."""
    from curate.data.chat import ReplyTooLong

    encoded, refused, cut = [], [], 0
    for row in sets.iter_rows(named=True):
        try:
            enc = encoder.encode(row["prompt"], row["response"])
            encoded.append((enc.prompt_ids, enc.reply_ids))
            cut += enc.prompt_truncated > 0
        except ReplyTooLong as exc:
            encoded.append(None)
            refused.append(("reply_over_context", str(exc), row))
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template refusing this conversation
            encoded.append(None)
            refused.append(("cannot_encode", f"{type(exc).__name__}: {exc}", row))
    rows = [{"source": row["source"], "reason": reason, "detail": detail,
             "raw": json.dumps({"prompt": row["prompt"], "response": row["response"]}, ensure_ascii=False)[:2000]}
            for reason, detail, row in refused]
    return encoded, rows, cut


def _pool_sets(run: RunDir, lm, encoded: list, sets: pl.DataFrame, shard_size: int, token_budget: int | None,
               prefix_sharing: bool | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Pooled sums ``[n, d]`` per row of ``sets`` (NaN rows for refused responses), by resumable shards."""
    prompt_ids = sets[GROUP_COLUMN].unique(maintain_order=True).to_list()
    shard_of = {pid: i // shard_size for i, pid in enumerate(prompt_ids)}
    row_shard = np.array([shard_of[p] for p in sets[GROUP_COLUMN]])
    n_shards = -(-len(prompt_ids) // shard_size)
    sums: np.ndarray | None = None
    pooled_now = resumed = 0
    progress, task = progress_bar("pooling responses", len(encoded))
    with progress:
        for k in range(n_shards):
            sums, pooled, was_resumed = _pool_shard(run, lm, encoded, sets, np.flatnonzero(row_shard == k), k, sums,
                                                    token_budget, prefix_sharing)
            pooled_now += pooled
            resumed += was_resumed
            progress.update(task, advance=int((row_shard == k).sum()))
    return sums, {"n_shards": n_shards, "shards_resumed": resumed, "responses_pooled_this_session": pooled_now}


def _pool_shard(run: RunDir, lm, encoded: list, sets: pl.DataFrame, rows: np.ndarray, k: int,
                sums: np.ndarray | None, token_budget: int | None, prefix_sharing: bool | None):
    """Pool (or read back) shard ``k`` into ``sums``; returns (sums, responses pooled now, 1 if resumed)."""
    path = _shard_path(run, k)
    pooled_now = resumed = 0
    if path.exists():
        block = np.load(path)["sums"]
        resumed = 1
    else:
        todo = [i for i in rows if encoded[i] is not None]
        block = np.full((len(rows), lm.model.config.hidden_size), np.nan, dtype=np.float32)
        if todo:
            with lm.compute():
                pooled = pool_response_sets(lm.model, [encoded[i] for i in todo], token_budget=token_budget,
                                            prefix_sharing=prefix_sharing).numpy()
            position = {row: n for n, row in enumerate(rows)}
            block[[position[i] for i in todo]] = pooled
            pooled_now = len(todo)
        buffer = io.BytesIO()
        np.savez(buffer, sums=block)
        atomic_write_bytes(path, buffer.getvalue())
    if sums is None:
        sums = np.full((sets.height, block.shape[1]), np.nan, dtype=np.float32)
    sums[rows] = block
    return sums, pooled_now, resumed


def ches_matrices(sets: pl.DataFrame, sums: np.ndarray, n_tokens: np.ndarray) -> tuple[dict, dict]:
    """Per prompt_id, the CHES and LN-CHES matrices of its responses in ``response_index`` order."""
    ches_by, ln_by = {}, {}
    frame = sets.with_row_index("_row")
    for (prompt_id,), group in frame.group_by(GROUP_COLUMN, maintain_order=True):
        rows = group.sort("response_index")["_row"].to_numpy()
        block = torch.from_numpy(sums[rows])
        ches_by[prompt_id] = ches_matrix(block).numpy()
        ln_by[prompt_id] = ches_matrix(block.double() / torch.from_numpy(n_tokens[rows]).double()[:, None]).numpy()
    return ches_by, ln_by


def build_pairs(data, *, out: str | os.PathLike[str], strategy: str = DEFAULT_STRATEGY, model: str | None = None,
                min_margin: float = 0.0, max_pairs_per_prompt: int | None = None, seed: int = 0, fmt: str = "auto",
                columns=None, rating: str = "mean", limit: int | None = None, device: str = "auto",
                dtype: str = "auto", max_length: int | None = None, system_prompt: str = "default",
                token_budget: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, revision: str | None = None,
                prefix_sharing: bool | None = None, lm=None) -> pl.DataFrame:
    """Build pairs from response sets into the run directory ``out``; returns the pair table.

    ``data``: a response-set file, hub name or records
    (:func:`curate.data.response_sets.read_response_sets`). ``strategy``: see
    :mod:`curate.pairs.strategies`. ``model`` (default for CHES strategies:
    the bundled SmolLM2) or a loaded ``lm`` computes LN-CHES; ``device``,
    ``dtype``, ``max_length``, ``system_prompt``, ``revision``, ``prefix_sharing``
    (:mod:`curate.pairs.pooling`) as in `curate score`.
    """
    if strategy not in STRATEGIES:
        raise CurateError(f"unknown --strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if shard_size < 1:
        raise CurateError("--shard-size must be at least 1")
    started = time.time()
    run = RunDir(out)
    sets, quarantine, data_info = read_response_sets(data, fmt=fmt, columns=columns, limit=limit, rating=rating)
    if sets.height == 0:
        raise CurateError(f"{data_info['dataset']} has no valid responses (see {run / 'quarantine.parquet'})")
    manifest: dict[str, Any] = {"data": data_info, "strategy": strategy, "min_margin": min_margin,
                                "max_pairs_per_prompt": max_pairs_per_prompt, "seed": seed}
    ln_by = ches_by = None
    n_tokens = None
    if strategy in CHES_STRATEGIES or model is not None or lm is not None:
        ln_by, ches_by, n_tokens, sets, refused, model_info = _run_model(
            run, sets, lm=lm, model=model or DEFAULT_MODEL, device=device, dtype=dtype, revision=revision,
            max_length=max_length, system_prompt=system_prompt, token_budget=token_budget, shard_size=shard_size,
            prefix_sharing=prefix_sharing)
        quarantine = pl.concat([quarantine, quarantine_frame(refused)])
        manifest.update(model_info)
    pairs = select_pairs(sets, strategy, min_margin=min_margin, max_pairs_per_prompt=max_pairs_per_prompt, seed=seed,
                         ln_ches=ln_by)
    run.write_pairs(pairs.drop("ln_ches", strict=False), quarantine)
    if ln_by is not None:
        write_parquet(_pair_scores(pairs, sets, ches_by, n_tokens), run / SCORES)
    elif (run / SCORES).exists():
        remove_inside(run / SCORES, run.path)  # scores of an earlier pairing would not match these pairs
    n_sets = sets[GROUP_COLUMN].n_unique()
    manifest.update({"n_response_sets": n_sets, "n_responses": sets.height, "n_pairs": pairs.height,
                     "sets_without_a_valid_pair": n_sets - pairs[GROUP_COLUMN].n_unique(),
                     "n_quarantined": quarantine.height, "seconds_total": round(time.time() - started, 3)})
    run.update_manifest("pairs", manifest)
    return pairs


def _run_model(run: RunDir, sets: pl.DataFrame, *, lm, model, device, dtype, revision, max_length, system_prompt,
               token_budget, shard_size, prefix_sharing):
    from curate.data.chat import ChatEncoder
    from curate.models import load_causal_lm

    t0 = time.time()
    if lm is None:
        lm = load_causal_lm(model, device=device, dtype=dtype, revision=revision)
    load_seconds = time.time() - t0
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if max_length is not None and context is not None and max_length > context:
        raise CurateError(f"--max-length {max_length} exceeds the model's context of {context} tokens")
    encoder = ChatEncoder(lm.tokenizer, system_prompt=system_prompt, max_length=max_length or context)
    encoded, refused, n_cut = _encode(encoder, sets)
    plan = {"sets": _sets_digest(sets), "model": lm.info, "dtype": lm.precision, "max_length": max_length or context,
            "system_prompt": system_prompt, "shard_size": shard_size}
    fresh_shards(run / SHARDS, plan, plan_file=PLAN, pattern="pool-*.npz")
    t1 = time.time()
    prefix_sharing = resolve_prefix_sharing(lm.model, prefix_sharing)
    sums, shard_info = _pool_sets(run, lm, encoded, sets, shard_size, token_budget, prefix_sharing)
    pool_seconds = time.time() - t1
    kept = np.array([e is not None for e in encoded])
    n_tokens = np.array([len(e[1]) for e in encoded if e is not None], dtype=np.int64)
    sets, sums = sets.filter(pl.Series(kept)), sums[kept]
    ches_by, ln_by = ches_matrices(sets, sums, n_tokens)
    info = {"model": lm.info, "device": str(lm.device), "dtype": lm.precision,
            "max_length": max_length or context, "system_prompt": system_prompt,
            "pool": {**shard_info, "shard_size": shard_size, "prefix_sharing": prefix_sharing},
            "truncation": {"rule": "each response on its own: keep the reply whole, cut its prompt from the left",
                           "responses_with_prompt_cut": int(n_cut),
                           "responses_quarantined": len(refused)},
            "timings": {"load_model_s": round(load_seconds, 3), "pool_s": round(pool_seconds, 3),
                        "responses_per_s_this_session": round(
                            shard_info["responses_pooled_this_session"] / max(pool_seconds, 1e-9), 3)}}
    return ln_by, ches_by, n_tokens, sets.with_columns(pl.Series("n_tokens", n_tokens)), refused, info


def _pair_scores(pairs: pl.DataFrame, sets: pl.DataFrame, ches_by: dict, n_tokens: np.ndarray) -> pl.DataFrame:
    """scores.parquet rows of the chosen pairs: ln_ches, ches, reply token counts."""
    meta = [json.loads(m) for m in pairs["meta"]]
    position = {}
    for (prompt_id,), group in sets.group_by(GROUP_COLUMN, maintain_order=True):
        for pos, (index, n) in enumerate(group.sort("response_index").select("response_index", "n_tokens").rows()):
            position[(prompt_id, index)] = (pos, n)
    chosen = [position[(p, m["chosen_index"])] for p, m in zip(pairs[GROUP_COLUMN], meta)]
    rejected = [position[(p, m["rejected_index"])] for p, m in zip(pairs[GROUP_COLUMN], meta)]
    return pl.DataFrame({
        "pair_id": pairs["pair_id"],
        "ln_ches": pairs["ln_ches"],
        "ches": [float(ches_by[p][c[0], r[0]]) for p, c, r in zip(pairs[GROUP_COLUMN], chosen, rejected)],
        "n_tokens_chosen": [c[1] for c in chosen],
        "n_tokens_rejected": [r[1] for r in rejected],
    })


# ------------------------------------------------------------------ summaries (CLI)
def pairs_summary(run_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the last `curate pairs` wrote to ``run_path``: counts, settings, LN-CHES of the chosen pairs."""
    run = RunDir(run_path)
    manifest = run.manifest().get("pairs", {})
    summary = {key: manifest.get(key) for key in ("strategy", "n_response_sets", "n_responses", "n_pairs",
                                                  "sets_without_a_valid_pair", "n_quarantined", "timings")}
    summary.update({"run": str(run.path), "model": (manifest.get("model") or {}).get("name"),
                    "format": (manifest.get("data") or {}).get("format")})
    scores = run.scores()
    if "ln_ches" in scores.columns and scores.height:
        summary["ln_ches"] = {q: float(scores["ln_ches"].quantile(float(q))) for q in ("0.05", "0.5", "0.95")}
    return summary


def render_pairs_summary(summary: dict[str, Any], console) -> None:
    console.print(
        f"[bold]{summary['run']}[/]: {summary['n_pairs']} pairs by {summary['strategy']} from "
        f"{summary['n_response_sets']} response sets ({summary['n_responses']} responses, {summary['format']}); "
        f"{summary['sets_without_a_valid_pair']} sets had no valid pair, {summary['n_quarantined']} rows in quarantine"
        + (f"; model {summary['model']}" if summary.get("model") else ""))
    if summary.get("ln_ches"):
        q = summary["ln_ches"]
        console.print(f"LN-CHES of the chosen pairs: 5% {q['0.05']:.3f}, median {q['0.5']:.3f}, 95% {q['0.95']:.3f}")
