"""Response sets: k rated replies per prompt, as one long table (one row per response).

Columns of the table (:data:`RESPONSE_SET_SCHEMA`):

- ``prompt_id``: :func:`curate.data.schema.make_prompt_id` of the prompt; rows
  with the same prompt form one set, even when they come from different records;
- ``prompt``: chat messages (the pair schema's ``prompt`` type), ending with a user turn;
- ``response`` (text), ``score`` (float, higher = better; a rank r becomes -r),
  ``response_index`` (0, 1, ... within the set, in reading order);
- ``source`` (``file:line#i``), ``meta`` (a JSON object: model, rank, ratings, ...).

Layouts (``fmt``; ``auto`` detects from the first record):

- ``ultrafeedback-raw`` (``openbmb/UltraFeedback``): ``instruction`` and
  ``completions``, each with ``response``, ``annotations`` (``instruction_following``,
  ``honesty``, ``truthfulness``, ``helpfulness``, each with a ``Rating`` "1".."5"
  or "N/A"), ``overall_score`` (the critique model's 1-10) and
  ``fine-grained_score``. The score is ``rating``: ``mean`` (default: the mean
  of the four aspect ratings, "N/A" left out, the rating the binarized
  UltraFeedback sets use since the critique's ``overall_score`` was found
  unreliable), ``overall_score``, ``fine-grained_score``, or one aspect name.
- ``nectar`` (``berkeley-nest/Nectar``): ``prompt``, an HH transcript ending in
  ``"\\n\\nAssistant:"``, and ``answers``, each with ``answer``, ``model`` and
  ``rank`` (1 = best): score = -rank.
- ``long``: one row per response with ``prompt`` (text or messages),
  ``response`` and ``score``; ``columns`` renames (``prompt=q,response=a,score=r``).

Refused, with the reason (quarantine rows): a record without the layout's
fields or without responses, a response that is empty, not text, or without a score, a prompt that
does not end with a user turn, and a response whose text repeats an earlier one
of the same set (``duplicate_response``; the earlier one is kept).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import polars as pl

from curate.data.formats.base import RowError, messages
from curate.data.formats.hh import parse_hh_transcript
from curate.data.schema import GROUP_COLUMN, MESSAGE_DTYPE, make_prompt_id, quarantine_frame
from curate.errors import CurateError

RESPONSE_SET_SCHEMA: dict[str, pl.DataType] = {
    GROUP_COLUMN: pl.Utf8,
    "prompt": pl.List(MESSAGE_DTYPE),
    "response": pl.Utf8,
    "score": pl.Float64,
    "response_index": pl.Int64,
    "source": pl.Utf8,
    "meta": pl.Utf8,
}
LAYOUTS = ("ultrafeedback-raw", "nectar", "long")
ULTRAFEEDBACK_ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
ULTRAFEEDBACK_RATINGS = ("mean", "overall_score", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS)
LONG_KEYS = ("prompt", "response", "score")


def detect_response_set_format(record: Mapping[str, Any]) -> str | None:
    """The layout of one record (see the module docstring), or None if it is not a response set."""
    if not isinstance(record, Mapping):
        return None
    if "instruction" in record and isinstance(record.get("completions"), list):
        return "ultrafeedback-raw"
    if "prompt" in record and isinstance(record.get("answers"), list):
        return "nectar"
    if all(key in record for key in LONG_KEYS):
        return "long"
    return None


# ------------------------------------------------------------------ one record -> responses
def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise RowError("missing_score", f"{what} is {value!r}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RowError("missing_score", f"{what} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise RowError("missing_score", f"{what} is {value!r}, not a finite number")
    return number


def _aspect_rating(annotations: Mapping[str, Any], aspect: str) -> float | None:
    """One aspect's "Rating" as a number; None for "N/A" or a missing aspect."""
    rating = (annotations.get(aspect) or {}).get("Rating") if isinstance(annotations, Mapping) else None
    if rating in (None, "N/A", ""):
        return None
    return _number(rating, f"annotations.{aspect}.Rating")


def ultrafeedback_score(completion: Mapping[str, Any], rating: str = "mean") -> float:
    """The score of one UltraFeedback completion under ``rating`` (see the module docstring)."""
    if rating in ("overall_score", "fine-grained_score"):
        return _number(completion.get(rating), rating)
    annotations = completion.get("annotations") or {}
    if rating == "mean":
        ratings = [r for r in (_aspect_rating(annotations, a) for a in ULTRAFEEDBACK_ASPECTS) if r is not None]
        if not ratings:
            raise RowError("missing_score", "no aspect of annotations has a numeric Rating")
        return sum(ratings) / len(ratings)
    value = _aspect_rating(annotations, rating)
    if value is None:
        raise RowError("missing_score", f"annotations.{rating}.Rating is missing or N/A")
    return value


def _ultrafeedback(record: Mapping[str, Any], rating: str) -> tuple[list[dict], list[tuple[dict, Any]]]:
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RowError("bad_prompt", "instruction is missing, empty or not text")
    prompt = [{"role": "user", "content": instruction.strip()}]
    responses = []
    for completion in record["completions"]:
        if not isinstance(completion, Mapping):
            responses.append(({}, RowError("bad_response", "a completion is not an object")))
            continue
        try:
            score = ultrafeedback_score(completion, rating)
            aspects = {a: _aspect_rating(completion.get("annotations") or {}, a) for a in ULTRAFEEDBACK_ASPECTS}
        except RowError as err:
            responses.append((completion, err))
            continue
        meta = {"model": completion.get("model"), "principle": completion.get("principle"),
                "overall_score": completion.get("overall_score"),
                "fine-grained_score": completion.get("fine-grained_score"), "ratings": aspects,
                "dataset_source": record.get("source")}
        responses.append(({"response": completion.get("response"), "score": score, "meta": meta}, None))
    return prompt, responses


def _nectar(record: Mapping[str, Any]) -> tuple[list[dict], list[tuple[dict, Any]]]:
    prompt_text = record.get("prompt")
    if not isinstance(prompt_text, str):
        raise RowError("bad_prompt", "prompt is not text")
    turns = parse_hh_transcript(prompt_text)
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]  # the open "Assistant:" the answers continue
    responses = []
    for answer in record["answers"]:
        if not isinstance(answer, Mapping):
            responses.append(({}, RowError("bad_response", "an answer is not an object")))
            continue
        try:
            rank = _number(answer.get("rank"), "rank")
        except RowError as err:
            responses.append((answer, err))
            continue
        meta = {"model": answer.get("model"), "rank": rank, "provider": answer.get("provider")}
        responses.append(({"response": answer.get("answer"), "score": -rank, "meta": meta}, None))
    return turns, responses


def _long(record: Mapping[str, Any]) -> tuple[list[dict], list[tuple[dict, Any]]]:
    prompt = messages(record.get("prompt"), "prompt")
    try:
        item = {"response": record.get("response"), "score": _number(record.get("score"), "score"),
                "meta": {k: v for k, v in record.items() if k not in LONG_KEYS}}
        return prompt, [(item, None)]
    except RowError as err:
        return prompt, [(dict(record), err)]


def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"prompt=question,response=answer,score=rating"`` -> {"prompt": "question", ...} (long layout)."""
    if not columns:
        return {}
    items = columns.items() if isinstance(columns, Mapping) else (
        item.partition("=")[::2] for item in str(columns).split(",") if item.strip())
    mapping = {}
    for key, value in items:
        key, value = key.strip(), str(value).strip()
        if key not in LONG_KEYS or not value:
            raise CurateError(f"bad --columns item {key}={value}; response sets take "
                              "prompt=COL,response=COL,score=COL")
        mapping[key] = value
    return mapping


def _renamed(record: Mapping[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    if not mapping:
        return dict(record)
    missing = [col for col in mapping.values() if col not in record]
    if missing:
        raise RowError("missing_field", f"mapped column(s) {missing} not in record fields {sorted(record)}")
    out = {k: v for k, v in record.items() if k not in mapping.values()}
    out.update({key: record[col] for key, col in mapping.items()})
    return out


def _raw(record: Any, limit: int = 2000) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:limit]


# ------------------------------------------------------------------ many records -> table
def parse_records(records: Iterable[tuple[str, Any]], *, layout: str = "auto", rating: str = "mean",
                  columns=None) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """``(location, record)`` items -> (response-set table, quarantine rows as dicts)."""
    if layout != "auto" and layout not in LAYOUTS:
        raise CurateError(f"unknown response-set format {layout!r}; use auto or one of {', '.join(LAYOUTS)}")
    if rating not in ULTRAFEEDBACK_RATINGS:
        raise CurateError(f"unknown --rating {rating!r}; use one of {', '.join(ULTRAFEEDBACK_RATINGS)}")
    mapping = parse_columns(columns)
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    seen: dict[str, dict[str, str]] = {}  # prompt_id -> response text -> its source

    def refuse(location: str, err: RowError, raw: Any) -> None:
        quarantined.append({"source": location, "reason": err.reason, "detail": err.detail, "raw": _raw(raw)})

    for location, record in records:
        try:
            if isinstance(record, RowError):
                raise record
            if not isinstance(record, Mapping):
                raise RowError("unparseable_line", f"a record is {type(record).__name__}, not an object")
            record = _renamed(record, mapping)
            if layout == "auto":
                layout = detect_response_set_format(record) or ""
                if not layout:
                    raise CurateError(f"{location}: cannot tell a response-set layout from fields {sorted(record)}; "
                                      f"pass --format ({', '.join(LAYOUTS)}) or --columns prompt=,response=,score=")
            if detect_response_set_format(record) != layout and not (layout == "long" and mapping):
                raise RowError("missing_field", f"the record lacks the fields of the {layout} layout")
            prompt, responses = {"ultrafeedback-raw": lambda r: _ultrafeedback(r, rating), "nectar": _nectar,
                                 "long": _long}[layout](record)
            if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
                raise RowError("bad_prompt", "the prompt must end with a non-empty user turn")
            if not responses:
                raise RowError("no_responses", "the record has no responses")
        except RowError as err:
            refuse(location, err, record)
            continue
        prompt_id = make_prompt_id(prompt)
        texts = seen.setdefault(prompt_id, {})
        for i, (item, error) in enumerate(responses):
            where = f"{location}#{i}" if layout != "long" else location
            response = item.get("response")
            if error is None and not isinstance(response, str):
                error = RowError("non_text_content", f"the response is {type(response).__name__}, not text")
            elif error is None and not response.strip():
                error = RowError("empty_reply", "the response is empty")
            elif error is None and response in texts:
                error = RowError("duplicate_response", f"same text as {texts[response]} of this prompt")
            if error is not None:
                refuse(where, error, item)
                continue
            texts[response] = where
            rows.append({GROUP_COLUMN: prompt_id, "prompt": prompt, "response": response, "score": item["score"],
                         "response_index": len(texts) - 1, "source": where,
                         "meta": json.dumps(item["meta"], ensure_ascii=False, default=str)})
    return pl.DataFrame(rows, schema=RESPONSE_SET_SCHEMA), quarantined


def read_response_sets(path_or_records, *, fmt: str = "auto", columns=None, limit: int | None = None,
                       rating: str = "mean") -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Load response sets with their quarantine table and a load summary (what `curate pairs` records).

    ``path_or_records``: a local file (jsonl, json, parquet, csv, optionally
    gzipped), a hub name (``ultrafeedback-raw``, ``nectar``, ``org/name``),
    or an iterable of records (dicts, or ``(location, record)`` items).
    ``limit`` counts records read (for ``long``: rows).
    """
    from curate.data.load import dataset_records

    if isinstance(path_or_records, (str, Path)):
        items, source = dataset_records(str(path_or_records))
        source["dataset"] = str(path_or_records)
    else:
        items = ((r if isinstance(r, tuple) else (f"record:{i}", r)) for i, r in enumerate(path_or_records))
        source = {"dataset": "records"}
    if limit is not None:
        items = (item for _, item in zip(range(limit), items))
    counted: list[int] = [0]
    detected: list[str | None] = [None if fmt == "auto" else fmt]
    mapping = parse_columns(columns)

    def counting(stream):
        for item in stream:
            counted[0] += 1
            record = item[1]
            if detected[0] is None and isinstance(record, Mapping):
                try:
                    detected[0] = detect_response_set_format(_renamed(record, mapping))
                except RowError:
                    pass
            yield item

    sets, quarantined = parse_records(counting(items), layout=fmt, rating=rating, columns=columns)
    if counted[0] == 0:
        raise CurateError(f"{source['dataset']} has no records")
    info = {**source, "format": detected[0], "rating": rating,
            "records": counted[0], "responses": sets.height, "response_sets": sets[GROUP_COLUMN].n_unique(),
            "quarantined": len(quarantined)}
    return sets, quarantine_frame(quarantined), info


def load_response_sets(path_or_records, *, fmt: str = "auto", columns=None, limit: int | None = None,
                       rating: str = "mean") -> pl.DataFrame:
    """The response-set table of a file, hub dataset or records (quarantined rows left out: see
    :func:`read_response_sets` for them)."""
    return read_response_sets(path_or_records, fmt=fmt, columns=columns, limit=limit, rating=rating)[0]
