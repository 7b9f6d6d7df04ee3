"""`curate score`: run a causal LM over preference pairs and store per-pair signals.

Columns written to ``RUN/scores.parquet`` (one row per pair_id):

- ``ches``, ``ln_ches``: CHES and length-normalised CHES (methods.md section 1);
- ``hidden_inner``: <h+, h-> of the last-layer states that predict each reply's
  end-of-turn token (the paper's last-hidden-embedding baseline);
- ``edit_distance_norm``: token Levenshtein distance of the two replies
  (end-of-turn token excluded) over the longer length;
- ``logp_chosen``, ``logp_rejected``: log pi(y|x) summed over reply tokens,
  end-of-turn token included; ``logp_mean_*`` the per-token means;
- ``n_tokens_prompt`` (after truncation), ``n_tokens_chosen``,
  ``n_tokens_rejected`` (end-of-turn token included), ``n_prompt_tokens_cut``.

``RUN/pooled.npz`` keeps the mean-pooled reply states of the engine's probe
layers (:func:`curate.lm.probe_layers`, about half to four fifths of the way
up, side by side; fp32; the reward heads' and SAE features; the last layer for
one-block models): arrays ``pair_id`` [N], ``mean_chosen`` [N, k * d],
``mean_rejected`` [N, k * d], in the row order of ``pair_id``, and ``layers``
[k], their ``hidden_states`` indices. The manifest's ``pooled_layer`` names
the middle one (two thirds of the way up).

Truncation rule: replies are kept whole; the prompt is cut from the left until
prompt + the longer reply fit ``max_length`` (default: the model's context),
the same cut for both replies so they share one prompt. A pair whose longer
reply alone does not fit is moved to quarantine (reason ``reply_over_context``),
and so is a pair the tokenizer or chat template cannot encode (``cannot_encode``).

Resuming: pairs are processed in fixed shards of ``shard_size`` pairs, each
written atomically to ``RUN/shards/score-NNNNN.parquet``. A rerun with the same
settings skips finished shards; ``RUN/shards/plan.json`` records the settings,
and different settings start the shards afresh.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import polars as pl
import torch

from curate.env import progress_bar
from curate.errors import CurateError
from curate.rundir import (POOLED, SHARDS, NoiseSection, RunDir, ScoreSection, dataset_fingerprint, fresh_shards, is_run_dir,
                           replacing, resolve_pairs, write_parquet)
from curate.scores.ches import ches, hidden_inner, ln_ches, normalized_edit_distance
from curate.lm import EncodedPair, encode_pairs, probe_layer, probe_layers
from curate.scores.engine import resolve_prefix_sharing, score_encoded

MODEL_SCORES = ("ches", "logps")
DELEGATED_SCORES = ("reward", "noise")
POOLED_COLUMNS = ["pooled_chosen", "pooled_rejected"]
DEFAULT_SHARD_SIZE = 512
ENGINES = ("local", "ray")


def parse_scores(scores: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``"ches,logps"`` or a sequence to a tuple; unknown names are a CurateError."""
    names = [s.strip() for s in (scores.split(",") if isinstance(scores, str) else scores) if s.strip()]
    unknown = sorted(set(names) - set(MODEL_SCORES) - set(DELEGATED_SCORES))
    if unknown or not names:
        raise CurateError(
            f"unknown score name(s) {unknown or names}; choose from {', '.join(MODEL_SCORES + DELEGATED_SCORES)}"
        )
    return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------ one shard
def pair_columns(encoded: Sequence[EncodedPair], out: dict[str, torch.Tensor], scores: Sequence[str]) -> dict[str, Any]:
    """Per-pair score columns from the engine outputs of ``encoded`` (same order)."""
    n_chosen = torch.tensor([len(p.chosen) for p in encoded], dtype=torch.float64)
    n_rejected = torch.tensor([len(p.rejected) for p in encoded], dtype=torch.float64)
    cols: dict[str, Any] = {
        "n_tokens_prompt": [len(p.prompt) for p in encoded],
        "n_tokens_chosen": n_chosen.long().tolist(),
        "n_tokens_rejected": n_rejected.long().tolist(),
    }
    if "ches" in scores:
        cols["ches"] = ches(out["sum_chosen"], out["sum_rejected"]).tolist()
        cols["ln_ches"] = ln_ches(out["sum_chosen"], out["sum_rejected"], n_chosen, n_rejected).tolist()
        cols["hidden_inner"] = hidden_inner(out["last_chosen"], out["last_rejected"]).tolist()
        cols["edit_distance_norm"] = [normalized_edit_distance(p.chosen[:-1], p.rejected[:-1]) for p in encoded]
        pooled = "probe" if "probe_chosen" in out else "sum"
        cols["pooled_chosen"] = (out[f"{pooled}_chosen"].double() / n_chosen[:, None]).float().numpy()
        cols["pooled_rejected"] = (out[f"{pooled}_rejected"].double() / n_rejected[:, None]).float().numpy()
    if "logps" in scores:
        cols["logp_chosen"] = out["logp_chosen"].double().tolist()
        cols["logp_rejected"] = out["logp_rejected"].double().tolist()
        cols["logp_mean_chosen"] = (out["logp_chosen"].double() / n_chosen).tolist()
        cols["logp_mean_rejected"] = (out["logp_rejected"].double() / n_rejected).tolist()
    return cols


def _shard_frame(pair_ids: list[str], cols: dict[str, Any], truncated: list[int],
                 skipped: dict[int, str]) -> pl.DataFrame:
    """One shard's rows: scored pairs first (in pair order), then skipped ones with their reason."""
    scored = [pid for i, pid in enumerate(pair_ids) if i not in skipped]
    data: dict[str, Any] = {"pair_id": scored}
    for name, values in cols.items():
        if isinstance(values, np.ndarray):
            data[name] = pl.Series(name, values, dtype=pl.Array(pl.Float32, values.shape[1]))
        else:
            data[name] = values
    data["n_prompt_tokens_cut"] = truncated  # already one entry per scored pair
    data["skip_reason"] = pl.Series([None] * len(scored), dtype=pl.Utf8)
    frame = pl.DataFrame(data)
    if skipped:
        rest = pl.DataFrame({"pair_id": [pair_ids[i] for i in skipped], "skip_reason": list(skipped.values())})
        frame = pl.concat([frame, rest], how="diagonal_relaxed")
    return frame


def score_shard(lm, encoder, pairs: pl.DataFrame, scores: Sequence[str], *, batch_size: int | None,
                token_budget: int | None, prefix_sharing: bool | None, on_batch=None) -> pl.DataFrame:
    """Encode and score one slice of the pair table with a loaded model; pairs that cannot be encoded get a
    skip reason. ``on_batch(pairs, tokens)`` is called after each batch. This is the unit a scale-out engine
    runs per shard: same rows in, same frame out.
    """
    encoding = encode_pairs(pairs, encoder)
    encoded, skipped = encoding.pairs, encoding.skipped
    if skipped and on_batch is not None:
        on_batch(len(skipped), 0)
    def progress(indices: list[int]) -> None:
        if on_batch is not None:
            on_batch(len(indices), sum(len(encoded[i].prompt) + len(encoded[i].chosen) + len(encoded[i].rejected)
                                       for i in indices))

    with lm.compute():
        cols = pair_columns(encoded, score_encoded(
            lm.model, encoded, want_logps="logps" in scores, prefix_sharing=prefix_sharing, batch_size=batch_size,
            token_budget=token_budget, on_batch=progress), scores) if encoded else {}
    return _shard_frame(pairs["pair_id"].to_list(), cols, encoding.cut, skipped)


# ------------------------------------------------------------------ run directory plumbing
def _shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"score-{k:05d}.parquet"


def _quarantine_rows(pairs: pl.DataFrame, skipped: pl.DataFrame) -> pl.DataFrame:
    from curate.data.schema import quarantine_frame

    reasons = dict(zip(skipped["pair_id"], skipped["skip_reason"]))
    rows = []
    for row in pairs.filter(pl.col("pair_id").is_in(list(reasons))).iter_rows(named=True):
        reason, _, detail = reasons[row["pair_id"]].partition(": ")
        raw = json.dumps({k: row[k] for k in ("pair_id", "prompt", "chosen", "rejected")}, ensure_ascii=False)
        rows.append({"source": row["source"], "reason": reason, "detail": detail, "raw": raw})
    return quarantine_frame(rows)


def _versions() -> dict[str, str]:
    import transformers

    from curate import __version__

    return {"curate": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "polars": pl.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------ the library function
def score(dataset_or_run: str | os.PathLike[str], *, model: str = "smollm2-135m-instruct",
          scores: str | Sequence[str] = ("ches", "logps"), out: str | os.PathLike[str] | None = None,
          device: str = "auto", dtype: str = "auto", batch_size: int | str = "auto", token_budget: int | None = None,
          max_length: int | None = None, limit: int | None = None, system_prompt: str = "default",
          prefix_sharing: bool | None = None, shard_size: int = DEFAULT_SHARD_SIZE, revision: str | None = None,
          subset: str | None = None, split: str | None = None, fmt: str = "auto", columns=None,
          label_column: str | None = None, strategy: str = "best-random-lower", keep_empty: bool = False, lm=None,
          reward_options: dict[str, Any] | None = None, engine: str = "local", ray_address: str | None = None,
          num_workers: int = 1, gpus_per_worker: float = 0, force: bool = False) -> pl.DataFrame:
    """Score pairs with a causal LM into ``out`` (a run directory); returns the run's score table.

    ``dataset_or_run`` is a dataset (hub name or local file, loaded and
    validated by :func:`curate.data.load_pairs`) or a run directory whose
    ``pairs.parquet`` is scored. ``scores`` picks ``ches`` (CHES, LN-CHES, the
    two baselines, pooled states), ``logps`` (reply log-probs) and the
    delegated ``reward`` / ``noise`` (reward-ensemble columns, from
    :func:`curate.scores.reward.score_reward_and_noise`). ``batch_size="auto"``
    fills ``token_budget`` padded tokens per batch (halving on GPU
    out-of-memory). ``lm`` takes an already loaded :class:`curate.models.LoadedModel`.

    ``engine="ray"`` scores the same shards on a Ray cluster instead
    (:mod:`curate.scale.ray_scoring`): ``num_workers`` actors with
    ``gpus_per_worker`` GPUs each (0: one CPU core each), on the cluster at
    ``ray_address`` (default: ``RAY_ADDRESS``, else a local Ray runtime). Every
    other option means the same under both engines.
    A run directory holds one dataset: scoring other pairs into it is refused
    unless ``force`` (which removes the old pairs' scores and features first).
    """
    if engine not in ENGINES:
        raise CurateError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "ray" and lm is not None:
        raise CurateError("engine='ray' loads the model on each worker: pass model=NAME_OR_PATH instead of lm")
    wanted = parse_scores(scores)
    if out is None:
        if not is_run_dir(dataset_or_run):
            raise CurateError("pass --out RUN: the run directory to write pairs, scores and the manifest to")
        out = Path(dataset_or_run).expanduser()
    if batch_size != "auto" and (not str(batch_size).isdigit() or int(batch_size) < 1):
        raise CurateError(f"--batch-size must be a positive integer or 'auto', not {batch_size!r}")
    if shard_size < 1:
        raise CurateError("shard_size must be at least 1")
    run = RunDir(out)
    started = time.time()
    load_kwargs = {} if isinstance(dataset_or_run, pl.DataFrame) or is_run_dir(dataset_or_run) else dict(
        subset=subset, split=split, fmt=fmt, columns=columns, keep_empty=keep_empty, label_column=label_column,
        strategy=strategy)
    resolved = resolve_pairs(dataset_or_run, limit=limit, **load_kwargs)
    pairs, quarantine = resolved.pairs, resolved.quarantine
    data_info = {"dataset": resolved.info["source"], "from_run": resolved.run is not None,
                 **{k: v for k, v in resolved.info.items() if k not in ("source", "kind", "quarantined")}}
    if pairs.height == 0:
        raise CurateError(f"{dataset_or_run} has no valid pairs to score (see its quarantine table)")
    if resolved.run is not None and resolved.run.path.resolve() == run.path.resolve():
        run.write_pairs(pairs, quarantine)  # scoring a run in place (``limit`` may shorten it)
    else:
        run.adopt_pairs(pairs, quarantine, source=str(resolved.info["source"]), force=force)
    manifest: dict[str, Any] = {"data": data_info, "n_pairs": pairs.height, "scores": list(wanted),
                                "versions": _versions()}
    result = run.scores()

    model_scores = [s for s in wanted if s in MODEL_SCORES]
    if model_scores:
        manifest.update(_score_with_model(
            run, pairs, quarantine, model_scores, model=model, lm=lm, device=device, dtype=dtype,
            revision=revision, batch_size=None if batch_size == "auto" else int(batch_size),
            token_budget=token_budget, max_length=max_length, system_prompt=system_prompt,
            prefix_sharing=prefix_sharing, shard_size=shard_size, engine=engine,
            ray_options={"address": ray_address, "num_workers": num_workers, "gpus_per_worker": gpus_per_worker},
        ))
        result = run.scores()
    manifest["seconds_total"] = round(time.time() - started, 3)
    run.write_section(ScoreSection(**manifest))

    delegated = [s for s in wanted if s in DELEGATED_SCORES]
    if delegated:
        from curate.scores.reward import score_reward_and_noise

        score_reward_and_noise(run, device=device, **(reward_options or {}))
        result = run.scores()
    return result


def model_facts(lm, *, prefix_sharing: bool | None, max_length: int | None) -> dict[str, Any]:
    """What the shard plan and the manifest need to know about a loaded model (either engine)."""
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if max_length is not None and context is not None and max_length > context:
        raise CurateError(f"--max-length {max_length} exceeds the model's context of {context} tokens")
    return {"info": lm.info, "device": str(lm.device), "dtype": lm.precision,
            "prefix_sharing": resolve_prefix_sharing(lm.model, prefix_sharing), "max_length": max_length or context,
            "pooled_layer": probe_layer(lm.model) or lm.model.config.num_hidden_layers,
            "pooled_layers": list(probe_layers(lm.model)) or [lm.model.config.num_hidden_layers]}


def _score_with_model(run: RunDir, pairs: pl.DataFrame, quarantine: pl.DataFrame, scores: Sequence[str], *,
                      model, lm, device, dtype, revision, batch_size, token_budget, max_length, system_prompt,
                      prefix_sharing, shard_size, engine="local", ray_options=None) -> dict[str, Any]:
    from contextlib import nullcontext

    from curate.data.chat import ChatEncoder
    from curate.models import load_causal_lm

    load = {"name_or_path": model, "device": device, "dtype": dtype, "revision": revision}
    if engine == "ray":
        from curate.scale import ray_scoring

        ray_options = dict(ray_options or {})
        session = ray_scoring.ray_session(ray_options.get("address"))
    else:
        session = nullcontext()
    with session as ray:
        t0 = time.time()
        if engine == "ray":
            ray_scoring.check_resources(ray, ray_options["num_workers"], ray_options["gpus_per_worker"])
            facts = ray_scoring.describe_model(ray, load, prefix_sharing=prefix_sharing, max_length=max_length,
                                               gpus_per_worker=ray_options["gpus_per_worker"])
        else:
            if lm is None:
                lm = load_causal_lm(**load)
            facts = model_facts(lm, prefix_sharing=prefix_sharing, max_length=max_length)
        load_seconds = time.time() - t0
        prefix_sharing, effective_max = facts["prefix_sharing"], facts["max_length"]

        plan = {"pairs": dataset_fingerprint(pairs), "n_pairs": pairs.height, "model": facts["info"],
                "scores": sorted(scores), "max_length": effective_max, "system_prompt": system_prompt,
                "shard_size": shard_size, "dtype": facts["dtype"], "prefix_sharing": prefix_sharing}
        shard_dir = fresh_shards(run / SHARDS, plan, plan_file="plan.json", pattern="score-*.parquet")
        n_shards = -(-pairs.height // shard_size)
        todo = [k for k in range(n_shards) if not _shard_path(shard_dir, k).exists()]
        done_pairs = pairs.height - sum(min(shard_size, pairs.height - k * shard_size) for k in todo)

        progress, task = progress_bar("scoring", pairs.height, completed=done_pairs, rate=True)
        counters = {"pairs": 0, "tokens": 0}
        t_score = time.time()

        def on_batch(n_pairs: int, n_tokens: int) -> None:
            counters["pairs"] += n_pairs
            counters["tokens"] += n_tokens
            rate = counters["pairs"] / max(time.time() - t_score, 1e-9)
            progress.update(task, advance=n_pairs, rate=f"{rate:.1f}")

        def write_shard(k: int, frame: pl.DataFrame) -> None:
            write_parquet(frame, _shard_path(shard_dir, k))

        with progress:
            if engine == "ray":
                settings = {"scores": list(scores), "batch_size": batch_size, "token_budget": token_budget,
                            "prefix_sharing": prefix_sharing, "system_prompt": system_prompt,
                            "max_length": effective_max}
                per_worker = ray_scoring.score_shards(
                    ray, [(k, pairs.slice(k * shard_size, shard_size)) for k in todo], load=load, settings=settings,
                    num_workers=ray_options["num_workers"], gpus_per_worker=ray_options["gpus_per_worker"],
                    write_shard=write_shard, on_shard=on_batch,
                )
                workers = {"num_workers": ray_options["num_workers"],
                           "gpus_per_worker": ray_options["gpus_per_worker"],
                           "ray_address": ray_options.get("address") or os.environ.get("RAY_ADDRESS") or "local",
                           "per_worker": per_worker}
            else:
                encoder = ChatEncoder(lm.tokenizer, system_prompt=system_prompt, max_length=effective_max)
                for k in todo:
                    shard = pairs.slice(k * shard_size, shard_size)
                    write_shard(k, score_shard(lm, encoder, shard, scores, batch_size=batch_size,
                                               token_budget=token_budget, prefix_sharing=prefix_sharing,
                                               on_batch=on_batch))
                workers = {"num_workers": 1}
        score_seconds = time.time() - t_score

    shard_paths = [_shard_path(shard_dir, k) for k in range(n_shards)]
    shards = pl.concat([pl.read_parquet(p).drop(POOLED_COLUMNS, strict=False) for p in shard_paths],
                       how="diagonal_relaxed")
    skipped = shards.filter(pl.col("skip_reason").is_not_null())
    table = shards.filter(pl.col("skip_reason").is_null()).drop("skip_reason")
    if table.height == 0:
        raise CurateError(f"none of the {pairs.height} pairs fits in {effective_max} tokens (first reason: "
                          f"{skipped['skip_reason'][0]}); raise --max-length or shorten the replies")
    if "ches" in scores:
        _write_pooled(run / POOLED, shard_paths, facts["pooled_layers"])
    if skipped.height:
        run.write_pairs(
            pairs.filter(~pl.col("pair_id").is_in(skipped["pair_id"].to_list())),
            pl.concat([quarantine, _quarantine_rows(pairs, skipped)], how="diagonal_relaxed"),
        )
    run.merge_scores(table)
    return {
        "model": facts["info"], "device": facts["device"], "dtype": facts["dtype"], "engine": engine,
        "workers": workers, "pooled_layer": facts["pooled_layer"],
        "batch": {"batch_size": batch_size or "auto", "token_budget": token_budget or "auto",
                  "prefix_sharing": prefix_sharing, "shard_size": shard_size, "n_shards": n_shards,
                  "shards_resumed": n_shards - len(todo)},
        "truncation": {"max_length": effective_max,
                       "pairs_with_prompt_cut": int((table["n_prompt_tokens_cut"] > 0).sum()),
                       "pairs_quarantined_reply_over_context": int(skipped["skip_reason"].str.starts_with("reply_over_context").sum()),
                       "pairs_quarantined_cannot_encode": int(skipped["skip_reason"].str.starts_with("cannot_encode").sum())},
        "system_prompt": system_prompt,
        "n_scored": table.height,
        "timings": {"load_model_s": round(load_seconds, 3), "score_s": round(score_seconds, 3),
                    "pairs_per_s_this_session": round(counters["pairs"] / max(score_seconds, 1e-9), 3),
                    "tokens_per_s_this_session": round(counters["tokens"] / max(score_seconds, 1e-9), 1)},
    }


def _write_pooled(path: Path, shard_paths: Sequence[Path], layers: Sequence[int]) -> None:
    """Write the pooled states of every shard into one ``.npz``, one shard in memory at a time.

    Each array is streamed into its zip entry after an ``.npy`` header
    carrying the final shape, so ``np.load`` reads it like ``np.savez`` output.
    """
    import zipfile

    with_states = [p for p in shard_paths if "pooled_chosen" in pl.read_parquet_schema(p)]  # not all-skipped
    frames = [pl.scan_parquet(p).filter(pl.col("skip_reason").is_null()) for p in with_states]
    n_rows = sum(f.select(pl.len()).collect().item() for f in frames)
    dim = pl.read_parquet_schema(with_states[0])["pooled_chosen"].size if with_states else 0
    ids = np.asarray(pl.concat([f.select("pair_id").collect() for f in frames])["pair_id"].to_list(), dtype=str)
    with replacing(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                 allowZip64=True) as archive:
        with archive.open("pair_id.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, ids)
        with archive.open("layers.npy", "w") as fh:
            np.lib.format.write_array(fh, np.asarray(layers, dtype=np.int64))
        for column, name in (("pooled_chosen", "mean_chosen"), ("pooled_rejected", "mean_rejected")):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                          "fortran_order": False, "shape": (n_rows, dim)}
                np.lib.format.write_array_header_2_0(fh, header)
                for frame in frames:
                    block = frame.select(column).collect()[column].to_numpy()
                    fh.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())


# ------------------------------------------------------------------ summaries (CLI)
SUMMARY_COLUMNS = ("ln_ches", "ches", "logp_mean_chosen", "logp_mean_rejected")


def score_summary(run_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the last `curate score` did to ``run_path``: counts, settings, timings, quantiles."""
    run = RunDir(run_path)
    section = run.section(ScoreSection) or ScoreSection()
    scores = run.scores()
    summary = {key: getattr(section, key) for key in ("scores", "n_pairs", "n_scored", "device", "dtype", "timings")}
    summary.update({"run": str(run.path), "model": (section.model or {}).get("name"),
                    "quarantined": run.quarantine().height,
                    "truncation": section.to_dict()["truncation"]})
    summary["quantiles"] = {
        name: {q: float(scores[name].quantile(float(q))) for q in ("0.05", "0.5", "0.95")}
        for name in SUMMARY_COLUMNS if name in scores.columns and scores[name].null_count() < scores.height
    }
    noise = run.section(NoiseSection)
    if noise and noise.summary:  # the flip rate, its interval, and whether the data identify it
        summary["noise"] = noise.summary
    return summary


def render_score_summary(summary: dict[str, Any], console) -> None:
    from rich.table import Table

    timings = summary.get("timings") or {}
    console.print(
        f"[bold]{summary['run']}[/]: {summary.get('n_scored')} pairs scored with {summary.get('model')} "
        f"({summary.get('dtype')} on {summary.get('device')}), {summary['quarantined']} in quarantine; "
        f"{timings.get('pairs_per_s_this_session', '-')} pairs/s"
    )
    if summary["quantiles"]:
        table = Table("column", "5%", "median", "95%")
        for name, q in summary["quantiles"].items():
            table.add_row(name, *(f"{q[k]:.3f}" for k in ("0.05", "0.5", "0.95")))
        console.print(table)
    if summary.get("noise"):
        console.print(f"noise: {summary['noise']}")


# `from curate import score` gives this module; calling it calls score().
from curate import callable_module  # noqa: E402

callable_module(__name__, "score")
