"""`curate score --engine ray`: the shards of a run scored by Ray Data, one model copy per worker.

The pipeline (the way NeMo-Curator and data-juicer run their model stages):

1. the driver reads the pairs, plans the shards exactly as local mode does and
   keeps only the unfinished ones (resume is decided by the shard files, so it
   does not matter which worker, or which engine, wrote a finished shard);
2. each unfinished shard becomes one row of a Ray Dataset (its pairs as Arrow
   IPC bytes), so a shard is never split between workers;
3. ``map_batches`` runs :class:`ShardScorer`, a stateful actor class, on a
   fixed pool of ``num_workers`` actors and ``num_gpus=gpus_per_worker``: every actor
   loads the model once and then scores whole shards with
   :func:`curate.score.score_shard`, the same call local mode makes. The actor
   tokenizes its shard itself: encoding is a small part of a shard's time next
   to the forward passes, and keeping it in the same call keeps the two
   engines' outputs identical;
4. the driver writes each returned shard atomically to ``RUN/shards/`` as it
   arrives (workers need no shared filesystem), then merges the shards as
   local mode does. Reward heads, noise and features run on the driver after.

Failures: Ray Data restarts an actor that dies and retries the shard it held
(``max_restarts=-1``, ``max_task_retries=-1`` are its defaults for actor
pools), so a killed worker costs that one shard's work. If the driver itself
dies, the shards written so far are kept and a rerun scores only the rest. A
pair the tokenizer cannot encode is quarantined exactly as in local mode (it is
the same function).

Before the pipeline starts, one task loads the model on a worker to report
what the shard plan and the manifest need (model identity, resolved device,
dtype, context length): one extra model load, so the driver never has to hold
the model itself.
"""

from __future__ import annotations

import io
import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import polars as pl

from curate.errors import CurateError

INSTALL_HINT = "pip install 'curate[ray]'"


def import_ray():
    """``ray`` with Ray Data, or a CurateError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in the ray[data] extra
    except ImportError:
        raise CurateError(f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Use the Ray runtime already started in this process, else join ``address``, else start a local one.

    ``address`` None also honours ``RAY_ADDRESS`` (as ``ray.init`` does). Only
    a runtime started here is shut down afterwards.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=address)
            else:
                ray.init(include_dashboard=False)
        except ConnectionError as exc:
            raise CurateError(f"cannot reach the Ray cluster at {address!r} ({exc}); check --ray-address") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a local raylet that did not start in time on a busy machine
            raise CurateError(f"Ray did not start ({type(exc).__name__}: {exc}); retry, or start it with "
                              "`ray start --head` and pass --ray-address auto") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _unwrap_task_error(ray, exc: Exception) -> Exception:
    """A CurateError raised on a worker, as itself; anything else as it came."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, CurateError):
        return cause
    return exc


def check_resources(ray, num_workers: int, gpus_per_worker: float) -> None:
    """Refuse a request the cluster cannot place (Ray would otherwise wait for it forever)."""
    if num_workers < 1:
        raise CurateError("--num-workers must be at least 1")
    if gpus_per_worker < 0:
        raise CurateError("--gpus-per-worker must be 0 (CPU workers) or more")
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        have = resources.get("GPU", 0.0)
        if have < num_workers * gpus_per_worker:
            raise CurateError(
                f"the Ray cluster has {have:g} GPUs but {num_workers} workers x {gpus_per_worker:g} GPUs were asked for; "
                "lower --num-workers or --gpus-per-worker"
            )
    elif resources.get("CPU", 0.0) < num_workers:
        raise CurateError(
            f"the Ray cluster has {resources.get('CPU', 0.0):g} CPUs, fewer than --num-workers {num_workers} CPU workers; "
            "lower --num-workers"
        )


def _worker_resources(gpus_per_worker: float) -> dict[str, float]:
    # A CPU worker takes one core (Ray then runs torch on one thread); a GPU worker its GPUs.
    return {"num_gpus": gpus_per_worker, "num_cpus": 1} if gpus_per_worker > 0 else {"num_cpus": 1}


def _describe(load: dict[str, Any], prefix_sharing: bool | None, max_length: int | None) -> dict[str, Any]:
    from curate.models import load_causal_lm
    from curate.score import model_facts

    return model_facts(load_causal_lm(**load), prefix_sharing=prefix_sharing, max_length=max_length)


def describe_model(ray, load: dict[str, Any], *, prefix_sharing: bool | None, max_length: int | None,
                   gpus_per_worker: float) -> dict[str, Any]:
    """:func:`curate.score.model_facts` of the model as a worker loads it (one task, one load)."""
    task = ray.remote(**_worker_resources(gpus_per_worker), max_retries=0)(_describe)
    try:
        return ray.get(task.remote(load, prefix_sharing, max_length))
    except ray.exceptions.RayTaskError as exc:
        raise _unwrap_task_error(ray, exc) from None


def _to_ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue()


def _from_ipc(blob: bytes) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(blob))


class ShardScorer:
    """The Ray actor: loads the model once, then scores whole shards (one row of the dataset each)."""

    def __init__(self, load: dict[str, Any], settings: dict[str, Any]):
        from curate.data.chat import ChatEncoder
        from curate.models import load_causal_lm

        started = time.perf_counter()
        self.lm = load_causal_lm(**load)
        self.load_s = time.perf_counter() - started
        self.encoder = ChatEncoder(self.lm.tokenizer, system_prompt=settings["system_prompt"],
                                   max_length=settings["max_length"])
        self.settings = settings
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from curate.score import score_shard

        s = self.settings
        out: dict[str, list] = {key: [] for key in ("shard", "frame", "worker", "seconds", "n_pairs", "n_tokens", "load_s")}
        for shard, blob in zip(batch["shard"], batch["pairs"]):
            pairs = _from_ipc(blob)
            tokens = [0]

            def on_batch(n_pairs: int, n_tokens: int) -> None:
                tokens[0] += n_tokens

            started = time.perf_counter()
            frame = score_shard(self.lm, self.encoder, pairs, s["scores"], batch_size=s["batch_size"],
                                token_budget=s["token_budget"], prefix_sharing=s["prefix_sharing"], on_batch=on_batch)
            out["seconds"].append(time.perf_counter() - started)
            out["shard"].append(int(shard))
            out["frame"].append(_to_ipc(frame))
            out["worker"].append(self.worker)
            out["n_pairs"].append(pairs.height)
            out["n_tokens"].append(tokens[0])
            out["load_s"].append(self.load_s)
        return out


def score_shards(ray, shards: Sequence[tuple[int, pl.DataFrame]], *, load: dict[str, Any], settings: dict[str, Any],
                 num_workers: int, gpus_per_worker: float, write_shard: Callable[[int, pl.DataFrame], None],
                 on_shard: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Score ``(shard index, pairs)`` on ``num_workers`` actors; ``write_shard`` stores each result as it arrives.

    Returns one summary per worker process: shards, pairs, tokens, busy
    seconds (time inside :func:`curate.score.score_shard`), pairs/s and
    tokens/s over those seconds, and its model load time.
    """
    if not shards:
        return []
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = os.environ.get("CURATE_QUIET") != "1"
    rows = [{"shard": k, "pairs": _to_ipc(frame)} for k, frame in shards]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardScorer, fn_constructor_kwargs={"load": load, "settings": settings}, batch_size=1,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(rows))),
        **_worker_resources(gpus_per_worker),
    )
    workers: dict[str, dict[str, Any]] = {}
    try:
        for row in dataset.iter_rows():
            write_shard(int(row["shard"]), _from_ipc(row["frame"]))
            stats = workers.setdefault(str(row["worker"]), {"worker": str(row["worker"]), "shards": 0, "pairs": 0,
                                                            "tokens": 0, "busy_s": 0.0})
            stats["shards"] += 1
            stats["pairs"] += int(row["n_pairs"])
            stats["tokens"] += int(row["n_tokens"])
            stats["busy_s"] += float(row["seconds"])
            stats["load_model_s"] = round(float(row["load_s"]), 3)
            if on_shard is not None:
                on_shard(int(row["n_pairs"]), int(row["n_tokens"]))
    except ray.exceptions.RayTaskError as exc:
        raise _unwrap_task_error(ray, exc) from None
    for stats in workers.values():
        busy = max(stats["busy_s"], 1e-9)
        stats["pairs_per_s"] = round(stats["pairs"] / busy, 3)
        stats["tokens_per_s"] = round(stats["tokens"] / busy, 1)
        stats["busy_s"] = round(stats["busy_s"], 3)
    return sorted(workers.values(), key=lambda w: w["worker"])
