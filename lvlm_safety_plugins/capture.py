"""Hidden-state capture: forward hooks that pool per layer over token masks on the fly.

With ``detach=True`` only the pooled ``[batch, hidden]`` vectors are kept, never a
layer's full ``[batch, length, hidden]`` states, so capturing many layers of a long
multimodal sequence costs almost no memory. Without it (training losses such as TGA,
which back-propagate through the pooled states) the hook keeps a reference to the
layer's output and pools it when the result is read, after the forward: a hook runs
inside the layer's gradient checkpoint on transformers 4.x, and differentiable work
done there would be missing when the checkpoint recomputes the layer without the hook
(torch refuses that). The output is kept alive by autograd for the backward anyway.

>>> with HiddenCapture(adapter, layers=[10, 11], masks={"image": layout.image_mask}) as cap:  # doctest: +SKIP
...     model(**batch)
>>> cap.pooled["image"][10].shape  # doctest: +SKIP
torch.Size([batch, hidden])
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import torch

from .adapters.base import layer_hidden
from .errors import CaptureError

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.base import ModelAdapter, SequenceLayout

POOLINGS = ("mean", "last")


@contextlib.contextmanager
def truncated_decoder(adapter: "ModelAdapter", last: int, then: torch.nn.Module | None = None) -> Iterator[None]:
    """Inside the block the model's decoder runs only its layers ``0..last`` (and then
    ``then``, given: a module in layer ``last + 1``'s place, such as
    :class:`~lvlm_safety_plugins.compat.LayerProbe`).

    The module that holds the decoder layers gets a shorter ``ModuleList`` of the same
    layer modules for the length of the block and its own list back afterwards (also
    on error); no layer, parameter or hook is touched, and every forward runs to its
    end without an exception, so hooks that pair up around a forward (DeepSpeed ZeRO-3
    gathers parameters in a pre-hook and releases them in the matching post-hook) stay
    balanced. The final norm and the LM head then run on layer ``last``'s output.
    Another thread using the same model at the same time would see the short decoder:
    use it for teacher and calibration passes, not on a model that is serving.
    """
    owner, attr = adapter.decoder_owner
    layers = owner._modules[attr]
    assert isinstance(layers, torch.nn.ModuleList)
    n = len(layers)
    if not 0 <= last < n:
        raise CaptureError(f"cannot stop after layer {last}: {type(adapter.model).__name__} has {n} decoder layers (0-{n - 1})")
    if last == n - 1 and then is None:
        yield
        return
    owner._modules[attr] = torch.nn.ModuleList(list(layers)[: last + 1] + ([then] if then is not None else []))
    try:
        yield
    finally:
        owner._modules[attr] = layers


class _SkippedHead(torch.nn.Module):
    """Stands in for the LM head in a forward whose logits nobody reads: one column of
    the states instead of a projection to the vocabulary (on a 32,000-token vocabulary
    that projection costs as much as several decoder layers). Code that reads the
    head's ``weight`` (LLaMA's ``pretraining_tp`` split) still finds the real one."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["weight"] = getattr(head, "weight", None)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden[..., :1]


@contextlib.contextmanager
def skipped_lm_head(adapter: "ModelAdapter") -> Iterator[None]:
    """Inside the block the model's LM head is replaced by a stand-in that does not
    project to the vocabulary (the logits are then meaningless); the head comes back
    afterwards, also on error. No parameter or hook is touched. A model whose head is
    not found is left as it is."""
    try:
        head = adapter.lm_head
    except Exception:  # noqa: BLE001 - no head to skip: run as is
        yield
        return
    found = next(((module, name) for module in adapter.model.modules() for name, child in module._modules.items()
                  if child is head), None)
    if found is None:
        yield
        return
    owner, name = found
    owner._modules[name] = _SkippedHead(head)
    try:
        yield
    finally:
        owner._modules[name] = head


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every module of ``model`` is in eval mode; afterwards each has
    its own training flag back (also on error), so a module a caller froze in eval
    mode stays so. Where no module overrides ``train``, the flags are set directly,
    which is what ``model.eval()`` does then, without its recursion through the module
    tree on every training step (TGA's teacher pass); otherwise ``train``/``eval`` are
    called."""
    modules = list(model.modules())
    flags = [m.training for m in modules]
    plain = all(type(m).train is torch.nn.Module.train for m in modules)
    if plain:
        for m in modules:
            m.__dict__["training"] = False
    else:
        model.eval()
    try:
        yield
    finally:
        if plain:
            for m, flag in zip(modules, flags):
                m.__dict__["training"] = flag
        else:
            model.train(flags[0])
            for m, flag in zip(modules, flags):
                if m.training != flag:
                    m.train(flag)


def run_to_layer(adapter: "ModelAdapter", model: torch.nn.Module, last: int, **inputs: Any) -> Any:
    """``model(**inputs, use_cache=False)`` with the decoder stopped after layer
    ``last`` (:func:`truncated_decoder`) and the LM head skipped
    (:func:`skipped_lm_head`); returns the model's (then meaningless) output."""
    with truncated_decoder(adapter, last), skipped_lm_head(adapter):
        return model(**inputs, use_cache=False)


class LastPositions:
    """Each row's last True position of a ``[B, L]`` mask, worked out once for pooling
    many layers' states there (:func:`last_masked`)."""

    __slots__ = ("rows", "index", "empty")

    def __init__(self, mask: torch.Tensor) -> None:
        idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values
        self.rows = torch.arange(mask.shape[0], device=mask.device)
        self.index = last.clamp(min=0)
        #: ``[B, 1]`` 1/0 per row where some row has no True position, else ``None``
        self.empty = None if bool((last >= 0).all()) else (last >= 0).unsqueeze(-1)

    def pick(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, index = self.rows, self.index
        if rows.device != hidden.device:
            rows, index = self.rows, self.index = rows.to(hidden.device), index.to(hidden.device)
            if self.empty is not None:
                self.empty = self.empty.to(hidden.device)
        picked = hidden[rows, index]
        return picked if self.empty is None else picked * self.empty.to(hidden.device, hidden.dtype)


def last_masked(mask: torch.Tensor) -> LastPositions:
    """The last True position of each row of ``mask [B, L]`` (zeros pooled for an empty
    row), for :func:`pool`'s ``last``."""
    return LastPositions(mask)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean", *, last: LastPositions | None = None) -> torch.Tensor:
    """Pool ``hidden [B, L, H]`` over the True positions of ``mask [B, L]``.

    ``mean``: the average over the masked positions (zeros for an empty row);
    ``last``: the state at each row's last masked position (zeros for an empty row;
    ``last`` may pass :func:`last_masked` of ``mask`` computed once for many layers).
    """
    if how == "last" and last is not None:
        return last.pick(hidden)
    m = mask.to(hidden.device)
    if how == "mean":
        weights = m.to(hidden.dtype).unsqueeze(-1)
        total = (hidden * weights).sum(dim=1)
        count = m.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return total / count
    if how == "last":
        return pool(hidden, m, how, last=last_masked(m))
    raise CaptureError(f"unknown pooling {how!r}; valid: {', '.join(POOLINGS)}")


def _capture_layers(adapter: "ModelAdapter", layers: Iterable[int] | None, pooling: str) -> list[int]:
    """The resolved layer ids of a capture (``None``: every layer), after checking the
    pooling; errors are :class:`CaptureError`."""
    if pooling not in POOLINGS:
        raise CaptureError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    try:
        return adapter.resolve_layers(None if layers is None else list(layers))
    except IndexError as exc:
        raise CaptureError(str(exc)) from None


class HiddenCapture:
    """Capture pooled hidden states at chosen decoder layers for one or more masks.

    ``masks`` maps a name to a bool ``[batch, llm_length]`` mask in the coordinates of
    the decoder's sequence (see :meth:`ModelAdapter.layout`). ``on_mismatch``: what to
    do when a forward's sequence length differs from the masks' (for example the
    one-token decode steps of ``generate``): ``"raise"`` (default) or ``"skip"``.
    Results are in ``self.pooled[name][layer]``; a later forward overwrites them.

    Hooks are removed when the ``with`` block ends, also when its body raises.
    """

    def __init__(
        self,
        adapter: "ModelAdapter",
        layers: Iterable[int] | None,
        masks: Mapping[str, torch.Tensor] | None = None,
        pooling: str = "mean",
        *,
        detach: bool = False,
        on_mismatch: str = "raise",
    ) -> None:
        if on_mismatch not in ("raise", "skip"):
            raise CaptureError(f"on_mismatch must be 'raise' or 'skip', got {on_mismatch!r}")
        self.adapter = adapter
        self.layers = _capture_layers(adapter, layers, pooling)
        self.masks: dict[str, torch.Tensor] = {}
        self._last: dict[str, LastPositions] = {}
        self.pooling = pooling
        self.detach = detach
        self.on_mismatch = on_mismatch
        self._pooled: dict[str, dict[int, torch.Tensor]] = {}
        self._raw: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._shape: tuple[int, ...] | None = None
        self._pooling_args: list[tuple[str, torch.Tensor, LastPositions | None]] = []
        if masks:
            self.set_masks(masks)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks (and forget earlier results)."""
        shapes = {tuple(m.shape) for m in masks.values()}
        if len(shapes) > 1:
            raise CaptureError(f"all masks must have the same shape, got {sorted(shapes)}")
        for name, mask in masks.items():
            if mask.dim() != 2:
                raise CaptureError(f"mask {name!r} must be [batch, length], got shape {tuple(mask.shape)}")
        self.masks = {k: v.bool() for k, v in masks.items()}
        self._last = {k: last_masked(v) for k, v in self.masks.items()} if self.pooling == "last" else {}
        self._pooled = {k: {} for k in self.masks}
        self._raw = {}
        #: ``(batch, length)`` of every mask (checked equal above), and per mask what
        #: the hooks pool with: ``(name, mask, last positions or None)``
        self._shape = next(iter(shapes)) if shapes else None
        self._pooling_args = [(name, mask, self._last.get(name)) for name, mask in self.masks.items()]

    @property
    def pooled(self) -> dict[str, dict[int, torch.Tensor]]:
        """``{mask name: {layer: [batch, hidden]}}`` of the last forward."""
        if self._raw:
            raw, self._raw = self._raw, {}
            for layer, hidden in raw.items():
                for name, mask in self.masks.items():
                    self._pooled[name][layer] = pool(hidden, mask, self.pooling, last=self._last.get(name))
        return self._pooled

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self.masks:
                return
            hidden = layer_hidden(output)
            if hidden.shape[:2] != self._shape:
                if self.on_mismatch == "skip":
                    return
                name, mask, _ = self._pooling_args[0]
                raise CaptureError(
                    f"layer {layer}: hidden states have shape {tuple(hidden.shape[:2])} "
                    f"(batch, length) but mask {name!r} has shape {tuple(mask.shape)}"
                )
            if not self.detach and torch.is_grad_enabled():
                self._raw[layer] = hidden  # pooled when read (see the module documentation)
                for name in self.masks:
                    self._pooled[name].pop(layer, None)
                return
            if self._raw:
                self._raw.pop(layer, None)
            if self.detach:
                hidden = hidden.detach()
            for name, mask, last in self._pooling_args:
                self._pooled[name][layer] = pool(hidden, mask, self.pooling, last=last)

        return hook

    def run(self, model: torch.nn.Module, **inputs: Any) -> None:
        """Run ``model(**inputs)`` only as far as the last captured layer.

        For teacher passes whose output is not needed (TGA's caption pass, CMRM
        calibration): the decoder layers after the deepest captured one never run
        (:func:`truncated_decoder`; no exception ends the forward). Call it inside the
        ``with`` block; the model is left as it was.
        """
        run_to_layer(self.adapter, model, max(self.layers), **inputs)

    def __enter__(self) -> "HiddenCapture":
        layers = self.adapter.decoder_layers
        try:
            for idx in self.layers:
                self._handles.append(layers[idx].register_forward_hook(self._hook(idx)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def stacked(self, name: str) -> torch.Tensor:
        """``[num_layers, batch, hidden]`` for mask ``name`` in ``self.layers`` order."""
        got = self.pooled.get(name, {})
        missing = [layer for layer in self.layers if layer not in got]
        if missing:
            raise CaptureError(f"no states captured for mask {name!r} at layers {missing}: did the forward run?")
        return torch.stack([got[layer] for layer in self.layers])


class ForwardCapture:
    """What a loss plugin reads from the host's training forward: the public capture API.

    Built by :meth:`StepContext.capture <lvlm_safety_plugins.runtime.StepContext.capture>`
    in ``before_forward`` and read in ``loss_terms`` (TGA reads its states this way):

    - :attr:`projector_output`: the vision-to-language projector's output as the host
      produced it (for LLaVA and HF Llava ``[num_images, image_tokens, hidden]``), with
      its gradient;
    - :attr:`projector_outputs`: ``{"projector": projector_output}`` plus the outputs of
      the adapter's :attr:`~lvlm_safety_plugins.adapters.base.ModelAdapter.projector_extras`,
      the other modules whose output reaches the LLM (Qwen3-VL: ``"deepstack.<i>"``,
      ``[image_tokens, hidden]`` added at the image positions after decoder layer ``i``);
    - :attr:`input_embeddings`: the decoder's input sequence ``[batch, length, hidden]``
      (text embeddings with the image features spliced in: the LM's view of the
      projector output); :meth:`image_embeddings` picks one row's image tokens;
    - :attr:`image_mask`: bool ``[batch, length]``, the image-feature positions in the
      decoder's sequence (:attr:`layout` has the padding and token mapping too);
    - :meth:`states`: hidden states ``[batch, length, hidden]`` at a captured layer
      (layer ``l`` is the output of decoder layer ``l``, ``hidden_states[l + 1]``);
    - :meth:`pooled` / :meth:`stacked`: those states pooled (``mean`` or ``last``) over
      a mask: ``"image"`` always, plus the masks given to ``ctx.capture``.

    Only forwards over the batch's own sequence are recorded. Reading any value ends
    the recording (the hooks are removed and what was recorded is kept), so later
    forwards in the same step (another plugin's ablated passes) do not overwrite it;
    the runtime removes the hooks after ``loss_terms`` in any case. States keep their
    gradient unless ``detach=True``.
    """

    def __init__(
        self,
        adapter: "ModelAdapter",
        layout: "SequenceLayout",
        layers: Iterable[int] = (),
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
        pooling: str = "mean",
        projector: bool = False,
        embeddings: bool = False,
        detach: bool = False,
    ) -> None:
        self.layers = _capture_layers(adapter, list(layers), pooling)  # () captures no states
        adapter.check_image_state_layers(self.layers)  # Qwen3-VL's deepstack layers (docs/adapters.md)
        self.adapter = adapter
        self.layout = layout
        self.pooling = pooling
        self.detach = detach
        self.masks: dict[str, torch.Tensor] = {"image": layout.image_mask}
        for name, mask in (masks or {}).items():
            if name == "image":
                raise CaptureError("the mask name 'image' is taken by the image-token mask; choose another name")
            if tuple(mask.shape) != tuple(layout.image_mask.shape):
                raise CaptureError(f"mask {name!r} has shape {tuple(mask.shape)}, the decoder's sequence is "
                                   f"{tuple(layout.image_mask.shape)} (batch, length); pass input_ids masks as token_masks")
            self.masks[name] = mask.to(layout.image_mask.device).bool()
        self._want_projector = projector
        self._want_embeddings = embeddings
        self._states: dict[int, torch.Tensor] = {}
        self._projector: torch.Tensor | None = None
        self._extras: dict[str, torch.Tensor] = {}
        self._extra_names: list[str] = []
        self._embeddings: torch.Tensor | None = None
        self._handles: list[Any] = []

    @property
    def image_mask(self) -> torch.Tensor:
        return self.layout.image_mask

    def _fits(self, hidden: torch.Tensor) -> bool:
        return tuple(hidden.shape[:2]) == tuple(self.layout.image_mask.shape)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def start(self) -> "ForwardCapture":
        """Install the hooks (``ctx.capture`` does this); returns ``self``."""
        try:
            layers = self.adapter.decoder_layers
            for idx in self.layers:
                def hook(module: torch.nn.Module, args: Any, output: Any, idx: int = idx) -> None:
                    hidden = layer_hidden(output)
                    if self._fits(hidden):
                        self._states[idx] = self._keep(hidden)

                self._handles.append(layers[idx].register_forward_hook(hook))
            if self._want_embeddings:
                def pre_hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
                    hidden = args[0] if args else kwargs.get("hidden_states")
                    if isinstance(hidden, torch.Tensor) and self._fits(hidden):
                        self._embeddings = self._keep(hidden)

                self._handles.append(layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            if self._want_projector:
                def projector_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                    if self._projector is None and isinstance(output, torch.Tensor):
                        self._projector = self._keep(output)

                self._handles.append(self.adapter.projector.register_forward_hook(projector_hook))
                self._extra_names = list(self.adapter.projector_extras)
                for name, module in self.adapter.projector_extras.items():
                    def extra_hook(module: torch.nn.Module, args: Any, output: Any, name: str = name) -> None:
                        if name not in self._extras and isinstance(output, torch.Tensor):
                            self._extras[name] = self._keep(output)

                    self._handles.append(module.register_forward_hook(extra_hook))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove the hooks (what was recorded stays readable)."""
        while self._handles:
            self._handles.pop().remove()

    # -- reading -------------------------------------------------------------------

    @property
    def projector_output(self) -> torch.Tensor:
        self.stop()
        if not self._want_projector:
            raise CaptureError("the projector output was not asked for: use ctx.capture(..., projector=True)")
        if self._projector is None:
            raise CaptureError("the projector did not run in the captured forward (a batch without images?)")
        return self._projector

    @property
    def projector_outputs(self) -> dict[str, torch.Tensor]:
        """``{"projector": projector_output, **extras}``: everything the vision side
        sends to the LLM, each as its module produced it, with its gradient (the extras
        are the adapter's ``projector_extras``: Qwen3-VL's ``"deepstack.<i>"``)."""
        out = {"projector": self.projector_output}
        missing = [name for name in self._extra_names if name not in self._extras]
        if missing:
            raise CaptureError(f"{', '.join(missing)} did not run in the captured forward")
        out.update((name, self._extras[name]) for name in self._extra_names)
        return out

    @property
    def input_embeddings(self) -> torch.Tensor:
        self.stop()
        if not self._want_embeddings:
            raise CaptureError("the decoder's input was not asked for: use ctx.capture(..., embeddings=True)")
        if self._embeddings is None:
            raise CaptureError("no forward over this batch's sequence ran after ctx.capture()")
        return self._embeddings

    def image_embeddings(self, row: int) -> torch.Tensor:
        """``[image_tokens, hidden]``: row ``row``'s image features as the decoder receives them."""
        return self.input_embeddings[row][self.image_mask[row].to(self.input_embeddings.device)]

    def states(self, layer: int) -> torch.Tensor:
        """``[batch, length, hidden]`` at captured layer ``layer``."""
        self.stop()
        if layer not in self.layers:
            raise CaptureError(f"layer {layer} was not captured; captured layers: {self.layers}")
        if layer not in self._states:
            raise CaptureError(f"no states at layer {layer}: no forward over this batch's sequence ran after ctx.capture()")
        return self._states[layer]

    def pooled(self, name: str, layer: int) -> torch.Tensor:
        """``[batch, hidden]``: the states at ``layer`` pooled over mask ``name``."""
        if name not in self.masks:
            raise CaptureError(f"no mask {name!r}; masks: {', '.join(self.masks)}")
        return pool(self.states(layer), self.masks[name], self.pooling)

    def stacked(self, name: str) -> torch.Tensor:
        """``[num_layers, batch, hidden]``: :meth:`pooled` at every captured layer, in order."""
        return torch.stack([self.pooled(name, layer) for layer in self.layers])


__all__ = ["ForwardCapture", "HiddenCapture", "POOLINGS", "last_masked", "pool", "run_to_layer", "skipped_lm_head",
           "truncated_decoder", "eval_mode"]
