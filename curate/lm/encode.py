"""One encoding of a pair and one truncation rule, for scoring, eval and training.

Truncation rule: replies are kept whole (each ends with the end-of-turn
token); the prompt is cut from the left until prompt + the longer reply fit
``max_length``, the same cut for both replies so they share one prompt. A pair
whose longer reply alone does not fit raises :class:`curate.data.chat.ReplyTooLong`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import polars as pl


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair: a prompt shared by both replies, each reply ending with the end-of-turn token."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]

    @property
    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def encode_pair(encoder, prompt, chosen: str, rejected: str) -> tuple[EncodedPair, int]:
    """A pair's ids under the shared-prompt truncation rule, and the prompt tokens cut."""
    prompt_ids = encoder.prompt_ids(prompt)
    chosen_ids, rejected_ids = encoder.reply_ids(chosen), encoder.reply_ids(rejected)
    kept = encoder.truncate(prompt_ids, max(chosen_ids, rejected_ids, key=len))  # raises ReplyTooLong
    return EncodedPair(kept.prompt_ids, chosen_ids, rejected_ids), kept.prompt_truncated


@dataclass
class Encoding:
    """The encoded pairs of a table and what happened to the others."""

    pairs: list[EncodedPair] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # row of each encoded pair in the input table
    cut: list[int] = field(default_factory=list)  # prompt tokens cut from each encoded pair
    skipped: dict[int, str] = field(default_factory=dict)  # row -> "reply_over_context: ..." / "cannot_encode: ..."
    too_long: list[str] = field(default_factory=list)  # pair_ids whose longer reply alone exceeds max_length

    @property
    def truncated(self) -> int:
        """Pairs whose prompt lost tokens to ``max_length``."""
        return sum(1 for c in self.cut if c)


def encode_pairs(pairs: pl.DataFrame, encoder) -> Encoding:
    """Encode every row of a pair table; rows that cannot be encoded are kept in ``skipped`` with a reason."""
    from curate.data.chat import ReplyTooLong

    encoding = Encoding()
    for row, (pair_id, prompt, chosen, rejected) in enumerate(
            pairs.select("pair_id", "prompt", "chosen", "rejected").iter_rows()):
        try:
            pair, cut = encode_pair(encoder, prompt, chosen, rejected)
        except ReplyTooLong as exc:
            encoding.skipped[row] = f"reply_over_context: {exc}"
            encoding.too_long.append(pair_id)
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template refusing this conversation
            encoding.skipped[row] = f"cannot_encode: {type(exc).__name__}: {exc}"
            continue
        encoding.pairs.append(pair)
        encoding.kept.append(row)
        encoding.cut.append(cut)
    return encoding
