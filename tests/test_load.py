import gzip
import json

import polars as pl
import pytest

from curate.data import load_pairs
from curate.data.formats import parse_hh_transcript
from curate.data.inspect import near_duplicates, overlap, similar_replies
from curate.errors import CurateError

PROMPT = [{"role": "user", "content": "Name a prime number."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_sample_counts(hh_path):
    result = load_pairs(str(hh_path))
    assert result.info["format"] == "hh"
    # rows 1254 and 1688 have a chosen reply that contains its own "\n\nAssistant:" turn: split by the
    # transcripts' common prefix they are pairs (they were quarantined as prompt_mismatch before)
    assert result.pairs.height == 1796
    assert result.info["rows"] == result.pairs.height + result.quarantine.height
    q = {(row["source"].rsplit(":", 1)[1], row["reason"]) for row in result.quarantine.to_dicts()}
    assert q == {("86", "empty_reply"), ("516", "empty_reply"), ("925", "empty_reply"), ("1103", "empty_reply")}
    inline = result.pairs.filter(pl.col("source").str.ends_with(":1254"))
    assert inline["chosen"][0].startswith("No. Men who impersonate") and "\n\nAssistant:" in inline["chosen"][0]
    assert inline["prompt"][0].to_list()[-1]["content"].endswith("Isn't that drag kings?")
    assert result.pairs["pair_id"].n_unique() == result.pairs.height
    # every prompt ends with a user turn and has no consecutive same-role turns
    for prompt in result.pairs["prompt"].to_list():
        roles = [m["role"] for m in prompt]
        assert roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_hh_keep_empty(hh_path):
    result = load_pairs(str(hh_path), keep_empty=True)
    assert result.pairs.height == 1800
    assert result.quarantine.height == 0


def test_hh_consecutive_assistant_turns_are_merged():
    text = "\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two\n\nHuman: more?\n\nAssistant: yes"
    rows = [{"chosen": text, "rejected": text[:-3] + "no"}]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        result = load_pairs(str(write_jsonl(Path(tmp) / "d.jsonl", rows)))
    prompt = result.pairs["prompt"][0].to_list()
    assert prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one\n\ntwo"},
                      {"role": "user", "content": "more?"}]
    assert (result.pairs["chosen"][0], result.pairs["rejected"][0]) == ("yes", "no")


def test_parse_hh_transcript():
    assert parse_hh_transcript("\n\nHuman: a b\n\nAssistant:  c") == [
        {"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]


def test_formats_and_quarantine_reasons(tmp_path):
    rows = [
        {"prompt": "Name a prime number.", "chosen": "7", "rejected": "8"},
        {"prompt": "Name a prime number.", "chosen": "8", "rejected": "7"},  # duplicate (flipped)
        {"prompt": "Q?", "chosen": "same", "rejected": "same"},
        {"prompt": "Q?", "chosen": "", "rejected": "x"},
        {"prompt": "Q?", "chosen": 3, "rejected": "x"},
        {"prompt": "Q?", "rejected": "x"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with open(path, "a") as fh:
        fh.write("{not json\n")
    result = load_pairs(str(path))
    assert result.info["format"] == "prompt-chosen-rejected"
    assert result.pairs.height == 1
    assert result.pairs["prompt"][0].to_list() == PROMPT
    reasons = result.quarantine["reason"].to_list()
    assert reasons == ["duplicate_pair", "identical_replies", "empty_reply", "non_text_content",
                       "missing_field", "unparseable_line"]
    assert result.quarantine["source"].to_list()[-1] == "p.jsonl:6"


def test_messages_formats(tmp_path):
    uf = {"prompt": "Name a prime number.",
          "chosen": [PROMPT[0], {"role": "assistant", "content": "7"}],
          "rejected": [PROMPT[0], {"role": "assistant", "content": "8"}]}
    trl = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "7"}],
           "rejected": [{"role": "assistant", "content": "8"}]}
    for i, row in enumerate([uf, trl]):
        result = load_pairs(str(write_jsonl(tmp_path / f"m{i}.jsonl", [row])))
        assert result.info["format"] == "messages"
        assert result.pairs.select("chosen", "rejected").row(0) == ("7", "8")
        assert result.pairs["prompt"][0].to_list() == PROMPT


def test_file_types_round_trip(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    base = load_pairs(str(write_jsonl(tmp_path / "a.jsonl", rows))).pairs["pair_id"].to_list()
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pl.DataFrame(rows).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame(rows).write_csv(tmp_path / "a.csv")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    for name in ("a.jsonl.gz", "a.json", "a.parquet", "a.csv", "disk"):
        assert load_pairs(str(tmp_path / name)).pairs["pair_id"].to_list() == base, name


def test_column_mapping(tmp_path):
    rows = [{"question": "Name a prime number.", "good": "7", "bad": "8"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CurateError):
        load_pairs(str(path))
    result = load_pairs(str(path), columns="prompt=question,chosen=good,rejected=bad")
    assert result.pairs.select("chosen", "rejected").row(0) == ("7", "8")
    with pytest.raises(CurateError, match="bad --columns"):
        load_pairs(str(path), columns="question")


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('[{"prompt": "x",\n "chosen": }]')
    with pytest.raises(CurateError, match=r"bad.json is not valid JSON.*line 2"):
        load_pairs(str(tmp_path / "bad.json"))
    with pytest.raises(CurateError, match="does not exist"):
        load_pairs(str(tmp_path / "missing.jsonl"))


def test_hub_names_map_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_pairs("hh-rlhf", subset="harmless-base", split="test", revision="abc", streaming=True)
    assert calls[-1] == (("Anthropic/hh-rlhf",), {"split": "test", "revision": "abc", "streaming": True,
                                                   "data_dir": "harmless-base"})
    assert result.pairs.height == 1 and result.info["hub_id"] == "Anthropic/hh-rlhf"
    load_pairs("ultrafeedback")
    assert calls[-1][0] == ("HuggingFaceH4/ultrafeedback_binarized",)
    assert calls[-1][1]["split"] == "train_prefs"
    load_pairs("org/name", subset="cfg")
    assert calls[-1][0] == ("org/name", "cfg")


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CurateError, match="could not load 'Anthropic/hh-rlhf'"):
        load_pairs("hh-rlhf")


def test_near_duplicates_and_overlap(tmp_path):
    rows = [
        {"prompt": "Capital of France?", "chosen": "The capital of France is Paris.",
         "rejected": "The capital of France is Lyon."},
        {"prompt": "Capital of France?", "chosen": "The capital of France is Paris!",
         "rejected": "The capital of France is Lyon!"},
        {"prompt": "Capital of Spain?", "chosen": "Madrid.", "rejected": "Barcelona."},
    ]
    pairs = load_pairs(str(write_jsonl(tmp_path / "n.jsonl", rows))).pairs
    near = near_duplicates(pairs)
    assert near.height == 1
    assert {near["pair_id"][0], near["other_pair_id"][0]} == set(pairs["pair_id"][:2])
    assert similar_replies(pairs, ratio=0.8) == 2  # Paris/Lyon replies differ by one word; Madrid/Barcelona do not
    stats = overlap(pairs, pairs.head(1))
    assert stats == {"left_pairs": 3, "right_pairs": 1, "shared_pairs": 1, "shared_prompts": 1}


def test_python_api_names_are_callables(tmp_path):
    import curate
    from curate import export, filter_pairs, load_pairs as top_load, score
    from curate.score import score as score_function

    assert callable(score) and callable(export) and callable(filter_pairs) and top_load is load_pairs
    assert curate.score_pairs is score_function
    with pytest.raises(CurateError, match="pass --out"):
        score(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b"}])))


def test_columns_system_nested_paths_and_kept_columns(tmp_path):
    rows = [{"meta_info": {"sys": "Be brief.", "q": "Name a prime number."}, "good": " 7", "bad": " 8",
             "rating": 5, "annotator": "ann-1"}]
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    result = load_pairs(str(path), columns="prompt=meta_info.q,system=meta_info.sys,chosen=good,rejected=bad,"
                                           "keep=rating,keep=annotator")
    row = result.pairs.row(0, named=True)
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT[0]["content"]}]
    assert (row["chosen"], row["rejected"]) == (" 7", " 8")  # leading spaces kept
    assert (row["rating"], row["annotator"]) == (5, "ann-1")
    assert result.pairs.schema["rating"] == pl.Int64
    assert result.info["columns"]["keep"] == ["rating", "annotator"]
    # keep= works with a detected format too
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b", "rating": 2.5}])
    assert load_pairs(str(plain), columns="keep=rating").pairs["rating"].to_list() == [2.5]


@pytest.mark.parametrize("columns, message", [
    ("prompt=q,chosen=a,rejected=b,colour=c", "bad --columns key 'colour'"),
    ("prompt=q,chosen=a,rejected=b,label_means=index", "label_means only goes with"),
    ("prompt=q,a=x,b=y,label=l,label_means=maybe", "label_means='maybe' is not one of"),
    ("prompt=q,a=x,label=l,label_means=index", "missing b"),
    ("prompt=q,a=x,b=y,chosen=z,label=l,label_means=index", "either chosen/rejected or a/b/label"),
])
def test_bad_column_mappings_name_the_fix(tmp_path, columns, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "Q?", "a": "1", "b": "2"}])
    with pytest.raises(CurateError, match=message):
        load_pairs(str(path), columns=columns)


def test_unknown_format_and_strategy_list_the_choices(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q?", "chosen": "1", "rejected": "2"}])
    with pytest.raises(CurateError, match="use one of auto, openai-dpo"):
        load_pairs(str(path), fmt="alpaca")
    with pytest.raises(CurateError, match="unknown --strategy 'best'"):
        load_pairs(str(path), strategy="best")
    with pytest.raises(CurateError, match="--label-column only applies to"):
        load_pairs(str(path), label_column="labels")
