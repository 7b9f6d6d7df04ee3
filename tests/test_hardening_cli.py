"""Hardening of the CLI: options checked before models load, strict --json stdout, filter/export complete-or-nothing.

The score/filter/export chain runs on real HH pairs scored by a tiny random
model (saved to a directory, loaded by path like any local model).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.curation import filter_run, incomplete_curation
from curate.errors import CurateError
from curate.export import export_curated
from curate.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = 24


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON) and anything after the one document."""
    def no_constants(name):
        raise ValueError(f"bare {name} in JSON output")
    return json.loads(text, parse_constant=no_constants)


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CURATE_QUIET", None)
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, hh_path, tiny_model_dir) -> Path:
    """HH pairs scored by `curate score --json` (subprocess), plus a flip_prob column with unscored pairs."""
    root = tmp_path_factory.mktemp("hardening")
    run = root / "run"
    result = cli("score", "--dataset", str(hh_path), "--limit", str(N_PAIRS), "--model", str(tiny_model_dir),
                 "--out", str(run), "--device", "cpu", "--dtype", "fp32", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = strict_json(result.stdout)  # one document: no progress bar or log line before it
    assert isinstance(summary, dict)
    pairs = RunDir(run).pairs()
    rng = np.random.default_rng(0)
    flip = rng.uniform(0, 1, pairs.height)
    flip[[1, 5]] = np.nan  # two pairs the noise step could not judge
    RunDir(run).merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "flip_prob": flip}))
    return run


FILTER_ARGS = ["--ches-keep-lowest", "60", "--max-flip-prob", "0.8:flip", "--where", "ln_ches > -1e9:reweight=0.5",
               "--holdout", "0.2", "--soft-labels"]


# ----------------------------------------------------------------- option validation before models load
@pytest.mark.parametrize("args, option", [
    (["train", "RUN", "--lr", "nan"], "--lr"),
    (["train", "RUN", "--beta", "nan"], "--beta"),
    (["train", "RUN", "--device", "tpu"], "--device"),
    (["train", "RUN", "--limit", "-3"], "--limit"),
    (["train", "RUN", "--epsilon", "0.7"], "--epsilon"),
    (["train", "RUN", "--warmup-ratio", "inf"], "--warmup-ratio"),
    (["score", "--dataset", "RUN", "--device", "tpu"], "--device"),
    (["score", "--dataset", "RUN", "--limit", "-3"], "--limit"),
    (["score", "--dataset", "RUN", "--dtype", "int8"], "--dtype"),
    (["score", "--dataset", "RUN", "--batch-size", "-2"], "--batch-size"),
    (["eval", "--model", "m", "--data", "RUN", "--out", "o", "--beta", "nan"], "--beta"),
    (["eval", "--model", "m", "--data", "RUN", "--out", "o", "--betas", "0.1,nan"], "--betas"),
    (["eval", "--model", "m", "--data", "RUN", "--out", "o", "--dtype", "fp64"], "--dtype"),
    (["features", "RUN", "--lr", "nan"], "--lr"),
    (["features", "RUN", "--k", "64"], "--k"),
    (["features", "RUN", "--device", "tpu"], "--device"),
    (["data", "inspect", "RUN", "--limit", "-3"], "--limit"),
    (["bench", "noise", "--dataset", "RUN", "--flip-rates", "0.1,0.7"], "--flip-rates"),
    (["filter", "RUN", "--ches-keep-lowest", "nan", "--dry-run"], "--ches-keep-lowest"),
    (["filter", "RUN", "--ches-drop-top", "150", "--dry-run"], "--ches-drop-top"),
    (["filter", "RUN", "--max-flip-prob", "inf", "--dry-run"], "--max-flip-prob"),
    (["filter", "RUN", "--holdout", "nan", "--dry-run"], "--holdout"),
    (["filter", "RUN", "--weights", "huge", "--dry-run"], "--weights"),
    (["export", "RUN", "--format", "csv", "--out", "o"], "--format"),
])
def test_bad_options_are_one_sentence_before_anything_loads(args, option, tmp_path, monkeypatch):
    import curate.models

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(curate.models, "load_causal_lm", no_model)
    monkeypatch.setattr(curate.models, "load_embedder", no_model)
    args = [str(tmp_path / "missing") if a == "RUN" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and option in message and "Traceback" not in result.output
    assert result.stdout == ""


# ----------------------------------------------------------------- --json: one strict document on stdout
def test_every_cheap_command_prints_one_strict_json_document(scored_run, hh_path, tmp_path):
    curated, exported = tmp_path / "curated", tmp_path / "export"
    runs = {
        "filter --dry-run": ["filter", str(scored_run), *FILTER_ARGS, "--dry-run", "--json"],
        "filter": ["filter", str(scored_run), *FILTER_ARGS, "--out", str(curated), "--json"],
        "export": ["export", str(curated), "--format", "parquet", "--out", str(exported), "--json"],
        "data inspect": ["data", "inspect", str(hh_path), "--limit", "20", "--json"],
        "data overlap": ["data", "overlap", str(hh_path), str(hh_path), "--json"],
        "report": ["report", str(scored_run), "--out", str(tmp_path / "r.html"), "--json"],
    }
    for name, args in runs.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (name, result.stderr, result.exception)
        document = strict_json(result.stdout)
        assert isinstance(document, dict), name
    dry = strict_json(CliRunner().invoke(app, runs["filter --dry-run"]).stdout)
    # quantiles of a column with NaN rows and the rule report are plain numbers or null, never NaN
    assert dry["per_rule"][0]["missing"] == 0 and dry["per_rule"][1]["missing"] >= 1


def test_emit_json_turns_nan_and_numpy_scalars_into_json(capsys):
    from curate.cli import emit_json

    emit_json({"a": float("nan"), "b": [np.float32(1.5), np.int64(2), float("inf")], "c": np.float64("nan")})
    assert strict_json(capsys.readouterr().out) == {"a": None, "b": [1.5, 2, None], "c": None}


# ----------------------------------------------------------------- complete-or-nothing: SIGKILL at seeded points
KILLER = textwrap.dedent("""
    import os, signal, sys
    target, point, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import curate.curation as C, curate.export as E, curate.fsutil as F, curate.outdir as O
    calls = {"n": 0}
    def kill_on(module, name):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(module, name, wrapper)
    module = {"write_parquet": C if target == "filter" else E, "write_json": C,
              "atomic_write_bytes": E, "_publish": O, "rmtree": F.shutil}[point]
    kill_on(module, point)
    args = sys.argv[4:]
    if target == "filter":
        C.filter_run(args[0], out=args[1], force=args[2] == "force", holdout=0.2, soft_labels=True,
                     ches_keep_lowest="60", max_flip_prob="0.8:flip")
    else:
        E.export_curated(args[0], args[3], args[1], force=args[2] == "force")
""")


def killed(target: str, point: str, count: int, *args: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", KILLER, target, point, str(count), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode


def curated_contents(path: Path) -> dict:
    out = {name: pl.read_parquet(path / name) for name in sorted(os.listdir(path)) if name.endswith(".parquet")}
    manifest = json.loads((path / "manifest.json").read_text())
    out["curation"] = {k: v for k, v in manifest["curation"].items() if k not in ("out", "run")}
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[k].equals(b[k]) if isinstance(a[k], pl.DataFrame) else a[k] == b[k] for k in a)


def filter_again(run: Path, out: Path) -> None:
    filter_run(run, out=out, force=out.exists(), holdout=0.2, soft_labels=True, ches_keep_lowest="60",
               max_flip_prob="0.8:flip")


# kill while writing the 3rd file, just before the rename into place, and after the swap with an older
# output but before that one is deleted
@pytest.mark.parametrize("point, count", [("write_parquet", 3), ("_publish", 1), ("rmtree", 1)])
def test_filter_killed_at_any_point_leaves_nothing_a_later_step_accepts(scored_run, tmp_path, point, count):
    reference = tmp_path / "reference"
    filter_again(scored_run, reference)
    expected = curated_contents(reference)
    kills = 0
    for previous in (None, "older"):  # into a new --out, and replacing an older curated set with --force
        out = tmp_path / f"out-{previous}"
        if previous:
            filter_run(scored_run, out=out, ches_drop_top="10")
            older = curated_contents(out)
        rc = killed("filter", point, count, str(scored_run), str(out), "force" if previous else "new")
        assert rc in (0, -signal.SIGKILL)  # a new --out has no older output to delete: ("rmtree", 1) completes
        kills += rc == -signal.SIGKILL
        if out.exists():  # the old complete set, or the new complete one: never a mix
            state = curated_contents(out)
            assert same(state, expected) or (previous and same(state, older))
            assert incomplete_curation(out) is None
        for staging in tmp_path.glob(f".{out.name}.partial-*"):  # what the kill left: refused unless complete
            if incomplete_curation(staging) is None and (staging / "manifest.json").exists():
                assert same(curated_contents(staging), expected) or (previous and same(curated_contents(staging), older))
                continue
            with pytest.raises(CurateError):
                export_curated(staging, "parquet", tmp_path / "never")
        filter_again(scored_run, out)
        assert same(curated_contents(out), expected)
        assert not list(tmp_path.glob(f".{out.name}.*"))  # stale staging of the dead process is gone
    assert kills >= 1


@pytest.mark.parametrize("fmt, point, count", [("hf", "atomic_write_bytes", 1), ("parquet", "rmtree", 1)])
def test_export_killed_at_any_point_then_rerun_gives_the_uninterrupted_output(scored_run, tmp_path, fmt, point, count):
    curated = tmp_path / "curated"
    filter_again(scored_run, curated)
    export_curated(curated, fmt, tmp_path / "reference")
    out = tmp_path / "out"
    export_curated(curated, "jsonl", out)  # an older export that --force replaces
    rc = killed("export", point, count, str(curated), str(out), "force", fmt)
    assert rc == -signal.SIGKILL
    assert (out / "README.md").is_file()  # the old or the new export, complete
    export_curated(curated, fmt, out, force=True)
    names = sorted(os.listdir(tmp_path / "reference"))
    assert sorted(os.listdir(out)) == names
    for name in names:
        ref, got = (tmp_path / "reference" / name).read_bytes(), (out / name).read_bytes()
        if name == "README.md":  # the card dates itself
            ref, got = (b"\n".join(l for l in t.split(b"\n") if b" UTC. Files:" not in l) for t in (ref, got))
        if name.endswith(".parquet"):
            assert pl.read_parquet(out / name).equals(pl.read_parquet(tmp_path / "reference" / name))
        elif not name.endswith(".arrow") and name != "state.json":  # hf shards carry a fingerprint
            assert got == ref, name
    assert not list(tmp_path.glob(".out.*"))


def test_export_refuses_an_incomplete_curated_directory(scored_run, tmp_path):
    curated = tmp_path / "curated"
    filter_again(scored_run, curated)
    (curated / "holdout.parquet").unlink()  # listed in the manifest, now missing
    with pytest.raises(CurateError, match="incomplete curated directory"):
        export_curated(curated, "parquet", tmp_path / "a")
    (curated / "manifest.json").unlink()  # the audit without a manifest: a half-written filter
    with pytest.raises(CurateError, match="incomplete curated directory"):
        export_curated(curated, "parquet", tmp_path / "b")
    result = CliRunner().invoke(app, ["export", str(curated), "--format", "parquet", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "incomplete" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_force_never_deletes_files_the_step_did_not_write(scored_run, tmp_path):
    curated = tmp_path / "curated"
    filter_again(scored_run, curated)
    (curated / "train").mkdir()
    (curated / "train" / "notes.txt").write_text("mine")
    with pytest.raises(CurateError, match="did not write"):
        filter_again(scored_run, curated)
    assert (curated / "train" / "notes.txt").read_text() == "mine"
    out = tmp_path / "export"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(CurateError, match="did not write"):
        export_curated(curated, "parquet", out, force=True)
    assert (out / "thesis.tex").read_text() == "mine"


# ----------------------------------------------------------------- a full disk
@pytest.fixture()
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_leaves_no_output_and_says_so(scored_run, tmp_path, tiny_disk):
    big = RunDir(tmp_path / "big")  # enough text that the curated set cannot fit in 32 KiB
    pairs = RunDir(scored_run).pairs()
    pairs = pl.concat([pairs.with_columns(pair_id=pl.col("pair_id") + f"-{i}") for i in range(8)])
    noise = [os.urandom(300).hex() for _ in range(pairs.height)]  # incompressible: ~115 KB of replies
    pairs = pairs.with_columns(chosen=pl.col("chosen") + pl.Series(noise))
    big.write_pairs(pairs, pl.DataFrame())
    big.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "ln_ches": np.arange(pairs.height, dtype=float)}))
    with pytest.raises(CurateError, match="disk .* is full"):
        filter_run(big.path, out=tiny_disk / "curated", ches_drop_top="10")
    assert os.listdir(tiny_disk) == []
    curated = tmp_path / "curated"
    filter_run(big.path, out=curated, ches_drop_top="10")
    with pytest.raises(CurateError, match="disk .* is full"):
        export_curated(curated, "jsonl", tiny_disk / "export")
    assert os.listdir(tiny_disk) == []
