"""Likelihood displacement under the CHES paper's own protocol (issue 19.1; Razin et al. 2025, §4).

1. Score the HH harmless and helpful-base samples (the first ``--pairs-per-file``
   of each) with ``curate.score.score``: LN-CHES and the paper's two baselines,
   the normalised token edit distance between the replies and the inner product
   of their last hidden states (``edit_distance_norm``, ``hidden_inner``).
2. For each ranking, 5 windows of ``--window`` pairs centred on its 0/25/50/75/100th
   percentiles (the extreme windows are the lowest and highest ``--window``).
3. Per window and seed, DPO from the bundled SmolLM2-135M-Instruct with the
   paper's settings: RMSProp, lr 1e-7, 1 epoch, batch 32, β 0.1 (no warmup;
   curate's default gradient clipping at norm 1 and bf16 autocast on fp32 weights).
4. Δ mean log π(y⁺) of the window's own pairs: fp32 log-probs after training
   minus before (the reference); then, per ranking, the Spearman correlation
   between window order (0..4, ascending score) and Δ. The paper: higher
   LN-CHES → larger drop (ρ = −1 for LN-CHES), no order for the baselines.

Reduced CPU run (what docs/results.md reports):

    python benchmarks/exp_displacement.py --pairs-per-file 64 --window 32 --max-length 128 --seeds 0 \
        --control --out benchmarks/results/exp_displacement_cpu.json

Full size (512-pair windows, every pair, 3 seeds, on a GPU):

    python benchmarks/exp_displacement.py --full --out benchmarks/results/exp_displacement_gpu.json

The JSON is rewritten after every window, so a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"
FILES = ("harmless-base-test-dev.jsonl.gz", "helpful-base-test.jsonl.gz")
MODEL = "smollm2-135m-instruct"
RANKINGS = {  # score column -> what it is
    "ln_ches": "LN-CHES (length-normalised CHES)",
    "edit_distance_norm": "normalised token edit distance between y+ and y-",
    "hidden_inner": "inner product of the last hidden states of y+ and y-",
}
PERCENTILES = (0, 25, 50, 75, 100)
RUN_ORDER = (0, 4, 2, 1, 3)  # indices into PERCENTILES
PAPER = {"optimizer": "rmsprop", "lr": 1e-7, "epochs": 1, "batch_size": 32, "beta": 0.1, "warmup_ratio": 0.0,
         "loss": "dpo"}
CONTROL_LR = 1e-30  # curate refuses lr 0; RMSProp's first step, ~10·lr, is below an fp32 ulp of any weight ≠ 0
FULL = {"pairs_per_file": None, "window": 512, "seeds": [0, 1, 2], "max_length": 512, "device": "cuda"}


def windows(scores: pl.DataFrame, column: str, size: int) -> list[list[str]]:
    """Pair ids of the ``size`` pairs centred on each percentile of ``column`` (ascending; ties by pair_id)."""
    ranked = scores.sort([column, "pair_id"])["pair_id"].to_list()
    n = len(ranked)
    if n < size:
        raise SystemExit(f"{n} scored pairs, fewer than one window of {size}")
    out = []
    for q in PERCENTILES:
        centre = round(q / 100 * (n - 1))
        start = min(max(centre - size // 2, 0), n - size)
        out.append(ranked[start:start + size])
    return out


def score_pairs(lm, pairs_per_file: int | None, max_length: int, work: Path, device: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    from curate.score import score

    tables, pairs = [], []
    for name in FILES:
        run = work / name.split(".")[0]
        table = score(str(DATA / name), scores="ches,logps", out=run, lm=lm, limit=pairs_per_file,
                      max_length=max_length, device=device)
        if "skip_reason" in table.columns:  # present only when some pair was skipped
            table = table.filter(pl.col("skip_reason").is_null())
        tables.append(table.select("pair_id", *RANKINGS, "n_tokens_chosen", "n_tokens_rejected"))
        pairs.append(pl.read_parquet(run / "pairs.parquet").select("pair_id", "prompt", "chosen", "rejected")
                     .with_columns(pl.lit(name.split("-")[0]).alias("file")))
    scores = pl.concat(tables).unique("pair_id", keep="first", maintain_order=True)
    return scores, pl.concat(pairs).unique("pair_id", keep="first", maintain_order=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pairs-per-file", type=int, default=200, help="first N pairs of each HH file (default 200)")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=PAPER["batch_size"], help="the paper's 32 unless smoke-testing")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step: the same batch gradient, "
                    "and train()'s finite-gradient probe before saving then costs one micro-batch, not a full batch")
    ap.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=list(RANKINGS))
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a new temp dir); an earlier "
                    "run's dir reuses its finished score shards")
    ap.add_argument("--control", action="store_true", help="also train the first window at lr 1e-30, "
                    "which moves only exactly-zero weights: Δ must be ~0 (pipeline noise)")
    ap.add_argument("--full", action="store_true", help="the paper's size: " + json.dumps(FULL))
    args = ap.parse_args()
    if args.full:
        for key, value in FULL.items():
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    from curate.data.chat import ChatEncoder
    from curate.eval import reply_logps, spearman
    from curate.lm import encode_pairs
    from curate.models import load_causal_lm

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="exp_displacement."))
    ref = load_causal_lm(MODEL, device=args.device, dtype="fp32")
    ref.model.eval()
    scores, pairs = score_pairs(ref, args.pairs_per_file, args.max_length, work, args.device)
    score_s = time.perf_counter() - t_start
    by_id = {pid: i for i, pid in enumerate(pairs["pair_id"].to_list())}
    encoder = ChatEncoder(ref.tokenizer, max_length=args.max_length)

    plan = {column: windows(scores, column, args.window) for column in args.rankings}
    settings = {**PAPER, "batch_size": args.batch_size, "grad_accum": args.grad_accum}
    result: dict[str, Any] = {
        "command": "python benchmarks/exp_displacement.py " + ("--full " if args.full else "") + " ".join(
            f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else
                                          f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
            for k, v in vars(args).items() if k not in ("out", "full", "work") and v is not False)
        + f" --out {args.out}",
        "model": ref.info, "device": args.device, "torch_threads": args.threads,
        "data": {"files": list(FILES), "pairs_per_file": args.pairs_per_file, "pairs_scored": scores.height,
                 "by_file": scores.join(pairs.select("pair_id", "file"), on="pair_id")["file"].value_counts()
                 .sort("file").rows(), "max_length": args.max_length},
        "train": {**settings, "max_grad_norm": 1.0, "bf16": True, "max_length": args.max_length,
                  "steps_per_window": args.window // args.batch_size},
        "window": args.window, "percentiles": list(PERCENTILES), "seeds": args.seeds,
        "score_quantiles": {c: {f"q{q}": float(scores[c].quantile(q / 100)) for q in PERCENTILES} for c in RANKINGS},
        "score_seconds": round(score_s, 1), "windows": [], "spearman": {},
    }
    cache: dict[tuple, dict] = {}  # identical windows (another ranking's) are trained once per seed
    for column, wins in plan.items():
        for k in RUN_ORDER:  # the extremes first, so a stopped run has the widest contrast
            ids = wins[k]
            frame = pairs[[by_id[i] for i in ids]]
            window_scores = scores.filter(pl.col("pair_id").is_in(ids))
            encoding = encode_pairs(frame, encoder)
            encoded, kept = encoding.pairs, encoding.kept
            ref_c, ref_r = reply_logps(ref.model, encoded)
            n_c = np.array([len(e.chosen) for e in encoded], dtype=np.float64)
            entry = {"ranking": column, "percentile": PERCENTILES[k], "pairs": len(kept),
                     "score_range": [float(window_scores[column].min()), float(window_scores[column].max())],
                     "mean_chosen_tokens": float(n_c.mean()),
                     "files": window_scores.join(pairs.select("pair_id", "file"), on="pair_id")["file"]
                     .value_counts().sort("file").rows(),
                     "runs": []}
            for seed in args.seeds:
                key = (frozenset(ids), seed)
                if key not in cache:
                    cache[key] = train_and_measure(frame, encoded, (ref_c, ref_r), settings, seed, args,
                                                   work / f"train-{column}-{k}-{seed}")
                entry["runs"].append(cache[key])
                print(json.dumps({"ranking": column, "percentile": PERCENTILES[k], **cache[key]}), flush=True)
            if args.control and "zero_step_control" not in result:
                # A step too small to move an fp32 weight, through the same train() and measurement: any
                # nonzero Δ would be noise of the pipeline itself (bf16 leaking into the fp32 evaluation).
                control = train_and_measure(frame, encoded, (ref_c, ref_r), {**settings, "lr": CONTROL_LR},
                                            args.seeds[0], args, work / "train-control", ref_model=ref.model)
                result["zero_step_control"] = {"ranking": column, "percentile": PERCENTILES[k], **control}
                print(json.dumps({"zero_step_control": control}), flush=True)
            entry["mean_delta_chosen"] = float(np.mean([r["mean_delta_chosen"] for r in entry["runs"]]))
            result["windows"].append(entry)
            result["spearman"] = order_correlations(result["windows"], args.seeds, spearman)
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["spearman"], indent=2))


def train_and_measure(frame, encoded, ref_logps, settings: dict, seed: int, args, out: Path,
                      ref_model=None) -> dict[str, Any]:
    """DPO from a fresh copy of the bundled model on ``frame``; fp32 Δ log π of ``encoded`` against ``ref_logps``.
    With ``ref_model``, also counts the weights that differ from it after training."""
    from curate.eval import reply_logps
    from curate.models import load_causal_lm
    from curate.train import train

    policy = load_causal_lm(MODEL, device=args.device, dtype="fp32")
    t0 = time.perf_counter()
    res = train(frame, out=out, model=policy, progress=False, seed=seed, save_every=0, max_length=args.max_length,
                bf16=True, device=args.device, **settings)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    policy.model.eval()
    c, r = reply_logps(policy.model, encoded)
    d_c, d_r = c - ref_logps[0], r - ref_logps[1]
    n_c = np.array([len(e.chosen) for e in encoded], dtype=np.float64)
    return {"seed": seed, "lr": settings["lr"], "steps": res.steps, "train_seconds": round(seconds, 1),
            "final_train_loss": res.final_loss,
            "mean_delta_chosen": float(d_c.mean()), "mean_delta_rejected": float(d_r.mean()),
            "max_abs_delta_chosen": float(np.abs(d_c).max()),
            "mean_delta_chosen_per_token": float((d_c / n_c).mean()),
            "frac_chosen_fell": float((d_c < 0).mean()),
            "implicit_reward_accuracy": float(((d_c - d_r) > 0).mean()),
            **({} if ref_model is None else {"weights_changed": changed_weights(policy.model, ref_model)})}


def changed_weights(model, ref_model) -> int:
    with torch.no_grad():
        return int(sum((p != q).sum() for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)))


def order_correlations(entries: list[dict], seeds: list[int], spearman) -> dict[str, Any]:
    """Per ranking with all 5 windows done: Spearman(window order, Δ mean log π(y⁺)), per seed and of the seed mean."""
    out = {}
    for column in RANKINGS:
        rows = sorted((e for e in entries if e["ranking"] == column), key=lambda e: e["percentile"])
        if len(rows) < len(PERCENTILES):
            continue
        order = list(range(len(rows)))
        per_seed = {str(s): spearman(order, [next(r["mean_delta_chosen"] for r in e["runs"] if r["seed"] == s)
                                             for e in rows])["rho"] for s in seeds}
        out[column] = {"of_seed_mean": spearman(order, [e["mean_delta_chosen"] for e in rows]),
                       "per_seed": per_seed,
                       "per_token_of_seed_mean": spearman(order, [np.mean([r["mean_delta_chosen_per_token"]
                                                                           for r in e["runs"]]) for e in rows])}
    return out


if __name__ == "__main__":
    main()
