"""Turn a pair's chat prompt and a reply into token ids, the same way for every step.

Rules (documented in the README):

- The model's own chat template renders the prompt with the generation prompt
  appended (``<|im_start|>assistant\\n`` for SmolLM2). ``system_prompt``:
  ``"default"`` leaves the template alone (SmolLM2 then inserts its own system
  prompt), ``"none"`` renders no system turn even where the template would add
  one, any other text becomes the system turn.
- A model without a chat template gets a plain format:
  ``"User: ...\\n\\nAssistant: ...\\n\\n"`` turns ending in ``"Assistant:"``, and
  the reply is followed by the EOS token.
- A reply is tokenised on its own (no special tokens) and followed by the token
  that closes an assistant turn in the template (SmolLM2: ``<|im_end|>``), so
  ``|y|`` counts it, as methods.md requires.
- Consecutive turns of the same role are merged into one, joined by a blank line.
- Text is never control: a reply is tokenised with special tokens split, and a
  prompt whose text contains a special token's string (``<|im_end|>`` in a user
  turn) is tokenised piecewise, the template's own tokens as control tokens and
  every message's text with special tokens split, so user text cannot forge a
  turn boundary. Roles other than system, user and assistant are refused.
- Too long for ``max_length``: the reply is kept whole and the prompt is cut
  from the left; a reply that alone does not fit raises :class:`ReplyTooLong`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from curate.errors import CurateError

_PROBE = "CURATE_REPLY_PROBE"
ROLES = ("system", "user", "assistant")
_CONTENT = re.compile(r"CURATE_CONTENT_(\d+)_")


class ReplyTooLong(CurateError):
    """The reply alone exceeds the model's context."""


def merge_same_role(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Merge consecutive turns of one role (chat templates often reject them)."""
    merged: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n\n" + content
        else:
            merged.append({"role": role, "content": content})
    return merged


@dataclass
class Encoded:
    prompt_ids: list[int]
    reply_ids: list[int]
    prompt_truncated: int = 0  # prompt tokens cut from the left


class ChatEncoder:
    """Encode (prompt messages, reply) pairs for one tokenizer."""

    def __init__(self, tokenizer, system_prompt: str | None = "default", max_length: int | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = "default" if system_prompt is None else system_prompt
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eot_id = self._find_end_of_turn()

    # -- rendering -----------------------------------------------------
    def _messages(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        unknown = sorted({m["role"] for m in messages} - set(ROLES))
        if unknown:
            raise CurateError(f"unknown chat role(s) {unknown}: turns must be system, user or assistant; "
                              "map them when loading (curate data inspect shows the roles)")
        msgs = merge_same_role(messages)
        if self.system_prompt not in ("default", "none"):
            msgs = [m for m in msgs if m["role"] != "system"]
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def prompt_text(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self._render(self._messages(messages))

    def _render(self, msgs: list[dict[str, str]]) -> str:
        if not self.has_template:
            turns = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
            return "\n\n".join(turns) + "\n\nAssistant:"
        if self.system_prompt == "none" and not any(m["role"] == "system" for m in msgs):
            return self._render_without_system(msgs)
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _render_without_system(self, msgs: list[dict[str, str]]) -> str:
        """Render with no system turn, even where the template would insert its default.

        Renders with a probe system turn, then removes that turn as the template
        renders it alone; templates that cannot render a lone system turn keep
        their default.
        """
        probe = [{"role": "system", "content": _PROBE}]
        try:
            with_probe = self.tokenizer.apply_chat_template(
                probe + msgs, tokenize=False, add_generation_prompt=True
            )
            system_only = self.tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # noqa: BLE001 - template-specific refusals
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if with_probe.startswith(system_only):
            return with_probe[len(system_only):]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _find_end_of_turn(self) -> int:
        """The token the template closes an assistant turn with (EOS for plain formats)."""
        tok = self.tokenizer
        if self.has_template:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                tokenize=False,
            )
            after = rendered.split(_PROBE, 1)[1]
            ids = tok(after, add_special_tokens=False)["input_ids"]
            special = set(tok.all_special_ids)
            for token_id in ids:
                if token_id in special:
                    return token_id
        if tok.eos_token_id is None:
            raise CurateError("the tokenizer has neither a chat template end-of-turn token nor an EOS token")
        return tok.eos_token_id

    # -- ids -----------------------------------------------------------
    def _has_control_text(self, text: str) -> bool:
        return any(token in text for token in self.tokenizer.all_special_tokens)

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _piecewise_ids(self, msgs: list[dict[str, str]]) -> list[int]:
        """The template rendered around placeholders; template pieces keep their control tokens, texts do not."""
        rendered = self._render([{"role": m["role"], "content": f"CURATE_CONTENT_{i}_"} for i, m in enumerate(msgs)])
        ids: list[int] = []
        for k, piece in enumerate(_CONTENT.split(rendered)):
            if k % 2:
                ids += self._text_ids(msgs[int(piece)]["content"])
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        msgs = self._messages(messages)
        if any(self._has_control_text(m["content"]) for m in msgs):
            ids = self._piecewise_ids(msgs)
        else:
            ids = self.tokenizer(self._render(msgs), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if not self.has_template and bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = [bos] + ids
        return ids

    def reply_ids(self, text: str) -> list[int]:
        return self._text_ids(text) + [self.eot_id]

    def encode(self, messages: Sequence[Mapping[str, str]], reply: str) -> Encoded:
        prompt, reply_ids = self.prompt_ids(messages), self.reply_ids(reply)
        return self.truncate(prompt, reply_ids)

    def truncate(self, prompt: list[int], reply: list[int]) -> Encoded:
        if self.max_length is None or len(prompt) + len(reply) <= self.max_length:
            return Encoded(prompt, reply)
        if len(reply) + 1 > self.max_length:
            raise ReplyTooLong(
                f"reply has {len(reply)} tokens but max_length is {self.max_length} "
                "(one prompt token must remain)"
            )
        keep = self.max_length - len(reply)
        return Encoded(prompt[-keep:], reply, prompt_truncated=len(prompt) - keep)
