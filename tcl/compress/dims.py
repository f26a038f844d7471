"""What schedules and the MACs formula read off a timm VisionTransformer."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..vit import require_vit

__all__ = ["ViTDims", "same_dims", "vit_dims"]


@dataclass(frozen=True)
class ViTDims:
    """What the MACs formula and schedules need to know about a timm VisionTransformer."""

    tokens: int  # incoming tokens at block 0 (patches + prefix tokens)
    prefix: int  # protected tokens (CLS, distillation, registers); never removed
    dim: int
    hidden: int  # MLP hidden width of each block
    depth: int
    classes: int
    patch_macs: int
    heads: int = 1  # classifier heads (2 for DeiT's distilled models)
    head_dim: int = 0  # width of one attention head (0: unknown; per-block head counts then cannot be costed)
    gate: bool = False  # attention has timm's sigmoid output gate

    @property
    def min_tokens(self) -> int:
        """The fewest tokens a block may keep: the protected ones, and at least one."""
        return max(self.prefix, 1)

    @property
    def attn_heads(self) -> int:
        """Attention heads per block of the unpruned model (0: head width unknown)."""
        return self.dim // self.head_dim if self.head_dim else 0


def same_dims(recorded: dict[str, Any], dims: ViTDims) -> bool:
    """Whether dims recorded by a table or search (as a dict) describe this architecture; fields added to ViTDims
    after the record was written are not compared (the record predates them)."""
    current = dataclasses.asdict(dims)
    return isinstance(recorded, dict) and bool(recorded) and all(current.get(k) == v for k, v in recorded.items())


def vit_dims(model: "torch.nn.Module | ViTDims") -> ViTDims:
    """Read token count, width, depth, etc. off a timm VisionTransformer (raises TypeError otherwise)."""
    if isinstance(model, ViTDims):
        return model
    pe = require_vit(model).patch_embed
    n = pe.num_patches
    k = math.prod(pe.proj.weight.shape[1:])
    return ViTDims(tokens=n + model.num_prefix_tokens, prefix=model.num_prefix_tokens, dim=model.embed_dim,
                   hidden=model.blocks[0].mlp.fc1.out_features, depth=len(model.blocks),
                   classes=model.num_classes, patch_macs=n * model.embed_dim * k,
                   heads=1 + isinstance(getattr(model, "head_dist", None), torch.nn.Linear),
                   head_dim=int(model.blocks[0].attn.head_dim), gate=getattr(model.blocks[0].attn, "gate", None) is not None)
