"""SparsePO learned masks on the real model: their start per init, and DPO vs SparsePO in a short run (issue 19.3).

1. **Masks at initialisation.** SmolLM2-135M-Instruct's hidden states (all
   30 layers, frozen reference) on the first ``pairs`` short HH harmless
   pairs; for seeds 0-2 and each init of :data:`curate.train.masks.MASK_INITS`
   (``torch``: curate's old init, ``reference``: the SparsePO code's, ``unit``:
   the new default), the mask's mean and exact-zero fraction over reply tokens.
2. **Masked vs DPO reward.** With the per-token log-ratios ρ_t of the policy
   after the seed-0 DPO run (so ρ is a real DPO displacement), the masked
   reward margin u = Σ m ρ(y⁺) − Σ m ρ(y⁻) of each init's mask against DPO's
   Δ = Σ ρ(y⁺) − Σ ρ(y⁻): mean(u) / mean(Δ), 1 for an all-ones mask.
3. **Short training.** DPO, SparsePO with the ``torch`` init and SparsePO with
   the ``unit`` init on the same ``pairs`` pairs, same steps, lr and seeds; the
   mask's mean and zero fraction per step, then fp32 Δ mean log π(y⁺) and
   implicit-reward accuracy on the training pairs and on ``heldout`` others.

    python benchmarks/exp_sparsepo_masks.py --out benchmarks/results/exp_sparsepo_masks_cpu.json
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
import torch

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"
MODEL = "smollm2-135m-instruct"
ARMS = {"dpo": {"loss": "dpo"},
        "sparsepo_torch_init": {"loss": "sparsepo", "mask_init": "torch"},
        "sparsepo_unit_init": {"loss": "sparsepo", "mask_init": "unit"}}


def short_pairs(path: Path, tokenizer, *, max_length: int, n: int):
    """The first ``n`` pairs (file order) whose prompt and longer reply fit in ``max_length`` tokens uncut."""
    from curate.data import load_pairs
    from curate.data.chat import ChatEncoder
    from curate.train.batching import encode_pairs

    pairs = load_pairs(str(path), limit=8 * n).pairs
    enc = encode_pairs(pairs, ChatEncoder(tokenizer, max_length=10**6))
    fits = [row for row, p in zip(enc.kept, enc.pairs) if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= max_length]
    if len(fits) < n:
        raise SystemExit(f"only {len(fits)} pairs fit in {max_length} tokens; raise --max-length")
    return pairs[fits[:n]]


@torch.no_grad()
def reference_states(model, pairs, tokenizer, max_length: int, chunk: int = 4) -> list[tuple]:
    """Per chunk of pairs: the batch, every layer's reference hidden state on reply positions, and
    the reference's per-token log-probs (chunks keep the [2B, R, vocab] logits small)."""
    from curate.data.chat import ChatEncoder
    from curate.train.batching import collate, encode_pairs, on_reply, reply_forward, token_logps

    enc = encode_pairs(pairs, ChatEncoder(tokenizer, max_length=max_length))
    chunks = []
    for start in range(0, len(enc.pairs), chunk):
        batch = collate(enc.pairs[start:start + chunk], tokenizer.pad_token_id)
        logits, hidden = reply_forward(model, batch, hidden_states=True)
        chunks.append((batch, [h.float() for h in hidden], on_reply(token_logps(logits, batch.labels), batch)))
    return chunks


@torch.no_grad()
def token_logratios(policy, chunks) -> list[torch.Tensor]:
    """ρ_t = log π(y_t) − log π_ref(y_t) per reply token, per chunk."""
    from curate.train.batching import on_reply, reply_forward, token_logps

    out = []
    for batch, _, ref_tok in chunks:
        logits, _ = reply_forward(policy, batch)
        out.append(on_reply(token_logps(logits, batch.labels), batch) - ref_tok)
    return out


def make_masks(config, init: str, seed: int):
    from curate.train.masks import SparsePOMasks

    torch.manual_seed(seed)
    return SparsePOMasks(config.num_hidden_layers, config.hidden_size, init=init,
                         init_std=getattr(config, "initializer_range", 0.02),
                         eps=getattr(config, "rms_norm_eps", 1e-5)).eval()


def init_stats(config, chunks, rhos, *, inits, seeds) -> list[dict[str, Any]]:
    """Each init's mask over all reply tokens of the chunks, and its masked margin against DPO's."""
    rows = []
    for init in inits:
        for seed in seeds:
            net = make_masks(config, init, seed).reward
            weights, u, dpo, dead = [], [], [], 0
            for (batch, hidden, _), rho in zip(chunks, rhos):
                with torch.no_grad():
                    m = net(hidden)
                on = batch.valid > 0
                n = on.shape[0] // 2
                weights.append(m[on])
                dead += int(((m * on).sum(-1) == 0).sum())
                u.append(((m * rho)[:n].sum(-1) - (m * rho)[n:].sum(-1)).double())
                dpo.append((rho[:n].sum(-1) - rho[n:].sum(-1)).double())
            w, u, dpo = torch.cat(weights), torch.cat(u), torch.cat(dpo)
            rows.append({
                "init": init, "seed": seed, "mask_mean": float(w.mean()), "zero_fraction": float((w == 0).float().mean()),
                "mask_median": float(w.median()), "mask_max": float(w.max()), "replies_all_zero": dead,
                "masked_over_dpo_margin": float(u.mean() / dpo.mean()),
                "mean_abs_u_over_mean_abs_dpo": float(u.abs().mean() / dpo.abs().mean()),
            })
    return rows


def evaluate_policy(policy, encoded, ref_c, ref_r, beta: float) -> dict[str, float]:
    from curate.eval import implicit_reward_accuracy, reply_logps

    c, r = reply_logps(policy, encoded)
    return {"mean_delta_chosen": float(np.mean(c - ref_c)), "mean_delta_rejected": float(np.mean(r - ref_r)),
            "frac_chosen_fell": float(np.mean(c < ref_c)),
            "ranking_accuracy": float(np.mean(c > r)), "ref_ranking_accuracy": float(np.mean(ref_c > ref_r)),
            "implicit_reward_accuracy": implicit_reward_accuracy(c, r, ref_c, ref_r, beta)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--data", type=Path, default=HH)
    ap.add_argument("--pairs", type=int, default=16, help="training pairs (also the init-statistics pairs)")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from curate.data.chat import ChatEncoder
    from curate.eval import reply_logps
    from curate.lm import encode_pairs
    from curate.models import load_causal_lm
    from curate.train import train

    t_start = time.perf_counter()
    ref = load_causal_lm(MODEL, device="cpu", dtype="fp32")
    ref.model.eval()
    config = ref.model.config
    pairs = short_pairs(args.data, ref.tokenizer, max_length=args.max_length, n=args.pairs + args.heldout)
    train_pairs, held_pairs = pairs[:args.pairs], pairs[args.pairs:]
    encoder = ChatEncoder(ref.tokenizer, max_length=args.max_length)
    sets = {}
    for name, frame in (("train", train_pairs), ("heldout", held_pairs)):
        encoded = encode_pairs(frame, encoder).pairs
        sets[name] = (encoded, *reply_logps(ref.model, encoded))
    chunks = reference_states(ref.model, train_pairs, ref.tokenizer, args.max_length)

    settings = {"lr": args.lr, "beta": args.beta, "batch_size": args.batch_size, "epochs": args.epochs,
                "max_length": args.max_length, "warmup_ratio": 0.0, "bf16": True, "save_every": 0}
    arms = {name: ARMS[name] for name in args.arms}
    runs: list[dict[str, Any]] = []
    rhos, inits = None, []

    def write() -> dict[str, Any]:  # after every run, so a stopped run keeps what it finished
        result = {
            "command": "python benchmarks/exp_sparsepo_masks.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if k != "data"),
            "model": ref.info, "data": str(args.data.name), "torch_threads": args.threads,
            "pairs": {"train": train_pairs.height, "heldout": held_pairs.height,
                      "rule": f"the first pairs in file order whose prompt + longer reply fit in {args.max_length} tokens",
                      "reply_tokens_train": int(sum(int(b.valid.sum()) for b, _, _ in chunks))},
            "train_settings": settings, "init": inits, "runs": runs,
            "summary": summarise(inits, runs),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    for seed in args.seeds:
        for arm, overrides in arms.items():
            work = Path(tempfile.mkdtemp(prefix="exp_masks."))
            policy = load_causal_lm(MODEL, device="cpu", dtype="fp32")
            t0 = time.perf_counter()
            trained = train(train_pairs, out=work, model=policy, progress=False, seed=seed, **settings, **overrides)
            seconds = time.perf_counter() - t0
            steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
            shutil.rmtree(work, ignore_errors=True)
            policy.model.eval()
            if arm == "dpo" and rhos is None:  # the init statistics need a DPO displacement
                rhos = token_logratios(policy.model, chunks)
                inits = init_stats(config, chunks, rhos, inits=("torch", "reference", "unit"), seeds=args.seeds)
            run = {"arm": arm, "seed": seed, "steps": trained.steps, "train_seconds": round(seconds, 1),
                   "final_train_loss": trained.final_loss,
                   "per_step": [{k: s.get(k) for k in ("step", "loss", "reward_accuracy", "mask_mean", "mask_sparsity")}
                                for s in steps]}
            for name, (encoded, ref_c, ref_r) in sets.items():
                run[name] = evaluate_policy(policy.model, encoded, ref_c, ref_r, args.beta)
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("arm", "seed", "train_seconds", "train", "heldout")}), flush=True)
            del policy
            result = write()

    print(json.dumps(result["summary"], indent=2))


def summarise(inits, runs) -> dict[str, Any]:
    from curate.eval import mean_ci

    out: dict[str, Any] = {"init": {}, "runs": {}}
    for init in sorted({r["init"] for r in inits}):
        rows = [r for r in inits if r["init"] == init]
        out["init"][init] = {k: [round(r[k], 4) for r in rows]
                             for k in ("mask_mean", "zero_fraction", "masked_over_dpo_margin")}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rows = [r for r in runs if r["arm"] == arm]
        out["runs"][arm] = {f"{split}.{k}": mean_ci([r[split][k] for r in rows]) for split in ("train", "heldout")
                            for k in ("mean_delta_chosen", "implicit_reward_accuracy", "ranking_accuracy")}
    return out


if __name__ == "__main__":
    main()
