"""Shared fixtures: the real HH sample from ../shared and models built without a download."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HH_SAMPLE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"
DEMO_DATA = REPO / "data" / "demo" / "pairs.jsonl"


@pytest.fixture(scope="session")
def hh_path() -> Path:
    if not HH_SAMPLE.exists():
        pytest.skip(f"shared HH sample not found at {HH_SAMPLE}")
    return HH_SAMPLE


@pytest.fixture(scope="session")
def tiny_lm():
    from curate.models import tiny_causal_lm

    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    from curate.models import load_causal_lm

    return load_causal_lm("smollm2-135m-instruct", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models run far faster on one thread than on two busy shared cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
