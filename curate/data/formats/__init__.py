"""Row formats: every layout curate reads, by name, each detected from a record's fields.

A format turns one raw record into a :class:`Parsed` pair (prompt messages,
chosen, rejected, typed extra columns) or raises :class:`RowError` with the
reason the row is quarantined. ``FORMATS`` lists them in detection order:
the first whose ``detect`` accepts the first record is used for the whole
dataset. Response-set layouts (``ultrafeedback-raw``, ``nectar``: k rated
replies per prompt) are detected here but turned into pairs by
``curate.pairs`` (see :mod:`curate.data.load`).

Common rules, after the format's own parse: in the prompt, message contents
are stripped and consecutive turns of one role merged (joined by a blank
line); the prompt must end with a user turn; replies are kept verbatim (HH
formats strip theirs); an empty reply is ``empty_reply`` (unless
``keep_empty``), two equal replies ``identical_replies``, and equal
``score_chosen`` / ``score_rejected`` a ``tie``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from curate.data.chat import merge_same_role
from curate.data.formats import hh, labelled, paired, trl
from curate.data.formats.base import Options, Parsed, RowError
from curate.data.formats.hh import parse_hh_transcript

__all__ = ["FORMATS", "FORMAT_NAMES", "RESPONSE_SET_FORMATS", "Format", "Options", "Parsed", "RowError",
           "detect_format", "parse_hh_transcript", "parse_record"]


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    parse: Callable[[Mapping[str, Any], Options], Parsed] | None  # None: a response-set layout
    summary: str


def _has(record: Mapping[str, Any], *fields: str) -> bool:
    return all(name in record for name in fields)


def _is_list_or_dict(value: Any) -> bool:
    return isinstance(value, (list, Mapping))


FORMATS: tuple[Format, ...] = (
    Format("openai-dpo", lambda r: isinstance(r.get("input"), Mapping) and _has(r, "preferred_output"),
           paired.parse_openai_dpo, "input.messages, preferred_output, non_preferred_output"),
    Format("sharegpt", lambda r: _has(r, "conversations", "chosen", "rejected"),
           paired.parse_sharegpt, "conversations of from/value turns, chosen/rejected {from, value}"),
    Format("shp", lambda r: _has(r, "human_ref_A", "human_ref_B"),
           labelled.parse_shp, "history, human_ref_A/B, labels (1 = A preferred)"),
    Format("pku-saferlhf", lambda r: _has(r, "response_0", "response_1"),
           labelled.parse_pku, "prompt, response_0/1, better_response_id / safer_response_id"),
    Format("helpsteer2", lambda r: _has(r, "response_1", "response_2", "preference_strength"),
           labelled.parse_helpsteer2, "prompt, response_1/2, preference_strength (negative = response 1)"),
    Format("stack-exchange", lambda r: _has(r, "question", "response_j", "response_k"),
           paired.parse_stack_exchange, "question, response_j (preferred), response_k"),
    Format("ultrafeedback-raw", lambda r: _has(r, "instruction", "completions"), None,
           "instruction, completions with ratings (a response set)"),
    Format("nectar", lambda r: _has(r, "prompt", "answers"), None, "prompt, ranked answers (a response set)"),
    Format("kto", lambda r: _has(r, "completion", "label") and "chosen" not in r,
           trl.refuse_unpaired, "prompt, completion, label (unpaired: refused)"),
    Format("orca-dpo", lambda r: _has(r, "system", "question", "chosen", "rejected"),
           paired.parse_orca, "system, question, chosen, rejected"),
    Format("messages", lambda r: _is_list_or_dict(r.get("chosen")),
           trl.parse_messages, "chosen/rejected message lists (prompt: common prefix or its own column)"),
    Format("hh-prompt", lambda r: hh.looks_like_hh(r.get("prompt")),
           hh.parse_hh_prompt, "prompt = HH dialogue up to the last Assistant:, chosen/rejected replies"),
    Format("prompt-chosen-rejected", lambda r: _has(r, "prompt", "chosen"),
           trl.parse_prompt_chosen_rejected, "prompt, chosen, rejected strings"),
    Format("hh", lambda r: hh.looks_like_hh(r.get("chosen")),
           hh.parse_hh, "chosen/rejected whole HH dialogues"),
    Format("implicit-prompt", lambda r: isinstance(r.get("chosen"), str) and "prompt" not in r,
           trl.parse_implicit_prompt, "chosen/rejected prompt+reply strings (prompt: their common prefix)"),
    Format("columns", lambda r: False, labelled.parse_columns, "--columns a=COL,b=COL,label=COL,label_means=M"),
)
BY_NAME = {f.name: f for f in FORMATS}
FORMAT_NAMES = tuple(BY_NAME)
RESPONSE_SET_FORMATS = tuple(f.name for f in FORMATS if f.parse is None)


def detect_format(record: Mapping[str, Any]) -> str:
    for fmt in FORMATS:
        if fmt.detect(record):
            return fmt.name
    raise RowError("unknown_format", f"cannot tell the format from fields {sorted(record)}; pass --format or --columns")


def parse_record(record: Mapping[str, Any], fmt: str, *, keep_empty: bool = False,
                 options: Options | None = None) -> Parsed:
    """One record as a :class:`Parsed` pair, or raise :class:`RowError` with the reason."""
    parse = BY_NAME[fmt].parse
    if parse is None:
        raise ValueError(f"{fmt} is a response-set layout; its records become pairs through curate.pairs")
    parsed = parse(record, options or Options())
    prompt = merge_same_role([{"role": m["role"], "content": m["content"].strip()} for m in parsed.prompt])
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("bad_prompt", "the prompt must end with a user turn")
    if any(not m["content"] for m in prompt if m["role"] == "user"):
        raise RowError("empty_prompt_turn", "a user turn in the prompt is empty")
    if not keep_empty:
        for name, reply in (("chosen", parsed.chosen), ("rejected", parsed.rejected)):
            if not reply.strip():
                raise RowError("empty_reply", f"the {name} reply is empty (keep with --keep-empty)")
    if parsed.chosen == parsed.rejected:
        raise RowError("identical_replies", "chosen and rejected replies are identical")
    scores = parsed.extras.get("score_chosen"), parsed.extras.get("score_rejected")
    if None not in scores and scores[0] == scores[1]:
        raise RowError("tie", f"score_chosen == score_rejected ({scores[0]:g}): neither reply is preferred")
    parsed.prompt = prompt
    return parsed
