"""What tcl needs of a timm VisionTransformer: the one type check and the one attention core."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def require_vit(model: object, what: str = "tcl") -> VisionTransformer:
    """model itself when it is a timm VisionTransformer; TypeError naming the fix otherwise."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{what}: {type(model).__name__} is not a timm VisionTransformer; build it with "
                        "tcl.models.create(name) / tcl.models.reference() or timm.models.vision_transformer")
    return model


def attend(q: Tensor, k: Tensor, v: Tensor, attn: nn.Module, attn_mask: Tensor | None = None,
           is_causal: bool = False) -> Tensor:
    """timm Attention's core on [B, heads, N, d] q/k/v: fused SDPA when attn.fused_attn, else its explicit softmax."""
    drop = attn.attn_drop.p if attn.training else 0.0
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)  # a float mask is added to the logits in their dtype
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    if is_causal:
        n, m = a.shape[-2:]
        a = a.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=a.device).tril(), float("-inf"))
    if attn_mask is not None:  # SDPA's convention: bool = True where attention is allowed, float = added to logits
        a = a.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else a + attn_mask
    return attn.attn_drop(a.softmax(dim=-1)) @ v


def attention(attn: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
              head_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """timm Attention's forward on x [B, N, C] with its own num_heads (each head's output times head_scale
    [heads] or [B, heads] when given); returns (output, q, k), q and k as [B, heads, N, head_dim]."""
    b, n, _ = x.shape
    gate = getattr(attn, "gate", None)  # timm's sigmoid output gate: newer timm only
    sig = gate(x).sigmoid() if gate is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = attend(q, k, v, attn, attn_mask, is_causal)
    if head_scale is not None:
        o = o * head_scale.view(-1, attn.num_heads, 1, 1)
    o = o.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    o = attn.norm(o) if hasattr(attn, "norm") else o  # older timm (1.0.9-1.0.15) has no Attention.norm
    if sig is not None:
        o = o * sig
    return attn.proj_drop(attn.proj(o)), q, k
