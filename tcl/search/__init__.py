"""Compression-rate search: search space, scorer, search run (resumable log, torch.distributed), replay analyses.

Run `python -m tcl.search --help` (the same options as `tcl search`).
"""
from __future__ import annotations

from typing import Sequence

from ..compress.table import BudgetError, LookupTable, TableError, build_table, read_log
from .analysis import budget_curve, evaluations_to_match, monotone_check, selection_check
from .latency_table import latency_table, macs_budget_at
from .run import SearchConfig, init_distributed, resolve_subset_dtype, search
from .scorer import Apply, ReferenceScorer, Scorer, SearchError, joint_scorer, patched
from .space import anchor_schedules, fit_heads, fit_rates, mutate_schedule, rates_of, sample_schedule

__all__ = ["SearchConfig", "SearchError", "Scorer", "ReferenceScorer", "Apply", "patched", "LookupTable", "TableError",
           "BudgetError", "search", "joint_scorer", "fit_heads", "latency_table", "macs_budget_at", "sample_schedule", "anchor_schedules", "evaluations_to_match", "selection_check",
           "mutate_schedule", "fit_rates", "rates_of", "build_table", "budget_curve", "read_log", "init_distributed",
           "resolve_subset_dtype", "monotone_check", "main"]


def main(argv: Sequence[str] | None = None) -> LookupTable:
    """Command-line entry `python -m tcl.search [--config C] [--flags]`: the same options as `tcl search`."""
    from ..cli import search_command  # the CLI imports this package; importing it here keeps that one-way at load

    return search_command(argv, prog="python -m tcl.search")
