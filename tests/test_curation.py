"""Curation rules: selection, actions in order, audit trail, signals, the run-directory step and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.curation import (
    Action,
    ches_drop_top_rule,
    ches_keep_lowest_rule,
    ches_threshold_rule,
    curate_pairs,
    feature_rule,
    filter_run,
    holdout_mask,
    madpo_weight,
    max_flip_prob_rule,
    max_margin_std_rule,
    min_strength_rule,
    parse_where,
    split_action,
    strength_weight,
    where_rule,
)
from curate.data.schema import pairs_frame
from curate.errors import CurateError
from curate.rundir import RunDir

N = 10


def make_table(n: int = N) -> pl.DataFrame:
    """Pairs i = 0..n-1 with scores that are simple functions of i (and one missing value)."""
    pairs = pairs_frame(
        {"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"good {i}", "rejected": f"bad {i}",
         "meta": {"row": i}}
        for i in range(n)
    )
    i = np.arange(n, dtype=float)
    scores = pl.DataFrame({
        "pair_id": pairs["pair_id"],
        "ln_ches": i,                                   # 0 .. 9
        "ches": i * 10,
        "rm_margin_mean": 2.0 - i * 0.5,                # 2.0 .. -2.5
        "rm_margin_std": pl.Series([1.0] * (n - 1) + [None], dtype=pl.Float64),
        "p_chosen": 0.95 - i * 0.1,                     # 0.95 .. 0.05
        "flip_prob": i / 10,                            # 0.0 .. 0.9
        "sae_f7": n - i,                                # 10 .. 1
    })
    return pairs.join(scores, on="pair_id", maintain_order="left")


def row_of(table: pl.DataFrame, i: int) -> dict:
    return table.filter(pl.col("chosen").is_in([f"good {i}", f"bad {i}"])).row(0, named=True)


def kept_rows(result) -> set[int]:
    return {json.loads(m)["row"] for m in result.pairs["meta"]}


# ------------------------------------------------------------------ pure math
def madpo_reference(m: float, c_max=2.0, c_min=0.5, lam=1.0, tau=math.log(999)) -> float:
    """MADPO weight written out from methods.md section 6, one scalar at a time."""
    if m <= -tau:
        return 1.0
    c = c_min + (c_max - c_min) / (1 + ((c_max - 1) / (1 - c_min)) * math.exp(lam * (abs(m) - tau)))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return sig(c * m) / sig(m)


def test_madpo_weight_matches_the_formula_and_hand_values():
    margins = np.array([-8.0, -6.0, -3.0, -1.0, 0.0, 0.5, 2.0, 6.0, 12.0])
    expected = [madpo_reference(m) for m in margins]
    np.testing.assert_allclose(madpo_weight(margins), expected, rtol=1e-12)
    # by hand: c(3) = 0.5 + 1.5 / (1 + 2 e^{3 - ln 999}) = 0.5 + 1.5 / (1 + 2 e^3 / 999) ≈ 1.9420
    c3 = 0.5 + 1.5 / (1 + 2 * math.exp(3) / 999)
    assert c3 == pytest.approx(1.9420, abs=1e-4)
    assert madpo_weight(np.array([-3.0]))[0] == pytest.approx((1 / (1 + math.exp(3 * c3))) / (1 / (1 + math.exp(3))))
    assert madpo_weight(np.array([-3.0]))[0] == pytest.approx(0.0619, abs=5e-4)  # the dip methods.md names
    assert madpo_weight(np.array([0.0]))[0] == 1.0  # sigma(0)/sigma(0)
    assert madpo_weight(np.array([-7.0]))[0] == 1.0  # below -tau: full weight again
    # the reference code's tau = 2 changes the cut-off
    assert madpo_weight(np.array([-3.0]), tau=2.0)[0] == 1.0


def test_strength_weight():
    np.testing.assert_allclose(strength_weight(np.array([0.0, math.log(3), -math.log(3)])), [1.0, 1.5, 0.5])


def test_holdout_is_stable_sized_and_nested():
    ids = [f"{i:016x}" for i in range(4000)]
    small, large = holdout_mask(ids, 0.1), holdout_mask(ids, 0.2)
    assert 0.08 < small.mean() < 0.12
    assert (large >= small).all()  # a larger fraction holds out a superset
    np.testing.assert_array_equal(holdout_mask(ids[::-1], 0.1), small[::-1])  # order does not matter
    with pytest.raises(CurateError):
        holdout_mask(ids, 1.0)


# ------------------------------------------------------------------ parsing
def test_action_suffixes():
    assert split_action("0.8:flip") == ("0.8", Action("flip"))
    assert split_action("0.8") == ("0.8", Action("drop"))
    assert split_action("0.8", "flip") == ("0.8", Action("flip"))
    assert split_action("-1:reweight") == ("-1", Action("reweight", 0.5))
    assert split_action("pl.col('x') > 2 : reweight=0.25") == ("pl.col('x') > 2", Action("reweight", 0.25))
    with pytest.raises(CurateError):
        Action.parse("delete")
    with pytest.raises(CurateError):
        Action.parse("reweight=-1")


def test_feature_specs():
    rule = feature_rule("7:flip-top=50")
    assert (rule.column, rule.select, rule.value, rule.action, rule.percent) == ("sae_f7", "top", 50, Action("flip"), False)
    rule = feature_rule("sae_f3:drop-bottom=5%")
    assert (rule.column, rule.select, rule.percent) == ("sae_f3", "bottom", True)
    for bad in ("7", "7:drop=3", "7:explode-top=3", "7:drop-top=150%"):
        with pytest.raises(CurateError):
            feature_rule(bad)


def test_ches_rules_refuse_flip():
    with pytest.raises(CurateError, match="displacement"):
        ches_threshold_rule("0:flip")


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "pl.read_csv('/etc/passwd')",
        "pl.col('x').map_elements(print)",
        "pl.col('x').__class__",
        "(lambda: 1)()",
        "pl.col('x').deserialize(b'')",
        "pl.Expr.deserialize(b'')",
        "[c for c in 'ab']",
        "pl.DataFrame({'a': [1]}).write_csv('/tmp/x')",
    ],
)
def test_where_refuses_anything_but_expressions(expr):
    with pytest.raises(CurateError):
        parse_where(expr)


def test_where_evaluates_expressions_and_bare_names():
    df = pl.DataFrame({"a": [1.0, 5.0, 3.0], "b": [0, 1, 1]})
    assert df.filter(parse_where("pl.col('a') > 2")).height == 2
    assert df.filter(parse_where("(a > 2) & (b == 1) & ~pl.col('a').is_between(4, 6)")).height == 1
    assert df.filter(parse_where("a > 2 and b == 1")).height == 2  # 'and' / 'or' / 'not' mean & | ~
    with pytest.raises(CurateError, match="reads no column"):
        parse_where("1 + 2")
    with pytest.raises(CurateError, match="True/False"):
        curate_pairs(make_table(), [where_rule("pl.col('ln_ches') * 2")])


# ------------------------------------------------------------------ selection and actions
def test_quantile_rules_select_exact_pairs():
    table = make_table()
    # highest 20% of ln_ches = rows 8, 9
    assert kept_rows(curate_pairs(table, [ches_drop_top_rule(20)])) == set(range(8))
    # keep the lowest 30% = rows 0, 1, 2
    assert kept_rows(curate_pairs(table, [ches_keep_lowest_rule(30)])) == {0, 1, 2}
    # absolute threshold on raw CHES: ches > 65 drops 7, 8, 9
    result = curate_pairs(table, [ches_threshold_rule("65", column="ches")])
    assert kept_rows(result) == set(range(7))
    per_rule = result.summary["per_rule"][0]
    assert per_rule["threshold"] == 65 and per_rule["quantiles"]["q50"] == pytest.approx(45.0)
    # feature: top 2 by sae_f7 (10, 9) = rows 0, 1
    assert kept_rows(curate_pairs(table, [feature_rule("7:drop-top=2")])) == set(range(2, 10))


def test_flip_swaps_replies_keeps_id_and_mirrors_signals():
    table = make_table()
    result = curate_pairs(table, [max_flip_prob_rule("0.75:flip")], weights="madpo", soft_labels=True)
    assert result.pairs.height == N
    flipped = result.pairs.filter(pl.col("flipped"))
    assert sorted(json.loads(m)["row"] for m in flipped["meta"]) == [8, 9]
    row8 = flipped.filter(pl.col("chosen") == "bad 8").row(0, named=True)
    assert row8["rejected"] == "good 8"
    assert row8["pair_id"] == row_of(table, 8)["pair_id"]
    assert json.loads(row8["meta"])["flipped_by"] == "max-flip-prob flip_prob_conservative > 0.75"
    # label confidence: 1 - 0.8 = 0.2 before the flip, mirrored to 0.8 after it
    assert row8["label_confidence"] == pytest.approx(0.8)
    # MADPO on the flipped orientation: p_chosen 0.15 -> margin -logit(0.15)
    assert row8["weight"] == pytest.approx(madpo_reference(-math.log(0.15 / 0.85)))
    row2 = result.pairs.filter(pl.col("chosen") == "good 2").row(0, named=True)
    assert row2["label_confidence"] == pytest.approx(0.8)
    assert row2["weight"] == pytest.approx(madpo_reference(math.log(0.75 / 0.25)))


def test_rules_apply_in_order_with_audit():
    table = make_table()
    rules = [
        min_strength_rule("0"),                        # margin < 0: rows 5..9 dropped
        max_flip_prob_rule("0.35:flip"),               # rows 4..9 match; only row 4 is still there
        max_flip_prob_rule("0.25:flip"),               # rows 3..9; row 4 already flipped: only row 3 changes
        where_rule("pl.col('ln_ches') < 2:reweight=0.5"),
        where_rule("pl.col('ln_ches') < 1:reweight=0.5"),
    ]
    result = curate_pairs(table, rules, weights="none")
    per_rule = {r["step"]: (r["matched"], r["changed"]) for r in result.summary["per_rule"]}
    assert per_rule == {1: (5, 5), 2: (6, 1), 3: (7, 1), 4: (2, 2), 5: (1, 1)}
    assert result.summary["counts"] | {} == {
        "input": 10, "holdout": 0, "curated_input": 10, "dropped": 5, "flipped": 2, "reweighted": 2, "kept": 5,
    }
    weights = dict(zip([json.loads(m)["row"] for m in result.pairs["meta"]], result.pairs["weight"]))
    assert weights == {0: 0.25, 1: 0.5, 2: 1.0, 3: 1.0, 4: 1.0}
    audit = result.audit
    assert audit.height == 5 + 6 + 7 + 2 + 1
    row9 = audit.filter((pl.col("pair_id") == row_of(table, 9)["pair_id"]) & (pl.col("step") == 2)).row(0, named=True)
    assert row9["changed"] is False and json.loads(row9["values"]) == {"flip_prob_conservative": pytest.approx(0.9)}
    # overlaps: rule 1 and rule 2 share rows 5..9
    assert result.summary["overlaps"][0][1] == 5


def test_missing_values_are_never_selected_and_counted():
    result = curate_pairs(make_table(), [max_margin_std_rule("0.5")])
    assert result.summary["per_rule"][0]["missing"] == 1
    assert result.summary["per_rule"][0]["matched"] == 9
    assert any("no value" in w for w in result.summary["warnings"])
    assert any("every pair" in w for w in result.summary["warnings"])
    with_nan = make_table().with_columns(pl.when(pl.col("ln_ches") == 9).then(float("nan")).otherwise("ln_ches").alias("ln_ches"))
    where = curate_pairs(with_nan, [where_rule("pl.col('ln_ches') > 7.5")])
    assert where.summary["per_rule"][0]["matched"] == 1 and where.summary["per_rule"][0]["missing"] == 1
    nothing = curate_pairs(make_table(), [max_flip_prob_rule("0.95")])
    assert any("matches no pair" in w for w in nothing.summary["warnings"])


def test_missing_column_lists_the_columns_the_run_has():
    table = make_table().drop("flip_prob")
    with pytest.raises(CurateError) as err:
        curate_pairs(table, [max_flip_prob_rule("0.5")])
    message = str(err.value)
    assert "'flip_prob_conservative'" in message and "ln_ches" in message and "sae_f7" in message
    with pytest.raises(CurateError, match="nope"):
        curate_pairs(make_table(), [where_rule("pl.col('nope') > 1")])
    with pytest.raises(CurateError, match="flip_prob"):
        curate_pairs(table, [], soft_labels=True)


def test_holdout_pairs_are_untouched_and_excluded():
    table = make_table(200)
    rules = [ches_drop_top_rule(50), max_flip_prob_rule("0.0:flip")]
    result = curate_pairs(table, rules, holdout=0.25)
    held = set(result.holdout["pair_id"])
    assert 25 < len(held) < 75
    assert held.isdisjoint(result.pairs["pair_id"])
    assert held.isdisjoint(result.audit.filter(pl.col("step") > 0)["pair_id"])
    original = table.filter(pl.col("pair_id").is_in(list(held))).select("pair_id", "chosen", "rejected")
    assert result.holdout.select("pair_id", "chosen", "rejected").sort("pair_id").equals(original.sort("pair_id"))
    # percentages are of the pairs entering curation (after the holdout)
    assert result.summary["per_rule"][0]["matched"] == round(0.5 * (200 - len(held)))


def test_rerun_is_identical():
    table = make_table(50)
    rules = [ches_drop_top_rule(10), max_flip_prob_rule("0.5:flip"), feature_rule("7:drop-top=3")]
    a = curate_pairs(table, rules, weights="strength", soft_labels=True, holdout=0.2)
    b = curate_pairs(table.sample(fraction=1.0, shuffle=True, seed=1), rules, weights="strength", soft_labels=True,
                     holdout=0.2)
    assert a.pairs.sort("pair_id").equals(b.pairs.sort("pair_id"))
    assert a.audit.sort("step", "pair_id").equals(b.audit.sort("step", "pair_id"))


# ------------------------------------------------------------------ run directory and CLI
def write_run(path) -> RunDir:
    table = make_table()
    run = RunDir(path)
    pairs = table.select("pair_id", "prompt", "chosen", "rejected", "source", "meta")
    run.write_pairs(pairs, pl.DataFrame())
    run.merge_scores(table.drop("prompt", "chosen", "rejected", "source", "meta"))
    run.update_manifest("score", {"model": "tiny", "dataset": "synthetic"})
    return run


def test_filter_run_writes_a_curated_run_directory(tmp_path):
    write_run(tmp_path / "run")
    out = tmp_path / "curated"
    rules = [ches_drop_top_rule(20), max_flip_prob_rule("0.65:flip")]
    summary = filter_run(tmp_path / "run", rules, out, weights="strength", holdout=0.2)
    curated = RunDir(out)
    assert curated.pairs().height == summary["counts"]["kept"]
    assert set(curated.pairs().columns) >= {"pair_id", "prompt", "chosen", "rejected", "weight"}
    assert (out / "curation.parquet").exists() and (out / "holdout.parquet").exists()
    assert curated.scores().height == N
    manifest = curated.manifest()
    assert manifest["score"]["model"] == "tiny"
    assert manifest["curation"]["counts"] == summary["counts"]
    with pytest.raises(CurateError, match="--force"):
        filter_run(tmp_path / "run", rules, out)
    again = filter_run(tmp_path / "run", rules, out, weights="strength", holdout=0.2, force=True)
    assert again["counts"] == summary["counts"]


def test_dry_run_writes_nothing(tmp_path):
    write_run(tmp_path / "run")
    summary = filter_run(tmp_path / "run", [ches_drop_top_rule(20)], tmp_path / "curated", dry_run=True)
    assert summary["per_rule"][0]["matched"] == 2
    assert not (tmp_path / "curated").exists()


def test_cli_filter_dry_run_and_errors(tmp_path):
    write_run(tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(app, ["filter", str(tmp_path / "run"), "--ches-drop-top", "20", "--max-flip-prob", "0.65",
                                 "--noise-action", "flip", "--feature", "7:drop-top=1",
                                 "--where", "pl.col('ln_ches') < 1:reweight=0.5", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [(r["action"], r["matched"], r["changed"]) for r in summary["per_rule"]] == [
        ("drop", 2, 2), ("flip", 3, 1), ("drop", 1, 1), ("reweight=0.5", 1, 0)
    ]
    result = runner.invoke(app, ["filter", str(tmp_path / "run"), "--where", "pl.col('rm_votes') > 1", "--dry-run"])
    assert result.exit_code == 2
    assert "rm_votes" in result.output and "flip_prob" in result.output
    result = runner.invoke(app, ["filter", str(tmp_path / "run"), "--min-strength", "-1:flip",
                                 "--out", str(tmp_path / "c"), "--soft-labels", "--weights", "madpo"])
    assert result.exit_code == 0, result.output
    assert RunDir(tmp_path / "c").pairs()["label_confidence"].null_count() == 0
