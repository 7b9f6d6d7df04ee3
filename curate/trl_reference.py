"""Reference log-probs for TRL's ``DPOTrainer``: curate's ``logp_*`` as ``ref_chosen_logps`` / ``ref_rejected_logps``.

A reference log-prob is only valid for the exact tokens it was computed on, so
the trl export of a run scored with ``--scores logps`` writes its rows in TRL's
*standard* (text) preference format, rendered the way curate scored them:

- ``prompt``: the prompt as curate's chat encoder rendered it (the model's chat
  template with the generation prompt, the run's system-prompt setting,
  consecutive same-role turns merged; a prompt curate cut from the left is the
  text of the kept tokens);
- ``chosen`` / ``rejected``: the reply followed by the end-of-turn token's text
  (SmolLM2: ``<|im_end|>``), which is what curate's ``logp_*`` sum over.

Why not the conversational rows: TRL renders ``prompt + [assistant reply]``
with the template, and templates add tokens after the end of turn (SmolLM2 a
newline), so TRL's completion has tokens curate never scored (on 50 HH pairs
with SmolLM2's tokenizer that trailing newline was the only difference).

Every row is checked against TRL's own rules (``DPOTrainer._prepare_dataset``
in TRL 1.x): an EOS is appended to a completion that does not end with the
tokenizer's EOS text, prompt and prompt+completion are tokenized with the
tokenizer's default special tokens, and the completion starts after their
common prefix. A row whose ids differ from the ones curate scored (e.g. a
tokenizer that adds a BOS the template already wrote) is a CurateError, never
a silently wrong reference.

Not checked, because it is a training setting: TRL's collator truncates
sequences to ``DPOConfig.max_length`` (default 1024, keeping the start), which
would cut tokens curate scored. Use ``max_length=None`` or at least the
longest sequence, which the export reports (``trl_max_length_needed``).

TRL 1.16's ``DPOTrainer(precompute_ref_log_probs=True)`` recomputes the
reference even when the columns are present; :func:`dpo_trainer_with_reference`
returns a subclass that uses the dataset's columns instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import CurateError

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def scoring_tokenizer(model_info: dict[str, Any]):
    """The tokenizer of the model that scored a run (from the manifest's ``score.model``)."""
    from transformers import AutoTokenizer

    from curate.models import SMOLLM2, _prepare_tokenizer, bundled_tokenizer_dir

    name = str(model_info.get("name", ""))
    if name.lower() in (SMOLLM2, "smollm2"):
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(bundled_tokenizer_dir()))
    try:
        if name.endswith(".gguf"):
            path = Path(name)
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(name, revision=model_info.get("revision")))
    except OSError as exc:
        raise CurateError(
            f"cannot load the tokenizer of {name!r}, the model that scored this run ({type(exc).__name__}); "
            f"export from a machine that has it, or pass --no-ref-logps (bundled: {SMOLLM2})"
        ) from None


def trl_token_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL's DPOTrainer makes them from one text row."""
    eos = tokenizer.eos_token
    if eos is not None and not completion.endswith(eos):
        completion = completion + eos
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    full_ids = tokenizer(text=prompt + completion)["input_ids"]
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    return full_ids[:common], full_ids[common:]


def reference_rows(pairs: pl.DataFrame, logps: pl.DataFrame, *, tokenizer, system_prompt: str,
                   max_length: int | None) -> pl.DataFrame:
    """Text rows and reference columns for ``pairs``, in their order and exported orientation.

    ``logps`` holds ``pair_id``, ``logp_chosen``, ``logp_rejected`` already in
    the exported orientation. Raises CurateError when a pair has no log-probs
    or TRL would tokenize a row differently from what curate scored.
    """
    from curate.data.chat import ChatEncoder
    from curate.lm import encode_pair

    encoder = ChatEncoder(tokenizer, system_prompt=system_prompt, max_length=max_length)
    eot_text = tokenizer.decode([encoder.eot_id])
    joined = pairs.select("pair_id", "prompt", "chosen", "rejected").join(
        logps, on="pair_id", how="left", maintain_order="left")
    missing = joined.filter(pl.col("logp_chosen").is_null() | pl.col("logp_rejected").is_null())
    if missing.height:
        raise CurateError(
            f"{missing.height} exported pairs have no logp_chosen/logp_rejected (e.g. {missing['pair_id'][0]}); "
            "score the run with --scores logps, or export with --no-ref-logps"
        )
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    mismatched: list[str] = []
    for pair_id, prompt, chosen, rejected in joined.select("pair_id", "prompt", "chosen", "rejected").iter_rows():
        encoded, cut = encode_pair(encoder, prompt, chosen, rejected)
        prompt_text = tokenizer.decode(list(encoded.prompt)) if cut else encoder.prompt_text(prompt)
        texts = (chosen + eot_text, rejected + eot_text)
        for text, ids in zip(texts, (encoded.chosen, encoded.rejected)):
            trl_prompt, trl_completion = trl_token_ids(tokenizer, prompt_text, text)
            if trl_prompt != list(encoded.prompt) or trl_completion != list(ids):
                mismatched.append(pair_id)
                break
        rows["prompt"].append(prompt_text)
        rows["chosen"].append(texts[0])
        rows["rejected"].append(texts[1])
    if mismatched:
        raise CurateError(
            f"{len(mismatched)} of {joined.height} pairs tokenize differently under TRL's rules than curate scored "
            f"them (e.g. {mismatched[0]}), so their log-probs are no TRL reference; export with --no-ref-logps"
        )
    frame = pl.DataFrame(rows).with_columns(
        ref_chosen_logps=joined["logp_chosen"].cast(pl.Float64),
        ref_rejected_logps=joined["logp_rejected"].cast(pl.Float64),
    )
    return frame


def dpo_trainer_with_reference():
    """A ``trl.DPOTrainer`` subclass that takes ``ref_chosen_logps`` / ``ref_rejected_logps`` from the dataset.

    Use it with ``DPOConfig(precompute_ref_log_probs=True)`` (so no reference
    model is kept in memory); a dataset without the two columns is precomputed
    by TRL as usual.
    """
    from trl import DPOTrainer

    class DPOTrainerWithReference(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if set(REF_COLUMNS) <= set(dataset.column_names):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return DPOTrainerWithReference
