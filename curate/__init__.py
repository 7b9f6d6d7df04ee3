"""curate: curate and analyse LLM preference data, and train on the result."""

from curate.errors import CurateError

__version__ = "0.1.0"

__all__ = ["CurateError", "__version__"]
