"""Shared helpers for the benchmark scripts: result rows, the table, the JSON file.

Every benchmark writes a JSON list of rows
``{"case", "metric", "value", "unit", "baseline", "ratio"}`` where ``ratio`` is
``value`` over the named baseline case's value for the same metric, measured in the
same run (``None`` for the baseline itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable


def benchmark_parser(doc: str, quick_help: str, *, repeats: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` (done in 60 s on 2 cores), ``--json
    PATH`` and, with ``repeats``, ``--repeats N`` (interleaved repeats per case; the
    script's default when not given). The description is the first line of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if repeats:
        parser.add_argument("--repeats", type=int, help="interleaved repeats per case")
    parser.add_argument("--json", help="write the result rows here")
    return parser


def make_rows(results: dict[str, dict[str, float]], units: dict[str, str], baseline: str) -> list[dict[str, Any]]:
    """``results[case][metric] = value`` -> rows with ratios to ``baseline``."""
    rows = []
    for case, metrics in results.items():
        for metric, value in metrics.items():
            base = results.get(baseline, {}).get(metric)
            ratio = None if case == baseline or not base else value / base
            rows.append({
                "case": case,
                "metric": metric,
                "value": value,
                "unit": units.get(metric, ""),
                "baseline": baseline,
                "ratio": ratio,
            })
    return rows


def print_table(rows: Iterable[dict[str, Any]], title: str = "") -> None:
    rows = list(rows)
    if title:
        print(title)
    header = ["case", "metric", "value", "unit", "ratio"]
    cells = [[r["case"], r["metric"], f"{r['value']:.6g}", r["unit"], "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def write_json(rows: list[dict[str, Any]], path: str | None) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


def interleaved_median(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each case's timing function ``repeats`` times, interleaved and in alternating
    order (a, b, c, c, b, a, a, b, c, ...) so drift on the machine, and whatever one case
    leaves behind for the next (caches, the allocator), hits every case alike; return
    the median per case."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else reversed(order):
            samples[name].append(fn())
    return {name: statistics.median(vals) for name, vals in samples.items()}
