"""The README's main job, in its quick size: the world's text safety mechanism exists
and every method's numbers are produced, in a JSON report and a plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from lvlm_safety_plugins.cli import main
from lvlm_safety_plugins.demo.run import COLUMNS, METHODS, PLOT_SKIPPED, run_demo
from lvlm_safety_plugins.demo.world import World, WorldConfig


def test_world_is_deterministic_and_complete():
    a, b = World(WorldConfig(seed=3)), World(WorldConfig(seed=3))
    assert list(a.images) == a.concepts and len(a.harmful) == len(a.benign) == 5
    assert a.images["bomb"][0].tobytes() == b.images["bomb"][0].tobytes()
    assert a.images["bomb"][0].tobytes() != World(WorldConfig(seed=4)).images["bomb"][0].tobytes()
    requests = a.image_requests("test")
    assert all("<image>" in r["prompt"] for r in requests)
    assert {r["concept"] for r in a.caption_rows()} == set(a.concepts)
    # the alignment data carries no safety data on images: captions only
    assert all(r["response"].startswith("a picture of a") for r in a.caption_rows())


def test_quick_demo_reports_every_method(tmp_path):
    report = run_demo(quick=True, out=tmp_path)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["size"] == "quick" and saved["seeds"] == 1
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    seed = saved["per_seed"][0]["methods"]
    # the text safety mechanism exists: harmful text is refused, benign text is not
    assert seed["baseline"]["text_refusal_harmful"] >= 0.9
    assert seed["baseline"]["text_refusal_benign"] <= 0.1
    # the projector was aligned: captions of held-out images beat chance (1 in 10) clearly
    assert seed["baseline"]["caption_accuracy"] > 0.2
    for method in METHODS:
        for key, _ in COLUMNS:
            value = seed[method][key]
            assert 0.0 <= value <= 1.0 and not math.isnan(value), (method, key)
    assert report["summary"]["cmrm"]["image_refusal_harmful"]["mean"] == seed["cmrm"]["image_refusal_harmful"]
    assert saved["complete"] is True and saved["failed"] == [] and saved["plot"] == "demo.png"


def test_a_failing_method_keeps_the_finished_runs_and_is_named(tmp_path, capsys):
    """CMRM fails for real (a layer the demo LLM does not have); baseline before it and
    TGA after it still finish and are written, and the exit code says it failed."""
    code = main(["demo", "--quick", "--out", str(tmp_path), "--override", "cmrm.layers=[99]"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "cmrm" in err and "finished runs are in" in err
    assert "FAILED: method 'cmrm' on seed 0: " in out and "layer 99 does not exist" in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["complete"] is False
    assert [(f["seed"], f["method"]) for f in saved["failed"]] == [(0, "cmrm")]
    seed = saved["per_seed"][0]
    assert set(seed["methods"]) == {"baseline", "tga"} and set(seed["failed"]) == {"cmrm"}
    for method in ("baseline", "tga"):
        assert 0.0 <= seed["methods"][method]["image_refusal_harmful"] <= 1.0
    assert set(saved["summary"]) == {"baseline", "tga"}
    assert (tmp_path / "demo.png").is_file()  # the plot shows what finished


def test_a_bad_override_is_refused_before_any_training(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--override", "cmrm.alpah=1"]) == 2
    assert "cmrm.alpah" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "--override", "shiftdc.alpha=1"]) == 2
    assert not (tmp_path / "demo.json").exists()


def test_without_matplotlib_the_plot_is_skipped_and_said(tmp_path):
    """In a process where matplotlib cannot be imported (as in an install without the
    plot extra), no PNG is written and the line printed says the plot was skipped."""
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pathlib import Path\n"
        "from lvlm_safety_plugins.demo.run import write_plot\n"
        "summary = {'baseline': {k: {'mean': 0.5, 'std': 0.0} for k in "
        "('text_refusal_harmful', 'image_refusal_harmful', 'image_refusal_benign', 'caption_accuracy')}}\n"
        f"name, note = write_plot(summary, Path({str(tmp_path)!r}))\n"
        "print(name); print(note)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["None", PLOT_SKIPPED] and "pip install 'lvlm-safety-plugins[plot]'" in PLOT_SKIPPED
    assert not (tmp_path / "demo.png").exists()
