"""Generate the curate demo preference set: ``data/demo/pairs.jsonl``.

Every reply was hand-written for this project (see ``data/demo_items/``); this
script only turns those items into pairs, plants label flips with a fixed seed,
shuffles, and writes one JSON object per line:

    {"prompt": [{"role": "user", "content": ...}, ...],
     "chosen": "...", "rejected": "...",
     "meta": {"category": ..., "contrast": ..., "template": ...,
              "planted_flip": false}}

For a pair with ``planted_flip: true`` the stored ``chosen`` is the *worse*
reply. The output is deterministic: the same seed gives the same bytes.

Usage:
    python data/make_demo.py                      # writes data/demo/pairs.jsonl
    python data/make_demo.py --out /tmp/pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from demo_items.advice_near_duplicates import ADVICE_NEAR_DUPLICATES  # noqa: E402
from demo_items.facts import FACTS  # noqa: E402
from demo_items.helpful import HELPFUL  # noqa: E402
from demo_items.off_topic import OFF_TOPIC  # noqa: E402
from demo_items.refusals import REFUSALS  # noqa: E402

DEFAULT_OUT = HERE / "demo" / "pairs.jsonl"
SEED = 20260522
FLIP_FRACTION = 0.10


def messages(prompt) -> list[dict[str, str]]:
    """A prompt item as chat messages: a plain string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": role, "content": content} for role, content in prompt]


def pair(prompt, better: str, worse: str, category: str, contrast: str, template: str) -> dict:
    return {
        "prompt": messages(prompt),
        "better": better,
        "worse": worse,
        "meta": {"category": category, "contrast": contrast, "template": template},
    }


def substitute_once(text: str, old: str, new: str) -> str:
    """Replace the single occurrence of ``old``; refuse ambiguous or missing edits."""
    if text.count(old) != 1:
        raise ValueError(f"expected exactly one {old!r} in {text!r}")
    return text.replace(old, new)


def good_bad_pairs(items, category: str, contrast: str, family: str) -> list[dict]:
    """Pairs from items with k good and k bad replies: every good against every bad.

    With k = 2 that is four pairs per prompt, each reply in two of them (like a
    dataset with several sampled responses per prompt).
    """
    pairs = []
    for item_id, prompt, goods, bads in items:
        if len(goods) != len(bads):
            raise ValueError(f"{item_id}: needs as many good as bad replies")
        for good in goods:
            for bad in bads:
                pairs.append(pair(prompt, good, bad, category, contrast, f"{family}/{item_id}"))
    return pairs


def build_pairs() -> list[dict]:
    """All pairs, unflipped and in source order (better reply as ``better``)."""
    pairs = []
    for item_id, prompt, correct, wrong, swap in FACTS:
        template = f"facts/{item_id}"
        pairs.append(pair(prompt, correct, wrong, "correct_vs_wrong", "correct_vs_confident_wrong_answer", template))
        if swap is not None:
            near = substitute_once(correct, *swap)
            pairs.append(pair(prompt, correct, near, "near_duplicate", "one_fact_changed", template))
    for item_id, prompt, good, swap in ADVICE_NEAR_DUPLICATES:
        near = substitute_once(good, *swap)
        pairs.append(pair(prompt, good, near, "near_duplicate", "safe_advice_made_unsafe", f"advice/{item_id}"))
    pairs += good_bad_pairs(HELPFUL, "helpful_vs_evasive", "concrete_help_vs_evasion", "helpful")
    pairs += good_bad_pairs(REFUSALS, "refusal_vs_harmful", "refusal_vs_useless_compliance", "refusals")
    pairs += good_bad_pairs(OFF_TOPIC, "on_vs_off_topic", "answer_vs_tangent", "off_topic")
    return pairs


def plant_flips(pairs: list[dict], rng: random.Random, fraction: float) -> list[bool]:
    """Choose round(fraction * n) pairs to flip within each category."""
    flips = [False] * len(pairs)
    categories = sorted({p["meta"]["category"] for p in pairs})
    for category in categories:
        indices = [i for i, p in enumerate(pairs) if p["meta"]["category"] == category]
        for i in rng.sample(indices, round(fraction * len(indices))):
            flips[i] = True
    return flips


def demo_rows(seed: int = SEED, flip_fraction: float = FLIP_FRACTION) -> list[dict]:
    """The demo set as JSON-ready rows, flips planted and order shuffled."""
    rng = random.Random(seed)
    pairs = build_pairs()
    flips = plant_flips(pairs, rng, flip_fraction)
    rows = []
    for p, flipped in zip(pairs, flips):
        chosen, rejected = (p["worse"], p["better"]) if flipped else (p["better"], p["worse"])
        meta = {**p["meta"], "planted_flip": flipped}
        rows.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "meta": meta})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    out.write_bytes(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl path")
    parser.add_argument("--seed", type=int, default=SEED, help="seed for flips and order")
    args = parser.parse_args(argv)
    rows = demo_rows(args.seed)
    write_jsonl(rows, args.out)
    n_flips = sum(row["meta"]["planted_flip"] for row in rows)
    print(f"wrote {len(rows)} pairs ({n_flips} planted flips) to {args.out}")


if __name__ == "__main__":
    main()
