"""Progress bars: one helper, off by argument, by TQDM_DISABLE at call time, or when a
process is silenced; the demo's bar counts seeds x methods from the workers' records."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from lvlm_safety_plugins.demo.run import METHODS, _show_progress
from lvlm_safety_plugins.progress import progress_bar, silenced


def test_progress_bar_switches(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress_bar(range(3), file=io.StringIO()).disable
    assert progress_bar(range(3), enabled=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")  # read when the bar is made, after tqdm was imported
    assert progress_bar(range(3), file=io.StringIO()).disable
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not progress_bar(range(3), file=io.StringIO()).disable
    with silenced():
        assert progress_bar(range(3), file=io.StringIO()).disable
    assert not progress_bar(range(3), file=io.StringIO()).disable  # restored after the block
    assert list(progress_bar(range(3), enabled=False)) == [0, 1, 2]


def test_silence_is_process_wide():
    script = ("import io; from lvlm_safety_plugins.progress import progress_bar, silence; "
              "a = progress_bar(range(2), file=io.StringIO()).disable; silence(); "
              "print(a, progress_bar(range(2), file=io.StringIO()).disable)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["False", "True"]


def test_demo_bar_counts_finished_methods_and_names_running_stages(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    buf = io.StringIO()
    bar = progress_bar(total=2 * len(METHODS), file=buf, enabled=True, mininterval=0)
    # a seed names the stage it is in; one that has not reported a stage yet builds its world
    records = [{"seed": 0, "methods": {METHODS[0]: {}, METHODS[1]: {}}, "failed": {}, "stage": f"stage 2 ({METHODS[2]})"},
               {"seed": 1, "methods": {}, "failed": {METHODS[0]: "RuntimeError: x"}}]
    _show_progress(bar, records)
    assert bar.n == 3
    assert bar.postfix == f"seed 0: stage 2 ({METHODS[2]}), seed 1: world"
    records[0]["methods"].update({m: {} for m in METHODS})
    records[1]["stage"] = "stage 1"
    _show_progress(bar, records)
    assert bar.n == len(METHODS) + 1 and bar.postfix == "seed 1: stage 1"
    bar.close()
