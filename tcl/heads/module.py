"""Class modules: a head-pruned backbone for one class vs the rest, calibrated, optionally recovered by distillation."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..stream import Amp, Data, batches, labels, moved, sampled, subset
from ..utils import autocast, device_of, requires_grad
from .gates import HeadsError, Target, gates, insert_gates, num_heads
from .importance import SCORERS, gated_importance
from .objective import (balanced_batch, balanced_indices, check_target, default_classes, log_odds, resolve_classes,
                        top1_in, two_logits)
from .prune import prune_heads
from .reset import ResetConfig, check_keep, keep_mask, train_gates

__all__ = ['ClassModule', 'best_threshold', 'scores', 'calibrate', 'reference_threshold', 'extract_module', 'random_mask', 'RecoverConfig', 'recover', 'recover_calibrated', 'decompose_class', 'class_importance']


class ClassModule(nn.Module):
    """A head-pruned backbone for `target` vs the rest. forward -> [B, 2] = (max logit of the other classes, max logit
    of the target's): its argmax is the backbone's top-1 mapped to c-vs-rest, the same rule as for the original model.
    score() is the smooth log-odds; predict() thresholds it at `threshold` when calibrated, else uses the top-1 rule."""

    def __init__(self, backbone: VisionTransformer, target: tuple[int, ...], mask: torch.Tensor,
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.backbone, self.target, self.info = backbone, target, dict(info or {})
        self.register_buffer("mask", mask.bool().to(device_of(backbone)))
        self.threshold: float | None = None
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Log-odds z = log p(target) / p(rest) under the pruned backbone's softmax."""
        return log_odds(self.backbone(x), self.target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return two_logits(self.backbone(x), self.target)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Bool [B]: target or not (calibrated threshold on the log-odds if set, else the top-1 rule)."""
        logits = self.backbone(x)
        if self.threshold is not None:
            return log_odds(logits, self.target) > self.threshold
        return top1_in(logits, self.target)


def best_threshold(z: torch.Tensor, truth: torch.Tensor) -> float:
    """The threshold t maximising the balanced accuracy of z > t (midway between neighbouring distinct scores)."""
    zs, order = z.double().sort()
    t = truth[order].double()
    n_pos, n_neg = t.sum(), (1 - t).sum()
    if n_pos == 0 or n_neg == 0:
        raise HeadsError("threshold calibration needs target and other images in the data")
    pos_before = torch.cat([t.new_zeros(1), t.cumsum(0)])  # cut i: predict positive for sorted index >= i
    neg_before = torch.cat([t.new_zeros(1), (1 - t).cumsum(0)])
    ba = ((n_pos - pos_before) / n_pos + neg_before / n_neg) / 2
    edges = torch.cat([zs[:1] - 1, zs, zs[-1:] + 1])
    ba[1:-1][zs[1:] == zs[:-1]] = -1  # a cut inside a tie is not realisable
    i = int(ba.argmax())
    return float((edges[i] + edges[i + 1]) / 2)


@torch.inference_mode()
def scores(model: nn.Module, data: Data, limit: int | None = None, batch_size: int = 256,
           amp: Amp = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) of model over data (CPU, dataset order), computed on the model's device; a ClassModule gives
    its log-odds score instead of 2 logits."""
    model.eval()
    dev = device_of(model)
    f = model.score if isinstance(model, ClassModule) else model
    outs = []
    for x, _ in batches(data, batch_size, limit, dev):
        with autocast(dev, amp):
            outs.append(f(x).float().cpu())
    return torch.cat(outs), labels(data)[:limit]


def calibrate(module: ClassModule, data: Data, limit: int | None = None, amp: Amp = None) -> float:
    """Set module.threshold to the balanced-accuracy-optimal log-odds threshold on data (the held-out split)."""
    z, y = scores(module, data, limit, amp=amp)
    module.threshold = best_threshold(z, torch.isin(y, torch.tensor(module.target)))
    return module.threshold


def reference_threshold(reference: nn.Module | torch.Tensor, data: Data, target: Target, limit: int | None = None,
                        amp: Amp = None) -> float:
    """The same calibration for the original model (or its logits on data): its BA-optimal log-odds threshold."""
    logits = reference if isinstance(reference, torch.Tensor) else scores(reference, data, limit, amp=amp)[0]
    y = labels(data)[:limit]
    tgt = (target,) if isinstance(target, int) else tuple(target)
    return best_threshold(log_odds(logits.cpu(), tgt), torch.isin(y, torch.tensor(tgt)))


def extract_module(model: VisionTransformer, target: Target, mask: torch.Tensor, head_gates: torch.Tensor | None = None,
                   info: dict[str, Any] | None = None) -> ClassModule:
    """The class module for target: heads outside mask physically removed, gates folded, c-vs-rest output."""
    tgt = check_target(model, target)
    return ClassModule(prune_heads(model, mask, head_gates), tgt, mask, {"target": tgt, **(info or {})})


def random_mask(shape: tuple[int, int], keep: int, seed: int = 0, allow_empty_blocks: bool = False) -> torch.Tensor:
    """A random bool [blocks, heads] mask with `keep` heads (>= 1 per block unless allow_empty_blocks)."""
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return keep_mask(scores, keep, allow_empty_blocks)


Method = Literal["reset", "taylor", "fisher", "michel", "hessian", "kl", "random"]


@dataclass
class RecoverConfig:
    """Opt-in distillation recovery of a class module's remaining weights (the gate-only module is the method's result).

    Adam on every backbone weight for `steps` class-balanced batches (target vs rest) of the given data; the loss is
    the KL divergence from the original model's softmax over all classes to the module's, so the module's log-odds
    stay those of a classifier like the original."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0


def recover(module: ClassModule, teacher: nn.Module, data: Data, cfg: RecoverConfig | None = None,
            progress: bool = True, device: torch.device | str | None = None, amp: Amp = None) -> ClassModule:
    """A copy of module with its remaining weights distilled from teacher (the original model) on data; uncalibrated.
    Runs on device (default: the module's); the teacher is used there (a copy when it is elsewhere)."""
    from tqdm.auto import tqdm

    cfg = cfg or RecoverConfig()
    if cfg.steps < 0 or cfg.batch_size < 2 or not cfg.lr > 0:
        raise HeadsError(f"RecoverConfig needs steps >= 0, batch_size >= 2 and lr > 0, got {cfg}")
    autocast("cpu", amp, grads=True)  # validates amp before any work
    pos = torch.isin(labels(data), torch.tensor(module.target))
    pos_idx, neg_idx = pos.nonzero().squeeze(1), (~pos).nonzero().squeeze(1)
    if not len(pos_idx) or not len(neg_idx):
        raise HeadsError(f"recover needs images of the target {module.target} and of the rest; pass e.g. the training split")
    dev = torch.device(device) if device is not None else device_of(module)
    out, t0, history = copy.deepcopy(module).to(dev), time.perf_counter(), []
    teacher = moved(teacher, dev).eval()
    out.threshold = None
    net = out.backbone.eval()
    draws = [balanced_batch(pos_idx, neg_idx, cfg.batch_size, cfg.seed, step)[0] for step in range(cfg.steps)]
    with requires_grad(net, True):
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        for step, (x, _) in tqdm(enumerate(sampled(data, draws, dev)), desc=f"recover {list(module.target)}",
                                 disable=not progress, leave=False, total=cfg.steps):
            with torch.no_grad(), autocast(dev, amp):
                goal = teacher(x).float().log_softmax(-1)
            with autocast(dev, amp, grads=True):
                logits = net(x)
            loss = F.kl_div(logits.float().log_softmax(-1), goal, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                history.append({"step": step, "loss": loss.item()})
    out.info["recover"] = {**asdict(cfg), "history": history, "seconds": time.perf_counter() - t0}
    return out


def recover_calibrated(module: ClassModule, teacher: nn.Module, train: Data, heldout: Data,
                       cfg: RecoverConfig | None = None, progress: bool = True, device: torch.device | str | None = None,
                       amp: Amp = None) -> ClassModule:
    """recover on train, then calibrate on heldout; the module's `seconds` include the recovery."""
    out = recover(module, teacher, train, cfg, progress, device, amp)
    calibrate(out, heldout, amp=amp)
    out.info["seconds"] = out.info.get("seconds", 0.0) + out.info["recover"]["seconds"]
    return out


def _target(data: Data, target: Target | str) -> Target:
    """target with class names (of an ImageFolder) resolved to indices."""
    if isinstance(target, (int, str)):
        return resolve_classes(data, [target])[0]
    return resolve_classes(data, list(target))


def decompose_class(model: VisionTransformer, data: Data, target: Target | str, keep: int, method: Method = "reset",
                    cfg: ResetConfig | None = None, retrain: bool = True, per_side: int | None = None,
                    allow_empty_blocks: bool = False, calibrated: bool = True, seed: int = 0,
                    importance: torch.Tensor | None = None, progress: bool = True,
                    recover_data: Data | None = None, recover_cfg: RecoverConfig | None = None,
                    device: torch.device | str | None = None, amp: Amp = None) -> ClassModule:
    """Build the class module for target with `keep` heads from `data` (the held-out split): 'reset' = gradient-reset
    gate training; a scorer = its top heads, or 'random' = random heads (then, if retrain, gate training with that
    mask fixed, so a random-heads baseline gets the same training as the scored heads).
    Gates are fitted on a c-vs-rest balanced subset (per_side images a side); calibrated sets the threshold on data;
    a precomputed [blocks, heads] importance (e.g. a row of class_importance) skips the scorer; recover_data (e.g. the
    training split) adds distillation recovery of the module's weights (recover) before calibration.
    target: class index (or indices), or an ImageFolder class name. The work runs on a copy of model on device
    (default: the model's device), forwards autocast by amp; the module is returned on that device."""
    tgt = check_target(model, _target(data, target))
    shape = num_heads(model)
    check_keep(shape, keep, allow_empty_blocks)
    if method not in ("reset", "random", *SCORERS):
        raise HeadsError(f"method must be 'reset', 'random' or one of {SCORERS}, got {method!r}")
    autocast("cpu", amp, grads=method != "random" or retrain)  # validates amp before any work
    t0 = time.perf_counter()
    sub = subset(data, balanced_indices(labels(data), tgt, per_side, seed))
    work = insert_gates(copy.deepcopy(model).to(device if device is not None else device_of(model)))
    info: dict[str, Any] = {"method": method, "keep": keep}
    if method == "reset":
        out = train_gates(work, sub, tgt, keep, cfg, allow_empty_blocks, progress=progress, amp=amp)
        mask, info["importance"], info["history"] = out["mask"], out["gates"].abs(), out["history"]
    else:
        if method == "random":
            mask = random_mask(shape, keep, seed, allow_empty_blocks)
        else:
            info["importance"] = importance.cpu() if importance is not None else \
                gated_importance(work, sub, [tgt], [method], seed=seed, progress=progress, amp=amp)[method][0]
            mask = keep_mask(info["importance"], keep, allow_empty_blocks)
        if retrain:
            info["history"] = train_gates(work, sub, tgt, keep, cfg, allow_empty_blocks, fixed_mask=mask,
                                          progress=progress, amp=amp)["history"]
    info["gates"] = gates(work) * mask
    module = extract_module(work, tgt, mask, info["gates"], info)
    if recover_data is not None:
        module = recover(module, model, recover_data, recover_cfg, progress, amp=amp)
    if calibrated:
        calibrate(module, data, amp=amp)
    module.info["seconds"] = time.perf_counter() - t0
    return module


def class_importance(model: VisionTransformer, data: Data, classes: Sequence[int | str] | None = None,
                     method: str = "fisher", keep: int | None = None, cfg: ResetConfig | None = None,
                     per_side: int | None = None, progress: bool = True, device: torch.device | str | None = None,
                     amp: Amp = None, **kw: Any) -> torch.Tensor:
    """Head importance of each class vs the rest as a [classes, blocks, heads] tensor (CPU): a scorer of
    head_importance (one shared forward per batch), or 'gate' = |gates| after gradient-reset training to `keep` heads
    (default half). classes: indices or ImageFolder names; None = default_classes(model) (5 evenly spaced classes,
    all of a model with at most 5), so a 1,000-class model never gets one run per class unless asked."""
    classes = default_classes(model) if classes is None else resolve_classes(data, classes)
    for c in classes:
        check_target(model, c)
    if method != "gate":
        if method not in SCORERS:
            raise HeadsError(f"method must be 'gate' or one of {SCORERS}, got {method!r}")
        autocast("cpu", amp, grads=True)  # validates amp before any work
        work = insert_gates(copy.deepcopy(model).to(device if device is not None else device_of(model)))
        return gated_importance(work, data, [(c,) for c in classes], [method], progress=progress, amp=amp, **kw)[method]
    shape = num_heads(model)
    keep = check_keep(shape, keep if keep is not None else shape[0] * shape[1] // 2, kw.get("allow_empty_blocks", False))
    autocast("cpu", amp, grads=True)  # validates amp before any work
    out = []
    for c in classes:  # decompose_class's gate training, without building the module
        work = insert_gates(copy.deepcopy(model).to(device if device is not None else device_of(model)))
        sub = subset(data, balanced_indices(labels(data), (c,), per_side, kw.get("seed", 0)))
        out.append(train_gates(work, sub, (c,), keep, cfg, kw.get("allow_empty_blocks", False), progress=progress,
                               amp=amp)["gates"].abs())
    return torch.stack(out)
