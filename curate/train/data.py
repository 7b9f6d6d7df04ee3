"""What the trainer reads: pairs plus the optional per-pair columns curation wrote.

A directory with ``pairs.parquet`` (a run directory or a curated directory
from ``curate filter``) is read with its scores joined in, so ``weight``,
``label_confidence`` and ``flip_prob`` are found wherever curation put them.
Anything else goes through :func:`curate.data.load_pairs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from curate.data.schema import flipped_mask
from curate.errors import CurateError
from curate.rundir import ScoreSection, resolve_pairs
from curate.scores.noise import ACTION_COLUMN, with_action_column

MAX_EPSILON = 0.5


def read_training_pairs(data: Any, *, limit: int | None = None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Pairs (pair schema + any extra columns) and a description of where they came from."""
    resolved = resolve_pairs(data, limit=limit, with_scores=True)
    pairs, info = resolved.pairs, resolved.info
    if pairs.height == 0:
        raise CurateError(f"no pairs to train on in {info['source']}: check the path or the filter that produced it")
    missing = {"pair_id", "prompt", "chosen", "rejected"} - set(pairs.columns)
    if missing:
        raise CurateError(f"{info['source']} lacks the pair columns {sorted(missing)}: "
                          "load it with `curate data inspect --out`")
    return pairs, info


def column_values(pairs: pl.DataFrame, column: str | None, what: str) -> np.ndarray | None:
    """A per-pair float column (``--weights`` / ``--soft-labels``), refusing missing or bad values."""
    if column is None:
        return None
    if column not in pairs.columns:
        raise CurateError(
            f"--{what} column {column!r} is not in the data (columns: {', '.join(pairs.columns)}); "
            "run `curate filter` with the matching option or name an existing column"
        )
    values = pairs[column].cast(pl.Float64).to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        raise CurateError(f"--{what} column {column!r} has {int(bad.sum())} missing or non-finite values; "
                          "fill or drop them first")
    if what == "soft-labels" and ((values < 0) | (values > 1)).any():
        raise CurateError(f"--soft-labels column {column!r} must hold probabilities in [0, 1]")
    if what == "weights" and (values < 0).any():
        raise CurateError(f"--weights column {column!r} has negative weights; weights must be >= 0")
    return values


def auto_epsilon(flip_prob: np.ndarray, flipped: np.ndarray) -> float:
    """The flip rate of the pairs actually trained on: mean flip_prob, 1 − flip_prob for flipped pairs.

    ``flip_prob`` is the probability that the *scored* label is wrong; after a
    flip the exported label is the other one, so its probability of being wrong
    is 1 − flip_prob. Using the kept pairs only means curation is not corrected for twice.
    """
    flip_prob = np.asarray(flip_prob, dtype=np.float64)
    if flip_prob.size == 0 or not np.isfinite(flip_prob).all():
        raise CurateError("--epsilon auto needs a flip_prob for every pair: run the noise step (`curate score`) first")
    epsilon = float(np.where(flipped, 1.0 - flip_prob, flip_prob).mean())
    if epsilon >= MAX_EPSILON:
        raise CurateError(
            f"--epsilon auto estimated a flip rate of {epsilon:.3f} >= 0.5: the labels carry no usable signal; "
            "curate the data (drop or flip the likely errors) or pass --epsilon explicitly"
        )
    return epsilon


EPSILON_AUTO_SOURCE = (f"auto: mean {ACTION_COLUMN} of the kept pairs (1 - it for flipped ones), the flip "
                       "posterior at the rate the data support (the interval's lower end when not identifiable)")


def epsilon_from_pairs(pairs: pl.DataFrame) -> float:
    """--epsilon auto: from the conservative flip posterior (the rate the data support, not a guess)."""
    pairs = with_action_column(pairs)
    if ACTION_COLUMN not in pairs.columns:
        raise CurateError(f"--epsilon auto needs a {ACTION_COLUMN} column: "
                          "run the noise step (`curate score`) on these pairs first")
    return auto_epsilon(pairs[ACTION_COLUMN].cast(pl.Float64).fill_null(float("nan")).to_numpy(), flipped_mask(pairs))


def scored_reference_logps(pairs: pl.DataFrame, section: ScoreSection, *,
                           model_info: dict[str, Any],
                           system_prompt: str, max_length: int,
                           truncated_any: bool) -> tuple[np.ndarray | None, str]:
    """Reference log-probs ``[N, 2]`` (chosen, rejected) from a scoring run, or None and why not.

    Reused only when the scoring run used the same model (name and file hash),
    system prompt and tokenisation (the same max length, or a larger one when
    training truncates no prompt, so neither did the scorer); a pair flipped by curation swaps its two
    values (scores stay in the original orientation). The caller still checks
    them against a forward of the policy at step 0.
    """
    if not {"logp_chosen", "logp_rejected"} <= set(pairs.columns):
        return None, "no logp_chosen/logp_rejected scores"
    scored_model = section.model or {}
    for key in ("name", "file_sha256"):
        if scored_model.get(key) != model_info.get(key):
            return None, f"scored with another model ({key} {scored_model.get(key)!r})"
    if section.system_prompt != system_prompt:
        return None, "scored with another system prompt"
    scored_max = section.truncation.max_length if section.truncation else None
    if scored_max != max_length and (truncated_any or scored_max is None or scored_max < max_length):
        return None, f"scored with max_length {scored_max}, training uses {max_length}"
    columns = [pl.col("logp_chosen").cast(pl.Float64), pl.col("logp_rejected").cast(pl.Float64)]
    values = pairs.select(columns).to_numpy().copy()
    if not np.isfinite(values).all():
        return None, "some pairs have no logp score"
    flipped = flipped_mask(pairs)
    values[flipped] = values[flipped][:, ::-1]
    return values, "reused from the scoring run"
