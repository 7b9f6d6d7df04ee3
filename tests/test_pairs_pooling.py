"""Pool-CHES: the k x k matrix from one pooled sum per reply equals per-pair CHES from the engine."""

from __future__ import annotations

import pytest
import torch

from curate.data.chat import ChatEncoder
from curate.lm.forward import bucket_width
from curate.pairs.pooling import pool_response_sets
from curate.scores.ches import ches, ches_matrix, ln_ches
from curate.scores.engine import EncodedPair, forward_batch

PROMPT = [{"role": "user", "content": "Tell me something about the sea."}]
REPLIES = [
    "Waves.",
    "The sea covers most of the planet and holds nearly all of its water.",
    "Salt water, tides and a lot of fish.",
    "It is deep. Very deep. In places deeper than Everest is tall, and dark all the way down.",
    "Blue.",
    "Oceans regulate the climate by storing heat and carbon; currents move that heat around the globe slowly.",
    "I like it.",
]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_matrix_from_pooled_sums_equals_per_pair_engine(tiny_lm, single_torch_thread, k, prefix_sharing):
    encoder = ChatEncoder(tiny_lm.tokenizer)
    prompt = encoder.prompt_ids(PROMPT)
    replies = [encoder.reply_ids(text) for text in REPLIES[:k]]
    assert len({len(r) for r in replies}) > 1  # mixed reply lengths
    other = encoder.prompt_ids([{"role": "user", "content": "And the mountains?"}])
    encoded = [(prompt, r) for r in replies] + [(other, r) for r in replies[:2]]  # a second prompt in the batches
    sums = pool_response_sets(tiny_lm.model, encoded, token_budget=96, prefix_sharing=prefix_sharing)[:k]
    lengths = torch.tensor([len(r) for r in replies], dtype=torch.float64)
    ches_k = ches_matrix(sums)
    ln_k = ches_matrix(sums.double() / lengths[:, None])

    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    out = forward_batch(tiny_lm.model, [EncodedPair(prompt, replies[i], replies[j]) for i, j in pairs],
                        want_logps=False, prefix_sharing=prefix_sharing)
    n_c = torch.tensor([len(replies[i]) for i, _ in pairs])
    n_r = torch.tensor([len(replies[j]) for _, j in pairs])
    direct_ches = ches(out["sum_chosen"], out["sum_rejected"])
    direct_ln = ln_ches(out["sum_chosen"], out["sum_rejected"], n_c, n_r)
    index = tuple(torch.tensor(p) for p in zip(*pairs))
    scale = direct_ches.abs().max().item()
    torch.testing.assert_close(ches_k[index], direct_ches, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(ln_k[index], direct_ln, rtol=1e-4, atol=1e-4 * direct_ln.abs().max().item())
    assert torch.all(ches_k.diagonal() == 0)


def _decoder_calls(tiny_lm, **options):
    encoder = ChatEncoder(tiny_lm.tokenizer)
    prompt = encoder.prompt_ids(PROMPT)
    encoded = [(prompt, encoder.reply_ids(text)) for text in REPLIES]
    calls = []
    handle = tiny_lm.model.base_model.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        pool_response_sets(tiny_lm.model, encoded, **options)
    finally:
        handle.remove()
    return prompt, encoded, calls


def test_one_decoder_sequence_per_response(tiny_lm):
    prompt, encoded, calls = _decoder_calls(tiny_lm, prefix_sharing=False)
    assert sum(rows for rows, _ in calls) == len(REPLIES) == 7


def test_shared_prompt_runs_once_and_each_reply_once(tiny_lm):
    prompt, encoded, calls = _decoder_calls(tiny_lm, prefix_sharing=True)
    assert calls[0] == (1, bucket_width(len(prompt)))  # the prompt, once for all 7 replies
    reply_calls = calls[1:]
    assert sum(rows for rows, _ in reply_calls) == 7
    # every reply token but the end-of-turn one, plus right padding to its bucket width
    assert sum(rows * width for rows, width in reply_calls) >= sum(len(r) - 1 for _, r in encoded)


def test_empty_reply_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="end-of-turn"):
        pool_response_sets(tiny_lm.model, [([1, 2], [])])
