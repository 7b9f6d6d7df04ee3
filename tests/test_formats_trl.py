"""TRL layouts (standard, conversational, implicit prompt, unpaired) and UltraFeedback-binarized."""

from pathlib import Path

import pytest

from curate.data import load_pairs
from curate.errors import CurateError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def load(name, **kwargs):
    result = load_pairs(str(FIXTURES / name), **kwargs)
    assert result.info["rows"] == result.pairs.height + result.quarantine.height
    return result


def test_standard_keeps_leading_spaces_of_replies():
    result = load("trl_standard.jsonl")
    assert result.info["format"] == "prompt-chosen-rejected"
    assert result.pairs.select("chosen", "rejected").row(0) == (" blue.", " green.")
    assert result.pairs["prompt"][0].to_list() == [{"role": "user", "content": "The sky is"}]


def test_implicit_prompt_is_the_common_prefix_as_trl_extracts_it():
    result = load("trl_implicit.jsonl")
    assert result.info["format"] == "implicit-prompt"
    # TRL's extract_prompt: {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert result.pairs["pair_id"].to_list() == load("trl_standard.jsonl").pairs["pair_id"].to_list()


def test_implicit_prompt_conversational_equals_explicit():
    implicit = load("trl_implicit_conversational.jsonl")
    explicit = load("trl_conversational.jsonl")
    assert implicit.info["format"] == explicit.info["format"] == "messages"
    assert implicit.pairs.select("prompt", "chosen", "rejected").rows() == explicit.pairs.select(
        "prompt", "chosen", "rejected").rows()
    assert implicit.pairs["chosen"][0] == "It is blue."


def test_unpaired_kto_data_is_refused_in_one_sentence():
    with pytest.raises(CurateError, match="unpaired \\(KTO\\) data.*not preference pairs"):
        load("trl_kto.jsonl")


def test_ultrafeedback_binarized_scores_kept_and_ties_quarantined():
    result = load("ultrafeedback_binarized.jsonl")
    assert result.info["format"] == "messages"
    row = result.pairs.row(0, named=True)
    assert (row["chosen"], row["rejected"], row["score_chosen"], row["score_rejected"]) == (
        "7 is prime.", "8 is prime.", 9.0, 3.5)
    assert result.quarantine["reason"].to_list() == ["tie"]


def test_prompt_id_groups_pairs_of_one_prompt(tmp_path):
    import json

    rows = [{"prompt": "Q?", "chosen": "a", "rejected": "b"}, {"prompt": "Q?", "chosen": "a", "rejected": "c"},
            {"prompt": "R?", "chosen": "a", "rejected": "b"}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = load_pairs(str(path)).pairs["prompt_id"].to_list()
    assert ids[0] == ids[1] != ids[2] and len(ids[0]) == 16
