"""CHES math and the batched engine, pinned to hand-computed values and a batch-size-1 reference."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from curate.scores.ches import ches, ches_matrix, hidden_inner, ln_ches, normalized_edit_distance
from curate.lm import EncodedPair, probe_layer, probe_layers, token_logps
from curate.scores.engine import attention_cost, batch_cost, forward_batch, plan_batches, score_encoded
from curate.scores.logps import span_sum

EOS = 5  # pad == eos, as in SmolLM2


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------ pure math
def test_ches_and_ln_ches_hand_computed():
    s_pos = torch.tensor([[1.0, 2.0]])
    s_neg = torch.tensor([[3.0, 0.0]])
    # <S+,S-> = 3, ||S+||^2 = 5
    assert ches(s_pos, s_neg).item() == pytest.approx(-2.0)
    # m+ = (0.5, 1), m- = (1, 0): <m+,m-> = 0.5, ||m+||^2 = 1.25
    assert ln_ches(s_pos, s_neg, torch.tensor([2.0]), torch.tensor([3.0])).item() == pytest.approx(-0.75)
    # asymmetric: swapping the roles subtracts the other norm (3 - 9)
    assert ches(s_neg, s_pos).item() == pytest.approx(-6.0)


def test_ches_matrix_gives_every_pairing():
    pooled = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    matrix = ches_matrix(pooled)
    for i in range(4):
        for j in range(4):
            assert matrix[i, j].item() == pytest.approx(ches(pooled[i], pooled[j]).item(), rel=1e-9, abs=1e-9)
    assert torch.allclose(matrix.diagonal(), torch.zeros(4, dtype=torch.float64))


def test_hidden_inner():
    assert hidden_inner(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "a, b, expected",
    [("kitten", "sitting", 3 / 7), ([1, 2, 3], [1, 2, 3], 0.0), ([1, 2, 3], [], 1.0), ([], [], 0.0),
     ([1, 2, 3, 4], [2, 3, 4], 1 / 4), ([1, 2], [2, 1], 1.0)],
)
def test_normalized_edit_distance(a, b, expected):
    assert normalized_edit_distance(a, b) == pytest.approx(expected)


def test_span_sum_is_padding_side_agnostic():
    rng = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, 3, generator=rng) for n in (4, 1, 6)]
    width = 8
    left = torch.zeros(3, width, 3)
    right = torch.zeros(3, width, 3)
    for i, r in enumerate(rows):
        left[i, width - len(r):] = r
        right[i, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows])
    # sum the last two states of each row
    expected = torch.stack([r[-2:].sum(0) if len(r) > 1 else r.sum(0) for r in rows])
    take = lengths.clamp(max=2)
    got_left = span_sum(left, torch.full((3,), width) - take, take)
    got_right = span_sum(right, lengths - take, take)
    assert torch.allclose(got_left, expected) and torch.allclose(got_right, expected)


def test_token_logps_chunks_match_log_softmax_of_the_head(tiny_model):
    states = torch.randn(10, tiny_model.config.hidden_size)
    targets = torch.randint(0, tiny_model.config.vocab_size, (10,))
    expected = torch.log_softmax(tiny_model.lm_head(states), -1)[torch.arange(10), targets]
    assert torch.allclose(token_logps(tiny_model, states, targets, chunk_size=3), expected, atol=1e-6)


# ------------------------------------------------------------------ the engine vs the definition
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=EOS, eos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


def reference_reply(model, prompt, reply):
    """The definition, written plainly: one unpadded sequence, all hidden states, positions P-1..T-2."""
    ids = torch.tensor([list(prompt) + list(reply)])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    p, t = len(prompt), ids.shape[1]
    states = hidden[p - 1 : t - 1]
    probe = out.hidden_states[probe_layer(model)][0, p - 1 : t - 1].sum(0).double()
    logp = torch.log_softmax(out.logits[0, p - 1 : t - 1].double(), -1).gather(1, ids[0, p:t, None]).sum()
    return states.sum(0).double(), states[-1].double(), logp.item(), len(reply), probe


def reference_pair(model, pair):
    s_pos, h_pos, lp_pos, n_pos, probe_pos = reference_reply(model, pair.prompt, pair.chosen)
    s_neg, h_neg, lp_neg, n_neg, probe_neg = reference_reply(model, pair.prompt, pair.rejected)
    return {
        "probe_chosen": probe_pos, "probe_rejected": probe_neg,
        "ches": (s_pos @ s_neg - s_pos @ s_pos).item(),
        "ln_ches": ((s_pos / n_pos) @ (s_neg / n_neg) - (s_pos / n_pos) @ (s_pos / n_pos)).item(),
        "scale": (s_pos @ s_pos).item() + abs((s_pos @ s_neg).item()),
        "sum_chosen": s_pos, "sum_rejected": s_neg, "hidden_inner": (h_pos @ h_neg).item(),
        "logp_chosen": lp_pos, "logp_rejected": lp_neg,
    }


def random_pairs(n, seed=0):
    rng = random.Random(seed)

    def seq(k):
        return [rng.randrange(6, 97) for _ in range(k)]

    pairs = [EncodedPair(seq(rng.randint(1, 24)), seq(rng.randint(0, 14)) + [EOS], seq(rng.randint(0, 14)) + [EOS])
             for _ in range(n)]
    # one-token replies (only the end-of-turn token), a one-token prompt, replies that end in pad==eos ids
    pairs += [EncodedPair([7], [EOS], [EOS]), EncodedPair([8, 9, 10], [EOS], [11, 12, EOS]),
              EncodedPair(seq(30), [EOS, EOS, EOS], [EOS])]
    return pairs


def assert_matches_reference(model, pairs, out, rel=1e-4):
    for i, pair in enumerate(pairs):
        ref = reference_pair(model, pair)
        for side in ("chosen", "rejected"):
            for name in ("sum", "probe"):  # last layer (CHES) and the reward heads' probe layer
                got, want = out[f"{name}_{side}"][i].double(), ref[f"{name}_{side}"]
                assert torch.allclose(got, want, rtol=rel, atol=rel * want.abs().max().item())
            assert out[f"logp_{side}"][i].item() == pytest.approx(ref[f"logp_{side}"], rel=rel)
        n_pos, n_neg = torch.tensor([len(pair.chosen)]), torch.tensor([len(pair.rejected)])
        got_ches = ches(out["sum_chosen"][i : i + 1], out["sum_rejected"][i : i + 1]).item()
        assert got_ches == pytest.approx(ref["ches"], abs=rel * ref["scale"])
        got_ln = ln_ches(out["sum_chosen"][i : i + 1], out["sum_rejected"][i : i + 1], n_pos, n_neg).item()
        assert got_ln == pytest.approx(ref["ln_ches"], abs=rel * ref["scale"])
        got_inner = hidden_inner(out["last_chosen"][i], out["last_rejected"][i]).item()
        assert got_inner == pytest.approx(ref["hidden_inner"], rel=rel, abs=1e-6)


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("batch_size", [None, 1, 5])
def test_engine_matches_batch_size_one_definition(tiny_model, prefix_sharing, batch_size):
    pairs = random_pairs(16)
    out = score_encoded(tiny_model, pairs, prefix_sharing=prefix_sharing, batch_size=batch_size, token_budget=300)
    assert_matches_reference(tiny_model, pairs, out)


def test_engine_without_logps_skips_the_head(tiny_model, monkeypatch):
    calls = []
    head = tiny_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = forward_batch(tiny_model, random_pairs(3), want_logps=False)
    finally:
        handle.remove()
    assert calls == [] and "logp_chosen" not in out and "sum_chosen" in out


def test_pad_equals_eos_mask_trap_is_avoided(tiny_model):
    # A mask built as ids != pad_id would drop the EOS and every EOS-valued token of this reply.
    pair = EncodedPair([20, 21, 22], [EOS, EOS, EOS], [30, EOS])
    out = forward_batch(tiny_model, [pair, EncodedPair([40] * 9, [41, EOS], [EOS])])
    ref = reference_pair(tiny_model, pair)
    assert out["logp_chosen"][0].item() == pytest.approx(ref["logp_chosen"], rel=1e-5)
    assert torch.allclose(out["sum_chosen"][0].double(), ref["sum_chosen"], rtol=1e-4, atol=1e-5)


def test_plan_batches_covers_every_pair_once_within_budget():
    pairs = random_pairs(40, seed=3)
    batches = plan_batches(pairs, token_budget=200)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(pairs)))
    assert all(len(b) == 1 or batch_cost([pairs[i] for i in b]) <= 200 for b in batches)
    assert [len(b) for b in plan_batches(pairs, token_budget=10, batch_size=7)][:-1] == [7] * (len(pairs) // 7)


def test_attention_budget_caps_rows_times_squared_length():
    long_pairs = [EncodedPair([7] * 90, [8] * 9 + [EOS], [9, EOS]) for _ in range(6)]  # longest 100 tokens
    short_pairs = [EncodedPair([7] * 10, [8, EOS], [9, EOS]) for _ in range(6)]  # longest 12 tokens
    pairs = long_pairs + short_pairs
    # the token budget alone would put the six long pairs in one batch (6 x 90 + 6 x 12 = 612 tokens)
    assert len(plan_batches(long_pairs, token_budget=1000)) == 1
    batches = plan_batches(pairs, token_budget=1000, attention_budget=2 * 100 * 100)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    assert all(attention_cost([pairs[i] for i in b]) <= 2 * 100 * 100 for b in batches)
    assert [len(b) for b in batches] == [2, 2, 2, 6]  # short pairs still share one batch
    # one pair over the budget still gets a batch of its own
    assert plan_batches(long_pairs[:2], token_budget=1000, attention_budget=10) == [[0], [1]]


def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_model, monkeypatch):
    import curate.scores.engine as engine

    real = engine.forward_batch
    sizes = []

    def flaky(model, pairs, **kwargs):
        sizes.append(len(pairs))
        if len(pairs) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, pairs, **kwargs)

    monkeypatch.setattr(engine, "forward_batch", flaky)
    pairs = random_pairs(12, seed=5)
    out = score_encoded(tiny_model, pairs, token_budget=10_000)
    assert sizes[0] == len(pairs) and sizes[-1] <= 3  # one try with everything, then smaller batches
    assert_matches_reference(tiny_model, pairs, out)


def test_other_runtime_errors_are_not_swallowed(tiny_model, monkeypatch):
    import curate.scores.engine as engine

    monkeypatch.setattr(engine, "forward_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        score_encoded(tiny_model, random_pairs(2))


def test_bucket_width_rounds_up_to_the_bucket():
    from curate.lm.forward import WIDTH_BUCKET, bucket_width

    assert [bucket_width(n) for n in (0, 1, WIDTH_BUCKET, WIDTH_BUCKET + 1)] == [WIDTH_BUCKET, WIDTH_BUCKET,
                                                                             WIDTH_BUCKET, 2 * WIDTH_BUCKET]


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_probe_taps_several_layers_side_by_side(shared_prompt):
    from curate.lm import pair_rows, reply_states

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=EOS, eos_token_id=EOS)
    model = LlamaForCausalLM(config).eval()
    pairs = random_pairs(5, seed=3)
    prompts, replies, owner = pair_rows(pairs)
    out = reply_states(model, prompts, replies, owner, shared_prompt=shared_prompt, probe=(2, 1))
    assert out.probe.shape[-1] == 2 * 16
    for row, reply in enumerate(replies):
        prompt = prompts[owner[row]]
        ids = torch.tensor([list(prompt) + list(reply)])
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        span = slice(len(prompt) - 1, ids.shape[1] - 1)
        want = torch.cat([hidden[2][0, span], hidden[1][0, span]], dim=-1)  # in the order asked
        assert torch.allclose(out.probe[row, :len(reply)], want, atol=1e-5)


def test_probe_layers_of_a_30_block_model():
    config = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    assert probe_layers(model) == (16, 20, 24) and probe_layer(model) == 20
    assert probe_layers(model, (0.0, 1.0, 2 / 3)) == (1, 20, 29)  # kept inside the blocks, sorted
