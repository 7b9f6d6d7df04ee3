"""Cache the bundled policy's reply states at several layers for the reward-ensemble selection (one pass).

    PYTHONPATH=. python benchmarks/cache_policy_layers.py --data harmless-base-test-dev.jsonl.gz \
        --out /tmp/ens_cache/harmless.npz [--layers 8,12,16,20,24,30] [--limit N]

One shared-prompt forward per batch (the engine's batching on CPU, the
probe tap on every requested block) gives, per pair and layer k (``hidden_states[k]``; 30 is the last,
after the final norm): ``mean_<k>_{chosen,rejected}``, the mean of the states
predicting the reply (what ``RUN/pooled.npz`` holds at the probe layer), and
``last_<k>_{chosen,rejected}``, the state predicting the reply's end-of-turn
token; plus the reply log-probs (``logp_*``, summed) and token counts
(``len_*``), and the ``pair_id`` of every pair kept. ``benchmarks/exp_ensemble_hh.py``
reads it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from curate.data.chat import ChatEncoder
from curate.data.load import load_pairs
from curate.lm import encode_pairs, pair_rows, reply_states, token_logps
from curate.models import load_causal_lm
from curate.scores.engine import CPU_ATTENTION_BUDGET, CPU_TOKEN_BUDGET, plan_batches

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="harmless-base-test-dev.jsonl.gz", help="file name under shared/data/hh-rlhf")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", default="8,12,16,20,24,28,30")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=128, help="pairs per saved prefix")
    args = parser.parse_args()
    layers = [int(k) for k in args.layers.split(",")]

    pairs = load_pairs(str(HH / args.data), limit=args.limit).pairs
    lm = load_causal_lm()
    encoder = ChatEncoder(lm.tokenizer, max_length=lm.model.config.max_position_embeddings)
    encoding = encode_pairs(pairs, encoder)
    encoded = encoding.pairs
    n = len(encoded)
    out: dict[str, np.ndarray] = {}

    def put(name: str, rows, values: torch.Tensor) -> None:
        if name not in out:
            out[name] = np.zeros((n, *values.shape[1:]), dtype=np.float32)
        out[name][rows] = values.float().cpu().numpy()

    started = time.perf_counter()
    tapped = [k for k in layers if k < lm.model.config.num_hidden_layers]
    done = 0
    for batch in plan(encoded, args.chunk):
        prompts, replies, owner = pair_rows([encoded[i] for i in batch])
        with lm.compute():  # the scorer's arithmetic
            states = reply_states(lm.model, prompts, replies, owner, shared_prompt=True, probe=tapped)
        valid = states.valid
        lengths = states.lengths
        rows = torch.arange(len(replies))
        hidden = dict(zip(tapped, states.probe.split(states.states.shape[-1], dim=-1)))
        hidden[lm.model.config.num_hidden_layers] = states.states  # hidden_states' last entry: after the final norm
        targets = torch.zeros(valid.shape, dtype=torch.long)
        for row, reply in enumerate(replies):
            targets[row, :len(reply)] = torch.as_tensor(reply, dtype=torch.long)
        with torch.inference_mode(), lm.compute():
            token_lp = token_logps(lm.model, states.states[valid], targets[valid], chunk_size=256)
        logp = torch.zeros(len(replies)).index_add_(0, valid.nonzero()[:, 0], token_lp.float())
        b = len(batch)
        for side, half in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
            for k in layers:
                h = hidden[k].float() * valid.unsqueeze(-1)
                put(f"mean_{k}_{side}", batch, (h.sum(1) / lengths.unsqueeze(1))[half])
                put(f"last_{k}_{side}", batch, hidden[k][rows, lengths - 1].float()[half])
            put(f"logp_{side}", batch, logp[half])
            put(f"len_{side}", batch, lengths[half].float())
        done += b
        if done % args.chunk == 0 or done == n:  # a usable prefix of the pairs after every chunk
            kept = np.array([pairs["pair_id"][i] for i in encoding.kept])
            save(args.out, {k: v[:done] for k, v in out.items()}, kept[:done])
            print(f"{done}/{n} pairs, {time.perf_counter() - started:.0f}s", flush=True)
    print(f"{n} pairs ({len(encoding.skipped)} skipped), layers {layers} -> {args.out}")


def plan(encoded, chunk: int):
    """The engine's batches within consecutive chunks of pairs, so a killed run leaves the first chunks."""
    for lo in range(0, len(encoded), chunk):
        for batch in plan_batches(encoded, token_budget=CPU_TOKEN_BUDGET, prefix_sharing=True,
                                  attention_budget=CPU_ATTENTION_BUDGET, indices=range(lo, min(lo + chunk, len(encoded)))):
            yield batch


def save(path: Path, arrays: dict[str, np.ndarray], pair_id: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, pair_id=pair_id, **arrays)
    tmp.replace(path)


if __name__ == "__main__":
    main()
