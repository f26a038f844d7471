"""timm ViTs by name with weights from a local file (or registered named models, e.g. tcl.reference), and weight files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from .utils import atomic_path
from .vit import require_vit

Loader = Callable[["str | os.PathLike | None"], VisionTransformer]
NAMED: dict[str, Loader] = {}  # models built by name with their weights file; tcl.reference adds "reference"


class CheckpointError(RuntimeError):
    """Raised for a missing, corrupt or mismatched checkpoint."""


def register(names: Sequence[str], load: Loader) -> None:
    """Make create(name) / create(name, checkpoint=W) return load(W) for each of names."""
    for name in names:
        NAMED[name] = load


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write model weights (+ JSON metadata) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


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
    """The shipped trained reference ViT (tcl.reference) in eval mode; weights= overrides its file."""
    return create("reference", checkpoint=weights)


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _load_timm_file(model: VisionTransformer, path: Path) -> None:
    """Load a local weights file with timm's own pretrained-loading path (checkpoint filter, .npz loader), strictly."""
    from timm.models import load_pretrained
    from timm.models.vision_transformer import checkpoint_filter_fn

    in_chans = model.patch_embed.proj.in_channels
    cfg = {**model.pretrained_cfg, "file": str(path), "source": "", "num_classes": model.num_classes,
           "input_size": (in_chans, *model.patch_embed.img_size), "custom_load": path.suffix == ".npz"}
    try:
        load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=in_chans, filter_fn=checkpoint_filter_fn,
                        strict=True)
    except RuntimeError as e:
        if "state_dict" in str(e) or "size mismatch" in str(e) or "Missing key" in str(e):
            raise CheckpointError(f"checkpoint {path} does not match the model {model.pretrained_cfg.get('architecture')}"
                                  f" ({' '.join(str(e).split()[6:])[:300]}); pass the model name and kwargs (num_classes, "
                                  "img_size, ...) the weights were trained with") from e
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights file ({str(e)[:300]}); "
                              "re-create or re-download it") from e
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights file ({type(e).__name__}: "
                              f"{str(e)[:300]}); re-create or re-download it") from e


def create(name: str, checkpoint: str | os.PathLike | None = None, pretrained: bool | None = None,
           **kwargs: Any) -> VisionTransformer:
    """A timm ViT by name in eval mode: weights from a local file (checkpoint=), timm's download (pretrained=True) or
    random (pretrained=False, explicitly); kwargs (num_classes, img_size, ...) go to timm.create_model."""
    import timm

    if name in NAMED:
        if kwargs or pretrained is not None:
            raise CheckpointError(f"{name!r} is a named model with its own architecture and weights; timm kwargs / "
                                  "pretrained= apply to timm models (pass checkpoint= for other weights)")
        return NAMED[name](checkpoint)
    if checkpoint is not None and pretrained is not None:
        raise CheckpointError("pass either checkpoint= (a local weights file) or pretrained=, not both")
    path = Path(checkpoint).expanduser() if checkpoint is not None else None
    if path is not None and not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a local weights file "
                              f"({', '.join(WEIGHT_SUFFIXES)})")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('*vit*') / '*deit*'") from e
    require_vit(model, f"tcl.models.create({name!r})")
    if path is None and pretrained is None:
        raise CheckpointError(f"no weights given for {name!r}: pass checkpoint= a local weights file ("
                              f"{', '.join(WEIGHT_SUFFIXES)}; CLI --checkpoint W), pretrained=True to download timm's "
                              "weights (needs internet; CLI --pretrained), or pretrained=False for random weights "
                              "(CLI --random-init)")
    if path is not None:
        _load_timm_file(model, path)
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline, unknown tag, hub errors: all mean "no weights"
            raise CheckpointError(f"could not download timm's weights for {name!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); on an offline machine pass "
                                  "checkpoint= a local weights file") from e
    in_chans = model.patch_embed.proj.in_channels
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (in_chans, *model.patch_embed.img_size)}
    return model.eval()
