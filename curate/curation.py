"""Act on the scores: rules that drop, flip or reweight pairs, with an audit trail.

A :class:`Rule` selects pairs from the scored table (pairs joined with every
score column) and names an action:

- ``drop``: the pair leaves the training set;
- ``flip``: chosen and rejected are swapped (same ``pair_id``; the pair's
  ``flipped`` column is set, the rule named in ``meta.flipped_by`` and in the
  audit trail);
- ``reweight=F``: the pair's ``weight`` is multiplied by ``F`` (default 0.5).

Semantics, so that a run is easy to reason about and exactly repeatable:

- Pairs set aside by the holdout (a stable hash of ``pair_id``) are never
  seen by any rule.
- Every rule *selects* on the original scores of all pairs entering curation
  (after the holdout). Percentages are of those pairs, not of what earlier
  rules left, so selections do not depend on rule order and their overlaps
  are meaningful.
- Rules are *applied* in order. A dropped pair stays dropped; a pair flips at
  most once (two flip rules matching it mean the same thing); reweight
  factors multiply. ``changed`` counts the pairs a rule actually changed,
  ``matched`` the pairs it selected.
- A pair whose value in the rule's column is missing (null/NaN) is never
  selected; such pairs are counted as ``missing``.

Per-pair training signals (methods.md section 6), computed after the rules on
the final orientation of each pair:

- ``weight``: ``strength`` = 2·σ(μ̂) from the ensemble mean margin
  ``rm_margin_mean`` (1 at μ̂ = 0, → 2 for strong pairs, → 0 for pairs the
  ensemble thinks are mislabelled); ``madpo`` = the MADPO weight of the
  logit-scale margin logit(``p_chosen``); times any reweight factors.
- ``label_confidence`` = 1 − ``flip_prob_conservative``, mirrored for
  flipped pairs: the probability that the pair's label, as exported, is right,
  at the flip rate the data support (``--max-flip-prob`` reads the same column).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import polars as pl
from scipy.special import expit

from curate import where as where_lang
from curate.data.schema import FLIPPED, GROUP_COLUMN, PAIR_SCHEMA, flipped_mask
from curate.errors import CurateError
from curate.outdir import check_target, staged_dir
from curate.rundir import (CURATION, HOLDOUT, MANIFEST, PAIRS, SCORES, CurationSection, RunDir, write_json,
                           write_parquet)
from curate.scores.noise import ACTION_COLUMN, with_action_column

ACTIONS = ("drop", "flip", "reweight")
DEFAULT_REWEIGHT_FACTOR = 0.5
WEIGHT_SCHEMES = ("none", "strength", "madpo")
TRAINING_SIGNALS = ("weight", "label_confidence")  # per-pair columns curation adds
SELECTORS = ("above", "below", "top", "bottom", "outside-bottom", "where")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

STRENGTH_COLUMN = "rm_margin_mean"
P_CHOSEN_COLUMN = "p_chosen"

# MADPO defaults from methods.md section 6 (the reference code's tau is 2).
MADPO_C_MAX = 2.0
MADPO_C_MIN = 0.5
MADPO_LAMBDA = 1.0
MADPO_TAU = math.log(999.0)


# ----------------------------------------------------------------- pure math
def sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(np.asarray(x, dtype=np.float64))


def logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 − p)), with p clipped to [eps, 1 − eps] so certain pairs stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def madpo_coefficient(abs_margin: np.ndarray, *, c_max: float = MADPO_C_MAX, c_min: float = MADPO_C_MIN,
                      lam: float = MADPO_LAMBDA, tau: float = MADPO_TAU) -> np.ndarray:
    """c(|m|) = c_min + (c_max − c_min) / (1 + ((c_max − 1)/(1 − c_min))·exp(λ(|m| − τ)))."""
    abs_margin = np.asarray(abs_margin, dtype=np.float64)
    return c_min + (c_max - c_min) / (1.0 + (c_max - 1.0) / (1.0 - c_min) * np.exp(lam * (abs_margin - tau)))


def madpo_weight(margin: np.ndarray, *, c_max: float = MADPO_C_MAX, c_min: float = MADPO_C_MIN,
                 lam: float = MADPO_LAMBDA, tau: float = MADPO_TAU) -> np.ndarray:
    """MADPO per-pair loss weight of a Bradley-Terry logit margin m (chosen minus rejected).

    w = σ(c(|m|)·m) / σ(m) for m > −τ, else 1. The weight is above 1 for small
    positive margins, below 1 for negative ones, dips to about 0.06 at m = −3,
    and returns to 1 for m ≤ −τ: the most confidently mislabelled pairs get
    full weight, so drop or flip those with a rule first.
    """
    m = np.asarray(margin, dtype=np.float64)
    c = madpo_coefficient(np.abs(m), c_max=c_max, c_min=c_min, lam=lam, tau=tau)
    ratio = sigmoid(c * m) / sigmoid(m)
    return np.where(m > -tau, ratio, 1.0)


def strength_weight(mean_margin: np.ndarray) -> np.ndarray:
    """2·σ(μ̂): 1 for an ambiguous pair, towards 2 for strong ones, towards 0 for reversed ones."""
    return 2.0 * sigmoid(mean_margin)


def holdout_mask(pair_ids: Sequence[str], fraction: float) -> np.ndarray:
    """True for the pairs set aside: a hash of the pair_id below ``fraction``.

    Stable across runs and machines, and independent of row order and of the
    other pairs, so the same pair is held out in every run with this fraction
    (and a larger fraction holds out a superset).
    """
    if not 0.0 <= fraction < 1.0:
        raise CurateError(f"--holdout must be a fraction in [0, 1), got {fraction}")
    u = np.array(
        [int.from_bytes(hashlib.sha256(f"curate-holdout:{pid}".encode()).digest()[:8], "big") / 2**64 for pid in pair_ids],
        dtype=np.float64,
    )
    return u < fraction


# ----------------------------------------------------------------- actions and rules
@dataclass(frozen=True)
class Action:
    kind: str = "drop"
    factor: float = 1.0

    def __post_init__(self):
        if self.kind not in ACTIONS:
            raise CurateError(f"unknown action {self.kind!r}: use one of {', '.join(ACTIONS)}")
        if self.kind == "reweight" and not (self.factor >= 0 and math.isfinite(self.factor)):
            raise CurateError(f"a reweight factor must be a finite number >= 0, got {self.factor}")

    @classmethod
    def parse(cls, text: str) -> "Action":
        """'drop', 'flip', 'reweight' or 'reweight=F'."""
        text = text.strip()
        if text.startswith("reweight"):
            rest = text[len("reweight"):]
            if not rest:
                return cls("reweight", DEFAULT_REWEIGHT_FACTOR)
            if rest.startswith("="):
                try:
                    return cls("reweight", float(rest[1:]))
                except ValueError:
                    pass
            raise CurateError(f"cannot read action {text!r}: write reweight or reweight=0.5")
        return cls(text)

    def __str__(self) -> str:
        return f"reweight={self.factor:g}" if self.kind == "reweight" else self.kind


_ACTION_SUFFIX = re.compile(r":\s*(drop|flip|reweight(?:=[-+0-9.eE]+)?)\s*$")


def split_action(text: str, default: Action | str | None = None) -> tuple[str, Action]:
    """Split 'VALUE[:ACTION]' into the value text and the action (``default`` if none given)."""
    match = _ACTION_SUFFIX.search(text)
    if match:
        return text[: match.start()].strip(), Action.parse(match.group(1))
    if isinstance(default, str):
        default = Action.parse(default)
    return text.strip(), default or Action("drop")


@dataclass(frozen=True)
class Rule:
    """One selection of pairs and what to do with them.

    ``select``: ``above`` (column > value), ``below`` (column < value),
    ``top`` / ``bottom`` (the ``value`` highest / lowest pairs by column, a
    percentage of the pairs entering curation when ``percent``),
    ``outside-bottom`` (every valued pair except the lowest ``value``), or
    ``where`` (``value`` is a polars expression, see :func:`parse_where`).
    """

    name: str
    select: str
    column: str | None
    value: Any
    action: Action = field(default_factory=Action)
    percent: bool = False

    def __post_init__(self):
        if self.select not in SELECTORS:
            raise CurateError(f"unknown selector {self.select!r}: use one of {', '.join(SELECTORS)}")
        if self.select in ("top", "bottom", "outside-bottom"):
            limit = 100 if self.percent else float("inf")
            if not (0 < float(self.value) <= limit):
                what = "a percentage in (0, 100]" if self.percent else "a count > 0"
                raise CurateError(f"{self.name}: {self.value} is not {what}")

    def columns(self) -> list[str]:
        if self.select == "where":
            return where_lang.columns(self.value)  # the expression is validated too
        return [self.column]

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["action"] = str(self.action)
        return out


def _ches_action(text: str, rule: str) -> tuple[str, Action]:
    value, action = split_action(text, "drop")
    if action.kind == "flip":
        raise CurateError(f"{rule}: CHES measures likelihood displacement, not label errors; use drop or reweight")
    return value, action


def _number(text: str, rule: str, low: float = -math.inf, high: float = math.inf, what: str = "a finite number") -> float:
    """A finite number in [low, high] (NaN and infinities are refused: no threshold means nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise CurateError(f"{rule}: cannot read {text!r} as a number") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise CurateError(f"{rule}: {text!r} is not {what}; give e.g. {rule} {_EXAMPLES.get(rule, '1')}")
    return value


_EXAMPLES = {"--max-flip-prob": "0.9", "--max-margin-std": "2", "--ches-drop-top": "10", "--ches-keep-lowest": "15",
             "--min-strength": "0", "--ches-threshold": "5"}
_PERCENT = "a percentage in (0, 100]"


# ----------------------------------------------------------------- rule specs: one class per rule, a registry by name
class RuleSpec:
    """A curation rule as data: what the CLI flag or the recipe key means.

    Each subclass is a frozen dataclass registered under its ``option`` (the
    recipe key; the CLI flag is ``--`` + option with dashes). ``parse`` reads
    the flag's text, ``rule`` gives the :class:`Rule` that curation applies.
    The CLI and recipes both go through :func:`rules_from_options`, so they
    cannot drift.
    """

    option: ClassVar[str]
    repeatable: ClassVar[bool] = False

    @classmethod
    def parse(cls, text: str, *, ches_column: str = "ln_ches", noise_action: str = "drop") -> "RuleSpec":
        raise NotImplementedError

    def rule(self) -> Rule:
        raise NotImplementedError

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


RULE_SPECS: dict[str, type[RuleSpec]] = {}


def register(cls: type[RuleSpec]) -> type[RuleSpec]:
    """Add a rule spec to the registry; the registry's order is the order rules are applied in."""
    RULE_SPECS[cls.option] = cls
    return cls


@register
@dataclass(frozen=True)
class ChesThreshold(RuleSpec):
    """Pairs with CHES above an absolute value (model-specific: compare with the column's quantiles)."""

    option: ClassVar[str] = "ches_threshold"
    value: float
    action: Action = field(default_factory=Action)
    column: str = "ln_ches"

    @classmethod
    def parse(cls, text, *, ches_column="ln_ches", noise_action="drop"):
        value, action = _ches_action(str(text), "--ches-threshold")
        return cls(_number(value, "--ches-threshold"), action, ches_column)

    def rule(self):
        return Rule(f"ches-threshold {self.column} > {self.value:g}", "above", self.column, self.value, self.action)


@dataclass(frozen=True)
class _ChesPercent(RuleSpec):
    """A CHES rule on a percentage of the pairs entering curation."""

    percent: float
    action: Action = field(default_factory=Action)
    column: str = "ln_ches"
    select: ClassVar[str]

    @classmethod
    def parse(cls, text, *, ches_column="ln_ches", noise_action="drop"):
        flag = "--" + cls.option.replace("_", "-")
        value, action = _ches_action(str(text), flag)
        return cls(_number(value, flag, 1e-12, 100, _PERCENT), action, ches_column)

    def rule(self):
        return Rule(f"{self.option.replace('_', '-')} {self.percent:g}% {self.column}", self.select, self.column,
                    self.percent, self.action, percent=True)


@register
@dataclass(frozen=True)
class ChesDropTop(_ChesPercent):
    """The highest PCT percent of pairs by CHES (the most likelihood displacement)."""

    option: ClassVar[str] = "ches_drop_top"
    select: ClassVar[str] = "top"


@register
@dataclass(frozen=True)
class ChesKeepLowest(_ChesPercent):
    """Every pair except the lowest PCT percent by CHES (the paper kept ~5-15% on refusal data).

    A keep-style rule: unscored pairs are never among the kept ones, so they
    are selected (dropped, or reweighted) with the rest.
    """

    option: ClassVar[str] = "ches_keep_lowest"
    select: ClassVar[str] = "outside-bottom"


@dataclass(frozen=True)
class _Threshold(RuleSpec):
    """A strength / noise rule: pairs on the wrong side of a threshold on one column."""

    value: float
    action: Action = field(default_factory=Action)
    column: ClassVar[str]
    select: ClassVar[str]
    bounds: ClassVar[tuple[float, float, str]] = (-math.inf, math.inf, "a finite number")

    @classmethod
    def parse(cls, text, *, ches_column="ln_ches", noise_action="drop"):
        value, action = split_action(str(text), noise_action)
        return cls(_number(value, "--" + cls.option.replace("_", "-"), *cls.bounds), action)

    def rule(self):
        sign = ">" if self.select == "above" else "<"
        name = self.option.replace("_", "-")
        return Rule(f"{name} {self.column} {sign} {self.value:g}", self.select, self.column, self.value, self.action)


@register
@dataclass(frozen=True)
class MinStrength(_Threshold):
    """Pairs whose reward-ensemble mean margin is below X (weak or reversed preferences)."""

    option: ClassVar[str] = "min_strength"
    column: ClassVar[str] = STRENGTH_COLUMN
    select: ClassVar[str] = "below"


@register
@dataclass(frozen=True)
class MaxMarginStd(_Threshold):
    """Pairs whose reward-ensemble members disagree: margin std above X (X >= 0)."""

    option: ClassVar[str] = "max_margin_std"
    column: ClassVar[str] = "rm_margin_std"
    select: ClassVar[str] = "above"
    bounds: ClassVar[tuple[float, float, str]] = (0.0, math.inf, "a finite number >= 0")


@register
@dataclass(frozen=True)
class MaxFlipProb(_Threshold):
    """Pairs whose estimated probability of a wrong label is above X (X in [0, 1])."""

    option: ClassVar[str] = "max_flip_prob"
    column: ClassVar[str] = ACTION_COLUMN
    select: ClassVar[str] = "above"
    bounds: ClassVar[tuple[float, float, str]] = (0.0, 1.0, "a probability in [0, 1]")


_FEATURE_SPEC = re.compile(r"^\s*([^:\s]+)\s*:\s*(drop|flip|reweight(?:=[-+0-9.eE]+)?)-(top|bottom)\s*=\s*([0-9.]+)(%?)\s*$")


@register
@dataclass(frozen=True)
class Feature(RuleSpec):
    """'FEATURE:ACTION-top=N' or '...-bottom=N' (N a count, or 'N%'), e.g. '7:flip-top=50'.

    FEATURE is an SAE feature index (column ``sae_f<index>``) or a column
    name. Activations are signed: top = the pairs with the largest values.
    """

    option: ClassVar[str] = "features"
    repeatable: ClassVar[bool] = True
    column: str
    side: str
    count: float
    action: Action = field(default_factory=Action)
    percent: bool = False

    @classmethod
    def parse(cls, text, *, ches_column="ln_ches", noise_action="drop"):
        match = _FEATURE_SPEC.match(str(text))
        if not match:
            raise CurateError(
                f"cannot read --feature {text!r}: write FEATURE:ACTION-top=N, e.g. 7:drop-top=100, 7:flip-top=50 or 7:drop-top=5%"
            )
        feature, action, side, count, pct = match.groups()
        if pct:
            value = _number(count, "--feature", 1e-12, 100, _PERCENT)
        else:
            value = _number(count, "--feature", 1, math.inf, "a whole count >= 1")
            if value != int(value):
                raise CurateError(f"--feature {text!r}: the count {count} is not a whole number; write N or N%")
        column = f"sae_f{feature}" if feature.isdigit() else feature
        return cls(column, side, value, Action.parse(action), bool(pct))

    def rule(self):
        count = f"{self.count:g}{'%' if self.percent else ''}"
        return Rule(f"feature {self.column} {self.action}-{self.side}={count}", self.side, self.column, self.count, self.action, percent=self.percent)


@register
@dataclass(frozen=True)
class Where(RuleSpec):
    """A ``--where`` expression (see :mod:`curate.where`), optionally ending in ':ACTION'."""

    option: ClassVar[str] = "where"
    repeatable: ClassVar[bool] = True
    expr: str
    action: Action = field(default_factory=Action)

    @classmethod
    def parse(cls, text, *, ches_column="ln_ches", noise_action="drop"):
        expr, action = split_action(str(text), "drop")
        where_lang.parse(expr)  # refuse a bad expression now, before any work
        return cls(expr, action)

    def rule(self):
        return Rule(f"where {self.expr}", "where", None, self.expr, self.action)


def _ches_rule_maker(spec_class: type[RuleSpec]):
    def make(spec: str | float, column: str = "ln_ches") -> Rule:
        return spec_class.parse(spec, ches_column=column).rule()
    return make


def _noise_rule_maker(spec_class: type[RuleSpec]):
    def make(spec: str | float, default_action: str = "drop") -> Rule:
        return spec_class.parse(spec, noise_action=default_action).rule()
    return make


# One function per rule spec: the text of its CLI flag -> its Rule.
ches_threshold_rule = _ches_rule_maker(ChesThreshold)
ches_drop_top_rule = _ches_rule_maker(ChesDropTop)
ches_keep_lowest_rule = _ches_rule_maker(ChesKeepLowest)
min_strength_rule = _noise_rule_maker(MinStrength)
max_margin_std_rule = _noise_rule_maker(MaxMarginStd)
max_flip_prob_rule = _noise_rule_maker(MaxFlipProb)


def feature_rule(spec: str) -> Rule:
    return Feature.parse(spec).rule()


def where_rule(spec: str, default_action: str = "drop") -> Rule:
    expr, action = split_action(spec, default_action)
    return Where.parse(f"{expr}:{action}").rule()


def parse_where(expr: str) -> pl.Expr:
    """A --where text as a polars expression, built from an allowlist (see :mod:`curate.where`)."""
    return where_lang.parse(expr)[0]


# ----------------------------------------------------------------- selection
def _float_column(frame: pl.DataFrame, column: str) -> np.ndarray:
    """A numeric column as floats, nulls as NaN."""
    return frame[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _values(pool: pl.DataFrame, column: str, rule: Rule) -> np.ndarray:
    dtype = pool.schema[column]
    if not dtype.is_numeric():
        raise CurateError(f"{rule.name}: column {column!r} is {dtype}, not numeric")
    return _float_column(pool, column)


def _rank_mask(values: np.ndarray, pair_ids: pl.Series, k: int, highest: bool) -> np.ndarray:
    """The k valued entries with the highest (or lowest) values; ties broken by pair_id."""
    ranked = (
        pl.DataFrame({"value": values, "pair_id": pair_ids, "row": np.arange(len(values))})
        .filter(pl.col("value").is_not_nan())
        .sort(["value", "pair_id"], descending=[highest, False])
    )
    mask = np.zeros(len(values), dtype=bool)
    mask[ranked["row"].head(k).to_numpy()] = True
    return mask


def select(pool: pl.DataFrame, rule: Rule) -> tuple[np.ndarray, int]:
    """(mask of the pairs the rule selects, count of pairs it could not judge)."""
    if rule.select == "where":
        try:
            values = pool.select(parse_where(rule.value).alias("_m"))["_m"]
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
            raise CurateError(f"{rule.name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if values.dtype != pl.Boolean:
            raise CurateError(f"{rule.name} must give True/False per pair, got {values.dtype}; e.g. add '> 0'")
        missing = values.is_null().sum()
        return values.fill_null(False).to_numpy().astype(bool), int(missing)
    values = _values(pool, rule.column, rule)
    valued = ~np.isnan(values)
    missing = int((~valued).sum())
    with np.errstate(invalid="ignore"):
        if rule.select == "above":
            return valued & (values > rule.value), missing
        if rule.select == "below":
            return valued & (values < rule.value), missing
    n_valued = int(valued.sum())
    k = int(round(rule.value * n_valued / 100.0)) if rule.percent else int(min(rule.value, n_valued))
    pair_ids = pool["pair_id"]
    if rule.select == "top":
        return _rank_mask(values, pair_ids, k, highest=True), missing
    if rule.select == "bottom":
        return _rank_mask(values, pair_ids, k, highest=False), missing
    # outside-bottom is keep-style: only the lowest valued pairs are kept, so unscored pairs are selected too
    return ~_rank_mask(values, pair_ids, k, highest=False), missing


def column_quantiles(values: pl.Series) -> dict[str, float]:
    """Quantiles of a score column, shown next to absolute thresholds (which are model-specific)."""
    arr = values.cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
    if arr.size == 0:
        return {}
    return {f"q{round(q * 100):02d}": float(np.quantile(arr, q)) for q in QUANTILES}


# Which command writes a score column, so a rule that needs a missing one can name the fix.
_PRODUCERS = (
    (("flip_prob", ACTION_COLUMN), "curate score --scores noise"),
    (("ln_ches", "ches"), "curate score --scores ches"),
    (("rm_", "p_chosen"), "curate score --scores reward"),
    (("logp",), "curate score --scores logps"),
    (("sae_f",), "curate features"),
)


def producing_step(column: str) -> str | None:
    """The command that writes ``column`` (by exact name or prefix), or None if curate does not make it."""
    for names, step in _PRODUCERS:
        if column in names or any(column.startswith(n) for n in names if n.endswith("_") or n in ("logp", "sae_f")):
            return step
    return None


def check_columns(table: pl.DataFrame, needed: dict[str, str], where: str = "the run") -> None:
    """Raise one CurateError naming every missing column and listing the ones the table has."""
    missing = {col: who for col, who in needed.items() if col not in table.columns}
    if not missing:
        return
    have = [c for c in table.columns if c not in PAIR_SCHEMA]
    wanted = "; ".join(
        f"{who} needs column {col!r}" + (f" (made by `{step}`)" if (step := producing_step(col)) else "")
        for col, who in missing.items()
    )
    listing = ", ".join(have) if have else "(none: run `curate score` first)"
    raise CurateError(f"{wanted}, which {where} does not have; its score columns are: {listing}")


# ----------------------------------------------------------------- applying rules
@dataclass
class CurationResult:
    """What :func:`curate_pairs` produced; nothing is written."""

    pairs: pl.DataFrame  # kept pairs in input order; flips applied; + weight / label_confidence
    holdout: pl.DataFrame  # untouched pairs set aside (pair schema)
    audit: pl.DataFrame  # one row per (pair, rule) selection, plus holdout rows
    summary: dict[str, Any]


AUDIT_SCHEMA = {
    "pair_id": pl.Utf8, "step": pl.Int32, "rule": pl.Utf8, "action": pl.Utf8,
    "changed": pl.Boolean, "values": pl.Utf8,
}


def _trigger_values(pool: pl.DataFrame, mask: np.ndarray, columns: list[str]) -> pl.Series:
    """The values of the rule's columns for each selected pair, as JSON objects."""
    selected = pool.filter(pl.Series(mask))
    if not columns:
        return pl.Series(["{}"] * selected.height, dtype=pl.Utf8)
    return selected.select(pl.struct(columns).struct.json_encode())[:, 0]


def _with_flip_meta(meta: str | None, rule: str) -> str:
    data = json.loads(meta or "{}")
    data["flipped_by"] = rule
    return json.dumps(data, ensure_ascii=False)


def _audit_frame(pair_ids: pl.Series, step: int, rule: str, action: str, changed: np.ndarray, values: pl.Series) -> pl.DataFrame:
    n = pair_ids.len()
    return pl.DataFrame(
        {"pair_id": pair_ids, "step": [step] * n, "rule": [rule] * n, "action": [action] * n,
         "changed": changed, "values": values},
        schema=AUDIT_SCHEMA,
    )


def _rule_report(pool: pl.DataFrame, rule: Rule, step: int, mask: np.ndarray, changed: np.ndarray,
                 missing: int) -> tuple[dict[str, Any], list[str]]:
    """The summary row of one rule and its warnings (matches everything / nothing / missing values)."""
    n = pool.height
    row: dict[str, Any] = {
        "step": step, "rule": rule.name, "action": str(rule.action),
        "matched": int(mask.sum()), "changed": int(changed.sum()), "missing": missing,
    }
    if rule.select != "where":
        row["column"] = rule.column
        row["quantiles"] = column_quantiles(pool[rule.column])
        if rule.select in ("above", "below"):
            row["threshold"] = rule.value
    warnings = []
    if n - missing > 0 and row["matched"] == n - missing:
        warnings.append(f"{rule.name} matches every pair it can judge ({n - missing})")
    elif n and row["matched"] == 0:
        warnings.append(f"{rule.name} matches no pair")
    if missing and rule.select == "outside-bottom":
        warnings.append(f"{rule.name}: {missing} pairs have no value in its column; unscored pairs are never kept, "
                        f"so they were selected ({rule.action})")
    elif missing:
        warnings.append(f"{rule.name}: {missing} pairs have no value in its column and were not selected")
    return row, warnings


NEGATED_PAIR_COLUMNS = ("rating_margin",)  # chosen minus rejected: a flip negates it


def _apply_flips(pairs: pl.DataFrame, flipped_by: np.ndarray) -> pl.DataFrame:
    """Where ``flipped_by`` names a rule: swap chosen and rejected (and every ``*chosen*`` /
    ``*rejected*`` column pair, e.g. ``score_chosen`` / ``score_rejected``), negate ``rating_margin``,
    name the rule in ``meta.flipped_by``. ``flipped`` is relative to the scores' orientation, so
    curating a curated set again composes."""
    flip = flipped_by != None  # noqa: E711 (elementwise on an object array)
    mask = pl.Series(flip)
    out = pairs.with_columns(pl.Series(FLIPPED, flipped_mask(pairs) ^ flip, dtype=pl.Boolean))
    if not flip.any():
        return out
    swaps = {}
    for name in pairs.columns:
        partner = name.replace("chosen", "rejected")
        if partner != name and partner in pairs.columns:
            swaps[name] = pl.when(mask).then(pl.col(partner)).otherwise(pl.col(name))
            swaps[partner] = pl.when(mask).then(pl.col(name)).otherwise(pl.col(partner))
    negated = {c: pl.when(mask).then(-pl.col(c)).otherwise(pl.col(c)) for c in NEGATED_PAIR_COLUMNS if c in pairs.columns}
    meta = [_with_flip_meta(m, by) if by is not None else m for m, by in zip(pairs["meta"].to_list(), flipped_by)]
    return out.with_columns(**swaps, **negated, meta=pl.Series(meta, dtype=pl.Utf8))


def _training_signals(kept: pl.DataFrame, flipped: np.ndarray, factor: np.ndarray, weights: str,
                      soft_labels: bool, reweighted: bool) -> tuple[dict[str, pl.Series], dict[str, Any], list[str]]:
    """``weight`` and ``label_confidence`` of the kept pairs, on their final orientation."""
    columns, info, warnings = {}, {"weights": weights, "soft_labels": soft_labels}, []
    sign = np.where(flipped, -1.0, 1.0)  # a flip negates margins and mirrors probabilities
    if weights != "none" or reweighted:
        base = np.ones(kept.height)
        if weights == "strength":
            base = strength_weight(sign * _float_column(kept, STRENGTH_COLUMN))
        elif weights == "madpo":
            base = madpo_weight(sign * logit(_float_column(kept, P_CHOSEN_COLUMN)))
        no_value = np.isnan(base)
        if no_value.any():
            warnings.append(f"--weights {weights}: {int(no_value.sum())} pairs have no score; they get weight 1")
        columns["weight"] = pl.Series(np.where(no_value, 1.0, base) * factor, dtype=pl.Float64)
        info["weight_without_score"] = int(no_value.sum())
    if soft_labels:
        flip_prob = _float_column(kept, ACTION_COLUMN)
        confidence = np.where(flipped, flip_prob, 1.0 - flip_prob)
        no_value = np.isnan(confidence)
        if no_value.any():
            warnings.append(f"--soft-labels: {int(no_value.sum())} pairs have no {ACTION_COLUMN}; "
                            "their label_confidence is 1")
        columns["label_confidence"] = pl.Series(np.where(no_value, 1.0, confidence), dtype=pl.Float64)
        info["label_confidence_from"] = ACTION_COLUMN
        info["confidence_without_score"] = int(no_value.sum())
    return columns, info, warnings


def _required_columns(rules: Sequence[Rule], weights: str, soft_labels: bool) -> dict[str, str]:
    needed: dict[str, str] = {}
    for rule in rules:
        for col in rule.columns():
            needed.setdefault(col, rule.name)
    if weights == "strength":
        needed.setdefault(STRENGTH_COLUMN, "--weights strength")
    if weights == "madpo":
        needed.setdefault(P_CHOSEN_COLUMN, "--weights madpo (margin = logit(p_chosen))")
    if soft_labels:
        needed.setdefault(ACTION_COLUMN, "--soft-labels")
    return needed


def curate_pairs(table: pl.DataFrame, rules: Sequence[Rule], *, weights: str = "none", soft_labels: bool = False,
                 holdout: float = 0.0, pair_columns: Sequence[str] | None = None) -> CurationResult:
    """Apply ``rules`` in order to a scored pair table (``RunDir.table()``); pure, no I/O.

    ``pair_columns``: the columns of ``table`` that are the pairs' own (the run's
    ``pairs.parquet``: the pair schema, ``prompt_id``, loaded extra columns), kept in
    the output; default the pair schema and ``prompt_id``.
    """
    table = with_action_column(table)
    if weights not in WEIGHT_SCHEMES:
        raise CurateError(f"--weights must be one of {', '.join(WEIGHT_SCHEMES)}, got {weights!r}")
    check_columns(table, _required_columns(rules, weights, soft_labels))
    if table["pair_id"].is_duplicated().any():
        raise CurateError("the pair table has duplicate pair_ids: deduplicate the pairs before curating")

    held = holdout_mask(table["pair_id"].to_list(), holdout) if holdout else np.zeros(table.height, dtype=bool)
    # NaN scores mean "no value": as nulls, no comparison can select them (polars orders NaN above every number).
    pool = table.filter(pl.Series(~held)).with_columns(pl.col(pl.Float32, pl.Float64).fill_nan(None))
    n = pool.height
    dropped = np.zeros(n, dtype=bool)
    flipped_by = np.full(n, None, dtype=object)
    factor = np.ones(n)
    audit, per_rule, masks, warnings = [], [], [], []
    if held.any():
        ids = table["pair_id"].filter(pl.Series(held))
        audit.append(_audit_frame(ids, 0, f"holdout {holdout:g}", "holdout", np.ones(ids.len(), dtype=bool),
                                  pl.Series(["{}"] * ids.len(), dtype=pl.Utf8)))

    for step, rule in enumerate(rules, start=1):
        mask, missing = select(pool, rule)
        live = mask & ~dropped
        if rule.action.kind == "drop":
            changed = live
            dropped |= changed
        elif rule.action.kind == "flip":
            changed = live & (flipped_by == None)  # noqa: E711 (a pair flips at most once)
            flipped_by[changed] = rule.name
        else:
            changed = live if rule.action.factor != 1.0 else np.zeros(n, dtype=bool)
            factor[live] *= rule.action.factor
        row, rule_warnings = _rule_report(pool, rule, step, mask, changed, missing)
        per_rule.append(row)
        warnings += rule_warnings
        masks.append(mask)
        values = _trigger_values(pool, mask, [c for c in rule.columns() if c in pool.columns])
        audit.append(_audit_frame(pool["pair_id"].filter(pl.Series(mask)), step, rule.name, str(rule.action),
                                  changed[mask], values))

    if pair_columns is None:
        pair_columns = [c for c in (*PAIR_SCHEMA, GROUP_COLUMN) if c in table.columns]
    pair_columns = [c for c in pair_columns if c not in TRAINING_SIGNALS]  # curation writes them anew
    keep = ~dropped
    kept = pool.filter(pl.Series(keep))
    out = _apply_flips(kept.select(pair_columns), flipped_by[keep])
    reweighted = any(r.action.kind == "reweight" for r in rules)
    signal_columns, signals, signal_warnings = _training_signals(
        kept, flipped_mask(out), factor[keep], weights, soft_labels, reweighted)
    out = out.with_columns(**signal_columns)
    warnings += signal_warnings

    summary = {
        "rules": [r.describe() for r in rules],
        "per_rule": per_rule,
        "overlaps": [[int((a & b).sum()) for b in masks] for a in masks],
        "counts": {
            "input": table.height,
            "holdout": int(held.sum()),
            "curated_input": n,
            "dropped": int(dropped.sum()),
            "flipped": int((flipped_by[keep] != None).sum()),  # noqa: E711
            "reweighted": int(((factor != 1.0) & keep).sum()),
            "kept": kept.height,
        },
        "holdout_fraction": holdout,
        "signals": signals,
        "warnings": warnings,
    }
    return CurationResult(pairs=out, holdout=table.filter(pl.Series(held)).select(pair_columns),
                          audit=pl.concat(audit) if audit else pl.DataFrame(schema=AUDIT_SCHEMA), summary=summary)


# ----------------------------------------------------------------- the run-directory step
SECTION = CurationSection.name


FILTER_OWNED = (PAIRS, CURATION, HOLDOUT, SCORES, MANIFEST, ".*.tmp")


def rule_specs_from_options(
    *, ches_column: str = "ln_ches", noise_action: str = "drop", **options: Any
) -> list[RuleSpec]:
    """Rule specs from CLI options or a recipe's ``filter`` keys, in the registry's order.

    ``options`` maps a registry name (``ches_drop_top``, ``max_flip_prob``,
    ``features``, ``where``, ...) to its text, or a list of texts for the
    repeatable ones; None means not given.
    """
    unknown = sorted(set(options) - set(RULE_SPECS))
    if unknown:
        raise CurateError(f"unknown curation rule {', '.join(unknown)}: use {', '.join(RULE_SPECS)}")
    noise_action = str(Action.parse(str(noise_action)))  # refuse a bad --noise-action even if no rule uses it
    specs: list[RuleSpec] = []
    for name, spec_class in RULE_SPECS.items():
        given = options.get(name)
        if given is None:
            continue
        texts = ([given] if isinstance(given, (str, int, float)) else list(given)) if spec_class.repeatable else [given]
        specs += [spec_class.parse(str(t), ches_column=ches_column, noise_action=noise_action) for t in texts]
    return specs


def rules_from_options(**options: Any) -> list[Rule]:
    """The CLI's rules in their documented order: CHES, strength and noise, features, --where."""
    return [spec.rule() for spec in rule_specs_from_options(**options)]


def filter_run(run: str | Path, rules: Sequence[Rule] | None = None, out: str | Path | None = None, *,
               weights: str = "none", soft_labels: bool = False, holdout: float = 0.0, dry_run: bool = False,
               force: bool = False, **rule_options: Any) -> dict[str, Any]:
    """Curate a run directory's pairs into ``out`` and return the summary.

    Rules are given as :class:`Rule` objects, or as options (``ches_drop_top=10``,
    ``where=[...]``, see :func:`rules_from_options`), or both (rules first).
    Writes ``out/pairs.parquet`` (kept pairs, flips applied, + ``weight`` /
    ``label_confidence`` when asked), ``out/curation.parquet`` (the audit
    trail), ``out/holdout.parquet`` (when ``holdout`` > 0), a copy of the
    run's ``scores.parquet`` and, last, ``manifest.json`` with a ``curation``
    section listing the files, so ``out`` is itself a run directory that
    ``export`` reads. The directory appears complete or not at all (see
    :mod:`curate.outdir`). With ``dry_run`` nothing is written.
    """
    rules = list(rules or ()) + (rules_from_options(**rule_options) if rule_options else [])
    run_dir = RunDir(run)
    if not (run_dir / PAIRS).exists():
        raise CurateError(f"{run_dir.path} is not a run directory (no pairs.parquet): run `curate score` first")
    if not dry_run:
        if out is None:
            raise CurateError("curate filter needs --out DIR (or --dry-run)")
        if Path(out).resolve() == run_dir.path.resolve():
            raise CurateError(f"--out {out} is the run directory itself: choose a new directory for the curated set")
        check_target(Path(out), force=force, owned=FILTER_OWNED, step="curate filter")
    result = curate_pairs(run_dir.table(), rules, weights=weights, soft_labels=soft_labels, holdout=holdout,
                          pair_columns=run_dir.pairs().columns)
    summary = dict(result.summary, run=str(run_dir.path), out=None if dry_run else str(out), dry_run=dry_run)
    if dry_run:
        return summary

    scores = run_dir.scores()
    manifest = run_dir.manifest()
    with staged_dir(out) as stage:
        files = [CURATION, PAIRS]
        # the audit first: a staging directory with any pairs in it is already marked as a curated one
        write_parquet(result.audit, stage / CURATION)
        write_parquet(result.pairs, stage / PAIRS)
        if holdout:
            write_parquet(result.holdout, stage / HOLDOUT)
            files.append(HOLDOUT)
        if scores.width > 1:
            write_parquet(scores, stage / SCORES)
            files.append(SCORES)
        note = "scores.parquet is the source run's, in its orientation; flipped pairs have flipped = true"
        section = {k: v for k, v in summary.items() if k != "dry_run"} | {"files": files, "note": note}
        manifest[SECTION] = CurationSection.from_dict(section).to_dict()
        write_json(manifest, stage / MANIFEST)
    return summary


def incomplete_curation(path: str | Path) -> str | None:
    """Why ``path`` is an incomplete curated directory, or None (complete, or never curated).

    A curated directory is one with ``curation.parquet`` or a ``curation``
    manifest section; it is complete when the manifest lists its files and
    they all exist.
    """
    run = RunDir(path)
    try:
        section = run.section(CurationSection)
    except (ValueError, OSError):
        return f"its {MANIFEST} cannot be read"
    if section is None:
        return f"it has {CURATION} but no curation section in {MANIFEST}" if (run / CURATION).exists() else None
    absent = [name for name in section.files if not (run / name).exists()]
    return f"its manifest lists {', '.join(absent)}, which are missing" if absent else None
