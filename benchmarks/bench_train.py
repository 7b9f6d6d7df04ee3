"""Training speed: curate's DPO against TRL's DPOTrainer, same model, data and settings, one process.

Each contender trains the dequantised bundled SmolLM2-135M-Instruct (fp32
master weights, bf16 autocast) on the same 32 HH-RLHF harmless pairs, batch 4,
max length 512, 8 optimizer steps (one epoch), from the same initial weights:

- curate: ``curate.train.train`` with its default DPO (reference log-probs
  precomputed once; the time counts tokenisation, the precompute, the steps
  and writing the final model);
- TRL default: ``DPOTrainer`` as configured by default (reference forward at
  every step; TRL's own defaults, e.g. gradient_checkpointing=True, stay on);
- TRL precompute: the same with ``precompute_ref_log_probs=True`` (its
  precompute, done in the constructor, is timed).

TRL times count the constructor (tokenisation, precompute) and ``train()``.
Prints pairs/s for each (wall clock, and per CPU-second of this process, which
a machine shared with other jobs disturbs less; run with OMP_NUM_THREADS=1 there)
and ends with ``speedup_vs_trl=X`` (wall clock, curate against TRL default). ``--no-gc`` adds a TRL default run with gradient checkpointing
off, to show how much of the gap that default explains.

    .venv/bin/python benchmarks/bench_train.py [--pairs 32] [--steps 8] [--no-gc]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def time_curate(loaded, pairs, args) -> float:
    from curate.train import train

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = train(pairs, out=out, model=loaded, loss="dpo", beta=0.1, lr=1e-6, batch_size=args.batch,
                       max_length=args.max_length, bf16=True, max_steps=args.steps, save_every=0, progress=False)
        seconds = time.perf_counter() - t0
    print(f"  curate: reference precompute {result.info['reference_precompute_s']:.1f}s, "
          f"final loss {result.final_loss:.4f}, prompt truncated in {result.info['prompt_truncated']} pairs")
    return seconds


def time_trl(loaded, pairs, args, *, precompute: bool, gradient_checkpointing: bool | None = None) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": [dict(m) for m in p], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in pairs.select("prompt", "chosen", "rejected").iter_rows()]
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_length=args.max_length,
                           bf16=True, max_steps=args.steps, use_cpu=True, report_to="none", save_strategy="no",
                           logging_steps=1, precompute_ref_log_probs=precompute, beta=0.1, learning_rate=1e-6,
                           disable_tqdm=True, dataloader_num_workers=0, **extra)
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=loaded.model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=loaded.tokenizer)
        trainer.train()
        seconds = time.perf_counter() - t0
    print(f"  trl: gradient_checkpointing={config.gradient_checkpointing}, "
          f"final loss {trainer.state.log_history[-2].get('loss', float('nan')) if len(trainer.state.log_history) > 1 else 'n/a'}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--no-gc", action="store_true", help="also time TRL default with gradient checkpointing off")
    args = parser.parse_args()

    import torch

    from curate.data import load_pairs
    from curate.models import load_causal_lm

    pairs = load_pairs(str(HH), limit=args.pairs).pairs.head(args.pairs)
    base = load_causal_lm("smollm2-135m-instruct", device="cpu", dtype="fp32")
    print(f"torch threads {torch.get_num_threads()}, {pairs.height} HH pairs, batch {args.batch}, "
          f"max length {args.max_length}, {args.steps} steps, bf16 autocast, model {base.info.get('source')}")

    def fresh():
        copy_ = copy.copy(base)
        copy_.model = copy.deepcopy(base.model)
        return copy_

    n = args.batch * args.steps
    runs = [("curate dpo", lambda: time_curate(fresh(), pairs, args)),
            ("trl default", lambda: time_trl(fresh(), pairs, args, precompute=False)),
            ("trl precompute", lambda: time_trl(fresh(), pairs, args, precompute=True))]
    if args.no_gc:
        runs.append(("trl default, no grad ckpt", lambda: time_trl(fresh(), pairs, args, precompute=False,
                                                                   gradient_checkpointing=False)))
    rate, cpu_rate = {}, {}
    for name, run in runs:
        cpu0 = time.process_time()
        seconds = run()
        cpu = time.process_time() - cpu0
        rate[name], cpu_rate[name] = n / seconds, n / cpu
        print(f"{name:28s} {seconds:8.1f} s  {rate[name]:.3f} pairs/s   (cpu {cpu:8.1f} s, {cpu_rate[name]:.3f} pairs/cpu-s)",
              flush=True)
    print(f"cpu_time_speedup_vs_trl={cpu_rate['curate dpo'] / cpu_rate['trl default']:.2f} "
          f"cpu_time_speedup_vs_trl_precompute={cpu_rate['curate dpo'] / cpu_rate['trl precompute']:.2f}")
    print(f"speedup_vs_trl_precompute={rate['curate dpo'] / rate['trl precompute']:.2f}")
    if "trl default, no grad ckpt" in rate:
        print(f"speedup_vs_trl_no_gc={rate['curate dpo'] / rate['trl default, no grad ckpt']:.2f}")
    print(f"speedup_vs_trl={rate['curate dpo'] / rate['trl default']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
