"""The built-in DPO / SparsePO trainer: pure losses, masks, batching and the loop.

Exports are imported lazily, so ``curate.train.config`` (the settings) loads without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "curate.train.config",
    "TrainResult": "curate.train.loop",
    "train": "curate.train.loop",
    "LOSSES": "curate.train.losses",
    "pair_losses": "curate.train.losses",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'curate.train' has no attribute {name!r}")
