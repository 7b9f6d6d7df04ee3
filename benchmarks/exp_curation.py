"""Experiments, step 2 of 2 (sized for a GPU; CLI flags shrink it): does curation change the trained model?

Reads ``hh_pairs.parquet`` and ``minilm.npz`` from ``exp_prepare.py`` (``--data``)
and runs three experiments with the fixed settings in ``RECIPE`` below, every
training run repeated for each seed (the seed sets the data order; each run
starts from the bundled SmolLM2-135M-Instruct):

0. **Scores.** LN-CHES and reference log-probs of every pair with the batched
   engine (:mod:`curate.scores.engine`), and an out-of-fold reward ensemble
   (Bradley-Terry heads on all-MiniLM-L6-v2 reply embeddings and on SmolLM2's
   mean last-layer reply states, 5-fold cross-fitting x 3 split seeds) whose
   margin feeds the default noise estimator, ``mixture`` (``flip_prob``).
1. **The CHES paper's central claim.** DPO on the 64 lowest-LN-CHES pairs and,
   separately, on the 64 highest; per window, the change in chosen log-prob on
   its own training pairs (the paper: the high-CHES window lowers it more).
2. **Did curation help.** A pool of the first ``pool`` pairs; curation's
   holdout sets a quarter aside, untouched. Train on (a) all the other pairs,
   (b) the curated ones (drop the top 25% LN-CHES, then the likely label
   errors), (c) a random subset of the same size as (b) (a new draw per seed);
   evaluate each on the holdout.
3. **DPO vs SparsePO** on the curated pairs of (b), same steps and learning rate.

Every number is reported as the mean over seeds with a 95% Student-t interval
(:func:`curate.eval.mean_ci`). ``--smoke`` runs the same code with a tiny
random model and a handful of pairs (a CPU check of the plumbing, no result).

    python benchmarks/exp_curation.py --data runs/exp --out runs/exp/results
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

RECIPE: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "seeds": [0, 1, 2],
    "max_length": 512,  # tokens per sequence; longer prompts are cut from the left
    "train": {  # curate.train.loop.TrainConfig fields, the same for every run
        "loss": "dpo", "beta": 0.1, "lr": 5e-6, "batch_size": 8, "epochs": 3, "warmup_ratio": 0.1,
        "max_grad_norm": 1.0, "bf16": True, "max_length": 512, "save_every": 0, "keep_checkpoints": 1,
    },
    "sparsepo": {"loss": "sparsepo", "mask": "learned", "mask_mode": "common"},
    "eval_beta": 0.1,
    "ensemble": {"head_seeds": [0, 1, 2], "folds": 5},
    "exp1": {"window": 64},
    "exp2": {"pool": 340, "holdout": 0.25, "ches_drop_top": 25, "max_flip_prob": 0.8},
}
SMOKE = {"window": 4, "pool": 48, "epochs": 1, "batch_size": 2, "seeds": [0, 1]}


# ------------------------------------------------------------------ scores
def score_pairs(ref, pairs: pl.DataFrame, minilm: dict[str, np.ndarray], max_length: int) -> pl.DataFrame:
    """LN-CHES, reference log-probs and reward-ensemble noise scores of every pair that fits ``max_length``."""
    from curate.data.chat import ChatEncoder
    from curate.lm import encode_pairs
    from curate.scores.ches import ches, ln_ches
    from curate.scores.engine import score_encoded
    from curate.scores.noise import DEFAULT_ESTIMATOR, get_estimator
    from curate.scores.reward import FeatureSet, ensemble_quality, ensemble_stats, head_members, scaled_margins

    encoder = ChatEncoder(ref.tokenizer, max_length=max_length)
    encoding = encode_pairs(pairs, encoder)
    encoded, kept = encoding.pairs, encoding.kept
    out = score_encoded(ref.model, encoded, want_logps=True)
    n_c = torch.tensor([len(e.chosen) for e in encoded])
    n_r = torch.tensor([len(e.rejected) for e in encoded])
    ids = pairs["pair_id"].to_list()
    kept_ids = [ids[i] for i in kept]
    row_of = {pid: i for i, pid in enumerate(minilm["pair_id"].tolist())}
    rows = [row_of[pid] for pid in kept_ids]
    mean_c = (out["sum_chosen"] / n_c[:, None]).numpy()
    mean_r = (out["sum_rejected"] / n_r[:, None]).numpy()
    feature_sets = [
        FeatureSet("minilm", minilm["chosen"][rows], minilm["rejected"][rows]),
        FeatureSet("smollm2_mean_state", mean_c, mean_r),
    ]
    seeds = RECIPE["ensemble"]["head_seeds"]
    members = head_members(feature_sets, seeds=seeds, folds=RECIPE["ensemble"]["folds"])
    margins = scaled_margins(members)
    stats = ensemble_stats(margins)
    noise = get_estimator(DEFAULT_ESTIMATOR)(stats["rm_margin_mean"])  # the documented default
    table = pl.DataFrame({
        "pair_id": kept_ids,
        "ln_ches": ln_ches(out["sum_chosen"], out["sum_rejected"], n_c, n_r).numpy(),
        "ches": ches(out["sum_chosen"], out["sum_rejected"]).numpy(),
        "logp_chosen": out["logp_chosen"].numpy(), "logp_rejected": out["logp_rejected"].numpy(),
        "len_chosen": n_c.numpy(), "len_rejected": n_r.numpy(),
        **stats, "flip_prob": noise.flip_prob,
    })
    quality = ensemble_quality(members, margins, seeds)
    info = {"pairs_scored": len(kept), "pairs_in": pairs.height, "noise_rate": noise.rate,
            "ensemble_auc": quality.get("auc"), "auc_by_feature_set": quality.get("auc_by_member_group")}
    return table, info


# ------------------------------------------------------------------ one training run + its evaluation
def train_and_eval(train_pairs: pl.DataFrame, eval_pairs: pl.DataFrame, *, ref, seed: int, work: Path,
                   overrides: dict[str, Any], model_name: str, tag: str) -> dict[str, Any]:
    """Train one policy from the reference model, evaluate it; per-pair results go to ``work/../evals/TAG``."""
    from curate.eval import evaluate
    from curate.models import load_causal_lm
    from curate.train.loop import train

    out = work / f"run-{time.time_ns()}"
    policy = load_causal_lm(model_name, device=ref.device, dtype="fp32") if isinstance(model_name, str) else model_name()
    t0 = time.perf_counter()
    result = train(train_pairs.select("pair_id", "prompt", "chosen", "rejected", "source", "meta"), out=out,
                   model=policy, progress=False, seed=seed, **{**RECIPE["train"], **overrides})
    train_s = time.perf_counter() - t0
    policy.model.eval()
    eval_dir = work.parent / "evals" / tag
    summary = evaluate(policy, ref, eval_pairs, out=eval_dir, beta=RECIPE["eval_beta"], betas=(0.1,),
                       max_length=RECIPE["max_length"], dtype="fp32")
    per_pair = pl.read_parquet(eval_dir / "eval.parquet")
    shutil.rmtree(out, ignore_errors=True)
    del policy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "seed": seed, "train_pairs": train_pairs.height, "steps": result.steps, "train_seconds": round(train_s, 1),
        "final_train_loss": result.final_loss,
        "implicit_reward_accuracy": summary["implicit_reward_accuracy"],
        "ranking_accuracy_policy": summary["ranking_accuracy"]["policy"],
        "ranking_accuracy_reference": summary["ranking_accuracy"]["reference"],
        "ranking_accuracy_ln_policy": summary["ranking_accuracy_length_normalised"]["policy"],
        "ranking_accuracy_ln_reference": summary["ranking_accuracy_length_normalised"]["reference"],
        **{k: summary["displacement"][k] for k in ("mean_delta_chosen", "mean_delta_rejected", "frac_chosen_fell")},
        # per-token change: the summed change grows with reply length, which differs between windows
        "mean_delta_chosen_per_token": float((per_pair["delta_chosen"] / per_pair["n_chosen"]).mean()),
        "mean_chosen_tokens": float(per_pair["n_chosen"].mean()),
        "spearman_ln_ches_delta_chosen": summary.get("spearman_ln_ches_vs_delta_chosen", {}).get("rho"),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from curate.eval import mean_ci

    keys = [k for k, v in runs[0].items() if k != "seed" and isinstance(v, (int, float)) and v is not None]
    return {k: mean_ci([r[k] for r in runs]) for k in keys if all(r.get(k) is not None for r in runs)}


# ------------------------------------------------------------------ the experiments
def exp1_ches_windows(table: pl.DataFrame, pairs: pl.DataFrame, ctx: dict) -> dict[str, Any]:
    """Train on the lowest / highest LN-CHES window; displacement measured on the window's own pairs.

    Default: one window per side, one run per seed (the seed sets the data
    order). ``disjoint``: seed k trains on its own window (every len(seeds)-th
    pair of the lowest / highest ``window * len(seeds)``), so replicates differ
    in their pairs too; needed when a window fits one batch and the data
    order no longer varies.
    """
    window, seeds = ctx["window"], ctx["seeds"]
    ranked = table.sort("ln_ches")
    span = window * len(seeds) if ctx.get("disjoint") else window
    sides = {"lowest_ln_ches": ranked.head(span), "highest_ln_ches": ranked.tail(span)}
    result: dict[str, Any] = {"window": window, "disjoint": bool(ctx.get("disjoint")), "arms": {}}
    runs: dict[str, list] = {name: [] for name in sides}
    for k, seed in enumerate(seeds):  # sides alternate, so a cut-short run still compares them
        for name, scored in sides.items():
            group = scored[k::len(seeds)] if ctx.get("disjoint") else scored
            data = pairs.join(group.select("pair_id", "ln_ches"), on="pair_id")
            runs[name].append(train_and_eval(data, data, seed=seed, tag=f"exp1-{name}-{seed}", **ctx["run"]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    for name, scored in sides.items():
        result["arms"][name] = {"ln_ches_range": [float(scored["ln_ches"].min()), float(scored["ln_ches"].max())],
                                "runs": runs[name], "summary": aggregate(runs[name])}
    return result


def curation_split(table: pl.DataFrame, pairs: pl.DataFrame, ctx: dict) -> dict[str, Any]:
    """Experiment 2's pool, its untouched holdout, and what curation keeps of the rest (deterministic)."""
    from curate.curation import ches_drop_top_rule, curate_pairs, max_flip_prob_rule

    cfg = RECIPE["exp2"]
    pool = pairs.join(table, on="pair_id", how="inner", maintain_order="left").head(ctx["pool"])
    rules = [ches_drop_top_rule(cfg["ches_drop_top"]), max_flip_prob_rule(f"{cfg['max_flip_prob']}:drop")]
    curated = curate_pairs(pool, rules, holdout=cfg["holdout"])
    holdout_ids = curated.holdout["pair_id"].implode()
    return {
        "pool": pool, "kept": curated.pairs, "summary": curated.summary,
        "holdout": pool.filter(pl.col("pair_id").is_in(holdout_ids)),
        "everything": pool.filter(~pl.col("pair_id").is_in(holdout_ids)),
    }


def exp2_curation(split: dict[str, Any], ctx: dict) -> dict[str, Any]:
    everything, kept, holdout = split["everything"], split["kept"], split["holdout"]
    result: dict[str, Any] = {"pool": split["pool"].height, "holdout": holdout.height,
                              "curation": split["summary"]["counts"], "per_rule": split["summary"]["per_rule"],
                              "arms": {}}
    arms = {
        "all": lambda seed: everything,
        "curated": lambda seed: kept,
        "random_same_size": lambda seed: everything.sample(n=kept.height, seed=1000 + seed),
    }
    for name, pick in arms.items():
        runs = [train_and_eval(pick(s), holdout, seed=s, tag=f"exp2-{name}-{s}", **ctx["run"]) for s in ctx["seeds"]]
        result["arms"][name] = {"runs": runs, "summary": aggregate(runs)}
    return result


def exp3_losses(split: dict[str, Any], dpo_arm: dict[str, Any] | None, ctx: dict) -> dict[str, Any]:
    """SparsePO on experiment 2's curated pairs; the DPO arm is experiment 2's curated arm (trained here if absent)."""
    kept, holdout = split["kept"], split["holdout"]
    plain = {k: v for k, v in ctx["run"].items() if k != "overrides"}
    if dpo_arm is None:
        runs = [train_and_eval(kept, holdout, seed=s, overrides={}, tag=f"exp3-dpo-{s}", **plain) for s in ctx["seeds"]]
        dpo_arm = {"runs": runs, "summary": aggregate(runs)}
    runs = [train_and_eval(kept, holdout, seed=s, overrides=RECIPE["sparsepo"], tag=f"exp3-sparsepo-{s}", **plain)
            for s in ctx["seeds"]]
    return {"arms": {"dpo": dpo_arm, "sparsepo": {"runs": runs, "summary": aggregate(runs)}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/exp", help="Directory written by exp_prepare.py.")
    parser.add_argument("--out", default="runs/exp/results")
    parser.add_argument("--only", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--smoke", action="store_true", help="Tiny random model, a few pairs: plumbing check only.")
    parser.add_argument("--score-limit", type=int, default=None, help="Score only the first N pairs (CPU-sized runs).")
    parser.add_argument("--window", type=int, default=None, help="Experiment 1 window size (default: the recipe's).")
    parser.add_argument("--pool", type=int, default=None, help="Experiment 2 pool size (default: the recipe's).")
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs (default: the recipe's).")
    parser.add_argument("--batch-size", type=int, default=None, help="Pairs per optimizer step (default: the recipe's).")
    parser.add_argument("--max-length", type=int, default=None, help="Tokens per sequence (default: the recipe's).")
    parser.add_argument("--lr", type=float, default=None, help="Learning rate (default: the recipe's).")
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--disjoint-windows", action="store_true",
                        help="Experiment 1: each seed trains on its own window of pairs (see exp1_ches_windows).")
    parser.add_argument("--reuse-scores", type=Path, default=None, help="scores.parquet of an earlier run: skip scoring.")
    args = parser.parse_args()
    for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("max_length", args.max_length),
                       ("lr", args.lr)):
        if value is not None:
            RECIPE["train"][key] = value
    if args.max_length is not None:
        RECIPE["max_length"] = args.max_length
    if args.window is not None:
        RECIPE["exp1"]["window"] = args.window
    if args.pool is not None:
        RECIPE["exp2"]["pool"] = args.pool
    if args.seeds:
        RECIPE["seeds"] = args.seeds
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"

    from curate.models import load_causal_lm, tiny_causal_lm

    pairs = pl.read_parquet(data / "hh_pairs.parquet")
    minilm = dict(np.load(data / "minilm.npz"))
    seeds, window, pool = RECIPE["seeds"], RECIPE["exp1"]["window"], RECIPE["exp2"]["pool"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        seeds, window, pool = SMOKE["seeds"], SMOKE["window"], SMOKE["pool"]
        RECIPE["train"].update(epochs=SMOKE["epochs"], batch_size=SMOKE["batch_size"], bf16=False)
        RECIPE["ensemble"]["folds"] = 2
        pairs = pairs.head(pool + 2 * window + 20)
        ref = tiny_causal_lm(seed=0)
        model_name: Any = lambda: tiny_causal_lm(seed=0)  # noqa: E731
    else:
        ref = load_causal_lm(RECIPE["model"], device=device, dtype="fp32")
        model_name = RECIPE["model"]
    report: dict[str, Any] = {"recipe": RECIPE, "smoke": args.smoke, "score_limit": args.score_limit,
                              "disjoint_windows": args.disjoint_windows, "device": device,
                              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "model": ref.info}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(report, indent=2, default=float))

    t0 = time.perf_counter()
    if args.reuse_scores:  # scores.parquet of an earlier run with the same --score-limit and --max-length
        table = pl.read_parquet(args.reuse_scores)
        report["scores"] = {"reused": str(args.reuse_scores), "pairs_scored": table.height}
    else:
        scored = pairs.head(args.score_limit) if args.score_limit else pairs
        scorer = ref if args.smoke else load_causal_lm(RECIPE["model"], device=device, dtype="auto")  # bf16 where fast
        table, report["scores"] = score_pairs(scorer, scored, minilm, RECIPE["max_length"])
        del scorer
    table.write_parquet(out / "scores.parquet")
    report["scores"]["seconds"] = round(time.perf_counter() - t0, 1)
    print("scores:", report["scores"], flush=True)
    save()
    ctx = {"seeds": seeds, "window": window, "pool": pool, "disjoint": args.disjoint_windows,
           "run": {"ref": ref, "work": work, "overrides": {}, "model_name": model_name}}
    split = curation_split(table, pairs, ctx) if {2, 3} & set(args.only) else None
    for number, name in ((1, "exp1_ches_windows"), (2, "exp2_curation"), (3, "exp3_dpo_vs_sparsepo")):
        if number not in args.only:
            continue
        t1 = time.perf_counter()
        try:
            if number == 1:
                report[name] = exp1_ches_windows(table, pairs, ctx)
            elif number == 2:
                report[name] = exp2_curation(split, ctx)
            else:
                dpo_arm = report.get("exp2_curation", {}).get("arms", {}).get("curated")
                report[name] = exp3_losses(split, dpo_arm, ctx)
            report[name]["seconds"] = round(time.perf_counter() - t1, 1)
        except Exception:  # keep what the other experiments found
            report[name] = {"error": traceback.format_exc()}
        print(name, json.dumps({k: v for k, v in report.get(name, {}).items() if k != "arms"}, default=float)[:2000],
              flush=True)
        save()
    shutil.rmtree(work, ignore_errors=True)
    save()
    print(render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    """The results as markdown tables: mean [95% CI] over seeds."""
    def cell(summary: dict, key: str, scale: float = 1.0, fmt: str = "{:+.2f}") -> str:
        s = summary.get(key)
        if not s:
            return "n/a"
        return f"{fmt.format(scale * s['mean'])} [{fmt.format(scale * s['low'])}, {fmt.format(scale * s['high'])}]"

    lines = []
    cols = [("mean_delta_chosen", 1, "{:+.2f}"), ("mean_delta_chosen_per_token", 1, "{:+.4f}"),
            ("mean_delta_rejected", 1, "{:+.2f}"),
            ("frac_chosen_fell", 100, "{:.0f}"), ("implicit_reward_accuracy", 100, "{:.0f}"),
            ("ranking_accuracy_policy", 100, "{:.0f}"), ("ranking_accuracy_reference", 100, "{:.0f}")]
    header = "| arm | pairs | Δ log π(y⁺) | Δ log π(y⁺) per token | Δ log π(y⁻) | chosen fell % | implicit-reward acc % | ranking acc % | ref ranking acc % |"
    for name in ("exp1_ches_windows", "exp2_curation", "exp3_dpo_vs_sparsepo"):
        block = report.get(name)
        if not block:
            continue
        lines += ["", f"### {name}", ""]
        if "error" in block:
            lines.append("```\n" + block["error"][-1500:] + "\n```")
            continue
        lines += [header, "|" + "---|" * 9]
        for arm, value in block["arms"].items():
            pairs = value["runs"][0]["train_pairs"] if value["runs"] else 0
            lines.append(f"| {arm} | {pairs} | " + " | ".join(cell(value["summary"], k, s, f) for k, s, f in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
