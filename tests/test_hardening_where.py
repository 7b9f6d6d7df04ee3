"""Hardening of curation rules: the --where language runs no code, NaN policy, option checks, rule specs."""

from __future__ import annotations

import ast
import builtins
import contextlib
import math
import os
import pickle
import subprocess
from unittest import mock

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from curate import where
from curate.cli import app
from curate.curation import (
    RULE_SPECS,
    ChesKeepLowest,
    MaxFlipProb,
    Where,
    ches_drop_top_rule,
    ches_keep_lowest_rule,
    curate_pairs,
    feature_rule,
    filter_run,
    max_flip_prob_rule,
    rule_specs_from_options,
    rules_from_options,
    where_rule,
)
from curate.data.schema import pairs_frame
from curate.errors import CurateError
from curate.rundir import RunDir

SENTINEL_ENV = "CURATE_TEST_SENTINEL"


def planted_callback(value):
    """The code an attacker hides in a serialized expression: it leaves a file behind if it ever runs."""
    with open(os.environ[SENTINEL_ENV], "w") as fh:
        fh.write("ran")
    return value


def table(ln_ches: list[float | None], flip_prob: list[float | None] | None = None) -> pl.DataFrame:
    n = len(ln_ches)
    pairs = pairs_frame(
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"good {i}", "rejected": f"bad {i}"}
        for i in range(n)
    )
    scores = pl.DataFrame({"pair_id": pairs["pair_id"], "ln_ches": pl.Series(ln_ches, dtype=pl.Float64),
                           "flip_prob": pl.Series(flip_prob or [0.1] * n, dtype=pl.Float64)})
    return pairs.join(scores, on="pair_id", maintain_order="left")


def kept_chosen(result) -> list[str]:
    return sorted(result.pairs["chosen"].to_list())


# ----------------------------------------------------------------- the deserialize exploit
def test_deserialize_exploit_is_refused_without_running_anything(tmp_path, monkeypatch):
    sentinel = tmp_path / "sentinel"
    monkeypatch.setenv(SENTINEL_ENV, str(sentinel))
    payload = pl.col("ln_ches").map_elements(planted_callback, return_dtype=pl.Float64).meta.serialize()
    # the payload is real: polars would run the callback if it were ever deserialized and evaluated
    frame = pl.DataFrame({"ln_ches": [1.0]})
    frame.select(pl.Expr.deserialize(__import__("io").BytesIO(payload)))
    assert sentinel.exists()
    sentinel.unlink()

    run = RunDir(tmp_path / "run")
    t = table([1.0, 2.0])
    run.write_pairs(t.select(pairs_frame([]).columns), pl.DataFrame())
    run.merge_scores(t.select("pair_id", "ln_ches", "flip_prob"))
    short = payload[:40]  # under the length cap, so the refusal is the method's, not the size's
    for data in (payload, short):
        for text in (f"pl.col('ln_ches').deserialize({data!r})", f"pl.Expr.deserialize({data!r})",
                     f"ln_ches.meta.deserialize({data!r}) > 0"):
            reason = "not allowed" if data is short else "over the limit"
            result = CliRunner().invoke(app, ["filter", str(run.path), "--where", text, "--dry-run"])
            assert result.exit_code == 2, result.output
            assert reason in " ".join(result.output.split()) and "Traceback" not in result.output
            with pytest.raises(CurateError, match=reason):
                filter_run(run.path, where=[text], dry_run=True)
    assert not sentinel.exists()


# ----------------------------------------------------------------- fuzz: no code runs, no hang, Expr or CurateError
class CodeRan(Exception):
    pass


@contextlib.contextmanager
def no_code_execution():
    """Make every way of running text or pickles raise; compile may only make ASTs (what ast.parse does).

    Patched only around the call under test (hypothesis itself uses exec).
    """
    real_compile = builtins.compile

    def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        if not flags & ast.PyCF_ONLY_AST:
            raise CodeRan(f"compile({source!r})")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def refuse(name):
        def _refuse(*args, **kwargs):
            raise CodeRan(name)
        return _refuse

    patches = [mock.patch.object(builtins, "compile", ast_only_compile)]
    patches += [mock.patch.object(builtins, name, refuse(name)) for name in ("eval", "exec")]
    patches += [mock.patch.object(os, name, refuse(name)) for name in ("system", "popen", "execv", "fork")]
    patches += [mock.patch.object(subprocess, "Popen", refuse("Popen")), mock.patch.object(pickle, "loads", refuse("loads")),
                mock.patch.object(pl.Expr, "deserialize", refuse("Expr.deserialize"))]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


FRAME = pl.DataFrame({"a": [1.0, -2.0, None, 0.5], "b": [0, 3, 1, None], "s": ["x", "yy", None, "<|im_end|>"]})


def check_outcome(text: str) -> None:
    with no_code_execution():
        _check_outcome(text)


def _check_outcome(text: str) -> None:
    try:
        expr, columns = where.parse(text)
    except CurateError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 1200
        return
    assert isinstance(expr, pl.Expr) and columns
    if set(columns) <= set(FRAME.columns):
        try:
            FRAME.select(expr.alias("m"))  # evaluating what was built is bounded too
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException):
            pass


@settings(max_examples=300, deadline=2000)
@given(st.text(max_size=200))
def test_fuzz_random_text(text):
    check_outcome(text)


NAMES = st.sampled_from(["a", "b", "s", "pl.col('a')", "pl.col('s')", "missing", "pl", "__builtins__"])
NUMBERS = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["9", "99", "1e308", "True", "None", "'txt'", "b'x'"]))
METHODS = st.sampled_from(sorted(where._METHODS) + [f"str.{m}" for m in where._STR_METHODS]
                          + ["deserialize", "map_elements", "pipe", "__class__", "meta.serialize", "str.extract",
                             "apply", "cast", "write_csv", "__reduce__"])
BINARY = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "&", "|", "^", "<", "<=", ">", "==", "!=", " and ",
                          " or ", " in ", " is ", " not in ", "@", "<<"])


def grammar_text():
    leaf = st.one_of(NAMES, NUMBERS)

    def extend(inner):
        args = st.lists(st.one_of(inner, NUMBERS, st.just("[1, 2]"), st.just("closed='left'")), max_size=3)
        return st.one_of(
            st.tuples(inner, BINARY, inner).map("".join),
            st.tuples(st.sampled_from(["-", "~", "not ", "+"]), inner).map("".join),
            inner.map(lambda x: f"({x})"),
            st.tuples(inner, METHODS, args).map(lambda t: f"({t[0]}).{t[1]}({', '.join(t[2])})"),
            st.tuples(st.sampled_from(["abs", "len", "__import__", "getattr", "pl.lit", "pl.col", "pl.read_csv"]),
                      inner).map(lambda t: f"{t[0]}({t[1]})"),
        )

    return st.recursive(leaf, extend, max_leaves=40)


@settings(max_examples=400, deadline=2000)
@given(grammar_text())
def test_fuzz_grammar_like_text(text):
    check_outcome(text)


# ----------------------------------------------------------------- the grammar and its limits
def test_grammar_examples_select_the_right_rows():
    frame = pl.DataFrame({"a": [1.0, 5.0, 3.0, None], "b": [0, 1, 1, 2], "s": ["x<|im_end|>", "hello", "Hi", None]})

    def rows(text):
        return frame.with_row_index("i").filter(where.parse(text)[0])["i"].to_list()

    assert rows("pl.col('a') > 2") == [1, 2]
    assert rows("0 < a < 4") == [0, 2]  # a chain means and
    assert rows("a > 1 and b in [1, 2]") == [1, 2]
    assert rows("a is None") == [3]
    assert rows("not (b == 1) & a.is_not_null()") == [0, 3]  # Python precedence: not (X & Y)
    assert rows("(not b == 1) and a.is_not_null()") == [0]
    assert rows("s.str.contains('<|im')") == [0]  # literal: | is not a regex alternation here
    assert rows("s.str.contains('^h', literal=False)") == [1]
    assert rows("s.str.len_chars() == 2") == [2]
    assert rows("(a ** 2 > 4) | (b == 0)") == [0, 1, 2]
    assert rows("a.fill_null(0).abs().is_between(0, 1)") == [0, 3]
    assert rows("a.log(10) < 0.5") == [0, 2]


@pytest.mark.parametrize("text, reason", [
    ("9**9**9", "literal"),
    ("a ** 1000", "exponent"),
    ("a > " + "9" * 40, "too large"),
    ("a" + ".abs()" * 30 + " > 1", "nest"),
    (" + ".join(["a"] * 60) + " > 1", "nest"),  # a left-leaning chain is deep too
    ("a in [" + ", ".join(["1"] * 450) + "]", "parts"),
    ("a > 1 " + "& (a > 1) " * 400, "limit"),
    ("s.str.contains('" + "a" * 200 + "', literal=False)", "regex"),
    ("a.cast(pl.Object)", "not allowed"),
    ("a.str.extract('x')", "not allowed"),
    ("a[0] > 1", "not allowed"),
    ("1 + 2", "reads no column"),
    ("", "needs an expression"),
    ("a >", "not a valid expression"),
])
def test_refusals_are_one_sentence(text, reason):
    with pytest.raises(CurateError, match=reason) as err:
        where.parse(text)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_unknown_column_lists_available_columns():
    with pytest.raises(CurateError) as err:
        curate_pairs(table([1.0, 2.0]), [where_rule("rm_margin_std > 2")])
    message = str(err.value)
    assert "'rm_margin_std'" in message and "ln_ches, flip_prob" in message and "curate score --scores reward" in message


@pytest.mark.parametrize("rule, step", [
    (lambda: max_flip_prob_rule("0.5"), "curate score --scores noise"),
    (lambda: ches_drop_top_rule(10), "curate score --scores ches"),
    (lambda: feature_rule("3:drop-top=1"), "curate features"),
])
def test_missing_column_names_the_step_that_makes_it(rule, step):
    bare = table([1.0, 2.0]).drop("ln_ches", "flip_prob")
    with pytest.raises(CurateError, match=step.replace("-", r"\-")):
        curate_pairs(bare, [rule()])


# ----------------------------------------------------------------- NaN policy
def test_keep_lowest_never_keeps_unscored_pairs():
    # 10 pairs: 8 scored 0..7, 2 unscored (NaN and null); keep the lowest 25% of the scored = 2 pairs
    t = table([0, 1, 2, 3, float("nan"), 4, 5, None, 6, 7])
    result = curate_pairs(t, [ches_keep_lowest_rule(25)])
    assert kept_chosen(result) == ["good 0", "good 1"]
    row = result.summary["per_rule"][0]
    assert row["missing"] == 2 and row["matched"] == 8 and row["changed"] == 8
    assert any("never kept" in w for w in result.summary["warnings"])
    audit = result.audit.filter(pl.col("step") == 1)
    assert set(t["pair_id"][[4, 7]]) <= set(audit["pair_id"])  # the unscored are in the audit trail


def test_drop_style_rules_never_match_unscored_pairs():
    t = table([0, 1, 2, float("nan"), None], flip_prob=[0.1, 0.9, None, float("nan"), 0.95])
    top = curate_pairs(t, [ches_drop_top_rule(50)])  # 50% of the 3 scored = 2 (rows 1, 2)
    assert kept_chosen(top) == ["good 0", "good 3", "good 4"]
    flip = curate_pairs(t, [max_flip_prob_rule("0.5:flip")])
    assert flip.summary["counts"]["flipped"] == 2 and flip.summary["per_rule"][0]["missing"] == 2
    cond = curate_pairs(t, [where_rule("~(ln_ches < 1)")])  # null stays null under ~: never matched
    assert cond.summary["per_rule"][0]["matched"] == 2 and cond.summary["per_rule"][0]["missing"] == 2
    explicit = curate_pairs(t, [where_rule("ln_ches.is_null()")])  # selecting the unscored on purpose works
    assert explicit.summary["per_rule"][0]["matched"] == 2


@pytest.mark.parametrize("options, message", [
    ({"ches_keep_lowest": "nan"}, "percentage"),
    ({"ches_drop_top": "0"}, "percentage"),
    ({"ches_drop_top": "101"}, "percentage"),
    ({"ches_threshold": "inf"}, "finite"),
    ({"min_strength": "nan:flip"}, "finite"),
    ({"max_flip_prob": "1.5"}, "probability"),
    ({"max_flip_prob": "-0.1"}, "probability"),
    ({"max_margin_std": "-1"}, ">= 0"),
    ({"features": ["7:drop-top=2.5"]}, "whole"),
    ({"features": ["7:drop-top=0"]}, ">= 1"),
    ({"features": ["7:drop-top=150%"]}, "percentage"),
    ({"noise_action": "explode"}, "unknown action"),
    ({"bogus_rule": "1"}, "unknown curation rule"),
])
def test_meaningless_thresholds_are_refused_at_parse_time(options, message):
    with pytest.raises(CurateError, match=message):
        rules_from_options(**options)


# ----------------------------------------------------------------- rule specs
def test_rule_specs_registry_drives_cli_and_recipes_alike():
    assert list(RULE_SPECS) == ["ches_threshold", "ches_drop_top", "ches_keep_lowest", "min_strength",
                                "max_margin_std", "max_flip_prob", "features", "where"]
    specs = rule_specs_from_options(where=["flip_prob > 0.5:flip"], ches_keep_lowest="15", max_flip_prob="0.9",
                                    noise_action="reweight=0.25")
    assert [type(s) for s in specs] == [ChesKeepLowest, MaxFlipProb, Where]  # registry order, not argument order
    assert specs[1].value == 0.9 and str(specs[1].action) == "reweight=0.25"
    assert specs[2].action.kind == "flip" and specs[2].expr == "flip_prob > 0.5"
    assert [s.rule().name for s in specs] == ["ches-keep-lowest 15% ln_ches", "max-flip-prob flip_prob_conservative > 0.9",
                                              "where flip_prob > 0.5"]
    assert specs[0].flag == "--ches-keep-lowest"


def test_filter_run_takes_rule_options_as_keywords(tmp_path):
    run = RunDir(tmp_path / "run")
    t = table([float(i) for i in range(10)])
    run.write_pairs(t.select(pairs_frame([]).columns), pl.DataFrame())
    run.merge_scores(t.select("pair_id", "ln_ches", "flip_prob"))
    by_keyword = filter_run(run.path, ches_drop_top=20, dry_run=True)
    by_rule = filter_run(run.path, [ches_drop_top_rule(20)], dry_run=True)
    assert by_keyword["counts"] == by_rule["counts"] and by_keyword["counts"]["dropped"] == 2
    assert math.isclose(by_keyword["rules"][0]["value"], 20)
    assert np.array_equal(by_keyword["overlaps"], by_rule["overlaps"])


def test_the_sandbox_of_the_fuzz_catches_code_execution():
    with pytest.raises(CodeRan):
        with no_code_execution():
            eval("1")
    with no_code_execution():
        ast.parse("a > 1")  # parsing alone is allowed
