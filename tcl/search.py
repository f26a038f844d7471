"""Compression-rate search: random and evolutionary candidates, successive evaluation, resumable JSONL log, torch.distributed.

Stage "subset": every candidate is scored on the first `subset` images of the held-out split (default score: KL to
the uncompressed model's cached predictions); stage "anchor" scores the baselines' schedules (ToMe, EViT) the same way,
so the table can only beat them by finding something better on the held-out split. Stage "full": the `topk` best per MACs bin are re-scored on the whole
split, and the best per bin (by `select_by`) forms the LookupTable. Run `python -m tcl.search --help`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from .schedule import Schedule, ViTDims, block_macs, macs, vit_dims
from .scorer import Apply, ReferenceScorer, Scorer, SearchError, patched
from .table import BudgetError, LookupTable, TableError, better, build_table, mac_bin, model_info, read_log, sort_key
from .utils import write_json

__all__ = ["SearchConfig", "SearchError", "Scorer", "ReferenceScorer", "Apply", "patched", "LookupTable", "TableError", "BudgetError",
           "search", "sample_schedule", "anchor_schedules", "evaluations_to_match", "selection_check", "mutate_schedule",
           "fit_rates", "rates_of", "build_table", "budget_curve",
           "read_log", "init_distributed", "main"]


# ---- search space ---------------------------------------------------------------------------------------------
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


@functools.lru_cache(maxsize=64)
def _fixed_macs(d: ViTDims) -> int:
    """The schedule-independent part of tcl.macs (patch embedding, head)."""
    return macs(d) - d.depth * block_macs(d.tokens, d.tokens, d.dim, d.hidden)


def _macs(d: ViTDims, merge: Sequence[int]) -> int:
    """tcl.macs(d, schedule) from the merge counts alone (fast, no validation)."""
    total, n = _fixed_macs(d), d.tokens
    for m in merge:
        total += block_macs(n, m, d.dim, d.hidden)
        n = m
    return total


def rates_of(d: ViTDims, s: Schedule) -> list[float]:
    """Per-step removal rates [prune_0, merge_0, prune_1, ...] as fractions of the non-protected incoming tokens."""
    out, n = [], d.tokens
    for p, m in zip(s.prune, s.merge):
        for kept in (p, m):
            out.append((n - kept) / (n - d.prefix) if n > d.prefix else 0.0)
            n = kept
    return out


def fit_rates(d: ViTDims, shape: Sequence[float], target_macs: float, max_merge: float = 1.0,
              meta: dict[str, Any] | None = None) -> Schedule:
    """Scale removal rates alpha*shape (clipped to [0,1]) so the schedule's MACs come closest to target_macs."""
    shape = [max(float(r), 0.0) for r in shape]
    full = Schedule(*_counts(d, [0.0] * len(shape), max_merge), meta)
    if not any(shape) or _macs(d, full.merge) <= target_macs:
        return full

    def at(alpha: float) -> tuple[int, Schedule]:
        s = Schedule(*_counts(d, [alpha * r for r in shape], max_merge), meta)
        return _macs(d, s.merge), s

    lo, hi = 0.0, 1.0 / min(r for r in shape if r > 0)  # at hi every step removes all it may
    if at(hi)[0] > target_macs:
        return at(hi)[1]
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid)[0] > target_macs else (lo, mid)
    (m_lo, s_lo), (m_hi, s_hi) = at(lo), at(hi)
    return s_lo if abs(m_lo - target_macs) < abs(m_hi - target_macs) else s_hi


def sample_schedule(d: ViTDims, seed: int, index: int, min_fraction: float = 0.25, max_fraction: float = 1.0,
                    max_merge: float = 1.0) -> Schedule:
    """Random candidate `index`: per-block prune and merge rates, each sorted to grow with depth, fit to a random MACs level.

    Draws a target MACs fraction t ~ U(min_fraction, max_fraction), a first compressed block among those that can
    still reach t, a prune/merge mix w (0 = merge only with probability 1/3, 1 = prune only with probability 1/6, else
    U(0,1)), prune rates w*sort(U(0,1)^depth) and merge rates (1-w)*sort(U(0,1)^depth), then scales all rates by one
    factor so the MACs land nearest t (fit_rates).
    Deterministic in (seed, index), so shards and resumed runs regenerate the same candidates.
    """
    rng = np.random.default_rng([seed, 0, index])
    full = _macs(d, [d.tokens] * d.depth)
    t = rng.uniform(min_fraction, max_fraction)
    reach = [_macs(d, _counts(d, [0.0] * 2 * s + [1.0] * 2 * (d.depth - s), max_merge)[1]) / full
             for s in range(d.depth)]
    starts = [s for s in range(d.depth) if reach[s] <= t] or [0]
    start = int(rng.choice(starts))
    u, w = rng.uniform(), rng.uniform()
    w = 0.0 if u < 1 / 3 else 1.0 if u < 1 / 2 else w
    p, m = np.sort(rng.uniform(size=d.depth)) * w, np.sort(rng.uniform(size=d.depth)) * (1 - w)
    p[:start] = m[:start] = 0.0
    return fit_rates(d, np.stack([p, m], 1).reshape(-1).tolist(), t * full, max_merge,
                     {"kind": "random", "id": index})


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
                    other: Schedule | None = None) -> Schedule:
    """A child of parent's per-step rates, refit to target_macs: with probability 0.6 perturb 1-3 rates by N(0, sigma),
    0.2 set one rate to 0 or 1, 0.2 take each block's rates from parent or `other` (crossover; parent if None)."""
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
    return fit_rates(d, r.tolist(), target_macs, max_merge, meta)


def _under(rec: dict[str, Any], full: int, width: float, budget: float, window: int) -> bool:
    """Whether a record lies in one of the `window` MACs bins just under budget."""
    return round(budget / width) - window <= mac_bin(rec, full, width) < round(budget / width)


# ---- search ----------------------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    """Settings of one search (all of them recorded in the log folder and the table)."""

    method: Literal["random", "evolve"] = "random"
    candidates: int = 10_000  # candidates scored on the subset (the search's evaluation budget)
    seed: int = 0
    subset: int = 256  # images per subset evaluation
    topk: int = 2  # candidates per MACs bin re-scored on the whole split
    bin_width: float = 0.01  # MACs bin width, as a fraction of full MACs
    min_fraction: float = 0.25
    max_fraction: float = 1.0
    max_merge: float = 1.0  # most of the non-protected tokens one merge step may remove (0.5 for 'bipartite'/'tome')
    rank_by: str = "kl"  # subset score that promotes candidates to the full split
    select_by: str = "kl"  # full-split score that picks each bin's entry (acc is optimistic: notebook 03, section 6)
    init: int = 500  # evolve: random candidates before the first round
    round_size: int = 100  # evolve: children per round (a sync point when distributed)
    sigma: float = 0.15  # evolve: std of the rate perturbation
    elite: int = 3  # evolve: parents drawn from the `elite` Pareto-front candidates nearest the target MACs
    anchors: bool = True  # also score the ToMe / EViT schedules of the range (stage "anchor", ids -2, -3, ...)
    subset_dtype: str = "float32"  # "bfloat16": autocast the subset and anchor stages (the whole split stays float32);
    #   "auto": bfloat16 only where the device has native bf16 and a timing of a few subset evaluations finds it faster
    targets: list[float] | None = None  # evolve: spend the rounds on the window [b - bin_width, b) below each budget b
    #   (fractions of full MACs) and re-score on the whole split only those windows (topk per window)

    def __post_init__(self) -> None:
        if self.method not in ("random", "evolve"):
            raise SearchError(f"method must be 'random' or 'evolve', got {self.method!r}")
        if not 0 < self.min_fraction < self.max_fraction <= 1:
            raise SearchError(f"need 0 < min_fraction < max_fraction <= 1, got {self.min_fraction}, {self.max_fraction}")
        if self.subset_dtype not in ("float32", "bfloat16", "auto"):
            raise SearchError(f"subset_dtype must be 'float32', 'bfloat16' or 'auto', got {self.subset_dtype!r}")
        if self.candidates < 1 or self.subset < 1 or self.topk < 1:
            raise SearchError("candidates, subset and topk must be >= 1")
        if self.targets is not None:
            if self.method != "evolve" or not self.targets or not all(
                    self.min_fraction + self.bin_width <= b <= self.max_fraction for b in self.targets):
                raise SearchError(f"targets {self.targets!r}: needs method 'evolve' and budgets in "
                                  f"[min_fraction + bin_width, max_fraction]; or leave targets unset")
            self.targets = sorted(float(b) for b in self.targets)


class _Log:
    """This rank's append-only JSONL shard: one flushed line per evaluated candidate."""

    def __init__(self, out_dir: Path | None, rank: int):
        self.f = None
        if out_dir is not None:
            path = out_dir / f"log.{rank}.jsonl"
            if path.exists():  # drop a truncated last line so the next record starts on a fresh line
                raw = path.read_bytes()
                if raw and not raw.endswith(b"\n"):
                    with open(path, "r+b") as f:
                        f.truncate(raw.rfind(b"\n") + 1)
            self.f = open(path, "a")

    def append(self, rec: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1: on CUDA (default when available) this rank's LOCAL_RANK
    GPU with nccl, on CPU gloo; return (rank, world)."""
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _measure_subset_dtype(scorer: Scorer, d: ViTDims, cfg: "SearchConfig", rounds: int = 4) -> dict[str, Any]:
    """The subset-stage precision for subset_dtype='auto': bfloat16 only where the scorer's device has native bf16 and
    interleaved timings of `rounds` subset evaluations (first one warm-up) find it faster; with the evidence."""
    import statistics

    from .utils import device_of, native_bf16, synchronize

    model = getattr(scorer, "model", None)
    if not isinstance(model, torch.nn.Module):
        return {"chosen": "float32", "reason": "the scorer has no model to time"}
    device = device_of(model)
    if getattr(scorer, "amp", None):
        return {"chosen": "float32", "reason": f"the scorer already runs under amp={scorer.amp}"}  # type: ignore[attr-defined]
    if not native_bf16(device):
        return {"chosen": "float32", "reason": f"{device.type} has no native bfloat16", "native_bf16": False}
    s = sample_schedule(d, cfg.seed, 0, cfg.min_fraction, cfg.max_fraction, cfg.max_merge)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(rounds):
        for name in times:
            synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16) if name == "bfloat16" else contextlib.nullcontext():
                scorer(s, cfg.subset)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"chosen": "bfloat16" if med["bfloat16"] < med["float32"] else "float32", "native_bf16": True,
            "seconds_per_evaluation": med, "device": str(device), "threads": torch.get_num_threads()}


def resolve_subset_dtype(scorer: Scorer, d: ViTDims, cfg: "SearchConfig",
                         out_dir: Path | None = None) -> tuple["SearchConfig", dict[str, Any]]:
    """cfg with subset_dtype 'auto' replaced by the measured choice (rank 0's under torchrun), or by the one a resumed
    search in out_dir recorded; and the record of that choice ({} when cfg names a dtype)."""
    if cfg.subset_dtype != "auto":
        return cfg, {}
    settings = out_dir / "settings.json" if out_dir is not None else None
    old = json.loads(settings.read_text())["config"].get("subset_dtype") if settings and settings.exists() else None
    if old in ("float32", "bfloat16"):
        note = {"chosen": old, "reason": f"resumed the search in {out_dir}"}
    else:
        note = _measure_subset_dtype(scorer, d, cfg)
        note = _gather([note], init_distributed()[1])[0]  # every rank takes rank 0's choice
    return dataclasses.replace(cfg, subset_dtype=note["chosen"]), {"subset_dtype": "auto", **note}


def _gather(new: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return new
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, new)
    return [r for part in parts for r in part]


class _Run:
    """One search invocation: records, this rank's log shard and the evaluation loop shared by all stages."""

    def __init__(self, dims: ViTDims, scorer: Scorer, cfg: SearchConfig, out_dir: Path | None, progress: bool):
        self.d, self.scorer, self.cfg, self.out_dir = dims, scorer, cfg, out_dir
        self.rank, self.world = init_distributed()
        self.full = _macs(dims, [dims.tokens] * dims.depth)
        self.records = read_log(out_dir) if out_dir is not None else {}
        self.log = _Log(out_dir, self.rank)
        self.progress = progress and self.rank == 0
        self.evaluated = 0

    def evaluate(self, stage: str, ids: Sequence[int], make: Callable[[int], Schedule], n: int, desc: str) -> None:
        """Score this rank's share (position % world) of the not-yet-logged ids, then share the new records."""
        from tqdm.auto import tqdm

        todo = [i for j, i in enumerate(ids) if j % self.world == self.rank and (stage, i) not in self.records]
        new, model = [], getattr(self.scorer, "model", None)
        device = next(model.parameters()).device.type if isinstance(model, torch.nn.Module) else "cpu"
        low = stage != "full" and self.cfg.subset_dtype == "bfloat16"
        for i in tqdm(todo, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True):
            s = make(i)
            with torch.autocast(device, dtype=torch.bfloat16) if low else contextlib.nullcontext():
                scores = self.scorer(s, n)
            rec = {"stage": stage, "id": i, "n": n, "macs": _macs(self.d, s.merge), "kind": s.meta.get("kind"),
                   "schedule": {"prune": list(s.prune), "merge": list(s.merge)}, "scores": scores}
            self.log.append(rec)
            new.append(rec)
        self.evaluated += len(new)
        for rec in _gather(new, self.world):
            self.records.setdefault((rec["stage"], rec["id"]), rec)

    def stage(self, stage: str, below: int | None = None) -> list[dict[str, Any]]:
        """Records of one stage (ids < below when given), by id."""
        return sorted((r for (st, i), r in self.records.items() if st == stage and (below is None or i < below)),
                      key=lambda r: r["id"])

    def pool(self, below: int) -> list[dict[str, Any]]:
        """Subset-stage records with id < below, plus the anchors."""
        return self.stage("anchor") + self.stage("subset", below=below)

    def anchors(self) -> dict[int, Schedule]:
        """The anchor schedules by id (-2, -3, ...; -1 is the uncompressed model), or none if cfg.anchors is off."""
        c = self.cfg
        return {-2 - k: s for k, s in enumerate(anchor_schedules(self.d, c.min_fraction, c.max_fraction))} if c.anchors else {}

    def sample(self, i: int) -> Schedule:
        c = self.cfg
        return sample_schedule(self.d, c.seed, i, c.min_fraction, c.max_fraction, c.max_merge)

    def children(self, start: int, stop: int, round_: int) -> dict[int, Schedule]:
        """Evolve round: for a random target bin, mutate one of the `elite` Pareto-front candidates nearest to it in
        MACs (front: no cheaper candidate scores better) and refit the child into that bin; deterministic."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 1, round_])
        pop = self.pool(below=start)
        front, best = [], math.inf
        for r in sorted(pop, key=lambda r: (r["macs"], sort_key(c.rank_by, r["scores"][c.rank_by]), r["id"])):
            if sort_key(c.rank_by, r["scores"][c.rank_by]) < best:
                front.append(r)
                best = sort_key(c.rank_by, r["scores"][c.rank_by])
        seen = {(tuple(r["schedule"]["prune"]), tuple(r["schedule"]["merge"])) for r in pop}
        lo, hi = int(c.min_fraction / c.bin_width), max(int(math.ceil(c.max_fraction / c.bin_width)) - 1, 0)
        out = {}
        for i in range(start, stop):
            if c.targets:
                target = (c.targets[int(rng.integers(len(c.targets)))] - rng.uniform() * c.bin_width) * self.full
            else:
                target = (int(rng.integers(lo, hi + 1)) + rng.uniform()) * c.bin_width * self.full
            near = sorted(front, key=lambda r: (abs(r["macs"] - target), r["id"]))[:c.elite]
            parent, other = (Schedule.from_dict(near[int(k)]["schedule"]) for k in rng.integers(0, len(near), 2))
            for _ in range(10):
                child = mutate_schedule(self.d, parent, rng, target, c.sigma, c.max_merge, {"kind": "evolve", "id": i},
                                        other)
                if (child.prune, child.merge) not in seen:
                    break
            seen.add((child.prune, child.merge))
            out[i] = child
        return out

    def promote(self, subset: list[dict[str, Any]]) -> dict[int, Schedule]:
        """The topk candidates per MACs bin (per target window when targets are set) by rank_by, plus the uncompressed
        model (id -1), by id."""
        c, by_bin = self.cfg, {}
        for r in subset:
            if not c.targets:
                by_bin.setdefault(mac_bin(r, self.full, c.bin_width), []).append(r)
            for b in c.targets or []:
                if b - c.bin_width <= r["macs"] / self.full < b:
                    by_bin.setdefault(b, []).append(r)
        keep = [r for rs in by_bin.values()
                for r in sorted(rs, key=lambda r: (sort_key(c.rank_by, r["scores"][c.rank_by]), r["id"]))[:c.topk]]
        full = Schedule([self.d.tokens] * self.d.depth, [self.d.tokens] * self.d.depth, {"kind": "full"})
        return {-1: full, **{r["id"]: Schedule(r["schedule"]["prune"], r["schedule"]["merge"], {"kind": r.get("kind")})
                             for r in sorted(keep, key=lambda r: r["id"])}}


def _settings(cfg: SearchConfig, model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "candidates"}, "model": model, "data": data}


def _check_settings(out_dir: Path, settings: dict[str, Any], rank: int, world: int) -> None:
    path = out_dir / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        for part in ("config", "model", "data"):
            for k in sorted(set(old.get(part, {})) | set(settings[part])):
                if old.get(part, {}).get(k) != settings[part].get(k):
                    raise SearchError(f"{out_dir} holds a search with {part}.{k} = {old.get(part, {}).get(k)!r}, not "
                                      f"{settings[part].get(k)!r}; resume with the same settings or pass a new out dir")
    elif rank == 0:
        write_json(path, settings)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _invocation(out: Path | None, run: "_Run", t0: float) -> None:
    if out is not None and run.rank == 0:
        with open(out / "invocations.jsonl", "a") as f:
            f.write(json.dumps({"wall_s": time.perf_counter() - t0, "evaluated": run.evaluated, "world": run.world,
                                "threads": torch.get_num_threads(), "time": time.time()}) + "\n")


def search(model: torch.nn.Module, scorer: Scorer, config: SearchConfig | None = None,
           out_dir: str | os.PathLike | None = None, progress: bool = True) -> LookupTable:
    """Run (or resume) a search; writes out_dir/log.<rank>.jsonl and out_dir/table.json (rank 0); returns the table."""
    cfg = config or SearchConfig()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    info, data = model_info(model), dict(getattr(scorer, "info", {}))
    cfg, precision = resolve_subset_dtype(scorer, vit_dims(model), cfg, out)
    run = _Run(vit_dims(model), scorer, cfg, out, progress)
    if out is not None:
        _check_settings(out, _settings(cfg, info, data), run.rank, run.world)
    t0 = time.perf_counter()
    try:
        n_random = cfg.candidates if cfg.method == "random" else min(cfg.init, cfg.candidates)
        anchors = run.anchors()
        run.evaluate("anchor", list(anchors), anchors.__getitem__, cfg.subset, "anchors")
        run.evaluate("subset", range(n_random), run.sample, cfg.subset, "random")
        for g, start in enumerate(range(n_random, cfg.candidates, cfg.round_size)):
            kids = run.children(start, min(start + cfg.round_size, cfg.candidates), g)
            run.evaluate("subset", list(kids), kids.__getitem__, cfg.subset, f"evolve round {g}")
        top = run.promote(run.pool(below=cfg.candidates))
        run.evaluate("full", list(top), top.__getitem__, scorer.size, "full split")
    finally:
        run.log.close()
    table = build_table([run.records[("full", i)] for i in top], info, cfg, data,
                        {"evaluations_subset": len(run.stage("subset", below=cfg.candidates)),
                         "evaluations_anchor": len(run.stage("anchor")), "evaluations_full": len(top),
                         **({"subset_precision": precision} if precision else {})},
                        getattr(scorer, "settings", None))
    if out is not None and run.rank == 0:
        table.save(out / "table.json")
    _invocation(out, run, t0)
    return table


def budget_curve(model: torch.nn.Module, scorer: Scorer, out_dir: str | os.PathLike,
                 budgets: Sequence[float] = (0.5, 0.6, 0.7, 0.8), evaluations: Sequence[int] = (1000, 10_000),
                 window: int = 3, progress: bool = True, **overrides: Any) -> list[dict[str, Any]]:
    """Full-split scores of what a logged search picks at each budget from only its first E subset evaluations.

    For each (E, budget) the `topk` best (by rank_by) of each of the `window` MACs bins just under the budget are
    scored on the whole split (logged, so resumable) and the best by select_by is reported with its schedule.
    overrides (e.g. rank_by="agree", topk=1) replace the search's own settings for this selection only.
    """
    out = Path(out_dir)
    if not (out / "settings.json").exists():
        raise SearchError(f"{out} holds no search (settings.json missing); run tcl.search.search there first")
    cfg = SearchConfig(**{**json.loads((out / "settings.json").read_text())["config"], **overrides})
    run = _Run(vit_dims(model), scorer, cfg, out, progress)
    rows, w = [], cfg.bin_width
    try:
        for e in evaluations:
            subset = run.pool(below=e)
            for b in budgets:
                top = run.promote([r for r in subset if _under(r, run.full, w, b, window)])
                top.pop(-1)
                if not top:
                    raise BudgetError(f"no candidate among the first {e} lies within {window} bins under budget {b}")
                run.evaluate("full", list(top), top.__getitem__, scorer.size, f"E={e} budget={b}")
                best = min((run.records[("full", i)] for i in top),
                           key=lambda r: (sort_key(cfg.select_by, r["scores"][cfg.select_by]), r["id"]))
                rows.append({"method": cfg.method, "rank_by": cfg.rank_by, "select_by": cfg.select_by,
                             "evaluations": e, "budget": b, "id": best["id"],
                             "fraction": best["macs"] / run.full, **best["scores"], "schedule": best["schedule"]})
    finally:
        run.log.close()
    return rows


def selection_check(scorer: ReferenceScorer, out_dir: str | os.PathLike,
                    budgets: Sequence[float] = (0.5, 0.6, 0.7, 0.8), window: int = 12, splits: int = 1000,
                    seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Which whole-split score should pick the table entry: per budget and score (acc / kl / agree), the accuracy on
    the unseen half of the search split of the finalist picked on a random half (mean over `splits` halves), and the
    optimism of the picked entry's accuracy on the half it was picked on. Finalists: a logged search's full-stage
    records in the `window` MACs bins under each budget."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if not (out / "settings.json").exists():
        raise SearchError(f"{out} holds no search (settings.json missing); run tcl.search.search there first")
    w = json.loads((out / "settings.json").read_text())["config"]["bin_width"]
    full = macs(scorer.dims)
    fin = sorted((r for (st, i), r in read_log(out).items() if st == "full" and i != -1
                  and any(_under(r, full, w, b, window) for b in budgets)), key=lambda r: r["id"])
    if not fin:
        raise SearchError(f"no full-split finalists of {out} lie within {window} bins under {list(budgets)}; "
                          "pass a larger window")
    per = [scorer.per_image(Schedule.from_dict(r["schedule"]))
           for r in tqdm(fin, desc="finalists", disable=not progress)]
    vals = {k: torch.stack([p[k] for p in per]) for k in ("acc", "kl", "agree")}  # [finalists, images]
    macs_ = torch.tensor([r["macs"] for r in fin])
    halves = torch.stack([torch.randperm(scorer.size, generator=torch.Generator().manual_seed(seed * 100_003 + i))
                          < scorer.size // 2 for i in range(splits)]).float()  # [splits, images], 1 = picking half
    seen = {k: v @ halves.T / halves.sum(1) for k, v in vals.items()}  # [finalists, splits]
    unseen_acc = vals["acc"] @ (1 - halves).T / (1 - halves).sum(1)
    rows, cols = [], torch.arange(splits)
    for b in budgets:
        ok = (macs_ <= b * full).float().unsqueeze(1)
        if not ok.any():
            raise BudgetError(f"no finalist fits budget {b}")
        for score in ("acc", "kl", "agree"):
            pick = (sort_key(score, 1.0) * seen[score] + (1 - ok) * 1e9).argmin(0)  # best fitting finalist per split
            rows.append({"budget": b, "select_by": score, "finalists": int(ok.sum()),
                         "picked_half_acc": float(seen["acc"][pick, cols].mean()),
                         "unseen_half_acc": float(unseen_acc[pick, cols].mean()),
                         "optimism": float((seen["acc"][pick, cols] - unseen_acc[pick, cols]).mean())})
    return rows


def evaluations_to_match(rows: Sequence[dict[str, Any]], method: str = "evolve", reference: str = "random",
                         score: str = "acc") -> list[dict[str, Any]]:
    """Per budget: the fewest evaluations after which `method`'s pick scores at least `reference`'s pick with its most
    evaluations (budget_curve rows of both; None if it never does)."""
    out = []
    for b in sorted({r["budget"] for r in rows}):
        ref = max((r for r in rows if r["method"] == reference and r["budget"] == b), key=lambda r: r["evaluations"],
                  default=None)
        mine = sorted((r for r in rows if r["method"] == method and r["budget"] == b), key=lambda r: r["evaluations"])
        if ref is None or not mine:
            raise SearchError(f"need budget_curve rows of both {method!r} and {reference!r} at budget {b}")
        hit = next((r["evaluations"] for r in mine if not better(score, ref[score], r[score])), None)
        out.append({"budget": b, "reference": reference, "reference_evaluations": ref["evaluations"],
                    f"reference_{score}": ref[score], "method": method, "evaluations_to_match": hit,
                    f"best_{score}": max(mine, key=lambda r: -sort_key(score, r[score]))[score]})
    return out


# ---- command line ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> LookupTable:
    """Command-line entry `python -m tcl.search [--config C] [--flags]`: the same options as `tcl search`."""
    from .cli import search_command  # the CLI module imports this one; importing it here keeps that one-way at load

    return search_command(argv, prog="python -m tcl.search")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
