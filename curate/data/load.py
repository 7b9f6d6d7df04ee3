"""Load preference data from hub names or local files into the pair schema.

Every input row ends up either as a pair or in the quarantine table with its
reason and source location (``file:line``, 0-based); nothing is dropped
silently: rows in = pairs + quarantined. Exact duplicates of an earlier pair
(same prompt and the same two replies, in either order) are quarantined too,
since ``pair_id`` is the join key.

The format is detected from the first record (:mod:`curate.data.formats`),
or named with ``fmt``; response-set layouts (UltraFeedback raw, Nectar) are
turned into pairs by ``curate.pairs.strategies.select_pairs`` with
``strategy``. The load manifest (``LoadResult.info``) records the dataset,
the format and every choice that decided the chosen side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import polars as pl

from curate.data.columns import ColumnMap, apply_columns, parse_columns
from curate.data.formats import (FORMAT_NAMES, RESPONSE_SET_FORMATS, Options, RowError, detect_format,
                                 parse_record)
from curate.data.readers import LOCAL_SUFFIXES, local_records, table_records
from curate.data.schema import (GROUP_COLUMN, make_pair_id, make_prompt_id, pairs_frame, quarantine_frame,
                                with_extra_columns)
from curate.errors import CurateError

# Short names for well-known hub datasets: (hub id, default split, data_dir).
HUB_ALIASES: dict[str, tuple[str, str, str | None]] = {
    "hh-rlhf": ("Anthropic/hh-rlhf", "train", None),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None),
    "ultrafeedback-raw": ("openbmb/UltraFeedback", "train", None),
    "nectar": ("berkeley-nest/Nectar", "train", None),
    "shp": ("stanfordnlp/SHP", "train", None),
    "pku-saferlhf": ("PKU-Alignment/PKU-SafeRLHF", "train", None),
    "helpsteer2": ("nvidia/HelpSteer2", "train", "preference"),
    "orca-dpo": ("Intel/orca_dpo_pairs", "train", None),
}
FORMAT_CHOICES = ("auto", *FORMAT_NAMES)
STRATEGIES = ("best-random-lower", "best-worst", "all")
DEFAULT_STRATEGY = "best-random-lower"
# Label columns a format accepts for --label-column (the first is its default).
LABEL_COLUMNS = {"pku-saferlhf": ("better_response_id", "safer_response_id"), "shp": ("labels",),
                 "helpsteer2": ("preference_strength",)}


@dataclass
class LoadResult:
    pairs: pl.DataFrame
    quarantine: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def hub_records(name: str, *, subset=None, split=None, revision=None, streaming=False):
    """Raw records of a hub dataset through ``datasets.load_dataset``."""
    import datasets

    hub_id, default_split, data_dir = HUB_ALIASES.get(name.lower(), (name, "train", None))
    kwargs: dict[str, Any] = {"split": split or default_split, "revision": revision, "streaming": streaming}
    if hub_id == "Anthropic/hh-rlhf":
        kwargs["data_dir"] = subset  # hh-rlhf's subsets are folders, not configs
        args: tuple = (hub_id,)
    else:
        args = (hub_id, subset) if subset else (hub_id,)
        if data_dir:
            kwargs["data_dir"] = data_dir
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        raise CurateError(
            f"could not load {hub_id!r} from the Hugging Face hub ({exc.__class__.__name__}: {exc}); "
            "check the name and your connection, or pass a local file"
        ) from exc
    label = f"{hub_id}" + (f"/{subset}" if subset else "") + f"[{kwargs['split']}]"
    return table_records(ds, label), {"hub_id": hub_id, "subset": subset, "split": kwargs["split"],
                                      "revision": revision, "streaming": streaming}


def is_local(dataset: str) -> bool:
    path = Path(dataset).expanduser()
    return path.exists() or dataset.lower().endswith(LOCAL_SUFFIXES)


def dataset_records(dataset: str, **hub_options) -> tuple[Iterable[tuple[str, Any]], dict[str, Any]]:
    """Raw ``(location, record)`` items of a local file or a hub dataset, and where they come from."""
    if not is_local(dataset):
        return hub_records(dataset, **hub_options)
    path = Path(dataset).expanduser()
    if not path.exists():
        raise CurateError(f"{path} does not exist")
    return local_records(path), {"path": str(path.resolve())}


# ------------------------------------------------------------------ validation
def _passthrough_meta(record: Mapping[str, Any]) -> dict[str, Any]:
    meta = record.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"meta": meta}
    return dict(meta) if isinstance(meta, Mapping) else {}


def _raw_text(record: Any, limit: int = 2000) -> str:
    if isinstance(record, RowError):
        return ""
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
        text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        text = ascii(record)  # escapes what UTF-8 cannot hold (lone surrogates)
    except RecursionError:
        text = "(nested too deep to show)"
    return text[:limit]


def _strategies() -> tuple[str, ...]:
    try:
        from curate.pairs.strategies import STRATEGIES as pair_strategies
    except ImportError:
        return STRATEGIES
    return tuple(pair_strategies)


def _check_options(fmt: str, mapping: ColumnMap, label_column: str | None, strategy: str) -> None:
    if fmt not in FORMAT_CHOICES:
        raise CurateError(f"unknown --format {fmt!r}; use one of {', '.join(FORMAT_CHOICES)}")
    strategies = _strategies()
    if strategy not in strategies:
        raise CurateError(f"unknown --strategy {strategy!r}; use one of {', '.join(strategies)}")
    if mapping.labelled and fmt not in ("auto", "columns"):
        raise CurateError(f"--columns a=,b=,label= is its own format; drop --format {fmt} (or pass --format columns)")
    if fmt == "columns" and not mapping.labelled:
        raise CurateError("--format columns needs --columns a=COL,b=COL,label=COL,label_means=...")


def _check_label_column(fmt: str, label_column: str | None, mapping: ColumnMap) -> None:
    if label_column is None:
        return
    if fmt in LABEL_COLUMNS:
        if label_column not in LABEL_COLUMNS[fmt]:
            raise CurateError(f"--label-column {label_column!r} does not choose the side in {fmt} data; "
                              f"use one of {', '.join(LABEL_COLUMNS[fmt])}")
        return
    if fmt == "columns":
        raise CurateError("with --columns a=,b=,label=COL the label is set there; drop --label-column")
    raise CurateError(f"--label-column only applies to {', '.join(LABEL_COLUMNS)} data, not {fmt}")


def _pair_row(parsed, location: str, record: Mapping[str, Any], kept: dict[str, Any]) -> tuple[dict, dict]:
    try:
        pair_id = make_pair_id(parsed.prompt, parsed.chosen, parsed.rejected)
        extras = {**parsed.extras, **kept}
        json.dumps(extras, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError("lone_surrogate", f"the text holds an unpaired surrogate ({exc.object[exc.start]!a}); "
                                         "fix the \\uD800-\\uDFFF escapes in the source") from exc
    row = {"pair_id": pair_id, "prompt": parsed.prompt, "chosen": parsed.chosen, "rejected": parsed.rejected,
           "source": location, "meta": _passthrough_meta(record), GROUP_COLUMN: make_prompt_id(parsed.prompt)}
    return row, extras


def _frame(pairs: list[dict], extras: list[dict]) -> pl.DataFrame:
    """Core pair columns, then ``prompt_id``, then the typed extra columns."""
    frame = pairs_frame(pairs).with_columns(pl.Series(GROUP_COLUMN, [p[GROUP_COLUMN] for p in pairs], dtype=pl.Utf8))
    return with_extra_columns(frame, extras)


def normalise(records: Iterable[tuple[str, Any]], *, fmt: str = "auto", columns=None, keep_empty: bool = False,
              limit: int | None = None, source_name: str = "", label_column: str | None = None,
              strategy: str = DEFAULT_STRATEGY, seed: int = 0) -> LoadResult:
    """Validate raw ``(location, record)`` items into pairs and quarantine."""
    mapping = parse_columns(columns)
    _check_options(fmt, mapping, label_column, strategy)
    chosen_by_user = [what for what, given in (("the --columns mapping", mapping.describe()),
                                               (f"--label-column {label_column}", label_column),
                                               (f"--format {fmt}", fmt != "auto")) if given]
    if mapping.labelled:
        fmt = "columns"
    if fmt != "auto":
        _check_label_column(fmt, label_column, mapping)
    options = Options(label_column=label_column, label_means=mapping.label_means)
    pairs, extras, quarantined, seen = [], [], [], {}
    n_rows = 0
    items: Iterator[tuple[str, Any]] = iter(records)
    for location, record in items:
        if limit is not None and n_rows >= limit:
            break
        n_rows += 1
        try:
            if isinstance(record, RowError):
                raise record
            if not isinstance(record, Mapping):
                raise RowError("unparseable_line", f"a record is {type(record).__name__}, not an object")
            record, kept = apply_columns(record, mapping)
            if fmt == "auto":
                try:
                    fmt = detect_format(record)
                except RowError as err:  # a whole-dataset problem, not one bad row
                    raise CurateError(f"{location}: {err.detail}") from err
                _check_label_column(fmt, label_column, mapping)
            if fmt in RESPONSE_SET_FORMATS:
                return _from_response_sets([(location, record)], items, fmt, quarantined=quarantined,
                                           rows_before=n_rows - 1, limit=limit, source_name=source_name,
                                           strategy=strategy, seed=seed)
            parsed = parse_record(record, fmt, keep_empty=keep_empty, options=options)
            row, extra = _pair_row(parsed, location, record, kept)
            if row["pair_id"] in seen:
                raise RowError("duplicate_pair", f"same prompt and replies as {seen[row['pair_id']]}")
            seen[row["pair_id"]] = location
            pairs.append(row)
            extras.append(extra)
        except RowError as err:
            quarantined.append({"source": location, "reason": err.reason, "detail": err.detail,
                                "raw": _raw_text(record)})
    info = {"dataset": source_name, "format": fmt, "rows": n_rows, "pairs": len(pairs),
            "quarantined": len(quarantined), "columns": mapping.describe(), "keep_empty": keep_empty,
            "label_column": _label_used(fmt, label_column, mapping)}
    result = LoadResult(_frame(pairs, extras), quarantine_frame(quarantined), info)
    if not pairs and quarantined and chosen_by_user:
        raise CurateError(f"{' with '.join(chosen_by_user)} yields no pairs: {_why(result.quarantine)}")
    return result


def _label_used(fmt: str, label_column: str | None, mapping: ColumnMap) -> str | None:
    if fmt == "columns":
        return f"{mapping.fields['label']} ({mapping.label_means})"
    if fmt in LABEL_COLUMNS:
        return label_column or LABEL_COLUMNS[fmt][0]
    return None


def _why(quarantine: pl.DataFrame) -> str:
    counts = quarantine.group_by("reason").len().sort("len", descending=True)
    reason, n = counts.row(0)
    detail = quarantine.filter(pl.col("reason") == reason)["detail"][0]
    return f"all {quarantine.height} rows were quarantined, {n} as {reason} (e.g. {detail})"


# ------------------------------------------------------------------ response sets
def _from_response_sets(first, items, fmt: str, *, quarantined: list[dict], rows_before: int, limit: int | None,
                        source_name: str, strategy: str, seed: int) -> LoadResult:
    """Response-set layouts: k rated replies per prompt, paired by ``strategy`` (curate.pairs)."""
    from curate.data import response_sets
    from curate.pairs.strategies import select_pairs
    records = list(first)
    n_rows = rows_before + 1
    for location, record in items:
        if limit is not None and n_rows >= limit:
            break
        n_rows += 1
        if isinstance(record, RowError):
            quarantined.append({"source": location, "reason": record.reason, "detail": record.detail, "raw": ""})
        else:
            records.append((location, record))
    sets, set_quarantine = response_sets.parse_records(records, layout=fmt)
    quarantined.extend(set_quarantine)
    pairs = select_pairs(sets, strategy, seed=seed)
    info = {"dataset": source_name, "format": fmt, "rows": n_rows, "response_sets": sets[GROUP_COLUMN].n_unique(),
            "responses": sets.height, "pairs": pairs.height, "quarantined": len(quarantined),
            "strategy": strategy, "seed": seed}
    return LoadResult(pairs, quarantine_frame(quarantined), info)


def load_pairs(dataset: str, *, subset: str | None = None, split: str | None = None, revision: str | None = None,
               fmt: str = "auto", columns=None, keep_empty: bool = False, limit: int | None = None,
               streaming: bool = False, label_column: str | None = None, strategy: str = DEFAULT_STRATEGY,
               seed: int = 0) -> LoadResult:
    """Load ``dataset`` (hub name or local path) into validated pairs and a quarantine table.

    Hub aliases: ``hh-rlhf`` (``Anthropic/hh-rlhf``, ``subset`` = ``harmless-base``,
    ``helpful-base``, ...), ``ultrafeedback`` (``HuggingFaceH4/ultrafeedback_binarized``),
    ``ultrafeedback-raw`` (``openbmb/UltraFeedback``), ``nectar``, ``shp``,
    ``pku-saferlhf``, ``helpsteer2`` (its ``preference`` data), ``orca-dpo``; any
    other ``org/name`` goes to ``datasets.load_dataset`` as is. ``fmt`` is
    ``auto`` or one of :data:`FORMAT_CHOICES`; ``columns`` maps columns (see
    :mod:`curate.data.columns`); ``label_column`` picks the label that chooses
    the side (PKU: ``safer_response_id``); ``strategy`` pairs response sets
    (``best-random-lower``, ``best-worst``, ``all``). ``streaming`` reads hub
    data lazily (useful with ``limit``).
    """
    records, source = dataset_records(dataset, subset=subset, split=split, revision=revision, streaming=streaming)
    result = normalise(records, fmt=fmt, columns=columns, keep_empty=keep_empty, limit=limit, source_name=dataset,
                       label_column=label_column, strategy=strategy, seed=seed)
    result.info.update(source)
    if result.pairs.height == 0 and result.quarantine.height == 0:
        raise CurateError(f"{dataset} has no records")
    return result
