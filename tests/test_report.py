"""The HTML report: sections from synthetic run directories, and a render in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate import report
from curate.curation import curate_pairs, ches_drop_top_rule, max_flip_prob_rule
from curate.data.schema import pairs_frame, quarantine_frame
from curate.rundir import (CurationSection, EvalSection, LoadSection, NoiseSection, RewardSection, RunDir, TrainSection,
                           write_json, write_parquet)

N = 40


def synthetic_pairs(n: int = N) -> pl.DataFrame:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {i} <b>&"}],
            "chosen": " ".join(["good"] * (5 + i % 7)),
            "rejected": " ".join(["bad"] * (3 + i % 5)),
            "source": f"synthetic:{i}",
        }
        for i in range(n)
    ]
    return pairs_frame(rows)


def synthetic_scores(pairs: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = pairs.height
    mean = rng.normal(0.5, 1.0, n)
    return pl.DataFrame({
        "pair_id": pairs["pair_id"],
        "ln_ches": np.arange(n, dtype=float) - n,  # -n .. -1, so the order is known
        "ches": rng.normal(-50, 10, n),
        "logp_chosen": rng.normal(-40, 5, n),
        "logp_rejected": rng.normal(-45, 5, n),
        "rm_margin_mean": mean,
        "rm_margin_std": 0.5 + 0.2 * np.abs(mean),
        "rm_vote_share": rng.uniform(0, 1, n),
        "p_chosen": rng.uniform(0, 1, n),
        "flip_prob": np.linspace(0.0, 0.95, n),
    })


def make_run(root: Path, *, scores: bool = True, features: bool = True, curated: bool = True,
             trained: bool = True) -> Path:
    """A run directory laid out the way `curate run` lays it out, with made-up numbers."""
    run = RunDir(root / "run")
    pairs = synthetic_pairs()
    quarantine = quarantine_frame([{"source": "x:1", "reason": "empty reply", "detail": "", "raw": "{}"}] * 2
                                  + [{"source": "x:9", "reason": "identical replies", "detail": "", "raw": "{}"}])
    run.write_pairs(pairs, quarantine)
    run.write_section(LoadSection(dataset="synthetic"))
    if scores:
        run.merge_scores(synthetic_scores(pairs))
        run.write_section(RewardSection(oof_auc=0.71, out_of_fold=True, members=[{"name": n} for n in "abc"],
                                        auc_by_feature_set={"policy": 0.7, "embed": 0.68}))
        run.write_section(NoiseSection(default_estimator="mixture", flip_rate=0.12, estimators={
            "mixture": {"rate": 0.12, "assumption": "symmetric noise"},
            "heuristic": {"rate": 0.25, "assumption": "RM error is noise"}}))
    if scores and curated:
        result = curate_pairs(run.table(), [ches_drop_top_rule("10"), max_flip_prob_rule("0.9")])
        out = RunDir(run.path / "curated")
        write_parquet(result.pairs, out / "pairs.parquet")
        write_parquet(result.audit, out / "curation.parquet")
        out.write_section(CurationSection.from_dict(result.summary))
    if scores and features:
        write_parquet(pl.DataFrame({
            "feature": [0, 1, 2], "prevalence": [0.5, 0.2, 0.0], "coef": [0.4, -0.2, 0.0],
            "p_value": [0.01, 0.2, 1.0], "win_rate_delta": [0.08, -0.12, 0.0], "p_bonferroni": [0.03, 0.6, 1.0],
            "description": ["more: sorry | less: sure", "more: here | less: -", "(never active)"],
            "more": [["sorry"], ["here"], []], "less": [["sure"], [], []], "win_rate_active": [0.7, 0.3, None],
            "top_pair_ids": [pairs["pair_id"][:3].to_list(), pairs["pair_id"][3:5].to_list(), []],
            "examples": [["x"], ["y"], []],
        }), run / "features.parquet")
        write_json({"auc_sae": 0.61, "auc_probe_length": 0.7, "auc_length": 0.58}, run / "features_summary.json")
        run.merge_scores(pl.DataFrame({"pair_id": pairs["pair_id"], "sae_f0": np.linspace(-1, 1, N),
                                       "sae_f1": np.zeros(N), "sae_f2": np.zeros(N)}))
    if trained:
        for name, drift in (("dpo", -1.0), ("sparsepo", -0.2)):
            out = run.path / "train" / name
            out.mkdir(parents=True)
            rows = [{"step": s, "epoch": 0, "loss": 0.69 - 0.05 * s, "reward_accuracy": 0.5 + 0.05 * s,
                     "chosen_logps": -40 + drift * s, "rejected_logps": -45 - 2 * s, "pairs_per_s": 0.5}
                    for s in range(1, 6)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            RunDir(out).write_section(TrainSection(config={"loss": name, "beta": 0.1}))
            ev = run.path / "eval" / name
            write_json(EvalSection(pairs=N, ranking_accuracy={"reference": 0.45, "policy": 0.55 + drift / 10},
                                   displacement={"mean_delta_chosen": drift, "mean_delta_rejected": -3.0},
                                   spearman_ln_ches_vs_delta_chosen={"rho": -0.3, "p_value": 0.06, "n": N}).to_dict(),
                       ev / "eval.json")
            write_parquet(pl.DataFrame({"pair_id": pairs["pair_id"], "delta_chosen": np.linspace(1, -1, N) + drift,
                                        "delta_rejected": np.full(N, -3.0)}), ev / "eval.parquet")
    return run.path


def test_sections_follow_the_steps_that_ran(tmp_path):
    only_pairs = report.load_inputs(make_run(tmp_path / "a", scores=False, trained=False))
    assert [s.id for s in report.build_sections(only_pairs)] == ["dataset"]

    full = report.load_inputs(make_run(tmp_path / "b"))
    assert [s.id for s in report.build_sections(full)] == [
        "dataset", "ches", "ensemble", "noise", "features", "curation", "training"]
    assert [t.name for t in full.trains] == ["train/dpo", "train/sparsepo"]
    assert [e.name for e in full.evals] == ["eval/dpo", "eval/sparsepo"]


def test_ches_threshold_is_where_the_drop_top_rule_cut(tmp_path):
    inputs = report.load_inputs(make_run(tmp_path))
    # ln_ches is -40..-1; dropping the top 10% of 40 pairs drops -4..-1, so the cut is at -4.
    assert report.ches_threshold(inputs) == -4.0


def test_strength_deciles_group_pairs_weakest_first():
    pairs = synthetic_pairs(20)
    scores = pl.DataFrame({"pair_id": pairs["pair_id"], "rm_margin_mean": np.arange(20.0)[::-1],
                           "rm_margin_std": np.ones(20)})
    deciles = report.strength_deciles(pairs.join(scores, on="pair_id"))
    assert [d["pairs"] for d in deciles] == [2] * 10
    assert deciles[0]["mean margin"] == 0.5 and deciles[-1]["mean margin"] == 18.5


def test_dataset_counts_and_quarantine_reasons(tmp_path):
    inputs = report.load_inputs(make_run(tmp_path, scores=False, trained=False))
    page = report.render_html(report.build_sections(inputs), title="t", plotly_js="")
    assert "<td>empty reply</td><td class='n'>2</td>" in page and "<td>identical replies</td><td class='n'>1</td>" in page
    assert "<td>pairs</td><td class='n'>40</td>" in page


def test_pair_text_is_escaped(tmp_path):
    inputs = report.load_inputs(make_run(tmp_path, trained=False))
    page = report.render_html(report.build_sections(inputs), title="t", plotly_js="")
    assert "question 39 &lt;b&gt;&amp;" in page and "question 39 <b>&" not in page


def test_headline_numbers(tmp_path):
    numbers = report.headline(report.load_inputs(make_run(tmp_path)))
    assert numbers["pairs"] == 40 and numbers["quarantined"] == 3
    assert numbers["estimated flip rate"] == 0.12
    assert numbers["ensemble AUC"] == 0.71 and numbers["SAE features AUC"] == 0.61
    assert numbers["median LN-CHES"] == -20.5
    # 4 dropped by the CHES rule; flip_prob > 0.9 selects the 2 highest, which the CHES rule already dropped
    assert numbers["kept after curation"] == 36
    assert numbers["train/dpo final loss"] == pytest.approx(0.44)
    assert numbers["eval/dpo ranking acc"] == "0.45 → 0.45"


def test_write_report_embeds_plotly_once_and_needs_a_run(tmp_path):
    summary = report.write_report(make_run(tmp_path))
    page = Path(summary["out"]).read_text()
    assert summary["out"].endswith("run/report.html")
    assert page.count("<script>") == 2  # plotly.js, then the plot calls
    assert "cdn" not in page.split("<script>")[2].lower()
    assert page.count("draw('plot-") == summary["plots"] > 8
    with pytest.raises(report.CurateError, match="not a run directory"):
        report.write_report(tmp_path / "nothing")


# ------------------------------------------------------------------ headless Chromium
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

# Injected first thing in <head>: records script errors; after load, counts drawn plots.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
window.addEventListener('load', function () { setTimeout(function () {
  var plots = document.querySelectorAll('div.plot');
  var drawn = 0;
  plots.forEach(function (d) { if (d.querySelector('svg.main-svg .plot, svg.main-svg .cartesianlayer')) drawn++; });
  var probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({plots: plots.length, drawn: drawn, errors: window.__errors});
  document.body.appendChild(probe);
}, 500); });
</script>"""


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
            capture_output=True, text=True, timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def probe_page(page: Path) -> dict:
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = chromium("--dump-dom", probed.as_uri())
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", done.stdout)
    assert match, f"the probe did not run; chromium said: {done.stderr[-2000:]}"
    return json.loads(match.group(1))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    summary = report.write_report(make_run(tmp_path))
    page = Path(summary["out"])
    probe = probe_page(page)
    assert probe["errors"] == []
    assert probe["plots"] == summary["plots"] and probe["drawn"] == probe["plots"]

    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_the_probe_catches_a_broken_plot(tmp_path):
    """Guards the Chromium test itself: a page whose plot call throws must be reported."""
    summary = report.write_report(make_run(tmp_path, trained=False))
    page = Path(summary["out"])
    page.write_text(page.read_text().replace("draw('plot-0', ", "draw('no-such-div', ", 1))
    probe = probe_page(page)
    assert probe["errors"] or probe["drawn"] < probe["plots"]


def test_features_are_ranked_by_effect_with_their_top_pairs(tmp_path):
    inputs = report.load_inputs(make_run(tmp_path, trained=False))
    section = report.features_section(inputs)
    page = "".join(p for p in section.parts if isinstance(p, str))
    # |-0.12| > |0.08| > 0: feature 1 first
    assert page.index("<td class='n'>1</td><td>more: here") < page.index("<td class='n'>0</td><td>more: sorry")
    assert page.count("<details class='feature'>") == 2  # feature 2 has no top pairs
    assert page.count("<details class='pair'>") == 5
    assert "SAE features + length</td><td class='n'>0.61" in page


def test_eval_rows_and_displacement_scatter(tmp_path):
    inputs = report.load_inputs(make_run(tmp_path))
    row = report.eval_row(inputs.evals[0])
    assert row["ranking acc before"] == 0.45 and row["mean Δ log π(chosen)"] == -1.0
    plot = report.displacement_plot(inputs, inputs.evals[0])
    # eval.parquet has no ln_ches here: it comes from the run's scores, joined by pair_id (-40..-1 in pair order)
    assert plot.data[0]["x"] == [float(v) for v in range(-N, 0)]
    assert plot.data[0]["y"][0] == pytest.approx(0.0)


def test_planted_flip_auroc_reads_the_demo_marker():
    pairs = pairs_frame([{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"a{i}", "rejected": f"b{i}",
                          "meta": {"planted_flip": i in (1, 3)}} for i in range(6)])
    flip = [0.1, 0.9, 0.2, 0.4, 0.5, 0.0]  # planted pairs score 0.9 and 0.4: 7 of 8 pairings ranked right
    table = pairs.with_columns(flip_prob=pl.Series(flip))
    assert report.planted_flip_auroc(table) == pytest.approx(7 / 8)
    assert report.planted_flip_auroc(synthetic_pairs(4).with_columns(flip_prob=pl.Series([0.1] * 4))) is None


def test_manifest_sections_round_trip_through_their_classes(tmp_path):
    """A producer's plain dict goes through the section's class: fields typed, unknown keys kept, same JSON keys."""
    run = RunDir(tmp_path / "run")
    run.update_manifest("noise", {"flip_rate": 0.2, "estimators": {"em": {"rate": 0.2}}, "new_key": [1, 2]})
    on_disk = json.loads((run / "manifest.json").read_text())["noise"]
    assert on_disk["flip_rate"] == 0.2 and on_disk["new_key"] == [1, 2] and on_disk["identifiable"] is None
    noise = run.section(NoiseSection)
    assert (noise.flip_rate, noise.estimators, noise.extra) == (0.2, {"em": {"rate": 0.2}}, {"new_key": [1, 2]})
    run.write_section(noise)
    assert json.loads((run / "manifest.json").read_text())["noise"] == on_disk
    assert run.section(TrainSection) is None
