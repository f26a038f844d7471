"""Measurement: accuracy, agreement, throughput, and MACs (analytic, cross-checked with FlopCounterMode)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from .data import check_input, loader
from .utils import autocast, device_of, synchronize


def _batches(data: Dataset | DataLoader | Iterable, batch_size: int, limit: int | None, workers: int,
             device: torch.device) -> Iterable:
    if isinstance(data, Dataset):
        return loader(data, batch_size, limit=limit, workers=workers, pin_memory=device.type == "cuda")
    return data


def _input_size(model: torch.nn.Module, input_size: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(input_size or model.pretrained_cfg["input_size"])  # type: ignore[index]


@torch.inference_mode()
def predict(model: torch.nn.Module, data: Dataset | DataLoader, batch_size: int = 256,
            limit: int | None = None, progress: bool = True, amp: str | None = None,
            workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits [N, classes] float32, labels [N]) of model over a dataset or loader, on the model's device."""
    from tqdm.auto import tqdm

    model.eval()
    device, outs, labels = device_of(model), [], []
    for x, y in tqdm(_batches(data, batch_size, limit, workers, device), desc="eval", disable=not progress, leave=False):
        if not outs:
            check_input(model, x.shape[1:])
        with autocast(device, amp):
            outs.append(model(x.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(y).to(device, non_blocking=True))
    return torch.cat(outs), torch.cat(labels)


def accuracy(model: torch.nn.Module, data: Dataset | DataLoader, batch_size: int = 256,
             limit: int | None = None, progress: bool = True, amp: str | None = None, workers: int = 0) -> float:
    """Top-1 accuracy (fraction) of model on a dataset or loader."""
    logits, y = predict(model, data, batch_size, limit, progress, amp, workers)
    return (logits.argmax(-1) == y).float().mean().item()


def agreement(model: torch.nn.Module, ref: torch.nn.Module | torch.Tensor, data: Dataset | DataLoader,
              batch_size: int = 256, limit: int | None = None, progress: bool = True, amp: str | None = None,
              workers: int = 0) -> float:
    """Fraction of images where model's top-1 equals the reference model's (or given reference logits')."""
    logits, _ = predict(model, data, batch_size, limit, progress, amp, workers)
    ref_logits = ref if isinstance(ref, torch.Tensor) else predict(ref, data, batch_size, limit, progress, amp, workers)[0]
    return (logits.argmax(-1) == ref_logits.to(logits.device).argmax(-1)).float().mean().item()


@torch.inference_mode()
def throughput(model: torch.nn.Module, input_size: tuple[int, ...] | None = None, batch_size: int = 256,
               runs: int = 5, warmup: int = 2, min_seconds: float = 0.0, amp: str | None = None) -> dict[str, Any]:
    """Images/s of model on random input on its device: warm-up, then median over timed runs (CUDA synchronized)."""
    model.eval()
    device = device_of(model)
    x = torch.randn(batch_size, *_input_size(model, input_size), device=device)
    times: list[float] = []
    with torch.inference_mode(), autocast(device, amp):
        for _ in range(warmup):
            model(x)
        while len(times) < runs or sum(times) < min_seconds:
            synchronize(device)
            t0 = time.perf_counter()
            model(x)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"img_per_s": batch_size / med, "median_s": med, "runs": len(times), "batch_size": batch_size,
            "threads": torch.get_num_threads(), "device": str(device), "amp": amp}


def _cpu_sdpa_mapping() -> dict[Any, Any]:
    """FlopCounterMode formula for the CPU fused-attention kernel, which torch's registry leaves uncounted."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry:
        return {}
    return {op: lambda q, k, v, *_a, out_shape=None, **_k: fc.sdpa_flop_count(q, k, v)}


def counted_macs(model: torch.nn.Module, input_size: tuple[int, ...] | None = None, batch_size: int = 1) -> int:
    """Matmul/conv MACs per image of the real forward, counted by torch.utils.flop_counter.FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch_size, *_input_size(model, input_size), device=device_of(model))
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    with counter, torch.inference_mode():
        model.eval()(x)
    return counter.get_total_flops() // 2 // batch_size


@torch.inference_mode()
def round_robin(models: dict[str, torch.nn.Module], x: torch.Tensor, runs: int = 5, warmup: int = 1,
                amp: str | None = None) -> dict[str, float]:
    """Median seconds per forward of x for each model, timed in rounds (every model once per round) so noise hits all
    alike; CUDA synchronized."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for rnd in range(warmup + runs):
        for name, m in models.items():
            synchronize(x.device)
            t0 = time.perf_counter()
            with autocast(x.device, amp):
                m(x)
            synchronize(x.device)
            if rnd >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def compare(model: torch.nn.Module, methods: dict[str, tuple[Any, dict[str, Any]]], data: Dataset,
            batch_size: int = 256, runs: int = 5, warmup: int = 1, limit: int | None = None,
            progress: bool = True, amp: str | None = None, workers: int = 0) -> list[dict[str, Any]]:
    """Accuracy, agreement, MACs and throughput of named (schedule, patch kwargs) methods, side by side in one run.

    Each method gets its own copy of the model, patched once. Throughput is timed round-robin (every method once per round,
    `runs` rounds, median per method) so machine noise hits all methods alike; speedup and MACs ratio are relative
    to the uncompressed model. A method with schedule None is the uncompressed model.
    """
    import copy

    from tqdm.auto import tqdm

    from .compress.patch import patch, unpatch
    from .compress.schedule import macs

    full = macs(unpatch(model))
    base_logits, labels = predict(model, data, batch_size, limit, False, amp, workers)
    x = torch.randn(batch_size, *_input_size(model, None), device=device_of(model))
    models = {name: model if s is None else patch(copy.deepcopy(model), s, **kw) for name, (s, kw) in methods.items()}
    records: dict[str, dict[str, Any]] = {}
    for name, (s, _) in tqdm(methods.items(), desc="accuracy", disable=not progress):
        logits, _ = (base_logits, None) if s is None else predict(models[name], data, batch_size, limit, False, amp,
                                                                    workers)
        records[name] = {"method": name, "macs": macs(model, s), "fraction": macs(model, s) / full,
                         "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                         "agreement": (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()}
    medians = round_robin(models, x, runs, warmup, amp)
    base = [medians[n] for n, (s, _) in methods.items() if s is None]
    for name, rec in records.items():
        med = medians[name]
        rec.update(img_per_s=batch_size / med, threads=torch.get_num_threads(), batch_size=batch_size,
                   device=str(x.device), amp=amp, macs_ratio=full / rec["macs"])
        if base:
            rec["speedup"] = base[0] / med
            rec["speedup_vs_macs_ratio"] = rec["speedup"] / rec["macs_ratio"]
    return list(records.values())
