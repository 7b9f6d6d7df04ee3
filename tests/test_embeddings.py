"""Sentence embeddings: pooling math, length batching, de-duplication and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate import embeddings as emb
from curate.errors import CurateError


@pytest.fixture(scope="module")
def tiny_encoder():
    """A tiny random BERT with the bundled MiniLM tokenizer (no download)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from curate.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    return BertModel(config).eval(), tokenizer


TEXTS = [
    "A much longer reply that goes on for quite a few more words than the others do.",
    "Short.",
    "I'm sorry, I can't help with that.",
    "Short.",
    "Here is how you could do it, step by step.",
]


def test_mean_pool_ignores_padding_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(emb.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_l2_normalize_by_hand():
    out = emb.l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_batched_equals_one_at_a_time(tiny_encoder):
    model, tokenizer = tiny_encoder
    batched = emb.encode_batched(model, tokenizer, TEXTS, batch_size=2, max_length=64)
    single = np.stack([emb.encode_batched(model, tokenizer, [t], batch_size=1, max_length=64)[0] for t in TEXTS])
    # Each text alone has no padding at all, so this pins the masks and the order restoration.
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert batched.dtype == np.float32
    # and by hand: mean of the last hidden state over the real tokens, normalised
    ids = tokenizer(TEXTS[2], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    by_hand = hidden.mean(0) / hidden.mean(0).norm()
    np.testing.assert_allclose(batched[2], by_hand.numpy(), atol=1e-5)


def test_truncates_to_max_length(tiny_encoder):
    model, tokenizer = tiny_encoder
    long_text = "word " * 300
    out = emb.encode_batched(model, tokenizer, [long_text, long_text + "extra tail"], max_length=16)
    # beyond 16 tokens the two texts are identical
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_embed_texts_dedups_and_caches(tiny_encoder, tmp_path, monkeypatch):
    model, tokenizer = tiny_encoder
    seen: list[list[str]] = []
    real = emb.encode_batched

    def counting(*args, **kwargs):
        seen.append(list(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(emb, "encode_batched", counting)
    first = emb.embed_texts(TEXTS, model=(model, tokenizer), device="cpu", cache_dir=tmp_path, show_progress=False)
    assert sorted(seen[0]) == sorted(set(TEXTS))  # "Short." embedded once
    np.testing.assert_array_equal(first[1], first[3])
    again = emb.embed_texts(TEXTS[::-1] + ["new text"], model=(model, tokenizer), device="cpu",
                            cache_dir=tmp_path, show_progress=False)
    assert seen[1] == ["new text"]  # everything else came from the cache
    np.testing.assert_allclose(again[: len(TEXTS)], first[::-1], atol=0)
    assert len(list(tmp_path.glob("embeddings-*.npz"))) == 1


def test_embed_texts_rejects_non_strings(tiny_encoder):
    with pytest.raises(CurateError, match="item 1"):
        emb.embed_texts(["ok", None], model=tiny_encoder, device="cpu", show_progress=False)


def test_empty_input(tiny_encoder):
    out = emb.embed_texts([], model=tiny_encoder, device="cpu", show_progress=False)
    assert out.shape == (0, 32)


@pytest.mark.slow
def test_bundled_minilm_is_semantic(tmp_path):
    texts = ["How do I bake sourdough bread?", "A recipe for baking bread at home.", "The stock market fell today."]
    vectors = emb.embed_texts(texts, cache_dir=tmp_path, device="cpu", show_progress=False)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    assert list(tmp_path.glob("embeddings-all-minilm-l6-v2-L256.npz"))
