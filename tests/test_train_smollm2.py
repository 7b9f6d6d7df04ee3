"""Integration: one DPO step of the bundled SmolLM2 on real HH pairs (bf16 autocast)."""

from __future__ import annotations

import copy
import json
import math

import pytest

from curate.train import train


@pytest.mark.slow
def test_smollm2_dpo_step_on_hh(tmp_path, hh_path, smollm2):
    from curate.data import load_pairs

    pairs = load_pairs(str(hh_path), limit=4).pairs
    model = copy.copy(smollm2)
    model.model = copy.deepcopy(smollm2.model)
    result = train(pairs, out=tmp_path, model=model, batch_size=2, max_length=256, max_steps=1, bf16=True,
                   save_every=0, progress=False, lr=1e-6)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # policy = reference at step 0: log-ratios ~0 and the DPO loss ~log 2, up to bf16 noise (the reference
    # pass batches pairs by length, so its padding and bf16 rounding differ: ~0.5 nats over a 100-token reply)
    assert result.info["step0_max_abs_logratio"] < 1.5
    assert first["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert first["chosen_logps"] < 0 and math.isfinite(first["rejected_logps"])
    assert result.info["shared_prompt_forward"] and result.info["pairs"] + result.info["left_out_reply_too_long"] == 4
