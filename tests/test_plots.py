"""The plots users read: each is rendered and checked for what makes it unreadable: a
legend over the data (bars, error bars, lines, points, spans) or over another legend,
labels stacked on one point, a panel left empty without a reason, a panel that does
not say whether lower or higher is better. Boxes are the artists' rendered window
extents (matplotlib's ``get_window_extent``)."""

from __future__ import annotations

import math

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from lvlm_safety_plugins.analysis import SafetyAnalysis, draw_analysis  # noqa: E402
from lvlm_safety_plugins.evaluation.metrics import accuracy_metrics, over_refusal_metrics, safety_metrics  # noqa: E402
from lvlm_safety_plugins.evaluation.report import draw_results, plot_results  # noqa: E402
from lvlm_safety_plugins.methods.cmrm.sweep import SelectionRule, SweepPoint, SweepResult, draw_sweep, write_sweep  # noqa: E402


def _area(a, b) -> float:
    """The area two display boxes share (0 when they only touch)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _legends(fig):
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]


def _data_boxes(fig, renderer):
    boxes = []
    for ax in fig.axes:
        for artist in [*ax.patches, *ax.lines, *ax.collections]:
            if not artist.get_visible():
                continue
            box = artist.get_window_extent(renderer)
            if all(math.isfinite(v) for v in (box.x0, box.x1, box.y0, box.y1)):
                boxes.append((artist, box))
    return boxes


def assert_no_legend_over_data(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = _legends(fig)
    assert legends, "the plot has no legend"
    boxes = [lg.get_window_extent(renderer) for lg in legends]
    data = _data_boxes(fig, renderer)
    assert data, "the plot draws no data"
    for i, box in enumerate(boxes):
        for artist, other in data:
            assert _area(box, other) == 0, f"legend {i} overlaps {artist}"
        for j, other in enumerate(boxes[i + 1:], start=i + 1):
            assert _area(box, other) == 0, f"legends {i} and {j} overlap"


def _block(kind, k, n):
    flags = [True] * k + [False] * (n - k)
    cats = ["a"] * n
    return {"safety": safety_metrics, "over_refusal": over_refusal_metrics, "accuracy": accuracy_metrics}[kind](flags, cats)


def _results(runs=("base", "cmrm", "tga")):
    # tall bars in every corner, where a legend inside the axes would land
    per = {run: {"figstep": {"n": 10, "safety": _block("safety", 10 - i, 10)},
                 "mm_safetybench": {"n": 10, "safety": _block("safety", 9 - i, 10)},
                 "mossbench": {"n": 10, "over_refusal": _block("over_refusal", 9, 10)},
                 "scienceqa": {"n": 10, "accuracy": _block("accuracy", 10, 10)}} for i, run in enumerate(runs)}
    return {"name": "tiny", "runs": [{"name": r, "recipe": None} for r in runs],
            "benchmarks": [{"label": b} for b in ("figstep", "mm_safetybench", "mossbench", "scienceqa")], "results": per}


def test_results_plot_panels_say_which_way_is_better_and_the_legend_stays_off_the_bars(tmp_path):
    fig = draw_results(_results())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["unsafe rate (ASR): lower is better", "over-refusal rate: lower is better", "accuracy: higher is better"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["figstep", "mm_safetybench"]
    assert len(fig.axes[0].patches) == 3 * 2  # one bar per run and benchmark
    assert_no_legend_over_data(fig)
    assert [t.get_text() for t in _legends(fig)[0].get_texts()] == ["base", "cmrm", "tga"]
    assert plot_results(_results(), tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def _sweep(utility: bool, same_place: bool) -> SweepResult:
    def metrics(alpha):
        if same_place:  # a model that answers everything the same way at every alpha
            return {"harmful_refused": 0.0, "benign_refused": 0.0, "utility": 0.5 if utility else float("nan")}
        return {"harmful_refused": min(1.0, alpha), "benign_refused": alpha / 4, "utility": (0.8 - alpha / 10) if utility else float("nan")}

    base = metrics(0.0)
    points = [SweepPoint(0.0, "", base)]
    points += [SweepPoint(a, layers, metrics(a), n_layers=2) for layers in ("8-15", "10-20") for a in (0.25, 0.5, 1.0)]
    return SweepResult(base, points, SelectionRule(), points[2])


def test_sweep_plot_one_alpha_label_per_point_and_a_reason_for_an_empty_panel(tmp_path):
    fig = draw_sweep(_sweep(utility=False, same_place=True))
    assert_no_legend_over_data(fig)
    over, util = fig.axes
    labels = [t.get_text() for t in over.texts]
    assert labels == ["0-1 (4)"]  # every alpha lands on one place: one label for them
    assert [t.get_text() for t in util.texts] == ["no multiple-choice items in the validation data:\nutility was not measured"]
    assert not util.lines and not util.collections  # nothing drawn there

    fig = draw_sweep(_sweep(utility=True, same_place=False))
    assert_no_legend_over_data(fig)
    for ax in fig.axes:
        spots = [tuple(t.xy) for t in ax.texts]
        assert len(spots) == len(set(spots)) == 4  # alpha 0, 0.25, 0.5, 1: the two curves share their points here
        assert sorted(t.get_text() for t in ax.texts) == ["0", "0.25", "0.5", "1"]
    written = write_sweep(_sweep(utility=False, same_place=False), tmp_path)
    assert open(written["png"], "rb").read()[:4] == b"\x89PNG"


def test_analysis_plot_has_one_legend_off_the_data():
    n = 12
    refusal = [math.exp(-((i - 7) ** 2) / 4) for i in range(n)]  # a peak, where the old legends sat
    result = SafetyAnalysis("LlavaForConditionalGeneration", n, ["sorry"], [1], refusal,
                            [0.9 - 0.05 * i for i in range(n)], [6, 7, 8], 4, 4)
    fig = draw_analysis(result)
    assert len(_legends(fig)) == 1
    assert [t.get_text() for t in _legends(fig)[0].get_texts()] == [
        "refusal-token probability (logit lens, harmful text)", "safety layers", "cos(image tokens, caption)"]
    assert_no_legend_over_data(fig)
