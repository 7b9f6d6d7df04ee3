"""Experiments, step 1 of 2 (CPU, a few minutes): the pairs and their sentence embeddings.

Writes into ``--out`` (default ``runs/exp``):

- ``hh_pairs.parquet``: the shared HH-RLHF harmless sample (1,800 rows) loaded
  into the pair schema (quarantined rows left out, their count printed);
- ``minilm.npz``: all-MiniLM-L6-v2 embeddings of every chosen and rejected
  reply (``pair_id``, ``chosen``, ``rejected``), the first feature set of the
  reward ensemble that step 2 fits (the bundled MiniLM weights are not carried
  to the GPU machine, so they are embedded here).

Step 2 (``exp_curation.py``, a GPU) reads these.

    .venv/bin/python benchmarks/exp_prepare.py --out runs/exp
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HH_SAMPLE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"


def main() -> None:
    from curate.data import load_pairs
    from curate.embeddings import embed_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HH_SAMPLE))
    parser.add_argument("--out", default=str(REPO / "runs" / "exp"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_pairs(args.data)
    pairs = loaded.pairs
    print(f"{pairs.height} pairs, {loaded.quarantine.height} quarantined")
    pairs.write_parquet(out / "hh_pairs.parquet")

    chosen = embed_texts(pairs["chosen"].to_list(), show_progress=False)
    rejected = embed_texts(pairs["rejected"].to_list(), show_progress=False)
    np.savez(out / "minilm.npz", pair_id=np.array(pairs["pair_id"].to_list()), chosen=chosen, rejected=rejected)
    print(f"embedded {2 * pairs.height} replies: {chosen.shape[1]}-d")


if __name__ == "__main__":
    main()
