"""`curate train` hardening: --out ownership, divergence never checkpointed, --resume --lr, one config source."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curate.errors import CurateError
from curate.train import train
from curate.train.config import TrainConfig
from tests.test_train_loop import FAST, make_pairs

SETTINGS = {**FAST, "save_every": 2, "keep_checkpoints": 5}


@pytest.fixture
def fresh(tiny_lm):
    """A factory of fresh copies of the session's tiny model (training changes weights in place)."""
    import copy

    def make():
        model = copy.copy(tiny_lm)
        model.model = copy.deepcopy(tiny_lm.model)
        return model

    return make


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_a_second_run_into_the_same_out_is_refused_unless_resume_or_force(tmp_path, fresh):
    out = tmp_path / "out"
    train(make_pairs(16), out=out, model=fresh(), max_steps=4, **SETTINGS)
    assert checkpoints(out) == ["step-000002", "step-000004"]
    with pytest.raises(CurateError, match=r"another training run \(beta was 0.1 there, 0.2 now\).*--resume.*--force"):
        train(make_pairs(16), out=out, model=fresh(), max_steps=2, beta=0.2, **SETTINGS)
    with pytest.raises(CurateError, match="already holds this training run"):
        train(make_pairs(16), out=out, model=fresh(), max_steps=4, **SETTINGS)
    assert checkpoints(out) == ["step-000002", "step-000004"]  # refused before anything was touched

    # --force: the older run's step-4 checkpoint must not outrank (and prune) the new run's own
    train(make_pairs(16), out=out, model=fresh(), max_steps=2, beta=0.2, force=True,
          **{**SETTINGS, "save_every": 1, "keep_checkpoints": 2})
    assert checkpoints(out) == ["step-000001", "step-000002"]
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["fingerprint"]["beta"] == 0.2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_out_with_foreign_files_is_refused(tmp_path, fresh):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CurateError, match="not a training run.*--force"):
        train(make_pairs(8), out=out, model=fresh(), max_steps=1, **FAST)
    with pytest.raises(CurateError, match="holds no training run to continue"):
        train(make_pairs(8), out=out, model=fresh(), max_steps=1, resume=True, **FAST)
    train(make_pairs(8), out=out, model=fresh(), max_steps=1, force=True, **FAST)
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces training outputs only
    with pytest.raises(CurateError, match="pass one of them"):
        train(make_pairs(8), out=out, model=fresh(), max_steps=1, resume=True, force=True, **FAST)


def test_diverged_weights_are_never_a_checkpoint_and_resume_may_lower_the_lr(tmp_path, fresh):
    out = tmp_path / "out"
    train(make_pairs(16), out=out, model=fresh(), max_steps=6, **SETTINGS)
    for name in ("step-000004", "step-000006"):  # as if killed after step 2
        shutil.rmtree(out / "checkpoints" / name)
    shutil.rmtree(out / "final")

    # lr 1e30: step 3's weights reach ~1e30, still finite, with a finite loss but a NaN gradient
    with pytest.raises(CurateError, match=r"diverged at step 3.*step-000002.*--resume --lr"):
        train(make_pairs(16), out=out, model=fresh(), max_steps=6, resume=True, **{**SETTINGS, "lr": 1e30,
                                                                                     "save_every": 1})
    assert checkpoints(out) == ["step-000002"]
    weights = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
    assert max(float(w.abs().max()) for w in weights.values()) < 100  # the kept checkpoint is the healthy one

    # the fix the error advises is accepted, and recorded with the step it took effect
    res = train(make_pairs(16), out=out, model=fresh(), max_steps=6, resume=True, **{**SETTINGS, "lr": 1e-4})
    assert math.isfinite(res.final_loss)
    manifest = json.loads((out / "manifest.json").read_text())["train"]
    assert manifest["lr_changes"] == [{"step": 2, "from": 1e-3, "to": 1e-4}]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[1]["lr"] > 1e-4 >= metrics[2]["lr"]  # steps 1-2 ran at lr 1e-3, steps 3-6 at 1e-4 (cosine)

    with pytest.raises(CurateError, match="beta.*only --lr may change"):
        train(make_pairs(16), out=out, model=fresh(), max_steps=6, resume=True, beta=0.3, **SETTINGS)


def test_diverged_final_model_is_not_written_without_checkpoints(tmp_path, fresh):
    with pytest.raises(CurateError, match="diverged at step 1.*no checkpoint was written yet.*lower --lr"):
        train(make_pairs(8), out=tmp_path, model=fresh(), max_steps=1, **{**FAST, "lr": 1e30})
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("options, message", [
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"beta": float("nan")}, "--beta must be a finite number"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints must be > 0"),
    ({"warmup_ratio": 2.0}, r"--warmup-ratio must be in \[0, 1\]"),
    ({"lora_alpha": -1.0}, "--lora-alpha must be > 0"),
    ({"limit": -3}, "--limit must be > 0"),
    ({"mask": "random"}, "--mask must be learned or mapo"),
    ({"lrr": 1.0}, "unknown training option 'lrr'"),
])
def test_bad_settings_are_one_sentence_before_any_model_loads(tmp_path, options, message):
    with pytest.raises(CurateError, match=message):
        train(make_pairs(8), out=tmp_path, model="not-a-model-that-exists", **options)


# ---------------------------------------------------------------- one config source
def test_every_train_setting_is_a_cli_option_with_the_same_default_and_help():
    import typer.main

    from curate.cli import app

    command = next(c for c in typer.main.get_command(app).commands.values() if c.name == "train")
    options = {p.name: p for p in command.params}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options, f"TrainConfig.{f.name} has no `curate train` option"
        param = options[f.name]
        assert param.help == f.metadata["help"]
        expected = str(f.default) if f.metadata["parse"] else f.default
        assert param.default == expected, f.name
    for drifted in ("weight_decay", "lora_alpha", "keep_checkpoints", "mask_weight_decay"):
        assert f"--{drifted.replace('_', '-')}" in options[drifted].opts


def test_loss_help_lists_every_registered_loss():
    from curate.train.losses import LOSSES

    help_text = TrainConfig.__dataclass_fields__["loss"].metadata["help"]
    assert help_text.split(": ", 1)[1].split(" (")[0].split(" | ") == list(LOSSES)


def test_cli_parses_text_options_and_passes_new_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from curate import cli

    seen = {}

    def fake_train(data, **kwargs):
        seen.update(kwargs)
        raise CurateError("stop here")

    monkeypatch.setattr("curate.train.loop.train", fake_train)
    result = CliRunner().invoke(cli.app, ["train", str(tmp_path), "--epsilon", "auto", "--loss", "cdpo",
                                          "--bf16", "off", "--weight-decay", "0.05", "--lora-r", "4",
                                          "--lora-alpha", "16", "--keep-checkpoints", "3",
                                          "--mask-weight-decay", "0.2", "--force"])
    assert result.exit_code == 2 and "stop here" in result.output
    cfg = seen["config"]
    assert (cfg.epsilon, cfg.bf16, cfg.weight_decay, cfg.lora_alpha, cfg.keep_checkpoints,
            cfg.mask_weight_decay) == ("auto", False, 0.05, 16.0, 3, 0.2)
    assert seen["force"] is True and seen["resume"] is False
    result = CliRunner().invoke(cli.app, ["train", str(tmp_path), "--bf16", "maybe"])
    assert result.exit_code == 2 and "--bf16 must be auto, on or off" in result.output


def test_cli_refuses_a_second_run_into_the_same_out(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from curate.cli import app
    from curate.rundir import RunDir

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = RunDir(tmp_path / "run")
    import polars as pl

    run.write_pairs(make_pairs(8), pl.DataFrame())
    args = ["train", str(run.path), "--model", str(tiny_model_dir), "--batch-size", "4", "--max-steps", "1",
            "--bf16", "off", "--save-every", "1", "--json"]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args + ["--beta", "0.3"])
    assert again.exit_code == 2 and "another training run" in again.output and "Traceback" not in again.output
    assert CliRunner().invoke(app, args + ["--beta", "0.3", "--force"]).exit_code == 0
    assert torch.load(run.path / "train" / "reference_logps.pt").shape == (8, 2)
