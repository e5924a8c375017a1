"""Progress bars: one helper so every loop a person waits for shows a tqdm bar, and
one switch to turn them all off.

``progress_bar(iterable, enabled=..., **tqdm_kwargs)`` is a tqdm bar that is disabled
when ``enabled`` is false, when ``TQDM_DISABLE`` is set (read at call time, so it
works whenever tqdm was imported) or inside :func:`silenced` / after :func:`silence`
(worker processes whose parent shows the progress, such as the demo's seed workers).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

_silent = False


def _env_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto.tqdm`` bar over ``iterable`` (or with ``total=``), off when
    ``enabled`` is false, ``TQDM_DISABLE`` is set, or progress is silenced."""
    from tqdm.auto import tqdm

    # always explicit: tqdm's own TQDM_DISABLE default is read once, when tqdm is imported
    kwargs["disable"] = bool(kwargs.get("disable")) or not enabled or _silent or _env_disabled()
    return tqdm(iterable, **kwargs)


def silence() -> None:
    """Turn every :func:`progress_bar` of this process off (for worker processes)."""
    global _silent
    _silent = True


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Bars off inside the block, restored after it."""
    global _silent
    before, _silent = _silent, True
    try:
        yield
    finally:
        _silent = before


__all__ = ["progress_bar", "silence", "silenced"]
