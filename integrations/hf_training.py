"""Hugging Face transformers training integration: a Trainer whose loss carries the
recipe's loss terms, and collators that feed the plugins.

Installed as ``lvlm_safety_plugins.integrations.hf_training``::

    from lvlm_safety_plugins.integrations.hf_training import SafetyTrainer, LlavaSFTCollator

    trainer = SafetyTrainer(
        model=model, args=TrainingArguments(...), train_dataset=rows,
        data_collator=LlavaSFTCollator(processor),
        recipe="tga_llava15_finetune", processor=processor,
    )
    trainer.train()

Each loss term (``tga/pair``, ``tga/rank``, ...) is added to the host loss and logged
under its own name through the Trainer's own logging (so TensorBoard, W&B and
``trainer.state.log_history`` show it), averaged over the logging window and across
processes like the Trainer's ``loss``. Plugin state is saved in every checkpoint
(``lvlm_safety_state.json``) and restored on ``train(resume_from_checkpoint=...)``;
schedules follow the Trainer's restored ``global_step``, so a resumed run continues
where it stopped. Works with the ``compute_loss``/``log`` signatures of transformers
4.37 and 5.x.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import Trainer

from ..compat import rng_state_loading, trainer_term_scale, trainer_tokenizer
from ..errors import ConfigError, DataError, DependencyError
from ..recipe import Recipe
from ..runtime import EXTRAS_KEY, Runtime

STATE_FILE = "lvlm_safety_state.json"


class SafetyCollator:
    """Wraps a host collator: runs ``prepare_example`` on every example, the host
    collator on the prepared examples, then ``collate``; plugin tensors go under
    ``batch["lvlm_safety"]`` (removed again before the host model's forward)."""

    def __init__(self, collator: Callable[[list[dict]], dict], runtime: Runtime) -> None:
        self.collator = collator
        self.runtime = runtime

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        prepared = [self.runtime.prepare_example(dict(e)) for e in examples]
        batch = dict(self.collator(prepared))
        extras = self.runtime.collate(prepared, batch)
        if extras:
            batch[EXTRAS_KEY] = extras
        return batch


class LlavaSFTCollator:
    """Builds supervised batches for HF ``LlavaForConditionalGeneration``.

    Examples: ``{"image": PIL image or path, "prompt": "USER: <image> ... ASSISTANT:",
    "response": "..."}``. The loss is on the response tokens only. Each example is
    processed on its own by the real processor, then padded on ``padding_side``.
    """

    def __init__(self, processor: Any, *, padding_side: str = "right", max_length: int | None = None, add_eos: bool = True) -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor = processor
        self.padding_side = padding_side
        self.max_length = max_length
        self.add_eos = add_eos

    def _image(self, example: Mapping[str, Any]) -> Any:
        from PIL import Image

        image = example.get("image")
        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as img:
                    return img.convert("RGB")
            except (OSError, ValueError) as exc:
                raise DataError(f"example {example.get('id', '?')}: cannot read image {image}: {exc}") from None
        return image

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from lvlm_safety_plugins.adapters.base import repad

        tok = self.processor.tokenizer
        ids_rows, label_rows, pixels = [], [], []
        for ex in examples:
            for key in ("prompt", "response"):
                if not isinstance(ex.get(key), str):
                    raise DataError(f"example {ex.get('id', '?')}: field {key!r} must be a string")
            image = self._image(ex)
            text = ex["prompt"] + " " + ex["response"]
            if self.add_eos and tok.eos_token:
                text = text + " " + tok.eos_token
            images = [image] if image is not None else None
            prompt_ids = self.processor(text=ex["prompt"], images=images, return_tensors="pt")["input_ids"][0]
            enc = self.processor(text=text, images=images, return_tensors="pt")
            ids = enc["input_ids"][0]
            if self.max_length is not None:
                ids = ids[: self.max_length]
            labels = ids.clone()
            n = min(len(prompt_ids), len(ids))
            labels[:n] = -100
            ids_rows.append(ids)
            label_rows.append(labels)
            if image is not None:
                pixels.append(enc["pixel_values"][0])
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batch = {
            "input_ids": repad(ids_rows, pad, self.padding_side),
            "attention_mask": repad([torch.ones_like(r) for r in ids_rows], 0, self.padding_side),
            "labels": repad(label_rows, -100, self.padding_side),
        }
        if pixels:
            if len(pixels) != len(examples):
                raise DataError("a batch must have an image in every example or in none")
            batch["pixel_values"] = torch.stack(pixels)
        return batch


class SafetyTrainerMixin:
    """Adds a recipe's loss terms to any ``transformers.Trainer`` subclass.

    Extra constructor arguments: ``recipe`` (a :class:`Recipe`, its name or path, a
    mapping, or a :class:`Runtime`), ``recipe_overrides``, ``processor`` (for plugins
    that tokenize; default: the Trainer's own tokenizer / processing class) and
    ``wrap_collator`` (False when the host's dataset and collator already call the
    plugins, as the LLaVA integration's do).
    """

    def __init__(
        self,
        *args: Any,
        recipe: Recipe | Runtime | str | Mapping[str, Any],
        recipe_overrides: Sequence[str] = (),
        processor: Any = None,
        wrap_collator: bool = True,
        **kwargs: Any,
    ) -> None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise DependencyError(
                f"{type(self).__name__} runs transformers' Trainer, which needs accelerate: "
                "pip install 'accelerate>=0.26' (lvlm-safety-plugins depends on it; was it installed with --no-deps?)"
            )
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        host_tok = trainer_tokenizer(self)
        tokenizer = getattr(processor, "tokenizer", None) or getattr(host_tok, "tokenizer", None) or host_tok
        self.safety = Runtime.coerce(recipe, recipe_overrides, processor=processor, tokenizer=tokenizer)
        self.safety.bind(self.model)  # type: ignore[attr-defined]
        # plugin fields (captions, retrieved text) must reach the collator
        self.args.remove_unused_columns = False  # type: ignore[attr-defined]
        if wrap_collator:
            self.data_collator = SafetyCollator(self.data_collator, self.safety)  # type: ignore[attr-defined,has-type]
        self._lvlm_sums: dict[str, float] = {}
        self._lvlm_counts: dict[str, int] = {}

    # -- loss ---------------------------------------------------------------------

    def _term_scale(self, num_items_in_batch: Any) -> float:
        """Factor that puts a per-micro-batch mean term on the host loss's scale."""
        return trainer_term_scale(self, num_items_in_batch)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]

        def host_forward(batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
            return super(SafetyTrainerMixin, self).compute_loss(model, batch, return_outputs=True, **kwargs)  # type: ignore[misc]

        result = self.safety.training_step(
            unwrapped, inputs, step=int(state.global_step), max_steps=int(state.max_steps or 0),
            forward=host_forward, term_scale=self._term_scale(kwargs.get("num_items_in_batch")),
        )
        if model.training:
            for name, value in result.metrics.items():
                self._lvlm_sums[name] = self._lvlm_sums.get(name, 0.0) + float(value)
                self._lvlm_counts[name] = self._lvlm_counts.get(name, 0) + 1
        return (result.loss, result.outputs) if return_outputs else result.loss

    # -- logging ------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._lvlm_counts:
            names = sorted(self._lvlm_counts)
            device = self.args.device  # type: ignore[attr-defined]
            local = torch.tensor([[self._lvlm_sums[n], self._lvlm_counts[n]] for n in names], dtype=torch.float64, device=device)
            total = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(names), 2).sum(0)  # type: ignore[attr-defined]
            for name, (s, c) in zip(names, total.tolist()):
                if c:
                    logs[name] = round(s / c, 6)
            self._lvlm_sums.clear()
            self._lvlm_counts.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # -- checkpoints --------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        super()._save_checkpoint(model, trial, *args, **kwargs)  # type: ignore[misc]
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        state = {
            "global_step": int(self.state.global_step),  # type: ignore[attr-defined]
            "recipe": self.safety.recipe.to_dict(),
            "methods": {n: m.state_dict() for n, m in self.safety.methods.items() if hasattr(m, "state_dict")},
        }
        tmp = folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, folder / STATE_FILE)

    def _load_rng_state(self, checkpoint: Any) -> None:
        with rng_state_loading():
            return super()._load_rng_state(checkpoint)  # type: ignore[misc]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        path = Path(resume_from_checkpoint) / STATE_FILE
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the plugin state: {exc}") from None
        for name, method_state in (state.get("methods") or {}).items():
            method = self.safety.methods.get(name)
            if method is not None and hasattr(method, "load_state_dict"):
                method.load_state_dict(method_state)
        self.safety.resumed_state = state


class SafetyTrainer(SafetyTrainerMixin, Trainer):
    """``transformers.Trainer`` with a recipe's loss plugins."""


__all__ = ["EXTRAS_KEY", "LlavaSFTCollator", "SafetyCollator", "SafetyTrainer", "SafetyTrainerMixin"]
