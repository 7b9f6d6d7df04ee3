"""The LM core: log-probs equal each model family's own forward; pooled replies; one encoding."""

from __future__ import annotations

import pytest
import torch

from curate.data.chat import ChatEncoder
from curate.data.schema import pairs_frame
from curate.lm import EncodedPair, encode_pair, head_logits, pool_replies, reply_states, token_logps
from curate.models import LoadedModel, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def _family(name: str, vocab: int, tokenizer):
    """A tiny random model of one family, its logit post-processing made large enough to matter."""
    import transformers as tf

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=vocab)
    configs = {
        "gemma2": lambda: tf.Gemma2Config(**SMALL, **ids, head_dim=8, final_logit_softcapping=0.5),
        "granite": lambda: tf.GraniteConfig(**SMALL, **ids, logits_scaling=0.05),
        "cohere": lambda: tf.CohereConfig(**SMALL, **ids, logit_scale=8.0),
        "qwen2": lambda: tf.Qwen2Config(**SMALL, **ids),
        "mistral": lambda: tf.MistralConfig(**SMALL, **ids, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**SMALL, **ids),
        "olmo2": lambda: tf.Olmo2Config(**SMALL, **ids),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=512, **ids),
    }
    config = configs[name]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_causal_lm(seed=0, num_hidden_layers=1).tokenizer


PAIRS = [
    {"prompt": [{"role": "user", "content": "Where is the nearest library?"}],
     "chosen": "Two streets north, next to the bakery.", "rejected": "No idea."},
    {"prompt": [{"role": "user", "content": "hi " * 30}], "chosen": "Hello there, how can I help?",
     "rejected": "hello " * 12},
]


def _own_logps(model, encoder, row) -> list[float]:
    """log pi(y|x) from the model's own forward, one unpadded sequence per reply (float64 log-softmax)."""
    pair, _ = encode_pair(encoder, row["prompt"], row["chosen"], row["rejected"])
    out = []
    for reply in (pair.chosen, pair.rejected):
        ids = torch.tensor([list(pair.prompt) + list(reply)])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(pair.prompt) - 1:-1].double()
        out.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(pair.prompt):, None]).sum().item())
    return out


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere", "qwen2", "mistral", "phi3", "olmo2", "gpt2"])
@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_score_logps_equal_the_models_own_forward(tmp_path, tokenizer, family, prefix_sharing):
    from curate.score import score

    model = _family(family, len(tokenizer), tokenizer)
    lm = LoadedModel(model, tokenizer, f"tiny-{family}", torch.device("cpu"), torch.float32, {"name": f"tiny-{family}"})
    table = score(pairs_frame(PAIRS), out=tmp_path / "run", scores="logps", lm=lm, dtype="fp32",
                  prefix_sharing=prefix_sharing)
    encoder = ChatEncoder(tokenizer)
    by_id = {r["pair_id"]: r for r in table.iter_rows(named=True)}
    for row in pairs_frame(PAIRS).iter_rows(named=True):
        chosen, rejected = _own_logps(model, encoder, row)
        assert by_id[row["pair_id"]]["logp_chosen"] == pytest.approx(chosen, rel=1e-4)
        assert by_id[row["pair_id"]]["logp_rejected"] == pytest.approx(rejected, rel=1e-4)


def test_head_logits_apply_the_post_processing(tokenizer):
    model = _family("gemma2", len(tokenizer), tokenizer)
    states = torch.randn(2, 3, 32)
    raw = model.lm_head(states)
    assert torch.allclose(head_logits(model, states), 0.5 * torch.tanh(raw / 0.5), atol=1e-6)
    assert head_logits(model, states).abs().max() <= 0.5
    # the model is left as it was
    assert isinstance(model.model, torch.nn.Module) and type(model.model).__name__ == "Gemma2Model"


def test_token_logps_keep_gradients(tiny_lm):
    model = tiny_lm.model
    states = torch.randn(4, model.config.hidden_size, requires_grad=True)
    token_logps(model, states, torch.tensor([1, 2, 3, 4])).sum().backward()
    assert states.grad is not None and model.lm_head.weight.grad is not None
    model.zero_grad()


def test_pool_replies_sums_the_states_that_predict_each_reply(tiny_lm):
    encoder = ChatEncoder(tiny_lm.tokenizer)
    prompts = [row["prompt"] for row in PAIRS] + [PAIRS[0]["prompt"]]
    replies = [PAIRS[0]["chosen"], PAIRS[1]["rejected"], "ok"]
    sums, counts = pool_replies(tiny_lm.model, encoder, prompts, replies, token_budget=40)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        enc = encoder.encode(prompt, reply)
        ids = torch.tensor([enc.prompt_ids + enc.reply_ids])
        with torch.inference_mode():
            hidden = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        p = len(enc.prompt_ids)
        assert counts[i] == len(enc.reply_ids)
        assert torch.allclose(sums[i], hidden[p - 1:-1].sum(0), rtol=1e-4, atol=1e-4)


def test_shared_prompt_states_equal_full_sequences_with_gradients(tiny_lm):
    encoder = ChatEncoder(tiny_lm.tokenizer)
    pairs = [encode_pair(encoder, r["prompt"], r["chosen"], r["rejected"])[0] for r in PAIRS]
    prompts = [p.prompt for p in pairs]
    replies = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    owner = [0, 1, 0, 1]
    shared = reply_states(tiny_lm.model, prompts, replies, owner, shared_prompt=True, grad=True)
    full = reply_states(tiny_lm.model, prompts, replies, owner, shared_prompt=False, grad=True)
    valid = shared.valid
    assert torch.equal(valid, full.valid)
    assert torch.allclose(shared.states[valid], full.states[valid], atol=1e-4)
    assert shared.states.requires_grad


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_under_bf16_a_rows_states_do_not_depend_on_its_batch(tiny_lm, shared_prompt):
    # what lets training reuse scored reference log-probs: a pair batched with prompts and replies
    # of other widths (across bucket boundaries) gets bit-identical states to the pair run alone
    from curate.lm import pair_rows
    from curate.lm.forward import WIDTH_BUCKET

    rng = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, 90, (n,), generator=rng).tolist()

    pairs = [EncodedPair(tokens(p), tokens(c) + [2], tokens(r) + [2])  # 2: an end-of-turn stand-in
             for p, c, r in ((5, 7, 3), (WIDTH_BUCKET + 9, 40, 2), (3 * WIDTH_BUCKET, 1, WIDTH_BUCKET), (20, 12, 30))]
    model = tiny_lm.model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        together = reply_states(model, *pair_rows(pairs), shared_prompt=shared_prompt)
        for i, pair in enumerate(pairs):
            alone = reply_states(model, *pair_rows([pair]), shared_prompt=shared_prompt)
            for side, row in ((0, i), (1, len(pairs) + i)):
                n = int(alone.lengths[side])
                assert torch.equal(together.states[row, :n], alone.states[side, :n])
