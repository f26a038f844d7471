"""Schedules: per-block kept-token counts after prune and after merge, their validation, JSON and analytic MACs."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import tokens
from .dims import ViTDims, same_dims, vit_dims  # noqa: F401 (re-exported: tcl.compress.schedule.vit_dims)
from .settings import PatchSettings, SettingsError


class ScheduleError(ValueError):
    """Raised for a schedule that does not fit the model (or is malformed)."""


@dataclass(frozen=True)
class Schedule:
    """Kept tokens per block after its prune step and after its merge step (prefix tokens included), optionally kept
    attention heads per block (None: all) with the head ranking that picks them (head_order: per block the head
    indices, most important first), and the patch settings it belongs to (None: tcl.patch's keyword arguments and
    defaults apply). Equality compares the counts (tokens and heads)."""

    prune: tuple[int, ...]
    merge: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    settings: PatchSettings | None = field(default=None, compare=False)
    heads: tuple[int | None, ...] | None = None
    head_order: tuple[tuple[int, ...], ...] | None = field(default=None, compare=False)

    def __init__(self, prune: Sequence[int], merge: Sequence[int], meta: dict[str, Any] | None = None,
                 settings: PatchSettings | None = None, heads: Sequence[int | None] | None = None,
                 head_order: Sequence[Sequence[int]] | None = None):
        if len(prune) != len(merge):
            raise ScheduleError(f"prune has {len(prune)} entries but merge has {len(merge)}; give one count per block to each")
        if not all(isinstance(v, (int,)) or (hasattr(v, "__index__")) for v in [*prune, *merge]):
            raise ScheduleError("kept-token counts must be integers")
        object.__setattr__(self, "prune", tuple(int(v) for v in prune))
        object.__setattr__(self, "merge", tuple(int(v) for v in merge))
        object.__setattr__(self, "heads", _heads(heads, len(self.prune)))
        object.__setattr__(self, "head_order", _head_order(head_order, len(self.prune)))
        object.__setattr__(self, "meta", dict(meta or {}))
        if settings is not None and not isinstance(settings, PatchSettings):
            raise ScheduleError(f"settings must be a tcl.settings.PatchSettings, got {type(settings).__name__}")
        object.__setattr__(self, "settings", settings)
        prev = None
        for i, (p, m) in enumerate(zip(self.prune, self.merge)):
            if m > p or (prev is not None and p > prev):
                raise ScheduleError(f"block {i}: kept counts must not increase (incoming {prev}, after prune {p}, "
                                    f"after merge {m}); make each count <= the one before it")
            prev = m

    def __len__(self) -> int:
        return len(self.prune)

    def with_settings(self, settings: PatchSettings | None) -> "Schedule":
        """The same counts and meta carrying other patch settings (None: carry nothing)."""
        return Schedule(self.prune, self.merge, self.meta, settings, self.heads, self.head_order)

    def with_heads(self, heads: Sequence[int | None] | None,
                   head_order: Sequence[Sequence[int]] | None = None) -> "Schedule":
        """The same token counts, meta and settings with other kept-head counts (None: all) and head ranking
        (None: keep this schedule's)."""
        return Schedule(self.prune, self.merge, self.meta, self.settings, heads,
                        self.head_order if head_order is None else head_order)

    def kept_heads(self, attn_heads: int) -> list[int]:
        """Heads kept in each block of a model with attn_heads heads per block."""
        return [attn_heads if h is None else h for h in (self.heads or [None] * len(self))]

    def kept_head_indices(self, attn_heads: int) -> list[list[int]]:
        """Per block the sorted indices of the kept heads: the first kept_heads of head_order."""
        counts = self.kept_heads(attn_heads)
        if any(h < attn_heads for h in counts) and self.head_order is None:
            raise ScheduleError("this schedule removes attention heads but carries no head ranking: select it from "
                                "the joint search's table (table.select), or attach one with "
                                "schedule.with_heads(schedule.heads, tcl.compress.joint.head_order(importance))")
        return [list(range(attn_heads)) if h == attn_heads else sorted(self.head_order[i][:h])  # type: ignore[index]
                for i, h in enumerate(counts)]

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def full(cls, model: torch.nn.Module) -> "Schedule":
        """The schedule that keeps every token (must reproduce the unpatched model)."""
        d = vit_dims(model)
        return cls([d.tokens] * d.depth, [d.tokens] * d.depth, {"kind": "full"})

    @classmethod
    def tome(cls, model: torch.nn.Module | ViTDims, r: float | tuple[float, float] | Sequence[int]) -> "Schedule":
        """ToMe with model.r = r (an int, a float, (r, inflection) or a per-block list, as ToMe's parse_r reads it),
        each block's r capped at half the non-protected tokens as ToMe's matching does; carries merge='tome'."""
        d = vit_dims(model)
        per_block = _tome_r(d.depth, r)
        if any(v < 0 for v in per_block):
            raise ScheduleError(f"r must be >= 0 in every block, got {per_block}")
        prune, merge, n = [], [], d.tokens
        for r_i in per_block:
            prune.append(n)
            n -= max(min(r_i, tokens.max_bipartite(n, d.prefix)), 0)  # ToMe: r = min(r, (t - protected) // 2)
            merge.append(n)
        return cls(prune, merge, {"kind": "tome", "r": r if isinstance(r, (int, float)) else list(r)},
                   PatchSettings(merge="tome"))

    @classmethod
    def evit(cls, model: torch.nn.Module | ViTDims, keep: float, layers: Sequence[int] | None = None,
             fuse: bool = False) -> "Schedule":
        """EViT: at `layers` (default 3/6/9 of 12, scaled to depth) keep ceil(keep·non-protected), +1 fused token if
        fuse; carries EViT's settings (fuse='evit' or none, no proportional attention)."""
        d = vit_dims(model)
        if isinstance(model, torch.nn.Module) and not (getattr(model, "cls_token", None) is not None and d.prefix == 1):
            raise ScheduleError("EViT ranks tokens by the class token's attention and is defined for a ViT with one "
                                f"class token and no other prefix tokens; this model has {d.prefix} prefix token(s) "
                                "(distillation / registers / no class token): build a tcl.Schedule instead")
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
        return cls(prune, merge, {"kind": "evit", "keep": keep, "layers": layers, "fuse": fuse},
                   PatchSettings(fuse="evit" if fuse else "none", prop_attn=False))

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
        if self.heads is not None or self.head_order is not None:
            self._check_heads(d)
        return self

    def _check_heads(self, d: ViTDims) -> None:
        if d.attn_heads < 1:
            raise ScheduleError("this schedule keeps per-block heads but the model's head width is unknown; pass the "
                                "model (or tcl.schedule.vit_dims(model)) rather than hand-made ViTDims")
        if self.head_order is not None and any(sorted(o) != list(range(d.attn_heads)) for o in self.head_order):
            raise ScheduleError(f"head_order must rank all {d.attn_heads} heads of every block (a permutation of "
                                f"0..{d.attn_heads - 1}); build it with tcl.compress.joint.head_order(importance)")
        n = d.tokens
        for i, (h, m) in enumerate(zip(self.kept_heads(d.attn_heads), self.merge)):
            if h > d.attn_heads:
                raise ScheduleError(f"block {i} keeps {h} heads but the model has {d.attn_heads}; keep at most "
                                    f"{d.attn_heads}")
            if h == 0 and m < n:
                raise ScheduleError(f"block {i} keeps no heads but removes tokens, which are ranked by its attention; "
                                    "keep at least one head in a block that prunes or merges")
            n = m

    def ratios(self, tokens: int) -> dict[str, list[float]]:
        """Per-block prune and merge rates (fraction of incoming tokens removed by each step)."""
        out: dict[str, list[float]] = {"prune": [], "merge": []}
        n = tokens
        for p, m in zip(self.prune, self.merge):
            out["prune"].append(1 - p / n)
            out["merge"].append(1 - m / p)
            n = m
        return out

    def counts(self) -> dict[str, Any]:
        """The counts alone as a JSON-able dict (prune, merge and, when it keeps fewer, heads): a search log's form."""
        d: dict[str, Any] = {"prune": list(self.prune), "merge": list(self.merge)}
        return d if self.heads is None else {**d, "heads": list(self.heads)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (with "settings", "heads" and "head_order" when it carries them)."""
        d: dict[str, Any] = {"prune": list(self.prune), "merge": list(self.merge), "meta": self.meta}
        if self.heads is not None:
            d["heads"] = list(self.heads)
        if self.head_order is not None:
            d["head_order"] = [list(o) for o in self.head_order]
        return d if self.settings is None else {**d, "settings": self.settings.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        """Inverse of to_dict (raises ScheduleError on a malformed dict)."""
        if not isinstance(d, dict) or "prune" not in d or "merge" not in d:
            raise ScheduleError(f"a schedule is a dict with 'prune' and 'merge' lists, got {str(d)[:100]}")
        settings = d.get("settings")
        try:
            return cls(d["prune"], d["merge"], d.get("meta"), None if settings is None else PatchSettings.from_dict(settings),
                       d.get("heads"), d.get("head_order"))
        except SettingsError as err:
            raise ScheduleError(f"schedule settings are malformed ({err}); write schedules with Schedule.to_dict") from err

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


def _heads(heads: Sequence[int | None] | None, depth: int) -> tuple[int | None, ...] | None:
    """Validated per-block kept-head counts (None when every block keeps all its heads)."""
    if heads is None:
        return None
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or len(heads) != depth:
        raise ScheduleError(f"heads must list one kept-head count (or None: all) per block, {depth} in all; got {heads!r}")
    if not all(h is None or (not isinstance(h, bool) and hasattr(h, "__index__") and int(h) >= 0) for h in heads):
        raise ScheduleError(f"kept-head counts must be integers >= 0 or None (all heads), got {list(heads)}")
    out = tuple(None if h is None else int(h) for h in heads)
    return None if all(h is None for h in out) else out


def _head_order(order: Sequence[Sequence[int]] | None, depth: int) -> tuple[tuple[int, ...], ...] | None:
    """Validated per-block head rankings."""
    if order is None:
        return None
    try:
        out = tuple(tuple(int(j) for j in o) for o in order)
    except (TypeError, ValueError) as err:
        raise ScheduleError(f"head_order must list head indices per block ({err})") from err
    if len(out) != depth:
        raise ScheduleError(f"head_order must rank the heads of each of the {depth} blocks, got {len(out)}")
    return out


def _tome_r(depth: int, r: float | tuple[float, float] | Sequence[int]) -> list[int]:
    """ToMe's parse_r: per-block r of a constant (int or float) r, an (r, inflection) pair, or a list (0-padded)."""
    if isinstance(r, list) or (isinstance(r, Sequence) and not isinstance(r, tuple)):
        return [int(v) for v in r][:depth] + [0] * max(0, depth - len(r))
    r, inflect = r if isinstance(r, tuple) else (r, 0.0)
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    return [int(low + step * i) for i in range(depth)]


def block_macs(n_in: int, n_out: int, dim: int, hidden: int, width: int | None = None, gate: bool = False) -> int:
    """MACs of one block: attention 4·N·C·a + 2·N²·a at the incoming N (a: attention width, default C; + N·C·a for
    timm's sigmoid gate), MLP 2·N·C·hidden at the kept N."""
    a = dim if width is None else width
    return 4 * n_in * dim * a + 2 * n_in * n_in * a + 2 * n_out * dim * hidden + (n_in * dim * a if gate else 0)


def count_macs(d: ViTDims, kept: Sequence[int], heads: Sequence[int] | None = None) -> int:
    """Analytic MACs per image from the kept tokens after each block and per-block head counts (None: all heads),
    without validation: the one MACs formula (DiffRate convention)."""
    if heads is not None and (len(heads) != d.depth or not d.head_dim):
        raise ScheduleError(f"give one head count per block ({d.depth}) of a model whose head width is known")
    total, n = d.patch_macs + d.dim * d.classes * d.heads, d.tokens
    for i, m in enumerate(kept):
        total += block_macs(n, m, d.dim, d.hidden, None if heads is None else heads[i] * d.head_dim, d.gate)
        n = m
    return total


def macs(model: torch.nn.Module | ViTDims, schedule: Schedule | None = None, heads: Sequence[int] | None = None) -> int:
    """Analytic MACs per image (DiffRate convention) of the model under a schedule (None = uncompressed), with
    the schedule's per-block head counts or `heads` (None = the model's own widths)."""
    d = model if isinstance(model, ViTDims) else vit_dims(model)
    s = schedule.check(d) if schedule is not None else Schedule([d.tokens] * d.depth, [d.tokens] * d.depth)
    if s.heads is not None:
        if heads is not None:
            raise ScheduleError("the schedule keeps its own heads per block; do not pass heads as well")
        heads = s.kept_heads(d.attn_heads)
    return count_macs(d, s.merge, heads)


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
    """The ToMe / EViT / unified / DiffRate schedule whose MACs are closest to fraction·full MACs (EViT's keep or the
    unified rates fitted; ToMe's model.r, constant if one comes within 0.5 % of full MACs, else also (r, inflection)
    forms; 'diffrate' is the unified family carrying DiffRate's op, merge='diffrate')."""
    if kind == "diffrate":
        return at_macs(model, "unified", fraction, **kw).with_settings(PatchSettings(merge="diffrate"))
    full = macs(model)
    target = fraction * full
    if kind == "tome":
        grid = range(0, 8 * vit_dims(model).tokens)
        cands = [Schedule.tome(model, r / 8) for r in grid]
        if min(abs(macs(model, s) - target) for s in cands) > 0.005 * full:
            cands += [Schedule.tome(model, (r / 8, bend)) for bend in (-1.0, -0.5, 0.5, 1.0) for r in grid]
    elif kind in ("evit", "unified"):
        grid = [i / 400 for i in range(1, 400)]
        if kind == "evit":
            cands = [Schedule.evit(model, keep=1 - g, **kw) for g in grid]
        else:
            ratio = kw.pop("prune_share", 0.5)
            cands = [unified(model, g * 2 * ratio, g * 2 * (1 - ratio), **kw) for g in grid if max(ratio, 1 - ratio) * 2 * g < 1]
    else:
        raise ScheduleError(f"kind must be 'tome', 'evit', 'unified' or 'diffrate', got {kind!r}")
    best = min(cands, key=lambda s: abs(macs(model, s) - target))
    if abs(macs(model, best) - target) > 0.02 * full:
        raise ScheduleError(f"no {kind} schedule comes within 2% of {fraction:.0%} MACs (closest "
                            f"{macs(model, best) / full:.1%}); choose a budget this family can reach")
    return best
