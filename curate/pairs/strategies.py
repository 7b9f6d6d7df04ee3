"""Choose (chosen, rejected) pairs from response sets (pure: tables and arrays in, a pair table out).

A candidate pair (i, j) of one prompt is *valid* when reply i is rated
strictly higher than reply j and by at least ``min_margin``:
``score_i - score_j > 0`` and ``score_i - score_j >= min_margin``. Equal
ratings are never paired. Strategies (``K`` = ``max_pairs_per_prompt``):

- ``best-random-lower`` (default; UltraFeedback-binarized's recipe): the best
  rated reply against a random valid lower one (K: that many distinct lower ones);
- ``best-worst``: the best against the worst rated reply (one pair);
- ``all``: every valid pair (K: the K largest margins);
- ``min-ches``: the valid pair with the lowest LN-CHES under the model, ties
  broken by the larger rating margin (K: the K lowest);
- ``max-margin-low-ches``: the valid pair with the largest rating margin,
  ties broken by the lowest LN-CHES (K: the K first in that order).

Ties left after those rules go to the lower ``response_index`` (chosen first,
then rejected); "best" and "worst" are the first such reply. Random choices
draw from a generator seeded by ``seed`` and the prompt id, so a prompt's
pairs do not depend on which other prompts are in the table.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import polars as pl

from curate.data.schema import GROUP_COLUMN, pairs_frame
from curate.errors import CurateError

STRATEGIES = ("best-random-lower", "best-worst", "all", "min-ches", "max-margin-low-ches")
CHES_STRATEGIES = ("min-ches", "max-margin-low-ches")
DEFAULT_STRATEGY = "best-random-lower"


def valid_pairs(scores: np.ndarray, min_margin: float = 0.0) -> np.ndarray:
    """Boolean ``[k, k]``: entry (i, j) is True when reply i may be chosen over reply j."""
    margin = scores[:, None] - scores[None, :]
    return (margin > 0) & (margin >= min_margin)


def choose_in_set(scores: np.ndarray, strategy: str, *, min_margin: float = 0.0, max_pairs: int | None = None,
                  ln_ches: np.ndarray | None = None, rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) positions of one set's replies, in the strategy's order of preference."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = valid_pairs(scores, min_margin)
    margin = scores[:, None] - scores[None, :]
    if strategy in ("best-random-lower", "best-worst"):
        best = int(np.argmax(scores))
        lower = np.flatnonzero(valid[best])
        if not len(lower):
            return []
        if strategy == "best-worst":
            return [(best, int(lower[np.argmin(scores[lower])]))]
        rng = rng if rng is not None else np.random.default_rng(0)
        picked = rng.permutation(lower)[: max_pairs or 1]
        return [(best, int(j)) for j in picked]
    candidates = [(int(i), int(j)) for i, j in zip(*np.nonzero(valid))]
    if strategy == "all":
        order = sorted(candidates, key=lambda p: (-margin[p], p))
        return order[:max_pairs] if max_pairs else order
    if strategy in CHES_STRATEGIES:
        if ln_ches is None:
            raise CurateError(f"--strategy {strategy} needs LN-CHES values: pass a model (--model)")
        if strategy == "min-ches":
            order = sorted(candidates, key=lambda p: (ln_ches[p], -margin[p], p))
        else:
            order = sorted(candidates, key=lambda p: (-margin[p], ln_ches[p], p))
        return order[: max_pairs or 1]
    raise CurateError(f"unknown --strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def _set_rng(seed: int, prompt_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(prompt_id[:8], 16)])


def select_pairs(sets: pl.DataFrame, strategy: str = DEFAULT_STRATEGY, *, min_margin: float = 0.0,
                 max_pairs_per_prompt: int | None = None, seed: int = 0,
                 ln_ches: Mapping[str, np.ndarray] | None = None) -> pl.DataFrame:
    """Pairs in the pair schema, plus ``prompt_id``, ``score_chosen``, ``score_rejected``, ``rating_margin``.

    ``sets``: a response-set table (:mod:`curate.data.response_sets`).
    ``ln_ches``: prompt_id -> ``[k, k]`` LN-CHES matrix (entry (i, j): reply i
    chosen, reply j rejected), rows in the order of ``response_index`` within
    the set; needed by the CHES strategies, and when given every pair also gets
    its ``ln_ches`` column. Sets appear in the order of their first row.
    """
    if strategy not in STRATEGIES:
        raise CurateError(f"unknown --strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy in CHES_STRATEGIES and ln_ches is None:
        raise CurateError(f"--strategy {strategy} needs LN-CHES values: pass a model (--model)")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise CurateError("--max-pairs-per-prompt must be at least 1")
    if min_margin < 0:
        raise CurateError("--min-margin must be 0 or more (equal ratings are never paired)")
    rows, extras = [], []
    for (prompt_id,), group in sets.group_by(GROUP_COLUMN, maintain_order=True):
        group = group.sort("response_index")
        matrix = None if ln_ches is None else np.asarray(ln_ches[prompt_id])
        chosen_pairs = choose_in_set(group["score"].to_numpy(), strategy, min_margin=min_margin,
                                     max_pairs=max_pairs_per_prompt, ln_ches=matrix, rng=_set_rng(seed, prompt_id))
        replies = group.to_dicts()
        for i, j in chosen_pairs:
            win, lose = replies[i], replies[j]
            rows.append({"prompt": win["prompt"], "chosen": win["response"], "rejected": lose["response"],
                         "source": f"{win['source']} > {lose['source']}",
                         "meta": {"strategy": strategy, "chosen_index": win["response_index"],
                                  "rejected_index": lose["response_index"],
                                  "chosen_meta": json.loads(win["meta"] or "{}"),
                                  "rejected_meta": json.loads(lose["meta"] or "{}")}})
            extra = {GROUP_COLUMN: prompt_id, "score_chosen": win["score"], "score_rejected": lose["score"],
                     "rating_margin": win["score"] - lose["score"]}
            if matrix is not None:
                extra["ln_ches"] = float(matrix[i, j])
            extras.append(extra)
    schema = {GROUP_COLUMN: pl.Utf8, "score_chosen": pl.Float64, "score_rejected": pl.Float64,
              "rating_margin": pl.Float64}
    if ln_ches is not None:
        schema["ln_ches"] = pl.Float64
    return pl.concat([pairs_frame(rows), pl.DataFrame(extras, schema=schema)], how="horizontal")
