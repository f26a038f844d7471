"""Head modularization, part 2: physical head pruning with folded gates, class modules, composition, metrics.

Re-exported by `tcl.heads` (import that). A class module is the reference backbone with only the heads chosen
for class c (per-block head counts may differ), the trained gates folded into `proj`, and a c-vs-rest output.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .evaluate import round_robin
from .heads import (SCORERS, GatedAttention, HeadsError, ResetConfig, Target, attend, attentions, balanced_batch,
                    balanced_indices, check_keep, check_target, default_classes, gates, head_importance, insert_gates,
                    keep_mask, log_odds, num_heads, reset_train, resolve_classes)
from .schedule import vit_dims
from .stream import Amp, Data, autocast, batches, device_of, labels, moved, sampled, subset


# ---- step 4: physical pruning ---------------------------------------------------------------------------------
def _linear(src: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            col_scale: torch.Tensor | None = None) -> nn.Linear:
    w = src.weight.detach()
    rows = rows.to(w.device) if rows is not None else None
    w = w[rows] if rows is not None else w
    w = w[:, cols.to(w.device)] if cols is not None else w
    out = nn.Linear.__new__(nn.Linear)  # no init: the weights are copied (and may have 0 columns)
    nn.Module.__init__(out)
    out.in_features, out.out_features = w.shape[1], w.shape[0]
    out.weight = nn.Parameter(w * col_scale.to(w) if col_scale is not None else w.clone(), requires_grad=False)
    b = None if src.bias is None else src.bias.detach()[rows] if rows is not None else src.bias.detach().clone()
    out.bias = None if b is None else nn.Parameter(b, requires_grad=False)
    return out


class PrunedAttention(nn.Module):
    """timm Attention restricted to the kept heads, with its own `num_heads` (may differ per block, may be 0).

    Changes vs timm: qkv keeps the kept heads' rows, proj their columns (scaled by the folded gates), timm's sigmoid
    `gate` their rows; with 0 heads nothing is computed and the branch returns proj's bias (= all gates at 0).
    """

    def __init__(self, attn: nn.Module, keep: torch.Tensor, head_gates: torch.Tensor | None = None):
        super().__init__()
        kept = keep.bool().cpu().nonzero().squeeze(1)
        d, width = attn.head_dim, attn.num_heads * attn.head_dim
        cols = (kept[:, None] * d + torch.arange(d)).flatten()
        g = head_gates.cpu()[kept].detach().repeat_interleave(d) if head_gates is not None else None
        self.num_heads, self.head_dim, self.attn_dim = len(kept), d, len(kept) * d
        self.scale, self.fused_attn = attn.scale, attn.fused_attn
        self.kept_heads: list[int] = kept.tolist()
        self.qkv = _linear(attn.qkv, rows=torch.cat([cols + i * width for i in range(3)]))
        self.q_norm, self.k_norm = copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)
        gate = getattr(attn, "gate", None)  # timm's sigmoid output gate: newer timm only
        self.gate = _linear(gate, rows=cols) if gate is not None else None
        self.proj = _linear(attn.proj, cols=cols, col_scale=g)
        self.attn_drop, self.proj_drop = copy.deepcopy(attn.attn_drop), copy.deepcopy(attn.proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        if self.num_heads == 0:
            return self.proj_drop(self.proj(x.new_zeros(b, n, 0)))
        sig = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(self.q_norm(q), self.k_norm(k), v, self, attn_mask, is_causal).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x * sig if sig is not None else x))


def prune_heads(model: VisionTransformer, mask: torch.Tensor, head_gates: torch.Tensor | None = None) -> VisionTransformer:
    """A copy of model keeping only the heads in mask (bool [blocks, heads]); gates (default: the model's own, else 1)
    folded into proj. Equals the gated model with gates * mask."""
    attns = attentions(model)
    shape = (len(attns), attns[0].num_heads)
    if tuple(mask.shape) != shape:
        raise HeadsError(f"head mask has shape {tuple(mask.shape)}, expected [blocks, heads] = {list(shape)}")
    mask = mask.bool().cpu()
    if head_gates is None and isinstance(attns[0], GatedAttention):
        head_gates = gates(model)
    new = copy.deepcopy(model)
    for i, blk in enumerate(new.blocks):
        blk.attn = PrunedAttention(blk.attn, mask[i], None if head_gates is None else head_gates[i])
    return new.eval()


def _backbone(model: nn.Module) -> VisionTransformer:
    return model.backbone if isinstance(model, (ClassModule, RestrictedClassifier)) else model  # type: ignore[return-value]


def head_counts(model: nn.Module) -> list[int]:
    """Heads per block of a plain, gated or pruned ViT (or a class module's backbone)."""
    return [int(blk.attn.num_heads) for blk in _backbone(model).blocks]


def head_macs(model: nn.Module) -> int:
    """Analytic MACs per image (DiffRate convention) with per-block head counts: qkv 3NCa, attention 2N^2a, proj NaC
    (+ NCa for timm's sigmoid gate), a = heads * head_dim; equals schedule.macs for the unpruned model."""
    if isinstance(model, ComposedClassifier):
        return sum(head_macs(m) for m in model.parts)
    vit = _backbone(model)
    d = vit_dims(vit)
    total = d.patch_macs + d.dim * d.classes
    for blk in vit.blocks:
        a, n = blk.attn.num_heads * blk.attn.head_dim, d.tokens
        total += 4 * n * d.dim * a + 2 * n * n * a + 2 * n * d.dim * blk.mlp.fc1.out_features
        total += n * d.dim * a if getattr(blk.attn, "gate", None) is not None else 0
    return total


def param_count(model: nn.Module) -> int:
    """Number of parameters (head gates excluded, they fold away)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("head_gate"))


# ---- class modules --------------------------------------------------------------------------------------------
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


def two_logits(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """[B, 2] = (max logit outside target, max logit inside): argmax 1 iff the top-1 class is in target."""
    pos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    pos[list(target)] = True
    return torch.stack([logits[:, ~pos].amax(-1), logits[:, pos].amax(-1)], -1)


def top1_in(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Bool [B]: the top-1 class is in target (a classifier mapped to c-vs-rest)."""
    return torch.isin(logits.argmax(-1), torch.tensor(list(target), device=logits.device))


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
    flags = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    draws = [balanced_batch(pos_idx, neg_idx, cfg.batch_size, cfg.seed, step)[0] for step in range(cfg.steps)]
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
    for p, f in zip(net.parameters(), flags):
        p.requires_grad_(f)
    out.info["recover"] = {**asdict(cfg), "history": history, "seconds": time.perf_counter() - t0}
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
        out = reset_train(work, sub, tgt, keep, cfg, allow_empty_blocks, progress=progress, amp=amp)
        mask, info["importance"], info["history"] = out["mask"], out["gates"].abs(), out["history"]
    else:
        if method == "random":
            mask = random_mask(shape, keep, seed, allow_empty_blocks)
        else:
            info["importance"] = importance.cpu() if importance is not None else \
                head_importance(work, sub, [tgt], [method], seed=seed, progress=progress, amp=amp)[method][0]
            mask = keep_mask(info["importance"], keep, allow_empty_blocks)
        if retrain:
            info["history"] = reset_train(work, sub, tgt, keep, cfg, allow_empty_blocks, fixed_mask=mask,
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
        work = insert_gates(copy.deepcopy(model).to(device if device is not None else device_of(model)))
        return head_importance(work, data, classes, [method], progress=progress, amp=amp, **kw)[method]
    shape = num_heads(model)
    keep = keep if keep is not None else shape[0] * shape[1] // 2
    return torch.stack([decompose_class(model, data, c, keep, "reset", cfg, per_side=per_side, progress=progress,
                                        device=device, amp=amp, **kw).info["importance"] for c in classes])


# ---- step 5: composition --------------------------------------------------------------------------------------
class ComposedClassifier(nn.Module):
    """Classifier over the modules' classes S: each module's log-odds, calibrated as (z - shift) / scale; argmax is
    an index into `classes`. Modules run independently (MACs add up); nothing is trained."""

    def __init__(self, parts: Sequence[ClassModule], shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.classes = [m.target[0] for m in parts]
        self.register_buffer("shift", shift.float().to(device_of(parts[0])))
        self.register_buffer("scale", scale.float().to(device_of(parts[0])))
        self.pretrained_cfg = getattr(parts[0], "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.stack([m.score(x) for m in self.parts], -1) - self.shift) / self.scale


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


Calibration = Literal["none", "threshold", "standardize"]


def compose(parts: Sequence[ClassModule], data: Data | None = None, calibration: Calibration = "standardize",
            limit: int | None = None, amp: Amp = None) -> ComposedClassifier:
    """Combine single-class modules into a classifier over their classes (argmax of calibrated log-odds): 'none' raw;
    'threshold' minus each module's held-out threshold; 'standardize' per-module mean/std over data's images in S."""
    if not parts or any(len(m.target) != 1 for m in parts) or len({m.target for m in parts}) != len(parts):
        raise HeadsError("compose needs one single-class module per class (distinct targets)")
    n = len(parts)
    shift, scale = torch.zeros(n), torch.ones(n)
    if calibration == "threshold":
        if any(m.threshold is None for m in parts):
            raise HeadsError("calibration='threshold' needs calibrated modules; run tcl.heads.calibrate(module, heldout)")
        shift = torch.tensor([float(m.threshold) for m in parts])  # type: ignore[arg-type]
    elif calibration == "standardize":
        if data is None:
            raise HeadsError("calibration='standardize' needs data (the held-out split); pass data= or calibration='none'")
        sel = torch.isin(labels(data)[:limit], torch.tensor([m.target[0] for m in parts])).nonzero().squeeze(1)
        z = torch.stack([scores(m, subset(data, sel), amp=amp)[0] for m in parts], -1)
        shift, scale = z.mean(0), z.std(0).clamp_min(1e-6)
    elif calibration != "none":
        raise HeadsError(f"calibration must be 'none', 'threshold' or 'standardize', got {calibration!r}")
    return ComposedClassifier(parts, shift, scale)


class RestrictedClassifier(nn.Module):
    """A backbone whose output is restricted to the logits of `classes` (argmax = index into classes)."""

    def __init__(self, backbone: VisionTransformer, classes: Sequence[int]):
        super().__init__()
        self.backbone, self.classes = backbone, list(classes)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[:, self.classes]


def union_classifier(model: VisionTransformer, parts: Sequence[ClassModule], classes: Sequence[int] | None = None,
                     head_gates: torch.Tensor | None = None) -> RestrictedClassifier:
    """One backbone keeping the union of the modules' heads (original weights unless head_gates), logits of classes."""
    classes = list(classes) if classes is not None else sorted({c for m in parts for c in m.target})
    for c in classes:
        check_target(model, c)
    mask = torch.stack([m.mask for m in parts]).any(0)
    return RestrictedClassifier(prune_heads(model, mask, head_gates), classes)


def restricted(model: VisionTransformer, classes: Sequence[int]) -> RestrictedClassifier:
    """The original model with its logits restricted to classes (the reference for composed classifiers)."""
    return RestrictedClassifier(model, classes)


def subset_accuracy(clf: ComposedClassifier | RestrictedClassifier, data: Data, limit: int | None = None,
                    amp: Amp = None) -> float:
    """Top-1 accuracy of a classifier over classes S on the images of data whose label is in S."""
    cls = torch.tensor(clf.classes)
    sel = torch.isin(labels(data)[:limit], cls).nonzero().squeeze(1)
    out, y = scores(clf, subset(data, sel), amp=amp)
    return (cls[out.argmax(-1)] == y).float().mean().item()


# ---- metrics --------------------------------------------------------------------------------------------------
def binary_metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Balanced accuracy, F1, TPR, TNR and precision of bool predictions against bool truth."""
    tp = int((pred & truth).sum())
    fp, fn, tn = int((pred & ~truth).sum()), int((~pred & truth).sum()), int((~pred & ~truth).sum())
    tpr, tnr = tp / max(tp + fn, 1), tn / max(tn + fp, 1)
    prec = tp / max(tp + fp, 1)
    return {"balanced_accuracy": (tpr + tnr) / 2, "f1": 2 * tp / max(2 * tp + fp + fn, 1), "tpr": tpr, "tnr": tnr,
            "precision": prec}


def auc(score: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve of real scores against bool truth (ties count half): threshold-free separability."""
    pos, neg = score[truth].double(), score[~truth].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    neg = neg.sort().values
    below = torch.searchsorted(neg, pos, right=False).double()
    ties = torch.searchsorted(neg, pos, right=True).double() - below
    return float((below + ties / 2).sum() / (len(pos) * len(neg)))


def module_report(module: ClassModule, reference: nn.Module | torch.Tensor, data: Data, ref_threshold: float | None = None,
                  limit: int | None = None, amp: Amp = None) -> dict[str, Any]:
    """A flat record: module vs the reference model (or its logits on data) mapped to c-vs-rest, on the same images
    (the test split when reporting): BA / F1 / TPR / TNR by the top-1 rule, AUC of the log-odds, and, when
    module.threshold and ref_threshold are set (calibrated on the held-out split), BA at those thresholds."""
    logits, y = scores(module.backbone, data, limit, amp=amp)
    ref = reference.cpu() if isinstance(reference, torch.Tensor) else scores(reference, data, limit, amp=amp)[0]
    truth = torch.isin(y, torch.tensor(module.target))
    z, zr = log_odds(logits, module.target), log_odds(ref, module.target)
    pm, pr = top1_in(logits, module.target), top1_in(ref, module.target)
    method = f"{module.info.get('method')}{'+recover' if 'recover' in module.info else ''}"
    rec: dict[str, Any] = {"target": list(module.target), "method": method,
                           "heads_kept": int(module.mask.sum()), "heads_total": module.mask.numel(),
                           "params": param_count(module), "macs": head_macs(module),
                           "agreement": (pm == pr).float().mean().item(), "seconds": module.info.get("seconds")}
    for name, pred, score, thr in (("module", pm, z, module.threshold), ("original", pr, zr, ref_threshold)):
        rec.update({f"{name}_{k}": v for k, v in binary_metrics(pred, truth).items()})
        rec[f"{name}_auc"] = auc(score, truth)
        if module.threshold is not None and ref_threshold is not None:
            rec[f"{name}_calibrated_balanced_accuracy"] = binary_metrics(score > thr, truth)["balanced_accuracy"]
    if not isinstance(reference, torch.Tensor):
        rec.update({"original_params": param_count(reference), "original_macs": head_macs(reference)})
    return rec


class _Synced(nn.Module):
    """A model whose forward returns only once its device has finished (CUDA kernels run asynchronously)."""

    def __init__(self, net: nn.Module, amp: Amp):
        super().__init__()
        self.net, self.amp = net, amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            out = self.net(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return out


def latency(module: ClassModule | nn.Module, reference: nn.Module, batch_size: int = 256, runs: int = 5,
            warmup: int = 1, device: torch.device | str | None = None, amp: Amp = None) -> dict[str, float]:
    """Median seconds per batch of the module's backbone and of the reference, timed alternately on one random batch
    on device (default: the module's; CUDA-synchronized), forwards autocast by amp."""
    dev = torch.device(device) if device is not None else device_of(module)
    nets = {"module": _Synced(moved(_backbone(module), dev).eval(), amp),
            "original": _Synced(moved(reference, dev).eval(), amp)}
    pe = _backbone(reference).patch_embed
    x = torch.randn(batch_size, pe.proj.in_channels, *pe.img_size, device=dev)
    med = round_robin(nets, x, runs, warmup)
    return {"module_latency_s": med["module"], "original_latency_s": med["original"],
            "latency_speedup": med["original"] / med["module"], "latency_batch_size": batch_size,
            "latency_threads": torch.get_num_threads(), "latency_device": str(dev), "latency_amp": amp or "off"}


def jaccard(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard overlap [k, k] of k head sets given as bool [k, blocks, heads] masks."""
    m = masks.flatten(1).float()
    inter = m @ m.T
    union = m.sum(1, keepdim=True) + m.sum(1) - inter
    return inter / union.clamp_min(1)


def search_keep(model: VisionTransformer, data: Data, target: Target, keeps: Sequence[int], method: Method = "reset",
                tolerance: float = 0.01, rule: Literal["calibrated", "top1"] = "calibrated", cfg: ResetConfig | None = None,
                progress: bool = True, device: torch.device | str | None = None, amp: Amp = None,
                **kw: Any) -> tuple[ClassModule | None, list[dict[str, Any]]]:
    """Smallest keep in `keeps` whose module's balanced accuracy on data (the held-out split; calibrated thresholds or
    the top-1 rule) is within tolerance of the original's there, by bisection (assumes more heads never hurt).
    Returns (that module or None, one module_report record per keep tried, with 'ok')."""
    target = _target(data, target)
    ref = scores(moved(model, device), data, amp=amp)[0]
    thr = reference_threshold(ref, data, target)
    key = "calibrated_balanced_accuracy" if rule == "calibrated" else "balanced_accuracy"
    ks, lo, hi = sorted(set(keeps)), 0, len(set(keeps))
    best, recs = None, []
    while lo < hi:
        mid = (lo + hi) // 2
        mod = decompose_class(model, data, target, ks[mid], method, cfg, progress=progress, device=device, amp=amp, **kw)
        rec = module_report(mod, ref, data, ref_threshold=thr, amp=amp)
        rec["ok"] = rec[f"module_{key}"] >= rec[f"original_{key}"] - tolerance
        recs.append(rec)
        if rec["ok"]:
            best, hi = mod, mid
        else:
            lo = mid + 1
    return best, recs


__all__ = ["PrunedAttention", "prune_heads", "head_counts", "head_macs", "param_count", "ClassModule", "two_logits",
           "top1_in", "best_threshold", "calibrate", "reference_threshold", "extract_module", "random_mask",
           "RecoverConfig", "recover", "decompose_class", "class_importance", "ComposedClassifier", "scores", "compose", "RestrictedClassifier",
           "union_classifier", "restricted", "subset_accuracy", "binary_metrics", "auc", "module_report",
           "latency", "jaccard", "search_keep"]
