"""Replay analyses of a finished search log: budget curves, selection optimism, evaluations to match."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..compress.schedule import Schedule, macs, same_dims, vit_dims
from ..compress.table import BudgetError, better, mac_bin, read_log, sort_key, weights_sha256
from .run import SearchConfig, _Run
from ..utils import autocast
from .scorer import ReferenceScorer, Scorer, SearchError
from .space import fit_rates

__all__ = ["budget_curve", "selection_check", "evaluations_to_match", "monotone_check"]


def _logged_settings(out_dir: str | os.PathLike, model: torch.nn.Module) -> dict[str, Any]:
    """The settings.json of the search logged in out_dir, checked to be made for model's architecture (SearchError
    otherwise; other weights of the same architecture: a warning, their logged scores may not carry over)."""
    path = Path(out_dir) / "settings.json"
    if not path.exists():
        raise SearchError(f"{Path(out_dir)} holds no search (settings.json missing); run tcl.search.search there first")
    settings = json.loads(path.read_text())
    rec = settings.get("model", {})
    if "dims" in rec and not same_dims(rec["dims"], vit_dims(model)):
        raise SearchError(f"{Path(out_dir)} holds a search made for {rec.get('name')} with dims {rec['dims']}, but the "
                          f"model has dims {dataclasses.asdict(vit_dims(model))}; replay a search made for this model "
                          "(run the search with the same model first)")
    if rec.get("weights_sha256") not in (None, weights_sha256(model)):
        warnings.warn(f"the model's weights differ from the ones the search in {Path(out_dir)} was made with; its logged "
                      "scores may not carry over (search again for these weights)", stacklevel=3)
    return settings


def _under(rec: dict[str, Any], full: int, width: float, budget: float, window: int) -> bool:
    """Whether a record lies in one of the `window` MACs bins just under budget."""
    return round(budget / width) - window <= mac_bin(rec, full, width) < round(budget / width)


def budget_curve(model: torch.nn.Module, scorer: Scorer, out_dir: str | os.PathLike,
                 budgets: Sequence[float] = (0.5, 0.6, 0.7, 0.8), evaluations: Sequence[int] = (1000, 10_000),
                 window: int = 3, progress: bool = True, **overrides: Any) -> list[dict[str, Any]]:
    """Full-split scores of what a logged search picks at each budget from only its first E subset evaluations.

    For each (E, budget) the `topk` best (by rank_by) of each of the `window` MACs bins just under the budget are
    scored on the whole split (logged, so resumable) and the best by select_by is reported with its schedule.
    overrides (e.g. rank_by="agree", topk=1) replace the search's own settings for this selection only.
    """
    out = Path(out_dir)
    cfg = SearchConfig(**{**_logged_settings(out, model)["config"], **overrides})
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
    w = _logged_settings(out, scorer.model)["config"]["bin_width"]
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


def monotone_check(model: torch.nn.Module, scorer: ReferenceScorer, budgets: Sequence[float], samples: int,
                   subset_sizes: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Per budget, `samples` random per-block rate draws fitted to it, each scored sorted (monotone) and as drawn
    (unconstrained): whole-split scores and subset scores in float32 and under bfloat16 autocast (full_*, n<N>_*,
    n<N>_bf16_*), so the search space's monotone constraint and its cheap subset score can be checked."""
    d, full = vit_dims(model), macs(model)
    rng = np.random.default_rng(seed)
    rows = []
    for f in budgets:
        for i in range(samples):
            p, m = rng.uniform(size=d.depth) * rng.uniform(), rng.uniform(size=d.depth) * rng.uniform()
            for name, (pp, mm) in {"monotone": (np.sort(p), np.sort(m)), "unconstrained": (p, m)}.items():
                s = fit_rates(d, np.stack([pp, mm], 1).reshape(-1).tolist(), f * full)
                row = {"constraint": name, "budget": f"{f:.0%}", "sample": i, "fraction": macs(model, s) / full}
                row.update({f"full_{k}": v for k, v in scorer(s).items()})
                row.update({f"n{n}_{k}": v for n in subset_sizes for k, v in scorer(s, n).items()})
                with autocast(scorer.device, "bf16"):  # the subset stage's SearchConfig(subset_dtype="bfloat16")
                    row.update({f"n{n}_bf16_{k}": v for n in subset_sizes for k, v in scorer(s, n).items()})
                rows.append(row)
    return rows
