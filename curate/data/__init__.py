"""Loading, validating and formatting preference pairs."""

from curate.data.load import LoadResult, load_pairs
from curate.data.schema import PAIR_SCHEMA, make_pair_id, pairs_frame

__all__ = ["LoadResult", "load_pairs", "PAIR_SCHEMA", "make_pair_id", "pairs_frame"]
