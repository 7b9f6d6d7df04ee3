"""Do scored reference log-probs equal the policy's own at step 0 of training? And what does bf16-mixed cost?

    python benchmarks/bench_reference_reuse.py [--pairs 64] [--threads 2]

On real HH-RLHF harmless pairs and the bundled SmolLM2-135M-Instruct, for each
scoring precision (``fp32``, ``bf16`` weights, ``bf16-mixed``):

- the scorer's reply log-probs (``curate.scores.engine.score_encoded``, its own
  length-sorted token-budget batches), timed;
- training's step-0 log-probs of the same pairs in the trainer's layout
  (``collate_shared`` + ``reply_forward``, micro-batches of 4 in a seeded random
  order, fp32 weights, under bf16 autocast when the scoring precision is bf16);
- max and mean |scored - step-0| in nats. ``curate train`` reuses scored values
  when the max is within 1e-3 nats, else recomputes them.

The last line holds the ratios: scoring time of bf16-mixed over bf16 weights,
and each precision's max gap.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from curate.data.chat import ChatEncoder
from curate.data.load import load_pairs
from curate.env import configure
from curate.lm import encode_pairs
from curate.models import load_causal_lm
from curate.scores.engine import score_encoded
from curate.train.batching import collate_shared, reply_forward, sequence_logps

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def scored(lm, pairs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with lm.compute():
        out = score_encoded(lm.model, pairs, want_logps=True)
    return torch.stack([out["logp_chosen"], out["logp_rejected"]], 1).double(), time.perf_counter() - start


@torch.no_grad()
def step0(model, pairs, pad_id: int, bf16: bool, micro: int = 4) -> torch.Tensor:
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for lo in range(0, len(order), micro):
        idx = order[lo:lo + micro]
        batch = collate_shared([pairs[i] for i in idx], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = reply_forward(model, batch)
        chosen, rejected = sequence_logps(logits, batch).double().chunk(2)
        out[idx, 0], out[idx, 1] = chosen, rejected
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_causal_lm(device="cpu", dtype="fp32")
    encoder = ChatEncoder(policy.tokenizer, max_length=policy.model.config.max_position_embeddings)
    pairs = encode_pairs(load_pairs(str(HH), limit=args.pairs).pairs, encoder).pairs
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else encoder.eot_id
    print(f"{len(pairs)} HH harmless pairs, {policy.name}, threads={torch.get_num_threads()}")
    reference = {bf16: step0(policy.model, pairs, pad_id, bf16) for bf16 in (False, True)}
    print(f"{'scoring precision':<20}{'seconds':>9}{'max gap':>11}{'mean gap':>11}  reused by train")
    gaps, seconds = {}, {}
    for precision in ("fp32", "bf16", "bf16-mixed"):
        lm = policy if precision == "fp32" else load_causal_lm(device="cpu", dtype=precision)
        scored(lm, pairs[:2])  # warm-up: kernels, allocator
        values, seconds[precision] = scored(lm, pairs)
        gap = (values - reference[precision != "fp32"]).abs()
        gaps[precision] = float(gap.max())
        print(f"{precision:<20}{seconds[precision]:>9.1f}{gaps[precision]:>11.2e}{float(gap.mean()):>11.2e}  "
              f"{'yes' if gaps[precision] <= 1e-3 else 'no'}", flush=True)
    print(f"ratios: time bf16-mixed/bf16={seconds['bf16-mixed'] / seconds['bf16']:.2f} "
          + " ".join(f"max_gap_{p}={g:.2e}" for p, g in gaps.items()))


if __name__ == "__main__":
    main()
