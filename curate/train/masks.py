"""SparsePO token masks, from the frozen reference model's hidden states (methods.md §6).

Both kinds read ``hidden``: one ``[N, R, d]`` tensor per layer, the reference
model's hidden state at each position that predicts a reply token, and return
``[N, R]`` non-negative weights (arbitrary values on padding: the losses
ignore positions outside ``valid``).

- :class:`LearnedMask` ("sparse"): m_t = ReLU(Σ_l a_l · ReLU(w_lᵀ LN(h_t^l) + b_l)),
  one shared LayerNorm, one Linear(d→1) per layer, a Linear(L→1, no bias) mixer;
  not clamped; exact zeros from the ReLUs are the sparsity. Trained with the policy.
  Its starting point is ``init`` (see :data:`MASK_INITS`).
- :func:`activation_mask` ("mapo"): per layer, the mean of the hidden state
  over its dimension, min-max rescaled to [0, 1] over the sequence's reply
  tokens, averaged over layers; detached. The reference code z-normalises
  before the min-max step; that is an increasing affine map, so min-max of it
  is the same, and we skip it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


from curate.train.config import MASK_INITS  # noqa: E402  (one list, importable without torch)
"""How a learned mask starts.

- ``unit`` (default): every per-layer unit starts at 1 + noise (bias 1, weights
  N(0, (0.5/√d)²), so the noise has std ~0.5 at any width: LN(h) has unit RMS),
  and the mixer averages the layers (weights 1/L). The mask starts near 1 with
  almost no exact zeros: SparsePO starts close to TDPO1 and the masks learn
  where to be sparse.
- ``torch``: PyTorch's default ``nn.Linear`` init (uniform in ±1/√fan_in,
  biases too); curate's mask init before ``unit``. On SmolLM2-135M's states
  this mask starts at a mean far below 1 with many exact zeros (see
  docs/results.md, "SparsePO masks").
- ``reference``: the start of the SparsePO authors' code (huawei-noah/HEBO,
  ``SparsePO/src/masks/mask_models.py``): their mask modules sit inside a
  transformers ``PreTrainedModel`` loaded with ``from_pretrained``, whose
  ``_init_weights`` sets every Linear to N(0, initializer_range²) with zero
  bias (``init_std``, 0.02 for Pythia and SmolLM2).
"""


class LearnedMask(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, *, eps: float = 1e-5, dropout: float = 0.0,
                 init: str = "unit", init_std: float = 0.02):
        super().__init__()
        if init not in MASK_INITS:
            raise ValueError(f"mask init must be one of {', '.join(MASK_INITS)}, got {init!r}")
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.per_layer = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self._init(init, init_std)

    @torch.no_grad()
    def _init(self, init: str, init_std: float) -> None:
        if init == "torch":  # the modules' own defaults, already drawn
            return
        hidden_size, num_layers = self.norm.normalized_shape[0], len(self.per_layer)
        for linear in self.per_layer:
            if init == "unit":
                linear.weight.normal_(0.0, 0.5 / hidden_size ** 0.5)
                linear.bias.fill_(1.0)
            else:
                linear.weight.normal_(0.0, init_std)
                linear.bias.zero_()
        if init == "unit":
            self.mixer.weight.fill_(1.0 / num_layers)
        else:
            self.mixer.weight.normal_(0.0, init_std)

    def forward(self, hidden: list[Tensor]) -> Tensor:
        if len(hidden) != len(self.per_layer):
            raise ValueError(f"mask network has {len(self.per_layer)} layers, got {len(hidden)} hidden states")
        per_layer = [torch.relu(linear(self.norm(h.float()))) for linear, h in zip(self.per_layer, hidden)]
        mixed = self.mixer(self.dropout(torch.cat(per_layer, dim=-1)))
        return torch.relu(mixed).squeeze(-1)


class SparsePOMasks(nn.Module):
    """Reward and KL masks: one shared network ("common") or two ("independent")."""

    def __init__(self, num_layers: int, hidden_size: int, *, mode: str = "common", eps: float = 1e-5,
                 dropout: float = 0.0, init: str = "unit", init_std: float = 0.02):
        super().__init__()
        if mode not in ("common", "independent"):
            raise ValueError(f"mask mode must be 'common' or 'independent', got {mode!r}")
        self.mode = mode
        kwargs = dict(eps=eps, dropout=dropout, init=init, init_std=init_std)
        self.reward = LearnedMask(num_layers, hidden_size, **kwargs)
        self.kl = LearnedMask(num_layers, hidden_size, **kwargs) if mode == "independent" else None

    @property
    def shared(self) -> bool:
        return self.kl is None

    def forward(self, hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
        reward = self.reward(hidden)
        return reward, (reward if self.kl is None else self.kl(hidden))


def activation_mask(hidden: list[Tensor], valid: Tensor) -> Tensor:
    """MAPO mask in [0, 1] from reference activations; a row whose values are all equal
    (e.g. a one-token reply) gets weight 1 everywhere instead of 0/0.
    """
    on = valid > 0
    layers = []
    for h in hidden:
        value = h.detach().float().mean(-1)  # [N, R]
        lo = torch.where(on, value, torch.full_like(value, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(on, value, torch.full_like(value, float("-inf"))).amax(-1, keepdim=True)
        span = hi - lo
        flat = ~(span > 0)
        scaled = (value - lo) / torch.where(flat, torch.ones_like(span), span)
        layers.append(torch.where(flat, torch.ones_like(scaled), scaled))
    mask = torch.stack(layers).mean(0)
    return torch.where(on, mask, torch.zeros_like(mask))


def zero_fraction(mask: Tensor, valid: Tensor) -> float:
    """Fraction of reply tokens whose mask weight is exactly zero (the logged sparsity)."""
    on = valid > 0
    return float(((mask == 0) & on).sum() / on.sum().clamp(min=1))


def mask_mean(mask: Tensor, valid: Tensor) -> float:
    """Mean mask weight over reply tokens (1 for an all-ones mask, i.e. TDPO1's weighting)."""
    on = valid > 0
    return float((mask * on).sum() / on.sum().clamp(min=1))
