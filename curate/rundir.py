"""A run directory holds everything one analysis produced.

Layout (each file optional, written by the step that owns it)::

    RUN/manifest.json      one section per step: model, settings, counts, timings
    RUN/pairs.parquet      the normalised pairs (pair schema)
    RUN/quarantine.parquet rows refused, with the reason
    RUN/scores.parquet     one row per pair_id, one column per signal; every
                           step merges its columns in (replacing its own)
    RUN/...                step outputs (features, curated sets, checkpoints)

All writes are atomic (temp file + rename) so a killed run never leaves a
half-written file that a later run would read as done. Every file name is a
constant below, defined once; each manifest section a producer writes and a
consumer reads is a dataclass (:class:`LoadSection`, :class:`ScoreSection`),
written and read through :meth:`RunDir.write_section` / :meth:`RunDir.section`.

A run holds one dataset: :meth:`RunDir.adopt_pairs` records its fingerprint
(a digest of every pair's id and texts) and refuses pairs of another dataset
unless ``force``, which first removes every output made from the old pairs.
"""

from __future__ import annotations

import json
import os
import tempfile
import hashlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, TypeVar

import polars as pl

from curate.errors import CurateError
from curate.fsutil import remove_inside

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
# step directories of `curate run` inside RUN (one subdirectory per named train / eval run)
CURATED_DIR, EXPORT_DIR, TRAIN_DIR, EVAL_DIR = "curated", "export", "train", "eval"
# what `adopt_pairs(force=True)` removes: everything computed from the pairs of a run
DERIVED = (SCORES, POOLED, SHARDS, FEATURES_TABLE, FEATURES_SUMMARY, SAE_DIR)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` that replaces it when the block succeeds, and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        remove_inside(tmp, path.parent)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_parquet(df: pl.DataFrame, path: Path) -> None:
    with replacing(path) as tmp:
        df.write_parquet(tmp)


def write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    atomic_write_bytes(Path(path), (text + "\n").encode("utf-8"))


def fresh_shards(shard_dir: Path, plan: dict[str, Any], *, plan_file: str, pattern: str) -> Path:
    """``shard_dir`` holding resumable shards made under ``plan``; ``pattern`` shards of other settings are removed."""
    plan_path = shard_dir / plan_file
    if plan_path.exists() and json.loads(plan_path.read_text()) != json.loads(json.dumps(plan, default=str)):
        for old in shard_dir.glob(pattern):
            remove_inside(old, shard_dir)
    write_json(plan, plan_path)
    return shard_dir


# ------------------------------------------------------------------ manifest sections
S = TypeVar("S", bound="Section")
SECTIONS: dict[str, type["Section"]] = {}  # manifest key -> its dataclass (filled as the classes are defined)


@dataclass
class Section:
    """One manifest section. Keys a reader does not know are kept in ``extra`` and written back."""

    name: ClassVar[str]
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SECTIONS[cls.name] = cls

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = json.loads(json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                                     for k, v in out.items()}, default=str))
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


@dataclass
class LoadSection(Section):
    """Where the run's pairs came from, and the dataset's fingerprint (:func:`dataset_fingerprint`)."""

    name: ClassVar[str] = "load"
    dataset: str = ""
    fingerprint: str | None = None
    pairs: int = 0
    quarantined: int = 0


@dataclass
class Truncation:
    rule: str = "keep replies whole; cut the prompt from the left so prompt + longer reply fit"
    max_length: int | None = None
    pairs_with_prompt_cut: int = 0
    pairs_quarantined_reply_over_context: int = 0
    pairs_quarantined_cannot_encode: int = 0


@dataclass
class ScoreSection(Section):
    """What `curate score` did: model, tokenisation (``truncation.max_length``), batching, counts, timings."""

    name: ClassVar[str] = "score"
    data: dict[str, Any] = field(default_factory=dict)
    n_pairs: int = 0
    scores: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    device: str | None = None
    dtype: str | None = None
    pooled_layer: int | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    truncation: Truncation | None = None
    system_prompt: str = "default"
    n_scored: int | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    seconds_total: float | None = None
    engine: str = "local"  # local | ray
    workers: dict[str, Any] = field(default_factory=dict)  # num_workers, per-worker throughput (ray)

    def __post_init__(self) -> None:
        if isinstance(self.truncation, Mapping):
            self.truncation = Truncation(**self.truncation)


@dataclass
class RewardSection(Section):
    """The reward ensemble (``curate.scores.reward``): members, feature sets, out-of-fold quality."""

    name: ClassVar[str] = "reward"
    members: list[dict[str, Any]] = field(default_factory=list)
    oof_auc: float | None = None
    out_of_fold: bool | None = None
    auc_protocol: str | None = None
    auc_by_feature_set: dict[str, Any] | None = None
    auc_by_member_group: dict[str, Any] | None = None
    priors: list[dict[str, Any]] = field(default_factory=list)  # shipped reward priors: used, or why not


@dataclass
class NoiseSection(Section):
    """The flip-rate estimates (``curate.scores.noise``) and which one set ``flip_prob``."""

    name: ClassVar[str] = "noise"
    default_estimator: str | None = None
    flip_rate: float | None = None
    flip_rate_interval: list[float] | None = None
    identifiable: bool | None = None
    flip_rate_posterior_mean: float | None = None  # the mean of eps under the profile likelihood (flat prior)
    conservative_rate: float | None = None  # the rate flip_prob_conservative (what actions read) is computed at
    conservative_basis: str | None = None
    summary: str | None = None
    estimators: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> rate, interval, assumption, ...


@dataclass
class FeaturesSection(Section):
    """``curate features``: the embedder, the SAE settings and the ``sae_f*`` columns it wrote."""

    name: ClassVar[str] = "features"
    embedder: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    sae_dir: str = SAE_DIR
    timings_s: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurationSection(Section):
    """``curate filter``: the rules, what each did, the counts, and the files of the curated directory."""

    name: ClassVar[str] = "curation"
    per_rule: list[dict[str, Any]] = field(default_factory=list)
    overlaps: list[list[int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    holdout_fraction: float = 0.0
    signals: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    run: str | None = None  # the source run directory
    files: list[str] = field(default_factory=lambda: [PAIRS])


@dataclass
class TrainSection(Section):
    """``curate train``: its config and fingerprint, and where the reference log-probs came from."""

    name: ClassVar[str] = "train"
    status: str | None = None  # started | finished
    fingerprint: dict[str, Any] | None = None  # what a resume must match
    config: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None  # where the reference log-probs came from


@dataclass
class EvalSection(Section):
    """``curate eval``'s summary (``eval.json`` of an eval directory)."""

    name: ClassVar[str] = "eval"
    pairs: int | None = None
    ranking_accuracy: dict[str, float] = field(default_factory=dict)  # reference, policy
    ranking_accuracy_length_normalised: dict[str, float] = field(default_factory=dict)
    implicit_reward_accuracy: float | None = None
    displacement: dict[str, Any] = field(default_factory=dict)
    spearman_ln_ches_vs_delta_chosen: dict[str, Any] | None = None


def dataset_fingerprint(pairs: pl.DataFrame) -> str:
    """A digest of every pair's id, prompt and replies, in order."""
    digest = hashlib.sha256()
    for pair_id, prompt, chosen, rejected in pairs.select("pair_id", "prompt", "chosen", "rejected").iter_rows():
        digest.update(json.dumps([pair_id, prompt, chosen, rejected], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


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
        """Write one section; a known section goes through its dataclass (its fields, then ``extra``)."""
        manifest = self.manifest()
        manifest[section] = SECTIONS[section].from_dict(info).to_dict() if section in SECTIONS else info
        write_json(manifest, self.path / MANIFEST)
        return manifest

    def section(self, cls: type[S]) -> S | None:
        data = self.manifest().get(cls.name)
        return cls.from_dict(data) if data is not None else None

    def write_section(self, section: Section) -> None:
        self.update_manifest(section.name, section.to_dict())

    # -- one dataset per run -------------------------------------------
    def adopt_pairs(self, pairs: pl.DataFrame, quarantine: pl.DataFrame, *, source: str,
                    force: bool = False) -> None:
        """Write pairs loaded from ``source``; refuse a run that holds another dataset unless ``force``."""
        fingerprint = dataset_fingerprint(pairs)
        load = self.section(LoadSection)
        held = load.fingerprint if load is not None else (
            dataset_fingerprint(self.pairs()) if self.exists(PAIRS) else None)
        if held is not None and held != fingerprint:
            if not force:
                raise CurateError(
                    f"{self.path} already holds another dataset (fingerprint {held}; these pairs are {fingerprint}): "
                    "pass --force to replace it and its scores, or pick a new --out")
            self.remove_derived()
        self.write_pairs(pairs, quarantine)
        self.write_section(LoadSection(dataset=source, fingerprint=fingerprint, pairs=pairs.height,
                                       quarantined=quarantine.height))

    def remove_derived(self) -> None:
        """Delete every output computed from the run's pairs, and the manifest that describes them."""
        for name in (*DERIVED, MANIFEST):
            remove_inside(self.path / name, self.path)


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
