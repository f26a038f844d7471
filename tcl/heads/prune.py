"""Step 4: physical head pruning, the gates folded into proj."""
from __future__ import annotations

import copy

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..vit import attention
from .gates import GatedAttention, HeadsError, attentions, gates, proj_scale

__all__ = ['PrunedAttention', 'prune_heads']


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
        g = proj_scale(head_gates.cpu()[kept], d) if head_gates is not None else None
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
        """timm's forward over the kept heads (proj's bias alone with none)."""
        if self.num_heads == 0:
            return self.proj_drop(self.proj(x.new_zeros(*x.shape[:2], 0)))
        return attention(self, x, attn_mask, is_causal)[0]


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
