"""Layouts with two replies and a label that says which one is preferred.

The chosen side always follows the label, and ``chosen_from`` records which
column the chosen reply came from (``human_ref_A``, ``response_1``, ...):

- ``shp`` (stanfordnlp/SHP): ``history`` (the post), ``human_ref_A`` /
  ``human_ref_B``, ``labels`` = 1 when A is preferred, 0 when B is.
  ``score_A`` / ``score_B`` become ``score_chosen`` / ``score_rejected``;
  ``score_ratio``, ``post_id`` and ``domain`` are kept.
- ``pku-saferlhf`` (PKU-Alignment/PKU-SafeRLHF): ``prompt``, ``response_0`` /
  ``response_1``; the chosen index is ``better_response_id`` unless
  ``--label-column safer_response_id``. Both ids are kept, and
  ``is_response_{0,1}_safe`` as ``is_chosen_safe`` / ``is_rejected_safe``.
- ``helpsteer2`` (nvidia/HelpSteer2 ``preference/``): ``prompt`` (turns joined
  by ``<extra_id_1>User`` / ``<extra_id_1>Assistant`` markers),
  ``response_1`` / ``response_2``, ``preference_strength`` -3..3: negative means
  response 1 is better, positive response 2, 0 is a ``tie``. The strength is
  kept, and the file's own ``split`` as ``source_split``.
- ``columns``: the generic ``--columns a=COL,b=COL,label=COL,label_means=M``
  mapping; ``M`` is ``a-preferred`` (label 1/true: a is chosen, 0/false: b),
  ``b-preferred`` (the reverse), ``index`` (0: a, 1: b) or ``sign``
  (negative: a, positive: b, 0: a tie).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from curate.data.formats.base import Options, Parsed, RowError, messages, require, text, with_system

LABEL_MEANINGS = ("a-preferred", "b-preferred", "index", "sign")
_HELPSTEER_TURN = re.compile(r"\s*<extra_id_1>(User|Assistant)\s*\n?")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return float(value.strip().lower() == "true")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise RowError("bad_label", f"{name} is {value!r}, not a number") from exc


def a_is_chosen(value: Any, meaning: str, name: str) -> bool:
    """Whether the label ``value`` (of column ``name``) prefers side a; raises a ``tie`` row error."""
    if value is None:
        raise RowError("missing_field", f"no {name!r} label")
    number = _number(value, name)
    if meaning == "sign":
        if number == 0:
            raise RowError("tie", f"{name} is 0: neither reply is preferred")
        return number < 0
    if number not in (0.0, 1.0):
        raise RowError("bad_label", f"{name} is {value!r}; with label_means={meaning} it must be 0 or 1")
    if meaning == "a-preferred":
        return number == 1.0
    return number == 0.0  # b-preferred and index: 0 means a


def _orient(prompt, record, a: str, b: str, a_chosen: bool, extras: dict[str, Any]) -> Parsed:
    chosen, rejected = (a, b) if a_chosen else (b, a)
    extras = {"chosen_from": chosen, **extras}
    return Parsed(prompt, text(record[chosen], chosen), text(record[rejected], rejected), extras)


def parse_shp(record: Mapping[str, Any], options: Options) -> Parsed:
    label = options.label_column or "labels"
    require(record, "history", "human_ref_A", "human_ref_B")
    a_chosen = a_is_chosen(record.get(label), "a-preferred", label)
    extras: dict[str, Any] = {}
    if record.get("score_A") is not None and record.get("score_B") is not None:
        first, second = _number(record["score_A"], "score_A"), _number(record["score_B"], "score_B")
        extras["score_chosen"], extras["score_rejected"] = (first, second) if a_chosen else (second, first)
    for name in ("score_ratio", "post_id", "domain"):
        if record.get(name) is not None:
            extras[name] = record[name]
    prompt = [{"role": "user", "content": text(record["history"], "history")}]
    return _orient(prompt, record, "human_ref_A", "human_ref_B", a_chosen, extras)


def parse_pku(record: Mapping[str, Any], options: Options) -> Parsed:
    label = options.label_column or "better_response_id"
    require(record, "prompt", "response_0", "response_1")
    a_chosen = a_is_chosen(record.get(label), "index", label)
    extras = {name: int(_number(record[name], name)) for name in ("better_response_id", "safer_response_id")
              if record.get(name) is not None}
    safe = [record.get("is_response_0_safe"), record.get("is_response_1_safe")]
    if None not in safe:
        safe = [bool(_number(v, "is_response_safe")) for v in safe]
        extras["is_chosen_safe"], extras["is_rejected_safe"] = safe if a_chosen else safe[::-1]
    return _orient(messages(record["prompt"], "prompt"), record, "response_0", "response_1", a_chosen, extras)


def helpsteer_turns(prompt: str) -> list[dict[str, str]]:
    parts = _HELPSTEER_TURN.split(prompt)
    turns = [{"role": "user", "content": parts[0]}]
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": role.lower(), "content": content})
    return turns


def parse_helpsteer2(record: Mapping[str, Any], options: Options) -> Parsed:
    label = options.label_column or "preference_strength"
    require(record, "prompt", "response_1", "response_2")
    a_chosen = a_is_chosen(record.get(label), "sign", label)
    extras: dict[str, Any] = {label: int(_number(record[label], label))}
    if record.get("split") is not None:
        extras["source_split"] = record["split"]
    prompt = helpsteer_turns(text(record["prompt"], "prompt"))
    return _orient(prompt, record, "response_1", "response_2", a_chosen, extras)


def parse_columns(record: Mapping[str, Any], options: Options) -> Parsed:
    """The generic a/b/label mapping (its columns already renamed to a, b, label)."""
    require(record, "prompt", "a", "b")
    meaning = options.label_means
    a_chosen = a_is_chosen(record.get("label"), meaning, "label")
    prompt = with_system(messages(record["prompt"], "prompt"), record.get("system"))
    return _orient(prompt, record, "a", "b", a_chosen, {})
