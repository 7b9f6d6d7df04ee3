"""The training loop: DPO-family and SparsePO on curated pairs, readable top to bottom.

One optimizer step consumes ``batch_size`` pairs (the global batch), split
into ``grad_accum`` micro-batches per process. Each micro-batch runs its
chosen and rejected replies together: one pass over the shared prompts and
one over all replies on their KV cache (see ``batching``). Sequence-level
losses use reference log-probs computed once before training; token-level
losses (tdpo1, tdpo2, sparsepo) run the frozen reference alongside the policy.

Data order is a seeded permutation per epoch, so a resumed run sees the same
batches as an uninterrupted one, and 2 processes see the same global batches
as 1. Works unchanged under ``accelerate launch`` / torchrun (DDP); with
several processes each takes its slice of every micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.env import progress_bar
from curate.errors import CurateError
from curate.fsutil import remove_inside
from curate.models import BF16_MIXED
from curate.rundir import RunDir, ScoreSection, TrainSection
from curate.train import checkpoints as ckpt
from curate.train.config import RESUMABLE_CHANGES, TrainConfig
from curate.train.batching import (Batch, EncodedPair, PolicyForward, collate, collate_shared, encode_pairs, on_reply,
                                   reply_forward, token_logps)
from curate.train.data import EPSILON_AUTO_SOURCE, column_values, epsilon_from_pairs, read_training_pairs, scored_reference_logps
from curate.train.losses import (SEQUENCE_LOSSES, TokenTerms, pair_losses, sft_loss, sparsepo_losses, tdpo1_losses,
                                 tdpo2_losses, token_kl, weighted_mean)
from curate.train.masks import SparsePOMasks, activation_mask, mask_mean, zero_fraction


OPTIMIZERS = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}  # torch defaults otherwise


@dataclass
class TrainResult:
    out: Path
    final_dir: Path
    steps: int
    final_loss: float
    last_metrics: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ helpers
def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps (step s at (s+1)/(warmup+1) of the peak), then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _use_bf16(setting: bool | str, device: torch.device) -> bool:
    if setting == "auto":
        from curate.models import resolve_precision

        return resolve_precision("auto", device).autocast == torch.bfloat16
    return bool(setting)


def _scored_layout(data) -> bool | None:
    """Whether the scoring run in ``data`` (a run directory) shared prompts; None if unknown."""
    if not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        return None
    section = RunDir(data).section(ScoreSection)
    layout = section.batch.get("prefix_sharing") if section else None
    return layout if isinstance(layout, bool) else None


def _fingerprint(cfg: TrainConfig, model_name: str, pair_ids: list[str], epsilon: float, total: int) -> dict:
    digest = hashlib.sha256("\n".join(pair_ids).encode()).hexdigest()[:16]
    keep = ("loss", "beta", "sft_alpha", "weights", "soft_labels", "tdpo_alpha", "mask", "mask_mode", "mask_l1",
            "mask_init", "optimizer", "lr", "batch_size", "grad_accum", "max_length", "system_prompt", "lora_r", "seed")
    return {**{k: getattr(cfg, k) for k in keep}, "epsilon": epsilon, "model": model_name,
            "pairs": len(pair_ids), "pairs_sha": digest, "total_steps": total}


TRAIN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "reference_logps.pt")


def _first_difference(saved: dict[str, Any], now: dict[str, Any], ignore=()) -> str | None:
    return next((k for k in now if k not in ignore and saved.get(k) != now[k]), None)


def _prepare_out(out: Path, fingerprint: dict[str, Any], *, resume: bool, force: bool,
                 main: bool) -> tuple[Path | None, list[dict[str, Any]]]:
    """Check that ``out`` may be written; return the checkpoint to resume from and the run's learning-rate changes.

    A non-empty ``out`` belongs to the run whose fingerprint its manifest (or,
    for a run killed early, its newest checkpoint) holds. Without ``resume``
    or ``force`` it is refused, so a second run never mixes its checkpoints
    with (and prunes them against) an older run's.
    """
    if force:
        if main:
            for name in TRAIN_OUTPUTS:
                remove_inside(out / name, out)
        return None, []
    if not out.is_dir() or not any(out.iterdir()):
        return None, []
    checkpoint = ckpt.latest_checkpoint(out / "checkpoints")
    owner = ((RunDir(out).section(TrainSection) or TrainSection()).fingerprint
             or (ckpt.read_state(checkpoint).get("fingerprint") if checkpoint else None))
    if not resume:
        if owner is None:
            held = f"{out} already holds files that are not a training run"
        elif _first_difference(owner, fingerprint) is None:
            held = f"{out} already holds this training run"
        else:
            key = _first_difference(owner, fingerprint)
            held = f"{out} holds another training run ({key} was {owner.get(key)!r} there, {fingerprint[key]!r} now)"
        raise CurateError(f"{held}; add --resume to continue it, --force to replace it, or choose a new --out")
    if owner is None:
        raise CurateError(f"--resume: {out} holds no training run to continue; drop --resume or choose a new --out")
    if checkpoint is None:  # killed before its first checkpoint: nothing trained yet, so only the data must match
        key = _first_difference(owner, fingerprint, ignore=RESUMABLE_CHANGES)
        if key is not None:
            raise CurateError(f"cannot resume in {out}: {key} was {owner.get(key)!r} there and is "
                              f"{fingerprint[key]!r} now; resume with the same data and settings, or train "
                              "into a new --out directory")
        return None, []
    state, changes = ckpt.check_compatible(checkpoint, fingerprint, may_change=RESUMABLE_CHANGES)
    lr_changes = list(state.get("lr_changes") or [])
    if "lr" in changes:
        lr_changes.append({"step": state["step"], "from": changes["lr"][0], "to": changes["lr"][1]})
    return checkpoint, lr_changes


def _non_finite_weight(modules) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None (one isfinite pass per tensor)."""
    for module in modules:
        for name, p in module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return name
    return None


class _Reference:
    """The frozen reference: precomputed sequence log-probs, or a model run alongside the policy."""

    def __init__(self, model=None, logps: torch.Tensor | None = None, lora: bool = False):
        self.model, self.logps, self.lora = model, logps, lora

    def forward(self, policy, batch: Batch, hidden_states: bool):
        if self.lora:  # the base model with the adapter switched off
            with policy.disable_adapter():
                return reply_forward(policy, batch, hidden_states=hidden_states)
        return reply_forward(self.model, batch, hidden_states=hidden_states)


@torch.no_grad()
def precompute_reference_logps(model, encoded: list[EncodedPair], *, pad_id: int, batch_size: int,
                               autocast, accelerator, order=None, make_batch=collate_shared) -> torch.Tensor:
    """Σ log π_ref(y|x) of every pair's chosen and rejected reply, ``[N, 2]`` fp32.

    Pairs run in ``order`` (default: by length), cut the way training cuts a
    step: each process takes its ``batch_size`` slice of every
    ``processes x batch_size`` chunk. Given epoch 0's order and the training
    micro-batch, the reference sees exactly the policy's batches, so under bf16
    the step-0 log-ratios are 0, not batching noise.
    """
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    if order is None:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].chosen) + len(encoded[i].rejected))
    order = [int(i) for i in order]
    rows = []
    for start in range(0, len(order), world * batch_size):
        idx = order[start + rank * batch_size:start + (rank + 1) * batch_size]
        if not idx:
            continue
        batch = make_batch([encoded[i] for i in idx], pad_id).to(accelerator.device)
        with autocast():
            logits, _ = reply_forward(model, batch)
        logps = on_reply(token_logps(logits, batch.labels), batch).sum(-1).cpu()
        chosen, rejected = logps.chunk(2)
        rows += [(i, float(c), float(r)) for i, c, r in zip(idx, chosen, rejected)]
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    out = torch.zeros(len(encoded), 2)
    for i, c, r in rows:
        out[i, 0], out[i, 1] = c, r
    model.train(was_training)
    return out


# |log-ratio| allowed at step 0 for reused scored log-probs: constant + per reply token. A run
# scored in another dtype (bf16 weights; fp32 under bf16 autocast: ~4e-3 to 9e-3 nats on a tiny
# model) is reused only if its values still agree to 1e-3; otherwise they are recomputed in
# training's own batches.
REUSE_TOLERANCE_NATS = (1e-3, 0.0)


@torch.no_grad()
def _reused_reference(data, pairs, policy, encoding, model_info, cfg, make_batch, pad_id, autocast,
                      accelerator, compute_dtype: str) -> tuple[torch.Tensor | None, str]:
    """Reference log-probs from the scoring run, if it matches and a step-0 probe agrees; else (None, why)."""
    if not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        return None, "computed before training"
    section = RunDir(data).section(ScoreSection) or ScoreSection()
    values, why = scored_reference_logps(pairs, section, model_info=model_info, system_prompt=cfg.system_prompt,
                                         max_length=cfg.max_length, truncated_any=encoding.truncated > 0)
    if values is None:
        return None, f"computed before training ({why})"
    other_dtype = section.dtype not in (None, compute_dtype)
    dtypes = f"scored in {section.dtype}, training computes in {compute_dtype}; " if other_dtype else ""
    # with policy = reference every log-ratio must be ~0: probe the first batch of pairs
    idx = list(range(min(len(encoding.pairs), 8)))
    batch = make_batch([encoding.pairs[i] for i in idx], pad_id).to(accelerator.device)
    was_training = policy.training
    policy.eval()
    with autocast():
        logits, _ = reply_forward(policy, batch)
    policy.train(was_training)
    logps = on_reply(token_logps(logits, batch.labels), batch).sum(-1).cpu().double()
    scored = torch.from_numpy(values[idx]).T.reshape(-1)
    tolerance = REUSE_TOLERANCE_NATS[0] + REUSE_TOLERANCE_NATS[1] * batch.valid.sum(-1).cpu().double()
    gap = float((logps - scored).abs().max())
    reuse = not ((logps - scored).abs() > tolerance).any()
    if other_dtype:
        accelerator.print(f"reference log-probs: {dtypes}{'reused' if reuse else 'recomputed'} "
                          f"(they differ by up to {gap:.3g} nats)")
    if not reuse:
        return None, f"computed before training ({dtypes}scored log-probs differ from the model's by up to {gap:.3g} nats)"
    return torch.from_numpy(values).float(), f"reused from the scoring run ({dtypes}step-0 check: max gap {gap:.3g} nats)"


def _compute_micro_loss(step_model, policy, reference: _Reference, masks, batch: Batch, idx: np.ndarray, *,
                        cfg: TrainConfig, epsilon: float, weights, confidence,
                        autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective of one micro-batch (before accumulation scaling) and per-pair detached stats."""
    n = len(idx)
    token_level = cfg.loss not in SEQUENCE_LOSSES
    need_hidden = cfg.loss == "sparsepo"
    ref_hidden = None
    if token_level:
        with torch.no_grad(), autocast():
            ref_logits, ref_hidden = reference.forward(policy, batch, need_hidden)
    with autocast():
        logits = step_model(batch)
    tok = on_reply(token_logps(logits, batch.labels), batch)
    logps = tok.sum(-1)
    device = logps.device
    reply_len = batch.valid.sum(-1)
    w = torch.as_tensor(weights[idx], dtype=torch.float32, device=device) if weights is not None else None
    stats: dict[str, torch.Tensor] = {}

    if token_level:
        ref_tok = on_reply(token_logps(ref_logits, batch.labels), batch)
        kl = on_reply(token_kl(logits, ref_logits), batch)
        ratio = tok - ref_tok
        sides = [TokenTerms(ratio[s], kl[s], batch.valid[s]) for s in (slice(0, n), slice(n, 2 * n))]
        if cfg.loss == "tdpo1":
            losses = tdpo1_losses(*sides, beta=cfg.beta)
        elif cfg.loss == "tdpo2":
            losses = tdpo2_losses(*sides, beta=cfg.beta, alpha=cfg.tdpo_alpha)
        else:
            if cfg.mask == "mapo":
                m = activation_mask(ref_hidden, batch.valid)
                reward_m = kl_m = m
                shared = True
            else:
                with autocast():
                    reward_m, kl_m = masks([h.detach() for h in ref_hidden])
                shared = getattr(masks, "module", masks).shared
            losses = sparsepo_losses(
                *sides, reward_masks=(reward_m[:n], reward_m[n:]), kl_masks=(kl_m[:n], kl_m[n:]), beta=cfg.beta,
                l1_reward=cfg.mask_l1 if cfg.mask == "learned" else 0.0,
                l1_kl=cfg.mask_l1 if cfg.mask == "learned" else 0.0, shared_mask=shared,
            )
            stats["mask_zero"] = torch.tensor([zero_fraction(reward_m.detach(), batch.valid)], device=device)
            stats["mask_mean"] = torch.tensor([mask_mean(reward_m.detach(), batch.valid)], device=device)
        logratio = ratio.sum(-1)
    else:
        logratio = logps - reference.logps[idx].T.reshape(-1).to(device)
        c = torch.as_tensor(confidence[idx], dtype=torch.float32, device=device) if confidence is not None else None
        losses = pair_losses(cfg.loss, logratio[:n], logratio[n:], beta=cfg.beta, epsilon=epsilon,
                             chosen_len=reply_len[:n], rejected_len=reply_len[n:], label_confidence=c)
    objective = weighted_mean(losses, w)
    if cfg.sft_alpha:
        objective = objective + cfg.sft_alpha * sft_loss(tok[:n], batch.valid[:n])
    stats.update(
        chosen_logratio=logratio[:n].detach(), rejected_logratio=logratio[n:].detach(),
        chosen_logps=logps[:n].detach(), rejected_logps=logps[n:].detach(),
    )
    return objective, stats


# ------------------------------------------------------------------ the loop
def train(data: Any, *, out: str | os.PathLike[str], model: Any = "smollm2-135m-instruct", resume: bool = False,
          force: bool = False, progress: bool = True, device: str = "auto", config: TrainConfig | None = None,
          **options: Any) -> TrainResult:
    """Train ``model`` on preference pairs; write checkpoints, metrics and a final model to ``out``.

    ``data``: a run or curated directory (``pairs.parquet``, with optional
    ``weight`` / ``label_confidence`` / ``flip_prob`` columns), a pair
    DataFrame, or anything :func:`curate.data.load_pairs` reads. ``model``: a
    name or path for :func:`curate.models.load_causal_lm`, or a ``LoadedModel``
    (trained in place). ``config`` or ``options``: the fields of :class:`TrainConfig`.
    A non-empty ``out`` is refused unless ``resume`` (continue the run it
    holds, from its last checkpoint: same data and settings, except the
    learning rate, whose change is recorded) or ``force`` (replace its
    training outputs). Returns the final directory, which
    ``AutoModelForCausalLM.from_pretrained`` loads.
    """
    from accelerate import Accelerator

    from curate.data.chat import ChatEncoder
    from curate.models import LoadedModel, load_causal_lm, resolve_device

    unknown = sorted(set(options) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise CurateError(f"unknown training option {unknown[0]!r}; the options are the fields of TrainConfig: "
                          f"{', '.join(TrainConfig.__dataclass_fields__)}")
    if resume and force:
        raise CurateError("--resume continues the run in --out and --force replaces it: pass one of them")
    cfg = dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
    cfg.validate()
    out = Path(out)
    accelerator = Accelerator(cpu=resolve_device(device).type == "cpu")
    main = accelerator.is_main_process
    world = accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise CurateError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                          f"({world} x {cfg.grad_accum})")
    micro = cfg.batch_size // (world * cfg.grad_accum)

    # -- data ---------------------------------------------------------------
    pairs, data_info = read_training_pairs(data, limit=cfg.limit)
    weights = column_values(pairs, cfg.weights, "weights")
    confidence = column_values(pairs, cfg.soft_labels, "soft-labels")
    epsilon = epsilon_from_pairs(pairs) if cfg.epsilon == "auto" else float(cfg.epsilon)

    # -- model and tokens ---------------------------------------------------
    torch.manual_seed(cfg.seed)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_causal_lm(str(model), device=accelerator.device, dtype="fp32")
    policy = loaded.model.to(accelerator.device)
    if next(policy.parameters()).dtype != torch.float32:
        policy.float()  # master weights in fp32; bf16 enters through autocast
    _disable_dropout(policy)
    encoder = ChatEncoder(loaded.tokenizer, system_prompt=cfg.system_prompt, max_length=cfg.max_length)
    encoding = encode_pairs(pairs, encoder)
    if not encoding.pairs:
        raise CurateError(f"every pair's reply is longer than --max-length {cfg.max_length}; raise it")
    kept = np.asarray(encoding.kept)
    weights = weights[kept] if weights is not None else None
    confidence = confidence[kept] if confidence is not None else None
    n = len(encoding.pairs)
    if n < cfg.batch_size:
        raise CurateError(f"only {n} pairs to train on, fewer than --batch-size {cfg.batch_size}; lower it")
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else encoder.eot_id
    steps_per_epoch = n // cfg.batch_size  # the last partial batch of an epoch is skipped
    total = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    bf16 = _use_bf16(cfg.bf16, accelerator.device)
    # One prompt pass shared by both replies, unless a loss needs full sequences (hidden states)
    # or gradient checkpointing rules out the KV cache; and the scoring run's layout when it chose
    # full sequences (a GPU's default), so its reference log-probs are the policy's own at step 0.
    shared_prompt = (cfg.loss in SEQUENCE_LOSSES and not cfg.gradient_checkpointing
                     and _scored_layout(data) is not False)
    make_batch = collate_shared if shared_prompt else collate

    def autocast():
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)

    pair_ids = [pairs["pair_id"][int(i)] for i in kept]
    fingerprint = _fingerprint(cfg, loaded.name, pair_ids, epsilon, total)
    checkpoint, lr_changes = _prepare_out(out, fingerprint, resume=resume, force=force, main=main)
    if resume and checkpoint is None and main:
        accelerator.print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
    accelerator.wait_for_everyone()  # every process has read out's state before the main one claims it
    if main:  # claim the directory: a later run with other settings is refused, even if this one is killed
        RunDir(out).write_section(TrainSection(status="started", fingerprint=fingerprint))
    accelerator.wait_for_everyone()

    # -- reference ----------------------------------------------------------
    t0 = time.perf_counter()
    reference = _Reference(lora=cfg.lora_r > 0)
    ref_path = out / "reference_logps.pt"
    reference_source = "reference model run alongside the policy"
    if cfg.loss in SEQUENCE_LOSSES:
        if checkpoint is not None and ref_path.exists():
            reference.logps, reference_source = torch.load(ref_path, weights_only=True), "saved by the resumed run"
        else:
            reference.logps, reference_source = _reused_reference(
                data, pairs[kept.tolist()], policy, encoding, loaded.info, cfg, make_batch, pad_id, autocast,
                accelerator, compute_dtype=BF16_MIXED if bf16 else "float32")
            if reference.logps is None:
                reference.logps = precompute_reference_logps(
                    policy, encoding.pairs, pad_id=pad_id, batch_size=micro, autocast=autocast,
                    accelerator=accelerator, order=epoch_order(n, cfg.seed, 0), make_batch=make_batch)
            if main:
                out.mkdir(parents=True, exist_ok=True)
                torch.save(reference.logps, ref_path)
    elif cfg.lora_r == 0:
        reference.model = copy.deepcopy(policy).eval().requires_grad_(False)
    precompute_s = time.perf_counter() - t0

    # -- trainable modules, optimizer ----------------------------------------
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                                                   lora_dropout=0.0, target_modules="all-linear"))
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_r > 0:
            policy.enable_input_require_grads()
    policy.config.use_cache = False
    policy.train()
    masks = None
    if cfg.loss == "sparsepo" and cfg.mask == "learned":
        config = policy.config
        masks = SparsePOMasks(config.num_hidden_layers, config.hidden_size, mode=cfg.mask_mode, init=cfg.mask_init,
                              init_std=getattr(config, "initializer_range", 0.02),
                              eps=getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", 1e-5))
        masks.to(accelerator.device).train()
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    if masks is not None:  # the mask network has its own group (own weight decay), as in SparsePO
        groups.append({"params": list(masks.parameters()), "weight_decay": cfg.mask_weight_decay})
    optimizer = OPTIMIZERS[cfg.optimizer](groups, lr=cfg.lr)

    start = 0
    if checkpoint is not None:
        ckpt.load_checkpoint(checkpoint, policy=policy, masks=masks, optimizer=optimizer)
        start = json.loads((checkpoint / "state.json").read_text())["step"]
    # the policy (raw) is what is saved; step_model is what runs and, under DDP, syncs gradients
    if masks is not None:
        step_model, masks = accelerator.prepare(PolicyForward(policy), masks)
    else:
        step_model = accelerator.prepare(PolicyForward(policy))

    # -- metrics file: keep what the resumed steps already wrote ------------
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        old = metrics_path.read_text().splitlines() if (checkpoint is not None and metrics_path.exists()) else []
        metrics_path.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= start))

    info: dict[str, Any] = {
        "config": asdict(cfg), "epsilon": epsilon,
        "epsilon_source": (EPSILON_AUTO_SOURCE if cfg.epsilon == "auto" else "set in the config"), "model": loaded.info, "data": data_info, "pairs": n,
        "left_out_reply_too_long": len(encoding.too_long), "left_out_pair_ids": encoding.too_long[:100],
        "prompt_truncated": encoding.truncated,
        "truncation_rule": "keep both replies whole; cut the shared prompt from the left until the longer reply fits",
        "processes": world, "micro_batch": micro, "shared_prompt_forward": shared_prompt,
        "steps": total, "steps_per_epoch": steps_per_epoch, "bf16_autocast": bf16,
        "reference": reference_source, "reference_precompute_s": round(precompute_s, 3),
        "resumed_from": str(checkpoint) if checkpoint else None, "lr_changes": lr_changes,
        "fingerprint": fingerprint,
    }
    probe_idx = np.arange(micro)
    probe = make_batch([encoding.pairs[i] for i in probe_idx], pad_id).to(accelerator.device)

    def divergence() -> str | None:
        """Why the current weights are no good checkpoint, or None: every weight, and a probe step's loss and
        gradient at them, must be finite (weights of 1e30 can still give a finite loss, not a finite gradient)."""
        bad = _non_finite_weight([policy] + ([masks] if masks is not None else []))
        if bad is not None:
            return f"{bad} holds non-finite values"
        objective, _ = _compute_micro_loss(step_model, policy, reference, masks, probe, probe_idx, cfg=cfg,
                                           epsilon=epsilon, weights=weights, confidence=confidence, autocast=autocast)
        accelerator.backward(objective)
        loss = float(objective.detach())
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        optimizer.zero_grad(set_to_none=True)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            largest = max(float(p.detach().abs().max()) for p in params) if params else float("nan")
            return f"a probe step gives loss {loss:.4g}, gradient norm {norm:.4g}; max |weight| {largest:.3g}"
        return None

    def stop_if_diverged(step: int) -> None:
        """A checkpoint (or the final model) is written only if every weight and a probe forward are finite."""
        why = divergence()
        if why is None:
            return
        stop_training(f"diverged at step {step}: {why}",
                      f"training diverged at step {step} ({why}), so no checkpoint was written for it; the last good",
                      "train again with a lower --lr")

    def stop_training(stopped: str, head: str, fresh_advice: str) -> None:
        """Record why training stopped in the manifest and raise, naming the last good checkpoint."""
        good = ckpt.latest_checkpoint(out / "checkpoints")
        info["stopped"] = stopped
        if main:
            RunDir(out).write_section(TrainSection.from_dict(info))
        raise CurateError(
            f"{head} checkpoint is {good or 'none (no checkpoint was written yet)'}; "
            + (f"continue from it with a lower learning rate: --resume --lr {cfg.lr / 10:.3g}" if good else
               fresh_advice)
        )

    # -- steps ----------------------------------------------------------------
    last: dict[str, Any] = {}
    live, task = progress_bar(f"train {cfg.loss}", total, completed=start, enabled=progress and main)
    with live:
        for step in range(start, total):
            t_step = time.perf_counter()
            epoch, within = divmod(step, steps_per_epoch)
            order = epoch_order(n, cfg.seed, epoch)
            step_idx = order[within * cfg.batch_size:(within + 1) * cfg.batch_size]
            objective_sum = 0.0
            stats: dict[str, list[torch.Tensor]] = {}
            for k in range(cfg.grad_accum):
                chunk = step_idx[k * world * micro:(k + 1) * world * micro]
                idx = chunk[accelerator.process_index * micro:(accelerator.process_index + 1) * micro]
                batch = make_batch([encoding.pairs[i] for i in idx], pad_id).to(accelerator.device)
                sync = k == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(step_model):
                    objective, micro_stats = _compute_micro_loss(
                        step_model, policy, reference, masks, batch, idx, cfg=cfg, epsilon=epsilon, weights=weights,
                        confidence=confidence, autocast=autocast)
                    accelerator.backward(objective / cfg.grad_accum)
                objective_sum += objective.detach().float() / cfg.grad_accum
                for key, value in micro_stats.items():
                    stats.setdefault(key, []).append(value)
            lr = cfg.lr * lr_factor(step, warmup=warmup, total=total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            loss_value = float(accelerator.reduce(torch.as_tensor(objective_sum, device=accelerator.device), "mean"))
            if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                stop_training(f"non-finite loss ({loss_value}) or gradient at step {step + 1}",
                              f"training stopped: the loss became {loss_value} (grad norm {float(grad_norm)}) at "
                              f"step {step + 1}; the last good", "train again with a lower --lr or --beta")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            last = _step_metrics(step + 1, epoch, loss_value, stats, accelerator, cfg, float(grad_norm), lr=lr,
                                 seconds=time.perf_counter() - t_step)
            if step == 0:
                info["step0_max_abs_logratio"] = last.pop("_max_abs_logratio")
            last.pop("_max_abs_logratio", None)
            if main:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
            if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == total):
                stop_if_diverged(step + 1)
                if main:
                    ckpt.save_checkpoint(out / "checkpoints", step + 1, policy=policy,
                                         masks=accelerator.unwrap_model(masks) if masks is not None else None,
                                         optimizer=optimizer, keep=cfg.keep_checkpoints,
                                         state={"fingerprint": fingerprint, "loss": loss_value,
                                                "lr_changes": lr_changes})
                accelerator.wait_for_everyone()
            live.update(task, advance=1,
                        description=f"train {cfg.loss} loss {loss_value:.4f} acc {last['reward_accuracy']:.2f}")

    final_dir = out / "final"
    if start < total and not cfg.save_every:
        stop_if_diverged(total)  # with checkpoints on, the last step's was checked already
    if main:
        info["status"] = "finished"
        _save_final(policy, loaded.tokenizer, final_dir,
                    accelerator.unwrap_model(masks) if masks is not None else None)
        info["final_loss"] = last.get("loss")
        RunDir(out).write_section(TrainSection.from_dict(info))
    accelerator.wait_for_everyone()
    return TrainResult(out, final_dir, total, float(last.get("loss", float("nan"))), last, info)


def _step_metrics(step: int, epoch: int, loss: float, stats: dict[str, list[torch.Tensor]], accelerator,
                  cfg: TrainConfig, grad_norm: float, *, lr: float, seconds: float) -> dict[str, Any]:
    gathered = {k: accelerator.gather(torch.cat(v)).float() for k, v in stats.items()}
    margin = cfg.beta * (gathered["chosen_logratio"] - gathered["rejected_logratio"])
    metrics = {
        "step": step, "epoch": epoch, "loss": loss,
        "reward_accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "chosen_reward": float(cfg.beta * gathered["chosen_logratio"].mean()),
        "rejected_reward": float(cfg.beta * gathered["rejected_logratio"].mean()),
        "chosen_logps": float(gathered["chosen_logps"].mean()),
        "rejected_logps": float(gathered["rejected_logps"].mean()),
        "lr": lr, "grad_norm": grad_norm, "pairs_per_s": cfg.batch_size / max(seconds, 1e-9),
        "_max_abs_logratio": float(torch.cat([gathered["chosen_logratio"], gathered["rejected_logratio"]]).abs().max()),
    }
    if "mask_zero" in gathered:
        metrics["mask_sparsity"] = float(gathered["mask_zero"].mean())
        metrics["mask_mean"] = float(gathered["mask_mean"].mean())
    return metrics


def _save_final(policy, tokenizer, final_dir: Path, masks) -> None:
    """A directory ``AutoModelForCausalLM.from_pretrained`` loads (LoRA merged into the weights)."""
    import tempfile

    from safetensors.torch import save_file

    if hasattr(policy, "merge_and_unload"):
        policy = copy.deepcopy(policy).merge_and_unload()
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=".final."))
    try:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if masks is not None:
            save_file(ckpt.trainable_state(masks), str(tmp / "sparsepo_masks.safetensors"))
        remove_inside(final_dir, final_dir.parent)
        os.replace(tmp, final_dir)
    except BaseException:
        remove_inside(tmp, final_dir.parent)
        raise
