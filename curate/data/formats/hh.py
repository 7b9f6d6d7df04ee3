"""Anthropic HH-RLHF layouts.

- ``hh``: ``chosen`` / ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is every turn before the
  last Assistant turn and must be the same in both. A reply that contains its
  own ``\\n\\nAssistant:`` / ``\\n\\nHuman:`` marker (12 rows of helpful-base)
  makes the two parses disagree; then the pair is split by the common prefix of
  the two transcripts: the prompt ends at the last Assistant marker both share,
  and each reply is the rest of its transcript, inner markers and all. The row
  stays a ``prompt_mismatch`` when the transcripts first differ inside a Human
  turn, or when both replies go on with Human turns of their own (they differ
  at an earlier Assistant turn).
- ``hh-prompt`` (Dahoas ``rm-static`` / ``full-hh-rlhf``): ``prompt`` is the
  dialogue up to the final ``"\\n\\nAssistant:"``, ``chosen`` / ``rejected`` the
  replies. Parsed into the same turns, so the same rows get the same
  ``pair_id`` as in ``hh``.

HH replies are stripped (the space after ``Assistant:`` belongs to the marker).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from curate.data.chat import merge_same_role
from curate.data.formats.base import Options, Parsed, RowError, require, text

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_ASSISTANT = "\n\nAssistant:"


def looks_like_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip(" ").startswith("\n\nHuman:") and _ASSISTANT in value


def parse_hh_transcript(transcript: str) -> list[dict[str, str]]:
    """Split an HH dialogue into messages (roles user/assistant, content stripped)."""
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise RowError("unparseable_transcript", "text before the first Human/Assistant marker")
    turns = [{"role": _ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if not turns:
        raise RowError("unparseable_transcript", "no Human/Assistant turns found")
    return turns


def _split_last_reply(turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    if turns[-1]["role"] != "assistant":
        raise RowError("no_final_reply", "the dialogue does not end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def _split_by_common_prefix(chosen: str, rejected: str) -> Parsed:
    mismatch = RowError("prompt_mismatch", "chosen and rejected transcripts differ before the last reply")
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    cut = common.rfind(_ASSISTANT)
    if cut < 0 or common.rfind("\n\nHuman:") > cut:
        raise mismatch
    reply_c, reply_r = chosen[cut + len(_ASSISTANT):], rejected[cut + len(_ASSISTANT):]
    if "\n\nHuman:" in reply_c and "\n\nHuman:" in reply_r:
        raise mismatch
    return Parsed(parse_hh_transcript(chosen[:cut]), reply_c.strip(), reply_r.strip())


def parse_hh(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "chosen", "rejected")
    chosen_text, rejected_text = text(record["chosen"], "chosen"), text(record["rejected"], "rejected")
    try:
        # Split off the last reply before merging turns: a reply that swallowed an inline
        # "Human:" shows up as two Assistant turns in a row and must not be merged away.
        prompt_c, reply_c = _split_last_reply(parse_hh_transcript(chosen_text))
        prompt_r, reply_r = _split_last_reply(parse_hh_transcript(rejected_text))
        if merge_same_role(prompt_c) != merge_same_role(prompt_r):
            raise RowError("prompt_mismatch", "chosen and rejected transcripts differ before the last reply")
        return Parsed(prompt_c, reply_c, reply_r)
    except RowError as err:
        if err.reason not in ("prompt_mismatch", "no_final_reply"):
            raise
        return _split_by_common_prefix(chosen_text, rejected_text)


def parse_hh_prompt(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "prompt", "chosen", "rejected")
    turns = parse_hh_transcript(text(record["prompt"], "prompt"))
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]  # the prompt ends with the "Assistant:" the reply follows
    return Parsed(turns, text(record["chosen"], "chosen").strip(), text(record["rejected"], "rejected").strip())
