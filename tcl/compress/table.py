"""LookupTable: FLOPs budget -> searched schedule, saved as versioned JSON and validated on load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .joint import head_order
from .schedule import Schedule, ScheduleError, macs, same_dims, vit_dims
from .settings import PatchSettings, SettingsError
from ..utils import write_json

TABLE_FORMAT = "tcl.lookup_table"
TABLE_VERSION = 2  # 2 added "settings"; a version-1 table's settings are its data["patch"] (PatchSettings.from_v1)
LOWER_IS_BETTER = frozenset({"kl"})  # every other score (acc, agree) is higher-is-better


class TableError(ValueError):
    """Raised for a malformed lookup table, or one made for a different model."""


class BudgetError(ValueError):
    """Raised when no schedule in a lookup table fits the requested budget."""


def better(score: str, a: float, b: float) -> bool:
    """Whether score value a is strictly better than b (kl: lower; acc/agree: higher; NaN is worse than anything)."""
    return sort_key(score, a) < sort_key(score, b)


def sort_key(score: str, value: float) -> float:
    """A key that sorts best-first for the named score (NaN, from a schedule whose forward is not finite, last)."""
    if math.isnan(value):
        return math.inf
    return value if score in LOWER_IS_BETTER else -value


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state_dict (names, shapes, float32 bytes): identifies the weights a table was searched on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """What a table records about its model: name, dims, full MACs, weights hash."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or type(model).__name__
    return {"name": name, "dims": dataclasses.asdict(vit_dims(model)), "macs": macs(model),
            "weights_sha256": weights_sha256(model)}


@dataclass
class LookupTable:
    """Best searched schedule per MACs level; `select(budget)` returns the best one that fits, carrying the patch
    settings the table was searched with (None: none recorded)."""

    entries: list[dict[str, Any]]  # {"macs", "fraction", "schedule": Schedule.to_dict(), "scores", "id"}, by macs
    model: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    score: str = "acc"
    settings: PatchSettings | None = None
    latency: dict[str, Any] | None = None  # a tcl.compress.latency.LatencyModel's dict; entries then carry "latency_ms"

    def __post_init__(self) -> None:
        if not self.entries:
            raise TableError("a lookup table needs at least one entry; run a search that evaluates some candidates")
        for e in self.entries:
            if not {"macs", "schedule", "scores"} <= e.keys() or self.score not in e["scores"]:
                raise TableError(f"table entry {str(e)[:120]} lacks macs/schedule/scores[{self.score!r}]; "
                                 "re-create the table with tcl.search")
        self.entries = sorted(self.entries, key=lambda e: (e["macs"], e.get("id", 0)))

    # ---- budgets --------------------------------------------------------------------------------------------
    @property
    def full_macs(self) -> int:
        """MACs per image of the uncompressed model the table was searched on."""
        return int(self.model["macs"])

    @property
    def patch_kwargs(self) -> dict[str, Any]:
        """The tcl.patch keyword arguments of the table's settings (select() already carries them)."""
        return {} if self.settings is None else self.settings.kwargs()

    def budget_macs(self, budget: float | None = None, *, fraction: float | None = None,
                    gmacs: float | None = None) -> int:
        """A budget in MACs: positional x <= 1 is a fraction of full MACs, x > 1 is GMACs; or say fraction=/gmacs=."""
        given = [v for v in (budget, fraction, gmacs) if v is not None]
        if len(given) != 1:
            raise BudgetError("give exactly one budget: select(0.6), select(fraction=0.6) or select(gmacs=2.9)")
        if budget is not None:
            fraction, gmacs = (budget, None) if budget <= 1 else (None, budget)
        value = fraction if fraction is not None else gmacs
        if value is None or not value > 0:
            raise BudgetError(f"budget must be positive, got {value}")
        return int(fraction * self.full_macs) if fraction is not None else int(gmacs * 1e9)  # type: ignore[operator]

    def with_latency(self, latency: Any) -> "LookupTable":
        """This table with a tcl.compress.latency.LatencyModel attached: each entry gets its predicted "latency_ms"."""
        entries = [{**e, "latency_ms": latency.predict(Schedule.from_dict(e["schedule"]))} for e in self.entries]
        return dataclasses.replace(self, entries=entries, latency=latency.to_dict())

    def _by_latency(self, latency_ms: float, setting: dict[str, Any]) -> dict[str, Any]:
        from .latency import LatencyModel

        if self.latency is None:
            raise BudgetError("this table has no latency model; attach one with table.with_latency("
                              "tcl.compress.latency.calibrate(model, batch_size=..., dtype=...))")
        LatencyModel.from_dict(self.latency).check(**setting)
        if not latency_ms > 0:
            raise BudgetError(f"latency_ms must be positive, got {latency_ms}")
        fits = [e for e in self.entries if e["latency_ms"] <= latency_ms]
        if not fits:
            raise BudgetError(f"no schedule in the table is predicted within {latency_ms:.4g} ms per image; the "
                              f"fastest is {min(e['latency_ms'] for e in self.entries):.4g} ms: pass at least that")
        return min(fits, key=lambda e: (sort_key(self.score, e["scores"][self.score]), e["latency_ms"]))

    def entry(self, budget: float | None = None, *, fraction: float | None = None, gmacs: float | None = None,
              latency_ms: float | None = None, **setting: Any) -> dict[str, Any]:
        """The best-scoring entry whose MACs fit the budget (see budget_macs), or whose predicted latency fits
        latency_ms (ms per image; setting: device / batch_size / dtype / threads, refused unless the attached latency
        model was measured for them); raises BudgetError if none fits."""
        if latency_ms is not None:
            if budget is not None or fraction is not None or gmacs is not None:
                raise BudgetError("give a MACs budget or latency_ms, not both")
            return self._by_latency(latency_ms, setting)
        if setting:
            raise BudgetError(f"{sorted(setting)} apply only with latency_ms")
        limit = self.budget_macs(budget, fraction=fraction, gmacs=gmacs)
        fits = [e for e in self.entries if e["macs"] <= limit]
        if not fits:
            cheapest = self.entries[0]["macs"]
            raise BudgetError(
                f"no schedule in the table fits {limit / 1e9:.4g} GMACs ({limit / self.full_macs:.1%} of full); the "
                f"cheapest available is {cheapest / 1e9:.4g} GMACs = fraction {cheapest / self.full_macs:.3f}. Pass a "
                "budget at least that large, or search again with a lower min_fraction")
        return min(fits, key=lambda e: (sort_key(self.score, e["scores"][self.score]), e["macs"]))

    def select(self, budget: float | None = None, *, fraction: float | None = None, gmacs: float | None = None,
               latency_ms: float | None = None, **setting: Any) -> Schedule:
        """The best schedule within budget: select(0.6) = 60% of full MACs, select(gmacs=2.9), or
        select(latency_ms=0.2, batch_size=256) by the attached latency model; use with tcl.patch. It carries the
        table's patch settings and, when it keeps fewer heads, the head ranking its search recorded."""
        e = self.entry(budget, fraction=fraction, gmacs=gmacs, latency_ms=latency_ms, **setting)
        s = Schedule.from_dict(e["schedule"])
        rec = self.data.get("head_importance")
        order = s.head_order if s.heads is None or rec is None else head_order(rec["scores"])
        return Schedule(s.prune, s.merge, {**s.meta, "kind": e.get("kind"), "macs": e["macs"], "scores": e["scores"]},
                        self.settings, s.heads, order)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per entry (macs, fraction, scores, prune, merge, heads): ready for pandas.DataFrame."""
        return [{"id": e.get("id"), "kind": e.get("kind"), "macs": e["macs"], "fraction": e["macs"] / self.full_macs,
                 **e["scores"], "prune": e["schedule"]["prune"], "merge": e["schedule"]["merge"],
                 "heads": e["schedule"].get("heads"), **({"latency_ms": e["latency_ms"]} if "latency_ms" in e else {})}
                for e in self.entries]

    @classmethod
    def combine(cls, tables: Sequence["LookupTable"]) -> "LookupTable":
        """One table from searches of the same model, data and patch settings: per MACs bin the best entry by score."""
        if not tables:
            raise TableError("combine needs at least one table")
        first = tables[0]
        for t in tables[1:]:
            for what, a, b in (("model", t.model, first.model), ("data", t.data, first.data),
                               ("score", t.score, first.score), ("settings", t.settings, first.settings),
                               ("bin_width", t.search.get("bin_width"), first.search.get("bin_width"))):
                if a != b:
                    raise TableError(f"cannot combine tables whose {what} differs ({str(a)[:80]} vs {str(b)[:80]}); "
                                     "combine only searches of the same model, data, patch settings and score")
        width = first.search.get("bin_width", 0.01)
        best = best_per_bin([{**e, "source": k} for k, t in enumerate(tables) for e in t.entries], first.full_macs,
                            width, first.score)
        return cls(best, first.model, first.data, {"bin_width": width, "combined": [t.search for t in tables]},
                   first.score, first.settings)

    # ---- validation / io ------------------------------------------------------------------------------------
    def check(self, model: torch.nn.Module) -> "LookupTable":
        """Raise TableError unless the table was made for this model's architecture (warn if only the weights differ)."""
        dims = dataclasses.asdict(vit_dims(model))
        if not same_dims(self.model.get("dims"), vit_dims(model)) or self.model.get("macs") != macs(model):
            raise TableError(f"this table was searched for {self.model.get('name')} with dims {self.model.get('dims')}, "
                             f"but the model has dims {dims}; load the table made for this model or run a new search")
        sha = self.model.get("weights_sha256")
        if sha is not None and sha != weights_sha256(model):
            warnings.warn("the model's weights differ from the ones this table was searched on; the schedules fit, "
                          "but their scores may not carry over (search again for these weights)", stacklevel=2)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-able form."""
        d = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "model": self.model, "data": self.data,
             "search": self.search, "score": self.score,
             "settings": None if self.settings is None else self.settings.to_dict(), "entries": self.entries}
        return d if self.latency is None else {**d, "latency": self.latency}

    @classmethod
    def from_dict(cls, d: Any, model: torch.nn.Module | None = None) -> "LookupTable":
        """Inverse of to_dict; validates format, version, entries (and the model when given). Version 1 is upgraded:
        its settings are its data["patch"] (tcl.patch kwargs, read by PatchSettings.from_v1), or none without it."""
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            raise TableError(f"not a tcl lookup table (expected format {TABLE_FORMAT!r}); write tables with LookupTable.save")
        if d.get("version") not in (1, TABLE_VERSION):
            raise TableError(f"lookup table version {d.get('version')!r} is not supported (this tcl reads versions 1 "
                             f"and {TABLE_VERSION}); re-create the table with this tcl version")
        missing = {"model", "entries", "score"} - d.keys()
        if missing or not isinstance(d["entries"], list) or not isinstance(d["model"], dict) or "macs" not in d["model"]:
            raise TableError(f"lookup table is missing {sorted(missing) or 'model.macs / an entries list'}; "
                             "re-create it with tcl.search")
        try:
            for e in d["entries"]:
                Schedule.from_dict(e["schedule"])
        except (ScheduleError, KeyError, TypeError) as err:
            raise TableError(f"lookup table holds a malformed schedule ({err}); re-create it with tcl.search") from err
        data = d.get("data") or {}
        try:
            if d["version"] == 1:
                settings = PatchSettings.from_v1(data["patch"]) if "patch" in data else None
            else:
                settings = None if d.get("settings") is None else PatchSettings.from_dict(d["settings"])
        except SettingsError as err:
            raise TableError(f"lookup table holds malformed patch settings ({err}); re-create it with tcl.search") from err
        table = cls(entries=d["entries"], model=d["model"], data=data, search=d.get("search", {}), score=d["score"],
                    settings=settings, latency=d.get("latency"))
        return table.check(model) if model is not None else table

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (temp file + os.replace)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> "LookupTable":
        """Read and validate a table; with model, also check it was made for that model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"lookup table {path} does not exist; run `python -m tcl.search` to create one")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TableError(f"lookup table {path} is not valid JSON ({err}); re-create it with tcl.search") from err
        return cls.from_dict(d, model)

    @classmethod
    def from_diffrate(cls, source: str | os.PathLike | dict[str, Any], model: torch.nn.Module,
                      key: str) -> "LookupTable":
        """DiffRate's published schedules (its compression_rate.json: model key -> budget -> prune_kept_num /
        merge_kept_num lists as strings) for `model` as a table carrying merge='diffrate'; counts become DiffRate's
        effective ones (tokens after each step: min of incoming, prune and merge); entries rank by published GMACs."""
        if isinstance(source, dict):
            published = source
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; pass DiffRate's compression_rate.json or its dict")
            published = json.loads(path.read_text())
        if key not in published:
            raise KeyError(f"{key!r} is not in the DiffRate schedules; choose one of {sorted(published)}")
        d, entries = vit_dims(model), []
        for i, (label, lists) in enumerate(published[key].items()):
            try:
                prune, merge = (json.loads(lists[k]) for k in ("prune_kept_num", "merge_kept_num"))
                n, eff_p, eff_m = d.tokens, [], []
                for p, m in zip(prune, merge, strict=True):
                    eff_p.append(min(n, int(p)))
                    n = min(eff_p[-1], int(m))
                    eff_m.append(n)
                s = Schedule(eff_p, eff_m, {"kind": "diffrate", "label": label}).check(d)
            except (KeyError, TypeError, ValueError) as err:
                raise TableError(f"DiffRate entry {key}/{label} is malformed or does not fit the model ({err}); pass "
                                 "the compression_rate.json entry made for this architecture") from err
            entries.append({"id": i, "kind": "diffrate", "label": label, "macs": macs(model, s),
                            "fraction": macs(model, s) / macs(model), "scores": {"gmacs": float(label)},
                            "schedule": s.to_dict()})
        data = {"source": "DiffRate compression_rate.json", "key": key}
        return cls(entries, model_info(model), data, {}, "gmacs", PatchSettings(merge="diffrate"))


# ---- from search logs to tables -------------------------------------------------------------------------------
def mac_bin(rec: dict[str, Any], full: int, width: float) -> int:
    """Index of the MACs bin (width = fraction of full MACs) a log record falls in."""
    return int(rec["macs"] / full / width + 1e-9)


def read_log(out_dir: str | os.PathLike) -> dict[tuple[str, int], dict[str, Any]]:
    """All records of a search folder's log shards (log.*.jsonl), keyed by (stage, id); a truncated last line is skipped."""
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("log.*.jsonl")):
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                if i == len(lines) - 1:  # unterminated last line: the writer was killed mid-line
                    continue
                raise TableError(f"{path}:{i + 1} is corrupt ({err}); delete that line or start a new out dir") from err
            records.setdefault((rec["stage"], rec["id"]), rec)
    return records


def best_per_bin(records: Sequence[dict[str, Any]], full: int, width: float, score: str) -> list[dict[str, Any]]:
    """Per MACs bin the record (log record or table entry) with the best `score`; the first one wins ties."""
    best: dict[int, dict[str, Any]] = {}
    for r in records:
        b = mac_bin(r, full, width)
        if b not in best or better(score, r["scores"][score], best[b]["scores"][score]):
            best[b] = r
    return list(best.values())


def build_table(records: Sequence[dict[str, Any]], model: dict[str, Any], cfg: Any,
                data: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                settings: PatchSettings | None = None) -> LookupTable:
    """The LookupTable of full-split records: the best per MACs bin (cfg.bin_width) by cfg.select_by, carrying the
    patch settings they were scored with."""
    finite = [r for r in records if not math.isnan(r["scores"][cfg.select_by])]  # NaN: a non-finite forward
    best = best_per_bin(sorted(finite, key=lambda r: r["id"]), model["macs"], cfg.bin_width, cfg.select_by)
    entries = [{"id": r["id"], "kind": r.get("kind"), "macs": r["macs"], "fraction": r["macs"] / model["macs"],
                "scores": r["scores"], "schedule": r["schedule"]} for r in best]
    return LookupTable(entries, model, dict(data or {}), {**dataclasses.asdict(cfg), **(extra or {})}, cfg.select_by,
                       settings)
