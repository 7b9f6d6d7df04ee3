"""Throughput of `curate score --engine ray` with 1, 2 (... all GPUs) workers, as ratios in one run.

    python benchmarks/bench_scale.py [--pairs 64] [--shard-size 8] [--model smollm2-135m-instruct]
                                     [--workers 1,2] [--gpus-per-worker 0] [--dtype fp32]

Every setting scores the same real HH-RLHF pairs with the same model into a
fresh run directory, on one Ray runtime started here (``num_cpus`` = the
machine's cores), plus the local engine (one process, all cores) as the
baseline. Two rates per setting:

- ``e2e pairs/s``: pairs over the whole scoring phase (``score_s`` in the
  manifest), which includes starting the actors and loading the model in each;
- ``busy pairs/s``: the sum over workers of pairs / seconds inside
  ``score_shard``: the steady state a long run approaches.

``scaling efficiency`` = busy rate with N workers / (N x busy rate with 1).
On a CPU machine each worker gets one core (torch runs one thread there), so
the ratio is bounded by the cores: on a 2-core machine it cannot pass 2, and
two workers on two cores also share memory bandwidth with each other and with
whatever else runs. Pass ``--gpus-per-worker 1 --workers 1,2,...`` on a GPU
machine for per-GPU scaling efficiency.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")  # as `curate score` does
os.environ["CURATE_QUIET"] = "1"

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"


def _sample(path: Path, n: int) -> Path:
    with gzip.open(HH, "rt") as fh:
        lines = [next(fh) for _ in range(n)]
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)
    return path


def _run(data: Path, out: Path, args, **engine) -> dict:
    from curate.rundir import RunDir
    from curate.score import score

    started = time.perf_counter()
    score(str(data), model=args.model, out=out, scores="ches,logps", dtype=args.dtype, shard_size=args.shard_size,
          device="cpu" if not args.gpus_per_worker else "auto", **engine)
    wall = time.perf_counter() - started
    manifest = RunDir(out).manifest()["score"]
    n = manifest["n_pairs"]
    per_worker = manifest["workers"].get("per_worker")
    busy = sum(w["pairs_per_s"] for w in per_worker) if per_worker else manifest["timings"]["pairs_per_s_this_session"]
    return {"pairs": n, "wall_s": round(wall, 2), "score_s": manifest["timings"]["score_s"],
            "e2e_pairs_per_s": round(n / manifest["timings"]["score_s"], 3), "busy_pairs_per_s": round(busy, 3),
            "workers_used": len(per_worker) if per_worker else 1, "per_worker": per_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    import ray

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    print(f"{args.pairs} HH pairs, {args.model} {args.dtype}, shards of {args.shard_size}, {cores} cores, "
          f"gpus/worker {args.gpus_per_worker:g}")
    print(f"{'setting':<10} {'e2e pairs/s':>12} {'busy pairs/s':>13} {'busy ratio':>11} {'efficiency':>11} {'score_s':>8}",
          flush=True)
    results: dict[str, dict] = {}

    def report(name: str, n: int | None) -> None:
        r, base = results[name], results[f"ray x{workers[0]}"]
        ratio = r["busy_pairs_per_s"] / base["busy_pairs_per_s"]
        efficiency = f"{r['busy_pairs_per_s'] / (n * base['busy_pairs_per_s'] / workers[0]):.2f}" if n else "-"
        print(f"{name:<10} {r['e2e_pairs_per_s']:>12.2f} {r['busy_pairs_per_s']:>13.2f} {ratio:>11.2f} "
              f"{efficiency:>11} {r['score_s']:>8.1f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = _sample(Path(tmp) / "hh.jsonl.gz", args.pairs)
        # warm the model cache (the bundled model is dequantised once) so no setting pays for it
        from curate.models import load_causal_lm

        load_causal_lm(args.model, device="cpu", dtype=args.dtype)
        for n in workers:
            results[f"ray x{n}"] = _run(data, Path(tmp) / f"ray{n}", args, engine="ray", num_workers=n,
                                        gpus_per_worker=args.gpus_per_worker)
            report(f"ray x{n}", n)
        if not args.gpus_per_worker:  # the local engine, one process on all cores, for reference
            results["local"] = _run(data, Path(tmp) / "local", args)
            report("local", None)
    ray.shutdown()
    if args.gpus_per_worker == 0:
        print(f"(CPU: one core per worker; with {cores} cores the busy ratio cannot exceed {cores})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
