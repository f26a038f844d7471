"""Step 3: per-head importance scores of a gated model for c-vs-rest targets (Taylor, Fisher, Michel, Hessian, KL)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from ..stream import Amp, Data, batches, labels
from ..utils import autocast, device_of, requires_grad
from .gates import HeadsError, Target, _gated, gate_params, gates, insert_gates, num_heads
from .objective import balance_weights, check_target, log_odds, vs_rest_loss

__all__ = ['SCORERS', 'per_example_gates', 'head_importance', 'gated_importance']


SCORERS = ("taylor", "fisher", "michel", "hessian", "kl")


@contextlib.contextmanager
def per_example_gates(model: nn.Module, batch: int) -> Iterator[list[torch.Tensor]]:
    """Within the block, each block uses a [batch, heads] leaf copy of its gates; their .grad are per-example."""
    attns = _gated(model)
    leaves = [a.head_gate.detach().expand(batch, -1).clone().requires_grad_(True) for a in attns]
    for a, leaf in zip(attns, leaves):
        a.sample_gate = leaf
    try:
        yield leaves
    finally:
        for a in attns:
            a.sample_gate = None


def head_importance(model: nn.Module, data: Data, targets: Sequence[Target], methods: Sequence[str] = SCORERS,
                    batch_size: int = 128, probes: int = 2, limit: int | None = None, seed: int = 0,
                    progress: bool = True, amp: Amp = None) -> dict[str, torch.Tensor]:
    """Per-target head importance on `data` (held-out split), each [len(targets), blocks, heads], class-balanced:
    taylor |g * dL/dg|; fisher sum_x w_x (dL_x/dg)^2 (Kwon); michel sum_x w_x |dL_x/dg| (Michel); hessian the
    OBD saliency g^2 H_gg / 2 with diag(H) by Hutchinson (Rademacher v, Hv by double backward; 'hessian_diag' too);
    kl = g^2/2 * sum_x w_x p_x (1 - p_x) (dz_x/dg)^2, the model's own (label-free) Fisher of its c-vs-rest output:
    the second-order estimate of the KL between its output with and without the head. Runs on the model's device."""
    bad = [m for m in methods if m not in SCORERS]
    if bad:
        raise HeadsError(f"unknown scorer(s) {bad}; choose from {SCORERS} (or 'gate' via reset_train)")
    autocast("cpu", amp, grads=True)  # validates amp before any work
    insert_gates(model)
    return gated_importance(model, data, [check_target(model, t) for t in targets], methods, batch_size, probes, limit,
                            seed, progress, amp)


def gated_importance(model: nn.Module, data: Data, tgts: Sequence[tuple[int, ...]], methods: Sequence[str] = SCORERS,
                     batch_size: int = 128, probes: int = 2, limit: int | None = None, seed: int = 0,
                     progress: bool = True, amp: Amp = None) -> dict[str, torch.Tensor]:
    """head_importance of a model that has its gates, for checked targets (tuples of check_target)."""
    from tqdm.auto import tqdm

    y_all = labels(data)[:limit]
    dev = device_of(model)
    w = torch.stack([balance_weights(torch.isin(y_all, torch.tensor(t))) for t in tgts]).to(dev)  # [T, n]
    shape, g0 = num_heads(model), gates(model)
    acc = {k: torch.zeros(len(tgts), *shape, device=dev) for k in ("first", "fisher", "michel", "kl", "hessian_diag")}
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = -(-len(y_all) // batch_size)
    with requires_grad(model, False):
        for s, (x, y) in zip(range(0, len(y_all), batch_size),
                             tqdm(batches(data, batch_size, limit, dev), desc="importance", disable=not progress,
                                  leave=False, total=total)):
            if {"taylor", "fisher", "michel", "kl"} & set(methods):
                _first_order(model, x, y, tgts, w[:, s:s + batch_size], acc, amp)
            if "hessian" in methods:
                _hessian_diag(model, x, y, tgts, w[:, s:s + batch_size], acc["hessian_diag"], probes, gen, amp)
    first, fisher, michel, kl, hdiag = (acc[k].cpu() for k in ("first", "fisher", "michel", "kl", "hessian_diag"))
    out = {"taylor": (g0 * first).abs(), "fisher": fisher, "michel": michel, "kl": 0.5 * g0.square() * kl,
           "hessian": 0.5 * g0.square() * hdiag, "hessian_diag": hdiag}
    return {k: v for k, v in out.items() if k in methods or (k == "hessian_diag" and "hessian" in methods)}


def _first_order(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tgts: Sequence[tuple[int, ...]],
                 w: torch.Tensor, acc: dict[str, torch.Tensor], amp: Amp) -> None:
    """Add one batch's per-example gate gradients (weights w [T, batch]) to the first-order sums in acc."""
    with per_example_gates(model, len(x)) as leaves:
        with autocast(x.device, amp, grads=True):
            logits = model(x)
        logits = logits.float()
        for t, tgt in enumerate(tgts):  # dz_x/dg per example; dL_x/dg = (p_x - y_x) dz_x/dg for the BCE
            z = log_odds(logits, tgt)
            jac = torch.stack(torch.autograd.grad(z.sum(), leaves, retain_graph=t < len(tgts) - 1), 1)
            p, is_pos = z.detach().sigmoid(), torch.isin(y, torch.tensor(tgt, device=y.device)).to(z.dtype)
            ww = w[t].view(-1, 1, 1)
            grads = (p - is_pos).view(-1, 1, 1) * jac  # [batch, blocks, heads]
            acc["first"][t] += (ww * grads).sum(0)
            acc["fisher"][t] += (ww * grads.square()).sum(0)
            acc["michel"][t] += (ww * grads.abs()).sum(0)
            acc["kl"][t] += (ww * (p * (1 - p)).view(-1, 1, 1) * jac.square()).sum(0)


def _hessian_diag(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tgts: Sequence[tuple[int, ...]],
                  w: torch.Tensor, hdiag: torch.Tensor, probes: int, gen: torch.Generator, amp: Amp) -> None:
    """Add one batch's Hutchinson estimate of the gates' Hessian diagonal (Rademacher probes) to hdiag."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = gate_params(model)
    with requires_grad(model, False, also=params), sdpa_kernel(SDPBackend.MATH):  # fused CPU SDPA: no double backward
        with autocast(x.device, amp, grads=True):
            logits = model(x)
        logits = logits.float()
        for t, tgt in enumerate(tgts):
            loss = (vs_rest_loss(logits, y, tgt, per_example=True) * w[t]).sum()
            grad = torch.stack(torch.autograd.grad(loss, params, create_graph=True))
            for i in range(probes):
                v = torch.randint(0, 2, tuple(hdiag.shape[1:]), generator=gen).mul(2).sub(1).to(grad)
                hv = torch.stack(torch.autograd.grad((grad * v).sum(), params,
                                                     retain_graph=i < probes - 1 or t < len(tgts) - 1))
                hdiag[t] += v * hv / probes
