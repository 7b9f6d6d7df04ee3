"""curate: curate and analyse LLM preference data, and train on the result.

Everything the CLI does is a plain function here (imported lazily, so
``import curate`` stays fast)::

    from curate import load_pairs, score, filter_pairs, export
    from curate import compute_features, filter_run, export_curated, evaluate, write_report, run_pipeline
    from curate.train import train      # (``curate.train`` is a package)

``curate.score`` and ``curate.export`` are modules that can be called like
their main function (``score(...)`` is ``curate.score.score(...)``,
``export(...)`` is ``curate.export.export_curated(...)``), so both
``from curate import score`` and ``from curate.score import score`` work;
``score_pairs`` / ``export_pairs`` name the plain functions.
"""

from __future__ import annotations

import importlib
import sys
import types

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
    "filter_pairs": ("curate.curation", "filter_run"),
    "score_pairs": ("curate.score", "score"),
    "export_pairs": ("curate.export", "export_curated"),
    "curate_pairs": "curate.curation",
    "export_curated": "curate.export",
    "pair_losses": "curate.train",
    "evaluate": "curate.eval",
    "write_report": "curate.report",
    "run_pipeline": "curate.pipeline",
}

__all__ = ["CurateError", "__version__", *_EXPORTS]


__all__ += ["score", "export"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(module), attribute)
    if name in ("score", "export"):
        return importlib.import_module(f"curate.{name}")
    raise AttributeError(f"module 'curate' has no attribute {name!r}")


def callable_module(module_name: str, function_name: str) -> None:
    """Make module ``module_name`` callable as its function ``function_name`` (``curate.score(...)``)."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
