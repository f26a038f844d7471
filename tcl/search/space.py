"""The search space: per-step removal rates, fitted to a MACs level; random candidates, anchors and mutations."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..compress.schedule import Schedule, ViTDims, count_macs

T = TypeVar("T")

__all__ = ["sample_schedule", "anchor_schedules", "mutate_schedule", "fit_rates", "fit_heads", "rates_of"]

def _counts(d: ViTDims, rates: Sequence[float], max_merge: float) -> tuple[list[int], list[int]]:
    """Kept counts when step k (prune_0, merge_0, prune_1, ...) removes rates[k] of the non-protected tokens.

    A merge removes at most floor(max_merge * non-protected) tokens and keeps a non-protected destination.
    """
    prune, merge, n = [], [], d.tokens
    for k, r in enumerate(rates):
        free = n - d.prefix
        drop = math.floor(min(max(r, 0.0), 1.0) * free + 0.5)
        if k % 2:
            drop = min(drop, math.floor(max_merge * free), free - 1) if free > 1 else 0
        n = max(n - drop, d.min_tokens)
        (merge if k % 2 else prune).append(n)
    return prune, merge


def _macs(d: ViTDims, merge: Sequence[int], heads: Sequence[int | None] | None = None) -> int:
    """tcl.macs(d, schedule) from the merge (and kept-head) counts alone (no validation)."""
    if heads is None:
        return count_macs(d, merge)
    return count_macs(d, merge, [d.attn_heads if h is None else h for h in heads])


def fit_heads(d: ViTDims, shape: Sequence[float], target_macs: float, merge: Sequence[int] | None = None,
              min_heads: int = 1) -> list[int]:
    """Kept heads per block, round(H·(1 - alpha·shape)) clipped to [min_heads, H], with alpha chosen so the MACs
    (at the given merge counts, default none) come closest to target_macs."""
    merge = list(merge) if merge is not None else [d.tokens] * d.depth
    shape = [min(max(float(r), 0.0), 1.0) for r in shape]
    H = d.attn_heads

    def at(alpha: float) -> tuple[int, list[int]]:
        h = [min(max(round(H * (1 - alpha * r)), min_heads), H) for r in shape]
        return _macs(d, merge, h), h

    return at(0.0)[1] if not any(shape) else _closest(at, 1.0 / min(r for r in shape if r > 0), target_macs)


def _closest(at: Callable[[float], tuple[int, T]], hi: float, target_macs: float) -> T:
    """What at(alpha) gives at the alpha in [0, hi] (MACs falling with alpha) whose MACs come closest to target_macs."""
    lo = 0.0
    if at(hi)[0] > target_macs:
        return at(hi)[1]
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid)[0] > target_macs else (lo, mid)
    (m_lo, v_lo), (m_hi, v_hi) = at(lo), at(hi)
    return v_lo if abs(m_lo - target_macs) < abs(m_hi - target_macs) else v_hi


def rates_of(d: ViTDims, s: Schedule) -> list[float]:
    """Per-step removal rates [prune_0, merge_0, prune_1, ...] as fractions of the non-protected incoming tokens."""
    out, n = [], d.tokens
    for p, m in zip(s.prune, s.merge):
        for kept in (p, m):
            out.append((n - kept) / (n - d.prefix) if n > d.prefix else 0.0)
            n = kept
    return out


def fit_rates(d: ViTDims, shape: Sequence[float], target_macs: float, max_merge: float = 1.0,
              meta: dict[str, Any] | None = None, heads: Sequence[int | None] | None = None) -> Schedule:
    """Scale removal rates alpha*shape (clipped to [0,1]) so the schedule's MACs (with the given kept heads, default
    all) come closest to target_macs."""
    shape = [max(float(r), 0.0) for r in shape]
    if heads is not None and all(h is None or h == d.attn_heads for h in heads):
        heads = None  # every head kept: a token-only schedule
    full = Schedule(*_counts(d, [0.0] * len(shape), max_merge), meta, heads=heads)
    if not any(shape) or _macs(d, full.merge, heads) <= target_macs:
        return full

    def at(alpha: float) -> tuple[int, Schedule]:
        s = Schedule(*_counts(d, [alpha * r for r in shape], max_merge), meta, heads=heads)
        return _macs(d, s.merge, heads), s

    return _closest(at, 1.0 / min(r for r in shape if r > 0), target_macs)  # at hi every step removes all it may


def sample_schedule(d: ViTDims, seed: int, index: int, min_fraction: float = 0.25, max_fraction: float = 1.0,
                    max_merge: float = 1.0, heads: str = "none") -> Schedule:
    """Random candidate `index`: per-block prune and merge rates, each sorted to grow with depth, fit to a random MACs level.

    Draws a target MACs fraction t ~ U(min_fraction, max_fraction), a first compressed block among those that can
    still reach t, a prune/merge mix w (0 = merge only with probability 1/3, 1 = prune only with probability 1/6, else
    U(0,1)), prune rates w*sort(U(0,1)^depth) and merge rates (1-w)*sort(U(0,1)^depth), then scales all rates by one
    factor so the MACs land nearest t (fit_rates).
    heads='only' keeps every token and fits kept heads (fit_heads, shape U(0,1)^depth, blocks may keep none) to t;
    heads='joint' first removes heads for a random share (0 with probability 1/4, else U(0,1)) of the MACs to save
    (at least one head per block), then fits the token rates with those heads to t.
    Deterministic in (seed, index), so shards and resumed runs regenerate the same candidates.
    """
    rng = np.random.default_rng([seed, 0, index])
    full = _macs(d, [d.tokens] * d.depth)
    t = rng.uniform(min_fraction, max_fraction)
    kept: list[int] | None = None
    if heads != "none":
        hrng = np.random.default_rng([seed, 2, index])
        shape, share = hrng.uniform(size=d.depth), hrng.uniform()
        if heads == "only":
            return Schedule([d.tokens] * d.depth, [d.tokens] * d.depth, {"kind": "random-heads", "id": index},
                            heads=fit_heads(d, shape.tolist(), t * full, min_heads=0))
        share = 0.0 if hrng.uniform() < 0.25 else share
        kept = fit_heads(d, shape.tolist(), (1 - share * (1 - t)) * full)
    reach = [_macs(d, _counts(d, [0.0] * 2 * s + [1.0] * 2 * (d.depth - s), max_merge)[1], kept) / full
             for s in range(d.depth)]
    starts = [s for s in range(d.depth) if reach[s] <= t] or [0]
    start = int(rng.choice(starts))
    u, w = rng.uniform(), rng.uniform()
    w = 0.0 if u < 1 / 3 else 1.0 if u < 1 / 2 else w
    p, m = np.sort(rng.uniform(size=d.depth)) * w, np.sort(rng.uniform(size=d.depth)) * (1 - w)
    p[:start] = m[:start] = 0.0
    return fit_rates(d, np.stack([p, m], 1).reshape(-1).tolist(), t * full, max_merge,
                     {"kind": "random" if kept is None else "random-joint", "id": index}, kept)


def anchor_schedules(d: ViTDims, min_fraction: float = 0.25, max_fraction: float = 1.0) -> list[Schedule]:
    """The baselines' families inside the search space: ToMe (r = 0.25, 0.5, ...) and EViT (keep = 0.98, 0.96, ...)
    schedules whose MACs lie in [min_fraction, max_fraction] of the uncompressed model, without duplicates."""
    full, out, seen = _macs(d, [d.tokens] * d.depth), [], set()
    fams = [[Schedule.tome(d, k / 4) for k in range(1, 4 * d.tokens)],
            [Schedule.evit(d, 1 - k / 50) for k in range(1, 50)]]
    for fam in fams:
        for s in fam:
            f = _macs(d, s.merge) / full
            if min_fraction <= f <= max_fraction and (s.prune, s.merge) not in seen:
                seen.add((s.prune, s.merge))
                out.append(Schedule(s.prune, s.merge, {**s.meta, "kind": "anchor-" + s.meta["kind"]}))
    return out


def mutate_schedule(d: ViTDims, parent: Schedule, rng: np.random.Generator, target_macs: float, sigma: float = 0.15,
                    max_merge: float = 1.0, meta: dict[str, Any] | None = None,
                    other: Schedule | None = None, heads: bool = False) -> Schedule:
    """A child of parent's per-step rates, refit to target_macs: with probability 0.6 perturb 1-3 rates by N(0, sigma),
    0.2 set one rate to 0 or 1, 0.2 take each block's rates from parent or `other` (crossover; parent if None).
    heads=True (a joint search): first, with probability 0.3, one block keeps one head more or fewer (1..H)."""
    kept = parent.heads
    if heads and rng.uniform() < 0.3:
        h = parent.kept_heads(d.attn_heads)
        i = int(rng.integers(d.depth))
        h[i] = min(max(h[i] + (1 if rng.uniform() < 0.5 else -1), 1), d.attn_heads)
        kept = tuple(h)
    r = np.array(rates_of(d, parent))
    u = rng.uniform()
    if u < 0.6:
        idx = rng.choice(len(r), size=int(rng.integers(1, 4)), replace=False)
        r[idx] = np.clip(r[idx] + rng.normal(0.0, sigma, len(idx)), 0.0, 1.0)
    elif u < 0.8:
        r[int(rng.integers(len(r)))] = float(rng.integers(2))
    elif other is not None:
        take = np.repeat(rng.uniform(size=d.depth) < 0.5, 2)
        r = np.where(take, np.array(rates_of(d, other)), r)
    return fit_rates(d, r.tolist(), target_macs, max_merge, meta, kept)
