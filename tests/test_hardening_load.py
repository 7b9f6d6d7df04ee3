"""Bad input files: one sentence with the fix, or quarantined rows with reasons; rows in = pairs + quarantined."""

import gzip
import json

import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.data import load_pairs
from curate.errors import CurateError

GOOD = {"prompt": "Name a prime number.", "chosen": "7", "rejected": "8"}


def lines(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def load_checked(path, **kwargs):
    result = load_pairs(str(path), **kwargs)
    assert result.info["rows"] == result.pairs.height + result.quarantine.height
    return result


def refused(path, match):
    with pytest.raises(CurateError, match=match):
        load_pairs(str(path))
    out = CliRunner().invoke(app, ["data", "inspect", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output


def test_truncated_gzip(tmp_path):
    data = gzip.compress(lines(*[dict(GOOD, chosen=f"{i} is a number") for i in range(2000)]))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    refused(path, "truncated or corrupt.*download or compress it again")


def test_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(lines(GOOD))
    refused(path, "not a gzip file.*rename it without .gz")


def test_invalid_utf8_line_is_quarantined(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(lines(GOOD) + '{"prompt": "caf\xe9?", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    result = load_checked(path)
    assert result.pairs.height == 1
    assert result.quarantine.select("source", "reason").row(0) == ("latin1.jsonl:1", "invalid_utf8")
    assert "0xe9" in result.quarantine["detail"][0]


def test_lone_surrogate_is_quarantined_and_pairs_still_write(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "Q?", "chosen": "bad \\ud800 text", "rejected": "b"}\n')
    result = load_checked(path)
    assert result.quarantine["reason"].to_list() == ["lone_surrogate"]
    result.pairs.write_parquet(tmp_path / "p.parquet")
    result.quarantine.write_parquet(tmp_path / "q.parquet")


def test_ragged_csv_rows_are_quarantined(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('prompt,chosen,rejected\n"Q, with comma?",yes,no\nR?,only-two\nS?,a,b,extra\nT?,c,d\n')
    result = load_checked(path)
    assert result.pairs["prompt"].to_list()[0] == [{"role": "user", "content": "Q, with comma?"}]
    assert result.pairs.height == 2
    assert result.quarantine.select("source", "reason").rows() == [("ragged.csv:1", "ragged_row"),
                                                                     ("ragged.csv:2", "ragged_row")]


def test_deeply_nested_json_line_is_quarantined_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(lines(GOOD) + b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    result = load_checked(path)
    assert result.quarantine["reason"].to_list() == ["too_deep"]
    whole = tmp_path / "deep.json"
    whole.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    refused(whole, "nested deeper")


def test_column_oriented_json_of_unequal_lengths_is_refused(tmp_path):
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"prompt": ["a?", "b?", "c?"], "chosen": ["1", "2", "3"], "rejected": ["x", "y"]}))
    refused(path, "columns differ in length.*rejected: 2")
    path.write_text(json.dumps({"prompt": ["a?", "b?"], "chosen": ["1", "2"], "rejected": ["x", "y"]}))
    assert load_checked(path).pairs.height == 2


def test_unknown_role_is_quarantined(tmp_path):
    path = tmp_path / "roles.jsonl"
    tool = {"prompt": [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "{}"},
                       {"role": "user", "content": "So?"}],
            "chosen": [{"role": "assistant", "content": "Sunny."}], "rejected": [{"role": "assistant", "content": "?"}]}
    path.write_bytes(lines(dict(GOOD, chosen=[{"role": "assistant", "content": "7"}],
                                rejected=[{"role": "assistant", "content": "8"}]), tool))
    result = load_checked(path)
    assert result.quarantine["reason"].to_list() == ["unknown_role"]


def test_corrupt_parquet_is_refused(tmp_path):
    path = tmp_path / "broken.parquet"
    pl.DataFrame([GOOD]).write_parquet(path)
    path.write_bytes(path.read_bytes()[:40])
    refused(path, "not a readable parquet file")


def test_inspect_says_when_every_reply_is_over_max_length(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "formats" / "hh_transcripts.jsonl"
    out = CliRunner().invoke(app, ["data", "inspect", str(fixture), "--model", "smollm2-135m-instruct",
                                   "--max-length", "4", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["over_max_length"] == {"max_length": 4, "pairs": 2}
    human = CliRunner().invoke(app, ["data", "inspect", str(fixture), "--model", "smollm2-135m-instruct",
                                     "--max-length", "4"])
    assert "would skip every pair; raise --max-length" in " ".join(human.output.split())
    alone = CliRunner().invoke(app, ["data", "inspect", str(fixture), "--max-length", "4"])
    assert alone.exit_code == 2 and "--max-length needs --model" in alone.output


def test_score_refuses_when_every_pair_is_over_max_length(tmp_path, tiny_lm, single_torch_thread):
    from pathlib import Path

    from curate import score

    fixture = Path(__file__).parent / "fixtures" / "formats" / "hh_transcripts.jsonl"
    with pytest.raises(CurateError, match="none of the 2 pairs fits in 4 tokens.*raise --max-length"):
        score(str(fixture), out=tmp_path / "run", lm=tiny_lm, max_length=4, scores="ches")
