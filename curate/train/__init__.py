"""The built-in DPO / SparsePO trainer: pure losses, masks, batching and the loop."""

from curate.train.loop import TrainConfig, TrainResult, train
from curate.train.losses import LOSSES, pair_losses

__all__ = ["LOSSES", "TrainConfig", "TrainResult", "pair_losses", "train"]
