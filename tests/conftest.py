"""Shared fixtures: the real HH sample from ../shared and models built without a download."""

from __future__ import annotations

import gzip
import json
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
def tiny_model_dir(tmp_path_factory) -> Path:
    """The seed-0 tiny llama saved as a model directory (what ``--model`` takes)."""
    from curate.models import tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-model")
    tiny = tiny_causal_lm(seed=0)
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


def write_hh_head(path: Path, n: int, *, long_reply_at: int | None = None, tie: bool = False) -> Path:
    """The first ``n`` HH sample lines as a local jsonl.gz (the test skips without the sample).

    ``long_reply_at``: that line's chosen reply gets 400 more words; ``tie``: one more line whose replies are equal.
    """
    if not HH_SAMPLE.exists():
        pytest.skip(f"shared HH sample not found at {HH_SAMPLE}")
    with gzip.open(HH_SAMPLE, "rt") as fh:
        lines = [next(fh) for _ in range(n)]
    if long_reply_at is not None:
        record = json.loads(lines[long_reply_at])
        record["chosen"] += " word" * 400
        lines[long_reply_at] = json.dumps(record) + "\n"
    if tie:
        lines.append(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: same",
                                 "rejected": "\n\nHuman: hi\n\nAssistant: same"}) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)
    return path


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
