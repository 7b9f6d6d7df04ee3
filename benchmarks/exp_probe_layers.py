"""Which layer's reply states should the reward heads read? (the choice behind ``PROBE_DEPTH``)

For every HH pair, mean-pools the states that predict each reply at several
layers of the bundled SmolLM2 (one batch-size-1 forward per reply, all hidden
states), then fits the reward ensemble's fixed-hyperparameter heads on each
layer alone and on each layer together with the other feature sets
(``build_feature_sets`` without a run: MiniLM reply embeddings, relevance,
text statistics; the policy log-probs of a scoring run are left out), and prints the out-of-fold AUC per layer. The per-layer "alone" AUCs
quoted in ``curate/scores/engine.py`` were measured this way on a GPU (all 1,794 pairs);
on CPU, ``--limit`` keeps it short.

    python benchmarks/exp_probe_layers.py [--layers 4,8,12,16,20,24,30] [--limit N] [--device cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch

from curate.data.chat import ChatEncoder
from curate.data.load import load_pairs
from curate.models import load_causal_lm
from curate.lm import encode_pair
from curate.scores.reward import FeatureSet, build_feature_sets, reward_and_noise

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def pooled_layers(lm, pairs: pl.DataFrame, layers: list[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per layer, [n, d] mean states predicting the chosen and the rejected reply."""
    encoder = ChatEncoder(lm.tokenizer, max_length=lm.model.config.max_position_embeddings)
    chosen = {k: [] for k in layers}
    rejected = {k: [] for k in layers}
    with torch.inference_mode():
        for row in pairs.iter_rows(named=True):
            pair = encode_pair(encoder, row["prompt"], row["chosen"], row["rejected"])[0]
            for side, reply in ((chosen, pair.chosen), (rejected, pair.rejected)):
                ids = torch.tensor([list(pair.prompt) + list(reply)], device=lm.device)
                hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
                start = len(pair.prompt) - 1
                for k in layers:
                    side[k].append(hidden[k][0, start : start + len(reply)].float().mean(0).cpu().numpy())
    return {k: np.stack(v) for k, v in chosen.items()}, {k: np.stack(v) for k, v in rejected.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8,12,16,20,24,30", help="hidden_states indices (30 = last of SmolLM2)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    layers = [int(k) for k in args.layers.split(",")]

    pairs = load_pairs(str(HH), limit=args.limit).pairs
    lm = load_causal_lm(dtype="fp32", device=args.device)
    chosen, rejected = pooled_layers(lm, pairs, layers)
    others = build_feature_sets(pairs, text_stats=True)  # no run: reply embeddings, relevance, text statistics
    print(f"{pairs.height} pairs; other feature sets: {[fs.name for fs in others]}")
    print(f"{'layer':>6}{'alone':>10}{'with the others':>18}")
    for k in layers:
        policy = FeatureSet("policy", chosen[k], rejected[k])
        alone = reward_and_noise([policy])[1]["reward"]["oof_auc"]
        combined = reward_and_noise([policy, *others])[1]["reward"]["oof_auc"]
        print(f"{k:>6}{alone:>10.4f}{combined:>18.4f}", flush=True)


if __name__ == "__main__":
    main()
