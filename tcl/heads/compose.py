"""Step 5: composing single-class modules into a classifier over their classes, and its references."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..stream import Amp, Data, labels, subset
from ..utils import device_of
from .gates import HeadsError
from .module import ClassModule, scores
from .objective import check_target
from .prune import prune_heads

__all__ = ['ComposedClassifier', 'compose', 'RestrictedClassifier', 'union_classifier', 'restricted', 'subset_accuracy']


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
