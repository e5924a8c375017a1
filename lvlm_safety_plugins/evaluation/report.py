"""Reports of evaluation results: JSON, Markdown tables and a PNG bar plot, with the
runs side by side. Several ``results.json`` files (different models, different days)
can be combined into one report with :func:`combine` (``lvlm-safety eval-report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import LVLMSafetyError
from ..fileio import atomic_write_text, save_figure

#: (section, metric, label) in the order tables and plots show them
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("safety", "unsafe_rate", "unsafe rate (ASR)"),
    ("safety", "defense_success_rate", "defense success rate (DSR)"),
    ("over_refusal", "over_refusal_rate", "over-refusal rate"),
    ("accuracy", "accuracy", "accuracy"),
)
#: the metric shown per category for each section
CATEGORY_METRIC = {"safety": ("unsafe_rate", "unsafe rate (ASR)"), "over_refusal": ("over_refusal_rate", "over-refusal rate"),
                   "accuracy": ("accuracy", "accuracy")}
PLOTTED = ("unsafe_rate", "over_refusal_rate", "accuracy")


class PlotUnavailable(LVLMSafetyError):
    """matplotlib is not installed, so no PNG plot can be drawn."""


def _clean(value: Any) -> Any:
    """NaN/inf to ``None`` so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def format_rate(prop: dict[str, Any] | None) -> str:
    """``"42.0% [31.2, 53.6]"`` (percent, Wilson 95% interval)."""
    if not prop or prop.get("rate") is None:
        return "–"
    low, high = prop["ci"]
    return f"{100 * prop['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _run_names(results: dict[str, Any]) -> list[str]:
    return [r["name"] for r in results.get("runs", [])]


def _cell(results: dict[str, Any], run: str, bench: str, section: str, metric: str, category: str | None = None) -> dict | None:
    entry = results.get("results", {}).get(run, {}).get(bench, {}).get(section)
    if entry is None:
        return None
    if category is None:
        return entry["metrics"].get(metric)
    return entry.get("per_category", {}).get(category, {}).get(metric)


def headline_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, int]]:
    """``(benchmark, section, metric, label, n)`` for every headline metric present."""
    rows = []
    for bench in [b["label"] for b in results.get("benchmarks", [])]:
        for section, metric, label in HEADLINE:
            ns = [results["results"][r][bench][section]["n"] for r in _run_names(results)
                  if section in results.get("results", {}).get(r, {}).get(bench, {})]
            if ns:
                rows.append((bench, section, metric, label, max(ns)))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: a headline table (runs as columns) and, per benchmark,
    a per-category table."""
    runs = _run_names(results)
    lines = [f"# Safety evaluation: {results.get('name', '')}".rstrip(), ""]
    if results.get("sources"):
        for src in results["sources"]:
            lines.append(f"- `{src['name']}`: model `{src.get('model')}`, judge `{src.get('judge', {}).get('name')}`")
    else:
        lines.append(f"- model: `{results.get('model')}`")
        judge = results.get("judge", {})
        lines.append(f"- judge (harmful sets): `{judge.get('name')}`"
                     + (f" ({judge['model']})" if judge.get("model") else ""))
        lines.append(f"- refusal judge (benign sets): `{results.get('refusal_judge', {}).get('name')}`")
    if results.get("warning"):
        lines.append(f"- **{results['warning']}**")
    for run in results.get("runs", []):
        recipe = run.get("recipe")
        what = f"recipe `{recipe}`" + (f" with {' '.join(run['overrides'])}" if run.get("overrides") else "") if recipe else "no plugins"
        lines.append(f"- run `{run['name']}`: {what}")
    settings = results.get("settings") or {}
    if settings.get("limit"):
        how = ("the first ones" if settings.get("limit_mode") == "first"
               else f"sampled evenly across categories (seed {settings.get('seed', 0)})")
        lines.append(f"- at most {settings['limit']} examples per benchmark, {how}")
    for bench in results.get("benchmarks", []):
        gone = bench.get("skipped_missing_images")
        if gone:
            shown = ", ".join(gone[:10]) + (f", ... ({len(gone) - 10} more)" if len(gone) > 10 else "")
            lines.append(f"- **{bench['label']}: {len(gone)} item(s) left out for missing images** ({shown})")
    lines += ["", "Rates with Wilson 95% intervals; ASR = attack success rate, DSR = 1 - ASR.", ""]
    rows = [[bench, label, str(n), *[format_rate(_cell(results, r, bench, section, metric)) for r in runs]]
            for bench, section, metric, label, n in headline_rows(results)]
    lines.append(_table(["benchmark", "metric", "n", *runs], rows))
    compared = results.get("judges_compared")
    if compared:
        lines += ["", "## Judges compared (harmful items)", ""]
        names = list(compared["judges"])
        cells = []
        for bench, section, metric, label, n in headline_rows(results):
            if metric != "unsafe_rate":
                continue
            for r in runs:
                cells.append([bench, r, *[format_rate(compared["unsafe_rate"].get(j, {}).get(r, {}).get(bench)) for j in names]])
        lines.append(_table(["benchmark", "run", *[f"unsafe rate: {j}" for j in names]], cells))
        lines += [""]
        lines.append(_table(["judges", "n", "agreement", "Cohen's kappa", "disagreeing items"],
                            [[" vs ".join(p["judges"]), str(p["n"]),
                              "–" if p["agreement"] is None else f"{100 * p['agreement']:.1f}%",
                              "undefined (one verdict for every item)" if p["kappa"] is None else f"{p['kappa']:.3f}",
                              ", ".join(f"{d['run']}/{d['benchmark']}/{d['id']}" for d in p["disagreements"][:10])
                              + (f", ... ({p['disagreements_total'] - 10} more)" if p["disagreements_total"] > 10 else "")
                              or "none"] for p in compared["pairs"]]))
    check = results.get("image_check")
    if check and check.get("per_benchmark"):
        policies = list(next(iter(check["per_benchmark"].values()))["policies"])
        lines += ["", f"## Image check: {check.get('name')} (share of images at or above P(violates) = {check.get('threshold')})", ""]
        lines.append(_table(["benchmark", "images", *policies, "any policy"],
                            [[b, str(v["images"]), *[format_rate(v["policies"][p]) for p in policies], format_rate(v["any"])]
                             for b, v in check["per_benchmark"].items()]))
    suite = results.get("suite")
    if suite:
        lines += ["", f"## Suite {suite['name']}: the paper's figures beside the measured ones", "", suite["description"], ""]
        if suite["published"]:
            lines.append(_table(["benchmark", "metric", "published", "source", "measured"],
                                [[p["benchmark"], p["metric"], p["published_text"], p["source"],
                                  "; ".join(f"{m['run']}: {format_rate(m)}" for m in p["measured"]) or "not measured"]
                                 for p in suite["published"]]))
        else:
            lines.append("No published figure of the paper could be sourced; none is printed.")
        for title, items in (("Not available here", suite["unavailable"]), ("Notes", suite["notes"])):
            if items:
                lines += ["", f"{title}:", "", *[f"- {item}" for item in items]]
    text_rows = results.get("text_safety") or []
    for note in results.get("text_variant_errors") or []:
        lines += ["", f"Text only: {note}"]
    if text_rows:
        lines += ["", "## Text only vs with the image (runs without a recipe)", "",
                  "The same harmful requests as plain text show the LLM's own text safety, which image-side "
                  "methods (TGA, CMRM) try to carry over to images.", ""]
        lines.append(_table(["benchmark", "run", "unsafe rate with the image", "text only"],
                            [[t["benchmark"], t["run"], format_rate(t["image"]), format_rate(t["text"])] for t in text_rows]))
        for t in text_rows:
            if t["no_text_safety"]:
                lines += ["", f"**{t['benchmark']} ({t['run']}): the model complies with {100 * t['text']['rate']:.0f}% of these "
                          "requests as plain text. Its LLM has no text safety to restore, so no method that carries text safety "
                          "over to images can show an effect here; use a model whose LLM refuses them as text.**"]
    for bench in [b["label"] for b in results.get("benchmarks", [])]:
        for section, (metric, label) in CATEGORY_METRIC.items():
            cats: dict[str, int] = {}
            for r in runs:
                entry = results.get("results", {}).get(r, {}).get(bench, {}).get(section)
                for cat, block in (entry or {}).get("per_category", {}).items():
                    cats[cat] = max(cats.get(cat, 0), block[metric]["n"])
            if len(cats) < 2:
                continue
            lines += ["", f"## {bench}: {label} per category", ""]
            lines.append(_table(["category", "n", *runs],
                                [[cat, str(n), *[format_rate(_cell(results, r, bench, section, metric, cat)) for r in runs]]
                                 for cat, n in cats.items()]))
        unparsed = {r: results.get("results", {}).get(r, {}).get(bench, {}).get("accuracy", {}).get("unparsed") for r in runs}
        if any(unparsed.values()):
            lines += ["", f"{bench}: answers without a readable choice (counted wrong): "
                      + ", ".join(f"{r} {u}" for r, u in unparsed.items() if u is not None)]
    return "\n".join(lines) + "\n"


#: the plotted metrics, each in its own panel, with which direction is better
PANELS: tuple[tuple[str, str], ...] = (
    ("unsafe_rate", "unsafe rate (ASR): lower is better"),
    ("over_refusal_rate", "over-refusal rate: lower is better"),
    ("accuracy", "accuracy: higher is better"),
)


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """:func:`draw_results`, written atomically as PNG."""
    return save_figure(draw_results(results), path)


def draw_results(results: dict[str, Any]) -> Any:
    """The matplotlib figure of the results: one panel per metric (unsafe rate, over-refusal, accuracy; each titled with
    whether lower or higher is better), one group of bars per benchmark, one bar per
    run, Wilson 95% intervals as error bars; the legend sits below the panels, off the
    data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the PNG plot needs matplotlib: pip install 'lvlm-safety-plugins[plot]'") from None
    runs = _run_names(results)
    rows = [row for row in headline_rows(results) if row[2] in PLOTTED]
    if not rows or not runs:
        raise LVLMSafetyError("nothing to plot: the results have no metrics")
    panels = [(metric, title, [r for r in rows if r[2] == metric]) for metric, title in PANELS]
    panels = [p for p in panels if p[2]]
    width = 0.8 / len(runs)
    widest = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), squeeze=False, sharey=True,
                             figsize=(max(6.0, sum(1.6 + 0.9 * len(p[2]) * max(1, len(runs)) ** 0.5 for p in panels)), 4.6),
                             gridspec_kw={"width_ratios": [max(1, len(p[2])) for p in panels]})
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, (metric, title, panel_rows) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            xs, heights, err_low, err_high = [], [], [], []
            for j, (bench, section, metric_, _, _) in enumerate(panel_rows):
                cell = _cell(results, run, bench, section, metric_)
                if not cell or cell.get("rate") is None:
                    continue
                xs.append(j + (i - (len(runs) - 1) / 2) * width)
                heights.append(cell["rate"])
                err_low.append(cell["rate"] - cell["ci"][0])
                err_high.append(cell["ci"][1] - cell["rate"])
            ax.bar(xs, heights, width, yerr=[err_low, err_high], capsize=3, label=run, color=colours[i % len(colours)])
        ax.set_xticks(range(len(panel_rows)))
        ax.set_xticklabels([bench for bench, *_ in panel_rows], fontsize=7, rotation=20 if widest > 3 else 0,
                           ha="right" if widest > 3 else "center")
        ax.set_xlim(-0.6, len(panel_rows) - 0.4)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("rate (Wilson 95% CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"Safety evaluation: {results.get('name', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(runs), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return fig


def write_reports(results: dict[str, Any], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (with ``plot``) ``results.png`` in
    ``out_dir``; each written atomically. Returns the paths written. A missing
    matplotlib is reported in ``results["plot_error"]``, not raised."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    if plot:
        try:
            files["png"] = plot_results(results, out / "results.png")
        except PlotUnavailable as exc:
            results["plot_error"] = str(exc)
    results["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["markdown"], markdown(results))
    atomic_write_text(files["json"], json.dumps(_clean(results), indent=2, ensure_ascii=False) + "\n")
    return files


def load_results(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    if not file.is_file():
        raise LVLMSafetyError(f"{file}: results file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LVLMSafetyError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "results" not in data or "runs" not in data:
        raise LVLMSafetyError(f"{file}: not a results.json written by lvlm-safety eval")
    return data


def combine(results_list: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Several results side by side: run ``r`` of source ``s`` becomes ``s/r``;
    benchmarks are matched by label."""
    if not results_list:
        raise LVLMSafetyError("nothing to combine")
    names = list(names) if names else [str(r.get("name") or f"results{i}") for i, r in enumerate(results_list)]
    if len(names) != len(results_list):
        raise LVLMSafetyError("combine: one name per results file")
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    merged: dict[str, Any] = {"version": 1, "name": " vs ".join(unique), "sources": [], "runs": [], "benchmarks": [], "results": {}}
    labels: set[str] = set()
    for name, res in zip(unique, results_list):
        merged["sources"].append({"name": name, "model": res.get("model"), "judge": res.get("judge", {}),
                                  "refusal_judge": res.get("refusal_judge", {})})
        for run in res["runs"]:
            full = f"{name}/{run['name']}" if len(results_list) > 1 else run["name"]
            merged["runs"].append({**run, "name": full, "source": name})
            merged["results"][full] = res["results"].get(run["name"], {})
        for bench in res.get("benchmarks", []):
            if bench["label"] not in labels:
                labels.add(bench["label"])
                merged["benchmarks"].append(bench)
    judges = {json.dumps(s["judge"], sort_keys=True) for s in merged["sources"]}
    if len(judges) > 1:
        merged["warning"] = "the results were judged by different judges; compare with care"
    return merged


__all__ = ["HEADLINE", "PANELS", "PlotUnavailable", "combine", "draw_results", "format_rate", "headline_rows", "load_results", "markdown",
           "plot_results", "write_reports"]
