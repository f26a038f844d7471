"""Step 1 of head modularization: one gate per attention head (an equivalent transformation), read, set and folded."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from ..vit import attention, require_vit

__all__ = ['proj_scale', 'HeadsError', 'GatedAttention', 'attentions', 'insert_gates', 'gate_params', 'gates', 'set_gates', 'fold_gates', 'remove_gates', 'num_heads']


Target = int | Sequence[int]


class HeadsError(ValueError):
    """Raised for bad input to the head-modularization steps (unknown class, infeasible keep count, bad mask)."""


class GatedAttention(Attention):
    """timm Attention + `head_gate` [heads] (init 1) multiplying each head's output before `proj`.

    Changes vs timm: only that multiplication; `sample_gate` ([B, heads], None by default) replaces the gate
    per example so one backward yields per-example gate gradients. Everything else (SDPA, qk_norm, timm's
    sigmoid `gate`, dropouts) is timm's. Gates at 1 reproduce the original output exactly.
    """

    head_gate: nn.Parameter
    sample_gate: torch.Tensor | None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """timm's forward with each head's output times its gate."""
        g = self.sample_gate if self.sample_gate is not None else self.head_gate
        return attention(self, x, attn_mask, is_causal, head_scale=g)[0]


def attentions(model: nn.Module) -> list[Attention]:
    """The attention module of every block of a timm VisionTransformer (TypeError for anything else)."""
    out = []
    for i, blk in enumerate(require_vit(model, "head gates").blocks):
        attn = getattr(blk, "attn", None)
        if type(attn) not in (Attention, GatedAttention):
            raise TypeError(f"block {i} attention is {type(attn).__name__}; head gates need timm's plain "
                            "Attention (models built with attn_layer=Attention, the VisionTransformer default)")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise HeadsError(f"block {i} normalises the concatenated heads (scale_attn_norm=True), so heads are "
                             "not separable; use a model built with scale_attn_norm=False")
        out.append(attn)
    return out


def insert_gates(model: VisionTransformer) -> VisionTransformer:
    """In place: give every block's attention one gate per head, initialised to 1 (output unchanged); returns model."""
    for attn in attentions(model):
        if not isinstance(attn, GatedAttention):
            w = attn.qkv.weight
            attn.__class__ = GatedAttention
            attn.head_gate = nn.Parameter(torch.ones(attn.num_heads, device=w.device, dtype=w.dtype))
            attn.sample_gate = None
    return model


def _gated(model: nn.Module) -> list[GatedAttention]:
    out = attentions(model)
    if not all(isinstance(a, GatedAttention) for a in out):
        raise HeadsError("model has no head gates; call tcl.heads.insert_gates(model) first")
    return out  # type: ignore[return-value]


def gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The gate parameters, one [heads] vector per block."""
    return [a.head_gate for a in _gated(model)]


def gates(model: nn.Module) -> torch.Tensor:
    """Current gate values as a [blocks, heads] tensor (a detached CPU copy)."""
    return torch.stack([g.detach().cpu().clone() for g in gate_params(model)])


def set_gates(model: nn.Module, values: torch.Tensor) -> None:
    """Overwrite the gates with a [blocks, heads] tensor (e.g. gates * mask)."""
    params = gate_params(model)
    if tuple(values.shape) != (len(params), params[0].numel()):
        raise HeadsError(f"gate values have shape {tuple(values.shape)}, expected {(len(params), params[0].numel())}")
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.device))


def proj_scale(head_gates: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The scale of each proj input column that folds per-head gates [heads] into proj (the one gate fold)."""
    return head_gates.detach().repeat_interleave(head_dim)


def fold_gates(model: nn.Module) -> nn.Module:
    """In place: scale each head's proj input columns by its gate and reset gates to 1 (equivalent); returns model."""
    with torch.no_grad():
        for a in _gated(model):
            a.proj.weight.mul_(proj_scale(a.head_gate, a.head_dim).to(a.proj.weight.dtype))
            a.head_gate.fill_(1.0)
    return model


def remove_gates(model: nn.Module, fold: bool = True) -> nn.Module:
    """In place: fold the gates into proj (fold=True) or drop them, restoring timm's Attention; returns model."""
    if fold:
        fold_gates(model)
    for a in _gated(model):
        del a.head_gate, a.sample_gate
        a.__class__ = Attention
    return model


def num_heads(model: nn.Module) -> tuple[int, int]:
    """(blocks, heads per block) of a timm VisionTransformer."""
    attns = attentions(model)
    return len(attns), attns[0].num_heads
