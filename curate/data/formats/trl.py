"""TRL's preference layouts (https://huggingface.co/docs/trl/dataset_formats).

- ``prompt-chosen-rejected``: standard, ``prompt`` text (one user turn) or a
  message list, ``chosen`` / ``rejected`` reply text, kept verbatim (TRL's
  ``" blue."`` keeps its leading space).
- ``messages``: conversational, ``chosen`` / ``rejected`` message lists. Either
  whole conversations (UltraFeedback-binarized) or assistant turns only, with
  ``prompt`` its own column. As TRL's ``extract_prompt``, the prompt is the
  common prefix of the two lists; each side's rest must be one assistant turn.
  ``score_chosen`` / ``score_rejected`` (UltraFeedback-binarized) are kept as
  columns, and equal scores make the row a ``tie``.
- ``implicit-prompt``: standard without a prompt column: ``chosen`` /
  ``rejected`` are prompt+reply strings and the prompt is their common prefix,
  cut before a space the way TRL's ``extract_prompt`` does.
- A ``system`` column (or ``--columns system=COL``) becomes the prompt's system
  turn in the first two, unless the prompt has one.
- ``kto`` (unpaired ``prompt`` / ``completion`` / ``label``) is refused: it has
  no pairs, only single completions marked good or bad.
"""

from __future__ import annotations

from typing import Any, Mapping

from curate.data.formats.base import Options, Parsed, RowError, messages, reply, require, text, with_system
from curate.errors import CurateError


def scores(record: Mapping[str, Any]) -> dict[str, Any]:
    """``score_chosen`` / ``score_rejected`` as floats where the record has them."""
    out = {}
    for name in ("score_chosen", "score_rejected"):
        value = record.get(name)
        if value is not None:
            try:
                out[name] = float(value)
            except (TypeError, ValueError) as exc:
                raise RowError("bad_score", f"{name} is {value!r}, not a number") from exc
    return out


def parse_prompt_chosen_rejected(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "prompt", "chosen", "rejected")
    prompt = with_system(messages(record["prompt"], "prompt"), record.get("system"))
    return Parsed(prompt, text(record["chosen"], "chosen"),
                  text(record["rejected"], "rejected"), scores(record))


def _common_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse_messages(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "chosen", "rejected")
    chosen, rejected = messages(record["chosen"], "chosen"), messages(record["rejected"], "rejected")
    if chosen == rejected:
        raise RowError("identical_replies", "chosen and rejected conversations are identical")
    n = _common_prefix_length(chosen, rejected)
    prompt = chosen[:n]
    try:
        reply_c, reply_r = reply(chosen[n:], "chosen"), reply(rejected[n:], "rejected")
    except RowError as err:
        if err.reason != "bad_reply":
            raise
        raise RowError("prompt_mismatch", "chosen and rejected conversations differ before the last reply") from err
    if not prompt:  # TRL conversational: the prompt is its own column
        if record.get("prompt") is None:
            raise RowError("missing_field", "no prompt column and no prompt turns in chosen/rejected")
        prompt = messages(record["prompt"], "prompt")
    prompt = with_system(prompt, record.get("system"))
    return Parsed(prompt, reply_c, reply_r, scores(record))


def parse_implicit_prompt(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "chosen", "rejected")
    chosen, rejected = text(record["chosen"], "chosen"), text(record["rejected"], "rejected")
    n = _common_prefix_length(list(chosen), list(rejected))
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1  # as TRL: the space before the first differing word starts the replies
    if not chosen[:n].strip():
        raise RowError("bad_prompt", "chosen and rejected share no prompt text (implicit-prompt format)")
    return Parsed([{"role": "user", "content": chosen[:n]}], chosen[n:], rejected[n:], scores(record))


def refuse_unpaired(record: Mapping[str, Any], options: Options) -> Parsed:
    raise CurateError(
        "this is unpaired (KTO) data: prompt/completion/label rows rate single completions, they are not "
        "preference pairs; curate needs chosen and rejected replies per prompt (pair them yourself, or use TRL's "
        "KTOTrainer)"
    )
