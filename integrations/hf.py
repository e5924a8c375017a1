"""Hugging Face transformers inference integration: a recipe's steering around
``generate`` and the ``image-text-to-text`` pipeline.

Installed as ``lvlm_safety_plugins.integrations.hf``::

    from lvlm_safety_plugins.integrations.hf import recipe_steering, steered_generate

    with recipe_steering(model, "cmrm_llava15_dataset", ["cmrm.vectors=v.safetensors"], processor=processor):
        out = model.generate(**inputs)

    out = steered_generate(model, "cmrm_llava15_sample", processor=processor, **inputs)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

from ..recipe import Recipe
from ..runtime import Runtime


def _runtime(model: Any, recipe: Recipe | Runtime | str | Mapping[str, Any], overrides: Sequence[str], processor: Any) -> Runtime:
    return Runtime.coerce(recipe, overrides, model=model, processor=processor)


@contextlib.contextmanager
def recipe_steering(
    model: Any, recipe: Recipe | Runtime | str | Mapping[str, Any], overrides: Sequence[str] = (), *, processor: Any = None
) -> Iterator[Runtime]:
    """Every steering plugin of ``recipe`` active on ``model`` inside the block."""
    runtime = _runtime(model, recipe, overrides, processor)
    with runtime.steering(model):
        yield runtime


def steered_generate(
    model: Any, recipe: Recipe | Runtime | str | Mapping[str, Any], overrides: Sequence[str] = (), *, processor: Any = None, **generate_kwargs: Any
) -> Any:
    """``model.generate(**generate_kwargs)`` with the recipe's steering active."""
    with recipe_steering(model, recipe, overrides, processor=processor):
        return model.generate(**generate_kwargs)


@contextlib.contextmanager
def steered_pipeline(pipe: Any, recipe: Recipe | Runtime | str | Mapping[str, Any], overrides: Sequence[str] = ()) -> Iterator[Any]:
    """Steer an ``image-text-to-text`` pipeline's model inside the block; yields the
    pipeline. Steering is context-local (see :mod:`lvlm_safety_plugins.steering`):
    call the pipeline in the same thread."""
    processor = getattr(pipe, "processor", None)
    with recipe_steering(pipe.model, recipe, overrides, processor=processor):
        yield pipe


__all__ = ["recipe_steering", "steered_generate", "steered_pipeline"]
