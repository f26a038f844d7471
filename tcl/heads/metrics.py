"""Metrics of class modules: heads, parameters, MACs, c-vs-rest quality, latency, overlap, smallest keep."""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..compress.schedule import macs
from ..evaluate import round_robin
from ..stream import Amp, Data, moved
from ..utils import autocast, device_of
from .compose import ComposedClassifier, RestrictedClassifier
from .gates import Target
from .module import ClassModule, Method, _target, decompose_class, reference_threshold, scores
from .objective import log_odds, top1_in
from .reset import ResetConfig

__all__ = ['head_counts', 'head_macs', 'param_count', 'binary_metrics', 'auc', 'module_report', 'latency', 'jaccard', 'search_keep']


def _backbone(model: nn.Module) -> VisionTransformer:
    """The ViT a class module or restricted classifier wraps (the model itself otherwise)."""
    return model.backbone if isinstance(model, (ClassModule, RestrictedClassifier)) else model  # type: ignore[return-value]


def head_counts(model: nn.Module) -> list[int]:
    """Heads per block of a plain, gated or pruned ViT (or a class module's backbone)."""
    return [int(blk.attn.num_heads) for blk in _backbone(model).blocks]


def head_macs(model: nn.Module) -> int:
    """Analytic MACs per image (tcl.macs) with the model's per-block head counts; a composed classifier's add up."""
    if isinstance(model, ComposedClassifier):
        return sum(head_macs(m) for m in model.parts)
    return macs(_backbone(model), heads=head_counts(model))


def param_count(model: nn.Module) -> int:
    """Number of parameters (head gates excluded, they fold away)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("head_gate"))


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
