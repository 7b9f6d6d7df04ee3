import json

import polars as pl
from typer.testing import CliRunner

from curate.cli import app

runner = CliRunner()


def test_inspect_hh_sample_json_and_out(hh_path, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["data", "inspect", str(hh_path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["pairs"], summary["quarantined"]) == (1800, 1796, 4)
    assert summary["quarantine_reasons"] == {"empty_reply": 4}
    assert pl.read_parquet(out / "pairs.parquet").height == 1796
    assert pl.read_parquet(out / "quarantine.parquet")["reason"].to_list().count("empty_reply") == 4


def test_inspect_human_output_lists_quarantined_rows(hh_path):
    result = runner.invoke(app, ["data", "inspect", str(hh_path)])
    assert result.exit_code == 0, result.output
    assert "1796 pairs" in result.output and "empty_reply" in result.output


def test_bad_input_is_one_clear_sentence(tmp_path):
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_overlap(hh_path, tmp_path):
    result = runner.invoke(app, ["data", "overlap", str(hh_path), str(hh_path), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["shared_pairs"] == 1796


def test_format_help_lists_exactly_the_accepted_values():
    import re

    from curate.cli import FORMAT
    from curate.data.load import FORMAT_CHOICES

    names = re.sub(r"\([^)]*\)", "", FORMAT.help.split("Row format: ", 1)[1]).rstrip(". ")
    listed = [name.strip() for name in names.split(",")]
    assert sorted(listed) == sorted(FORMAT_CHOICES)


def test_inspect_and_score_take_the_same_dataset_options():
    import typer.main

    def options(name, group=None):
        command = typer.main.get_command(app)
        if group:
            command = command.commands[group]
        return {p.name for p in command.commands[name].params}

    shared = {"fmt", "columns", "label_column", "strategy", "subset", "split", "limit"}
    assert shared <= options("inspect", "data") and shared <= options("score")


def test_inspect_label_column_switches_the_side(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "formats" / "pku_saferlhf.jsonl"
    out = tmp_path / "run"
    result = runner.invoke(app, ["data", "inspect", str(fixture), "--label-column", "safer_response_id",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label_column"] == "safer_response_id"
    assert pl.read_parquet(out / "pairs.parquet")["chosen"][0].startswith("I can't help")
