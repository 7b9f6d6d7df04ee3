"""A run directory holds everything one analysis produced.

Layout (each file optional, written by the step that owns it)::

    RUN/manifest.json      one section per step: model, settings, counts, timings
    RUN/pairs.parquet      the normalised pairs (pair schema)
    RUN/quarantine.parquet rows refused, with the reason
    RUN/scores.parquet     one row per pair_id, one column per signal; every
                           step merges its columns in (replacing its own)
    RUN/...                step outputs (features, curated sets, checkpoints)

All writes are atomic (temp file + rename) so a killed run never leaves a
half-written file that a later run would read as done.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

PAIRS = "pairs.parquet"
QUARANTINE = "quarantine.parquet"
SCORES = "scores.parquet"
MANIFEST = "manifest.json"
POOLED = "pooled.npz"  # mean-pooled probe-layer reply states of `curate score`
SHARDS = "shards"  # resumable score shards
FEATURES_TABLE = "features.parquet"
FEATURES_SUMMARY = "features_summary.json"
SAE_DIR = "sae"
CURATION = "curation.parquet"  # the audit trail of `curate filter`
HOLDOUT = "holdout.parquet"
EVAL_SUMMARY = "eval.json"
EVAL_TABLE = "eval.parquet"
METRICS = "metrics.jsonl"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(df: pl.DataFrame, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.write_parquet(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    atomic_write_bytes(Path(path), (text + "\n").encode("utf-8"))


class RunDir:
    """Thin accessor over a run directory; creates it on first write."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    # -- pairs ---------------------------------------------------------
    def write_pairs(self, pairs: pl.DataFrame, quarantine: pl.DataFrame) -> None:
        write_parquet(pairs, self.path / PAIRS)
        write_parquet(quarantine, self.path / QUARANTINE)

    def pairs(self) -> pl.DataFrame:
        path = self.path / PAIRS
        if not path.exists():
            raise FileNotFoundError(
                f"{self.path} has no {PAIRS}: run `curate score` or `curate data inspect --out` first"
            )
        return pl.read_parquet(path)

    def quarantine(self) -> pl.DataFrame:
        path = self.path / QUARANTINE
        return pl.read_parquet(path) if path.exists() else pl.DataFrame()

    # -- scores --------------------------------------------------------
    def scores(self) -> pl.DataFrame:
        """All signals computed so far, one row per pair_id (empty if none)."""
        path = self.path / SCORES
        if not path.exists():
            return pl.DataFrame({"pair_id": []}, schema={"pair_id": pl.Utf8})
        return pl.read_parquet(path)

    def merge_scores(self, new: pl.DataFrame) -> pl.DataFrame:
        """Join ``new`` (keyed by pair_id) into scores.parquet, replacing same-named columns."""
        if "pair_id" not in new.columns:
            raise ValueError("score table needs a pair_id column")
        old = self.scores()
        keep = [c for c in old.columns if c == "pair_id" or c not in new.columns]
        if old.height == 0:
            merged = new
        else:
            merged = old.select(keep).join(new, on="pair_id", how="full", coalesce=True)
        write_parquet(merged, self.path / SCORES)
        return merged

    def table(self) -> pl.DataFrame:
        """Pairs joined with every score column (what curation and reports read)."""
        pairs = self.pairs()
        scores = self.scores()
        if scores.width <= 1:
            return pairs
        return pairs.join(scores, on="pair_id", how="left")

    # -- manifest ------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    def update_manifest(self, section: str, info: dict[str, Any]) -> dict[str, Any]:
        manifest = self.manifest()
        manifest[section] = info
        write_json(manifest, self.path / MANIFEST)
        return manifest


@dataclass
class ResolvedPairs:
    """Pairs read from a DataFrame, a run (or curated) directory or a dataset, and where they came from."""

    pairs: pl.DataFrame
    quarantine: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    run: RunDir | None = None  # the source directory, when it was one


def is_run_dir(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and (Path(source).expanduser() / PAIRS).is_file()


def resolve_pairs(source: Any, *, limit: int | None = None, with_scores: bool = False,
                  **load_kwargs: Any) -> ResolvedPairs:
    """Pairs from ``source``: a pair DataFrame, a directory holding ``pairs.parquet``, or anything
    :func:`curate.data.load_pairs` reads (loaded and validated, refused rows in ``quarantine``).

    ``with_scores`` joins a directory's score columns in (what curation, training and eval read).
    """
    if isinstance(source, pl.DataFrame):
        pairs, quarantine, info, run = source, pl.DataFrame(), {"source": "DataFrame"}, None
    elif is_run_dir(source):
        run = RunDir(Path(source).expanduser())
        pairs = run.table() if with_scores else run.pairs()
        quarantine, info = run.quarantine(), {"source": str(source), "kind": "run or curated directory"}
    else:
        from curate.data import load_pairs

        loaded = load_pairs(str(source), limit=limit, **load_kwargs)
        pairs, quarantine, run = loaded.pairs, loaded.quarantine, None
        info = {"source": str(source), "kind": "dataset", "quarantined": loaded.quarantine.height, **loaded.info}
    if limit is not None:
        pairs = pairs.head(limit)
    return ResolvedPairs(pairs, quarantine, info, run)
