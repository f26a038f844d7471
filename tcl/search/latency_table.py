"""Lookup tables binned by predicted latency, from a finished search log and a tcl.compress.latency model."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..compress.latency import LatencyModel, snap16
from ..compress.schedule import Schedule, macs, vit_dims
from ..compress.table import LookupTable, TableError, model_info, read_log, sort_key
from .scorer import Scorer, SearchError

__all__ = ["latency_table", "macs_budget_at"]


def _config(folder: Path) -> dict[str, Any]:
    if not (folder / "settings.json").is_file():
        raise TableError(f"{folder} holds no search (settings.json missing); run tcl.search.search there first")
    return json.loads((folder / "settings.json").read_text())["config"]


def latency_table(model: torch.nn.Module, scorer: Scorer, search_dir: str | os.PathLike, latency: LatencyModel,
                  bin_width: float = 0.02, topk: int = 1, snap: bool = True,
                  within: tuple[float, float] | None = None, progress: bool = False) -> LookupTable:
    """A LookupTable binned by predicted latency (bins of bin_width x the uncompressed latency) with the latency model
    attached: the search's subset candidates (plus, with snap, the multiple-of-16 variant of each bin's best, scored
    on the same subset) ranked per bin by its rank_by, the topk per bin scored on the whole split (logged full-split
    scores reused), the best per bin by select_by. within=(lo, hi): only candidates predicted in [lo, hi) x the
    uncompressed latency."""
    from tqdm.auto import tqdm

    folder = Path(search_dir)
    cfg = _config(folder)
    latency.check(model=model)
    d, logged, full_macs = vit_dims(model), read_log(folder), macs(model)
    done = {json.dumps(r["schedule"], sort_keys=True): r for (st, _), r in logged.items() if st == "full"}
    base = latency.predict(Schedule.full(model))
    lo, hi = within if within is not None else (0.0, math.inf)
    pool = [{**r, "latency_ms": latency.predict(Schedule.from_dict(r["schedule"]))}
            for (st, _), r in logged.items() if st in ("subset", "anchor")]
    pool = [r for r in pool if lo <= r["latency_ms"] / base < hi and not math.isnan(r["scores"][cfg["rank_by"]])]

    def by_bin(recs: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for r in recs:
            out.setdefault(int(r["latency_ms"] / base / bin_width + 1e-9), []).append(r)
        return {b: sorted(rs, key=lambda r: (sort_key(cfg["rank_by"], r["scores"][cfg["rank_by"]]), r["id"]))
                for b, rs in out.items()}

    if snap:
        seen, next_id = {json.dumps(r["schedule"], sort_keys=True) for r in pool}, max([r["id"] for r in pool] + [0]) + 1
        for rs in tqdm(list(by_bin(pool).values()), desc="snap16", disable=not progress, leave=False):
            for r in rs[:topk]:
                s = snap16(d, Schedule.from_dict(r["schedule"]))
                key = json.dumps(s.counts(), sort_keys=True)
                if key in seen or not lo <= latency.predict(s) / base < hi:
                    continue
                seen.add(key)
                pool.append({"stage": "snap16", "id": next_id, "kind": "snap16", "macs": macs(model, s),
                             "schedule": s.counts(), "scores": scorer(s, cfg["subset"]), "latency_ms": latency.predict(s)})
                next_id += 1
    entries = []
    for _, rs in tqdm(sorted(by_bin(pool).items()), desc="latency bins", disable=not progress, leave=False):
        finals = []
        for r in rs[:topk]:
            key = json.dumps(r["schedule"], sort_keys=True)
            finals.append({**r, "scores": done[key]["scores"] if key in done else scorer(Schedule.from_dict(r["schedule"]))})
        finals = [r for r in finals if not math.isnan(r["scores"][cfg["select_by"]])] or finals
        best = min(finals, key=lambda r: (sort_key(cfg["select_by"], r["scores"][cfg["select_by"]]), r["id"]))
        entries.append({"id": best["id"], "kind": best.get("kind"), "macs": best["macs"],
                        "fraction": best["macs"] / full_macs, "scores": best["scores"], "schedule": best["schedule"],
                        "latency_ms": best["latency_ms"]})
    search = {**cfg, "latency_bin_width": bin_width, "latency_topk": topk, "snap16": snap, "from": str(folder)}
    return LookupTable(entries, model_info(model), dict(getattr(scorer, "info", {})), search, cfg["select_by"],
                       getattr(scorer, "settings", None), latency.to_dict())


def macs_budget_at(model: torch.nn.Module, search_dir: str | os.PathLike, latency: LatencyModel, latency_ms: float,
                   bin_width: float = 0.02) -> float:
    """The MACs budget (a multiple of bin_width, as a fraction of full MACs) whose pick in a search log (the best
    subset candidate by rank_by in the bin just under it) is predicted nearest latency_ms."""
    folder = Path(search_dir)
    rank, full = _config(folder)["rank_by"], macs(model)
    best: dict[int, dict[str, Any]] = {}
    for (st, _), r in read_log(folder).items():
        if st in ("subset", "anchor") and not math.isnan(r["scores"][rank]):
            b = int(r["macs"] / full / bin_width + 1e-9) + 1  # the budget b * bin_width this record fits just under
            if b not in best or sort_key(rank, r["scores"][rank]) < sort_key(rank, best[b]["scores"][rank]):
                best[b] = r
    if not best:
        raise SearchError(f"{folder} logged no subset candidates yet")
    b = min(best, key=lambda k: abs(latency.predict(Schedule.from_dict(best[k]["schedule"])) - latency_ms))
    return round(b * bin_width, 6)
