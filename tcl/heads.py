"""Head modularization, part 1: per-head gates, the c-vs-rest objective, gradient-reset gate training, head importance.

Part 2 (physical pruning, gate folding, class modules, composition, metrics) lives in `tcl.modules` and is
re-exported here, so `tcl.heads` is the one namespace of the method.

Data is a Dataset, a DataLoader or an (images, labels) pair (see `tcl.stream`), streamed in batches to the model's
device. Functions that change a model in place (insert_gates, reset_train, head_importance) run where the model is;
functions that copy it take `device` (default: the model's device). `amp` ("bf16"; "fp16" for forward-only passes;
None = float32) autocasts the forwards. Small results (gates, masks, importances, scores) come back on the CPU.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn
from torch.utils.data import Dataset, Subset

from .stream import Amp, Data, autocast, batches, dataset_of, device_of, labels, sampled, subset, tensor_pair

Target = int | Sequence[int]
SCORERS = ("taylor", "fisher", "michel", "hessian", "kl")
DEFAULT_CLASSES = 5  # classes of the per-class work when none are named (see default_classes)


class HeadsError(ValueError):
    """Raised for bad input to the head-modularization steps (unknown class, infeasible keep count, bad mask)."""


# ---- step 1: gates (an equivalent transformation) -------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: nn.Module, attn_mask: torch.Tensor | None,
           is_causal: bool) -> torch.Tensor:
    """timm Attention's core on [B, heads, N, d] q/k/v: fused SDPA when attn.fused_attn, else its explicit softmax."""
    drop = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    if is_causal:
        n, m = a.shape[-2:]
        a = a.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=a.device).tril(), float("-inf"))
    if attn_mask is not None:  # SDPA's convention: bool = True where attention is allowed, float = added to logits
        a = a.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else a + attn_mask
    return attn.attn_drop(a.softmax(dim=-1)) @ v


class GatedAttention(Attention):
    """timm Attention + `head_gate` [heads] (init 1) multiplying each head's output before `proj`.

    Changes vs timm: only that multiplication; `sample_gate` ([B, heads], None by default) replaces the gate
    per example so one backward yields per-example gate gradients. Everything else (SDPA, qk_norm, timm's
    sigmoid `gate`, dropouts) is timm's. Gates at 1 reproduce the original output exactly.
    """

    head_gate: nn.Parameter
    sample_gate: torch.Tensor | None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        gate = getattr(self, "gate", None)  # timm's sigmoid output gate: newer timm only
        sig = gate(x).sigmoid() if gate is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        g = self.sample_gate if self.sample_gate is not None else self.head_gate
        x = attend(q, k, v, self, attn_mask, is_causal) * g.view(-1, self.num_heads, 1, 1)
        x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        x = self.norm(x) if hasattr(self, "norm") else x  # older timm (1.0.9-1.0.15) has no Attention.norm
        if sig is not None:
            x = x * sig
        return self.proj_drop(self.proj(x))


def attentions(model: nn.Module) -> list[Attention]:
    """The attention module of every block of a timm VisionTransformer (TypeError for anything else)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}; build it with "
                        "timm.models.vision_transformer (tcl.models.create / tcl.models.reference)")
    out = []
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if type(attn) not in (Attention, GatedAttention):
            raise TypeError(f"block {i} attention is {type(attn).__name__}; head gates need timm's plain "
                            "Attention (models built with attn_layer=Attention, the VisionTransformer default)")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise HeadsError(f"block {i} normalises the concatenated heads (scale_attn_norm=True), so heads are "
                             "not separable; use a model built with scale_attn_norm=False")
        out.append(attn)
    return out


def insert_gates(model: VisionTransformer) -> VisionTransformer:
    """In place: give every block's attention one gate per head, initialised to 1 (output unchanged); returns model."""
    for attn in attentions(model):
        if not isinstance(attn, GatedAttention):
            w = attn.qkv.weight
            attn.__class__ = GatedAttention
            attn.head_gate = nn.Parameter(torch.ones(attn.num_heads, device=w.device, dtype=w.dtype))
            attn.sample_gate = None
    return model


def _gated(model: nn.Module) -> list[GatedAttention]:
    out = attentions(model)
    if not all(isinstance(a, GatedAttention) for a in out):
        raise HeadsError("model has no head gates; call tcl.heads.insert_gates(model) first")
    return out  # type: ignore[return-value]


def gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The gate parameters, one [heads] vector per block."""
    return [a.head_gate for a in _gated(model)]


def gates(model: nn.Module) -> torch.Tensor:
    """Current gate values as a [blocks, heads] tensor (a detached CPU copy)."""
    return torch.stack([g.detach().cpu().clone() for g in gate_params(model)])


def set_gates(model: nn.Module, values: torch.Tensor) -> None:
    """Overwrite the gates with a [blocks, heads] tensor (e.g. gates * mask)."""
    params = gate_params(model)
    if tuple(values.shape) != (len(params), params[0].numel()):
        raise HeadsError(f"gate values have shape {tuple(values.shape)}, expected {(len(params), params[0].numel())}")
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.device))


def fold_gates(model: nn.Module) -> nn.Module:
    """In place: scale each head's proj input columns by its gate and reset gates to 1 (equivalent); returns model."""
    with torch.no_grad():
        for a in _gated(model):
            a.proj.weight.mul_(a.head_gate.repeat_interleave(a.head_dim).to(a.proj.weight.dtype))
            a.head_gate.fill_(1.0)
    return model


def remove_gates(model: nn.Module, fold: bool = True) -> nn.Module:
    """In place: fold the gates into proj (fold=True) or drop them, restoring timm's Attention; returns model."""
    if fold:
        fold_gates(model)
    for a in _gated(model):
        del a.head_gate, a.sample_gate
        a.__class__ = Attention
    return model


def num_heads(model: nn.Module) -> tuple[int, int]:
    """(blocks, heads per block) of a timm VisionTransformer."""
    attns = attentions(model)
    return len(attns), attns[0].num_heads


# ---- the c-vs-rest objective ----------------------------------------------------------------------------------
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
    """Class indices for classes given as indices or as folder names of data's ImageFolder (`class_to_idx`)."""
    names: dict[str, int] | None = None
    if data is not None and tensor_pair(data) is None:
        ds = dataset_of(data)
        while isinstance(ds, Subset):
            ds = ds.dataset
        names = getattr(ds, "class_to_idx", None)
    out = []
    for c in classes:
        if isinstance(c, str):
            if names is None or c not in names:
                known = sorted(names or {})
                raise HeadsError(f"unknown class {c!r}; " + (f"this data's classes are {known[:8]}"
                                 f"{' ...' if len(known) > 8 else ''} ({len(known)} in all)" if known else
                                 "name classes by index (the data has no class_to_idx)"))
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


# ---- step 2: gradient-reset training of the gates -------------------------------------------------------------
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
    so one step moves the kept gates by at most lr*clip (None: no cap). Default 0.1: the largest per-class 90th
    percentile of that norm on the reference model (0.034-0.101 over the 10 classes); uncapped, one class (Ankle boot)
    hit a single spike of 2.89 at step 116, its kept gates jumped from 0.7 to 3 and its module lost 9 pt of BA.
    Defaults: tuned on the shipped reference model (Fashion-MNIST ViT, 8 blocks x 4 heads) and its held-out split;
    for another model or data they are a starting point - override any of them (ResetConfig(steps=..., lr=...), or
    dataclasses.replace(cfg, ...)). There: lr * lam = 0.02, so a head forgotten at the end of the ramp (step 50) is at
    0 by step 100; "distill" keeps the module's top-1 rule as calibrated as the original's ("labels" with
    class-balanced batches shifts it towards the target); "fisher" re-ranks heads as they go.
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


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def reset_train(model: nn.Module, data: Data, target: Target, keep: int, cfg: ResetConfig | None = None,
                allow_empty_blocks: bool = False, fixed_mask: torch.Tensor | None = None,
                checkpoint: str | os.PathLike | None = None, save_every: int = 50, progress: bool = True,
                amp: Amp = None) -> dict[str, Any]:
    """Gradient-reset training of the gates (inserted if missing) on class-balanced c-vs-rest batches of `data`
    (the held-out split) until `keep` heads have m=1; returns gates, mask, history. fixed_mask skips the schedule.
    Runs on the model's device (move the model first); batches are fetched from data step by step."""
    from tqdm.auto import tqdm

    cfg = cfg or ResetConfig()
    insert_gates(model)
    tgt = check_target(model, target)
    shape = num_heads(model)
    check_keep(shape, keep, allow_empty_blocks)
    autocast("cpu", amp, grads=True)  # validates amp before any work
    dev = device_of(model)
    y_all = labels(data)
    pos = torch.isin(y_all, torch.tensor(tgt))
    pos_idx, neg_idx = pos.nonzero().squeeze(1), (~pos).nonzero().squeeze(1)
    balance_weights(pos)  # raises when one side is empty
    params = gate_params(model)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(cfg.train_weights)
    for p in params:
        p.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": params}]
    if cfg.train_weights:
        ids = {id(p) for p in params}
        groups.append({"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.weights_lr})
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
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
                crit = head_importance(model, subset(data, sel), [tgt], [cfg.criterion], progress=False,
                                       amp=amp)[cfg.criterion][0]
                crit = crit * gates(model).square() if cfg.criterion == "fisher" else crit
            mask = keep_mask(crit, mask.numel() - want, allow_empty_blocks, current=mask)
        if step % 10 == 0 or step == cfg.steps - 1:
            cur = gates(model).abs()
            history.append({"step": step, "loss": out["loss"], "grad_norm": out["grad_norm"], "kept": int(mask.sum()),
                            "gate_kept": float(cur[mask].mean()) if mask.any() else 0.0,
                            "gate_forgotten": float(cur[~mask].mean()) if (~mask).any() else 0.0})
        if path is not None and ((step + 1) % save_every == 0 or step == cfg.steps - 1):
            _save_atomic({"run": run, "step": step + 1, "gates": gates(model), "opt": opt.state_dict(), "mask": mask,
                          "ema": ema, "history": history,
                          "model": model.state_dict() if cfg.train_weights else None}, path)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    if fixed_mask is None and int(mask.sum()) > keep:  # too few steps for the schedule: finish the ranking now
        mask = keep_mask(gates(model).abs(), keep, allow_empty_blocks, current=mask)
    return {"gates": gates(model), "mask": mask, "history": history, "seconds": time.perf_counter() - t0,
            "taylor_ema": ema}


# ---- step 3: importance scores --------------------------------------------------------------------------------
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
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tqdm.auto import tqdm

    bad = [m for m in methods if m not in SCORERS]
    if bad:
        raise HeadsError(f"unknown scorer(s) {bad}; choose from {SCORERS} (or 'gate' via reset_train)")
    autocast("cpu", amp, grads=True)  # validates amp before any work
    insert_gates(model)
    tgts = [check_target(model, t) for t in targets]
    y_all = labels(data)[:limit]
    dev = device_of(model)
    w = torch.stack([balance_weights(torch.isin(y_all, torch.tensor(t))) for t in tgts]).to(dev)  # [T, n]
    shape, g0 = num_heads(model), gates(model)
    first, fisher, michel, kl, hdiag = (torch.zeros(len(tgts), *shape, device=dev) for _ in range(5))
    tgt_ids = [torch.tensor(t, device=dev) for t in tgts]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = -(-len(y_all) // batch_size)
    for s, (x, y) in zip(range(0, len(y_all), batch_size),
                         tqdm(batches(data, batch_size, limit, dev), desc="importance", disable=not progress,
                              leave=False, total=total)):
        if {"taylor", "fisher", "michel", "kl"} & set(methods):
            with per_example_gates(model, len(x)) as leaves:
                with autocast(dev, amp, grads=True):
                    logits = model(x)
                logits = logits.float()
                for t, tgt in enumerate(tgts):  # dz_x/dg per example; dL_x/dg = (p_x - y_x) dz_x/dg for the BCE
                    z = log_odds(logits, tgt)
                    jac = torch.stack(torch.autograd.grad(z.sum(), leaves, retain_graph=t < len(tgts) - 1), 1)
                    p, is_pos = z.detach().sigmoid(), torch.isin(y, tgt_ids[t]).to(z.dtype)
                    ww = w[t, s:s + batch_size].view(-1, 1, 1)
                    grads = (p - is_pos).view(-1, 1, 1) * jac  # [batch, blocks, heads]
                    first[t] += (ww * grads).sum(0)
                    fisher[t] += (ww * grads.square()).sum(0)
                    michel[t] += (ww * grads.abs()).sum(0)
                    kl[t] += (ww * (p * (1 - p)).view(-1, 1, 1) * jac.square()).sum(0)
        if "hessian" in methods:
            params = gate_params(model)
            for p in params:
                p.requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
                with autocast(dev, amp, grads=True):
                    logits = model(x)
                logits = logits.float()
                for t, tgt in enumerate(tgts):
                    loss = (vs_rest_loss(logits, y, tgt, per_example=True) * w[t, s:s + batch_size]).sum()
                    grad = torch.stack(torch.autograd.grad(loss, params, create_graph=True))
                    for i in range(probes):
                        v = torch.randint(0, 2, shape, generator=gen).mul(2).sub(1).to(grad)
                        hv = torch.stack(torch.autograd.grad((grad * v).sum(), params,
                                                             retain_graph=i < probes - 1 or t < len(tgts) - 1))
                        hdiag[t] += v * hv / probes
            for p in params:
                p.requires_grad_(False)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    first, fisher, michel, kl, hdiag = (a.cpu() for a in (first, fisher, michel, kl, hdiag))
    out = {"taylor": (g0 * first).abs(), "fisher": fisher, "michel": michel, "kl": 0.5 * g0.square() * kl,
           "hessian": 0.5 * g0.square() * hdiag, "hessian_diag": hdiag}
    return {k: v for k, v in out.items() if k in methods or (k == "hessian_diag" and "hessian" in methods)}


from .modules import *  # noqa: E402,F401,F403  re-export part 2 (physical pruning, modules, composition, metrics)
from .modules import __all__ as _modules_all  # noqa: E402

__all__ = ["HeadsError", "GatedAttention", "attend", "attentions", "insert_gates", "gate_params", "gates", "set_gates",
           "fold_gates", "remove_gates", "num_heads", "check_target", "log_odds", "balance_weights", "vs_rest_loss",
           "tensors", "balanced_batch", "resolve_classes", "default_classes", "DEFAULT_CLASSES", "balanced_indices",
           "ResetConfig", "penalty_grad", "forgotten_at", "check_keep", "keep_mask",
           "reset_step", "reset_train", "per_example_gates", "head_importance", "SCORERS", *_modules_all]
