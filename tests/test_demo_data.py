"""Checks on the shipped demo set, ``data/demo/pairs.jsonl`` (issue 2, "Demo data").

The file is read with plain ``json`` so these tests do not depend on the loader.
"""

from __future__ import annotations

import difflib
import gzip
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "pairs.jsonl"
GENERATOR = REPO / "data" / "make_demo.py"
HH_SAMPLE = REPO.parent / "shared/data/hh-rlhf/harmless-base-test-dev.jsonl.gz"

CATEGORIES = {"correct_vs_wrong", "helpful_vs_evasive", "refusal_vs_harmful", "on_vs_off_topic", "near_duplicate"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with DEMO.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text: str, n_max: int = 3) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1)}


def is_near_duplicate(a: str, b: str) -> bool:
    """Different texts whose word sequences are at least 80% the same."""
    return a != b and difflib.SequenceMatcher(None, words(a), words(b)).ratio() >= 0.8


def better_and_worse(row: dict) -> tuple[str, str]:
    if row["meta"]["planted_flip"]:
        return row["rejected"], row["chosen"]
    return row["chosen"], row["rejected"]


# --------------------------------------------------------------------------- shape


def test_every_row_is_a_well_formed_pair(rows):
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "meta"}
        prompt = row["prompt"]
        assert prompt and prompt[-1]["role"] == "user"
        assert all(set(m) == {"role", "content"} and m["role"] in {"user", "assistant"} for m in prompt)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in prompt)
        assert row["chosen"].strip() and row["rejected"].strip()
        assert row["chosen"] != row["rejected"]
        meta = row["meta"]
        assert meta["category"] in CATEGORIES
        assert isinstance(meta["planted_flip"], bool)
        assert isinstance(meta["contrast"], str) and meta["contrast"]
        assert isinstance(meta["template"], str) and meta["template"]


def test_size_prompts_and_templates(rows):
    assert len(rows) >= 240
    distinct_prompts = {json.dumps(row["prompt"], sort_keys=True) for row in rows}
    assert len(distinct_prompts) >= 100
    assert any(len(row["prompt"]) > 1 for row in rows), "expected some multi-turn prompts"
    template_use = Counter(row["meta"]["template"] for row in rows)
    assert max(template_use.values()) <= 5, template_use.most_common(3)
    assert len({(row["chosen"], row["rejected"]) for row in rows}) == len(rows), "duplicate pairs"


def test_every_category_has_many_pairs(rows):
    per_category = Counter(row["meta"]["category"] for row in rows)
    assert set(per_category) == CATEGORIES
    assert min(per_category.values()) >= 40, per_category


def test_planted_flips_are_about_ten_percent_and_spread_over_categories(rows):
    flips = [row["meta"]["planted_flip"] for row in rows]
    assert 0.08 <= sum(flips) / len(rows) <= 0.12
    for category in CATEGORIES:
        in_category = [row["meta"]["planted_flip"] for row in rows if row["meta"]["category"] == category]
        assert 0.05 <= sum(in_category) / len(in_category) <= 0.15, category


def test_near_duplicates_are_at_least_fifteen_percent(rows):
    near = [row for row in rows if row["meta"]["category"] == "near_duplicate"]
    assert all(is_near_duplicate(row["chosen"], row["rejected"]) for row in near)
    assert len(near) / len(rows) >= 0.15
    # and the other categories really are different replies, not disguised near-duplicates
    others = [row for row in rows if row["meta"]["category"] != "near_duplicate"]
    assert not any(is_near_duplicate(row["chosen"], row["rejected"]) for row in others)


# --------------------------------------------------------------------------- hard to game


def length_features(a: str, b: str) -> list[float]:
    return [len(a) - len(b), len(words(a)) - len(words(b))]


def length_only_auc(pairs: list[tuple[str, str]], seed: int) -> float:
    """Cross-validated AUC of a logistic regression that sees only length differences.

    Each (chosen, rejected) pair is shown in a random order; the model
    predicts whether the first reply is the chosen one from the character
    and word-count differences (5-fold CV).
    """
    rng = random.Random(seed)
    features, labels = [], []
    for chosen, rejected in pairs:
        a_is_chosen = rng.random() < 0.5
        a, b = (chosen, rejected) if a_is_chosen else (rejected, chosen)
        features.append(length_features(a, b))
        labels.append(int(a_is_chosen))
    x = np.asarray(features, dtype=float)
    x /= x.std(axis=0)
    y = np.asarray(labels)
    scores = cross_val_predict(LogisticRegression(), x, y, cv=5, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def test_length_check_catches_a_length_giveaway():
    rng = random.Random(0)
    pairs = [("word " * rng.randint(20, 40), "word " * rng.randint(5, 19)) for _ in range(200)]
    assert length_only_auc(pairs, seed=0) > 0.95


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_length_alone_does_not_predict_the_label(rows, seed):
    """Measured on the committed file: AUC 0.55-0.57 over seeds 0-4 (limit 0.6)."""
    assert length_only_auc([(row["chosen"], row["rejected"]) for row in rows], seed) <= 0.6


def giveaway_ngrams(pairs: list[tuple[str, str]], min_share: float = 0.05, max_accuracy: float = 0.75):
    """N-grams (n = 1..3) that on their own tell the first reply of a pair from the second.

    For an n-gram found in at least ``min_share`` of the pairs (in either
    reply), the rule "the reply containing it is the first" (or "the second")
    is scored on those pairs; where both replies contain it the rule cannot
    decide and scores 0.5. Returns {n-gram: (only in first, only in second,
    in both)} for every n-gram whose rule is right more than ``max_accuracy``
    of the time.
    """
    only_first, only_second, in_both = Counter(), Counter(), Counter()
    for first, second in pairs:
        a, b = ngrams(first), ngrams(second)
        only_first.update(a - b)
        only_second.update(b - a)
        in_both.update(a & b)
    found = {}
    for gram in set(only_first) | set(only_second):
        present = only_first[gram] + only_second[gram] + in_both[gram]
        if present >= min_share * len(pairs):
            accuracy = (max(only_first[gram], only_second[gram]) + 0.5 * in_both[gram]) / present
            if accuracy > max_accuracy:
                found[" ".join(gram)] = (only_first[gram], only_second[gram], in_both[gram])
    return found


def test_giveaway_ngram_check_catches_a_planted_phrase():
    planted = [(f"I'm sorry, no {i}.", f"Sure thing {i}.") for i in range(20)]
    neutral = [("x y", "x y")] * 80
    found = giveaway_ngrams(planted + neutral)
    assert found["i'm sorry"] == (20, 0, 0) and found["sure thing"] == (0, 20, 0)
    assert "x" not in found and "x y" not in found  # in both replies: decides nothing
    # 3 of 4 one-sided is exactly the 0.75 limit and passes; 4 of 5 does not
    assert giveaway_ngrams([("a", "b")] * 3 + [("b", "a")] + neutral[:16]) == {}
    assert "a" in giveaway_ngrams([("a", "b")] * 4 + [("b", "a")] + neutral[:20])
    assert giveaway_ngrams(neutral) == {}


def test_no_phrase_gives_the_stored_label_away(rows):
    assert giveaway_ngrams([(row["chosen"], row["rejected"]) for row in rows]) == {}


def test_no_phrase_gives_the_true_label_away(rows):
    assert giveaway_ngrams([better_and_worse(row) for row in rows]) == {}


# --------------------------------------------------------------------------- provenance


def test_generator_reproduces_the_committed_file(tmp_path):
    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == DEMO.read_bytes()


def unordered_pairs(rows: list[dict]) -> set[tuple[str, str, str]]:
    return {(json.dumps(row["prompt"]), *sorted([row["chosen"], row["rejected"]])) for row in rows}


def test_a_different_seed_changes_flips_but_not_the_pairs(tmp_path):
    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--seed", "7"], check=True, capture_output=True)
    other = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    committed = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines()]
    assert unordered_pairs(other) == unordered_pairs(committed)
    assert [r["meta"]["planted_flip"] for r in other] != [r["meta"]["planted_flip"] for r in committed]


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason="needs ../shared/data/hh-rlhf beside the repo")
def test_no_reply_is_copied_from_hh_rlhf(rows):
    with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as f:
        hh_text = " ".join(" ".join(words(line)) for line in f)
    replies = {text for row in rows for text in (row["chosen"], row["rejected"])}
    copied = [text for text in replies if " ".join(words(text)) in hh_text]
    assert copied == []


# --------------------------------------------------------------------------- learnable from embeddings


@pytest.mark.slow
def test_planted_flips_are_recoverable_from_reply_embeddings(rows):
    """An out-of-fold probe on MiniLM reply-embedding differences ranks the planted flips high.

    Random orientation, logistic regression, 5 folds grouped by prompt; a pair's
    flip score is the probe's probability that the stored label is wrong.
    Measured: AUROC 0.898 / 0.931 / 0.941 for orientation seeds 0-2 (mean
    0.923). Near-duplicates (one word apart) stay near chance for such a
    probe, by design.
    """
    from sklearn.model_selection import GroupKFold

    from curate.embeddings import embed_texts

    texts = sorted({text for row in rows for text in (row["chosen"], row["rejected"])})
    vectors = dict(zip(texts, embed_texts(texts, device="cpu", show_progress=False)))
    chosen_minus_rejected = np.stack([vectors[row["chosen"]] - vectors[row["rejected"]] for row in rows])
    planted = np.array([row["meta"]["planted_flip"] for row in rows])
    groups = [json.dumps(row["prompt"]) for row in rows]
    aurocs = []
    for seed in range(3):
        a_is_chosen = np.random.default_rng(seed).random(len(rows)) < 0.5
        x = np.where(a_is_chosen[:, None], chosen_minus_rejected, -chosen_minus_rejected)
        p_a = cross_val_predict(
            LogisticRegression(max_iter=2000), x, a_is_chosen, cv=GroupKFold(5), groups=groups, method="predict_proba"
        )[:, 1]
        p_stored_label = np.where(a_is_chosen, p_a, 1 - p_a)
        aurocs.append(roc_auc_score(planted, 1 - p_stored_label))
    assert np.mean(aurocs) >= 0.88, aurocs
