"""The patched attention classes: timm Attention (and tcl.heads' PrunedAttention) with a forward that also returns
what the token reduction reads (class attention, keys), and in-place head removal by a schedule's kept heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from ..heads.prune import PrunedAttention
from ..vit import attention
from . import tokens
from .schedule import Schedule, ScheduleError
from .settings import Similarity

__all__ = ["TclAttention", "TclPrunedAttention", "prune_heads_in_place"]


class TclAttention(Attention):
    """timm Attention plus `forward_tcl`, which is timm's forward with log(size) added to the logits as a float
    mask of the same fused attention (proportional attention), also returning the class-token attention row and
    the keys as a matching metric when asked; `forward` itself is timm's, unchanged."""

    def forward_tcl(self, x: Tensor, size: Tensor | None, readers: int, want_cls: bool,
                    keys_as: Similarity | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(output, class attention [B, H, N] or None, matching metric or None: head-summed keys [B, N, head_dim]
        for keys_as='keys', per-head unit keys concatenated [B, N, H * head_dim] for 'head_keys')."""
        bias = None if size is None else tokens.size_bias(size)
        out, q, k = attention(self, x, bias)
        cls = tokens.cls_attention(q, k, self.scale, readers, size) if want_cls else None
        keys = None
        if keys_as == "keys":
            keys = tokens.head_sum(k.transpose(1, 2))
        elif keys_as == "head_keys":
            keys = F.normalize(k, dim=-1).transpose(1, 2).flatten(2)
        return out, cls, keys


class TclPrunedAttention(PrunedAttention):
    """tcl.heads' PrunedAttention (kept heads only) plus TclAttention's `forward_tcl`; a block without heads returns
    proj's bias and no class attention or keys (its schedule step then keeps every token)."""

    def forward_tcl(self, x: Tensor, size: Tensor | None, readers: int, want_cls: bool,
                    keys_as: Similarity | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """TclAttention.forward_tcl over the kept heads."""
        if self.num_heads == 0:
            return self.proj_drop(self.proj(x.new_zeros(*x.shape[:2], 0))), None, None
        return TclAttention.forward_tcl(self, x, size, readers, want_cls, keys_as)  # type: ignore[arg-type]


_TCL_ATTENTION: dict[type, type] = {Attention: TclAttention, PrunedAttention: TclPrunedAttention}  # plain -> patched
_PLAIN_ATTENTION = {v: k for k, v in _TCL_ATTENTION.items()}


def prune_heads_in_place(model: VisionTransformer, schedule: Schedule, heads: int) -> dict[int, nn.Module]:
    """Swap in each block's kept heads (schedule.heads, picked by its head_order) where its attention has another
    count; returns the replaced attention modules by block (tcl.unpatch puts them back)."""
    want, own = schedule.kept_heads(heads), {}
    if all(blk.attn.num_heads == h for blk, h in zip(model.blocks, want)):
        return own
    keep = schedule.kept_head_indices(heads)
    for i, (blk, h) in enumerate(zip(model.blocks, want)):
        if blk.attn.num_heads == h:
            continue
        if type(blk.attn) is not Attention:
            raise ScheduleError(f"block {i} already has {blk.attn.num_heads} of {heads} heads, the schedule keeps {h}; "
                                "patch the unpruned model (heads are removed from all of them)")
        mask = torch.zeros(heads, dtype=torch.bool)
        mask[keep[i]] = True
        own[i], blk.attn = blk.attn, PrunedAttention(blk.attn, mask)
    return own
