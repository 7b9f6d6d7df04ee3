"""Batch layouts: the shared-prompt forward equals the full-sequence forward; masks come from lengths."""

from __future__ import annotations

import torch

from curate.data.chat import ChatEncoder
from curate.data.schema import pairs_frame
from curate.train.batching import collate, collate_shared, encode_pairs, reply_forward, sequence_logps


def _pairs():
    return pairs_frame([
        {"prompt": [{"role": "user", "content": "hi " * (3 + i)}], "chosen": "yes " * (1 + 2 * i), "rejected": "no"}
        for i in range(4)
    ])


def test_reply_masks_count_the_end_of_turn_token(tiny_lm):
    enc = encode_pairs(_pairs(), ChatEncoder(tiny_lm.tokenizer))
    pad = tiny_lm.tokenizer.pad_token_id
    for batch in (collate(enc.pairs, pad), collate_shared(enc.pairs, pad)):
        lengths = [len(p.chosen) for p in enc.pairs] + [len(p.rejected) for p in enc.pairs]
        assert batch.valid.sum(-1).tolist() == lengths
        # SmolLM2 pads with its end-of-turn token; the last reply token is that token and still counts
        assert pad == enc.pairs[0].chosen[-1]


def test_shared_prompt_forward_matches_full_sequences(tiny_lm):
    model = tiny_lm.model
    enc = encode_pairs(_pairs(), ChatEncoder(tiny_lm.tokenizer))
    pad = tiny_lm.tokenizer.pad_token_id
    grads, values = [], []
    for batch in (collate(enc.pairs, pad), collate_shared(enc.pairs, pad)):
        model.zero_grad()
        logps = sequence_logps(reply_forward(model, batch)[0], batch)
        logps.sum().backward()
        values.append(logps.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    assert torch.allclose(values[0], values[1], atol=1e-4, rtol=0)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_truncation_keeps_both_replies_and_one_prompt(tiny_lm):
    rows = _pairs().to_dicts()
    rows[0]["prompt"] = [{"role": "user", "content": "long " * 100}]
    rows[1]["chosen"] = "word " * 100
    enc = encode_pairs(pairs_frame(rows), ChatEncoder(tiny_lm.tokenizer, max_length=60))
    assert enc.too_long == [pairs_frame(rows)["pair_id"][1]]
    assert enc.truncated == 1 and enc.kept == [0, 2, 3]
    assert all(p.longest <= 60 for p in enc.pairs)
