"""The c-vs-rest objective: targets, log-odds, class-balanced weights and batches, class names."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from ..stream import Data, dataset_of
from .gates import HeadsError, Target

__all__ = ['DEFAULT_CLASSES', 'check_target', 'log_odds', 'balance_weights', 'vs_rest_loss', 'tensors', 'balanced_batch', 'resolve_classes', 'default_classes', 'balanced_indices', 'two_logits', 'top1_in']


DEFAULT_CLASSES = 5  # classes of the per-class work when none are named (see default_classes)


def check_target(model: nn.Module, target: Target) -> tuple[int, ...]:
    """Validate a class index (or set of indices) against the model's classes; returns a sorted tuple."""
    n = getattr(model, "num_classes", None)
    t = (target,) if isinstance(target, int) else tuple(int(c) for c in target)
    if not n or not t or any(not 0 <= c < n for c in t) or len(set(t)) != len(t) or len(t) >= n:
        raise HeadsError(f"target {target!r} is not a class (or proper subset of classes) of this model; "
                         f"pass indices in [0, {n}) leaving at least one class as 'rest'")
    return tuple(sorted(t))


def log_odds(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """z = logsumexp(logits[target]) - logsumexp(logits[rest]) = log p(y in target) / p(y not in target)."""
    pos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    pos[list(target)] = True
    return logits[:, pos].logsumexp(-1) - logits[:, ~pos].logsumexp(-1)


def balance_weights(is_pos: torch.Tensor) -> torch.Tensor:
    """Per-example weights giving positives and negatives half the total weight each (sum 1)."""
    n_pos = int(is_pos.sum())
    n_neg = len(is_pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise HeadsError(f"the data holds {n_pos} target and {n_neg} other images; c-vs-rest needs both")
    return torch.where(is_pos, 0.5 / n_pos, 0.5 / n_neg)


def vs_rest_loss(logits: torch.Tensor, labels: torch.Tensor, target: Sequence[int], per_example: bool = False,
                 soft: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy of the log-odds z against y in target, or against soft targets (e.g. the
    original model's p(target), to distil); per-example and unweighted if asked."""
    is_pos = torch.isin(labels, torch.tensor(list(target), device=labels.device))
    goal = soft if soft is not None else is_pos.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(log_odds(logits, target), goal, reduction="none")
    return loss if per_example else (loss * balance_weights(is_pos)).sum()


def tensors(data: Dataset | tuple[torch.Tensor, torch.Tensor], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) tensors of a TensorDataset, any (x, y) dataset, or an (x, y) pair (first `limit` items).
    Loads every image into one tensor: for small data only (the head-module steps stream through `batches`)."""
    if isinstance(data, tuple):
        x, y = data
    elif hasattr(data, "tensors"):
        x, y = data.tensors[:2]  # type: ignore[attr-defined]
    else:
        n = len(data) if limit is None else min(limit, len(data))  # type: ignore[arg-type]
        items = [data[i] for i in range(n)]
        x, y = torch.stack([a for a, _ in items]), torch.as_tensor([int(b) for _, b in items])
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def balanced_batch(pos_idx: torch.Tensor, neg_idx: torch.Tensor, batch_size: int, seed: int,
                   step: int) -> tuple[torch.Tensor, torch.Generator]:
    """Step `step`'s class-balanced batch: half drawn (with replacement) from pos_idx, half from neg_idx; also returns
    the step's generator, advanced past those draws."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    half = batch_size // 2
    idx = torch.cat([pos_idx[torch.randint(len(pos_idx), (half,), generator=g)],
                     neg_idx[torch.randint(len(neg_idx), (batch_size - half,), generator=g)]])
    return idx, g


def resolve_classes(data: Data | None, classes: Sequence[int | str]) -> list[int]:
    """Class indices for classes given as indices or as names of data's classes (an ImageFolder's `class_to_idx`, or
    the `classes` list of a dataset from tcl.data.split)."""
    names: dict[str, int] | None = None
    if data is not None and not isinstance(data, tuple):
        ds = dataset_of(data)
        while isinstance(ds, Subset):
            ds = ds.dataset
        names = getattr(ds, "class_to_idx", None)
        if names is None and getattr(ds, "classes", None):  # tcl.data.split's datasets: a list of names, by index
            names = {str(c): k for k, c in enumerate(ds.classes)}  # type: ignore[attr-defined]
    out = []
    for c in classes:
        if isinstance(c, str):
            if names is None or c not in names:
                known = sorted(names or {})
                raise HeadsError(f"unknown class {c!r}; " + (f"this data's classes are {known[:8]}"
                                 f"{' ...' if len(known) > 8 else ''} ({len(known)} in all)" if known else
                                 "name classes by index (the data has no class_to_idx or classes)"))
            out.append(names[c])
        else:
            out.append(int(c))
    return out


def default_classes(model: nn.Module, count: int = DEFAULT_CLASSES) -> list[int]:
    """`count` evenly spaced class indices of the model (all of them when it has at most `count`): the classes of
    the per-class work when none are named, so a 1,000-class model gets 5 gradient-reset runs, not 1,000."""
    n = int(getattr(model, "num_classes", 0) or 0)
    if n < 2:
        raise HeadsError("the model has fewer than 2 classes; per-class modules need a classifier head")
    return list(range(n)) if n <= count else [i * n // count for i in range(count)]


def balanced_indices(labels: torch.Tensor, target: Sequence[int], per_side: int | None = None, seed: int = 0) -> torch.Tensor:
    """Indices of a c-vs-rest balanced subset: min(#target, per_side) target images and as many random others."""
    labels = labels.cpu()
    is_pos = torch.isin(labels, torch.tensor(list(target)))
    pos, neg = is_pos.nonzero().squeeze(1), (~is_pos).nonzero().squeeze(1)
    k = min(len(pos), len(neg), per_side or len(pos))
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([pos[torch.randperm(len(pos), generator=g)[:k]], neg[torch.randperm(len(neg), generator=g)[:k]]])
    return idx.sort().values


def two_logits(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """[B, 2] = (max logit outside target, max logit inside): argmax 1 iff the top-1 class is in target."""
    pos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    pos[list(target)] = True
    return torch.stack([logits[:, ~pos].amax(-1), logits[:, pos].amax(-1)], -1)


def top1_in(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Bool [B]: the top-1 class is in target (a classifier mapped to c-vs-rest)."""
    return torch.isin(logits.argmax(-1), torch.tensor(list(target), device=logits.device))
