"""Loading, validating and formatting preference pairs."""

from curate.data.load import LoadResult, load_pairs
from curate.data.schema import GROUP_COLUMN, PAIR_SCHEMA, make_pair_id, make_prompt_id, pairs_frame

__all__ = ["LoadResult", "load_pairs", "GROUP_COLUMN", "PAIR_SCHEMA", "make_pair_id", "make_prompt_id", "pairs_frame"]
