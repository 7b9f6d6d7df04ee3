"""The settings of a training run: one dataclass, the source of `curate train`'s options and a recipe's train keys.

Importable without torch, so the CLI builds its options fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.config import check_finite, flag, setting
from curate.errors import CurateError


def _parse_epsilon(text: str) -> float | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise CurateError(f"--epsilon must be a number in [0, 0.5) or 'auto', got {text!r}") from None


def _parse_bf16(text: str) -> bool | str:
    value = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}.get(text.strip().lower())
    if value is None:
        raise CurateError(f"--bf16 must be auto, on or off, got {text!r}")
    return value


MASK_INITS = ("unit", "torch", "reference")  # curate.train.masks builds each
OPTIMIZERS = ("adamw", "rmsprop")  # curate.train.loop maps them to torch.optim

# settings a --resume may change (recorded in the manifest with the step); every other one must match
RESUMABLE_CHANGES = ("lr",)


@dataclass
class TrainConfig:
    """Every setting of a training run: the options of `curate train` and the keys of a recipe's train section."""

    loss: str = setting("dpo", "Loss: dpo | ipo | cdpo | rdpo | hinge | tdpo1 | tdpo2 | sparsepo (curate.train.LOSSES).")
    beta: float = setting(0.1, "KL strength beta.")
    epsilon: float | str = setting(0.0, "Flip rate for cdpo/rdpo, or 'auto' (mean flip_prob of the kept pairs).",
                                   parse=_parse_epsilon)
    sft_alpha: float = setting(0.0, "Add alpha x token-mean NLL of the chosen replies (RPO).")
    weights: str | None = setting(None, "Per-pair weight column, e.g. 'weight' from `curate filter --weights`.")
    soft_labels: str | None = setting(None, "Per-pair label-confidence column (dpo only), e.g. 'label_confidence'.")
    tdpo_alpha: float = setting(0.5, "TDPO2's alpha.")
    mask: str = setting("learned", "SparsePO masks: learned (mask network) or mapo (reference activations).")
    mask_mode: str = setting("common", "Learned masks: common (one network for reward and KL) or independent.")
    mask_l1: float = setting(0.0, "L1 penalty on learned masks (0.001 on HH in the paper).")
    mask_weight_decay: float = setting(0.01, "AdamW weight decay of the SparsePO mask network (its own group).")
    mask_init: str = setting("unit", "Learned masks' start: unit (near 1, few zeros) | torch (curate's old) | "
                                     "reference (the SparsePO code's).")
    optimizer: str = setting("adamw", "adamw | rmsprop (the CHES paper's), torch defaults otherwise.")
    lr: float = setting(1e-6, "Peak learning rate (AdamW, linear warmup then cosine); --resume may change it.")
    weight_decay: float = setting(0.0, "AdamW weight decay of the policy's trainable weights.")
    batch_size: int = setting(8, "Pairs per optimizer step, over all processes.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    epochs: int = setting(1, "Passes over the data.")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps (overrides --epochs).")
    warmup_ratio: float = setting(0.1, "Fraction of steps of linear warmup.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = off).")
    max_length: int = setting(1024, "Max tokens per sequence; longer prompts are cut from the left.")
    system_prompt: str = setting("default", "'default' (the template's own), 'none', or a text.")
    bf16: bool | str = setting("auto", "bf16 autocast: auto | on | off.", parse=_parse_bf16)
    lora_r: int = setting(0, "Train a LoRA adapter of this rank instead of all weights (0 = full).")
    lora_alpha: float | None = setting(None, "LoRA alpha (default: 2 x --lora-r).")
    gradient_checkpointing: bool = setting(False, "Trade compute for memory.")
    save_every: int = setting(50, "Checkpoint every N steps and at the end (0 = no checkpoints).")
    keep_checkpoints: int = setting(2, "How many of the newest checkpoints to keep.")
    seed: int = setting(0, "Seed for data order and mask initialisation.")
    limit: int | None = setting(None, "Train on the first N pairs only.")

    def validate(self, key=flag) -> None:
        """Refuse bad values with one sentence naming ``key(field)`` (a CLI flag, or a recipe key)."""
        from curate.train.losses import LOSSES

        check_finite(self, key)
        if self.loss not in LOSSES:
            raise CurateError(f"unknown {key('loss')} {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.epsilon != "auto" and not isinstance(self.epsilon, (int, float)):
            raise CurateError(f"{key('epsilon')} must be a number in [0, 0.5) or 'auto', got {self.epsilon!r}")
        if self.bf16 not in ("auto", True, False):
            raise CurateError(f"{key('bf16')} must be auto, true or false, got {self.bf16!r}")
        positive = ("beta", "lr", "batch_size", "grad_accum", "epochs", "max_length", "keep_checkpoints",
                    "max_steps", "limit", "lora_alpha")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CurateError(f"{key(name)} must be > 0, got {value}")
        for name in ("sft_alpha", "mask_l1", "mask_weight_decay", "weight_decay", "max_grad_norm", "save_every",
                     "lora_r"):
            if getattr(self, name) < 0:
                raise CurateError(f"{key(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise CurateError(f"{key('warmup_ratio')} must be in [0, 1], got {self.warmup_ratio}")
        if self.soft_labels and self.loss != "dpo":
            raise CurateError(f"{key('soft_labels')} replaces the label with a confidence and goes with "
                              f"{key('loss')} dpo only")
        if self.epsilon != "auto" and not (0 <= float(self.epsilon) < 0.5):
            raise CurateError(f"{key('epsilon')} must be in [0, 0.5) or 'auto', got {self.epsilon}")
        if self.epsilon != 0 and self.loss not in ("cdpo", "rdpo"):
            raise CurateError(f"{key('epsilon')} (a flip rate) is used by {key('loss')} cdpo and rdpo only")
        if self.mask not in ("learned", "mapo"):
            raise CurateError(f"{key('mask')} must be learned or mapo, got {self.mask!r}")
        if self.mask_init not in MASK_INITS:
            raise CurateError(f"{key('mask_init')} must be one of {', '.join(MASK_INITS)}, got {self.mask_init!r}")
        if self.optimizer not in OPTIMIZERS:
            raise CurateError(f"{key('optimizer')} must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.mask_mode not in ("common", "independent"):
            raise CurateError(f"{key('mask_mode')} must be common or independent, got {self.mask_mode!r}")
