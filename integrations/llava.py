"""Integration with the LLaVA framework (haotian-liu/LLaVA, PyPI ``llava-torch``).

Training: the single line at the top of LLaVA's ``llava/train/train.py`` (or
``train_mem.py``)::

    import lvlm_safety_plugins.integrations.llava as lsp; lsp.install("tga_llava15_finetune")

makes an unchanged ``train()`` run apply the recipe's loss plugins:

- ``LazySupervisedDataset.__getitem__`` runs ``prepare_example`` on the raw record
  before LLaVA tokenizes it (TGA puts the retrieved text before the image there), and
  keeps the prepared record for the collator;
- LLaVA's ``preprocess_multimodal`` moves ``<image>`` to the front of the human turn;
  for a record whose retrieved text a plugin inserted before the image, the order is
  put back (retrieved text, then the image);
- ``DataCollatorForSupervisedDataset`` runs ``collate`` after LLaVA's own collation;
- ``LLaVATrainer`` gets :class:`~lvlm_safety_plugins.integrations.hf_training.SafetyTrainerMixin`:
  loss terms added and logged, plugin state in checkpoints (also LLaVA's adapter-only
  checkpoints of ``--tune_mm_mlp_adapter``), the ``tokenizer=`` argument mapped to
  ``processing_class`` on transformers 5.x;
- ``safe_save_model_for_hf_trainer`` also writes the plugin state (and any plugin
  parameters) beside ``mm_projector.bin``.

Image positions come from the LLaVA adapter, which reproduces
``prepare_inputs_labels_for_multimodal``'s splice at ``IMAGE_TOKEN_INDEX``. LLaVA's own
arguments are respected as they are (``--tune_mm_mlp_adapter``, ``--version plain``,
``v1``, ``llava_llama_2``, ``mistral_instruct``): nothing here reads or changes them.
``uninstall()`` restores everything. Without ``install``, importing this package changes
nothing in LLaVA.

Inference: :func:`install_inference` (``load_pretrained_model`` + ``generate``, and
LLaVA's eval scripts) or :func:`apply_steering` on a loaded model apply a recipe's
steering (CMRM); the LLaVA framework's ``generate`` splices the image in before the
first forward, and the steering reads the layout from the ids it was given.

The recipe may also come from the command line or the environment, so the one line
needs no argument: ``import lvlm_safety_plugins.integrations.llava_register`` reads
``--safety_recipe NAME`` and ``--safety_override key=value`` (removed from ``sys.argv``
before LLaVA parses it) or ``LVLM_SAFETY_RECIPE``.

transformers 5.x removed ``transformers.trainer.ALL_LAYERNORM_LAYERS``, which LLaVA's
trainer imports; :func:`ensure_llava_importable` (called by ``install``) restores it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..fileio import atomic_output_path, atomic_write_text
from ..recipe import Recipe
from ..runtime import Runtime
from ..runtime import EXTRAS_KEY
from .hf_training import SafetyTrainerMixin

EXAMPLE_KEY = "lvlm_example"
PLUGIN_STATE_FILE = "lvlm_safety_state.json"
PLUGIN_PARAMS_FILE = "lvlm_safety_plugins.safetensors"

_patches: list[tuple[Any, str, Any]] = []
_runtime: Runtime | None = None
_current = threading.local()


def ensure_llava_importable() -> None:
    """Make ``import llava.train.train`` work on transformers 5.x (restores
    ``transformers.trainer.ALL_LAYERNORM_LAYERS``, which LLaVA's trainer imports)."""
    from ..compat import restore_trainer_layernorm_layers

    restore_trainer_layernorm_layers()


def _patch(owner: Any, name: str, value: Any) -> None:
    _patches.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def installed_runtime() -> Runtime | None:
    """The runtime of the active :func:`install`, or ``None``."""
    return _runtime


def uninstall() -> None:
    """Undo :func:`install` (LLaVA behaves exactly as before)."""
    global _runtime
    while _patches:
        owner, name, original = _patches.pop()
        setattr(owner, name, original)
    _runtime = None


def _reorder_retrieved(value: str, inserted: str) -> str:
    """Put a plugin's text inserted before ``<image>`` back before it after LLaVA moved
    the image token (and its start/end tags) to the front of the turn."""
    text = inserted.strip()
    idx = value.find(text)
    if idx <= 0:
        return value
    head = value[:idx]
    if "<image>" not in head or not head.endswith("\n"):
        return value
    rest = value[idx + len(text):].lstrip()
    return text + " " + head + rest


def install(
    recipe: Recipe | str | Mapping[str, Any],
    overrides: Sequence[str] = (),
) -> Runtime:
    """Apply a recipe's loss plugins to LLaVA's training; returns the runtime.

    Call it before ``llava.train.train.train()`` runs (at the top of ``train.py``).
    Calling it again replaces the previous installation.
    """
    global _runtime
    uninstall()
    ensure_llava_importable()
    import llava.train.train as T

    from ..methods.tga.method import INSERTED

    runtime = Runtime(recipe, overrides=overrides)
    _runtime = runtime

    dataset_cls = T.LazySupervisedDataset
    orig_getitem = dataset_cls.__getitem__

    def __getitem__(self: Any, i: Any) -> dict[str, Any]:
        if not isinstance(i, int):
            return orig_getitem(self, i)
        record = self.list_data_dict[i]
        prepared = runtime.prepare_example(record)
        self.list_data_dict[i] = prepared
        _current.inserted = prepared.get(INSERTED)
        try:
            data = orig_getitem(self, i)
        finally:
            self.list_data_dict[i] = record
            _current.inserted = None
        data[EXAMPLE_KEY] = prepared
        return data

    orig_preprocess_multimodal = T.preprocess_multimodal

    def preprocess_multimodal(sources: Any, data_args: Any) -> Any:
        out = orig_preprocess_multimodal(sources, data_args)
        inserted = getattr(_current, "inserted", None)
        if inserted:
            for source in out:
                for sentence in source:
                    sentence["value"] = _reorder_retrieved(sentence["value"], inserted)
        return out

    collator_cls = T.DataCollatorForSupervisedDataset
    orig_collate = collator_cls.__call__

    def __call__(self: Any, instances: Sequence[dict[str, Any]]) -> dict[str, Any]:
        examples = [inst.get(EXAMPLE_KEY, {}) for inst in instances]
        stripped = [{k: v for k, v in inst.items() if k != EXAMPLE_KEY} for inst in instances]
        batch = orig_collate(self, stripped)
        if runtime.tokenizer is None:
            runtime.tokenizer = self.tokenizer  # LLaVA's collator holds the tokenizer
        extras = runtime.collate(examples, batch)
        if extras:
            batch[EXTRAS_KEY] = extras
        return batch

    base_trainer = T.LLaVATrainer
    from ..compat import trainer_tokenizer_kwargs

    class SafetyLLaVATrainer(SafetyTrainerMixin, base_trainer):  # type: ignore[misc,valid-type]
        """LLaVA's trainer with the installed recipe's loss plugins."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs = trainer_tokenizer_kwargs(kwargs)
            super().__init__(*args, recipe=runtime, wrap_collator=False, **kwargs)

    orig_save = T.safe_save_model_for_hf_trainer

    def safe_save_model_for_hf_trainer(trainer: Any, output_dir: str) -> None:
        orig_save(trainer=trainer, output_dir=output_dir)
        if trainer.args.should_save:
            save_plugin_state(runtime, output_dir)

    _patch(dataset_cls, "__getitem__", __getitem__)
    _patch(T, "preprocess_multimodal", preprocess_multimodal)
    _patch(collator_cls, "__call__", __call__)
    _patch(T, "LLaVATrainer", SafetyLLaVATrainer)
    _patch(T, "safe_save_model_for_hf_trainer", safe_save_model_for_hf_trainer)
    return runtime


_inference_patches: list[tuple[Any, str, Any]] = []
_inference_handles: list[Any] = []
EVAL_MODULES = ("llava.eval.run_llava", "llava.eval.model_vqa", "llava.eval.model_vqa_loader", "llava.serve.cli")


def apply_steering(model: Any, recipe: Recipe | str | Mapping[str, Any], overrides: Sequence[str] = (), *,
                   tokenizer: Any = None, image_processor: Any = None) -> Runtime:
    """Install a recipe's steering (CMRM) on a model loaded with LLaVA's
    ``load_pretrained_model``; the handles stay until :func:`uninstall_inference`.
    Use ``Runtime(...).steering(model)`` instead for a ``with`` block."""
    from types import SimpleNamespace

    runtime = Runtime(recipe, overrides=overrides, model=model,
                      processor=SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor), tokenizer=tokenizer)
    _inference_handles.extend(runtime.install_steering())
    return runtime


def install_inference(recipe: Recipe | str | Mapping[str, Any], overrides: Sequence[str] = ()) -> None:
    """Steer every model that LLaVA's ``load_pretrained_model`` loads (in
    ``llava.model.builder`` and in LLaVA's eval scripts, which import it by name), so
    ``llava.eval.run_llava``, ``llava.eval.model_vqa`` and friends run with the recipe's
    steering. Steering is context-local: it acts in the thread that loaded the model."""
    import importlib

    import llava.model.builder as builder

    uninstall_inference()
    original = builder.load_pretrained_model

    def load_pretrained_model(*args: Any, **kwargs: Any) -> Any:
        tokenizer, model, image_processor, context_len = original(*args, **kwargs)
        apply_steering(model, recipe, overrides, tokenizer=tokenizer, image_processor=image_processor)
        return tokenizer, model, image_processor, context_len

    targets = [builder]
    for name in EVAL_MODULES:
        try:
            targets.append(importlib.import_module(name))
        except ImportError:  # an eval script whose own needs are not installed
            continue
    for module in targets:
        if getattr(module, "load_pretrained_model", None) is original:
            _inference_patches.append((module, "load_pretrained_model", original))
            module.load_pretrained_model = load_pretrained_model


def uninstall_inference() -> None:
    """Remove the steering installed by :func:`install_inference` / :func:`apply_steering`
    and restore ``load_pretrained_model``."""
    while _inference_handles:
        _inference_handles.pop().remove()
    while _inference_patches:
        module, name, original = _inference_patches.pop()
        setattr(module, name, original)


def save_plugin_state(runtime: Runtime, output_dir: str | Path) -> list[str]:
    """Write the plugin state (``lvlm_safety_state.json``) and, for methods that hold
    trainable parameters (``trainable_state()``), ``lvlm_safety_plugins.safetensors``
    into ``output_dir`` (beside LLaVA's ``mm_projector.bin``). Returns the files."""
    import json

    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "recipe": runtime.recipe.to_dict(),
        "methods": {n: m.state_dict() for n, m in runtime.methods.items() if hasattr(m, "state_dict")},
    }
    atomic_write_text(out / PLUGIN_STATE_FILE, json.dumps(state, indent=2))
    written = [str(out / PLUGIN_STATE_FILE)]
    tensors: dict[str, torch.Tensor] = {}
    for name, method in runtime.methods.items():
        get: Callable[[], Mapping[str, torch.Tensor]] | None = getattr(method, "trainable_state", None)
        if get is not None:
            for key, value in get().items():
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    if tensors:
        with atomic_output_path(out / PLUGIN_PARAMS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "writer": "lvlm-safety-plugins"})
        written.append(str(out / PLUGIN_PARAMS_FILE))
    return written


__all__ = [
    "apply_steering",
    "ensure_llava_importable",
    "install",
    "install_inference",
    "installed_runtime",
    "save_plugin_state",
    "uninstall",
    "uninstall_inference",
]
