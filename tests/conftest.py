"""Shared test set-up. The tiny-model fixtures (``tiny_llava``, ``tiny_llava_processor``)
come from lvlm_safety_plugins.testing, loaded through its pytest11 entry point."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_plugin_manager(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with a process-wide plugin manager built from a clean
    environment (no allow-list, autoload on), and leaves none behind."""
    from lvlm_safety_plugins.plugins import ENV_ALLOW_LIST, ENV_DISABLE_AUTOLOAD, reset_plugin_manager

    monkeypatch.delenv(ENV_ALLOW_LIST, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
