"""Test-local restatements of the official baselines, written from their papers and code (not tcl's ops):
ToMe (facebookresearch/ToMe: tome/merge.py, tome/patch/timm.py), EViT (youweiliang/evit: evit.py Attention/Block,
inference) and DiffRate (OpenGVLab/DiffRate: DiffRate/patch/deit.py inference branch, DiffRate/merge.py).

Each runs a timm VisionTransformer block by block with plain (non-fused) softmax attention and reduces tokens
one batch row at a time with index lists, so it shares no code path with tcl.tokens / tcl.patch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from timm.models.vision_transformer import VisionTransformer


def attention(blk: torch.nn.Module, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """timm Attention with log(size) added to the logits: (output, attention map [B, H, N, N], keys [B, H, N, d])."""
    a = blk.attn
    b, n, c = x.shape
    q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * a.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    attn = logits.softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(b, n, c)
    out = a.proj(a.norm(h) if hasattr(a, "norm") else h)  # timm < 1.0.25 has no Attention.norm
    return out, attn, k


def run(model: VisionTransformer, images: Tensor, step: Callable[[int, torch.nn.Module, Tensor, dict], Tensor],
        state: dict) -> Tensor:
    """The model's forward with `step(i, block, x, state)` in place of every block; timm's own head and pooling."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        x = step(i, blk, x, state)
    return model.forward_head(model.norm(x))


def mlp(blk: torch.nn.Module, x: Tensor) -> Tensor:
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


# ---- ToMe --------------------------------------------------------------------------------------------------------
def tome_merge(x: Tensor, size: Tensor, metric: Tensor, r: int, cls: bool, dist: bool) -> tuple[Tensor, Tensor]:
    """Bipartite soft matching by the paper: A = even, B = odd positions of all tokens; the r best-matched A tokens
    join their B match as size-weighted averages; the class token (A[0]) never merges, B[0] (distillation) never
    receives; output [unmerged A (sorted by position only with a class token), B], distillation token second."""
    t = x.shape[1]
    r = min(r, (t - cls - dist) // 2)
    if r <= 0:
        return x, size
    xs, ss = [], []
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    for row in range(x.shape[0]):
        unit = metric[row] / metric[row].norm(dim=-1, keepdim=True)
        scores = unit[a_pos] @ unit[b_pos].T
        if cls:
            scores[0, :] = -math.inf
        if dist:
            scores[:, 0] = -math.inf
        best, match = scores.max(dim=-1)
        ranked = best.argsort(descending=True).tolist()
        merged, unmerged = ranked[:r], ranked[r:]
        if cls:
            unmerged.sort()
        weighted, s = x[row] * size[row], size[row]
        dst_x, dst_s = weighted[b_pos].clone(), s[b_pos].clone()
        for i in merged:
            dst_x[match[i]] += weighted[a_pos[i]]
            dst_s[match[i]] += s[a_pos[i]]
        un_x, un_s = weighted[[a_pos[i] for i in unmerged]], s[[a_pos[i] for i in unmerged]]
        if dist:
            cat_x = torch.cat([un_x[:1], dst_x[:1], un_x[1:], dst_x[1:]])
            cat_s = torch.cat([un_s[:1], dst_s[:1], un_s[1:], dst_s[1:]])
        else:
            cat_x, cat_s = torch.cat([un_x, dst_x]), torch.cat([un_s, dst_s])
        xs.append(cat_x / cat_s)
        ss.append(cat_s)
    return torch.stack(xs), torch.stack(ss)


def tome_forward(model: VisionTransformer, images: Tensor, r: list[int], prop_attn: bool = True) -> Tensor:
    """Logits of ToMe applied with a per-block r (ToMe's metric: keys averaged over heads)."""
    cls, dist = model.cls_token is not None, getattr(model, "dist_token", None) is not None

    def step(i: int, blk: torch.nn.Module, x: Tensor, st: dict) -> Tensor:
        y, _, k = attention(blk, blk.norm1(x), st["size"] if prop_attn else None)
        x = x + blk.ls1(y)
        if r[i] > 0:
            size = torch.ones_like(x[..., :1]) if st["size"] is None else st["size"]
            x, st["size"] = tome_merge(x, size, k.mean(1), r[i], cls, dist)
        return mlp(blk, x)

    return run(model, images, step, {"size": None})


# ---- EViT --------------------------------------------------------------------------------------------------------
def evit_forward(model: VisionTransformer, images: Tensor, keep_rate: list[float], fuse: bool) -> Tensor:
    """Logits of EViT's inference: at a block with keep rate < 1 keep ceil(rate * (N - 1)) non-class tokens by the
    head-mean class attention; with fuse the rest become one token, their class-attention-weighted sum."""

    def step(i: int, blk: torch.nn.Module, x: Tensor, st: dict) -> Tensor:
        y, attn, _ = attention(blk, blk.norm1(x), None)
        x = x + blk.ls1(y)
        n = x.shape[1]
        left = math.ceil(keep_rate[i] * (n - 1))
        if keep_rate[i] < 1 and left < n - 1:
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            rows = []
            for row in range(x.shape[0]):
                top = cls_attn[row].topk(left).indices
                kept = [x[row, :1], x[row, 1:][top]]
                if fuse:
                    rest = [j for j in range(n - 1) if j not in set(top.tolist())]
                    kept.append((x[row, 1:][rest] * cls_attn[row, rest, None]).sum(0, keepdim=True))
                rows.append(torch.cat(kept))
            x = torch.stack(rows)
        return mlp(blk, x)

    return run(model, images, step, {})


# ---- DiffRate ----------------------------------------------------------------------------------------------------
def diffrate_forward(model: VisionTransformer, images: Tensor, prune: list[int], merge: list[int]) -> Tensor:
    """Logits of DiffRate's inference: sizes start at 1 with proportional attention; each block sorts the non-class
    tokens by head-mean class attention, keeps the first prune[i], then (if merge[i] < prune[i]) averages every token
    past merge[i] into its most cosine-similar earlier non-class token (features after the attention residual),
    unweighted and including the destination, adding its size times that similarity to the destination's size."""

    def step(i: int, blk: torch.nn.Module, x: Tensor, st: dict) -> Tensor:
        y, attn, _ = attention(blk, blk.norm1(x), st["size"])
        x = x + blk.ls1(y)
        order = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.long),
                           attn[:, :, 0, 1:].mean(1).argsort(dim=1, descending=True) + 1], 1)
        x = torch.stack([x[row, order[row]] for row in range(x.shape[0])])[:, :prune[i]]
        size = torch.stack([st["size"][row, order[row]] for row in range(x.shape[0])])[:, :prune[i]]
        m = merge[i]
        if m < prune[i] and m < x.shape[1]:
            xs, ss = [], []
            for row in range(x.shape[0]):
                unit = x[row] / x[row].norm(dim=-1, keepdim=True)
                sim = unit[m:] @ unit[1:m].T
                best, dst = sim.max(dim=-1)
                out_x, out_s, count = x[row, :m].clone(), size[row, :m].clone(), torch.ones(m, 1)
                for s, d in enumerate((dst + 1).tolist()):
                    out_x[d] += x[row, m + s]
                    out_s[d] += size[row, m + s] * best[s]
                    count[d] += 1
                xs.append(out_x / count)
                ss.append(out_s)
            x, size = torch.stack(xs), torch.stack(ss)
        st["size"] = size
        return mlp(blk, x)

    b, n = images.shape[0], model.patch_embed.num_patches + model.num_prefix_tokens
    return run(model, images, step, {"size": torch.ones(b, n, 1)})
