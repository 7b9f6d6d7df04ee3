"""SHP, PKU-SafeRLHF, HelpSteer2 and the generic a/b/label mapping: the chosen side follows the label."""

import json
from pathlib import Path

import pytest

from curate.data import load_pairs
from curate.errors import CurateError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def load(name, **kwargs):
    result = load_pairs(str(FIXTURES / name), **kwargs)
    assert result.info["rows"] == result.pairs.height + result.quarantine.height
    return result


def test_shp_chosen_follows_labels():
    result = load("shp.jsonl")
    assert result.info["format"] == "shp" and result.info["label_column"] == "labels"
    first, second = result.pairs.to_dicts()
    # labels 1: A preferred
    assert first["chosen"].startswith("About five minutes") and first["chosen_from"] == "human_ref_A"
    assert (first["score_chosen"], first["score_rejected"], first["score_ratio"]) == (42.0, 7.0, 6.0)
    # labels 0: B preferred, and its scores follow it
    assert second["chosen"].startswith("Straight roads") and second["chosen_from"] == "human_ref_B"
    assert (second["score_chosen"], second["score_rejected"]) == (30.0, 3.0)
    assert first["prompt"] == [{"role": "user", "content": "How long should I rest a steak before cutting it?"}]
    assert (first["post_id"], first["domain"]) == ("himc90", "askculinary_train")
    assert result.pairs.schema["score_chosen"].is_float()


def test_pku_better_by_default_safer_by_label_column():
    better = load("pku_saferlhf.jsonl")
    assert better.info["format"] == "pku-saferlhf" and better.info["label_column"] == "better_response_id"
    row = better.pairs.row(0, named=True)
    assert row["chosen"].startswith("Here is how to rake") and row["chosen_from"] == "response_0"
    assert (row["is_chosen_safe"], row["is_rejected_safe"]) == (False, True)
    assert (row["better_response_id"], row["safer_response_id"]) == (0, 1)

    safer = load("pku_saferlhf.jsonl", label_column="safer_response_id")
    assert safer.info["label_column"] == "safer_response_id"
    row = safer.pairs.row(0, named=True)
    assert row["chosen"].startswith("I can't help") and (row["is_chosen_safe"], row["is_rejected_safe"]) == (True, False)
    assert safer.pairs["pair_id"].to_list() == better.pairs["pair_id"].to_list()  # same pairs, other side
    with pytest.raises(CurateError, match="does not choose the side"):
        load("pku_saferlhf.jsonl", label_column="response_0_severity_level")


def test_helpsteer2_sign_of_strength_and_tie():
    result = load("helpsteer2_preference.jsonl")
    assert result.info["format"] == "helpsteer2"
    first, second = result.pairs.to_dicts()
    assert first["chosen"].startswith("100 degrees") and first["preference_strength"] == -3  # negative: response 1
    assert second["chosen"].startswith("Soft rain") and second["chosen_from"] == "response_2"
    assert second["prompt"] == [{"role": "user", "content": "Write a haiku about snow."},
                                {"role": "assistant", "content": "White hush on the hills"},
                                {"role": "user", "content": "Now make it about rain."}]
    assert second["source_split"] == "validation"
    assert result.quarantine["reason"].to_list() == ["tie"]  # preference_strength 0


def test_generic_label_mapping_states_its_meaning(tmp_path):
    rows = [{"q": "Pick one.", "x": "left", "y": "right", "pref": 1, "rating": 4.5},
            {"q": "Pick again.", "x": "up", "y": "down", "pref": 0, "rating": 2}]
    path = tmp_path / "ab.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = "prompt=q,a=x,b=y,label=pref,keep=rating"
    index = load_pairs(str(path), columns=base + ",label_means=index")
    assert index.info["format"] == "columns" and index.info["label_column"] == "pref (index)"
    assert index.pairs["chosen"].to_list() == ["right", "up"]  # 1 -> b, 0 -> a
    assert index.pairs["rating"].to_list() == [4.5, 2.0]
    a_pref = load_pairs(str(path), columns=base + ",label_means=a-preferred")
    assert a_pref.pairs["chosen"].to_list() == ["left", "down"]
    with pytest.raises(CurateError, match="label_means"):
        load_pairs(str(path), columns=base)
    with pytest.raises(CurateError, match="--columns mapping yields no pairs.*missing_field"):
        load_pairs(str(path), columns="prompt=q,a=x,b=nope,label=pref,label_means=index")


def test_a_forced_format_that_fits_no_row_says_why():
    with pytest.raises(CurateError, match="--format shp yields no pairs: all 2 rows were quarantined, 2 as missing_field"):
        load("pku_saferlhf.jsonl", fmt="shp")
