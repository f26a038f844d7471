"""Step 2: gradient-reset (ResRep-style) training of the gates, with its forgetting schedule and kept-head masks."""
from __future__ import annotations

import numbers
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..stream import Amp, Data, batches, labels, sampled, subset
from ..utils import autocast, device_of, requires_grad, save_atomic
from .gates import HeadsError, Target, gate_params, gates, insert_gates, num_heads, set_gates
from .importance import gated_importance
from .objective import balance_weights, balanced_batch, check_target, log_odds, vs_rest_loss

__all__ = ['ResetConfig', 'penalty_grad', 'forgotten_at', 'check_keep', 'keep_count', 'keep_mask', 'reset_step', 'reset_train', 'train_gates']


Penalty = Literal["sign", "unit", "l2"]


@dataclass
class ResetConfig:
    """Gradient-reset (ResRep-style) gate training. SGD on the gates; per step the objective gradient is masked
    (m=0 for heads being forgotten) and the penalty gradient lam * P(g) is added by hand (it is not in the loss).

    P: "sign" (default) = sign(g), the L1 subgradient - a forgotten gate falls by exactly lr*lam per step, so it
    reaches 0 in a known number of steps; "unit" = g / sqrt(g^2 + eps^2), ResRep's group-Lasso gradient g/|g| for a
    scalar group, smoothed at 0 so it does not chatter there; "l2" = g (exponential decay, never exactly 0).
    Mask schedule: after warmup*steps, in `updates` equal stages ending at ramp*steps, the kept heads with the
    lowest criterion get m=0 until `keep` heads remain: "gate" |g|; "taylor" an EMA of |g * dL/dg|; "fisher" /
    "kl" the saliencies g^2 * Fisher of head_importance for the current gated model on `probe` held-out images.
    Objective: "labels" = c-vs-rest BCE against the labels; "distill" = against the original model's p(target).
    clip: the masked objective gradient's L2 norm (over all gates) is capped at `clip` before the penalty is added,
    so one step moves the kept gates by at most lr*clip (None: no cap).
    The defaults suit the shipped reference model (8 blocks x 4 heads): with lr * lam = 0.02 a head forgotten at the
    end of the ramp is at 0 by the last step. For another model or data they are a starting point: override any.
    """

    steps: int = 100
    batch_size: int = 64
    lr: float = 10.0
    momentum: float = 0.0
    lam: float = 2e-3
    penalty: Penalty = "sign"
    eps: float = 1e-2
    warmup: float = 0.1
    ramp: float = 0.5
    updates: int = 8
    criterion: Literal["gate", "taylor", "fisher", "kl"] = "fisher"
    probe: int = 256
    objective: Literal["labels", "distill"] = "distill"
    clip: float | None = 0.1
    train_weights: bool = False
    weights_lr: float = 1e-4
    seed: int = 0


def penalty_grad(g: torch.Tensor, cfg: ResetConfig) -> torch.Tensor:
    """The penalty gradient lam * P(g) for the configured P (see ResetConfig)."""
    if cfg.penalty == "sign":
        return cfg.lam * torch.sign(g)
    if cfg.penalty == "unit":
        return cfg.lam * g / torch.sqrt(g * g + cfg.eps ** 2)
    if cfg.penalty == "l2":
        return cfg.lam * g
    raise HeadsError(f"penalty must be 'sign', 'unit' or 'l2', got {cfg.penalty!r}")


def forgotten_at(step: int, n_forget: int, cfg: ResetConfig) -> int:
    """How many heads the schedule has forgotten once `step` (0-based) is done."""
    start, end = cfg.warmup * cfg.steps, cfg.ramp * cfg.steps
    frac = min(max((step + 1 - start) / max(end - start, 1e-9), 0.0), 1.0)
    return round(n_forget * int(frac * cfg.updates + 1e-9) / cfg.updates)


def check_keep(shape: tuple[int, int], keep: int, allow_empty_blocks: bool = False) -> int:
    """Validate a kept-head count for a [blocks, heads] model: >= 1 per block unless allow_empty_blocks."""
    blocks, heads = shape
    low = 0 if allow_empty_blocks else blocks
    if not low <= keep <= blocks * heads:
        raise HeadsError(f"keep={keep} heads is infeasible for {blocks} blocks x {heads} heads: keep between {low} and "
                         f"{blocks * heads}" + ("" if allow_empty_blocks else " (>= 1 per block; pass "
                                                "allow_empty_blocks=True to drop whole attention branches)"))
    return keep


def keep_count(shape: tuple[int, int], keep: int | float, allow_empty_blocks: bool = False) -> int:
    """The kept-head count of a [blocks, heads] model for keep given as a count (an int) or as a fraction of all heads
    (a float in (0, 1], rounded to the nearest count), validated by check_keep."""
    total = shape[0] * shape[1]
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise HeadsError(f"keep must be a head count (int) or a fraction of the {total} heads (float), got {keep!r}")
    if not isinstance(keep, numbers.Integral):
        if not 0 < keep <= 1:
            raise HeadsError(f"keep={keep} is neither a head count (pass an int, e.g. {total // 2}) nor a fraction "
                             f"in (0, 1] of the model's {shape[0]} blocks x {shape[1]} heads = {total} heads")
        count = max(int(keep * total + 0.5), 1)
        try:
            return check_keep(shape, count, allow_empty_blocks)
        except HeadsError as e:
            raise HeadsError(f"keep={keep} of the {total} heads is {count}: {e}") from None
    return check_keep(shape, int(keep), allow_empty_blocks)


def keep_mask(scores: torch.Tensor, keep: int, allow_empty_blocks: bool = False,
              current: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [blocks, heads] mask keeping `keep` heads of `current` (default all): drops lowest scores first, >= 1 per block."""
    check_keep(tuple(scores.shape), keep, allow_empty_blocks)  # type: ignore[arg-type]
    mask = torch.ones_like(scores, dtype=torch.bool) if current is None else current.clone().bool()
    low = 0 if allow_empty_blocks else 1
    if int(mask.sum()) < keep:
        raise HeadsError(f"only {int(mask.sum())} heads are still kept; cannot keep {keep}")
    for flat in scores.flatten().argsort(stable=True).tolist():
        if int(mask.sum()) == keep:
            break
        b, h = divmod(flat, scores.shape[1])
        if mask[b, h] and int(mask[b].sum()) > low:
            mask[b, h] = False
    return mask


def reset_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, target: Sequence[int],
               mask: torch.Tensor, cfg: ResetConfig, soft: torch.Tensor | None = None, amp: Amp = None) -> dict[str, Any]:
    """One step: loss.backward(); gate grad <- clip(m * objective grad) + lam * P(g); opt.step(). Returns loss, grads."""
    params = gate_params(model)
    opt.zero_grad(set_to_none=True)
    with autocast(x.device, amp, grads=True):
        logits = model(x)
    loss = vs_rest_loss(logits.float(), y, target, soft=soft)
    loss.backward()
    objective = torch.stack([p.grad.detach().clone() for p in params])  # type: ignore[union-attr]
    m = mask.to(objective.device)
    norm = float((objective * m).norm())
    scale = min(1.0, cfg.clip / norm) if cfg.clip is not None and norm > 0 else 1.0
    with torch.no_grad():
        for p, mb in zip(params, m):
            p.grad = p.grad * (mb.to(p.dtype) * scale) + penalty_grad(p.detach(), cfg)  # type: ignore[operator]
    opt.step()
    return {"loss": loss.item(), "objective_grad": objective.cpu(), "grad_norm": norm}


@torch.no_grad()
def _teacher(model: nn.Module, data: Data, target: Sequence[int], batch_size: int = 256, amp: Amp = None) -> torch.Tensor:
    """p(target) of the original model (all gates at 1) on data, in dataset order (CPU), for the distillation objective."""
    now, dev = gates(model), device_of(model)
    set_gates(model, torch.ones_like(now))
    out = []
    for x, _ in batches(data, batch_size, device=dev):
        with autocast(dev, amp):
            logits = model(x)
        out.append(log_odds(logits.float(), target).sigmoid().cpu())
    set_gates(model, now)
    return torch.cat(out)


def reset_train(model: nn.Module, data: Data, target: Target, keep: int, cfg: ResetConfig | None = None,
                allow_empty_blocks: bool = False, fixed_mask: torch.Tensor | None = None,
                checkpoint: str | os.PathLike | None = None, save_every: int = 50, progress: bool = True,
                amp: Amp = None) -> dict[str, Any]:
    """Gradient-reset training of the gates (inserted if missing) on class-balanced c-vs-rest batches of `data`
    (the held-out split) until `keep` heads have m=1; returns gates, mask, history. fixed_mask skips the schedule.
    Runs on the model's device (move the model first); batches are fetched from data step by step."""
    insert_gates(model)
    return train_gates(model, data, check_target(model, target), keep, cfg, allow_empty_blocks, fixed_mask, checkpoint,
                       save_every, progress, amp)


def train_gates(model: nn.Module, data: Data, tgt: tuple[int, ...], keep: int, cfg: ResetConfig | None = None,
                allow_empty_blocks: bool = False, fixed_mask: torch.Tensor | None = None,
                checkpoint: str | os.PathLike | None = None, save_every: int = 50, progress: bool = True,
                amp: Amp = None) -> dict[str, Any]:
    """reset_train of a model that has its gates, for a checked target (a tuple of check_target)."""
    cfg = cfg or ResetConfig()
    check_keep(num_heads(model), keep, allow_empty_blocks)
    autocast("cpu", amp, grads=True)  # validates amp before any work
    with requires_grad(model, cfg.train_weights, also=gate_params(model)):
        out = _train_gates(model, data, tgt, keep, cfg, allow_empty_blocks, fixed_mask, checkpoint, save_every,
                           progress, amp)
    mask = out["mask"]
    if fixed_mask is None and int(mask.sum()) > keep:  # too few steps for the schedule: finish the ranking now
        mask = keep_mask(gates(model).abs(), keep, allow_empty_blocks, current=mask)
    return {"gates": gates(model), "mask": mask, "history": out["history"], "seconds": out["seconds"],
            "taylor_ema": out["ema"]}


def _optimizer(model: nn.Module, cfg: ResetConfig) -> torch.optim.Optimizer:
    """SGD on the gates (and, with cfg.train_weights, on every other weight at weights_lr)."""
    params = gate_params(model)
    groups: list[dict[str, Any]] = [{"params": params}]
    if cfg.train_weights:
        ids = {id(p) for p in params}
        groups.append({"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.weights_lr})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _train_gates(model: nn.Module, data: Data, tgt: tuple[int, ...], keep: int, cfg: ResetConfig,
                 allow_empty_blocks: bool, fixed_mask: torch.Tensor | None, checkpoint: str | os.PathLike | None,
                 save_every: int, progress: bool, amp: Amp) -> dict[str, Any]:
    """reset_train's loop (resumable from checkpoint): a reason for its length is that every step's state (gates,
    mask, EMA, optimizer, history) is one checkpoint, and splitting the loop would scatter it."""
    from tqdm.auto import tqdm

    shape, dev = num_heads(model), device_of(model)
    pos = torch.isin(labels(data), torch.tensor(tgt))
    pos_idx, neg_idx = pos.nonzero().squeeze(1), (~pos).nonzero().squeeze(1)
    balance_weights(pos)  # raises when one side is empty
    opt = _optimizer(model, cfg)
    mask = torch.ones(shape, dtype=torch.bool) if fixed_mask is None else fixed_mask.clone().bool().cpu()
    ema, history, start, t0 = torch.zeros(shape), [], 0, time.perf_counter()
    run = {"target": tgt, "keep": keep, "cfg": asdict(cfg), "fixed": None if fixed_mask is None else fixed_mask.tolist()}
    model.eval()  # no dropout / drop-path: the gates are fitted to the inference-time network
    teacher = _teacher(model, data, tgt, amp=amp) if cfg.objective == "distill" else None
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        state = torch.load(path, weights_only=False, map_location="cpu")
        if state["run"] != run:
            raise HeadsError(f"checkpoint {path} was written by a different run; delete it or pass another path")
        set_gates(model, state["gates"])
        if cfg.train_weights:
            model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        mask, ema, history, start = state["mask"], state["ema"], state["history"], state["step"]
    n_forget = mask.numel() - keep
    steps = range(start, cfg.steps)
    draws = [balanced_batch(pos_idx, neg_idx, cfg.batch_size, cfg.seed, step) for step in steps]
    stream = sampled(data, [idx for idx, _ in draws], dev)
    for step, (idx, g), (x, y) in tqdm(zip(steps, draws, stream), desc=f"reset {list(tgt)}", disable=not progress,
                                       leave=False, initial=start, total=cfg.steps):
        before = gates(model)
        soft = None if teacher is None else teacher[idx].to(dev)
        out = reset_step(model, opt, x, y, tgt, mask, cfg, soft, amp)
        ema = 0.9 * ema + 0.1 * (before * out["objective_grad"]).abs()
        if fixed_mask is None and (want := forgotten_at(step, n_forget, cfg)) > mask.numel() - int(mask.sum()):
            crit = gates(model).abs() if cfg.criterion == "gate" else ema
            if cfg.criterion in ("fisher", "kl"):
                sel = torch.cat([pos_idx[torch.randperm(len(pos_idx), generator=g)[:cfg.probe // 2]],
                                 neg_idx[torch.randperm(len(neg_idx), generator=g)[:cfg.probe // 2]]])
                crit = gated_importance(model, subset(data, sel), [tgt], [cfg.criterion], progress=False,
                                        amp=amp)[cfg.criterion][0]
                crit = crit * gates(model).square() if cfg.criterion == "fisher" else crit
            mask = keep_mask(crit, mask.numel() - want, allow_empty_blocks, current=mask)
        if step % 10 == 0 or step == cfg.steps - 1:
            cur = gates(model).abs()
            history.append({"step": step, "loss": out["loss"], "grad_norm": out["grad_norm"], "kept": int(mask.sum()),
                            "gate_kept": float(cur[mask].mean()) if mask.any() else 0.0,
                            "gate_forgotten": float(cur[~mask].mean()) if (~mask).any() else 0.0})
        if path is not None and ((step + 1) % save_every == 0 or step == cfg.steps - 1):
            save_atomic({"run": run, "step": step + 1, "gates": gates(model), "opt": opt.state_dict(), "mask": mask,
                         "ema": ema, "history": history,
                         "model": model.state_dict() if cfg.train_weights else None}, path)
    return {"mask": mask, "history": history, "seconds": time.perf_counter() - t0, "ema": ema}
