"""lmms-eval integration: a model that runs a Hugging Face vision-language model with a
recipe's plugins active, so any lmms-eval benchmark (MME, MMBench, ScienceQA, ...)
measures general ability with steering on.

Registered through lmms-eval's ``lmms_eval.models`` entry point as ``lvlm_safety_hf``::

    lmms-eval --model lvlm_safety_hf \\
        --model_args 'pretrained=/models/llava-1.5-7b-hf,recipe=cmrm_llava15_dataset,overrides=cmrm.vectors:/v.safetensors;cmrm.alpha:0.5' \\
        --tasks mme --batch_size 8 --output_path logs/

Model arguments (lmms-eval's ``key=value,key=value`` string):

* ``pretrained`` — a local model folder (anything ``lvlm_safety_plugins.loading`` loads);
* ``recipe`` — a recipe name or YAML path (omit it for the plain model, the baseline);
* ``overrides`` — recipe overrides separated by ``;`` with ``:`` in place of ``=``
  (lmms-eval's argument string reserves ``,`` and ``=``), e.g.
  ``cmrm.alpha:0.5;cmrm.layers:8-20``;
* ``device`` (``cpu``, ``cuda``), ``dtype`` (``float32``, ``float16``, ``bfloat16``,
  ``auto``), ``batch_size``, ``max_new_tokens`` (default when a task gives none),
  ``template`` (a prompt template with ``{prompt}``; default: the processor's chat
  template, else LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:``).

Generation is greedy and batched; ``until`` stop strings cut the answers.
``loglikelihood`` (multiple-choice tasks) scores the continuation's tokens after the
prompt, steered the same way. Under ``accelerate launch`` each process evaluates its
shard on its own GPU, as lmms-eval expects.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Sequence

from ..errors import DependencyError, LVLMSafetyError

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as exc:  # pragma: no cover - exercised only without lmms-eval
    raise DependencyError(
        "lvlm_safety_plugins.integrations.lmms_eval needs lmms-eval: pip install lmms-eval "
        "(see docs/evaluation.md for installing it beside a CPU build of torch)"
    ) from exc

import torch

from ..evaluation.examples import Example
from ..evaluation.generate import GenerationSettings, HFGenerator, build_prompt, image_token
from ..loading import load_model_and_processor
from ..recipe import load_recipe
from ..runtime import Runtime

MODEL_ID = "lvlm_safety_hf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": None}


def manifest() -> Any:
    """The entry point lmms-eval loads (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SafetyHF")


def parse_overrides(text: str | Sequence[str] | None) -> list[str]:
    """``"a.b:1;c:x"`` -> ``["a.b=1", "c=x"]`` (``key=value`` items pass as they are)."""
    if not text:
        return []
    items = text if isinstance(text, (list, tuple)) else str(text).split(";")
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if "=" not in item:
            key, sep, value = item.partition(":")
            if not sep:
                raise LVLMSafetyError(f"lvlm_safety_hf: override {item!r} needs key:value (e.g. cmrm.alpha:0.5)")
            item = f"{key}={value}"
        out.append(item)
    return out


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


class SafetyHF(lmms):
    """An HF vision-language model (or causal LM) for lmms-eval, steered by a recipe."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        recipe: str | None = None,
        overrides: str = "",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 256,
        template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise LVLMSafetyError(
                f"lvlm_safety_hf: unknown model_args {sorted(kwargs)}; known: pretrained, recipe, overrides, device, "
                "dtype, batch_size, max_new_tokens, template"
            )
        if dtype not in _DTYPES:
            raise LVLMSafetyError(f"lvlm_safety_hf: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size > 1 and str(device).startswith("cuda"):
            device = f"cuda:{self.accelerator.local_process_index}"
        self._device = torch.device(device)
        self._model, self.processor = load_model_and_processor(pretrained, str(self._device), _DTYPES[dtype])
        self.recipe = load_recipe(recipe, parse_overrides(overrides)) if recipe else None
        self.runtime = Runtime(self.recipe, model=self._model, processor=self.processor) if self.recipe else None
        self.settings = GenerationSettings(max_new_tokens=int(max_new_tokens), batch_size=int(batch_size), template=template)
        self.pretrained = pretrained

    # -- properties lmms-eval reads ---------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", None) or self.processor

    # -- helpers ----------------------------------------------------------------------

    @contextlib.contextmanager
    def steering(self) -> Iterator[None]:
        """The recipe's plugins, active for the body (nothing without a recipe)."""
        if self.runtime is None:
            yield
        else:
            with self.runtime.steering():
                yield

    def _example(self, context: str, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> Example:
        doc = self.task_dict[task][split][doc_id]
        visuals = _flatten(doc_to_visual(doc)) if callable(doc_to_visual) else []
        if len(visuals) > 1:
            raise LVLMSafetyError(f"lvlm_safety_hf: task {task!r} doc {doc_id} has {len(visuals)} images; the model takes one")
        token = image_token(self.processor)
        prompt = context.replace(f"{token}\n", "").replace(token, "").strip() if visuals else context
        return Example(id=f"{task}/{split}/{doc_id}", prompt=prompt, image=visuals[0] if visuals else None,
                       where=f"lmms-eval task {task} doc {doc_id}")

    # -- lmms-eval API ----------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm.auto import tqdm

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="lvlm_safety_hf", disable=self.rank != 0)
        for key, members in groups.items():
            gen_kwargs = dict(requests[members[0]].args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = GenerationSettings(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.settings.max_new_tokens),
                batch_size=self.settings.batch_size, template=self.settings.template,
            )
            generator = HFGenerator(self._model, self.processor, settings, model_id=self.pretrained)
            for start in range(0, len(members), settings.batch_size):
                chunk = members[start:start + settings.batch_size]
                examples = [self._example(requests[i].args[0], *requests[i].args[2:6]) for i in chunk]
                with self.steering():
                    texts = generator.generate(examples)
                for i, text in zip(chunk, texts):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        out = []
        for request in tqdm(requests, desc="lvlm_safety_hf loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            example = self._example(context, doc_to_visual, doc_id, task, split)
            prompt = build_prompt(self.processor, example, self.settings.template)
            score, greedy = self.score_continuation(prompt, continuation, example.image)
            out.append((score, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (score, greedy))
        return out

    @torch.no_grad()
    def score_continuation(self, prompt: str, continuation: str, image: Any = None) -> tuple[float, bool]:
        """Summed log-probability of ``continuation``'s tokens after ``prompt`` (with the
        recipe's steering), and whether greedy decoding would produce them."""
        encoder = HFGenerator(self._model, self.processor, self.settings)
        images = [image] if image is not None else []
        full = encoder.encode([prompt + continuation], images)
        n_prompt = encoder.encode([prompt], images)["input_ids"].shape[1]
        ids = full["input_ids"][0]
        n_cont = ids.shape[0] - n_prompt
        if n_cont <= 0:
            raise LVLMSafetyError(f"lvlm_safety_hf: the continuation {continuation!r} adds no tokens to the prompt")
        with self.steering():
            logits = self._model(**full).logits[0].float()
        # the continuation is the end of the sequence, also where the model splices image
        # features in and its logits are longer than input_ids
        logprobs = torch.log_softmax(logits[-n_cont - 1:-1], dim=-1)
        target = ids[-n_cont:].to(logprobs.device)
        score = float(logprobs.gather(1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return score, greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("lvlm_safety_hf does not implement multi-round generation")


__all__ = ["MODEL_ID", "SafetyHF", "manifest", "parse_overrides"]
