"""`curate score` end to end: run directory, quarantine, truncation, resume after SIGKILL, CLI, real model."""

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.data.chat import ChatEncoder
from curate.models import tiny_causal_lm
from curate.rundir import RunDir
from curate.lm import encode_pair
from curate.score import parse_scores, score
from curate.lm import probe_layers
from curate.errors import CurateError

from tests.conftest import HH_SAMPLE as HH, REPO, write_hh_head

COLUMNS = ["ches", "ln_ches", "hidden_inner", "edit_distance_norm", "logp_chosen", "logp_rejected",
           "logp_mean_chosen", "logp_mean_rejected", "n_tokens_prompt", "n_tokens_chosen", "n_tokens_rejected"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_hh_sample(path: Path, n: int, *, long_reply_at: int | None = None) -> Path:
    """The first n HH lines plus one pair with equal replies (refused), as a local jsonl.gz."""
    return write_hh_head(path, n, long_reply_at=long_reply_at, tie=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm(seed=0)


def reference_scores(lm, prompt, chosen, rejected, system_prompt="default", max_length=None):
    """The definition at batch size 1: full unpadded forwards with all hidden states."""
    encoder = ChatEncoder(lm.tokenizer, system_prompt=system_prompt, max_length=max_length)
    pair, _ = encode_pair(encoder, prompt, chosen, rejected)
    layers = probe_layers(lm.model)
    sums, lasts, logps, probes = [], [], [], []
    for reply in (pair.chosen, pair.rejected):
        ids = torch.tensor([list(pair.prompt) + list(reply)])
        with torch.inference_mode():
            out = lm.model(input_ids=ids, output_hidden_states=True)
        p, t = len(pair.prompt), ids.shape[1]
        states = out.hidden_states[-1][0, p - 1 : t - 1].double()
        sums.append(states.sum(0))
        lasts.append(states[-1])
        probes.append(torch.cat([out.hidden_states[k][0, p - 1 : t - 1].double().mean(0) for k in layers]))
        logps.append(torch.log_softmax(out.logits[0, p - 1 : t - 1].double(), -1).gather(1, ids[0, p:t, None]).sum().item())
    n_pos, n_neg = len(pair.chosen), len(pair.rejected)
    m_pos, m_neg = sums[0] / n_pos, sums[1] / n_neg
    return {
        "ches": (sums[0] @ sums[1] - sums[0] @ sums[0]).item(),
        "ches_scale": (sums[0] @ sums[0]).item() + abs((sums[0] @ sums[1]).item()),
        "ln_ches": (m_pos @ m_neg - m_pos @ m_pos).item(),
        "ln_scale": (m_pos @ m_pos).item() + abs((m_pos @ m_neg).item()),
        "hidden_inner": (lasts[0] @ lasts[1]).item(),
        "logp_chosen": logps[0], "logp_rejected": logps[1],
        "n_tokens_prompt": len(pair.prompt), "n_tokens_chosen": n_pos, "n_tokens_rejected": n_neg,
        "mean_chosen": probes[0].numpy(), "mean_rejected": probes[1].numpy(),
    }


def assert_table_matches_reference(lm, run: RunDir, rel=1e-4, **encoder_kwargs):
    table = run.table()
    pooled = np.load(run / "pooled.npz")
    index = {p: i for i, p in enumerate(pooled["pair_id"])}
    for row in table.iter_rows(named=True):
        ref = reference_scores(lm, row["prompt"], row["chosen"], row["rejected"], **encoder_kwargs)
        for key in ("n_tokens_prompt", "n_tokens_chosen", "n_tokens_rejected"):
            assert row[key] == ref[key]
        assert row["ches"] == pytest.approx(ref["ches"], abs=rel * ref["ches_scale"])
        assert row["ln_ches"] == pytest.approx(ref["ln_ches"], abs=rel * ref["ln_scale"])
        assert row["hidden_inner"] == pytest.approx(ref["hidden_inner"], rel=rel)
        assert row["logp_chosen"] == pytest.approx(ref["logp_chosen"], rel=rel)
        assert row["logp_rejected"] == pytest.approx(ref["logp_rejected"], rel=rel)
        assert row["logp_mean_chosen"] == pytest.approx(ref["logp_chosen"] / ref["n_tokens_chosen"], rel=rel)
        i = index[row["pair_id"]]
        assert np.allclose(pooled["mean_chosen"][i], ref["mean_chosen"], rtol=rel, atol=rel * np.abs(ref["mean_chosen"]).max())
        assert np.allclose(pooled["mean_rejected"][i], ref["mean_rejected"], rtol=rel, atol=rel * np.abs(ref["mean_rejected"]).max())


def test_parse_scores():
    assert parse_scores("ches, logps") == ("ches", "logps")
    with pytest.raises(CurateError, match="unknown score"):
        parse_scores("ches,chess")


def test_score_writes_run_directory_matching_the_definition(tmp_path, tiny):
    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 10)
    run = RunDir(tmp_path / "run")
    result = score(data, out=run.path, lm=tiny, shard_size=4, token_budget=1500)
    assert set(COLUMNS) <= set(result.columns)
    assert result.height == 10 and result["pair_id"].n_unique() == 10
    assert run.quarantine()["reason"].to_list() == ["identical_replies"]
    manifest = run.manifest()["score"]
    assert manifest["n_scored"] == 10 and manifest["batch"]["n_shards"] == 3
    assert manifest["model"]["name"] == tiny.name and manifest["dtype"] == "float32"
    assert manifest["truncation"]["pairs_quarantined_reply_over_context"] == 0
    pooled = np.load(run / "pooled.npz")
    assert pooled["mean_chosen"].shape == (10, tiny.model.config.hidden_size)
    assert pooled["mean_chosen"].dtype == np.float32
    assert pooled["layers"].tolist() == [1]  # two blocks: the probe layers collapse to the first
    assert_table_matches_reference(tiny, run)


def test_only_logps_skips_ches_columns(tmp_path, tiny):
    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 3)
    result = score(data, out=tmp_path / "run", lm=tiny, scores="logps")
    assert "logp_chosen" in result.columns and "ches" not in result.columns
    assert not (tmp_path / "run" / "pooled.npz").exists()


def test_overlong_reply_is_quarantined_and_prompts_are_cut_from_the_left(tmp_path, tiny):
    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 6, long_reply_at=2)
    run = RunDir(tmp_path / "run")
    result = score(data, out=run.path, lm=tiny, max_length=160, scores="ches,logps", shard_size=1)  # one shard all-quarantined
    quarantine = run.quarantine()
    assert "reply_over_context" in quarantine["reason"].to_list()
    assert result.height == 5 and run.pairs().height == 5
    longest = result.select(pl.col("n_tokens_prompt") + pl.max_horizontal("n_tokens_chosen", "n_tokens_rejected"))
    assert longest.to_series().max() <= 160
    manifest = run.manifest()["score"]["truncation"]
    assert manifest["pairs_quarantined_reply_over_context"] == 1
    assert manifest["pairs_with_prompt_cut"] == int((result["n_prompt_tokens_cut"] > 0).sum()) > 0
    assert_table_matches_reference(tiny, run, max_length=160)
    # scoring the run again is idempotent: nothing new is quarantined twice
    again = score(run.path, lm=tiny, max_length=160, shard_size=1)
    assert again.sort("pair_id").equals(result.sort("pair_id"))
    assert run.quarantine().height == quarantine.height


def test_a_pair_that_cannot_be_encoded_is_quarantined_not_fatal(tmp_path, tiny, monkeypatch):
    import curate.lm.encode as encode_module

    real = encode_module.encode_pair

    def refuse_second(encoder, prompt, chosen, rejected):
        if chosen == first_rows[1]["chosen"]:
            raise ValueError("template refused this conversation")
        return real(encoder, prompt, chosen, rejected)

    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 3)
    from curate.data.load import load_pairs

    first_rows = load_pairs(str(data)).pairs.to_dicts()
    monkeypatch.setattr(encode_module, "encode_pair", refuse_second)
    result = score(data, out=tmp_path / "run", lm=tiny)
    quarantine = RunDir(tmp_path / "run").quarantine()
    assert result.height == 2 and "cannot_encode" in quarantine["reason"].to_list()
    assert "template refused" in quarantine.filter(pl.col("reason") == "cannot_encode")["detail"][0]
    assert RunDir(tmp_path / "run").manifest()["score"]["truncation"]["pairs_quarantined_cannot_encode"] == 1


CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)
import curate.score as S
from curate.models import tiny_causal_lm
kill_at = int(sys.argv[3]) if sys.argv[3].isdigit() else 0
if sys.argv[3] == "pooled":  # die while the pooled states are half written, after every shard
    def half_pooled(path, shard_paths, *layers):
        path.with_name("." + path.name + ".tmp").write_bytes(b"PK half")
        os.kill(os.getpid(), signal.SIGKILL)
    S._write_pooled = half_pooled
real_write = S.write_parquet
writes = []
def write_then_maybe_die(df, path):
    if kill_at and len(writes) == kill_at:
        # die in the middle of writing a shard: leave a temp file behind, never the shard itself
        (path.parent / ("." + path.name + ".partial.tmp")).write_bytes(b"PAR1 half")
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(df, path)
    writes.append(path)
S.write_parquet = write_then_maybe_die
S.score(sys.argv[1], out=sys.argv[2], lm=tiny_causal_lm(seed=0), shard_size=2, token_budget=800)
"""


def run_child(data, out, kill_at):
    env = dict(os.environ, PYTHONPATH=str(REPO), CURATE_QUIET="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """9 HH pairs scored in one go, in this process with the same model, threads and settings as the children."""
    root = tmp_path_factory.mktemp("fresh")
    data = write_hh_sample(root / "hh.jsonl.gz", 9)
    score(data, out=root / "run", lm=tiny_causal_lm(seed=0), shard_size=2, token_budget=800)
    return data, RunDir(root / "run")


# seeded kill points: after k of the 5 shards (sorted(random.Random(7).sample(range(1, 5), 2)) == [1, 3], and the last),
# and while pooled.npz is half written after all shards
@pytest.mark.parametrize("kill_at", ["1", "3", "4", "pooled"])
def test_resume_after_sigkill_recomputes_nothing_and_gives_the_same_table(tmp_path, uninterrupted, kill_at):
    data, fresh_run = uninterrupted
    killed = run_child(data, tmp_path / "run", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = 5 if kill_at == "pooled" else int(kill_at)
    shards = sorted(p.name for p in (tmp_path / "run" / "shards").glob("score-*.parquet"))
    assert shards == [f"score-{k:05d}.parquet" for k in range(done)]
    assert not (tmp_path / "run" / "scores.parquet").exists() and not (tmp_path / "run" / "pooled.npz").exists()

    resumed = run_child(data, tmp_path / "run", kill_at=0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_run = RunDir(tmp_path / "run")
    assert resumed_run.manifest()["score"]["batch"]["shards_resumed"] == done
    assert fresh_run.manifest()["score"]["batch"]["shards_resumed"] == 0
    assert resumed_run.scores().height == 9
    assert resumed_run.scores().equals(fresh_run.scores())
    a, b = np.load(resumed_run / "pooled.npz"), np.load(fresh_run / "pooled.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("pair_id", "mean_chosen", "mean_rejected"))


def test_a_run_directory_refuses_another_dataset_unless_forced(tmp_path, tiny):
    first = write_hh_sample(tmp_path / "a.jsonl.gz", 3)
    score(first, out=tmp_path / "run", lm=tiny)
    other = tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in gzip.open(HH, "rt").readlines()[10:13]]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CurateError, match="already holds another dataset.*--force.*new --out"):
        score(other, out=tmp_path / "run", lm=tiny)
    score(first, out=tmp_path / "run", lm=tiny)  # the same dataset again: fine
    table = score(other, out=tmp_path / "run", lm=tiny, force=True)
    run = RunDir(tmp_path / "run")
    ids = set(run.pairs()["pair_id"])
    assert set(table["pair_id"]) == ids and len(ids) == 3  # no stale score rows of the first dataset
    assert set(np.load(run / "pooled.npz")["pair_id"]) == ids


def test_all_pairs_over_max_length_is_one_sentence(tmp_path, tiny):
    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 3)
    with pytest.raises(CurateError, match="none of the 3 pairs fits in 8 tokens.*raise --max-length"):
        score(data, out=tmp_path / "run", lm=tiny, max_length=8)


def test_changed_settings_start_the_shards_afresh(tmp_path, tiny):
    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 4)
    score(data, out=tmp_path / "run", lm=tiny, shard_size=2)
    score(data, out=tmp_path / "run", lm=tiny, shard_size=2, system_prompt="none")
    manifest = RunDir(tmp_path / "run").manifest()["score"]
    assert manifest["batch"]["shards_resumed"] == 0 and manifest["system_prompt"] == "none"
    assert_table_matches_reference(tiny, RunDir(tmp_path / "run"), system_prompt="none")


def test_cli_score_with_a_local_model_dir(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from curate.cli import app

    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 3)
    result = CliRunner().invoke(app, ["--quiet", "score", "--dataset", str(data), "--model", str(tiny_model_dir),
                                      "--out", str(tmp_path / "run"), "--dtype", "fp32", "--device", "cpu",
                                      "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_scored"] == 3 and summary["scores"] == ["ches", "logps"]
    assert RunDir(tmp_path / "run").scores().height == 3

    bad = CliRunner().invoke(app, ["score", "--dataset", str(data), "--out", str(tmp_path / "r2"), "--scores", "chez"])
    assert bad.exit_code == 2 and "unknown score" in bad.output


@pytest.mark.slow
def test_bundled_smollm2_on_real_hh_pairs_matches_the_definition(tmp_path):
    from curate.models import load_causal_lm

    lm = load_causal_lm(dtype="fp32", device="cpu")
    data = write_hh_sample(tmp_path / "hh.jsonl.gz", 4)
    run = RunDir(tmp_path / "run")
    score(data, out=run.path, lm=lm, token_budget=2048)
    assert_table_matches_reference(lm, run)
