"""Process setup shared by every entry point: the CLI, `curate run`, and notebooks (``curate.env.configure()``).

Call it before torch is imported where possible: oneDNN reads its cache
setting when it first runs a kernel.
"""

from __future__ import annotations

import os
import sys
import warnings

# oneDNN keeps a compiled kernel per matmul shape (1,024 by default), and batches of ever new
# shapes made that cache the part of CPU scoring whose memory grew with the dataset (+300 MiB
# from 100 to 600 HH pairs); with 8 entries it stayed flat, at no measured speed cost
# (benchmarks/bench_ches.py --memory-only).
ENVIRONMENT = {
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8",
    # curate draws its own progress (on stderr); library bars would interleave with it
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
QUIET_MODULES = r"(transformers|torch|accelerate|peft|datasets|huggingface_hub|sae_lens|sentence_transformers)(\.|$)"


def configure() -> None:
    """Set the environment defaults above (a value the user exported wins) and hide library deprecation warnings."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_MODULES)
    if "transformers" in sys.modules:  # imported already: the environment variable came too late
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def progress_bar(label: str, total: int, *, completed: int = 0, enabled: bool = True, rate: bool = False):
    """curate's own progress bar and its task, on stderr (stdout is for results such as --json).

    Off when ``enabled`` is False or under ``CURATE_QUIET=1`` (``--quiet``, ``--json``); ``rate``
    adds a pairs/s column fed by ``progress.update(task, rate=...)``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rate_column = [TextColumn("{task.fields[rate]} pairs/s")] if rate else []
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *rate_column,
                        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                        disable=not enabled or os.environ.get("CURATE_QUIET") == "1")
    return progress, progress.add_task(label, total=total, completed=completed, **({"rate": "-"} if rate else {}))
