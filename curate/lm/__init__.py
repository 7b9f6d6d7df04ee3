"""The LM core: encode a pair once, run it batched, read its states and log-probs.

- :mod:`curate.lm.encode`: one :class:`EncodedPair`, one truncation rule;
- :mod:`curate.lm.forward`: one batched forward over shared prompts (or full
  sequences) with a ``grad`` switch, bucketed widths, the probe layers;
- :mod:`curate.lm.head`: log-probs through the model's own head and logit
  post-processing (soft-capping, logit scaling), in fp32;
- :mod:`curate.lm.pool`: pooled reply states of (prompt, reply) rows.

Scoring (:mod:`curate.scores.engine`), eval and training all go through it.
"""

from curate.lm.encode import EncodedPair, Encoding, encode_pair, encode_pairs
from curate.lm.forward import (PROBE_DEPTH, ReplyStates, decoder_blocks, left_pad, pair_rows, probe_layer,
                               probe_layers, reply_states, right_pad)
from curate.lm.head import head_logits, logits_logps, token_logps, unwrap
from curate.lm.pool import pool_replies

__all__ = ["EncodedPair", "Encoding", "encode_pair", "encode_pairs", "PROBE_DEPTH", "ReplyStates",
           "decoder_blocks", "left_pad", "pair_rows", "probe_layer", "probe_layers", "reply_states", "right_pad",
           "head_logits", "logits_logps", "token_logps", "unwrap", "pool_replies"]
