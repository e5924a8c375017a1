"""The lvlm-safety command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import lvlm_safety_plugins


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvlm_safety_plugins.cli", *args], capture_output=True, text=True, check=check)


def test_version():
    assert run("--version").stdout.strip() == f"lvlm-safety-plugins {lvlm_safety_plugins.__version__}"


def test_recipes_list_show_validate(tmp_path):
    listed = json.loads(run("recipes", "list", "--json").stdout)
    assert {"cmrm_llava15_dataset", "cmrm_llava15_sample"} <= {r["name"] for r in listed}
    shown = json.loads(run("recipes", "show", "cmrm_llava15_sample", "cmrm.alpha=0.5", "--json").stdout)
    assert shown["cmrm"]["alpha"] == 0.5 and shown["cmrm"]["variant"] == "sample"
    text = run("recipes", "show", "cmrm_llava15_dataset").stdout
    assert "composed from:" in text and "variant: dataset" in text
    good = tmp_path / "good.yaml"
    good.write_text("defaults: [cmrm_llava15_dataset]\ncmrm: {alpha: 0.2}\n")
    assert "OK (plugins: cmrm)" in run("recipes", "validate", str(good)).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [cmrm]\ncmrm: {alpah: 0.2}\n")
    res = run("recipes", "validate", str(bad), check=False)
    assert res.returncode == 2
    assert f"lvlm-safety: error: {bad}: key 'cmrm.alpah': unknown key 'alpah'" in res.stderr
    assert "Traceback" not in res.stderr


def test_group_without_subcommand_shows_help():
    res = run("recipes", check=False)
    assert res.returncode != 0 or "usage" in res.stdout
    assert "list" in res.stdout
