"""Atomic file output: a file is either fully written or not there at all.

The temporary file gets the mode a plain ``open(path, "w")`` would give: the mode of
the file it replaces, or ``0o666`` less the process umask for a new file (``mkstemp``
alone would leave every output ``0600``). :func:`check_output` is the one rule every
command applies to its ``--out`` before doing any work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import OutputError


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(tmp: str, target: Path) -> None:
    """Give the temporary file ``tmp`` the mode a plain write of ``target`` would."""
    try:
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
    except OSError:  # a file system without modes: keep what mkstemp gave
        pass


def check_output(path: str | os.PathLike[str], *, overwrite: bool = False, kind: str = "file",
                 inputs: Iterable[str | os.PathLike[str] | None] = (), flag: str = "--out",
                 replace_folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot or must not be written; the
    error names ``flag`` and the path. ``kind`` is ``"file"`` or ``"folder"``.

    * an existing file (or, with ``replace_folder``, an existing folder) without
      ``overwrite``: the one ``--overwrite`` rule of every command;
    * a folder where a file is wanted, a file where a folder is wanted;
    * a path under a regular file; a folder that cannot be created or written;
    * one of ``inputs`` (never replace an input).
    """
    target = Path(path)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        try:
            same = source.exists() and target.exists() and os.path.samefile(source, target)
        except OSError:
            same = False
        if same or target.resolve() == source.resolve():
            raise OutputError(f"{flag} {target}: is the input {source}; write the output to another file")
    if kind == "file" and target.is_dir():
        raise OutputError(f"{flag} {target}: is a folder; give a file name")
    if kind == "folder" and target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {target}: is a file; give a folder")
    if target.exists() and not overwrite and (kind == "file" or replace_folder):
        raise OutputError(f"{flag} {target}: already exists (pass --overwrite to replace it)")
    existing = target if target.is_dir() else target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {target}: {existing} is a file, not a folder")
    try:  # a real probe: access() says yes to root in /proc or on a read-only mount
        probe = tempfile.mkdtemp(prefix=".lvlm-write-probe.", dir=existing)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {target}: cannot write in {existing} ({exc.strerror or exc})") from None
    return target


def check_output_folder(folder: str | os.PathLike[str], names: Iterable[str], *, overwrite: bool = False,
                        inputs: Iterable[str | os.PathLike[str] | None] = (), flag: str = "--out") -> Path:
    """:func:`check_output` for a command that writes the files ``names`` into the
    folder ``folder``: the folder must be a writable folder (or creatable), and each of
    its files follows the one ``--overwrite`` rule and is never one of ``inputs``."""
    target = check_output(folder, kind="folder", flag=flag)
    for name in names:
        check_output(target / name, overwrite=overwrite, inputs=inputs, flag=flag)
    return target


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error
    it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    _plain_mode(tmp, target)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (savefig,
    safetensors); it replaces ``path`` only when the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    _plain_mode(tmp, target)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise




def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110, *, tight: bool = False) -> Path:
    """Write a matplotlib figure as PNG atomically (never a half-written file) and
    close it, also when writing fails; ``tight`` crops the canvas to what is drawn (a
    legend placed outside the axes included)."""
    import matplotlib.pyplot as plt

    target = Path(path)
    try:
        with atomic_output_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    finally:
        plt.close(fig)
    return target


__all__ = ["atomic_output_path", "atomic_write", "atomic_write_text", "check_output", "save_figure"]
