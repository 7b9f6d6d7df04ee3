"""The one pair schema every loader produces and every score joins on.

A pair is ``pair_id``, ``prompt`` (chat messages ending with a user turn),
``chosen``, ``rejected`` (assistant reply text), ``source`` (where the row came
from, e.g. ``file.jsonl.gz:123``) and ``meta`` (a JSON object as a string, so
heterogeneous metadata survives parquet round trips).

Loaded pairs also carry ``prompt_id`` (a stable hash of the prompt messages,
or the response set's id: the group column that splits must keep together)
and the loader's typed extra columns (``score_chosen``, ``preference_strength``,
``chosen_from``, ... see docs/usage.md), after the core columns. A curated
pair table has ``flipped`` (True where curation swapped chosen and rejected).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import polars as pl

Message = Mapping[str, str]

MESSAGE_DTYPE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})

PAIR_SCHEMA: dict[str, pl.DataType] = {
    "pair_id": pl.Utf8,
    "prompt": pl.List(MESSAGE_DTYPE),
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "source": pl.Utf8,
    "meta": pl.Utf8,
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.Utf8,
    "reason": pl.Utf8,
    "detail": pl.Utf8,
    "raw": pl.Utf8,
}

ROLES = ("system", "user", "assistant")
GROUP_COLUMN = "prompt_id"
FLIPPED = "flipped"
RESERVED_COLUMNS = (*PAIR_SCHEMA, GROUP_COLUMN, FLIPPED)


def make_prompt_id(prompt: Sequence[Message]) -> str:
    """Stable id of a prompt (the messages, in order): pairs that share it form one group."""
    canonical = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def typed_column(name: str, values: Sequence[Any]) -> pl.Series:
    """One extra column with the narrowest type its values share (bool, int, float), else text."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pl.Series(name, values, dtype=pl.Boolean)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pl.Series(name, values, dtype=pl.Int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pl.Series(name, [None if v is None else float(v) for v in values], dtype=pl.Float64)
    as_text = [None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
               for v in values]
    return pl.Series(name, as_text, dtype=pl.Utf8)


def with_extra_columns(pairs: pl.DataFrame, extras: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """Append typed extra columns (one dict per pair; a name clashing with a core column gets ``src_``)."""
    names: dict[str, None] = {}
    for row in extras:
        names.update(dict.fromkeys(row))
    columns = []
    for name in names:
        column = name if name not in RESERVED_COLUMNS else f"src_{name}"
        columns.append(typed_column(column, [row.get(name) for row in extras]))
    return pairs.with_columns(columns) if columns else pairs


def make_pair_id(prompt: Sequence[Message], reply_a: str, reply_b: str) -> str:
    """Stable id of a prompt and the *unordered* pair of replies.

    Swapping chosen and rejected keeps the id, so a flip recorded in the
    audit trail still joins with every score of the pair.
    """
    canonical = json.dumps({"prompt": [[m["role"], m["content"]] for m in prompt],
                            "replies": sorted([reply_a, reply_b])}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def pairs_frame(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Build a pair table from dicts with prompt/chosen/rejected (+source, meta)."""
    records = []
    for row in rows:
        prompt = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        meta = row.get("meta") or {}
        records.append({"pair_id": row.get("pair_id") or make_pair_id(prompt, row["chosen"], row["rejected"]),
                        "prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"],
                        "source": row.get("source") or "",
                        "meta": meta if isinstance(meta, str) else json.dumps(meta, ensure_ascii=False)})
    return pl.DataFrame(records, schema=PAIR_SCHEMA)


def quarantine_frame(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        [{k: row.get(k) for k in QUARANTINE_SCHEMA} for row in rows],
        schema=QUARANTINE_SCHEMA,
    )


def flipped_mask(pairs: pl.DataFrame) -> np.ndarray:
    """True for the pairs curation flipped (the ``flipped`` column; a table without it has none)."""
    if FLIPPED not in pairs.columns:
        return np.zeros(pairs.height, dtype=bool)
    return pairs[FLIPPED].fill_null(False).to_numpy().astype(bool)


def meta_of(pairs: pl.DataFrame, key: str, default: Any = None) -> list[Any]:
    """Read one key of every pair's JSON ``meta``."""
    return [json.loads(m or "{}").get(key, default) for m in pairs["meta"]]
