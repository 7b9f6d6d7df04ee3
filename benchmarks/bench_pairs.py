"""Speed of `min-ches` pair building: pool-CHES against scoring every valid pair with the pair scorer.

    python benchmarks/bench_pairs.py [--sets-k4 12] [--sets-k7 6] [--chunk 2] [--threads 2] [--dtype auto]

Response sets are built from real HH-RLHF harmless-base pairs: set s takes
the prompt of pair s and k replies, the chosen and rejected replies of pairs
s, s+1, ... (real reply lengths; the texts are not answers to that prompt,
which does not matter for speed), rated k, k-1, ..., 1 so every one of the
k(k-1)/2 unordered pairs is valid. Both variants run in this process, on the
bundled SmolLM2-135M-Instruct, same dtype, same tokenisation:

(a) pool-CHES (curate pairs, default settings: on CPU each prompt runs once
    and its k replies on its KV cache; ``curate.pairs.pooling.pool_response_sets``),
    the k x k LN-CHES matrix from the pooled sums, then
    ``select_pairs(..., "min-ches")``; (a') the same with one full
    prompt + reply sequence per response (``prefix_sharing=False``);
(b) baseline: every valid pair scored by the existing pair engine
    (``curate.scores.engine.score_encoded``, default settings: prefix sharing
    on CPU, no log-probs), then the argmin per set.

The variants take turns on chunks of ``--chunk`` sets, rotating which goes
first, so load from other processes falls on all of them alike. pairs/s
counts the chosen pairs (one per set). Also reported: the fraction of
sets where (a) and (b) choose the same pair. The last line holds the ratios.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from curate.data.chat import ChatEncoder
from curate.data.load import load_pairs
from curate.data.response_sets import load_response_sets
from curate.models import load_causal_lm
from curate.pairs.build import ches_matrices
from curate.pairs.pooling import pool_response_sets
from curate.pairs.strategies import select_pairs
from curate.scores.ches import ln_ches
from curate.scores.engine import EncodedPair, score_encoded

FULL_LABEL = "(a') pool-CHES, full sequence each"
HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def response_sets(pairs: pl.DataFrame, n_sets: int, k: int, offset: int) -> pl.DataFrame:
    replies = [r for row in pairs.iter_rows(named=True) for r in (row["chosen"], row["rejected"])]
    records = []
    for s in range(n_sets):
        prompt = pairs["prompt"][offset + s].to_list()
        for i in range(k):
            records.append({"prompt": prompt, "response": replies[2 * (offset + s) + i], "score": float(k - i)})
    return load_response_sets(records, fmt="long")


def run_pool(lm, encoder, sets: pl.DataFrame, prefix_sharing: bool | None = None) -> tuple[pl.DataFrame, float]:
    start = time.perf_counter()
    encoded = [encoder.encode(p, r) for p, r in zip(sets["prompt"].to_list(), sets["response"])]
    with lm.compute():
        sums = pool_response_sets(lm.model, [(e.prompt_ids, e.reply_ids) for e in encoded],
                                  prefix_sharing=prefix_sharing).numpy()
    n_tokens = np.array([len(e.reply_ids) for e in encoded])
    _, ln_by = ches_matrices(sets, sums, n_tokens)
    chosen = select_pairs(sets, "min-ches", ln_ches=ln_by)
    return chosen, time.perf_counter() - start


def run_baseline(lm, encoder, sets: pl.DataFrame) -> tuple[dict[str, tuple[str, str]], float, int]:
    start = time.perf_counter()
    candidates, encoded = [], []
    for (prompt_id,), group in sets.group_by("prompt_id", maintain_order=True):
        prompt = group["prompt"][0].to_list()
        replies, scores = group["response"].to_list(), group["score"].to_list()
        for i in range(len(replies)):
            for j in range(len(replies)):
                if scores[i] > scores[j]:
                    prompt_ids = encoder.prompt_ids(prompt)
                    encoded.append(EncodedPair(prompt_ids, encoder.reply_ids(replies[i]), encoder.reply_ids(replies[j])))
                    candidates.append((prompt_id, replies[i], replies[j]))
    with lm.compute():
        out = score_encoded(lm.model, encoded, want_logps=False)
    n_c = torch.tensor([len(p.chosen) for p in encoded])
    n_r = torch.tensor([len(p.rejected) for p in encoded])
    values = ln_ches(out["sum_chosen"], out["sum_rejected"], n_c, n_r).numpy()
    best: dict[str, tuple[float, tuple[str, str]]] = {}
    for (prompt_id, chosen, rejected), value in zip(candidates, values):
        if prompt_id not in best or value < best[prompt_id][0]:
            best[prompt_id] = (value, (chosen, rejected))
    return {p: pair for p, (_, pair) in best.items()}, time.perf_counter() - start, len(encoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets-k4", type=int, default=12)
    parser.add_argument("--sets-k7", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=2, help="Sets per timed turn (variants alternate).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_causal_lm("smollm2-135m-instruct", device=args.device, dtype=args.dtype)
    encoder = ChatEncoder(lm.tokenizer)
    pairs = load_pairs(str(HH), limit=400).pairs
    print(f"device={args.device} threads={args.threads} dtype={lm.precision} model={lm.name} data=HH harmless-base "
          "(k replies of neighbouring pairs per prompt, distinct ratings)")
    print(f"{'variant':40s} {'k':>2s} {'sets':>5s} {'scored':>7s} {'seconds':>8s} {'pairs/s':>8s}")
    ratios = []
    offset = 0
    for k, n_sets in ((4, args.sets_k4), (7, args.sets_k7)):
        sets = response_sets(pairs, n_sets, k, offset)
        offset += n_sets
        # warm-up (oneDNN kernels, allocator) on one set, untimed
        run_pool(lm, encoder, sets.filter(pl.col("prompt_id") == sets["prompt_id"][0]))
        # the variants take turns on chunks of sets (rotating who goes first), so load from other
        # processes on a shared machine falls on all three alike
        ids = sets["prompt_id"].unique(maintain_order=True).to_list()
        seconds = {"a": 0.0, "a_full": 0.0, "b": 0.0}
        chosen_parts, full_parts, baseline, n_pairs = [], [], {}, 0
        for c, lo in enumerate(range(0, len(ids), args.chunk)):
            chunk = sets.filter(pl.col("prompt_id").is_in(ids[lo:lo + args.chunk]))
            turns = ["a", "a_full", "b"]
            for name in turns[c % 3:] + turns[:c % 3]:
                if name == "b":
                    picked, spent, n = run_baseline(lm, encoder, chunk)
                    baseline.update(picked)
                    n_pairs += n
                else:
                    table, spent = run_pool(lm, encoder, chunk, prefix_sharing=None if name == "a" else False)
                    (chosen_parts if name == "a" else full_parts).append(table)
                seconds[name] += spent
        chosen, chosen_full = pl.concat(chosen_parts), pl.concat(full_parts)
        pool_s, full_s, base_s = seconds["a"], seconds["a_full"], seconds["b"]
        same = np.mean([baseline[r["prompt_id"]] == (r["chosen"], r["rejected"]) for r in chosen.iter_rows(named=True)])
        print(f"{'(a) pool-CHES, one forward per response':40s} {k:2d} {n_sets:5d} {sets.height:7d} {pool_s:8.2f} "
              f"{n_sets / pool_s:8.3f}")
        print(f"{FULL_LABEL:40s} {k:2d} {n_sets:5d} {sets.height:7d} {full_s:8.2f} "
              f"{n_sets / full_s:8.3f}")
        print(f"{'(b) pair scorer on every valid pair':40s} {k:2d} {n_sets:5d} {n_pairs:7d} {base_s:8.2f} "
              f"{n_sets / base_s:8.3f}")
        same_full = chosen_full.select("chosen", "rejected").equals(chosen.select("chosen", "rejected"))
        print(f"k={k}: same chosen pair as (b) in {same:.0%} of sets, (a) and (a') agree: {same_full}; "
              f"pairs/s ratios (a)/(b) = {base_s / pool_s:.2f}, (a')/(b) = {base_s / full_s:.2f} (k/2 = {k / 2:g})")
        ratios.append(f"k{k}={base_s / pool_s:.2f}")
    print("pool_ches_speedup " + " ".join(ratios))


if __name__ == "__main__":
    main()
