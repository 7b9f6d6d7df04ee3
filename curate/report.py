"""One self-contained HTML page that shows what a run found.

``write_report(run)`` reads a run directory (and the curated, training and
eval directories inside it, found by their files) and writes one HTML file
that opens offline: plotly.js is embedded once and every plot is a small JSON
spec drawn by it. Sections, each omitted when its step did not run:

- dataset: counts, quarantine reasons, length distributions;
- LN-CHES: distribution with the filter threshold, top / bottom pairs as text;
- reward ensemble: mean margin vs margin std (the U-shape of Secrets of RLHF
  II), strength deciles, ensemble AUC;
- noise: ``flip_prob`` histogram, flip-rate estimates, planted-flip bench;
- SAE features: win-rate effects, prevalence, descriptions, top pairs;
- curation: what each rule did, overlaps, before / after distributions;
- training and eval: loss and reward-accuracy curves, log-prob drift, ranking
  accuracy before / after, LN-CHES vs change in chosen log-prob.

Building a section is a pure function of :class:`ReportInputs`; only
:func:`load_inputs` and :func:`write_report` touch files.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from curate.data.schema import meta_of
from curate.errors import CurateError
from curate.rundir import (CURATED_DIR, CURATION, EVAL_DIR, EVAL_SUMMARY, EVAL_TABLE, FEATURES_SUMMARY, FEATURES_TABLE,
                           METRICS, PAIRS, TRAIN_DIR, CurationSection, EvalSection, NoiseSection, RewardSection, RunDir,
                           S, TrainSection)

TOP_PAIRS = 5  # pairs shown at each end of a ranking
TEXT_PREVIEW = 280  # characters of a reply shown before "more"
MAX_SCATTER = 20_000  # points per scatter plot (a random sample beyond)
COLORS = {"chosen": "#1f77b4", "rejected": "#d62728", "before": "#9e9e9e", "after": "#2ca02c"}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
BENCH_FILES = ("bench_noise.json", "bench.json")  # planted-flip bench output (curate.bench_noise), if saved in RUN


# ------------------------------------------------------------------ inputs
@dataclass
class TrainRun:
    name: str
    metrics: pl.DataFrame  # one row per optimizer step (metrics.jsonl)
    train: TrainSection


@dataclass
class EvalRun:
    name: str
    summary: EvalSection  # eval.json
    pairs: pl.DataFrame | None  # eval.parquet: one row per pair (log-probs before / after)


@dataclass
class ReportInputs:
    """Everything the report reads, already loaded (build it by hand in tests)."""

    run: Path
    pairs: pl.DataFrame
    quarantine: pl.DataFrame = field(default_factory=pl.DataFrame)
    scores: pl.DataFrame = field(default_factory=pl.DataFrame)
    manifest: dict[str, Any] = field(default_factory=dict)
    features: pl.DataFrame | None = None  # features.parquet: one row per SAE feature
    features_summary: dict[str, Any] = field(default_factory=dict)  # features_summary.json
    curated_pairs: pl.DataFrame | None = None
    curation_audit: pl.DataFrame | None = None
    curation: CurationSection | None = None  # the curated manifest's section
    trains: list[TrainRun] = field(default_factory=list)
    evals: list[EvalRun] = field(default_factory=list)
    bench: dict[str, Any] | None = None  # planted-flip bench result

    def section(self, cls: type[S]) -> S:
        """A section of the run's manifest (empty when the step did not run)."""
        return cls.from_dict(self.manifest.get(cls.name) or {})

    def table(self) -> pl.DataFrame:
        if self.scores.width > 1:
            return self.pairs.join(self.scores, on="pair_id", how="left")
        return self.pairs


def _read_jsonl(path: Path) -> pl.DataFrame:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def _step_runs(run: Path, step_dir: str, marker: str) -> list[Path]:
    """The named runs of a step (``RUN/train/NAME/``, ``RUN/eval/NAME/``) that hold ``marker``."""
    root = run / step_dir
    return sorted(p for p in root.iterdir() if (p / marker).is_file()) if root.is_dir() else []


def load_inputs(run: str | Path) -> ReportInputs:
    """Read a run directory and the step outputs in the layout of `curate run` (:mod:`curate.rundir`)."""
    run_dir = RunDir(run)
    if not run_dir.exists(PAIRS):
        raise CurateError(f"{run_dir.path} is not a run directory (no {PAIRS}): run `curate score` first")
    inputs = ReportInputs(
        run=run_dir.path, pairs=run_dir.pairs(), quarantine=run_dir.quarantine(),
        scores=run_dir.scores(), manifest=run_dir.manifest(),
    )
    if run_dir.exists(FEATURES_TABLE):
        inputs.features = pl.read_parquet(run_dir / FEATURES_TABLE)
        if run_dir.exists(FEATURES_SUMMARY):
            inputs.features_summary = json.loads((run_dir / FEATURES_SUMMARY).read_text())
    curated = RunDir(run_dir / CURATED_DIR)
    if curated.exists(CURATION):
        inputs.curation_audit = pl.read_parquet(curated / CURATION)
        inputs.curated_pairs = curated.pairs()
        inputs.curation = curated.section(CurationSection)
    for train in _step_runs(run_dir.path, TRAIN_DIR, METRICS):
        inputs.trains.append(TrainRun(f"{TRAIN_DIR}/{train.name}", _read_jsonl(train / METRICS),
                                      RunDir(train).section(TrainSection) or TrainSection()))
    for ev in _step_runs(run_dir.path, EVAL_DIR, EVAL_SUMMARY):
        summary = EvalSection.from_dict(json.loads((ev / EVAL_SUMMARY).read_text()))
        inputs.evals.append(EvalRun(f"{EVAL_DIR}/{ev.name}", summary,
                                    pl.read_parquet(ev / EVAL_TABLE) if (ev / EVAL_TABLE).exists() else None))
    bench = [run_dir / name for name in BENCH_FILES if run_dir.exists(name)]
    if bench:
        inputs.bench = json.loads(bench[0].read_text())
    return inputs


# ------------------------------------------------------------------ small helpers
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: integers as is, floats to ``digits`` significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def column(table: pl.DataFrame, name: str) -> np.ndarray | None:
    """A numeric column as floats (nulls -> nan), or None when the table lacks it."""
    if name not in table.columns:
        return None
    return table[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def html_table(rows: list[dict[str, Any]], columns: list[str] | None = None, digits: int = 3) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    def cell(value: Any) -> str:
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        return f"<td class='n'>{esc(fmt(value, digits))}</td>" if numeric else f"<td>{esc(fmt(value, digits))}</td>"

    body = "".join("<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def prompt_text(prompt: list[dict[str, str]] | None) -> str:
    """The conversation before the replies, one 'role: content' line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in (prompt or []))


def last_user_turn(prompt: list[dict[str, str]] | None, limit: int = 120) -> str:
    text = next((m["content"] for m in reversed(prompt or []) if m["role"] == "user"), "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hover_texts(table: pl.DataFrame) -> list[str] | None:
    """The last user turn of each pair, shown when hovering over its point."""
    return [html.escape(last_user_turn(p, 80)) for p in table["prompt"].to_list()] if "prompt" in table.columns else None


def pair_details(row: dict[str, Any], label: str) -> str:
    """A pair as an expandable <details> block: prompt, chosen and rejected in full."""
    preview = last_user_turn(row.get("prompt"))
    return (
        f"<details class='pair'><summary><b>{esc(label)}</b> {esc(preview)}</summary>"
        f"<div class='turns'><pre class='prompt'>{esc(prompt_text(row.get('prompt')))}</pre>"
        f"<div class='reply chosen'><b>chosen</b><pre>{esc(row.get('chosen', ''))}</pre></div>"
        f"<div class='reply rejected'><b>rejected</b><pre>{esc(row.get('rejected', ''))}</pre></div>"
        f"</div><div class='pid'>pair_id {esc(row.get('pair_id', ''))}</div></details>"
    )


def ranked_pairs(table: pl.DataFrame, by: str, k: int = TOP_PAIRS, highest: bool = True) -> list[dict[str, Any]]:
    valued = table.filter(pl.col(by).is_not_null() & pl.col(by).is_not_nan())
    return valued.sort(by, descending=highest).head(k).to_dicts()


def _sample(n: int, limit: int = MAX_SCATTER, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _list(values: Any) -> list:
    """Plain floats for JSON (nan -> None, which plotly shows as a gap)."""
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=float)]


# ------------------------------------------------------------------ plot specs (plain plotly JSON)
@dataclass
class Plot:
    """A plotly figure as data + layout; drawn by the embedded plotly.js."""

    data: list[dict[str, Any]]
    layout: dict[str, Any]


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x}, "zeroline": False},
        "yaxis": {"title": {"text": y}, "zeroline": False},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "height": 320,
        "legend": {"orientation": "h", "y": -0.25},
        **extra,
    }


def histogram(series: dict[str, np.ndarray], title: str, x: str, *, lines: dict[str, float] | None = None,
              nbins: int = 40) -> Plot:
    data = [
        {"type": "histogram", "x": _list(finite(v)), "name": name, "opacity": 0.6, "nbinsx": nbins,
         **({"marker": {"color": COLORS[name]}} if name in COLORS else {})}
        for name, v in series.items()
    ]
    layout = _layout(title, x, "pairs", barmode="overlay")
    shapes, notes = [], []
    for name, value in (lines or {}).items():
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": value, "x1": value, "y0": 0, "y1": 1,
                       "line": {"color": "black", "dash": "dash", "width": 2}})
        notes.append({"x": value, "y": 1, "xref": "x", "yref": "paper", "text": name, "showarrow": False,
                      "xanchor": "left", "yanchor": "bottom"})
    if shapes:
        layout.update(shapes=shapes, annotations=notes)
    return Plot(data, layout)


def scatter(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, *, color: np.ndarray | None = None,
            color_label: str = "", text: list[str] | None = None) -> Plot:
    idx = _sample(len(x))
    marker: dict[str, Any] = {"size": 5, "opacity": 0.6}
    if color is not None:
        marker.update(color=_list(color[idx]), colorscale="RdBu", showscale=True,
                      colorbar={"title": {"text": color_label}})
    trace = {"type": "scattergl" if len(idx) > 2000 else "scatter", "mode": "markers",
             "x": _list(x[idx]), "y": _list(y[idx]), "marker": marker}
    if text is not None:
        trace.update(text=[text[i] for i in idx], hovertemplate="%{text}<br>x=%{x:.3g} y=%{y:.3g}<extra></extra>")
    return Plot([trace], _layout(title, xlabel, ylabel))


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def lines(curves: dict[str, tuple[list, list]], title: str, x: str, y: str,
          dashes: dict[str, str] | None = None, groups: dict[str, str] | None = None) -> Plot:
    """One line per curve; curves in the same ``groups`` entry share a colour."""
    group_of = groups or {name: name for name in curves}
    color = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(dict.fromkeys(group_of.values()))}
    data = [
        {"type": "scatter", "mode": "lines+markers", "x": list(xs), "y": _list(ys), "name": name,
         "marker": {"size": 4, "color": color[group_of[name]]},
         "line": {"dash": (dashes or {}).get(name, "solid"), "color": color[group_of[name]]}}
        for name, (xs, ys) in curves.items()
    ]
    layout = _layout(title, x, y)
    steps = [v for xs, _ in curves.values() for v in xs]
    if steps and all(isinstance(v, int) for v in steps) and max(steps) - min(steps) <= 20:
        layout["xaxis"]["dtick"] = 1  # a few integer steps: no ticks at 1.5
    return Plot(data, layout)


def bars(categories: list[str], groups: dict[str, list[float]], title: str, y: str, *, by_sign: bool = False) -> Plot:
    """Grouped bars; ``by_sign`` colours each bar by the sign of its value (one group)."""
    data = []
    for name, vals in groups.items():
        marker = {"color": COLORS[name]} if name in COLORS else {}
        if by_sign:
            marker = {"color": [COLORS["chosen"] if (v or 0) >= 0 else COLORS["rejected"] for v in vals]}
        data.append({"type": "bar", "x": categories, "y": _list(vals), "name": name, "marker": marker})
    return Plot(data, _layout(title, "", y, barmode="group"))


# ------------------------------------------------------------------ sections
@dataclass
class Section:
    id: str
    title: str
    parts: list[str | Plot]  # HTML fragments and plots, in order


def dataset_section(inputs: ReportInputs) -> Section:
    pairs, quarantine = inputs.pairs, inputs.quarantine
    parts: list[str | Plot] = []
    counts = [{"what": "pairs", "count": pairs.height}, {"what": "quarantined rows", "count": quarantine.height}]
    parts.append(html_table(counts))
    if quarantine.height and "reason" in quarantine.columns:
        reasons = quarantine.group_by("reason").len().sort("len", descending=True)
        parts.append("<h3>Quarantine reasons</h3>" + html_table(
            [{"reason": r, "rows": n} for r, n in reasons.iter_rows()]))
    categories = [c for c in meta_of(pairs, "category") if c is not None] if pairs.height else []
    if categories:
        counts_by = pl.Series("category", categories).value_counts(sort=True)
        parts.append("<h3>Categories (meta.category)</h3>" + html_table(
            [{"category": c, "pairs": n} for c, n in counts_by.iter_rows()]))
    lengths = {side: np.array([len(t.split()) for t in pairs[side].to_list()], dtype=float)
               for side in ("chosen", "rejected")}
    if pairs.height:
        parts.append(histogram(lengths, "Reply length", "words per reply"))
        rows = [{"length of": f"{side} (words)", "median": float(np.median(v)), "mean": float(v.mean()),
                 "max": int(v.max())} for side, v in lengths.items()]
        table = inputs.table()
        for side in ("prompt", "chosen", "rejected"):
            tokens = column(table, f"n_tokens_{side}")
            if tokens is not None and finite(tokens).size:
                t = finite(tokens)
                rows.append({"length of": f"{side} (model tokens)", "median": float(np.median(t)),
                             "mean": float(t.mean()), "max": int(t.max())})
        longer = float((lengths["chosen"] > lengths["rejected"]).mean())
        note = f"<p>The chosen reply is the longer one in {longer:.1%} of pairs."
        cut = column(table, "n_prompt_tokens_cut")
        if cut is not None:
            note += f" Prompts cut from the left to fit the context: {int((finite(cut) > 0).sum())}."
        parts.append(html_table(rows) + note + "</p>")
    return Section("dataset", "Dataset at a glance", parts)


def ches_threshold(inputs: ReportInputs, column_name: str = "ln_ches") -> float | None:
    """Where the curation's CHES rule cut: its absolute threshold, or the lowest value it selected."""
    if not inputs.curation or inputs.curation_audit is None:
        return None
    for rule in inputs.curation.per_rule:
        if rule.get("column") != column_name or rule.get("matched", 0) == 0:
            continue
        if "threshold" in rule and rule["rule"].startswith("ches-threshold"):
            return float(rule["threshold"])
        matched = inputs.curation_audit.filter(pl.col("step") == rule["step"])["pair_id"]
        values = column(inputs.table().filter(pl.col("pair_id").is_in(matched.implode())), column_name)
        if values is not None and finite(values).size:
            return float(finite(values).min())
    return None


def ches_section(inputs: ReportInputs) -> Section | None:
    table = inputs.table()
    ln = column(table, "ln_ches")
    if ln is None or not finite(ln).size:
        return None
    threshold = ches_threshold(inputs)
    parts: list[str | Plot] = [
        "<p>LN-CHES (Razin et al. 2025): the length-normalised similarity of the chosen and rejected hidden "
        "states, minus the chosen norm. Higher means DPO is more likely to push the chosen reply's "
        "probability down (likelihood displacement).</p>",
        histogram({"LN-CHES": ln}, "LN-CHES distribution", "LN-CHES",
                  lines={f"filter threshold {threshold:.3g}": threshold} if threshold is not None else None),
    ]
    q = np.quantile(finite(ln), [0.05, 0.5, 0.95])
    parts.append(f"<p>q05 {fmt(q[0])} · median {fmt(q[1])} · q95 {fmt(q[2])}"
                 + (f" · pairs above the threshold: {int((finite(ln) >= threshold).sum())}" if threshold is not None else "")
                 + "</p>")
    for title, highest in (("Highest LN-CHES (most displacement)", True), ("Lowest LN-CHES", False)):
        rows = ranked_pairs(table, "ln_ches", highest=highest)
        parts.append(f"<h3>{title}</h3>" + "".join(pair_details(r, f"LN-CHES {fmt(r['ln_ches'])}") for r in rows))
    return Section("ches", "LN-CHES: likelihood displacement", parts)


def strength_deciles(table: pl.DataFrame) -> list[dict[str, Any]]:
    """Pairs grouped by decile of the ensemble mean margin, weakest first."""
    valued = table.filter(pl.col("rm_margin_mean").is_not_null() & pl.col("rm_margin_mean").is_not_nan())
    if valued.height < 10:
        return []
    ranked = valued.sort("rm_margin_mean").with_columns(
        (pl.int_range(pl.len()) * 10 // pl.len() + 1).alias("decile"))
    aggs = [pl.len().alias("pairs"), pl.col("rm_margin_mean").mean().alias("mean margin"),
            pl.col("rm_margin_std").mean().alias("mean std")]
    for name, label in (("rm_vote_share", "vote share"), ("flip_prob", "flip_prob"), ("ln_ches", "LN-CHES")):
        if name in ranked.columns:
            aggs.append(pl.col(name).mean().alias(f"mean {label}"))
    return ranked.group_by("decile").agg(aggs).sort("decile").to_dicts()


def ensemble_section(inputs: ReportInputs) -> Section | None:
    table = inputs.table()
    mean, std = column(table, "rm_margin_mean"), column(table, "rm_margin_std")
    if mean is None or std is None:
        return None
    info = inputs.section(RewardSection)
    facts = [f"members: {len(info.members)}" if info.members else None,
             f"ensemble AUC: {fmt(info.oof_auc)}" if info.oof_auc is not None else None,
             ("out-of-fold scores" if info.out_of_fold else "in-sample scores (optimistic)")
             if info.out_of_fold is not None else None,
             f"pairs with mean margin < 0: {(finite(mean) < 0).mean():.1%}",
             "reward priors: " + ", ".join(p["name"] if p["used"] else f"{p['name']} not used ({esc(p['why_not'])})"
                                           for p in info.priors) if info.priors else None]
    parts: list[str | Plot] = [
        "<p>Secrets of RLHF II: each member's margin r(chosen) − r(rejected), z-scored per member; the mean is the "
        "preference strength, the std the members' disagreement (U-shaped in the mean on HH-RLHF).</p>",
        "<p>" + " · ".join(f for f in facts if f) + "</p>",
    ]
    if info.auc_protocol:
        parts.append(f"<p class='note'>AUC: {esc(info.auc_protocol)}</p>")
    parts.append(scatter(mean, std, "Preference strength: mean margin vs margin std", "mean margin (strength)",
                         "margin std across members", color=column(table, "rm_vote_share"),
                         color_label="vote share", text=hover_texts(table)))
    groups = info.auc_by_feature_set or info.auc_by_member_group or {}
    if groups:
        parts.append("<h3>AUC of each feature set alone</h3>" + html_table(
            [{"features": g, "AUC": a} for g, a in groups.items()]))
    deciles = strength_deciles(table)
    if deciles:
        parts.append("<h3>Strength deciles (1 = weakest)</h3>" + html_table(deciles))
    return Section("ensemble", "Reward-ensemble preference strength", parts)


def planted_flip_auroc(table: pl.DataFrame) -> float | None:
    """AUROC of flip_prob for pairs whose meta says ``planted_flip`` (the shipped demo data carries it)."""
    truth = meta_of(table, "planted_flip")
    flip = column(table, "flip_prob")
    if flip is None or any(t is None for t in truth) or len(set(truth)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(flip)
    return float(roc_auc_score(np.array(truth, dtype=bool)[ok], flip[ok]))


def noise_section(inputs: ReportInputs) -> Section | None:
    table = inputs.table()
    flip = column(table, "flip_prob")
    if flip is None:
        return None
    info = inputs.section(NoiseSection)
    default = info.default_estimator
    parts: list[str | Plot] = []
    if info.flip_rate is not None:
        parts.append(f"<p>Estimated flip rate ({esc(default)}): <b>{fmt(info.flip_rate)}</b></p>")
    if info.flip_rate_interval:
        low, high = info.flip_rate_interval
        parts.append(f"<p>90% interval: {fmt(low)} to {fmt(high)}"
                     + ("" if info.identifiable is not False else
                        f". <b>Not identifiable</b>: the ensemble cannot tell ambiguous pairs from flipped ones at "
                        f"this strength, so curation and training act on the interval's lower end, "
                        f"{fmt(info.conservative_rate)} (flip_prob_conservative)")
                     + "</p>")
    parts.append(histogram({"flip_prob": flip}, "Per-pair flip probability", "flip_prob"))
    estimators = info.estimators
    if estimators:
        rows = [{"estimator": name + (" (default)" if name == default else ""), "flip rate": e.get("rate"),
                 "90% interval": "-" if not e.get("interval") else f"{e['interval'][0]:.3f}-{e['interval'][1]:.3f}",
                 "assumption": e.get("assumption", "")} for name, e in estimators.items()]
        parts.append("<h3>Flip-rate estimates</h3>" + html_table(rows))
    auroc = planted_flip_auroc(table)
    if auroc is not None:
        planted = np.array([bool(t) for t in meta_of(table, "planted_flip")])
        parts.append(f"<p>This dataset marks its planted flips (meta.planted_flip, {int(planted.sum())} pairs): "
                     f"AUROC of flip_prob for them <b>{fmt(auroc)}</b> (0.5 = chance).</p>")
        parts.append(histogram({"planted flips": flip[planted], "other pairs": flip[~planted]},
                               "flip_prob of the planted flips vs the other pairs", "flip_prob", nbins=20))
    if inputs.bench and inputs.bench.get("results"):
        results = inputs.bench["results"]
        keys = ("estimator", "planted_rate", "estimated_rate", "natural_rate", "true_rate", "auroc")
        parts.append("<h3>Planted-flip bench</h3>" + html_table(
            [{k: r.get(k) for k in keys if k in r or k != "true_rate"} for r in results]))
        curves: dict[str, tuple[list, list]] = {}
        for r in results:
            xs, ys = curves.setdefault(r["estimator"], ([], []))
            xs.append(r["planted_rate"])
            ys.append(r["estimated_rate"])
        parts.append(lines(curves, "Estimated vs planted flip rate", "planted rate δ", "estimated rate"))
    return Section("noise", "Label noise", parts)


FEATURE_COLUMNS = ("feature", "description", "prevalence", "win_rate_delta", "p_bonferroni", "win_rate_active")
FEATURE_AUCS = {
    "auc_sae": "SAE features + length", "auc_probe_length": "embedding probe + length", "auc_length": "length alone",
    "signal_fraction": "fraction of the probe's signal", "signal_fraction_beyond_length": "fraction beyond length",
}


def features_section(inputs: ReportInputs) -> Section | None:
    features = inputs.features
    if features is None or features.height == 0:
        return None
    parts: list[str | Plot] = [
        "<p>WIMHF (Movva et al. 2025): a signed sparse autoencoder on e(chosen) − e(rejected) reply embeddings. "
        "<i>win_rate_delta</i>: how much more often the reply with more of the feature wins, beyond length; "
        "<i>prevalence</i>: fraction of pairs where it is active; <i>win_rate_active</i>: fraction of active pairs "
        "where the chosen reply has more of it.</p>"]
    aucs = [{"validation": label, "value": inputs.features_summary.get(key)}
            for key, label in FEATURE_AUCS.items() if inputs.features_summary.get(key) is not None]
    if aucs:
        parts.append(html_table(aucs))
    ranked = features.sort(pl.col("win_rate_delta").abs(), descending=True) if "win_rate_delta" in features.columns \
        else features
    shown = [c for c in FEATURE_COLUMNS if c in ranked.columns]
    parts.append(html_table(ranked.select(shown).to_dicts()))
    if "win_rate_delta" in ranked.columns:
        parts.append(bars([f"f{f}" for f in ranked["feature"].to_list()], {"Δ win rate": ranked["win_rate_delta"].to_list()},
                          "Feature effect on win rate beyond length, strongest first (blue: the reply with more of it wins more)",
                          "Δ win rate", by_sign=True))
    if "top_pair_ids" in ranked.columns:
        table = inputs.table()
        for row in ranked.to_dicts():
            ids = list(row.get("top_pair_ids") or [])[:TOP_PAIRS]
            top = table.filter(pl.col("pair_id").is_in(ids)).to_dicts()
            if not top:
                continue
            act = f"sae_f{row['feature']}"
            blocks = "".join(pair_details(r, f"activation {fmt(r.get(act))}" if act in r else "pair") for r in top)
            parts.append(f"<details class='feature'><summary>feature {esc(row['feature'])} "
                         f"(Δ win rate {esc(fmt(row.get('win_rate_delta')))}): {esc(row.get('description', ''))}"
                         f"</summary>{blocks}</details>")
    return Section("features", "SAE features: what the labels reward", parts)


def curation_section(inputs: ReportInputs) -> Section | None:
    summary = inputs.curation
    if not summary or inputs.curated_pairs is None:
        return None
    parts: list[str | Plot] = []
    counts = summary.counts
    parts.append("<p>" + " · ".join(f"{esc(k)}: {esc(fmt(v))}" for k, v in counts.items()) + "</p>")
    rules = summary.per_rule
    parts.append("<h3>Rules, in order</h3>" + html_table(
        [{k: r.get(k) for k in ("step", "rule", "action", "matched", "changed", "missing")} for r in rules]))
    overlaps = summary.overlaps
    if len(rules) > 1 and overlaps:
        rows = [{"step": r["step"], **{str(o["step"]): n for o, n in zip(rules, counts_row)}}
                for r, counts_row in zip(rules, overlaps)]
        parts.append("<h3>Pairs matched by both rules</h3>" + html_table(rows))
    table = inputs.table()
    kept_ids = inputs.curated_pairs["pair_id"].implode()
    kept = table.filter(pl.col("pair_id").is_in(kept_ids))
    for name in ("ln_ches", "rm_margin_mean", "flip_prob"):
        before, after = column(table, name), column(kept, name)
        if before is not None and finite(before).size:
            parts.append(histogram({"before": before, "after": after}, f"{name} before / after curation", name))
    if summary.warnings:
        parts.append("<ul class='warn'>" + "".join(f"<li>{esc(w)}</li>" for w in summary.warnings) + "</ul>")
    return Section("curation", "Curation: what each rule did", parts)


def _curve(metrics: pl.DataFrame, name: str) -> tuple[list, list] | None:
    if name not in metrics.columns or "step" not in metrics.columns:
        return None
    return metrics["step"].to_list(), metrics[name].cast(pl.Float64).to_list()


def training_section(inputs: ReportInputs) -> Section | None:
    if not inputs.trains and not inputs.evals:
        return None
    parts: list[str | Plot] = []
    if inputs.trains:
        rows = []
        for t in inputs.trains:
            last = t.metrics.tail(1).to_dicts()[0] if t.metrics.height else {}
            rows.append({"run": t.name, "loss": t.train.config.get("loss"),
                         "steps": last.get("step"), "final loss": last.get("loss"),
                         "final reward acc": last.get("reward_accuracy"), "pairs/s": last.get("pairs_per_s")})
        parts.append(html_table(rows))
        for metric, label in (("loss", "training loss"), ("reward_accuracy", "reward accuracy (batch)")):
            curves = {t.name: c for t in inputs.trains if (c := _curve(t.metrics, metric))}
            if curves:
                parts.append(lines(curves, label.capitalize(), "step", label))
        drift, dashes, groups = {}, {}, {}
        for t in inputs.trains:
            for side in ("chosen", "rejected"):
                c = _curve(t.metrics, f"{side}_logps")
                if c:
                    drift[f"{t.name} {side}"] = c
                    dashes[f"{t.name} {side}"] = "solid" if side == "chosen" else "dot"
                    groups[f"{t.name} {side}"] = t.name
        if drift:
            parts.append(lines(drift, "Log-prob drift (batch mean log π(y|x); chosen solid, rejected dotted)",
                               "step", "log-prob", dashes, groups))
    rows = [eval_row(ev) for ev in inputs.evals]
    if rows:
        parts.append("<h3>Evaluation: ranking accuracy before (reference) and after (policy)</h3>" + html_table(rows))
        parts.append(bars([r["eval"] for r in rows],
                          {"before": [r["ranking acc before"] for r in rows],
                           "after": [r["ranking acc after"] for r in rows]},
                          "Ranking accuracy before / after training", "ranking accuracy"))
    for ev in inputs.evals:
        plot = displacement_plot(inputs, ev)
        if plot is not None:
            parts.append(plot)
    return Section("training", "Training and evaluation", parts)


def eval_row(ev: EvalRun) -> dict[str, Any]:
    """The headline numbers of one eval.json (curate.eval.evaluate's summary)."""
    s = ev.summary
    acc, acc_ln, disp = s.ranking_accuracy, s.ranking_accuracy_length_normalised, s.displacement
    rho = (s.spearman_ln_ches_vs_delta_chosen or {}).get("rho")
    return {"eval": ev.name, "pairs": s.pairs,
            "ranking acc before": acc.get("reference"), "ranking acc after": acc.get("policy"),
            "per-token before": acc_ln.get("reference"), "per-token after": acc_ln.get("policy"),
            "implicit reward acc": s.implicit_reward_accuracy,
            "mean Δ log π(chosen)": disp.get("mean_delta_chosen"),
            "mean Δ log π(rejected)": disp.get("mean_delta_rejected"),
            "Spearman(LN-CHES, Δ chosen)": rho}


def displacement_plot(inputs: ReportInputs, ev: EvalRun) -> Plot | None:
    """LN-CHES vs the change in chosen log-prob, one point per evaluated pair."""
    if ev.pairs is None or "delta_chosen" not in ev.pairs.columns:
        return None
    table = ev.pairs
    if "ln_ches" not in table.columns:
        ln = inputs.scores.select("pair_id", "ln_ches") if "ln_ches" in inputs.scores.columns else None
        if ln is None:
            return None
        table = table.join(ln, on="pair_id", how="inner")
    x, y = column(table, "ln_ches"), column(table, "delta_chosen")
    if not (np.isfinite(x) & np.isfinite(y)).any():
        return None
    pairs = table.join(inputs.pairs.select("pair_id", "prompt"), on="pair_id", how="left")
    return scatter(x, y, f"{ev.name}: LN-CHES vs change in chosen log-prob (the paper predicts a falling trend)",
                   "LN-CHES", "Δ log π(chosen | x)", text=hover_texts(pairs))


SECTIONS: list[Callable[[ReportInputs], Section | None]] = [
    dataset_section, ches_section, ensemble_section, noise_section, features_section, curation_section,
    training_section,
]


def build_sections(inputs: ReportInputs) -> list[Section]:
    """Every section whose step ran, in the page's order."""
    return [s for s in (make(inputs) for make in SECTIONS) if s is not None]


# ------------------------------------------------------------------ headline numbers
def headline(inputs: ReportInputs) -> dict[str, Any]:
    """A few numbers that summarise the run (the report's top cards; also printed by `curate run`)."""
    table = inputs.table()
    out: dict[str, Any] = {"pairs": inputs.pairs.height, "quarantined": inputs.quarantine.height}
    ln = column(table, "ln_ches")
    if ln is not None and finite(ln).size:
        out["median LN-CHES"] = float(np.median(finite(ln)))
    auc = inputs.section(RewardSection).oof_auc
    if auc is not None:
        out["ensemble AUC"] = auc
    rate = inputs.section(NoiseSection).flip_rate
    if rate is not None:
        out["estimated flip rate"] = rate
    if inputs.features_summary.get("auc_sae") is not None:
        out["SAE features AUC"] = inputs.features_summary["auc_sae"]
    if inputs.curation:
        out["kept after curation"] = inputs.curation.counts.get("kept")
    for t in inputs.trains:
        if t.metrics.height and "loss" in t.metrics.columns:
            out[f"{t.name} final loss"] = t.metrics["loss"][-1]
    for ev in inputs.evals:
        row = eval_row(ev)
        if row["ranking acc after"] is not None:
            out[f"{ev.name} ranking acc"] = f"{fmt(row['ranking acc before'])} → {fmt(row['ranking acc after'])}"
    return out


# ------------------------------------------------------------------ HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:16px 32px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#cfd8dc;font-size:13px}
nav{padding:8px 32px;background:#eceff1;font-size:14px} nav a{margin-right:16px;color:#1565c0}
main{max-width:1100px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 20px 16px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:6px} h3{font-size:15px;margin-top:18px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left} td.n{text-align:right}
th{background:#f5f5f5}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 14px;min-width:120px}
.card .v{font-size:20px;font-weight:600} .card .k{font-size:12px;color:#666}
details.pair,details.feature{border:1px solid #eee;border-radius:4px;margin:4px 0;padding:4px 8px;font-size:13px}
details summary{cursor:pointer} pre{white-space:pre-wrap;word-wrap:break-word;margin:4px 0;font-size:12.5px}
.reply{padding:4px 8px;margin:4px 0;border-left:4px solid} .chosen{border-color:#1f77b4} .rejected{border-color:#d62728}
.prompt{color:#455a64} .pid{color:#999;font-size:11px} .plot{min-height:320px} .warn{color:#b26a00}
"""


def render_html(sections: list[Section], *, title: str, subtitle: str = "", numbers: dict[str, Any] | None = None,
                plotly_js: str | None = None) -> str:
    """The whole page as one string; ``plotly_js`` defaults to the installed plotly's bundle."""
    body, scripts, n_plots = [], [], 0
    for section in sections:
        html_parts = [f"<section id='{esc(section.id)}'><h2>{esc(section.title)}</h2>"]
        for part in section.parts:
            if isinstance(part, Plot):
                div = f"plot-{n_plots}"
                n_plots += 1
                html_parts.append(f"<div class='plot' id='{div}'></div>")
                spec = json.dumps({"data": part.data, "layout": part.layout}, allow_nan=False)
                scripts.append(f"draw('{div}', {spec});")
            else:
                html_parts.append(part)
        body.append("".join(html_parts) + "</section>")
    nav = "".join(f"<a href='#{esc(s.id)}'>{esc(s.title.split(':')[0])}</a>" for s in sections)
    cards = "".join(f"<div class='card'><div class='v'>{esc(fmt(v))}</div><div class='k'>{esc(k)}</div></div>"
                    for k, v in (numbers or {}).items() if v is not None)
    if plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    config = json.dumps(PLOT_CONFIG)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style><script>{plotly_js}</script></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main><div class='cards'>{cards}</div>{''.join(body)}</main>"
        "<script>function draw(id, spec){Plotly.newPlot(id, spec.data, spec.layout, " + config + ");}\n"
        + "\n".join(scripts) + "</script></body></html>"
    )


def write_report(run: str | Path, out: str | Path | None = None, *, title: str | None = None) -> dict[str, Any]:
    """Write RUN/report.html (or ``out``) and return {out, sections, plots, headline}."""
    from datetime import datetime, timezone

    from curate.rundir import atomic_write_bytes

    inputs = load_inputs(run)
    sections = build_sections(inputs)
    numbers = headline(inputs)
    manifest = inputs.manifest
    source = (manifest.get("load") or {}).get("dataset") or ((manifest.get("score") or {}).get("data") or {}).get("dataset")
    subtitle = (f"{inputs.run} · {source} · " if source else f"{inputs.run} · ") + \
        f"written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    page = render_html(sections, title=title or f"curate report: {inputs.run.name}", subtitle=subtitle,
                       numbers=numbers)
    out_path = Path(out) if out is not None else inputs.run / "report.html"
    atomic_write_bytes(out_path, page.encode("utf-8"))
    n_plots = sum(isinstance(p, Plot) for s in sections for p in s.parts)
    return {"out": str(out_path), "sections": [s.id for s in sections], "plots": n_plots, "headline": numbers,
            "bytes": len(page.encode("utf-8"))}
