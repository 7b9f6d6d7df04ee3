"""curate: curate and analyse LLM preference data, and train on the result.

Everything the CLI does is a plain function here (imported lazily, so
``import curate`` stays fast)::

    from curate import load_pairs, compute_features, filter_run, export_curated
    from curate import evaluate, write_report, run_pipeline
    from curate.score import score      # (``curate.score`` and ``curate.train`` are
    from curate.train import train      #  modules, so these two come from them)
"""

from __future__ import annotations

import importlib

from curate.errors import CurateError

__version__ = "0.1.0"

_EXPORTS = {
    "load_pairs": "curate.data",
    "RunDir": "curate.rundir",
    "load_causal_lm": "curate.models",
    "score_reward_and_noise": "curate.scores.reward",
    "compute_features": "curate.features",
    "run_features": "curate.features",
    "filter_run": "curate.curation",
    "curate_pairs": "curate.curation",
    "export_curated": "curate.export",
    "pair_losses": "curate.train",
    "evaluate": "curate.eval",
    "write_report": "curate.report",
    "run_pipeline": "curate.pipeline",
}

__all__ = ["CurateError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'curate' has no attribute {name!r}")
