"""The ``tga`` loss plugin.

Per training step (through the lifecycle hooks):

1. ``prepare_example``: the retrieved text is put into the prompt right before the
   image placeholder with ``retrieved_template``; when it equals the caption, only its
   first half is used (as in the reference code), so the answer is not handed over.
2. ``collate``: the caption is tokenized for the teacher pass, and the retrieved-text
   tokens are located in each row's ``input_ids`` (a mask, never an offset).
3. ``before_forward``: the caption teacher pass (text only, no grad, eval mode, the
   decoder stopped after the deepest TGA layer) is pooled per layer on the fly. With
   ``caption_context: prompt`` (the default, as the reference code) each row's teacher
   sequence is the training row's own tokens up to its first image token, without the
   retrieved text and the image start markers (as the text-only variant), followed by
   the caption's tokens in the image slot; only the
   caption's tokens are pooled (never BOS, the system prompt or the template, whose
   massive activations would dominate a mean). Capture hooks are installed for the
   training forward over the image tokens and the retrieved-text tokens (in decoder
   coordinates). Reentrant gradient checkpointing is switched to non-reentrant (same
   gradients), since under it the captured states would carry no gradient.
4. ``loss_terms``: the two terms of the section's ``formula``, in torch, so both carry
   gradients to the projector: ``tga/pair`` (alignment: ``paper`` sum over layers of
   -cos(img, cap); ``reference`` mean exp(-cos(img, cap))) and ``tga/rank`` (ranking:
   ``paper`` sum over layers of softplus(cos(ret, cap) - cos(img, cap)); ``reference``
   mean exp(cos(ret, cap) - cos(img, cap))), each times its weight and schedule factor
   (:func:`~.config.effective_settings`). Their unweighted values are logged under the
   formula's own names, ``tga/paper/pair`` ... or ``tga/reference/pair`` ..., also with
   ``schedule: none`` (the released code's training: terms logged, not trained; its
   ``math.exp`` gives no gradient). Rows without retrieved text (LLaVA's pretrain
   stage) are left out of the rank term; with none in the batch the term is skipped,
   never NaN.
5. the capture's hooks are removed by the runtime after ``loss_terms``, also when the
   forward raised (no ``step_end`` needed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ... import compat
from ...capture import ForwardCapture, HiddenCapture, eval_mode
from ...errors import ConfigError, GradientError, LVLMSafetyError
from ...markers import hookimpl
from ..base import Method
from ..layers import parse_layers
from .config import CaptionContext, Formula, Schedule, TGAConfig, effective_settings

if TYPE_CHECKING:  # pragma: no cover
    from ...adapters.base import ModelAdapter
    from ...runtime import StepContext

#: batch entries this plugin adds through ``collate``
CAPTION_IDS = "tga_caption_input_ids"
CAPTION_MASK = "tga_caption_attention_mask"
RETRIEVED_MASK = "tga_retrieved_mask"
#: field prepare_example writes: the exact text inserted into the prompt
INSERTED = "tga_inserted_text"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def schedule_factors(schedule: Schedule | str, progress: float) -> tuple[float, float]:
    """(pair factor, rank factor) at ``progress`` = step / max_steps."""
    try:
        schedule = schedule if isinstance(schedule, Schedule) else Schedule[str(schedule)]
    except KeyError:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: decay (also named paper), constant, none") from None
    r = min(max(float(progress), 0.0), 1.0)
    if schedule is Schedule.decay:
        return 1.0 - r, (1.0 - r) ** 2
    if schedule is Schedule.constant:
        return 1.0, 1.0
    return 0.0, 0.0  # none


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is upcast; float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def tga_terms(
    img: torch.Tensor,
    cap: torch.Tensor,
    ret: torch.Tensor | None = None,
    *,
    valid: torch.Tensor | None = None,
    ret_valid: torch.Tensor | None = None,
    formula: Formula | str = Formula.paper,
) -> dict[str, torch.Tensor]:
    """The two unweighted TGA terms from pooled states of shape ``[layers, batch, hidden]``.

    ``formula="paper"`` (arXiv 2410.12662's equation), summed over layers and averaged
    over the valid rows: ``pair`` = sum_l mean_b -cos(img, cap), ``rank`` = sum_l mean_b
    softplus(cos(ret, cap) - cos(img, cap)) (= log(1 + exp(-(cos(img, cap) - cos(ret, cap)))),
    computed stably) over the rows with retrieved text.

    ``formula="reference"`` (the released code's), averaged over layers and rows:
    ``pair`` = mean exp(-cos(img, cap)), ``rank`` = mean exp(cos(ret, cap) - cos(img, cap)).

    A term with no rows is left out (never NaN); ``cos_img_cap`` is the mean cosine
    (detached).
    """
    try:
        formula = formula if isinstance(formula, Formula) else Formula[str(formula)]
    except KeyError:
        raise ConfigError(f"unknown formula {formula!r}; valid: paper, reference") from None
    cos_ic = F.cosine_similarity(_compute_dtype(img), _compute_dtype(cap).to(img.device), dim=-1)  # [L, B]
    valid = torch.ones(cos_ic.shape[1], dtype=torch.bool, device=cos_ic.device) if valid is None else valid.to(cos_ic.device)
    paper = formula is Formula.paper
    out: dict[str, torch.Tensor] = {}
    if bool(valid.any()):
        pair = -cos_ic[:, valid] if paper else torch.exp(-cos_ic[:, valid])
        out["pair"] = pair.mean(dim=1).sum() if paper else pair.mean()
        out["cos_img_cap"] = cos_ic[:, valid].detach().mean()
    if ret is not None:
        rv = valid if ret_valid is None else (ret_valid.to(cos_ic.device) & valid)
        if bool(rv.any()):
            cos_rc = F.cosine_similarity(_compute_dtype(ret), _compute_dtype(cap).to(ret.device), dim=-1)
            margin = cos_rc[:, rv] - cos_ic[:, rv]
            out["rank"] = F.softplus(margin).mean(dim=1).sum() if paper else torch.exp(margin).mean()
    return out


def find_subsequence(row: Sequence[int], pattern: Sequence[int]) -> int:
    """Start of the last occurrence of ``pattern`` in ``row``, or -1."""
    n, m = len(row), len(pattern)
    if m == 0 or m > n:
        return -1
    for start in range(n - m, -1, -1):
        if list(row[start : start + m]) == list(pattern):
            return start
    return -1


def locate_text(tokenizer: Any, row: Sequence[int], text: str) -> tuple[int, int] | None:
    """``(start, length)`` of the last place ``text``'s tokens stand in ``row``, trying
    the tokenizations a text gets inside a prompt (stripped, as is, after a space);
    None where none of them is found."""
    for variant in dict.fromkeys((text.strip(), text, " " + text.strip())):
        pattern = tokenizer(variant, add_special_tokens=False)["input_ids"]
        start = find_subsequence(row, pattern)
        if start >= 0:
            return start, len(pattern)
    return None


class TGA(Method):
    """Text-guided alignment of image-token hidden states to caption hidden states."""

    name = "tga"
    kind = "loss"
    config_class = TGAConfig
    description = "TGA text-guided alignment loss (Xu et al., ICLR 2025, arXiv 2410.12662)"

    def __init__(self, config: Any, runtime: Any = None) -> None:
        super().__init__(config, runtime)
        self._layers: list[int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this method (the resolved layers)."""
        return {"layers": self._layers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layers = state.get("layers")
        self._layers = list(layers) if layers is not None else None

    # -- layers ------------------------------------------------------------------

    def layers(self, adapter: "ModelAdapter") -> list[int]:
        """The layer ids the loss is computed at, resolved once per run."""
        if self._layers is None:
            spec = self.config.layers
            if isinstance(spec, str) and spec.strip().lower() == "auto":
                spec = self._layers_from_analysis(self.config.analysis)
            self._layers = adapter.resolve_layers(parse_layers(spec))
        return self._layers

    @staticmethod
    def _layers_from_analysis(path: str) -> list[int]:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LVLMSafetyError(f"{path}: analysis file not found (write it with `lvlm-safety analyze`)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise LVLMSafetyError(f"{path}: cannot read the analysis file: {exc}") from None
        layers = data.get("safety_layers") if isinstance(data, dict) else None
        if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
            raise LVLMSafetyError(f"{path}: key 'safety_layers' must be a non-empty list of layer ids")
        return layers

    # -- data --------------------------------------------------------------------

    def _retrieved_text(self, example: Mapping[str, Any]) -> str | None:
        ret = example.get(self.config.retrieved_key)
        if isinstance(ret, (list, tuple)):
            ret = ret[0] if ret else None
        if not isinstance(ret, str) or not ret.strip():
            return None
        cap = example.get(self.config.caption_key)
        if isinstance(cap, str) and _norm(cap) == _norm(ret):
            words = ret.split()
            ret = " ".join(words[: max(1, len(words) // 2)])
        return ret.strip()

    def _insert(self, prompt: str, text: str) -> tuple[str, str]:
        inserted = self.config.retrieved_template.format(text=text)
        placeholder = self.config.image_placeholder
        if placeholder in prompt:
            i = prompt.index(placeholder)
            return prompt[:i] + inserted + prompt[i:], inserted
        return inserted + prompt, inserted

    @hookimpl
    def prepare_example(self, example: dict) -> dict | None:
        """Insert the retrieved text before the image placeholder of the prompt (the
        ``prompt`` field, or the first human turn of LLaVA ``conversations``)."""
        ret = self._retrieved_text(example)
        if ret is None:
            return None
        if "conversations" in example:
            turns = [dict(t) for t in example["conversations"]]
            for turn in turns:
                if turn.get("from") == "human":
                    turn["value"], inserted = self._insert(turn["value"], ret)
                    break
            else:
                return None
            return {"conversations": turns, INSERTED: inserted}
        if isinstance(example.get("prompt"), str):
            prompt, inserted = self._insert(example["prompt"], ret)
            return {"prompt": prompt, INSERTED: inserted}
        return None

    def _tokenizer(self) -> Any:
        tok = getattr(self.runtime, "tokenizer", None) if self.runtime is not None else None
        if tok is None:
            raise LVLMSafetyError(
                "tga needs a tokenizer: the integration sets runtime.tokenizer (pass tokenizer=/processor= to it)"
            )
        return tok

    @hookimpl
    def collate(self, examples: Sequence[dict], batch: dict) -> dict[str, torch.Tensor] | None:
        """Caption tokens for the teacher pass and the retrieved-text mask."""
        tok = self._tokenizer()
        captions = [e.get(self.config.caption_key) for e in examples]
        captions = [c if isinstance(c, str) and c.strip() else "" for c in captions]
        out: dict[str, torch.Tensor] = {}
        if any(captions):
            # in the prompt's template the caption's own tokens go in the image slot: no BOS
            special = self.config.caption_context == CaptionContext.bare
            enc = tok(captions, padding=True, truncation=True, max_length=int(self.config.caption_max_length),
                      return_tensors="pt", add_special_tokens=special)
            mask = enc["attention_mask"].clone()
            for i, c in enumerate(captions):
                if not c:
                    mask[i] = 0
            out[CAPTION_IDS] = enc["input_ids"]
            out[CAPTION_MASK] = mask
        input_ids = batch.get("input_ids")
        if input_ids is not None and any(e.get(INSERTED) for e in examples):
            ret_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for i, e in enumerate(examples):
                text = e.get(INSERTED)
                if not text:
                    continue
                found = locate_text(tok, input_ids[i].tolist(), text)
                if found is not None:
                    ret_mask[i, found[0] : found[0] + found[1]] = True
            out[RETRIEVED_MASK] = ret_mask
        return out or None

    # -- training step -----------------------------------------------------------

    def teacher_batch(self, adapter: "ModelAdapter", batch: Mapping[str, Any], caption_ids: torch.Tensor,
                      caption_mask: torch.Tensor, retrieved: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The caption teacher pass's inputs: ``input_ids``, ``attention_mask`` (right
        padded) and ``caption_mask``, the caption's own tokens (what is pooled).

        Row b is the training row's real tokens before its first image token, less
        the ``retrieved`` ones (TGA's inserted text) and less the image markers
        (``adapter.marker_token_ids()``: Gemma 3's ``<start_of_image>``, Qwen's
        ``<|vision_start|>``, ...; as the text-only variant drops them: a marker opens an
        image the LLM never saw followed by text), then row b's caption tokens: the
        caption stands where the image stood, in the same template. A row without an
        image or caption gets its caption (or one pad token) alone and an empty
        ``caption_mask``."""
        # every row at once (no per-row loop, no host sync per row): each kept prefix
        # token and each caption token is written at its rank in its output row
        input_ids = batch["input_ids"]
        device, dtype = input_ids.device, input_ids.dtype
        rows, length = input_ids.shape
        attention = batch.get("attention_mask")
        attention = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.to(device).bool()
        image = adapter.image_token_positions(input_ids) & attention
        captions = caption_mask.to(device).bool()
        caption_tokens = caption_ids.to(device, dtype)
        has_image = image.any(dim=1)
        valid = has_image & captions.any(dim=1)
        first_image = torch.where(has_image, image.int().argmax(dim=1), torch.full_like(has_image, length, dtype=torch.long))
        keep = attention & (torch.arange(length, device=device) < first_image[:, None]) & valid[:, None]
        if retrieved is not None:
            keep &= ~retrieved.to(device).bool()
        markers = torch.tensor(adapter.marker_token_ids(), dtype=dtype, device=device)
        if markers.numel():
            keep &= ~torch.isin(input_ids, markers)
        prefix = keep.sum(dim=1)
        total = prefix + captions.sum(dim=1).clamp(min=1)  # a row without a caption gets one pad token
        width = int(total.max()) if rows else 0
        ids = torch.full((rows, width), adapter.pad_token_id, dtype=dtype, device=device)
        row_of = torch.arange(rows, device=device)[:, None]
        ids[row_of.expand_as(keep)[keep], (keep.cumsum(dim=1) - 1)[keep]] = input_ids[keep]
        at = prefix[:, None] + captions.cumsum(dim=1) - 1
        ids[row_of.expand_as(captions)[captions], at[captions]] = caption_tokens[captions]
        column = torch.arange(width, device=device)[None, :]
        real = column < total[:, None]
        return {"input_ids": ids, "attention_mask": real.long(),
                "caption_mask": real & (column >= prefix[:, None]) & valid[:, None]}

    def teacher_states(self, model: torch.nn.Module, adapter: "ModelAdapter", batch: Mapping[str, Any],
                       extras: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption teacher pass; returns ``(states, pooled)``: the caption states
        pooled at the TGA layers, ``[layers, batch, hidden]``, and the positions pooled,
        ``[batch, length]``. The captions stand in the rows' template
        (:meth:`teacher_batch`) or alone (``caption_context: caption``); the model is in
        eval mode, without gradient, the forward stopped after the deepest TGA layer."""
        cap_ids, cap_mask = extras[CAPTION_IDS], extras[CAPTION_MASK]
        if self.config.caption_context == CaptionContext.prompt:
            teacher = self.teacher_batch(adapter, batch, cap_ids, cap_mask, extras.get(RETRIEVED_MASK))
            teacher_inputs = {"input_ids": teacher["input_ids"], "attention_mask": teacher["attention_mask"]}
            pooled_mask = teacher["caption_mask"]
        else:
            teacher_inputs = {"input_ids": cap_ids, "attention_mask": cap_mask.clamp(min=0)}
            pooled_mask = cap_mask.bool()
        with eval_mode(model), torch.no_grad(), HiddenCapture(adapter, self.layers(adapter), {"cap": pooled_mask},
                                                               self.config.pooling.name, detach=True) as cap:
            # stops after the deepest TGA layer: later layers never run
            cap.run(model, **teacher_inputs)
        return cap.stacked("cap"), pooled_mask

    @hookimpl
    def before_forward(self, model: torch.nn.Module, batch: dict, ctx: "StepContext") -> None:
        extras = ctx.extras
        if CAPTION_IDS not in extras:
            return  # no captions in this batch: nothing to align to
        adapter = ctx.runtime.adapter
        layers = self.layers(adapter)
        pooling = self.config.pooling.name
        if model.training and torch.is_grad_enabled():
            left = compat.non_reentrant_checkpointing(model)
            if left:
                raise GradientError(
                    f"tga: gradient checkpointing of {type(left[0]).__name__} uses a checkpoint function that is not "
                    "torch.utils.checkpoint.checkpoint, which this plugin cannot switch to use_reentrant=False; a reentrant "
                    "checkpoint runs the forward under no_grad, so the TGA terms would train nothing. Turn that "
                    "checkpointing off, or use transformers' non-reentrant checkpointing instead "
                    "(lvlm_safety_plugins.compat.enable_checkpointing(model, use_reentrant=False))"
                )
        ctx.scratch["tga_cap"], pooled_mask = self.teacher_states(model, adapter, batch, extras)
        token_masks = {"ret": extras[RETRIEVED_MASK]} if RETRIEVED_MASK in extras else None
        # the host forward's states at the TGA layers, through the public capture API
        capture = ctx.capture(layers, token_masks=token_masks, pooling=pooling)
        ctx.scratch["tga_valid"] = pooled_mask.any(dim=1).to(capture.image_mask.device) & capture.image_mask.any(dim=1)
        ctx.scratch["tga_capture"] = capture

    @hookimpl
    def loss_terms(self, model: torch.nn.Module, batch: dict, outputs: Any, ctx: "StepContext") -> dict[str, torch.Tensor] | None:
        capture: ForwardCapture | None = ctx.scratch.pop("tga_capture", None)
        if capture is None:
            return None
        img = capture.stacked("image")
        if torch.is_grad_enabled() and model.training and not img.requires_grad and \
                any(p.requires_grad for p in model.parameters()):
            raise GradientError(
                "tga: the image-token states captured in the training forward carry no gradient, so the TGA terms "
                "would train nothing (was the forward run under torch.no_grad, or inside a reentrant gradient "
                "checkpoint that could not be switched?)"
            )
        ret = capture.stacked("ret") if "ret" in capture.masks else None
        ret_valid = capture.masks["ret"].any(dim=1) if "ret" in capture.masks else None
        settings = effective_settings(self.config)
        raw = tga_terms(img, ctx.scratch["tga_cap"].to(img.device), ret, valid=ctx.scratch["tga_valid"],
                        ret_valid=ret_valid, formula=settings.formula)
        a, b = schedule_factors(settings.schedule, ctx.progress)
        ctx.metrics["tga/schedule"] = a
        if "cos_img_cap" in raw:
            ctx.metrics["tga/cos_img_cap"] = float(raw["cos_img_cap"])
        terms: dict[str, torch.Tensor] = {}
        for name, weight, factor in (("pair", settings.pair_weight, a), ("rank", settings.rank_weight, b)):
            if name in raw:
                # the unweighted value under the formula's own name: logged whatever the schedule
                ctx.metrics[f"tga/{settings.formula.name}/{name}"] = float(raw[name].detach())
                terms[f"tga/{name}"] = weight * factor * raw[name]
        return terms

__all__ = ["TGA", "effective_settings", "find_subsequence", "locate_text", "schedule_factors", "tga_terms"]
