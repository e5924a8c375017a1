"""The ``comparative`` loss plugin.

Per training step:

1. ``before_forward``: the rate of the model's own ``nn.Dropout`` modules is set to 0,
   so the host's forward is the *full* model (restored in ``step_end``); the step's
   shared random state is set up.
2. ``loss_terms`` (``trylast``: after every other plugin has taken what it captured
   from the host forward): ``num_ablated`` extra forwards of the same batch, the i-th
   with ablation rate ``1 - (1 - p)^i`` from the shared random state (nested):
   CmpDrop drops units at ``drop_site`` (inverted-dropout scaling; see
   :func:`~.ablation.nested_dropout`), CmpCrop removes a share of the image tokens
   (zeroed projector outputs), of the prompt context (attention mask), or the
   retrieved text (TGA's retrieved-text mask). Every model's task loss is computed the
   same way from its logits (next-token cross-entropy over the label tokens, per
   example or per batch); the comparative loss over them is returned as
   ``comparative/loss`` (weighted); per-model batch losses are logged as
   ``comparative/loss_0`` .. ``comparative/loss_c``. With ``mode: replace`` a
   ``comparative/host_cancel`` term cancels the host loss exactly, so the comparative
   loss trains alone.
3. ``step_end``: dropout rates restored, also when a forward raised (the ablations
   are context managers that undo themselves after each ablated forward).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from ...errors import LVLMSafetyError
from ...markers import hookimpl
from ..base import Method
from ..tga.method import INSERTED, RETRIEVED_MASK, locate_text
from .ablation import SharedUniform, dropout_modules, nested_dropout
from .config import Ablation, ComparativeConfig, Granularity, Mode, Site
from .loss import IGNORE_INDEX, comparative_loss, nested_rate, sequence_losses

if TYPE_CHECKING:  # pragma: no cover
    from ...adapters.base import ModelAdapter
    from ...runtime import StepContext

SHARED = "comparative_shared"
SWITCHED = "comparative_dropout"
#: batch entry this plugin adds through ``collate``: the question's tokens, never cropped
QUESTION_MASK = "comparative_question_mask"
QUESTION_UNLOCATED = "comparative_question_unlocated"
#: the image placeholder split out of the question text
IMAGE_PLACEHOLDER = "<image>"


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether (gradient / activation) checkpointing is on anywhere in ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class Comparative(Method):
    """Cross-model comparative loss over the full model and nested ablations of it."""

    name = "comparative"
    kind = "loss"
    config_class = ComparativeConfig
    description = "comparative loss over nested ablated submodels (Zhu et al., TOIS 2024)"

    def __init__(self, config: Any, runtime: Any = None) -> None:
        super().__init__(config, runtime)
        self._micro = 0

    # -- data ----------------------------------------------------------------------

    def _question(self, example: Mapping[str, Any]) -> str | None:
        text = example.get(self.config.question_key)
        if not isinstance(text, str):
            text = None
            turns = example.get("conversations")
            if isinstance(turns, list):
                human = [t.get("value") for t in turns if isinstance(t, Mapping) and t.get("from") == "human"]
                text = human[0] if human and isinstance(human[0], str) else None
            elif isinstance(example.get("prompt"), str):
                text = example["prompt"]
            inserted = example.get(INSERTED)
            if text is not None and isinstance(inserted, str) and inserted:
                text = text.replace(inserted, " ").replace(inserted.strip(), " ")
        return text if text and text.strip() else None

    @hookimpl
    def collate(self, examples: Sequence[dict], batch: dict) -> dict[str, torch.Tensor] | None:
        """Mark each row's question tokens (``QUESTION_MASK``), which CmpCrop's
        ``context`` part never removes. The question text is split at the image
        placeholder and each piece located in the row's ``input_ids``; a row whose
        question cannot be located gets its whole prompt marked (nothing of it is
        cropped), counted in the ``comparative/question_unlocated`` metric."""
        if self.config.ablation != Ablation.crop or "context" not in self.config.crop_parts or self.config.crop_question:
            return None
        input_ids = batch.get("input_ids")
        if input_ids is None:
            return None
        tok = getattr(self.runtime, "tokenizer", None) if self.runtime is not None else None
        if tok is None:
            raise LVLMSafetyError("comparative: crop_parts 'context' needs a tokenizer to find the question "
                                  "(the integration sets runtime.tokenizer), or comparative.crop_question: true")
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        unlocated = 0
        for i, example in enumerate(examples):
            text = self._question(example)
            pieces = [p.strip() for p in (text or "").split(IMAGE_PLACEHOLDER) if p.strip()]
            row = input_ids[i].tolist()
            found = [locate_text(tok, row, piece) for piece in pieces]
            if not pieces or any(f is None for f in found):
                unlocated += 1
                mask[i] = True
                continue
            for start, length in found:  # type: ignore[misc]
                mask[i, start : start + length] = True
        return {QUESTION_MASK: mask, QUESTION_UNLOCATED: torch.tensor(unlocated)}

    # -- ablations -----------------------------------------------------------------

    def _drop_sites(self, adapter: "ModelAdapter") -> list[torch.nn.Module] | None:
        """The modules whose outputs CmpDrop drops (None: the model's nn.Dropout modules)."""
        site = self.config.drop_site
        if site == Site.dropout:
            return None
        if site == Site.projector:
            return [adapter.projector]
        layers = list(adapter.decoder_layers)
        if site == Site.layers:
            return layers
        mlps = [getattr(layer, "mlp", None) for layer in layers]
        if any(m is None for m in mlps):
            raise LVLMSafetyError(
                f"comparative: drop_site 'mlp' needs an `mlp` submodule in every decoder layer of "
                f"{type(adapter.model).__name__}; use drop_site: layers"
            )
        return mlps

    @contextlib.contextmanager
    def _ablated(self, model: torch.nn.Module, batch: dict, i: int, ctx: "StepContext") -> Iterator[dict]:
        """The batch of ablated model ``i``; its dropout / crop hooks live for the block."""
        adapter = ctx.runtime.adapter
        shared: SharedUniform = ctx.scratch[SHARED]
        batch = dict(batch)
        with contextlib.ExitStack() as stack:
            if self.config.ablation == Ablation.drop:
                sites = self._drop_sites(adapter)
                if sites is None and not dropout_modules(model):
                    raise LVLMSafetyError(
                        f"comparative: drop_site 'dropout' needs nn.Dropout modules; {type(model).__name__} has none "
                        "(use drop_site: mlp, layers or projector)"
                    )
                # null: each dropout module's own rate (before_forward set them to 0)
                p: Any = ctx.scratch.get(SWITCHED, {}) if self.config.dropout is None else float(self.config.dropout)
                stack.enter_context(nested_dropout(model, p, i, shared, sites=sites))
            else:
                rate = nested_rate(self.config.crop_share, i)
                parts = list(self.config.crop_parts)
                if "image" in parts:
                    handle = adapter.projector.register_forward_hook(self._crop_image_hook(shared, rate))
                    stack.callback(handle.remove)
                if "context" in parts or "retrieved" in parts:
                    batch["attention_mask"] = self._cropped_attention(adapter, batch, ctx, parts, rate, shared)
            yield batch

    @staticmethod
    def _crop_image_hook(shared: SharedUniform, rate: float) -> Any:
        from ...adapters.base import layer_hidden, replace_layer_hidden

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            hidden = layer_hidden(output)
            keep = shared.get("image", hidden.shape[:-1], hidden.device) >= rate
            return replace_layer_hidden(output, hidden * keep.unsqueeze(-1).to(hidden.dtype))

        return hook

    def _cropped_attention(self, adapter: Any, batch: dict, ctx: "StepContext", parts: list[str], rate: float,
                           shared: SharedUniform) -> torch.Tensor:
        input_ids = batch["input_ids"]
        attention = batch.get("attention_mask")
        attention = torch.ones_like(input_ids) if attention is None else attention.clone()
        drop = torch.zeros_like(input_ids, dtype=torch.bool)
        if "context" in parts:
            labels = batch.get("labels")
            prompt = attention.bool() & ~adapter.image_token_positions(input_ids)
            if labels is not None and labels.shape == input_ids.shape:
                prompt &= labels == IGNORE_INDEX
            # keep each row's first real token (BOS) so no row is left empty
            first = attention.bool().int().argmax(dim=1)
            prompt[torch.arange(prompt.shape[0]), first] = False
            if not self.config.crop_question:
                question = ctx.extras.get(QUESTION_MASK)
                if question is None:
                    raise LVLMSafetyError("comparative: no question mask for this batch (collate did not run through "
                                          "the runtime); set comparative.crop_question: true to crop without one")
                prompt &= ~question.to(prompt.device).bool()
            drop |= prompt & (shared.get("context", input_ids.shape, input_ids.device) < rate)
        if "retrieved" in parts:
            extras = ctx.extras
            if RETRIEVED_MASK not in extras:
                raise LVLMSafetyError("comparative: crop_parts 'retrieved' needs the tga method in the recipe (it marks the retrieved text)")
            drop |= extras[RETRIEVED_MASK].to(input_ids.device).bool()
        attention[drop] = 0
        return attention

    # -- task losses -----------------------------------------------------------------

    @staticmethod
    def _token_losses(adapter: "ModelAdapter", batch: dict, outputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-example ``(sum, count)`` of the next-token loss from ``outputs.logits``,
        with the batch's labels carried into the decoder's coordinates (models that
        splice image features in lengthen the sequence); None where that cannot be done."""
        logits = getattr(outputs, "logits", None)
        labels = batch.get("labels")
        input_ids = batch.get("input_ids")
        if not isinstance(logits, torch.Tensor) or labels is None or input_ids is None or labels.shape != input_ids.shape:
            return None
        try:
            layout = adapter.layout(batch)
        except (LVLMSafetyError, ValueError):
            return None
        if layout.length != logits.shape[1]:
            return None
        labels = labels.to(logits.device)
        if layout.token_index is None:
            decoder_labels = labels
        else:
            idx = layout.token_index.to(logits.device)
            decoder_labels = torch.where(idx >= 0, labels.gather(1, idx.clamp(min=0)), torch.full_like(idx, IGNORE_INDEX))
        return sequence_losses(logits, decoder_labels)

    def _check_checkpointing(self, model: torch.nn.Module, switched: list[torch.nn.Module]) -> None:
        if not checkpointing(model):
            return
        if switched:
            raise LVLMSafetyError(
                "comparative: gradient checkpointing recomputes the forward during backward, after this plugin has "
                "switched the model's dropout back on, so the full model's gradients would be wrong; turn gradient "
                "checkpointing off (or the model's dropout: its rates to 0)"
            )
        if self.config.ablation == Ablation.drop and self.config.drop_site != Site.projector:
            raise LVLMSafetyError(
                f"comparative: gradient checkpointing recomputes the decoder during backward, after the dropout of "
                f"drop_site '{self.config.drop_site.value}' is gone, so the ablated models' gradients would be wrong; "
                "turn gradient checkpointing off, or use drop_site: projector or ablation: crop"
            )

    # -- lifecycle -------------------------------------------------------------------

    @hookimpl
    def before_forward(self, model: torch.nn.Module, batch: dict, ctx: "StepContext") -> None:
        if not ctx.training:
            return
        self._micro += 1
        ctx.scratch[SHARED] = SharedUniform(int(self.config.seed) * 1_000_003 + int(ctx.step) * 7919 + self._micro)
        # the full model: dropout off. Setting p = 0 (as the CmpLoss code does) also
        # reaches models that read a dropout module's p and apply dropout themselves.
        switched: dict[torch.nn.Module, float] = {}
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and module.p > 0 and module.training:
                switched[module] = float(module.p)
                module.p = 0.0
        ctx.scratch[SWITCHED] = switched
        self._check_checkpointing(model, list(switched))

    @hookimpl(trylast=True)
    def loss_terms(self, model: torch.nn.Module, batch: dict, outputs: Any, ctx: "StepContext") -> dict[str, torch.Tensor] | None:
        if not ctx.training or SHARED not in ctx.scratch:
            return None
        unlocated = ctx.extras.get(QUESTION_UNLOCATED)
        if unlocated is not None:
            ctx.metrics["comparative/question_unlocated"] = float(unlocated)
        host = getattr(outputs, "loss", None)
        if host is None or batch.get("labels") is None:
            raise LVLMSafetyError("comparative: the host forward returned no loss (the batch needs `labels`)")
        adapter = ctx.runtime.adapter
        per_example = self.config.granularity == Granularity.example
        full = self._token_losses(adapter, batch, outputs)
        if full is None and per_example:
            raise LVLMSafetyError(
                f"comparative: granularity 'example' needs logits that line up with the labels; "
                f"{type(model).__name__}'s do not here (set comparative.granularity=batch)"
            )
        sums, counts, batch_losses = [], [], []
        if full is not None:
            sums.append(full[0])
            counts.append(full[1])
            batch_losses.append(full[0].sum() / full[1].sum().clamp(min=1))
        else:  # the host's own batch loss (a plain mean: such models take no num_items_in_batch)
            batch_losses.append(host)
        for i in range(1, int(self.config.num_ablated) + 1):
            with self._ablated(model, batch, i, ctx) as ablated:
                call = dict(ablated)
                if full is not None:
                    call.pop("labels")  # the loss is computed below, from the logits
                call.setdefault("use_cache", False)
                out = model(**call)
            if full is not None:
                got = self._token_losses(adapter, ablated, out)
                if got is None:
                    raise LVLMSafetyError(f"comparative: the logits of ablated model {i} do not line up with the labels")
                sums.append(got[0])
                counts.append(got[1])
                batch_losses.append(got[0].sum() / got[1].sum().clamp(min=1))
            else:
                if getattr(out, "loss", None) is None:
                    raise LVLMSafetyError(f"comparative: ablated model {i} returned no loss")
                batch_losses.append(out.loss)
        for i, loss in enumerate(batch_losses):
            ctx.metrics[f"comparative/loss_{i}"] = float(loss.detach())

        include = self.config.include_dummy
        if include is None:
            include = self.config.mode == Mode.replace
        target = self.config.target.value if include else None
        if per_example:
            valid = torch.stack(counts).gt(0).all(dim=0)  # rows with label tokens in every model
            if bool(valid.any()):
                per_row = torch.stack([s[valid] / c[valid].clamp(min=1) for s, c in zip(sums, counts)], dim=-1)
                value = comparative_loss(per_row, float(self.config.temperature), target)
            else:  # no label token in the batch: nothing to compare
                value = torch.stack(sums).sum() * 0.0
        else:
            value = comparative_loss(batch_losses, float(self.config.temperature), target)
        terms = {"comparative/loss": float(self.config.weight) * value}
        if self.config.mode == Mode.replace:
            # the integration multiplies every term by term_scale (gradient accumulation,
            # tokens averaged across devices): divide it out so that the host loss the
            # terms are added to is cancelled exactly
            scale = float(ctx.term_scale) or 1.0
            terms["comparative/host_cancel"] = -(ctx.host_loss if ctx.host_loss is not None else host) / scale
        return terms

    @hookimpl
    def step_end(self, model: torch.nn.Module, ctx: "StepContext") -> None:
        for module, p in ctx.scratch.pop(SWITCHED, {}).items():
            module.p = p
        ctx.scratch.pop(SHARED, None)


__all__ = ["Comparative", "checkpointing"]
