"""The search run: random and evolutionary candidates, successive evaluation, resumable JSONL log, torch.distributed.

Stage "subset": every candidate is scored on the first `subset` images of the held-out split (default score: KL to
the uncompressed model's cached predictions); stage "anchor" scores the baselines' schedules (ToMe, EViT) the same way.
Stage "full": the `topk` best per MACs bin are re-scored on the whole split, and the best per bin (by `select_by`)
forms the LookupTable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from ..compress.schedule import Schedule, ViTDims, same_dims, vit_dims
from ..compress.table import LookupTable, build_table, mac_bin, model_info, read_log, sort_key
from ..utils import write_json
from .scorer import Scorer, SearchError
from .space import _macs, anchor_schedules, mutate_schedule, sample_schedule

__all__ = ["SearchConfig", "search", "init_distributed", "resolve_subset_dtype"]

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
    select_by: str = "kl"  # full-split score that picks each bin's entry (acc is optimistic on the split it picks on)
    init: int = 500  # evolve: random candidates before the first round
    round_size: int = 100  # evolve: children per round (a sync point when distributed)
    sigma: float = 0.15  # evolve: std of the rate perturbation
    elite: int = 3  # evolve: parents drawn from the `elite` Pareto-front candidates nearest the target MACs
    anchors: bool = True  # also score the ToMe / EViT schedules of the range (stage "anchor", ids -2, -3, ...)
    subset_dtype: str = "float32"  # "bfloat16": autocast the subset and anchor stages (the whole split stays float32);
    #   "auto": bfloat16 only where the device has native bf16 and a timing of a few subset evaluations finds it faster
    targets: list[float] | None = None  # evolve: spend the rounds on the window [b - bin_width, b) below each budget b
    #   (fractions of full MACs) and re-score on the whole split only those windows (topk per window)
    heads: Literal["none", "joint", "only"] = "none"  # also sample kept heads per block ('joint': with the token
    #   rates under one MACs budget; 'only': heads alone); score with tcl.search.joint_scorer. Evolve children may
    #   change one block's head count by one

    def __post_init__(self) -> None:
        if self.method not in ("random", "evolve"):
            raise SearchError(f"method must be 'random' or 'evolve', got {self.method!r}")
        if not 0 < self.min_fraction < self.max_fraction <= 1:
            raise SearchError(f"need 0 < min_fraction < max_fraction <= 1, got {self.min_fraction}, {self.max_fraction}")
        if self.subset_dtype not in ("float32", "bfloat16", "auto"):
            raise SearchError(f"subset_dtype must be 'float32', 'bfloat16' or 'auto', got {self.subset_dtype!r}")
        if self.heads not in ("none", "joint", "only"):
            raise SearchError(f"heads must be 'none', 'joint' or 'only', got {self.heads!r}")
        if self.heads == "only" and self.method != "random":
            raise SearchError("heads='only' samples head counts alone: use method='random'")
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

    from ..utils import device_of, native_bf16, synchronize

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
            rec = {"stage": stage, "id": i, "n": n, "macs": _macs(self.d, s.merge, s.heads), "kind": s.meta.get("kind"),
                   "schedule": s.counts(), "scores": scores}
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
        on = c.anchors and c.heads != "only"  # token-only anchors lie outside a heads-only space
        return {-2 - k: s for k, s in enumerate(anchor_schedules(self.d, c.min_fraction, c.max_fraction))} if on else {}

    def sample(self, i: int) -> Schedule:
        c = self.cfg
        return sample_schedule(self.d, c.seed, i, c.min_fraction, c.max_fraction, c.max_merge, c.heads)

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
        seen = {Schedule.from_dict(r["schedule"]) for r in pop}
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
                                        other, c.heads == "joint")
                if child not in seen:
                    break
            seen.add(child)
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
        return {-1: full, **{r["id"]: Schedule(r["schedule"]["prune"], r["schedule"]["merge"], {"kind": r.get("kind")},
                                               heads=r["schedule"].get("heads"))
                             for r in sorted(keep, key=lambda r: r["id"])}}


def _settings(cfg: SearchConfig, model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "candidates"}, "model": model, "data": data}


def _ranking(rec: Any) -> Any:
    return (rec.get("method"), rec.get("order")) if isinstance(rec, dict) and "order" in rec else rec


def _check_settings(out_dir: Path, settings: dict[str, Any], rank: int, world: int) -> None:
    path = out_dir / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        for part in ("config", "model", "data"):
            for k in sorted(set(old.get(part, {})) | set(settings[part])):
                if (part, k) == ("model", "dims") and same_dims(old["model"].get("dims"), ViTDims(**settings[part][k])):
                    continue  # a search written before ViTDims gained a field resumes
                if (part, k) == ("data", "head_importance") and _ranking(old["data"].get(k)) == _ranking(settings[part][k]):
                    continue  # the same head ranking (scores may differ in rounding, e.g. with other thread counts)
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
    if cfg.heads != "none" and getattr(scorer, "head_order", None) is None:
        raise SearchError(f"heads={cfg.heads!r} needs a scorer that ranks heads: tcl.search.joint_scorer(model, split, "
                          "tcl.compress.joint.head_importance(model, split))")
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
