"""Parsing of layer selections shared by every method: ``"all"``, ``"10-20"``,
``"3,5,7"``, ``[3, 5, 7]``."""

from __future__ import annotations

from typing import Any

from ..errors import LayerError


def parse_layers(spec: Any) -> list[int] | None:
    """Parse a layer selection; ``None`` means all layers. Ranges are inclusive.

    Raises ValueError with a message naming the bad part; a layer listed twice
    (``"1,1"``, overlapping ranges) is an error, not a layer steered twice.
    """
    out = _parse_layers(spec)
    if out is not None:
        twice = sorted({l for l in out if out.count(l) > 1})
        if twice:
            raise LayerError(f"layer(s) {twice} listed twice in {spec!r}: each layer is selected once")
    return out


def _parse_layers(spec: Any) -> list[int] | None:
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise LayerError(f"layers must be 'all', a range such as '10-20', or a list of ints, got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in ("all", "*"):
            return None
        out: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo_text, hi_text = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                try:
                    lo, hi = int(lo_text), int(hi_text)
                except ValueError:
                    raise LayerError(f"bad layer range {part!r}; write it as 'first-last', e.g. '10-20'") from None
                if hi < lo:
                    raise LayerError(f"bad layer range {part!r}: the last layer is before the first")
                out.extend(range(lo, hi + 1))
            else:
                try:
                    out.append(int(part))
                except ValueError:
                    raise LayerError(
                        f"bad layer {part!r}; use 'all', a range such as '10-20', or a list of ints"
                    ) from None
        if not out:
            raise LayerError(f"empty layer selection {spec!r}")
        return out
    try:
        items = list(spec)
    except TypeError:
        raise LayerError(f"layers must be 'all', a range such as '10-20', or a list of ints, got {spec!r}") from None
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise LayerError(f"bad layer {item!r} in {items!r}: layer ids are ints")
        out.append(item)
    if not out:
        raise LayerError("empty layer list")
    return out
