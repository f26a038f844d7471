"""Latency budgets: the measured cost of compressed models on one device setting, and a per-block cost model.

A block's cost is linear in features of its incoming token count n, kept count k and kept heads h (of H): layer norm
and residual n; qkv and proj n·h/H; attention scores n²·h/H, plus n²·h/H again when n is not a multiple of 16 (fused
attention is slower there on CPU); a per-head term h; a prune step (p < n: n, for the class-attention row) and a merge
step (m < p: (p - m)·m similarities); the MLP k. The model's cost is the sum over blocks plus a constant. Coefficients
are fit by non-negative least squares to whole-model timings of random schedules (each timed round-robin with the uncompressed
model and normalised by it, so machine drift cancels), and the error is reported on held-out schedules. A LatencyModel
records the device, threads, dtype and batch size it was measured with, and refuses others.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..utils import device_of, write_json
from .dims import ViTDims, vit_dims
from .schedule import Schedule

FORMAT = "tcl.latency_model"
FEATURES = ("tokens", "attn_n", "attn_n2", "attn_n2_not16", "attn_heads", "prune_on", "prune_n", "merge_on",
            "merge_pairs", "mlp_k")
DTYPES = {"float32": None, "bfloat16": "bf16", "float16": "fp16"}

__all__ = ["LatencyError", "LatencyModel", "dtype_of", "block_features", "features", "device_context", "measure", "fit",
           "calibrate", "random_schedules", "snap16", "FEATURES"]


def dtype_of(amp: str | None) -> str:
    """The dtype name a latency model records for a tcl amp setting (None / 'off', 'bf16', 'fp16')."""
    names = {v: k for k, v in DTYPES.items()} | {"off": "float32"}
    if amp not in names:
        raise LatencyError(f"amp must be None, 'off', 'bf16' or 'fp16', got {amp!r}")
    return names[amp]


class LatencyError(ValueError):
    """Raised for a latency model used on a device / batch size / dtype / model it was not measured for."""


def block_features(n: int, p: int, m: int, h: int, heads: int) -> list[float]:
    """FEATURES of one block: n incoming tokens, p after its prune, m after its merge, h of `heads` heads kept."""
    a = h / heads
    return [float(n), n * a, n * n * a, n * n * a * float(n % 16 != 0), float(h), float(p < n), n * float(p < n),
            float(m < p), float((p - m) * m), float(m)]


def features(dims: ViTDims, schedule: Schedule) -> np.ndarray:
    """[blocks, FEATURES] of a schedule on a model with these dims."""
    rows, n = [], dims.tokens
    for p, m, h in zip(schedule.prune, schedule.merge, schedule.kept_heads(dims.attn_heads)):
        rows.append(block_features(n, p, m, h, dims.attn_heads))
        n = m
    return np.asarray(rows, dtype=np.float64)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_context(device: torch.device | str, batch_size: int, dtype: str = "float32",
                   threads: int | None = None) -> dict[str, Any]:
    """What a measurement depends on: device type and name, CPU threads (CPU only), dtype and batch size."""
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise LatencyError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {"device": dev.type, "device_name": name, "dtype": dtype, "batch_size": int(batch_size),
            "threads": (threads if threads is not None else torch.get_num_threads()) if dev.type == "cpu" else None}


@dataclass
class LatencyModel:
    """Per-block cost model (ms per image) of one model on one device setting (`context`), with its fit error."""

    coef: list[float]  # per FEATURES, then the constant
    dims: dict[str, Any]
    context: dict[str, Any]
    baseline_ms: float  # measured ms per image of the uncompressed model
    error: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""

    @property
    def vit(self) -> ViTDims:
        """The dims of the model the cost model was measured on."""
        return ViTDims(**self.dims)

    def check(self, device: torch.device | str | None = None, batch_size: int | None = None, dtype: str | None = None,
              threads: int | None = None, model: torch.nn.Module | None = None) -> "LatencyModel":
        """Raise LatencyError unless each given setting is the one this model was measured for."""
        given: dict[str, Any] = {"batch_size": batch_size, "dtype": dtype, "threads": threads}
        if device is not None:
            dev = torch.device(device)
            given["device"] = dev.type
            if dev.type == self.context.get("device"):  # the same kind: then the same processor, and threads on CPU
                given["device_name"] = device_context(dev, 1)["device_name"]
                if dev.type == "cpu" and threads is None:
                    given["threads"] = torch.get_num_threads()
        for k in ("device", "device_name", "batch_size", "dtype", "threads"):
            v = given.get(k)
            if v is not None and self.context.get(k) != v:
                raise LatencyError(f"this latency model was measured with {k}={self.context.get(k)!r}, not {v!r} "
                                   f"(measured for {self.context}); measure one for this setting with "
                                   "tcl.compress.latency.calibrate(model, batch_size=..., dtype=...) on that device")
        if model is not None and self.dims != dataclasses.asdict(vit_dims(model)):
            raise LatencyError(f"this latency model was measured on a model with dims {self.dims}, not "
                               f"{dataclasses.asdict(vit_dims(model))}; calibrate one on this model")
        return self

    def block_ms(self, schedule: Schedule) -> list[float]:
        """Predicted ms per image of each block under the schedule."""
        return (features(self.vit, schedule.check(self.vit)) @ np.asarray(self.coef[:-1])).tolist()

    def predict(self, schedule: Schedule, **setting: Any) -> float:
        """Predicted ms per image under schedule (setting: device / batch_size / dtype / threads, checked)."""
        self.check(**setting)
        return float(sum(self.block_ms(schedule)) + self.coef[-1])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form."""
        return {"format": FORMAT, "features": list(FEATURES), "coef": self.coef, "dims": self.dims,
                "context": self.context, "baseline_ms": self.baseline_ms, "error": self.error,
                "model_name": self.model_name}

    @classmethod
    def from_dict(cls, d: Any) -> "LatencyModel":
        """Inverse of to_dict."""
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("features") != list(FEATURES):
            raise LatencyError(f"not a {FORMAT} with features {list(FEATURES)}; measure one with "
                               "tcl.compress.latency.calibrate")
        return cls(d["coef"], d["dims"], d["context"], d["baseline_ms"], d.get("error", {}), d.get("model_name", ""))

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        """Read a saved latency model."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"latency model {p} does not exist; measure one with tcl.compress.latency.calibrate")
        return cls.from_dict(json.loads(p.read_text()))


def snap16(dims: ViTDims, schedule: Schedule) -> Schedule:
    """The schedule with each kept count at or above 16 rounded down to a multiple of 16 (kept non-increasing and
    above the protected tokens): blocks then attend over multiples of 16 tokens."""
    prune, merge, n = [], [], dims.tokens
    for p, m in zip(schedule.prune, schedule.merge):
        p2 = min(n, p if p < 16 else p // 16 * 16)
        m2 = min(p2, m if m < 16 else m // 16 * 16)
        prune.append(max(p2, dims.min_tokens + 1) if p2 < n else p2)
        merge.append(max(min(m2, prune[-1]), dims.min_tokens + 1) if m2 < prune[-1] else prune[-1])
        n = merge[-1]
    return Schedule(prune, merge, {**schedule.meta, "snap16": True}, schedule.settings, schedule.heads,
                    schedule.head_order)


def random_schedules(dims: ViTDims, count: int, seed: int = 0, min_fraction: float = 0.3,
                     max_fraction: float = 1.0) -> list[Schedule]:
    """`count` random token / joint / heads-only schedules (tcl.search's sampler), a third of the token ones snapped
    to multiples of 16: the calibration and held-out sets."""
    from ..search.space import sample_schedule

    out = []
    for i in range(count):
        mode = ("none", "joint", "only")[i % 3]
        s = sample_schedule(dims, seed, i, min_fraction, max_fraction, 1.0, mode)
        out.append(snap16(dims, s) if (i // 3) % 3 == 2 and mode != "only" else s)
    return out


def _built(model: torch.nn.Module, s: Schedule, settings: Any) -> torch.nn.Module:
    from .patch import patch

    h = vit_dims(model).attn_heads
    s = s.with_heads(s.heads, [list(range(h))] * len(s))  # which heads: any h cost the same
    return patch(copy.deepcopy(model), s if settings is None else s.with_settings(settings))


@torch.inference_mode()
def measure(model: torch.nn.Module, schedules: Sequence[Schedule], batch_size: int = 256, dtype: str = "float32",
            runs: int = 5, warmup: int = 1, group: int = 8, progress: bool = False,
            **patch_kwargs: Any) -> list[dict[str, Any]]:
    """Measured ms per image of the model compressed by each schedule, on the model's device: groups of `group`
    schedules timed round-robin with the uncompressed model (CUDA synchronized), each normalised by its group's
    uncompressed time and rescaled by the median uncompressed time."""
    from tqdm.auto import tqdm

    from ..evaluate import round_robin
    from .settings import PatchSettings

    if dtype not in DTYPES:
        raise LatencyError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    settings = PatchSettings.from_dict(patch_kwargs) if patch_kwargs else None
    x = torch.randn(batch_size, *model.pretrained_cfg["input_size"], device=device_of(model))  # type: ignore[index]
    raw: list[tuple[float, float]] = []
    for g in tqdm(range(0, len(schedules), group), desc="latency", disable=not progress, leave=False):
        part = schedules[g:g + group]
        models = {"full": model, **{str(i): _built(model, s, settings) for i, s in enumerate(part)}}
        med = round_robin(models, x, runs, warmup, DTYPES[dtype])
        raw += [(med[str(i)], med["full"]) for i in range(len(part))]
        del models
    base = statistics.median(b for _, b in raw)
    return [{"schedule": s.to_dict(), "ms": 1e3 * t / b * base / batch_size, "group_full_ms": 1e3 * b / batch_size,
             "full_ms": 1e3 * base / batch_size} for s, (t, b) in zip(schedules, raw)]


def fit(dims: ViTDims, schedules: Sequence[Schedule], ms: Sequence[float]) -> list[float]:
    """Non-negative least-squares coefficients (FEATURES, then the constant) of summed block features to measured ms
    per image (every feature is a cost: none may lower the prediction)."""
    from scipy.optimize import nnls

    X = np.stack([np.append(features(dims, s).sum(0), 1.0) for s in schedules])
    y = np.asarray(ms, dtype=np.float64)
    scale = np.abs(X).max(0)
    scale[scale == 0] = 1.0
    return (nnls(X / scale, y)[0] / scale).tolist()


def calibrate(model: torch.nn.Module, batch_size: int = 256, dtype: str = "float32", schedules: int = 60,
              held_out: int = 20, seed: int = 0, runs: int = 5, min_fraction: float = 0.3, progress: bool = False,
              **patch_kwargs: Any) -> LatencyModel:
    """Measure `schedules` random schedules plus `held_out` others on the model's device, fit the cost model on the
    first and report its error (median / max relative) on the held-out ones."""
    d = vit_dims(model)
    cand = random_schedules(d, schedules + held_out, seed, min_fraction)
    order = np.random.default_rng(seed).permutation(len(cand)).tolist()
    cand = [cand[i] for i in order]
    recs = measure(model, cand, batch_size, dtype, runs, progress=progress, **patch_kwargs)
    train, test = cand[:schedules], cand[schedules:]
    coef = fit(d, train, [r["ms"] for r in recs[:schedules]])
    lat = LatencyModel(coef, dataclasses.asdict(d), device_context(device_of(model), batch_size, dtype),
                       statistics.median(r["full_ms"] for r in recs),
                       model_name=(getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__))
    rel = [abs(lat.predict(s) - r["ms"]) / r["ms"] for s, r in zip(test, recs[schedules:])]
    fit_rel = [abs(lat.predict(s) - r["ms"]) / r["ms"] for s, r in zip(train, recs[:schedules])]
    lat.error = {"held_out": len(test), "median_rel": float(np.median(rel)) if rel else None,
                 "max_rel": float(np.max(rel)) if rel else None, "fit_median_rel": float(np.median(fit_rel)),
                 "runs": runs, "measurements": [{"schedule": r["schedule"], "ms": r["ms"], "held_out": i >= schedules}
                                                for i, r in enumerate(recs)]}
    if os.path.exists("/proc/loadavg"):
        lat.error["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return lat
