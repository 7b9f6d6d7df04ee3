"""A signed Matryoshka top-k sparse autoencoder on in-memory vectors, trained with sae-lens.

WIMHF (Movva et al. 2025) encodes each preference pair's embedding difference
e(A) - e(B) with a sparse autoencoder whose activations keep their sign: a
positive activation means reply A has more of the feature, a negative one
that reply B has. sae-lens's TopK and BatchTopK SAEs apply a ReLU, so this
module builds on its ``AbsTopKTrainingSAE`` (per-example top-k by magnitude,
sign kept) and adds WIMHF's Matryoshka loss: every prefix of the dictionary
(e.g. the first 8 features, then all 32) must reconstruct the input on its
own, which pushes the most common directions into the first features.

Training drives sae-lens's ``SAETrainer`` one step at a time over epochs of
shuffled batches (its ``fit`` has no notion of epochs or early stopping) and
keeps the weights with the lowest validation reconstruction loss. The result
is saved as a plain sae-lens ``abstopk`` inference SAE, loadable with
``sae_lens.SAE.load_from_disk(path)`` (the Matryoshka prefixes only shape
training; inference is per-example AbsTopK, never batch-level top-k).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.abstopk_sae import AbsTopKSAE, AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import act_times_W_dec
from sae_lens.training.sae_trainer import SAETrainer


@dataclass
class MatryoshkaAbsTopKTrainingSAEConfig(AbsTopKTrainingSAEConfig):
    """AbsTopK training config plus the Matryoshka prefix widths (the last equals ``d_sae``)."""

    matryoshka_widths: list[int] = field(default_factory=list)


class MatryoshkaAbsTopKTrainingSAE(AbsTopKTrainingSAE):
    """sae-lens AbsTopK SAE whose loss adds one reconstruction term per inner Matryoshka prefix."""

    cfg: MatryoshkaAbsTopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MatryoshkaAbsTopKTrainingSAEConfig, use_error_term: bool = False):
        widths = list(cfg.matryoshka_widths) or [cfg.d_sae]
        if widths[-1] != cfg.d_sae or any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1:
            raise ValueError(f"matryoshka_widths must increase and end at d_sae={cfg.d_sae}, got {widths}")
        cfg.matryoshka_widths = widths
        super().__init__(cfg, use_error_term)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        # The outermost prefix is the whole SAE, whose loss the base class already has.
        for width in self.cfg.matryoshka_widths[:-1]:
            inner = (
                act_times_W_dec(
                    output.feature_acts[:, :width], self.W_dec[:width], self.cfg.rescale_acts_by_decoder_norm
                )
                + self.b_dec
            )
            inner_mse = self.mse_loss_fn(inner, step_input.sae_in).sum(dim=-1).mean()
            output.losses[f"inner_mse_loss_{width}"] = inner_mse
            output.loss = output.loss + inner_mse
        return output


@dataclass
class SAETrainingResult:
    sae: AbsTopKSAE
    history: dict[str, list[float]]
    best_epoch: int
    epochs_run: int


def matryoshka_widths(n_features: int, prefixes: Sequence[int] | None) -> list[int]:
    """Prefix widths clipped to the dictionary size, always ending at ``n_features``."""
    widths = sorted({int(p) for p in (prefixes or []) if 0 < int(p) < n_features})
    return widths + [n_features]


def train_signed_sae(train: np.ndarray, val: np.ndarray | None = None, *, n_features: int = 32, k: int = 4,
                     prefixes: Sequence[int] | None = (8, 32), batch_size: int = 256, lr: float = 5e-4,
                     max_epochs: int = 50, min_epochs: int = 10, patience: int = 3, dead_feature_window: int = 64,
                     seed: int = 0, device: str = "cpu") -> SAETrainingResult:
    """Train a signed Matryoshka AbsTopK SAE on the rows of ``train`` [n, d].

    Each epoch visits every row once in a seeded random order. With ``val``,
    training stops once the validation reconstruction loss has not improved for
    ``patience`` epochs (after ``min_epochs``) and the best weights are kept;
    without it, it runs ``max_epochs``. Returns the inference SAE (per-example
    AbsTopK), the per-epoch loss history and the epoch whose weights were kept.
    """
    threads = torch.get_num_threads()
    # Matrices this small run fastest on one thread; many threads mostly contend.
    torch.set_num_threads(1)
    try:
        return _train(train, val, n_features=n_features, k=k, prefixes=prefixes, batch_size=batch_size, lr=lr,
                      max_epochs=max_epochs, min_epochs=min_epochs, patience=patience,
                      dead_feature_window=dead_feature_window, seed=seed, device=device)
    finally:
        torch.set_num_threads(threads)


def _train(train, val, *, n_features, k, prefixes, batch_size, lr, max_epochs, min_epochs, patience,
           dead_feature_window, seed, device) -> SAETrainingResult:
    train_t = torch.as_tensor(np.asarray(train, dtype=np.float32))
    val_t = None if val is None or len(val) == 0 else torch.as_tensor(np.asarray(val, dtype=np.float32))
    n, d_in = train_t.shape
    batch_size = min(batch_size, n)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    cfg = MatryoshkaAbsTopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=n_features,
        k=k,
        matryoshka_widths=matryoshka_widths(n_features, prefixes),
        rescale_acts_by_decoder_norm=True,
        # WIMHF's initialisation: unit-norm decoder rows, encoder = decoder transpose.
        decoder_init_norm=1.0,
        device=device,
    )
    sae = MatryoshkaAbsTopKTrainingSAE(cfg)
    with torch.no_grad():
        # WIMHF's initialisation: the decoder bias starts at the data's median.
        sae.b_dec.copy_(train_t.median(dim=0).values.to(sae.b_dec.device))
    steps_per_epoch = math.ceil(n / batch_size)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(total_training_samples=steps_per_epoch * batch_size * max_epochs,
                             train_batch_size_samples=batch_size, lr=lr, lr_end=lr, device=device,
                             dead_feature_window=dead_feature_window, feature_sampling_window=10**9,
                             logger=LoggingConfig(log_to_wandb=False)),
        sae=sae, data_provider=iter(()),
    )

    history: dict[str, list[float]] = {"train_loss": [], "val_mse": []}
    best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n, batch_size):
            output = trainer.step(train_t[order[start : start + batch_size]])
            trainer.n_training_steps += 1
            losses.append(float(output.loss.detach()))
        history["train_loss"].append(float(np.mean(losses)))
        monitor = val_t if val_t is not None else train_t
        loss = reconstruction_mse(sae, monitor)
        history["val_mse"].append(loss)
        if loss < best_loss - 1e-7:
            best_loss, best_epoch, stale = loss, epoch, 0
            best_state = copy.deepcopy(sae.state_dict())
        else:
            stale += 1
            if val_t is not None and stale >= patience and epoch >= min_epochs:
                break
    if best_state is not None:
        sae.load_state_dict(best_state)
    return SAETrainingResult(sae=to_inference(sae), history=history, best_epoch=best_epoch, epochs_run=epoch)


@torch.no_grad()
def reconstruction_mse(sae: SAE[Any], x: torch.Tensor) -> float:
    """Mean over rows of the summed squared reconstruction error (sae-lens's mse_loss)."""
    was_training = sae.training
    sae.eval()
    x = x.to(sae.device)
    error = (sae.decode(sae.encode(x)) - x).pow(2).sum(dim=-1).mean()
    sae.train(was_training)
    return float(error)


def to_inference(sae: MatryoshkaAbsTopKTrainingSAE) -> AbsTopKSAE:
    """The sae-lens inference SAE (architecture ``abstopk``) with the same per-example encoding."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    cfg_dict = sae.cfg.get_inference_sae_cfg_dict()
    inference = SAE.from_dict(cfg_dict)
    inference.load_state_dict(state)
    inference.eval()
    return inference  # type: ignore[return-value]


@torch.no_grad()
def encode(sae: SAE[Any], x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Signed per-example feature activations [n, d_sae] (float32) of the rows of ``x``."""
    sae.eval()
    x = np.asarray(x, dtype=np.float32)
    out = np.zeros((len(x), sae.cfg.d_sae), dtype=np.float32)
    for start in range(0, len(x), batch_size):
        batch = torch.as_tensor(x[start : start + batch_size]).to(sae.device)
        out[start : start + batch_size] = sae.encode(batch).float().cpu().numpy()
    return out


def save_sae(sae: SAE[Any], path: str | Path) -> Path:
    """Write sae-lens's ``cfg.json`` + ``sae_weights.safetensors`` into the directory ``path``.

    Written into a sibling temporary directory first and swapped in, so a
    killed run never leaves a half-written SAE behind.
    """
    import tempfile

    from curate.fsutil import remove_inside

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        sae.save_model(tmp)
        remove_inside(path, path.parent)
        tmp.rename(path)
    except BaseException:
        remove_inside(tmp, path.parent)
        raise
    return path


def load_sae(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """Load an SAE saved by :func:`save_sae` (plain ``sae_lens.SAE.load_from_disk``)."""
    sae = SAE.load_from_disk(str(path), device=device)
    sae.eval()
    return sae
