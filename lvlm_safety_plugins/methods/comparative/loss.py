"""The comparative loss as pure functions on tensors.

Facts of the formulation (Zhu et al., "Cross-Model Comparative Loss for Enhancing
Neuronal Utility in Language Understanding", TOIS 2024, arXiv 2301.03765; public code
zycdev/CmpLoss): models are ordered from the full model (0) to the most ablated (c); a
less ablated model should not do worse, so for every pair k < j the loss penalises
``e_j > e_k`` with the hinge ``max(0, e_j - e_k) = max(0, (loss_k - loss_j) / T)``,
where ``e = -loss / T``. A *dummy* score, set by the target mode, can be appended after
the most ablated model; it then takes part in the pairs like a model (every model is
also compared with it), so with the ``ultra`` dummy (0) each model's own task loss
enters the comparative loss. The mean is taken over the pairs, then over examples.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError, DataError

TARGETS = ("ultra", "best", "first")
IGNORE_INDEX = -100


def nested_rate(base: float, i: int) -> float:
    """The ablation rate of the i-th ablated model: ``1 - (1 - base)^i`` (0 for i=0)."""
    return 1.0 - (1.0 - float(base)) ** int(i)


def nested_keep_masks(uniform: torch.Tensor, base: float, count: int) -> list[torch.Tensor]:
    """Keep masks of ablated models 1..count from one shared uniform draw.

    Model i keeps the units with ``u >= 1 - (1 - base)^i``: its keep probability is
    ``(1 - base)^i`` and, since the threshold grows with i, what model i keeps model
    i-1 kept too (nested masks, CmpDrop's one shared random state).
    """
    return [uniform >= nested_rate(base, i) for i in range(1, count + 1)]


def dummy_score(scores: torch.Tensor, target: str) -> torch.Tensor:
    """The dummy score ``[..., 1]`` appended after the models' scores ``[..., n]``
    (computed without gradient, as in the CmpLoss code's ``get_objective``).

    ``ultra``: 0 (the score of a loss of 0; every model is pulled towards it).
    ``best``: the highest score among the models (full model included).
    ``first``: with f the full model's score and b the best ablated model's score,
    ``(f + b) / 2`` when f > b, else b (the CmpLoss code's definition): the ablated
    models are pulled up to the full model's level, and where one already beats the
    full model, the full model is pulled up to it.
    """
    scores = scores.detach()
    if target == "ultra":
        return torch.zeros_like(scores[..., :1])
    if target == "best":
        return scores.max(dim=-1, keepdim=True).values
    if target == "first":
        first = scores[..., :1]
        best_ablated = scores[..., 1:].max(dim=-1, keepdim=True).values
        return torch.where(first > best_ablated, (first + best_ablated) / 2, best_ablated)
    raise ConfigError(f"unknown comparative target {target!r}; valid: {', '.join(TARGETS)}")


def comparative_loss(
    losses: Sequence[torch.Tensor] | torch.Tensor,
    temperature: float = 1.0,
    target: str | None = "ultra",
) -> torch.Tensor:
    """Mean over pairs k < j of ``max(0, e_j - e_k)``, ``e = -loss / temperature``.

    ``losses``: the models' task losses, full model first then ablated models 1..c in
    order of growing ablation: a sequence of scalars, or a tensor ``[..., n]`` (for
    example one row per example), in which case the pair mean is averaged over the
    leading dimensions. ``target``: the dummy appended after the models (``ultra``,
    ``best``, ``first``, see :func:`dummy_score`), or ``None`` for no dummy (the
    pairwise regulariser the CmpLoss code adds to a primary loss). With n models and
    the dummy there are ``(n + 1) n / 2`` pairs.

    At a tie the hinge passes its gradient (``clamp``, as the CmpLoss code's
    ``margin_ranking_loss``): with ``best`` the best model ties with the dummy, so its
    loss is always pulled down; with ``first`` the same holds for the best ablated
    model when it beats the full model.
    """
    stacked = torch.stack(list(losses), dim=-1) if not isinstance(losses, torch.Tensor) else losses
    if stacked.shape[-1] < 2:
        raise ConfigError("the comparative loss needs the full model and at least one ablated model")
    if float(temperature) <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    scores = -stacked / float(temperature)
    if target is not None:
        scores = torch.cat([scores, dummy_score(scores, target)], dim=-1)
    n = scores.shape[-1]
    k, j = torch.triu_indices(n, n, offset=1, device=scores.device)
    hinge = torch.clamp(scores[..., j] - scores[..., k], min=0)
    return hinge.mean()


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per row: ``(sum over the row's label tokens, count)``.

    ``logits`` ``[batch, length, vocab]`` and ``labels`` ``[batch, length]`` in the same
    coordinates; position t predicts label t+1 (the causal-LM shift of transformers'
    own loss), computed in float32. ``sum.sum() / count.sum()`` is the batch loss a
    causal LM returns; ``sum / count`` the per-example losses.
    """
    if logits.shape[:2] != labels.shape:
        raise DataError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not in the same coordinates")
    shift_labels = labels[:, 1:].to(logits.device)
    valid = shift_labels != ignore_index
    rows, cols = valid.nonzero(as_tuple=True)
    # only the label positions are upcast (answers are a small part of a VLM's sequence)
    token = F.cross_entropy(logits[rows, cols].float(), shift_labels[rows, cols], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return sums, valid.sum(dim=1)


__all__ = ["TARGETS", "comparative_loss", "dummy_score", "nested_keep_masks", "nested_rate", "sequence_losses"]
