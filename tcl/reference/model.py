"""The shipped Fashion-MNIST reference ViT: its architecture, its Fashion-MNIST pretrained_cfg and its weights file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from ..models import load_weights
from .data import FMNIST_MEAN, FMNIST_STD

WEIGHTS = Path(__file__).parent.parent / "weights" / "reference_fmnist.safetensors"
REFERENCE_CONFIG: dict[str, Any] = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=8, num_heads=4,
    mlp_ratio=2.0, qkv_bias=True, class_token=True, global_pool="token",
)


def reference_config(**overrides: Any) -> dict[str, Any]:
    """The reference model's VisionTransformer kwargs (overrides applied)."""
    return {**REFERENCE_CONFIG, **overrides}


def build_reference(**overrides: Any) -> VisionTransformer:
    """A randomly initialised reference-architecture ViT carrying Fashion-MNIST mean/std in pretrained_cfg."""
    cfg = reference_config(**overrides)
    model = VisionTransformer(**cfg)
    model.pretrained_cfg = dict(
        input_size=(cfg["in_chans"], cfg["img_size"], cfg["img_size"]), mean=FMNIST_MEAN, std=FMNIST_STD,
        num_classes=cfg["num_classes"], interpolation="bilinear", crop_pct=1.0, architecture="tcl_reference",
    )
    return model


def load(weights: str | os.PathLike | None = None) -> VisionTransformer:
    """The shipped trained Fashion-MNIST ViT in eval mode ($TCL_REFERENCE_WEIGHTS or weights= override the file)."""
    path = Path(weights or os.environ.get("TCL_REFERENCE_WEIGHTS") or WEIGHTS)
    model = build_reference()
    meta = load_weights(model, path)
    model.pretrained_cfg = {**model.pretrained_cfg, "tcl_metadata": meta}
    return model.eval()
