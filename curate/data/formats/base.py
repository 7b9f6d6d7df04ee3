"""What every row format shares: the parse result, the row error, and message normalisation.

Messages from any layout become ``{"role", "content"}`` dicts with roles
``system`` / ``user`` / ``assistant``:

- role keys ``role`` or ``from`` (ShareGPT), content keys ``content`` or
  ``value``;
- role names ``human``/``user`` -> user, ``gpt``/``assistant``/``bot``/``model``
  -> assistant, ``system``/``developer`` -> system; any other role (``tool``,
  ``function_call``, ``observation``, ...) quarantines the row as
  ``unknown_role``;
- content that is a list of parts (``[{"type": "text", "text": ...}]``) is the
  text of its text parts joined by a newline; a non-text part (an image) is
  ``non_text_content``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from curate.data.chat import merge_same_role

ROLE_NAMES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system", "developer": "system",
}


class RowError(ValueError):
    """A record that cannot become a pair; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Parsed:
    """One record as a pair: prompt messages, the two replies, and typed extra columns."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Options:
    """Per-dataset settings a parser may need."""

    label_column: str | None = None
    label_means: str | None = None  # for the generic a/b/label mapping


def text(value: Any, name: str) -> str:
    """``value`` as text: a string, or the text parts of a content-part list."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "text" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(p, Mapping) for p in value):
        parts = []
        for part in value:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise RowError("non_text_content", f"{name} has a {part.get('type')!r} part; only text is supported")
            parts.append(part["text"])
        return "\n".join(parts)
    raise RowError("non_text_content", f"{name} is {type(value).__name__}, not text")


def message(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise RowError("bad_message", f"{name} is {type(value).__name__}, not a message")
    role = value.get("role", value.get("from"))
    content = value["content"] if "content" in value else value.get("value")
    if role is None or content is None:
        raise RowError("bad_message", f"{name} has a message without role/content (or from/value)")
    mapped = ROLE_NAMES.get(str(role).lower())
    if mapped is None:
        raise RowError("unknown_role", f"{name} has a message with role {role!r}; use system/user/assistant turns")
    return {"role": mapped, "content": text(content, f"{name} content")}


def messages(value: Any, name: str) -> list[dict[str, str]]:
    """A message list (or one message, or a plain string = one user turn)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise RowError("non_text_content", f"{name} is neither text nor a list of messages")
    return [message(m, name) for m in value]


def reply(value: Any, name: str) -> str:
    """A reply: text, or assistant message(s) (consecutive ones merged)."""
    if isinstance(value, str):
        return value
    turns = merge_same_role(messages(value, name))
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise RowError("bad_reply", f"{name} must be one assistant turn, not {[t['role'] for t in turns]}")
    return turns[0]["content"]


def with_system(prompt: list[dict[str, str]], system: Any) -> list[dict[str, str]]:
    """Prepend a system turn (none for a missing or blank one, or where the prompt has one)."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return prompt
    if prompt and prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": text(system, "system")}] + prompt


def require(record: Mapping[str, Any], *fields: str) -> None:
    for name in fields:
        if record.get(name) is None:
            raise RowError("missing_field", f"no {name!r} field")
