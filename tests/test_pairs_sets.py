"""Response-set layouts (fixtures in each dataset's own layout) and the pair strategies on hand-built sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.data.response_sets import detect_response_set_format, load_response_sets, read_response_sets
from curate.data.schema import make_pair_id, make_prompt_id
from curate.errors import CurateError
from curate.pairs.strategies import choose_in_set, select_pairs

FIXTURES = Path(__file__).parent / "fixtures" / "pairs"


def test_ultrafeedback_raw_default_rating_is_the_mean_of_the_aspect_ratings():
    sets, quarantine, info = read_response_sets(FIXTURES / "ultrafeedback_raw.jsonl")
    assert info["format"] == "ultrafeedback-raw" and info["rating"] == "mean"
    first = sets.filter(pl.col("prompt_id") == make_prompt_id([{"role": "user", "content": "Name three primary colours."}]))
    # (5+5+5+5)/4, (2+1+1+2)/4, (5+4+5+4)/4, (3+2+3)/3 with honesty "N/A" left out
    assert first["score"].to_list() == pytest.approx([5.0, 1.5, 4.5, 8 / 3])
    assert first["response_index"].to_list() == [0, 1, 2, 3]
    assert json.loads(first["meta"][0])["model"] == "gpt-4"
    assert first["source"][1] == "ultrafeedback_raw.jsonl:0#1"
    assert sorted(quarantine["reason"].to_list()) == ["empty_reply", "no_responses"]
    assert sets.height == 7 and info["response_sets"] == 2


@pytest.mark.parametrize("rating, expected", [("overall_score", [9.0, 3.0, 7.5, 5.0]),
                                              ("fine-grained_score", [5.0, 1.5, 4.5, 2.6666666667]),
                                              ("helpfulness", [5.0, 1.0, 4.0, 2.0])])
def test_ultrafeedback_rating_is_selectable(rating, expected):
    sets = load_response_sets(FIXTURES / "ultrafeedback_raw.jsonl", rating=rating)
    assert sets["score"].to_list()[:4] == pytest.approx(expected)


def test_ultrafeedback_aspect_na_is_quarantined_when_that_aspect_is_the_rating():
    _, quarantine, _ = read_response_sets(FIXTURES / "ultrafeedback_raw.jsonl", rating="honesty")
    assert "missing_score" in quarantine["reason"].to_list()


def test_nectar_rank_becomes_minus_rank_and_the_prompt_drops_the_open_assistant_turn():
    sets, quarantine, info = read_response_sets(FIXTURES / "nectar.jsonl")
    assert info["format"] == "nectar" and quarantine.height == 0
    assert sets.height == 10 and sets["prompt_id"].n_unique() == 2
    first = sets.head(7)
    assert first["score"].to_list() == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    assert first["prompt"][0].to_list() == [{"role": "user", "content": "What is the capital of France?"}]
    assert [m["role"] for m in sets["prompt"][7].to_list()] == ["user", "assistant", "user"]
    assert json.loads(first["meta"][0]) == {"model": "gpt-4", "rank": 1.0, "provider": "openai"}


def test_long_table_with_renamed_columns_groups_rows_by_prompt():
    sets, quarantine, info = read_response_sets(FIXTURES / "long.csv",
                                                columns="prompt=question,response=answer,score=rating")
    assert info["format"] == "long"
    assert sets.group_by("prompt_id", maintain_order=True).len()["len"].to_list() == [4, 2]
    assert sets["score"].to_list() == [0.9, 0.2, 0.7, 0.2, 1.0, 0.0]
    assert quarantine["reason"].to_list() == ["missing_score"]


def test_detection_and_unknown_layouts():
    assert detect_response_set_format({"instruction": "x", "completions": []}) == "ultrafeedback-raw"
    assert detect_response_set_format({"prompt": "x", "answers": []}) == "nectar"
    assert detect_response_set_format({"prompt": "x", "response": "y", "score": 1}) == "long"
    assert detect_response_set_format({"prompt": "x", "chosen": "y", "rejected": "z"}) is None
    with pytest.raises(CurateError, match="--format"):
        load_response_sets([{"prompt": "x", "chosen": "y", "rejected": "z"}])


def test_repeated_response_text_in_one_set_is_quarantined():
    records = [{"prompt": "p", "response": r, "score": s} for r, s in [("a", 1), ("a", 2), ("b", 0)]]
    sets, quarantine, _ = read_response_sets(records)
    assert sets["response"].to_list() == ["a", "b"] and sets["response_index"].to_list() == [0, 1]
    assert quarantine["reason"].to_list() == ["duplicate_response"]


# ------------------------------------------------------------------ strategies
SCORES = np.array([3.0, 1.0, 2.0, 1.0])
# valid (chosen, rejected): (0,1) (0,2) (0,3) (2,1) (2,3); the invalid pairs get the lowest values
LN = np.array([[0.0, -5.0, -6.0, -7.0],
               [-99.0, 0.0, -99.0, -99.0],
               [-98.0, -7.0, 0.0, -7.5],
               [-99.0, -99.0, -99.0, 0.0]])


def test_min_ches_picks_the_argmin_over_valid_pairs_only():
    assert choose_in_set(SCORES, "min-ches", ln_ches=LN) == [(2, 3)]
    assert choose_in_set(SCORES, "min-ches", ln_ches=LN, max_pairs=3) == [(2, 3), (0, 3), (2, 1)]


def test_min_ches_ties_go_to_the_larger_rating_margin():
    ln = LN.copy()
    ln[0, 3] = ln[2, 3] = -8.0  # tie: margin 2 for (0, 3), 1 for (2, 3)
    assert choose_in_set(SCORES, "min-ches", ln_ches=ln) == [(0, 3)]


def test_min_margin_limits_the_candidates():
    assert choose_in_set(SCORES, "min-ches", ln_ches=LN, min_margin=1.5) == [(0, 3)]
    assert choose_in_set(SCORES, "all", min_margin=1.5) == [(0, 1), (0, 3)]


def test_max_margin_low_ches_prefers_the_margin_then_the_lower_ln_ches():
    assert choose_in_set(SCORES, "max-margin-low-ches", ln_ches=LN) == [(0, 3)]


def test_all_best_worst_and_equal_ratings():
    assert choose_in_set(SCORES, "all") == [(0, 1), (0, 3), (0, 2), (2, 1), (2, 3)]
    assert choose_in_set(SCORES, "best-worst") == [(0, 1)]
    assert choose_in_set(np.array([2.0, 2.0, 2.0]), "all") == []
    assert choose_in_set(np.array([2.0, 2.0]), "best-random-lower") == []


def test_best_random_lower_draws_only_strictly_lower_replies():
    scores = np.array([1.0, 4.0, 4.0, 2.0, 3.0])
    draws = {choose_in_set(scores, "best-random-lower", rng=np.random.default_rng(s))[0] for s in range(40)}
    assert {c for c, _ in draws} == {1} and {r for _, r in draws} == {0, 3, 4}


def _sets(scores: list[float], prompt: str = "p") -> pl.DataFrame:
    return load_response_sets([{"prompt": prompt, "response": f"reply {i}", "score": s} for i, s in enumerate(scores)])


def test_select_pairs_builds_pair_schema_rows_with_group_and_margin():
    sets = pl.concat([_sets([3, 1, 2, 1]), _sets([5, 5], prompt="q")])
    pairs = select_pairs(sets, "min-ches", ln_ches={pid: LN if n == 4 else np.zeros((2, 2)) for pid, n in
                                                     sets.group_by("prompt_id").len().rows()})
    assert pairs.height == 1  # the all-equal set gives none
    row = pairs.row(0, named=True)
    assert (row["chosen"], row["rejected"]) == ("reply 2", "reply 3")
    assert row["pair_id"] == make_pair_id([{"role": "user", "content": "p"}], "reply 3", "reply 2")
    assert row["prompt_id"] == make_prompt_id([{"role": "user", "content": "p"}])
    assert (row["rating_margin"], row["ln_ches"], row["score_chosen"]) == (1.0, -7.5, 2.0)
    assert json.loads(row["meta"])["strategy"] == "min-ches"


def test_select_pairs_is_repeatable_and_refuses_missing_ln_ches():
    sets = pl.concat([_sets([3, 1, 2, 0], prompt=f"p{i}") for i in range(5)])
    assert select_pairs(sets, seed=1).equals(select_pairs(sets, seed=1))
    with pytest.raises(CurateError, match="--model"):
        select_pairs(sets, "min-ches")
    with pytest.raises(CurateError, match="--strategy"):
        select_pairs(sets, "best")
