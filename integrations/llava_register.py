"""One import line that installs a recipe into LLaVA's training.

Add at the top of ``llava/train/train_mem.py`` (or ``train.py``)::

    import lvlm_safety_plugins.integrations.llava_register  # noqa: F401

and pass the recipe on LLaVA's command line (removed before LLaVA parses it)::

    deepspeed llava/train/train_mem.py ... --safety_recipe tga_llava15_finetune \\
        --safety_override tga.layers=8-16

or in the environment: ``LVLM_SAFETY_RECIPE=tga_llava15_finetune``. With neither, the
import does nothing.
"""

from __future__ import annotations

import os
import sys


def _take_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    recipe, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in ("--safety_recipe", "--safety-recipe", "--safety_override", "--safety-override"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"lvlm-safety: {key} needs a value")
                value = argv[i + 1]
                i += 1
            if "recipe" in key:
                recipe = value
            else:
                overrides.append(value)
        else:
            rest.append(arg)
        i += 1
    return recipe, overrides, rest


_recipe, _overrides, _rest = _take_args(sys.argv[1:])
sys.argv[1:] = _rest
_recipe = _recipe or os.environ.get("LVLM_SAFETY_RECIPE")
if _recipe:
    from .llava import install

    install(_recipe, _overrides)
