"""Data parallel: 2 CPU processes (gloo, torchrun) give the same run as 1 process with the same global batch."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curate.train import train

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_train_loop import make_pairs
from curate.models import tiny_causal_lm
from curate.train import train
train(make_pairs(16), out={out!r}, model=tiny_causal_lm(0), loss={loss!r}, lr=1e-3, batch_size=4, bf16=False,
      save_every=0, progress=False, max_steps=3, device="cpu")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "tdpo1"])
def test_two_processes_match_one(tmp_path, tiny_lm, loss):
    from tests.test_train_loop import make_pairs

    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(repo=str(REPO), out=str(tmp_path / "ddp"), loss=loss))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CURATE_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = copy.copy(tiny_lm)
    model.model = copy.deepcopy(tiny_lm.model)
    single = train(make_pairs(16), out=tmp_path / "single", model=model, loss=loss, lr=1e-3, batch_size=4,
                   bf16=False, save_every=0, progress=False, max_steps=3, device="cpu")
    ddp_metrics = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_metrics = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ddp_metrics, one_metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["margin"] == pytest.approx(b["margin"], abs=1e-5)
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())["train"]
    assert manifest["processes"] == 2 and manifest["micro_batch"] == 2
    from safetensors.torch import load_file

    ddp_weights = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    one_weights = load_file(str(single.final_dir / "model.safetensors"))
    for key in one_weights:
        assert torch.allclose(ddp_weights[key], one_weights[key], atol=1e-5), key
