"""The shipped Fashion-MNIST reference ViT, and timm ViTs by name with weights from a local file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from .data import FMNIST_MEAN, FMNIST_STD

WEIGHTS = Path(__file__).parent / "weights" / "reference_fmnist.safetensors"
REFERENCE_CONFIG: dict[str, Any] = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=8, num_heads=4,
    mlp_ratio=2.0, qkv_bias=True, class_token=True, global_pool="token",
)


class CheckpointError(RuntimeError):
    """Raised for a missing, corrupt or mismatched checkpoint."""


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


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write model weights (+ JSON metadata) as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a safetensors/.pth checkpoint into model strictly; return its metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a local weights file "
                              "(this machine is offline, nothing is downloaded)")
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights file ({e}); re-create or re-download it") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match the model architecture: {str(e)[:400]}; "
                              "build the model with the config the weights were trained with") from e
    return meta


def reference(weights: str | os.PathLike | None = None) -> VisionTransformer:
    """The shipped trained Fashion-MNIST ViT in eval mode ($TCL_REFERENCE_WEIGHTS or weights= override the file)."""
    path = Path(weights or os.environ.get("TCL_REFERENCE_WEIGHTS") or WEIGHTS)
    model = build_reference()
    meta = load_weights(model, path)
    model.pretrained_cfg = {**model.pretrained_cfg, "tcl_metadata": meta}
    return model.eval()


def create(name: str, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> VisionTransformer:
    """A timm ViT by name, weights from a local checkpoint (random init when checkpoint is None), eval mode."""
    import timm

    if name in ("reference", "tcl_reference"):
        return reference(checkpoint)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('*vit*') / '*deit*'") from e
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer; tcl supports "
                        "ViT/DeiT/EVA-style models built on timm.models.vision_transformer.VisionTransformer")
    if checkpoint is not None:
        load_weights(model, checkpoint)
    in_chans = model.patch_embed.proj.in_channels
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (in_chans, *model.patch_embed.img_size)}
    return model.eval()
