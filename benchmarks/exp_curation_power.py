"""Does curation help? Curated vs all vs a random subset, scored by the real pipeline, with paired intervals.

Issue 19, item 4. Every step is the library's own (what ``curate score`` /
``filter`` / ``train`` / ``eval`` run):

1. ``curate.score.score`` on the first ``--pool`` pairs of an HH file with the
   default scores and ensemble (CHES, log-probs, reward heads, the calibrated
   ``mixture`` noise estimator); the reward priors skip themselves where a
   scored reply was in their training data.
2. ``curate.curation.filter_run`` with the same 25% holdout (a stable hash of
   ``pair_id``) for every arm, never trained on: **all** (no rule), **curated**
   (``--ches-drop-top 25`` then ``--max-flip-prob 0.8:drop`` on the
   conservative flip posterior), and **random** (a new random subset of the
   curated arm's size per seed, drawn from the all arm's pairs).
3. ``curate.train.train`` from the bundled model on each arm for each seed (the
   seed sets the data order and, for the random arm, the subset); the scoring
   run's reference log-probs are reused (same model, length and precision).
4. ``curate.eval.evaluate`` in fp32 on the holdout. Arms are compared *paired*
   on the same holdout pairs: per seed, the difference of per-pair outcomes,
   averaged over seeds, with a 95% interval from a bootstrap over holdout
   pairs (the seeds are kept together, so the interval carries the holdout's
   sampling error as well as the seed spread).

Results go to ``--out`` (JSON, rewritten after every run, so a stopped run
keeps what it finished).

    PYTHONPATH=. python benchmarks/exp_curation_power.py --pool 512 --max-length 256 --seeds 0 1 2 \\
        --work /tmp/power --out benchmarks/results/exp_curation_power_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"
MODEL = "smollm2-135m-instruct"
BOOTSTRAP = 2000


def score_pool(dataset: Path, pool: int, max_length: int, work: Path) -> tuple[Path, dict[str, Any]]:
    from curate.rundir import NoiseSection, RewardSection, RunDir
    from curate.score import score

    run = work / "score"
    t0 = time.perf_counter()
    score(str(dataset), scores=("ches", "logps", "reward", "noise"), out=run, limit=pool, max_length=max_length)
    rd = RunDir(run)
    reward, noise = rd.section(RewardSection), rd.section(NoiseSection)
    return run, {"seconds": round(time.perf_counter() - t0, 1), "pairs": rd.pairs().height,
                 "reward": reward.to_dict() if reward else None, "noise": noise.to_dict() if noise else None}


def make_arms(run: Path, work: Path, holdout: float, ches_drop_top: float, max_flip_prob: str) -> dict[str, Any]:
    from curate.curation import ches_drop_top_rule, filter_run, max_flip_prob_rule

    curated_rules = [ches_drop_top_rule(ches_drop_top), max_flip_prob_rule(max_flip_prob)]
    arms = {}
    for name, rules in (("all", []), ("curated", curated_rules)):
        summary = filter_run(run, rules, out=work / name, holdout=holdout, force=True)
        arms[name] = {"dir": work / name, "counts": summary["counts"], "per_rule": summary["per_rule"]}
    return arms


def random_arm(all_dir: Path, n: int, seed: int, work: Path) -> Path:
    """A copy of the all arm's directory whose pairs are a random ``n`` of them (its scores and manifest kept)."""
    target = work / f"random-{seed}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(all_dir, target)
    pairs = pl.read_parquet(all_dir / "pairs.parquet")
    pairs.sample(n=n, seed=1000 + seed).write_parquet(target / "pairs.parquet")
    return target


def train_and_eval(data: Path, holdout: pl.DataFrame, *, ref, seed: int, train_options: dict[str, Any],
                   work: Path, tag: str) -> tuple[dict[str, Any], pl.DataFrame]:
    from curate.eval import evaluate
    from curate.models import load_causal_lm
    from curate.train import train

    out = work / "train" / tag
    policy = load_causal_lm(MODEL, dtype="fp32")
    t0 = time.perf_counter()
    result = train(str(data), out=out, model=policy, progress=False, seed=seed, force=True, **train_options)
    train_s = time.perf_counter() - t0
    policy.model.eval()
    eval_dir = work / "eval" / tag
    summary = evaluate(policy, ref, holdout, out=eval_dir, beta=train_options["beta"], betas=(train_options["beta"],),
                       max_length=train_options["max_length"], dtype="fp32")
    per_pair = pl.read_parquet(eval_dir / "eval.parquet")
    shutil.rmtree(out, ignore_errors=True)
    run = {
        "seed": seed, "train_pairs": pl.read_parquet(data / "pairs.parquet").height, "steps": result.steps,
        "train_seconds": round(train_s, 1), "final_train_loss": result.final_loss,
        "reference": result.info.get("reference"),
        "step0_max_abs_logratio": result.info.get("step0_max_abs_logratio"),
        "implicit_reward_accuracy": summary["implicit_reward_accuracy"],
        "ranking_accuracy_policy": summary["ranking_accuracy"]["policy"],
        "ranking_accuracy_reference": summary["ranking_accuracy"]["reference"],
        **{k: summary["displacement"][k] for k in ("mean_delta_chosen", "mean_delta_rejected", "frac_chosen_fell")},
    }
    return run, per_pair


OUTCOMES = {  # per holdout pair, from eval.parquet
    "implicit_reward_correct": lambda t: (t["implicit_margin"] > 0).cast(pl.Float64),
    "policy_ranked_correctly": lambda t: t["policy_ranked_correctly"].cast(pl.Float64),
    "delta_chosen": lambda t: t["delta_chosen"],
}


def paired_difference(per_pair: dict[str, dict[int, pl.DataFrame]], a: str, b: str, rng) -> dict[str, Any]:
    """Arm a minus arm b on the same holdout pairs: mean over seeds, 95% bootstrap interval over pairs."""
    seeds = sorted(set(per_pair[a]) & set(per_pair[b]))
    if not seeds:
        return {}
    out: dict[str, Any] = {"seeds": seeds}
    for name, outcome in OUTCOMES.items():
        diffs = []
        for s in seeds:
            left = per_pair[a][s].select("pair_id", outcome(per_pair[a][s]).alias("x"))
            right = per_pair[b][s].select("pair_id", outcome(per_pair[b][s]).alias("y"))
            joined = left.join(right, on="pair_id").sort("pair_id")
            diffs.append((joined["x"] - joined["y"]).to_numpy())
        d = np.mean(np.stack(diffs), axis=0)  # per pair, averaged over seeds
        boot = [d[rng.integers(0, d.size, d.size)].mean() for _ in range(BOOTSTRAP)]
        low, high = np.quantile(boot, [0.025, 0.975])
        out[name] = {"mean": float(d.mean()), "ci95": [float(low), float(high)], "pairs": int(d.size)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DATA)
    parser.add_argument("--pool", type=int, default=512, help="First N pairs of the file (holdout included).")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--ches-drop-top", type=float, default=25)
    parser.add_argument("--max-flip-prob", default="0.8:drop")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exp_curation_power"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exp_curation_power_cpu.json"))
    args = parser.parse_args()

    from curate.env import configure

    configure()  # curate's process setup (oneDNN cache, quiet libraries), as the CLI does
    from curate.eval import mean_ci
    from curate.models import load_causal_lm

    args.work.mkdir(parents=True, exist_ok=True)
    train_options = {"loss": "dpo", "beta": 0.1, "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                     "warmup_ratio": 0.1, "max_grad_norm": 1.0, "bf16": "auto", "max_length": args.max_length,
                     "save_every": 0}
    report: dict[str, Any] = {"command": vars(args) | {"dataset": str(args.dataset), "work": str(args.work),
                                                        "out": str(args.out)},
                              "train": train_options, "torch_threads": torch.get_num_threads(), "arms": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float))

    t0 = time.perf_counter()
    run, report["scores"] = score_pool(args.dataset, args.pool, args.max_length, args.work)
    print("scored:", json.dumps({k: report["scores"][k] for k in ("seconds", "pairs")}), flush=True)
    arms = make_arms(run, args.work, args.holdout, args.ches_drop_top, args.max_flip_prob)
    report["curation"] = {name: {"counts": a["counts"], "per_rule": a["per_rule"]} for name, a in arms.items()}
    holdout = pl.read_parquet(arms["all"]["dir"] / "holdout.parquet")
    kept = pl.read_parquet(arms["curated"]["dir"] / "pairs.parquet").height
    report["holdout_pairs"] = holdout.height
    save()

    ref = load_causal_lm(MODEL, dtype="fp32")
    per_pair: dict[str, dict[int, pl.DataFrame]] = {"all": {}, "curated": {}, "random": {}}
    for seed in args.seeds:  # seed-major: a stopped run still compares the arms on the seeds it finished
        for name in per_pair:
            data = random_arm(arms["all"]["dir"], kept, seed, args.work) if name == "random" else arms[name]["dir"]
            result, table = train_and_eval(data, holdout, ref=ref, seed=seed, train_options=train_options,
                                           work=args.work, tag=f"{name}-{seed}")
            per_pair[name][seed] = table
            report["arms"].setdefault(name, {"runs": []})["runs"].append(result)
            print(name, json.dumps(result), flush=True)
            save()
        rng = np.random.default_rng(0)
        report["paired"] = {f"{a}_minus_{b}": paired_difference(per_pair, a, b, rng)
                            for a, b in (("curated", "random"), ("curated", "all"), ("random", "all"))}
        for name, arm in report["arms"].items():
            arm["summary"] = {k: mean_ci([r[k] for r in arm["runs"]])
                              for k in ("implicit_reward_accuracy", "ranking_accuracy_policy", "mean_delta_chosen",
                                        "frac_chosen_fell")}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        save()
    print(json.dumps(report["paired"], indent=2))


if __name__ == "__main__":
    main()
