"""Speed of `curate features` on the shared HH-RLHF sample, with baselines measured in the same run.

1. Embedding (the cost of the command), on a sample of reply texts:
   - baseline A: one text at a time (batch size 1, no padding at all),
   - baseline B: batches of 64 in the data's own order (padding to each batch's longest),
   - ours: batches of 64 sorted by token length (curate.embeddings.encode_batched),
   printed as ratios against baseline A.
2. The whole command (`run_features`: load, embed every reply, train the SAE,
   statistics, AUCs, write the run dir) on all 1,800 pairs with a cold
   embedding cache, then again with the cache warm.

    .venv/bin/python benchmarks/bench_features.py [--sample 256] [--skip-full] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_embedding(texts: list[str], device: str) -> dict:
    from curate.embeddings import encode_batched, l2_normalize, mean_pool
    from curate.models import load_embedder

    model, tokenizer = load_embedder(device=device)

    @torch.no_grad()
    def in_data_order(batch_size: int) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=256,
                            return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            out.append(l2_normalize(mean_pool(hidden.float(), enc["attention_mask"])).cpu().numpy())
        return np.concatenate(out)

    encode_batched(model, tokenizer, texts[:8], device=device)  # warm-up
    one_at_a_time, t_single = timed(lambda: in_data_order(1))
    unsorted, t_unsorted = timed(lambda: in_data_order(64))
    ours, t_ours = timed(lambda: encode_batched(model, tokenizer, texts, batch_size=64, device=device))
    return {
        "texts": len(texts),
        "seconds": {"batch1": round(t_single, 2), "batch64_unsorted": round(t_unsorted, 2),
                    "batch64_sorted_by_length": round(t_ours, 2)},
        "speedup_vs_batch1": {"batch64_unsorted": round(t_single / t_unsorted, 2),
                              "batch64_sorted_by_length": round(t_single / t_ours, 2)},
        "max_abs_diff_vs_batch1": float(np.abs(ours - one_at_a_time).max()),
        "max_abs_diff_unsorted_vs_batch1": float(np.abs(unsorted - one_at_a_time).max()),
    }


def bench_full(device: str) -> dict:
    from curate.features import FeatureSettings, run_features

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cold, t_cold = timed(lambda: run_features(run, dataset=str(HH), settings=FeatureSettings(device=device)))
        warm, t_warm = timed(lambda: run_features(run, settings=FeatureSettings(device=device)))
    keys = ("auc_sae", "auc_sae_only", "auc_probe", "auc_probe_length", "auc_length", "signal_fraction",
            "signal_fraction_beyond_length", "n_pairs", "auc_method")
    return {
        "cold_cache_seconds": round(t_cold, 1),
        "warm_cache_seconds": round(t_warm, 1),
        "cold_over_warm": round(t_cold / t_warm, 2),
        "cold_stage_seconds": cold.summary["timings_s"],
        "warm_stage_seconds": warm.summary["timings_s"],
        "same_results_warm": cold.summary["auc_sae"] == warm.summary["auc_sae"],
        **{k: cold.summary[k] for k in keys},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=256, help="reply texts for the embedding comparison")
    parser.add_argument("--skip-full", action="store_true", help="only the embedding comparison")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from curate.data import load_pairs

    pairs = load_pairs(str(HH)).pairs
    texts = pairs["chosen"].to_list() + pairs["rejected"].to_list()
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(len(texts), size=min(args.sample, len(texts)), replace=False)]
    result = {"device": args.device, "torch_threads": torch.get_num_threads(),
              "embedding": bench_embedding(sample, args.device)}
    if not args.skip_full:
        result["full_command"] = bench_full(args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
