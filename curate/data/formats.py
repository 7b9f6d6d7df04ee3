"""Row formats: turn one raw record into (prompt messages, chosen, rejected) or a reason.

Formats (``fmt``), detected per dataset from the first record's fields:

- ``hh``: ``chosen`` / ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (Anthropic HH-RLHF). The prompt is
  every turn before the last Assistant turn and must be the same in both.
- ``prompt-chosen-rejected``: plain strings; the prompt becomes one user turn.
- ``messages``: TRL's conversational shape: ``chosen`` / ``rejected`` are message
  lists (UltraFeedback-binarized: full conversations; TRL: assistant turns
  only, with ``prompt`` a message list or a string).

Turn rules: the reply is the last assistant turn; in the prompt, consecutive
turns of the same role are merged, joined by a blank line (HH has a few
dialogues with two Assistant turns in a row); the prompt must end with a user
turn.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from curate.data.chat import merge_same_role

FORMATS = ("hh", "prompt-chosen-rejected", "messages")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class RowError(ValueError):
    """A record that cannot become a pair; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def detect_format(record: Mapping[str, Any]) -> str:
    chosen = record.get("chosen")
    if isinstance(chosen, list):
        return "messages"
    if "prompt" in record:
        return "prompt-chosen-rejected"
    if isinstance(chosen, str) and _HH_TURN.search(chosen):
        return "hh"
    raise RowError("unknown_format", f"cannot tell the format from fields {sorted(record)}; pass --format or --columns")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH dialogue into messages (roles user/assistant, content stripped)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError("unparseable_transcript", "text before the first Human/Assistant marker")
    messages = [
        {"role": _HH_ROLE[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if not messages:
        raise RowError("unparseable_transcript", "no Human/Assistant turns found")
    return messages


def _split_last_reply(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    if messages[-1]["role"] != "assistant":
        raise RowError("no_final_reply", "the dialogue does not end with an assistant turn")
    return messages[:-1], messages[-1]["content"]


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError("non_text_content", f"{field} is {type(value).__name__}, not text")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise RowError("non_text_content", f"{field} is neither text nor a list of messages")
    out = []
    for m in value:
        if "role" not in m or "content" not in m:
            raise RowError("bad_message", f"{field} has a message without role/content")
        out.append({"role": str(m["role"]), "content": _check_text(m["content"], f"{field} content").strip()})
    return out


def _from_hh(record: Mapping[str, Any]):
    chosen = parse_hh_transcript(_check_text(record.get("chosen"), "chosen"))
    rejected = parse_hh_transcript(_check_text(record.get("rejected"), "rejected"))
    # Split off the last reply before merging turns: a reply that swallowed an inline
    # "Human:" shows up as two Assistant turns in a row and must not be merged away.
    prompt_c, reply_c = _split_last_reply(chosen)
    prompt_r, reply_r = _split_last_reply(rejected)
    if merge_same_role(prompt_c) != merge_same_role(prompt_r):
        raise RowError("prompt_mismatch", "chosen and rejected transcripts differ before the last reply")
    return prompt_c, reply_c, reply_r


def _from_strings(record: Mapping[str, Any]):
    prompt = _messages(record.get("prompt"), "prompt")
    return prompt, _check_text(record.get("chosen"), "chosen"), _check_text(record.get("rejected"), "rejected")


def _from_messages(record: Mapping[str, Any]):
    chosen = _messages(record.get("chosen"), "chosen")
    rejected = _messages(record.get("rejected"), "rejected")
    prompt_c, reply_c = _split_last_reply(chosen)
    prompt_r, reply_r = _split_last_reply(rejected)
    if merge_same_role(prompt_c) != merge_same_role(prompt_r):
        raise RowError("prompt_mismatch", "chosen and rejected conversations differ before the last reply")
    if not prompt_c:  # TRL conversational: the prompt is its own column
        if record.get("prompt") is None:
            raise RowError("missing_field", "no prompt column and no prompt turns in chosen/rejected")
        prompt_c = _messages(record["prompt"], "prompt")
    return prompt_c, reply_c, reply_r


_PARSERS = {"hh": _from_hh, "prompt-chosen-rejected": _from_strings, "messages": _from_messages}


def parse_record(record: Mapping[str, Any], fmt: str, *, keep_empty: bool = False):
    """Return ``(prompt, chosen, rejected)`` or raise :class:`RowError` with the reason."""
    for field in ("chosen", "rejected"):
        if record.get(field) is None:
            raise RowError("missing_field", f"no {field!r} field")
    prompt, chosen, rejected = _PARSERS[fmt](record)
    prompt = merge_same_role(prompt)
    chosen, rejected = chosen.strip(), rejected.strip()
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("bad_prompt", "the prompt must end with a user turn")
    if any(not m["content"] for m in prompt if m["role"] == "user"):
        raise RowError("empty_prompt_turn", "a user turn in the prompt is empty")
    if not keep_empty:
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            if not reply:
                raise RowError("empty_reply", f"the {name} reply is empty (keep with --keep-empty)")
    if chosen == rejected:
        raise RowError("identical_replies", "chosen and rejected replies are identical")
    return prompt, chosen, rejected
