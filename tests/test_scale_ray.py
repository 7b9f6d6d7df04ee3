"""`curate score --engine ray`: same scores and quarantine as local mode, resume across engines, clear errors.

One local Ray runtime (2 CPUs, a small object store, no dashboard) serves the
whole module; a few real HH pairs and a tiny random model keep it short.
"""

import sys

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.rundir import RunDir
from curate.score import score
from tests.conftest import REPO, write_hh_head

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # workers import this checkout's curate
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    """10 real HH pairs, one with a reply too long for max_length=300 (quarantined)."""
    return write_hh_head(tmp_path_factory.mktemp("hh") / "hh.jsonl.gz", 10, long_reply_at=3)


SETTINGS = dict(dtype="fp32", device="cpu", shard_size=3, max_length=300)


def assert_same_scores(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a["pair_id"].to_list() == b["pair_id"].to_list()
    assert a.columns == b.columns
    for column in a.columns[1:]:
        x, y = a[column].to_numpy().astype(float), b[column].to_numpy().astype(float)
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=column)


def test_ray_with_two_workers_matches_local_and_records_the_engine(ray_runtime, tiny_model_dir, hh_file, tmp_path):
    local = score(str(hh_file), model=str(tiny_model_dir), out=tmp_path / "local", **SETTINGS)
    result = CliRunner().invoke(app, [
        "score", "--dataset", str(hh_file), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ray"),
        "--dtype", "fp32", "--device", "cpu", "--shard-size", "3", "--max-length", "300",
        "--engine", "ray", "--num-workers", "2", "--json",
    ])
    assert result.exit_code == 0, result.output
    on_ray = RunDir(tmp_path / "ray")
    assert_same_scores(local, on_ray.scores())
    assert local.height == 9  # the overlong pair is quarantined, by both engines
    reasons = lambda run: sorted(RunDir(run).quarantine()["reason"].to_list())  # noqa: E731
    assert reasons(tmp_path / "ray") == reasons(tmp_path / "local") and "reply_over_context" in reasons(tmp_path / "ray")
    pooled_local, pooled_ray = np.load(tmp_path / "local/pooled.npz"), np.load(tmp_path / "ray/pooled.npz")
    assert list(pooled_ray["pair_id"]) == list(pooled_local["pair_id"])
    np.testing.assert_allclose(pooled_ray["mean_chosen"], pooled_local["mean_chosen"], rtol=1e-5, atol=1e-6)

    manifest = on_ray.manifest()["score"]
    assert manifest["engine"] == "ray" and RunDir(tmp_path / "local").manifest()["score"]["engine"] == "local"
    workers = manifest["workers"]
    assert workers["num_workers"] == 2 and workers["gpus_per_worker"] == 0
    assert sum(w["shards"] for w in workers["per_worker"]) == 4  # 10 pairs in shards of 3
    assert sum(w["pairs"] for w in workers["per_worker"]) == 10
    assert all(w["pairs_per_s"] > 0 for w in workers["per_worker"])
    assert manifest["model"] == RunDir(tmp_path / "local").manifest()["score"]["model"]


def test_resume_skips_shards_whichever_engine_wrote_them(ray_runtime, tiny_model_dir, hh_file, tmp_path):
    first = score(str(hh_file), model=str(tiny_model_dir), out=tmp_path / "run", engine="ray", num_workers=2, **SETTINGS)
    shards = sorted((tmp_path / "run/shards").glob("score-*.parquet"))
    assert len(shards) == 4
    shards[1].unlink()  # as if the worker holding shard 1 had died with the driver
    kept = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}

    again = score(str(hh_file), model=str(tiny_model_dir), out=tmp_path / "run", engine="local", **SETTINGS)
    assert RunDir(tmp_path / "run").manifest()["score"]["batch"]["shards_resumed"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in shards if p.name in kept} == kept
    assert_same_scores(first, again)

    (tmp_path / "run/shards" / shards[2].name).unlink()
    third = score(str(hh_file), model=str(tiny_model_dir), out=tmp_path / "run", engine="ray", num_workers=1, **SETTINGS)
    assert RunDir(tmp_path / "run").manifest()["score"]["batch"]["shards_resumed"] == 3
    assert_same_scores(first, third)


def test_more_workers_than_the_cluster_can_place_is_refused(ray_runtime, tiny_model_dir, hh_file, tmp_path):
    with pytest.raises(CurateError, match="--num-workers"):
        score(str(hh_file), model=str(tiny_model_dir), out=tmp_path / "cpu", engine="ray", num_workers=3, **SETTINGS)
    with pytest.raises(CurateError, match="GPUs"):
        score(str(hh_file), model=str(tiny_model_dir), out=tmp_path / "gpu", engine="ray", gpus_per_worker=1, **SETTINGS)


def test_without_ray_the_engine_says_how_to_install_it(tiny_model_dir, hh_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = CliRunner().invoke(app, ["score", "--dataset", str(hh_file), "--model", str(tiny_model_dir),
                                      "--out", str(tmp_path / "r"), "--engine", "ray"])
    assert result.exit_code != 0
    assert "pip install 'curate[ray]'" in " ".join(result.output.split())  # rich wraps long lines
    assert "Traceback" not in result.output


def test_unknown_engine_is_one_sentence(hh_file, tmp_path):
    with pytest.raises(CurateError, match="--engine must be one of local, ray"):
        score(str(hh_file), out=tmp_path / "r", engine="spark")
