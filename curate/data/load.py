"""Load preference data from hub names or local files into the pair schema.

Every input row ends up either as a pair or in the quarantine table with its
reason and source location (``file:line``, 0-based); nothing is dropped
silently. Exact duplicates of an earlier pair (same prompt and the same two
replies, in either order) are quarantined too, since ``pair_id`` is the join key.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import polars as pl

from curate.data.formats import FORMATS, RowError, detect_format, parse_record
from curate.data.schema import make_pair_id, pairs_frame, quarantine_frame
from curate.errors import CurateError

# Short names for well-known hub datasets: (hub id, default split).
HUB_ALIASES: dict[str, tuple[str, str]] = {
    "hh-rlhf": ("Anthropic/hh-rlhf", "train"),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
}
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


@dataclass
class LoadResult:
    pairs: pl.DataFrame
    quarantine: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ raw records
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path.name}:{lineno}", RowError("unparseable_line", f"{exc.msg} (column {exc.colno})")


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise CurateError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if isinstance(data, dict):  # {"data": [...]} or column-oriented {"chosen": [...], ...}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and all(isinstance(v, list) for v in data.values()):
            data = [dict(zip(data, row)) for row in zip(*data.values())]
    if not isinstance(data, list):
        raise CurateError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(data):
        yield f"{path.name}:{i}", rec


def _table_records(rows, name: str) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(rows):
        yield f"{name}:{i}", rec


def local_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Raw records of a local file or ``datasets.save_to_disk`` directory."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            return _table_records(ds, path.name)
        if (path / "pairs.parquet").exists():  # a curate run / curated directory
            return local_records(path / "pairs.parquet")
        raise CurateError(f"{path} is a directory but neither a datasets save_to_disk dir nor a curate run")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_records(path)
    if name.endswith((".json", ".json.gz")):
        return _json_records(path)
    if name.endswith(".parquet"):
        return _table_records(pl.read_parquet(path).iter_rows(named=True), path.name)
    if name.endswith(".csv"):
        return _table_records(pl.read_csv(path, infer_schema=False).iter_rows(named=True), path.name)
    raise CurateError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} or a save_to_disk dir")


def hub_records(name: str, *, subset=None, split=None, revision=None, streaming=False):
    """Raw records of a hub dataset through ``datasets.load_dataset``."""
    import datasets

    hub_id, default_split = HUB_ALIASES.get(name.lower(), (name, "train"))
    kwargs: dict[str, Any] = {"split": split or default_split, "revision": revision, "streaming": streaming}
    if hub_id == "Anthropic/hh-rlhf":
        kwargs["data_dir"] = subset  # hh-rlhf's subsets are folders, not configs
        args: tuple = (hub_id,)
    else:
        args = (hub_id, subset) if subset else (hub_id,)
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        raise CurateError(
            f"could not load {hub_id!r} from the Hugging Face hub ({exc.__class__.__name__}: {exc}); "
            "check the name and your connection, or pass a local file"
        ) from exc
    label = f"{hub_id}" + (f"/{subset}" if subset else "") + f"[{kwargs['split']}]"
    return _table_records(ds, label), {"hub_id": hub_id, "subset": subset, "split": kwargs["split"],
                                       "revision": revision, "streaming": streaming}


def is_local(dataset: str) -> bool:
    path = Path(dataset).expanduser()
    return path.exists() or dataset.lower().endswith(LOCAL_SUFFIXES)


# ------------------------------------------------------------------ mapping and validation
def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"prompt=question,chosen=good"`` -> {"prompt": "question", "chosen": "good"}."""
    if not columns:
        return {}
    if isinstance(columns, Mapping):
        return dict(columns)
    mapping = {}
    for item in columns.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("prompt", "chosen", "rejected"):
            raise CurateError(f"bad --columns item {item!r}; use prompt=COL,chosen=COL,rejected=COL")
        mapping[key.strip()] = value.strip()
    return mapping


def _apply_columns(record: Mapping[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    if not mapping:
        return dict(record)
    missing = [col for col in mapping.values() if col not in record]
    if missing:
        raise RowError("missing_field", f"mapped column(s) {missing} not in record fields {sorted(record)}")
    out = {k: v for k, v in record.items() if k not in mapping.values()}
    out.update({target: record[col] for target, col in mapping.items()})
    return out


def _passthrough_meta(record: Mapping[str, Any]) -> dict[str, Any]:
    meta = record.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"meta": meta}
    return dict(meta) if isinstance(meta, Mapping) else {}


def _raw_text(record: Any, limit: int = 2000) -> str:
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(record)
    return text[:limit]


def normalise(records, *, fmt: str = "auto", columns=None, keep_empty: bool = False, limit: int | None = None,
              source_name: str = "") -> LoadResult:
    """Validate raw ``(location, record)`` items into pairs and quarantine."""
    if fmt != "auto" and fmt not in FORMATS:
        raise CurateError(f"unknown --format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    mapping = parse_columns(columns)
    pairs, quarantined, seen = [], [], {}
    n_rows = 0
    for location, record in records:
        if limit is not None and n_rows >= limit:
            break
        n_rows += 1
        try:
            if isinstance(record, RowError):
                raise record
            if not isinstance(record, Mapping):
                raise RowError("unparseable_line", f"a record is {type(record).__name__}, not an object")
            record = _apply_columns(record, mapping)
            if fmt == "auto":
                try:
                    fmt = detect_format(record)
                except RowError as err:  # a whole-dataset problem, not one bad row
                    raise CurateError(f"{location}: {err.detail}") from err
            prompt, chosen, rejected = parse_record(record, fmt, keep_empty=keep_empty)
            pair_id = make_pair_id(prompt, chosen, rejected)
            if pair_id in seen:
                raise RowError("duplicate_pair", f"same prompt and replies as {seen[pair_id]}")
            seen[pair_id] = location
            pairs.append({"pair_id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                          "source": location, "meta": _passthrough_meta(record)})
        except RowError as err:
            quarantined.append({"source": location, "reason": err.reason, "detail": err.detail,
                                "raw": _raw_text(record)})
    info = {"dataset": source_name, "format": fmt, "rows": n_rows, "pairs": len(pairs),
            "quarantined": len(quarantined), "columns": mapping or None, "keep_empty": keep_empty}
    return LoadResult(pairs_frame(pairs), quarantine_frame(quarantined), info)


def load_pairs(dataset: str, *, subset: str | None = None, split: str | None = None, revision: str | None = None,
               fmt: str = "auto", columns=None, keep_empty: bool = False, limit: int | None = None,
               streaming: bool = False) -> LoadResult:
    """Load ``dataset`` (hub name or local path) into validated pairs and a quarantine table.

    ``hh-rlhf`` means ``Anthropic/hh-rlhf`` (``subset`` = ``harmless-base``,
    ``helpful-base``, ...), ``ultrafeedback`` means
    ``HuggingFaceH4/ultrafeedback_binarized``; any other ``org/name`` goes to
    ``datasets.load_dataset`` as is. ``streaming`` reads hub data lazily (useful
    with ``limit``).
    """
    if is_local(dataset):
        path = Path(dataset).expanduser()
        if not path.exists():
            raise CurateError(f"{path} does not exist")
        records, source = local_records(path), {"path": str(path.resolve())}
    else:
        records, source = hub_records(dataset, subset=subset, split=split, revision=revision, streaming=streaming)
    result = normalise(records, fmt=fmt, columns=columns, keep_empty=keep_empty, limit=limit, source_name=dataset)
    result.info.update(source)
    if result.pairs.height == 0 and result.quarantine.height == 0:
        raise CurateError(f"{dataset} has no records")
    return result
