"""Schedules: per-block kept-token counts after prune and after merge, their validation, JSON and analytic MACs."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


class ScheduleError(ValueError):
    """Raised for a schedule that does not fit the model (or is malformed)."""


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

    @property
    def min_tokens(self) -> int:
        """The fewest tokens a block may keep: the protected ones, and at least one."""
        return max(self.prefix, 1)


def vit_dims(model: "torch.nn.Module | ViTDims") -> ViTDims:
    """Read token count, width, depth, etc. off a timm VisionTransformer (raises TypeError otherwise)."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, ViTDims):
        return model
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}; build the model with "
                        "timm.models.vision_transformer (tcl.models.create / tcl.models.reference)")
    pe = model.patch_embed
    n = pe.num_patches
    k = math.prod(pe.proj.weight.shape[1:])
    return ViTDims(tokens=n + model.num_prefix_tokens, prefix=model.num_prefix_tokens, dim=model.embed_dim,
                   hidden=model.blocks[0].mlp.fc1.out_features, depth=len(model.blocks),
                   classes=model.num_classes, patch_macs=n * model.embed_dim * k,
                   heads=1 + isinstance(getattr(model, "head_dist", None), torch.nn.Linear))


@dataclass(frozen=True)
class Schedule:
    """Kept tokens per block after its prune step and after its merge step (prefix tokens included)."""

    prune: tuple[int, ...]
    merge: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __init__(self, prune: Sequence[int], merge: Sequence[int], meta: dict[str, Any] | None = None):
        if len(prune) != len(merge):
            raise ScheduleError(f"prune has {len(prune)} entries but merge has {len(merge)}; give one count per block to each")
        if not all(isinstance(v, (int,)) or (hasattr(v, "__index__")) for v in [*prune, *merge]):
            raise ScheduleError("kept-token counts must be integers")
        object.__setattr__(self, "prune", tuple(int(v) for v in prune))
        object.__setattr__(self, "merge", tuple(int(v) for v in merge))
        object.__setattr__(self, "meta", dict(meta or {}))
        prev = None
        for i, (p, m) in enumerate(zip(self.prune, self.merge)):
            if m > p or (prev is not None and p > prev):
                raise ScheduleError(f"block {i}: kept counts must not increase (incoming {prev}, after prune {p}, "
                                    f"after merge {m}); make each count <= the one before it")
            prev = m

    def __len__(self) -> int:
        return len(self.prune)

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def full(cls, model: torch.nn.Module) -> "Schedule":
        """The schedule that keeps every token (must reproduce the unpatched model)."""
        d = vit_dims(model)
        return cls([d.tokens] * d.depth, [d.tokens] * d.depth, {"kind": "full"})

    @classmethod
    def tome(cls, model: torch.nn.Module, r: float) -> "Schedule":
        """ToMe: merge r tokens in every block (a fractional r spreads floor/ceil evenly; clipped to what fits)."""
        d = vit_dims(model)
        if r < 0:
            raise ScheduleError(f"r must be >= 0, got {r}")
        prune, merge, n = [], [], d.tokens
        for i in range(d.depth):
            prune.append(n)
            r_i = math.floor((i + 1) * r + 1e-9) - math.floor(i * r + 1e-9)
            # bipartite matching can merge at most half the non-protected tokens
            n = max(n - min(r_i, (n - d.prefix) // 2), d.min_tokens)
            merge.append(n)
        return cls(prune, merge, {"kind": "tome", "r": r})

    @classmethod
    def evit(cls, model: torch.nn.Module, keep: float, layers: Sequence[int] | None = None,
             fuse: bool = False) -> "Schedule":
        """EViT: at `layers` (default 3/6/9 of 12, scaled to depth) keep ceil(keep·non-protected), +1 fused token if fuse."""
        d = vit_dims(model)
        if not 0 < keep <= 1:
            raise ScheduleError(f"keep must be in (0, 1], got {keep}")
        layers = list(layers) if layers is not None else [round(b * d.depth / 12) for b in (3, 6, 9)]
        if any(not 0 <= b < d.depth for b in layers):
            raise ScheduleError(f"EViT layers {layers} must be block indices in [0, {d.depth})")
        prune, merge, n = [], [], d.tokens
        for i in range(d.depth):
            if i in layers:
                patches = n - d.prefix
                kept = math.ceil(keep * patches)
                n = d.prefix + kept + (1 if fuse and kept < patches else 0)  # the fused token, if any
            prune.append(n)
            merge.append(n)
        return cls(prune, merge, {"kind": "evit", "keep": keep, "layers": layers, "fuse": fuse})

    # ---- validation / io ----------------------------------------------------------------------------------
    def check(self, model_or_dims: torch.nn.Module | ViTDims) -> "Schedule":
        """Raise ScheduleError unless this schedule fits the model (depth, token counts, protected tokens)."""
        d = model_or_dims if isinstance(model_or_dims, ViTDims) else vit_dims(model_or_dims)
        if len(self) != d.depth:
            raise ScheduleError(f"schedule has {len(self)} blocks but the model has {d.depth}; give one count per block")
        if self.prune and self.prune[0] > d.tokens:
            raise ScheduleError(f"block 0 keeps {self.prune[0]} tokens but only {d.tokens} come in")
        if self.merge and self.merge[-1] < d.min_tokens:
            raise ScheduleError(f"schedule keeps {self.merge[-1]} tokens but the model has {d.prefix} protected "
                                f"tokens; keep at least {d.min_tokens} in every block")
        return self

    def ratios(self, tokens: int) -> dict[str, list[float]]:
        """Per-block prune and merge rates (fraction of incoming tokens removed by each step)."""
        out: dict[str, list[float]] = {"prune": [], "merge": []}
        n = tokens
        for p, m in zip(self.prune, self.merge):
            out["prune"].append(1 - p / n)
            out["merge"].append(1 - m / p)
            n = m
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"prune": list(self.prune), "merge": list(self.merge), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        """Inverse of to_dict (raises ScheduleError on a malformed dict)."""
        if not isinstance(d, dict) or "prune" not in d or "merge" not in d:
            raise ScheduleError(f"a schedule is a dict with 'prune' and 'merge' lists, got {str(d)[:100]}")
        return cls(d["prune"], d["merge"], d.get("meta"))

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        """Inverse of to_json."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ScheduleError(f"schedule JSON is malformed ({e}); write it with Schedule.to_json") from e


def block_macs(n_in: int, n_out: int, dim: int, hidden: int) -> int:
    """MACs of one block: attention 4NC^2 + 2N^2C at the incoming N, MLP 2·N·C·hidden at the kept N."""
    return 4 * n_in * dim * dim + 2 * n_in * n_in * dim + 2 * n_out * dim * hidden


def macs(model: torch.nn.Module | ViTDims, schedule: Schedule | None = None) -> int:
    """Analytic MACs per image (DiffRate convention) of the model under a schedule (None = uncompressed)."""
    d = model if isinstance(model, ViTDims) else vit_dims(model)
    s = schedule.check(d) if schedule is not None else Schedule([d.tokens] * d.depth, [d.tokens] * d.depth)
    total, n = d.patch_macs + d.dim * d.classes * d.heads, d.tokens
    for m in s.merge:
        total += block_macs(n, m, d.dim, d.hidden)
        n = m
    return total


def unified(model: torch.nn.Module | ViTDims, prune_rate: float, merge_rate: float, start: int = 1) -> Schedule:
    """Hand-set prune→merge: from block `start` on, prune prune_rate then merge merge_rate of the non-protected tokens."""
    d = model if isinstance(model, ViTDims) else vit_dims(model)
    if not (0 <= prune_rate < 1 and 0 <= merge_rate < 1):
        raise ScheduleError(f"rates must be in [0, 1), got prune_rate={prune_rate}, merge_rate={merge_rate}")
    prune, merge, n = [], [], d.tokens
    for i in range(d.depth):
        if i >= start:
            n = max(d.prefix + round((n - d.prefix) * (1 - prune_rate)), d.min_tokens + 1)
        prune.append(n)
        if i >= start:
            n = max(d.prefix + round((n - d.prefix) * (1 - merge_rate)), d.min_tokens + 1)
        merge.append(min(n, prune[-1]))
        n = merge[-1]
    return Schedule(prune, merge, {"kind": "unified", "prune_rate": prune_rate, "merge_rate": merge_rate, "start": start})


def at_macs(model: torch.nn.Module, kind: str, fraction: float, **kw: Any) -> Schedule:
    """The ToMe / EViT / unified schedule whose MACs are closest to fraction·full MACs (r, keep or rates fitted)."""
    full = macs(model)
    target = fraction * full
    if kind == "tome":
        cands = [Schedule.tome(model, r / 8) for r in range(0, 8 * vit_dims(model).tokens)]
    elif kind in ("evit", "unified"):
        grid = [i / 400 for i in range(1, 400)]
        if kind == "evit":
            cands = [Schedule.evit(model, keep=1 - g, **kw) for g in grid]
        else:
            ratio = kw.pop("prune_share", 0.5)
            cands = [unified(model, g * 2 * ratio, g * 2 * (1 - ratio), **kw) for g in grid if max(ratio, 1 - ratio) * 2 * g < 1]
    else:
        raise ScheduleError(f"kind must be 'tome', 'evit' or 'unified', got {kind!r}")
    best = min(cands, key=lambda s: abs(macs(model, s) - target))
    if abs(macs(model, best) - target) > 0.02 * full:
        raise ScheduleError(f"no {kind} schedule comes within 2% of {fraction:.0%} MACs (closest "
                            f"{macs(model, best) / full:.1%}); choose a budget this family can reach")
    return best
