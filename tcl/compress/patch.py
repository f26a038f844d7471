"""timm surgery: swap the classes of a live timm VisionTransformer (ToMe style) so that every block prunes and
merges tokens between its attention and its MLP following a Schedule; fused attention is kept.

Token importance is the attention row of the class token(s) (CLS, and DeiT's distillation token averaged in),
softmax(q_cls K^T scale + log size), averaged over heads; it is computed on its own ([B, H, N], never the N x N
map) and only in blocks that remove tokens. Models without a class token (global average pooling, registers
only) use a cheap proxy instead: the attention row of the size-weighted mean query. With prop_attn=False the
log size term is left out of both the attention and the importance.

The op is given by tcl.settings.PatchSettings: carried by the schedule (Schedule.tome / Schedule.evit, a
LookupTable's selection) or passed as keywords (see tcl.settings for what each option means). The baselines equal
their official code: merge='tome' is ToMe (timm's own pooling is kept, as ToMe keeps it), fuse='evit' with
prop_attn=False is EViT's inference (sizes are tracked but EViT uses none; a block whose count does not fall is
left alone, where EViT would still scale a lone inattentive token by its attention), merge='diffrate' is
DiffRate's inference op; ToMe is defined for class / distillation tokens or none, EViT and DiffRate for exactly one
class token, and other models raise. order='merge_prune' merges away prune[i] - merge[i] tokens first, then prunes
to merge[i]; trace_source=True keeps the [B, N, N_input] 0/1 source matrix.
The last forward's state is read with `patch_state(model)` (sizes, sources, schedule, settings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..vit import require_vit
from . import tokens
from .attention import _PLAIN_ATTENTION, _TCL_ATTENTION, prune_heads_in_place
from .schedule import Schedule, ScheduleError, vit_dims
from .settings import Fuse, MergeKind, Order, PatchSettings, SettingsError, Similarity

__all__ = ["patch", "unpatch", "patch_state", "PatchState", "is_patched", "forward_from", "extra_macs", "PatchConfig", "PatchSettings", "SettingsError", "MergeKind", "Fuse",
           "Similarity", "Order"]


@dataclass(frozen=True)
class PatchConfig:
    """How a patched model reduces tokens (see `patch`), plus what it read off the model."""

    merge: MergeKind
    fuse: Fuse
    prop_attn: bool
    similarity: Similarity  # resolved: PatchSettings.metric
    order: Order
    trace_source: bool
    prefix: int  # protected tokens: class, distillation, registers
    readers: int  # class tokens whose attention row ranks the others (0: mean-query proxy)
    class_token: bool
    distill_token: bool


def _steps(cfg: PatchConfig, n_in: int, p: int, m: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """The block's two steps with the token count each keeps, in the configured order."""
    if cfg.order == "prune_merge":
        return ("prune", p), ("merge", m)
    return ("merge", n_in - (p - m)), ("prune", m)


class TclBlock(Block):
    """timm Block that reduces tokens between attention and MLP: x = x + attn(x); prune to schedule.prune[i];
    merge to schedule.merge[i] (or merge first with order='merge_prune'); x = x + mlp(x). Sizes and sources live
    in the model's shared `_tcl_info` (block 0 resets them); attention is proportional once tokens were merged."""

    _tcl_info: dict[str, Any]
    _tcl_step: tuple[int, int, int, int]  # block index, incoming, after prune, after merge

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The block's forward with its schedule step between attention and MLP."""
        if attn_mask is not None or is_causal:
            raise ValueError("a tcl-patched ViT reduces tokens, so attention masks do not apply; "
                             "call tcl.unpatch first")
        info, (i, n_in, p, m) = self._tcl_info, self._tcl_step
        cfg: PatchConfig = info["config"]
        if x.shape[1] != n_in:
            raise ScheduleError(f"block {i} expects {n_in} tokens from its schedule but got {x.shape[1]}; patch with a "
                                "schedule built for this input size (e.g. tcl.Schedule.full(model))")
        if i == 0:  # a new forward: every token is one patch again
            info["size"] = info["source"] = None
        if cfg.trace_source and info["source"] is None:
            info["source"] = tokens.init_source(x.shape[0], n_in, x.device, x.dtype)
        prunes, merges = p < n_in, m < p
        want_cls = prunes or (merges and cfg.merge in ("attention", "diffrate"))
        keys_as = cfg.similarity if merges and cfg.similarity != "features" else None
        y, cls, keys = self.attn.forward_tcl(self.norm1(x), info["size"] if cfg.prop_attn else None, cfg.readers,
                                             want_cls, keys_as)
        x = x + self.drop_path1(self.ls1(y))
        if prunes or merges:
            x = self._reduce(x, None if cls is None else cls.mean(dim=1), keys, cfg, info)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _reduce(self, x: Tensor, imp: Tensor | None, keys: Tensor | None, cfg: PatchConfig,
                info: dict[str, Any]) -> Tensor:
        """Run the block's prune and merge steps on x, sizes and sources; importances and keys follow along."""
        size, source = info["size"], info["source"]
        _, n_in, p, m = self._tcl_step
        steps: tuple[tuple[str, int], ...] = _steps(cfg, n_in, p, m)
        if cfg.merge in ("attention", "diffrate") and cfg.order == "prune_merge" and cfg.fuse == "none":
            steps = (("prune_merge", m),)  # both steps from one ranking: the same result, one gather
        for j, (kind, keep) in enumerate(steps):
            n = x.shape[1]
            if keep >= n:
                continue
            assert imp is not None or kind == "merge"
            f: tokens.Reduce
            metric = x if keys is None else keys
            if kind == "prune_merge" and cfg.merge == "diffrate" and m < p:  # unweighted means, sizes scaled by similarity
                f, w = tokens.diffrate_merge(imp, metric, p, m, cfg.prefix)
                size = f(w if size is None else size * w)
                x = f(x, torch.ones_like(w))
            elif kind == "prune" and cfg.fuse == "evit":  # the class-attention-weighted sum
                f, w = tokens.evit_prune(imp, keep, cfg.prefix)
                size = f(torch.ones_like(x[..., :1]) if size is None else size)  # used only with prop_attn
                x = f(x * w)
            else:
                if kind == "prune_merge":
                    f = tokens.prune_merge(imp, metric, p, m, cfg.prefix)
                elif kind == "prune":
                    f = tokens.prune(imp, keep, cfg.prefix, cfg.fuse == "mean")
                elif cfg.merge == "attention":
                    f = tokens.attention_merge(imp, metric, keep, cfg.prefix)
                elif cfg.merge == "tome":
                    f = tokens.tome_merge(metric, n - keep, cfg.class_token, cfg.distill_token)
                else:
                    f = tokens.bipartite_merge(metric, n - keep, cfg.prefix)
                if kind == "merge" or (kind == "prune_merge" and m < p):
                    x, size = tokens.merge_wavg(f, x, size)
                else:  # a prune; with fuse='mean', the fused token is the attention-weighted mean of the pruned ones
                    fused = cfg.fuse == "mean"
                    if size is not None or fused:
                        size = f(torch.ones_like(x[..., :1]) if size is None else size)
                    x = f(x, imp.unsqueeze(-1).clamp_min(torch.finfo(imp.dtype).tiny) if fused else None)
            if source is not None:
                source = f(source)
            if j + 1 < len(steps) and steps[j + 1][1] < keep:  # the next step ranks / matches the reduced tokens
                imp = None if imp is None else f(imp)
                keys = None if keys is None else f(keys)
        info["size"], info["source"] = size, source
        return x


_VIT_CLASSES: dict[type, type] = {}


def _patched_vit_class(base: type) -> type:
    """The subclass of a VisionTransformer class that pools by token size."""
    if base in _VIT_CLASSES:
        return _VIT_CLASSES[base]

    class TclVisionTransformer(base):  # type: ignore[valid-type, misc]
        """The model's own class, except that pool makes 'avg' / 'avgmax' pooling weighted by the token sizes of the
        last forward ('map' attention pooling ignores sizes; merge='tome' keeps timm's unweighted pooling, as ToMe
        does); block 0 resets sizes / sources at every forward."""

        def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
            """Base pooling, with average pooling weighted by token sizes."""
            size, pool_type = self._tcl_info["size"], self.global_pool if pool_type is None else pool_type
            if (size is None or self.attn_pool is not None or pool_type not in ("avg", "avgmax")
                    or self._tcl_info["config"].merge == "tome"):
                return super().pool(x, pool_type)
            if not getattr(self, "pool_include_prefix", False):  # older timm always leaves the prefix out
                x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
            mean = (x * size).sum(dim=1) / size.sum(dim=1)
            return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)

    TclVisionTransformer.__name__ = TclVisionTransformer.__qualname__ = "Tcl" + base.__name__
    _VIT_CLASSES[base] = TclVisionTransformer
    return TclVisionTransformer


def _check_steps(s: Schedule, cfg: PatchConfig, tokens_in: int) -> None:
    """Raise ScheduleError for a merge step the chosen merge cannot do."""
    n = tokens_in
    for i, (p, m) in enumerate(zip(s.prune, s.merge)):
        for kind, keep in _steps(cfg, n, p, m):
            before = p if (kind, cfg.order) == ("merge", "prune_merge") else n
            if kind != "merge" or keep >= before:
                continue
            if cfg.merge in ("bipartite", "tome") and before - keep > tokens.max_bipartite(before, cfg.prefix):
                raise ScheduleError(f"block {i}: bipartite merging removes at most half of the {before - cfg.prefix} "
                                    f"non-protected tokens, the schedule asks for {before - keep}; use "
                                    "merge='attention' or a schedule with fewer merges (Schedule.tome caps r)")
            if cfg.merge in ("attention", "diffrate") and keep <= cfg.prefix:
                raise ScheduleError(f"block {i}: merging down to the {cfg.prefix} protected tokens leaves no "
                                    f"destination; keep at least {cfg.prefix + 1} tokens after a merge")
        n = m


def _check_defined(model: VisionTransformer, st: PatchSettings, prefix: int) -> None:
    """Raise ValueError where a baseline's official code does not define the model's prefix tokens."""
    cls_only = model.cls_token is not None and prefix == 1
    if st.merge == "tome" and getattr(model, "num_reg_tokens", 0):
        raise ValueError("ToMe is defined for class and distillation tokens, not register tokens; use "
                         "merge='bipartite' (tcl's split, which protects registers)")
    for name, used in (("merge='diffrate' (DiffRate)", st.merge == "diffrate"), ("fuse='evit' (EViT)", st.fuse == "evit")):
        if used and not cls_only:
            raise ValueError(f"{name} ranks tokens by the class token's attention and is defined for one class token "
                             f"and no other prefix tokens; this model has {prefix} prefix token(s) (cls_token "
                             f"{'present' if model.cls_token is not None else 'absent'}): use merge='attention' / "
                             "fuse='mean', tcl's variants")


def patch(model: nn.Module, schedule: Schedule, *, merge: MergeKind | None = None, fuse: Fuse | bool | None = None,
          prop_attn: bool | None = None, similarity: Similarity | None = None, order: Order | None = None,
          trace_source: bool = False, override: bool = False) -> nn.Module:
    """Make a timm VisionTransformer reduce tokens by `schedule` in place (re-patching replaces); returns it. A
    schedule with kept heads also swaps in those heads' attention (picked by its head_order; tcl.unpatch restores).

    The op is the schedule's carried settings, else tcl.settings.PatchSettings' defaults, with the given keywords
    applied; a keyword that contradicts carried settings raises SettingsError unless override=True."""
    given = {k: v for k, v in dict(merge=merge, fuse=fuse, prop_attn=prop_attn, similarity=similarity,
                                   order=order).items() if v is not None}
    require_vit(model, "tcl.patch")
    if not isinstance(schedule, Schedule):
        raise ScheduleError(f"expected a tcl.Schedule, got {type(schedule).__name__}; build one with tcl.Schedule(...)")
    st = PatchSettings(**given) if schedule.settings is None else schedule.settings.resolve(given, override)
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, TclBlock) or type(blk.attn) not in (*_TCL_ATTENTION, *_PLAIN_ATTENTION):
            raise TypeError(f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__}; tcl.patch supports "
                            "timm's standard Block and Attention (pre-norm ViT/DeiT; heads pruned by "
                            "tcl.heads.prune_heads), not parallel/post-norm/RoPE blocks")
    dims = vit_dims(model)
    schedule.check(dims)
    _check_defined(model, st, dims.prefix)
    distill = getattr(model, "dist_token", None) is not None
    cfg = PatchConfig(st.merge, st.fuse, st.prop_attn, st.metric, st.order, trace_source, dims.prefix,
                      dims.prefix - getattr(model, "num_reg_tokens", 0), model.cls_token is not None, distill)
    _check_steps(schedule, cfg, dims.tokens)
    unpatch(model)
    own = prune_heads_in_place(model, schedule, dims.attn_heads) if schedule.heads is not None else {}
    info: dict[str, Any] = {"schedule": schedule, "settings": st, "config": cfg, "size": None, "source": None,
                            "vit_class": type(model), "own_attention": own}
    model.__class__ = _patched_vit_class(type(model))
    model._tcl_info = info
    n = dims.tokens
    for i, (blk, p, m) in enumerate(zip(model.blocks, schedule.prune, schedule.merge)):
        blk.__class__, blk.attn.__class__ = TclBlock, _TCL_ATTENTION.get(type(blk.attn), type(blk.attn))
        blk._tcl_info, blk._tcl_step = info, (i, n, p, m)
        n = m
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo tcl.patch in place (a no-op on an unpatched model); returns the model."""
    info = getattr(model, "_tcl_info", None)
    if info is None:
        return model
    model.__class__ = info["vit_class"]
    del model._tcl_info
    for i, blk in enumerate(model.blocks):
        blk.__class__, blk.attn.__class__ = Block, _PLAIN_ATTENTION.get(type(blk.attn), type(blk.attn))
        if i in info["own_attention"]:  # heads the patch removed come back
            blk.attn = info["own_attention"][i]
        del blk._tcl_info, blk._tcl_step
    return model


@dataclass(frozen=True)
class PatchState:
    """A patched model's op and the token state its last forward left: sizes [B, N, 1] (patches per token, None
    while all are 1) and sources [B, N, N_input] (None unless traced)."""

    schedule: Schedule
    settings: PatchSettings
    size: Tensor | None
    source: Tensor | None


def is_patched(model: nn.Module) -> bool:
    """Whether tcl.patch has been applied to model (and not undone)."""
    return getattr(model, "_tcl_info", None) is not None


def _info(model: nn.Module) -> dict[str, Any]:
    """The patch's shared state of model; ValueError when it is not patched."""
    if not is_patched(model):
        raise ValueError("the model is not patched; call tcl.patch(model, schedule) first")
    return model._tcl_info


def patch_state(model: nn.Module) -> PatchState:
    """The schedule, settings, token sizes and sources of a patched model (after its last forward)."""
    info = _info(model)
    return PatchState(info["schedule"], info["settings"], info["size"], info["source"])


def forward_from(model: nn.Module, h: Tensor, start: int) -> Tensor:
    """The patched model's output from h, the input of block `start` in its forward: blocks start.. and the head."""
    info = _info(model)
    info["size"] = info["source"] = None  # what block 0 resets at a new forward
    for blk in model.blocks[start:]:
        h = blk(h)
    return model.forward_head(model.norm(h))


def extra_macs(model: nn.Module) -> int:
    """Matmul MACs per image a patched model adds to tcl.macs: class-attention rows and merge similarities."""
    info = _info(model)
    cfg: PatchConfig = info["config"]
    total, n = 0, vit_dims(model).tokens
    for blk, p, m in zip(model.blocks, info["schedule"].prune, info["schedule"].merge):
        heads, qk_dim = blk.attn.num_heads, blk.attn.num_heads * blk.attn.head_dim  # heads may be pruned per block
        metric_dim = {"keys": blk.attn.head_dim, "head_keys": qk_dim}.get(cfg.similarity, model.embed_dim)
        if p < n or (m < p and cfg.merge in ("attention", "diffrate")):
            total += max(cfg.readers, 1) * n * qk_dim * heads  # class-attention rows (block-diagonal GEMM, H x)
        if m < p:
            before = p if cfg.order == "prune_merge" else n
            other = before - cfg.prefix
            pairs = ((p - m) * (other - (p - m)) if cfg.merge in ("attention", "diffrate")
                     else math.ceil(before / 2) * (before // 2) if cfg.merge == "tome"
                     else math.ceil(other / 2) * (other // 2))
            total += pairs * metric_dim
        n = m
    return total
