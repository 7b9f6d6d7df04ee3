"""Train the reward priors curate ships (``curate/priors/*.npz``; :mod:`curate.scores.prior`).

    PYTHONPATH=. python benchmarks/cache_policy_layers.py --data harmless-base-test-dev.jsonl.gz \
        --out /tmp/ens_cache/harmless.npz --layers 16,20,24
    PYTHONPATH=. python benchmarks/cache_policy_layers.py --data helpful-base-test.jsonl.gz \
        --out /tmp/ens_cache/helpful.npz --layers 16,20,24
    PYTHONPATH=. python benchmarks/train_reward_prior.py --cache-dir /tmp/ens_cache

One prior per HH subset (harmless, helpful: their annotators reward opposite
things) and feature kind. Each is an L2 Bradley-Terry probe (the heads' own fit: replies
standardised, each block scaled to unit total variance, L2 chosen by 3-fold
CV on the training pairs) on every pair of its subset's sample in
``../shared/data/hh-rlhf`` that the cache holds (the shipped files: all 1,796 harmless and
all 2,348 helpful-base pairs that encode). The features are what
``curate score`` builds for the bundled SmolLM2-135M-Instruct: its mean reply
states at the probe layers (16/20/24), and the all-MiniLM-L6-v2 reply
embeddings with prompt relevance. The hashes of every training reply go in
the file, so curate never applies a prior to pairs it was trained on.
``benchmarks/exp_reward_prior.py`` measures what they add on held-out pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from curate.data.load import load_pairs
from curate.scores.prior import PRIOR_DIR, RewardPrior, pair_reply_hashes
from curate.scores.reward import (FeatureSet, block_standardisation, build_feature_sets, concat_feature_sets,
                                  fit_bt_head, nested_l2)

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf"
FILES = ("harmless-base-test-dev.jsonl.gz", "helpful-base-test.jsonl.gz")
PROBE_LAYERS = (16, 20, 24)  # curate.lm.probe_layers of SmolLM2-135M-Instruct (30 blocks)
FEATURES = {"policy": ("policy",), "minilm": ("reply_emb", "relevance")}
# one prior per HH subset and feature kind: harmless and helpful annotators reward opposite things
PRIORS = {f"hh_{subset}_{kind}": (file, reads) for subset, file in (("harmless", FILES[0]), ("helpful", FILES[1]))
          for kind, reads in FEATURES.items()}
L2_GRID = (1.0, 4.0, 16.0, 64.0)
EMBEDDER = "all-minilm-l6-v2"  # build_feature_sets' default


def hh_feature_sets(name: str, cache_dir: Path):
    """(pairs, feature sets) of one HH file, rows in the cache's order, as ``curate score`` names them."""
    stem = "harmless" if name.startswith("harmless") else "helpful"
    with np.load(cache_dir / f"{stem}.npz", allow_pickle=False) as z:
        cache = {k: z[k] for k in z.files}
    pairs = load_pairs(str(HH / name)).pairs
    index = {p: i for i, p in enumerate(pairs["pair_id"].to_list())}
    pairs = pairs[[index[str(p)] for p in cache["pair_id"]]]
    sets = build_feature_sets(pairs, device="cpu", cache_dir=cache_dir / "emb", text_stats=False)
    policy = FeatureSet("policy", np.concatenate([cache[f"mean_{k}_chosen"] for k in PROBE_LAYERS], 1),
                        np.concatenate([cache[f"mean_{k}_rejected"] for k in PROBE_LAYERS], 1),
                        (cache[f"mean_{PROBE_LAYERS[0]}_chosen"].shape[1],) * len(PROBE_LAYERS))
    return pairs, [policy, *sets]


def fit_prior(name: str, feature_sets, reads: tuple[str, ...], *, seen: np.ndarray, trained_on: str,
              sources: dict[str, str]) -> RewardPrior:
    by_name = {fs.name: fs for fs in feature_sets}
    sets = [by_name[r] for r in reads]
    joined = concat_feature_sets(sets, name)
    mean, std = block_standardisation(joined.chosen, joined.rejected, joined.column_block_width())
    scaled = (joined.chosen - joined.rejected) / std
    l2 = nested_l2(scaled, L2_GRID)
    weight = fit_bt_head(scaled, l2=l2) / std
    return RewardPrior(name, reads, tuple(fs.dim for fs in sets), {r: sources[r] for r in reads if r in sources},
                       mean, weight, trained_on, l2, np.unique(seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ens_cache"))
    parser.add_argument("--out-dir", type=Path, default=PRIOR_DIR)
    args = parser.parse_args()
    from curate.models import smollm2_dequantised_dir

    sha = json.loads((smollm2_dequantised_dir() / "curate_source.json").read_text())["file_sha256"]
    sources = {"policy": sha, "reply_emb": EMBEDDER, "relevance": EMBEDDER}
    loaded = {name: hh_feature_sets(name, args.cache_dir) for name in FILES}
    # every prior refuses pairs of either file: a harmless prior on helpful training pairs would be
    # in-sample for the heads' other prior
    seen = np.concatenate([pair_reply_hashes(pairs).ravel() for pairs, _ in loaded.values()])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (file, reads) in PRIORS.items():
        pairs, sets = loaded[file]
        trained_on = f"HH-RLHF {file.split('.')[0]}: {pairs.height} pairs"
        prior = fit_prior(name, sets, reads, seen=seen, trained_on=trained_on, sources=sources)
        prior.save(args.out_dir / f"{name}.npz")
        print(f"{name}: reads {reads}, {prior.weight.size} weights, l2 {prior.l2:g} -> {args.out_dir / name}.npz")


if __name__ == "__main__":
    main()
