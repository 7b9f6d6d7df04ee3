"""Speed of CHES scoring against the paper's per-pair loop and a bare-forward ceiling.

    python benchmarks/bench_ches.py --pairs 200 [--paper-pairs 32] [--threads 1] [--device cpu]

Every variant runs in this process, on the same real HH-RLHF pairs with the
bundled SmolLM2-135M-Instruct and the same tokenisation, under inference_mode:

(a) paper-style loop: fp32, batch size 1, full forward with all hidden states,
    two forwards per pair (``compute_preference_similarity_per_example.py``);
(b) curate engine, fp32;
(c) curate engine, default settings (dtype auto, token budget, prefix sharing
    on CPU and off on GPU); (c') the same with the other prefix-sharing setting;
(d) ceiling: a bare decoder forward (no hidden-state extraction, no lm_head)
    of the full prompt+reply sequences, in (c)'s batches and dtype;
(d') the same bare forward in batches planned for it (sorted by full length,
    same token budget), in case (c)'s batches flatter the ratio.

(a) may run on the first ``--paper-pairs`` pairs only (it is slow); every
figure is a rate. tokens/s counts the tokens of both full sequences of a pair
(2 x prompt + both replies) for every variant, so it is comparable across
variants even though prefix sharing runs fewer. It also runs the whole
`curate.score` pipeline (loading, tokenising, shards, parquet) at two dataset
sizes and reports its peak memory above the pre-run baseline, and the
Spearman correlation of LN-CHES between (b) fp32 and (c). The last line is
``speedup_vs_paper_loop=X ceiling_ratio=Y`` with X = (c)/(a), Y = (c)/(d).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")  # before torch loads, as `curate score` does

import numpy as np
import polars as pl
import torch

from curate.data.chat import ChatEncoder
from curate.data.load import load_pairs
from curate.models import load_causal_lm
from curate.lm import encode_pair
from curate.score import score
from curate.scores.ches import ln_ches
from curate.lm import left_pad
from curate.scores.engine import (default_attention_budget, default_token_budget, plan_batches,
                                  resolve_prefix_sharing, score_encoded)

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def best_of(repeats, fn):
    """The result and the fastest of ``repeats`` timed runs (GPU timings of one cold run vary by 30%)."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def paper_loop(model, pairs):
    """(a): per pair, two fp32 batch-size-1 forwards with every hidden state; S from the last layer."""
    ln = []
    with torch.inference_mode():
        for pair in pairs:
            sums, lengths = [], []
            for reply in (pair.chosen, pair.rejected):
                ids = torch.tensor([list(pair.prompt) + list(reply)], device=model.device)
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                sums.append(hidden[len(pair.prompt) - 1 : -1].sum(0).cpu())
                lengths.append(len(reply))
            ln.append(ln_ches(sums[0][None], sums[1][None], torch.tensor([lengths[0]]), torch.tensor([lengths[1]])).item())
    return ln


def bare_forward(model, pairs, batches):
    """(d): the decoder alone over both full sequences of each pair, in the given batches."""
    decoder = model.base_model
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in batches:
            seqs = [list(pairs[i].prompt) + list(r) for i in batch for r in (pairs[i].chosen, pairs[i].rejected)]
            ids, mask, positions = left_pad(seqs, device)
            decoder(input_ids=ids, attention_mask=mask, position_ids=positions)


def under(lm, fn, *args, **kwargs):
    """``fn(lm.model, ...)`` in the model's own arithmetic (autocast under bf16-mixed)."""
    with lm.compute():
        return fn(lm.model, *args, **kwargs)


def engine_ln_ches(model, pairs, **kwargs):
    out = score_encoded(model, pairs, want_logps=False, **kwargs)
    n_pos = torch.tensor([len(p.chosen) for p in pairs])
    n_neg = torch.tensor([len(p.rejected) for p in pairs])
    return ln_ches(out["sum_chosen"], out["sum_rejected"], n_pos, n_neg).numpy()


class PeakMemory:
    """Peak resident memory (CPU, sampled) or peak allocated memory (CUDA) during a block, above its start."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.start) / 2**20


def pipeline_peak(lm, device, pairs_frame) -> tuple[float, float]:
    """Peak memory (MiB above the start) and pairs/s of `curate.score` (ches+logps) on these pairs."""
    from curate.data.schema import quarantine_frame
    from curate.rundir import RunDir

    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        RunDir(src).write_pairs(pairs_frame, quarantine_frame([]))
        with PeakMemory(device) as mem:
            _, seconds = timed(lambda: score(src, out=out, lm=lm, scores=("ches", "logps")))
    return mem.mib, pairs_frame.height / seconds


def memory_sweep(lm, encoder, device, small: int, large: int) -> None:
    """Peak memory of the whole pipeline at two dataset sizes, separating size from sequence length.

    A larger sample also holds longer pairs, and the longest batch sets the
    peak of any batched forward. So besides the first ``small`` and ``large``
    pairs as they come, it scores ``large`` pairs none longer than the
    longest of the small set: if memory held anything per pair, that run
    would still grow.
    """
    everything = load_pairs(str(HH)).pairs
    lengths = []
    for r in everything.iter_rows(named=True):
        e = encode_pair(encoder, r["prompt"], r["chosen"], r["rejected"])[0]
        lengths.append(len(e.prompt) + max(len(e.chosen), len(e.rejected)))
    everything = everything.with_columns(pl.Series("_longest", lengths))
    first_small, first_large = everything.head(small), everything.head(large)
    cap = first_small["_longest"].max()
    matched = everything.filter(pl.col("_longest") <= cap).head(large)
    runs = [(f"first {small}", first_small), (f"first {large}", first_large),
            (f"{matched.height} no longer than the first {small}", matched)]
    for name, frame in runs:
        mib, rate = pipeline_peak(lm, device, frame.drop("_longest"))
        print(f"pipeline `curate score` ches+logps, {name} pairs (longest {frame['_longest'].max()} tokens): "
              f"{rate:.2f} pairs/s, peak memory above start {mib:.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200, help="real HH pairs for (b), (c), (d)")
    parser.add_argument("--paper-pairs", type=int, default=None, help="pairs for the slow loop (a); default: --pairs")
    parser.add_argument("--memory-sizes", default=None, help="two pipeline sizes for peak memory, e.g. 50,200")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="time each variant this many times, keep the fastest")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory runs of the pipeline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    os.environ["CURATE_QUIET"] = "1"  # no progress bars inside the measurements
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_pairs(str(HH), limit=args.pairs + 20)
    rows = loaded.pairs.head(args.pairs)
    fp32 = load_causal_lm(dtype="fp32", device=args.device)
    default = load_causal_lm(device=args.device)
    device = default.device
    encoder = ChatEncoder(default.tokenizer, max_length=default.model.config.max_position_embeddings)
    pairs = [encode_pair(encoder, r["prompt"], r["chosen"], r["rejected"])[0] for r in rows.iter_rows(named=True)]
    paper_pairs = pairs[: args.paper_pairs or len(pairs)]
    tokens = np.array([2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs])
    print(f"device={device} threads={torch.get_num_threads()} default_dtype={default.precision} pairs={len(pairs)} "
          f"paper_loop_pairs={len(paper_pairs)} tokens/pair={tokens.mean():.0f} "
          f"prompt_share={sum(2 * len(p.prompt) for p in pairs) / tokens.sum():.2f}")

    sizes = [int(s) for s in args.memory_sizes.split(",")] if args.memory_sizes else [max(2, len(pairs) // 4), len(pairs)]
    if args.memory_only:
        memory_sweep(default, encoder, device, *sizes)
        return
    budget = default_token_budget(default.model)
    attention_budget = default_attention_budget(default.model)
    batches = plan_batches(pairs, token_budget=budget, prefix_sharing=resolve_prefix_sharing(default.model, None),
                           attention_budget=attention_budget)
    # warm-up (allocator, kernels) so no variant pays for first-call costs
    under(default, score_encoded, pairs[:2], want_logps=False)
    score_encoded(fp32.model, pairs[:2], want_logps=False)
    paper_loop(fp32.model, pairs[:1])

    rate = {}
    print(f"{'variant':<34}{'pairs':>7}{'seconds':>10}{'pairs/s':>10}{'tokens/s':>11}", flush=True)

    def report(name, n, seconds):
        rate[name.split()[0]] = n / seconds
        print(f"{name:<34}{n:>7}{seconds:>10.2f}{n / seconds:>10.2f}{tokens[:n].sum() / seconds:>11.0f}", flush=True)

    ln_a, t_a = best_of(args.repeats, lambda: paper_loop(fp32.model, paper_pairs))
    report("(a) paper loop fp32 bs1", len(paper_pairs), t_a)
    ln_c, t_c = best_of(args.repeats, lambda: under(default, engine_ln_ches, pairs))
    report(f"(c) curate default ({default.precision})", len(pairs), t_c)
    _, t_d = best_of(args.repeats, lambda: under(default, bare_forward, pairs, batches))
    report("(d) bare forward ceiling", len(pairs), t_d)
    print(f"partial: speedup_vs_paper_loop={rate['(c)'] / rate['(a)']:.2f} "
          f"ceiling_ratio={rate['(c)'] / rate['(d)']:.2f}", flush=True)
    other = not resolve_prefix_sharing(default.model, None)
    _, t_c2 = best_of(args.repeats, lambda: under(default, engine_ln_ches, pairs, prefix_sharing=other))
    report(f"(c') default, prefix sharing {'on' if other else 'off'}", len(pairs), t_c2)
    ln_b, t_b = best_of(args.repeats, lambda: engine_ln_ches(fp32.model, pairs))
    report("(b) curate fp32", len(pairs), t_b)

    from scipy.stats import spearmanr

    agree_a = np.max(np.abs(np.array(ln_a) - ln_b[: len(ln_a)]) / (np.abs(ln_a).max() + 1e-12))
    print(f"max |LN-CHES (a) - (b)| / max|LN-CHES| = {agree_a:.2e}")
    rho = spearmanr(ln_b, ln_c).statistic
    print(f"spearman LN-CHES (b) fp32 vs (c) default over {len(pairs)} pairs = {rho:.4f}", flush=True)

    memory_sweep(default, encoder, device, *sizes)

    # (d') the same bare forward with batches planned for it (full sequences sorted by length, same budget)
    own = plan_batches(pairs, token_budget=budget, prefix_sharing=False, attention_budget=attention_budget)
    _, t_own = best_of(args.repeats, lambda: under(default, bare_forward, pairs, own))
    report("(d') bare forward, own batches", len(pairs), t_own)

    own_ratio = rate["(c)"] / rate["(d')"]
    print(f"ratios: (c)/(a)={rate['(c)'] / rate['(a)']:.2f} (c)/(d)={rate['(c)'] / rate['(d)']:.2f} "
          f"(c)/(d')={own_ratio:.2f} "
          f"(b)/(a)={rate['(b)'] / rate['(a)']:.2f}")
    print(f"speedup_vs_paper_loop={rate['(c)'] / rate['(a)']:.2f} ceiling_ratio={rate['(c)'] / rate['(d)']:.2f}")


if __name__ == "__main__":
    main()
