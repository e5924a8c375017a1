"""Nested ablations for the comparative loss: one shared random state per step.

CmpDrop needs the units dropped by ablated model i to contain those dropped by model
i-1. Here every dropout site draws one uniform tensor ``u`` per call from a generator
seeded by ``(seed, site, call)``: the same ``u`` for every ablated model of the step,
regenerated on demand instead of stored (so no activation-sized tensors are kept).
Model i keeps a unit iff ``u >= 1 - (1 - p)^i`` and scales what it keeps by
``1 / (1 - rate_i)`` (inverted dropout), so keep-sets shrink as i grows and are nested.

:func:`nested_dropout` applies this to a model's own ``nn.Dropout`` modules (the
paper's CmpDrop on models that have dropout) or, with ``sites=``, to the outputs of
chosen modules (for LLMs without dropout modules, such as LLaMA); the modules are
restored exactly when the block ends, also when it raised.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ...adapters.base import layer_hidden, replace_layer_hidden
from ...errors import ConfigError
from .loss import nested_rate


class SharedUniform:
    """Uniform draws shared by the ablated models of one step.

    ``get(key, shape, device)`` returns the same tensor for the same key and shape every
    time it is asked (within one instance and across instances with the same seed):
    it is regenerated from a generator seeded by the seed and the key.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) & 0x7FFF_FFFF_FFFF

    def key_seed(self, key: Any) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(repr(key).encode("utf-8"))) & 0x7FFF_FFFF_FFFF_FFFF

    def get(self, key: Any, shape: Sequence[int] | torch.Size, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(self.key_seed(key))
        return torch.rand(tuple(shape), generator=gen, device=device)


def _as_shared(seed: int | SharedUniform) -> SharedUniform:
    return seed if isinstance(seed, SharedUniform) else SharedUniform(int(seed))


def _dropped(x: torch.Tensor, u: torch.Tensor, rate: float) -> torch.Tensor:
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return x * 0
    keep = (u >= rate).to(x.dtype)
    return x * keep / (1.0 - rate)


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Dropout]]:
    """The model's element-wise ``nn.Dropout`` modules, by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Dropout)]


@contextlib.contextmanager
def nested_dropout(
    model: nn.Module,
    p: float | Mapping[nn.Module, float] | None,
    i: int,
    seed: int | SharedUniform = 0,
    *,
    sites: Sequence[nn.Module] | None = None,
) -> Iterator[list[nn.Module]]:
    """Run the body as ablated model ``i`` of CmpDrop.

    Without ``sites``, every ``nn.Dropout`` module of ``model`` drops with rate
    ``1 - (1 - p)^i`` whatever its train/eval mode and its ``p`` attribute: ``p`` is one
    rate for all, ``None`` each module's own ``p`` (as the CmpLoss code does), or a
    mapping from module to base rate (modules left out: their own ``p``). Only calls of
    the modules are affected; code that reads a module's ``p`` and applies dropout
    itself (the attention dropout of many transformers models) is not. With ``sites``,
    the hidden-state output of each listed module is dropped instead (forward hooks). The uniform draw behind a mask depends
    only on ``seed``, the site and how many times the site was called inside the block,
    so the same ``seed`` with a larger ``i`` drops a superset. ``i=0`` changes nothing.
    On exit every module is restored exactly (the patched ``forward`` taken off again,
    or the one it had put back; hooks removed). Yields the modules acted on.
    """
    shared = _as_shared(seed)
    i = int(i)
    if i < 0:
        raise ConfigError(f"the ablated model index must be >= 0, got {i}")
    touched: list[nn.Module] = []
    handles: list[Any] = []
    saved: list[tuple[nn.Module, bool, Any]] = []
    try:
        if sites is None:
            for name, module in dropout_modules(model):
                if p is None:
                    base = float(module.p)
                elif isinstance(p, Mapping):
                    base = float(p.get(module, module.p))
                else:
                    base = float(p)
                rate = nested_rate(base, i)
                had = "forward" in module.__dict__
                saved.append((module, had, module.__dict__.get("forward")))
                module.forward = _dropout_forward(shared, ("dropout", name), rate)  # type: ignore[method-assign]
                touched.append(module)
        else:
            if p is None or isinstance(p, Mapping):
                raise ConfigError("nested_dropout with sites= needs one dropout rate p")
            rate = nested_rate(float(p), i)
            for idx, module in enumerate(sites):
                handles.append(module.register_forward_hook(_output_hook(shared, ("site", idx), rate)))
                touched.append(module)
        yield touched
    finally:
        for handle in handles:
            handle.remove()
        for module, had, forward in reversed(saved):
            if had:
                module.forward = forward  # type: ignore[method-assign]
            else:
                module.__dict__.pop("forward", None)


def _dropout_forward(shared: SharedUniform, key: Any, rate: float) -> Any:
    calls = [0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        call = calls[0]
        calls[0] += 1
        return _dropped(x, shared.get((key, call), x.shape, x.device), rate)

    return forward


def _output_hook(shared: SharedUniform, key: Any, rate: float) -> Any:
    calls = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        call = calls[0]
        calls[0] += 1
        hidden = layer_hidden(output)
        return replace_layer_hidden(output, _dropped(hidden, shared.get((key, call), hidden.shape, hidden.device), rate))

    return hook


__all__ = ["SharedUniform", "dropout_modules", "nested_dropout"]
