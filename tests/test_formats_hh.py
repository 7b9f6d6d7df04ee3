"""HH transcripts (incl. replies holding their own turn markers) and the Dahoas prompt/chosen/rejected layout."""

import gzip
import json
from pathlib import Path

import pytest

from curate.data import load_pairs

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
HELPFUL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dahoas_layout_gives_the_pair_ids_of_the_transcripts():
    dahoas = load_pairs(str(FIXTURES / "dahoas_hh.jsonl"))
    transcripts = load_pairs(str(FIXTURES / "hh_transcripts.jsonl"))
    assert (dahoas.info["format"], transcripts.info["format"]) == ("hh-prompt", "hh")
    assert dahoas.pairs["pair_id"].to_list() == transcripts.pairs["pair_id"].to_list()
    assert dahoas.pairs["prompt"][1].to_list() == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact about owls."}]


def test_dahoas_layout_on_real_hh_rows(hh_path, tmp_path):
    rows = [json.loads(line) for line in gzip.open(hh_path, "rt")][:200]
    dahoas = []
    for row in rows:  # rm-static's split: the prompt ends with the last "\n\nAssistant:"
        cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        prompt = row["chosen"][:cut]
        if not row["rejected"].startswith(prompt):
            continue
        dahoas.append({"prompt": prompt, "response": row["chosen"][cut:], "chosen": row["chosen"][cut:],
                       "rejected": row["rejected"][cut:]})
    kept = {r["prompt"] + r["chosen"] for r in dahoas}
    same_rows = [r for r in rows if r["chosen"] in kept]
    a = load_pairs(write_jsonl(tmp_path / "d.jsonl", dahoas)).pairs["pair_id"].to_list()
    b = load_pairs(write_jsonl(tmp_path / "t.jsonl", same_rows)).pairs["pair_id"].to_list()
    assert len(a) > 150 and a == b


def test_reply_with_its_own_markers_is_split_by_the_common_prefix(tmp_path):
    prompt = "\n\nHuman: Tell me a joke."
    rows = [
        {"chosen": prompt + "\n\nAssistant: Why did the owl laugh?\n\nAssistant: Because it was a hoot.",
         "rejected": prompt + "\n\nAssistant: No."},
        # a genuine mismatch: the transcripts differ in a Human turn
        {"chosen": "\n\nHuman: A?\n\nAssistant: x\n\nHuman: B?\n\nAssistant: y",
         "rejected": "\n\nHuman: A?\n\nAssistant: x\n\nHuman: C?\n\nAssistant: z"},
        # differ at an earlier Assistant turn, and both go on: also a mismatch
        {"chosen": "\n\nHuman: A?\n\nAssistant: x\n\nHuman: B?\n\nAssistant: y",
         "rejected": "\n\nHuman: A?\n\nAssistant: w\n\nHuman: B?\n\nAssistant: y"},
    ]
    result = load_pairs(write_jsonl(tmp_path / "m.jsonl", rows))
    assert result.pairs.select("chosen", "rejected").row(0) == (
        "Why did the owl laugh?\n\nAssistant: Because it was a hoot.", "No.")
    assert result.pairs["prompt"][0].to_list() == [{"role": "user", "content": "Tell me a joke."}]
    assert result.quarantine["reason"].to_list() == ["prompt_mismatch", "prompt_mismatch"]


@pytest.mark.skipif(not HELPFUL.exists(), reason="shared helpful-base sample not found")
def test_helpful_base_counts():
    result = load_pairs(str(HELPFUL))
    # 2,354 rows; 9 replies contain their own "\n\nAssistant:" (they were prompt_mismatch): now pairs
    assert (result.info["rows"], result.pairs.height) == (2354, 2348)
    assert dict(result.quarantine.group_by("reason").len().rows()) == {"empty_reply": 4, "identical_replies": 2}
    inline = result.pairs.filter(result.pairs["chosen"].str.contains("\n\nAssistant:", literal=True)
                                 | result.pairs["rejected"].str.contains("\n\nAssistant:", literal=True))
    assert inline.height == 9
