"""Agreement between judges: when several judges score the same answers (``lvlm-safety
eval --also-judge``), Cohen's kappa for every pair and the items they disagree on.

For two judges' unsafe/safe verdicts on the same ``n`` items, with ``p_o`` the share of
items on which they agree and ``a``, ``b`` the shares each calls unsafe::

    p_e   = a * b + (1 - a) * (1 - b)          # agreement expected by chance
    kappa = (p_o - p_e) / (1 - p_e)

Kappa is 1 for full agreement, 0 for agreement at chance level, and undefined (``None``)
when ``p_e = 1`` (both judges give one and the same verdict to every item).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Mapping, Sequence

from ..errors import DataError


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary raters on the same items (``None`` when undefined)."""
    if len(a) != len(b):
        raise DataError(f"cohen_kappa: {len(a)} and {len(b)} verdicts")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(bool(x) == bool(y) for x, y in zip(a, b)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def judge_agreement(verdicts: Mapping[str, Mapping[tuple, bool]], max_listed: int = 50) -> list[dict[str, Any]]:
    """For every pair of judges (``verdicts[judge][(run, benchmark, id)] = unsafe``), on
    the items both judged: ``n``, the agreement rate, Cohen's kappa and the disagreeing
    items (at most ``max_listed``, ``disagreements_total`` counts all)."""
    rows = []
    for first, second in combinations(list(verdicts), 2):
        keys = [k for k in verdicts[first] if k in verdicts[second]]
        a = [verdicts[first][k] for k in keys]
        b = [verdicts[second][k] for k in keys]
        differ = [k for k, x, y in zip(keys, a, b) if bool(x) != bool(y)]
        rows.append({
            "judges": [first, second], "n": len(keys),
            "agreement": (len(keys) - len(differ)) / len(keys) if keys else None,
            "kappa": cohen_kappa(a, b),
            "disagreements_total": len(differ),
            "disagreements": [{"run": k[0], "benchmark": k[1], "id": k[2], first: bool(verdicts[first][k]),
                               second: bool(verdicts[second][k])} for k in differ[:max_listed]],
        })
    return rows


__all__ = ["cohen_kappa", "judge_agreement"]
