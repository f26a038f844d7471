"""GPU check (`make gpu-check`): on a CUDA machine, with a random-weight timm model (default deit_small_patch16_224):

1. exactness: the patched forward with the full (empty) schedule equals the unpatched one on the device in float32
   (max |diff| <= 1e-5), and an exact ToMe schedule gives the same logits on the device as on the CPU
   (within --tome-atol; TF32 off for this part), and so does a joint schedule (ToMe + half of every block's heads);
2. throughput at --batch (256) under --amp (bf16) autocast, CUDA-synchronized, median of --runs: uncompressed, ToMe
   r=13, a fixed pruned+merged example (tcl.schedule.at_macs(model, "unified", 2.9 / 4.6): DiffRate's DeiT-S budget),
   DiffRate's op there, and ToMe r=8 with half the heads removed;
3. search: wall time of a --candidates (1,000) candidate tcl.search.search with a ReferenceScorer over
   --search-images random images held on the device;
4. latency: tcl.compress.latency.calibrate on the device (--batch, --amp's dtype), its error on held-out schedules.

Prints a JSON summary (also written to --out). Exits with a message when the device is CUDA and there is none;
`--device cpu --candidates 5 --batch 8 --search-images 16 --latency-schedules 6` is a CPU smoke run of the same code.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tcl  # noqa: E402
from tcl.compress import latency  # noqa: E402
from tcl.compress.schedule import Schedule, at_macs, macs, vit_dims  # noqa: E402
from tcl.utils import write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exactness(name: str, device: torch.device, batch: int, tome_r: float, tome_atol: float) -> dict[str, Any]:
    """Full schedule vs unpatched on the device; ToMe logits on the device vs the CPU (float32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = random_model(name)
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    dev_model = copy.deepcopy(model).to(device)
    with torch.inference_mode():
        plain = dev_model(x.to(device))
        full = tcl.patch(copy.deepcopy(dev_model), Schedule.full(dev_model))(x.to(device))
        s = Schedule.tome(model, tome_r)
        cpu = tcl.patch(copy.deepcopy(model), s)(x)
        gpu = tcl.patch(copy.deepcopy(dev_model), s)(x.to(device)).cpu()
        j = joint_schedule(model, tome_r)  # ToMe plus half the heads of every block removed
        jcpu = tcl.patch(copy.deepcopy(model), j)(x)
        jgpu = tcl.patch(copy.deepcopy(dev_model), j)(x.to(device)).cpu()
    full_diff = float((full - plain).abs().max())
    tome_diff = float((gpu - cpu).abs().max())
    joint_diff = float((jgpu - jcpu).abs().max())
    return {"full_schedule_max_abs_diff": full_diff, "full_schedule_ok": full_diff <= 1e-5,
            "tome_r": tome_r, "tome_device_vs_cpu_max_abs_diff": tome_diff, "tome_atol": tome_atol,
            "tome_top1_agreement": float((gpu.argmax(-1) == cpu.argmax(-1)).float().mean()),
            "tome_ok": tome_diff <= tome_atol, "joint_device_vs_cpu_max_abs_diff": joint_diff,
            "joint_ok": joint_diff <= tome_atol, "images": batch}


def joint_schedule(model: torch.nn.Module, r: float) -> Schedule:
    """ToMe with r per block plus half of every block's heads removed (the first half by index)."""
    h = vit_dims(model).attn_heads
    return Schedule.tome(model, r).with_heads([max(h // 2, 1)] * len(model.blocks), [list(range(h))] * len(model.blocks))


def random_model(name: str) -> torch.nn.Module:
    """The timm model `name` with explicitly random weights."""
    return tcl.models.create(name, pretrained=False).eval()


@torch.inference_mode()
def throughput(name: str, device: torch.device, batch: int, amp: str | None, runs: int, warmup: int) -> list[dict[str, Any]]:
    """Images/s of the uncompressed model, ToMe r=13 and a pruned+merged example, timed round-robin, synchronized."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = random_model(name).to(device)
    full = macs(base)
    methods: dict[str, tuple[Schedule | None, dict[str, Any]]] = {
        "uncompressed": (None, {}),
        "tome_r13": (Schedule.tome(base, 13), {}),  # carries ToMe's op
        "pruned_merged": (at_macs(base, "unified", 2.9 / 4.6), {"merge": "attention"}),  # DiffRate DeiT-S 2.9 of 4.6 G
        "diffrate_op": (at_macs(base, "diffrate", 2.9 / 4.6), {}),
        "joint_tome8_half_heads": (joint_schedule(base, 8), {}),
    }
    models = {k: base if s is None else tcl.patch(copy.deepcopy(base), s, **kw) for k, (s, kw) in methods.items()}
    x = torch.randn(batch, *base.pretrained_cfg["input_size"], device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=DTYPES[amp])) if amp else torch.no_grad
    times: dict[str, list[float]] = {k: [] for k in models}
    for rnd in range(warmup + runs):
        for k, m in models.items():
            _sync(device)
            t0 = time.perf_counter()
            with ctx():
                m(x)
            _sync(device)
            if rnd >= warmup:
                times[k].append(time.perf_counter() - t0)
    out = []
    for k, (s, kw) in methods.items():
        med = statistics.median(times[k])
        out.append({"method": k, "img_per_s": batch / med, "median_s": med, "macs": macs(base, s),
                    "macs_fraction": macs(base, s) / full, "patch": (s.settings.kwargs() if s is not None and s.settings is not None else kw), "batch": batch, "amp": amp or "off",
                    "runs": runs, "schedule": None if s is None else s.to_dict()})
    ref = out[0]["img_per_s"]
    for r in out:
        r["speedup"] = r["img_per_s"] / ref
    return out


def search_time(name: str, device: torch.device, candidates: int, images: int, subset: int) -> dict[str, Any]:
    """Wall time of a `candidates`-candidate random search, scorer data (random images) held on the device."""
    from tcl.search import ReferenceScorer, SearchConfig, search

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = random_model(name).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, *model.pretrained_cfg["input_size"], generator=g).to(device)
    y = torch.randint(0, model.num_classes, (images,), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    scorer = ReferenceScorer(model, (x, y), batch_size=min(256, images))
    t_ref = time.perf_counter() - t0
    cfg = SearchConfig(candidates=candidates, subset=min(subset, images), seed=0)
    with tempfile.TemporaryDirectory() as out:
        t1 = time.perf_counter()
        table = search(model, scorer, cfg, out_dir=out, progress=False)
        _sync(device)
        wall = time.perf_counter() - t1
        log = Path(out) / "log.0.jsonl"
        evaluated = sum(1 for line in log.read_text().splitlines() if line.strip()) if log.exists() else None
    return {"candidates": candidates, "images": images, "subset": cfg.subset, "scorer_setup_s": t_ref,
            "search_wall_s": wall, "evaluations_logged": evaluated,  # subset + anchor + full-split evaluations
            "s_per_evaluation": wall / evaluated if evaluated else None,
            "table_entries": len(table.entries),
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name; built with random weights")
    ap.add_argument("--batch", type=int, default=256, help="throughput batch size")
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--exact-images", type=int, default=16)
    ap.add_argument("--tome-atol", type=float, default=1e-3)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--search-images", type=int, default=1024)
    ap.add_argument("--subset", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], choices=["exactness", "throughput", "search", "latency"])
    ap.add_argument("--latency-schedules", type=int, default=60, help="latency model: fit schedules (+ half as many held out)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "summary.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a machine with "
                         "one; for a CPU smoke run of the same code: python tools/gpu_check.py --device cpu "
                         "--candidates 5 --batch 8 --search-images 16 --runs 2 --warmup 1 --latency-schedules 6")
    torch.manual_seed(0)
    summary: dict[str, Any] = {"device": str(device), "model": args.model, "weights": "random (pretrained=False)",
                               "torch": torch.__version__, "timm": __import__("timm").__version__,
                               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                               "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if "exactness" not in args.skip:
        summary["exactness"] = exactness(args.model, device, args.exact_images, 13, args.tome_atol)
    if "throughput" not in args.skip:
        summary["throughput"] = throughput(args.model, device, args.batch, None if args.amp == "off" else args.amp,
                                           args.runs, args.warmup)
    if "search" not in args.skip:
        summary["search"] = search_time(args.model, device, args.candidates, args.search_images, args.subset)
    if "latency" not in args.skip:  # the per-block latency model on this device, its error on held-out schedules
        lat = latency.calibrate(random_model(args.model).to(device), batch_size=args.batch, runs=3,
                                dtype=latency.dtype_of(args.amp),
                                schedules=args.latency_schedules, held_out=args.latency_schedules // 2)
        summary["latency"] = {k: v for k, v in lat.error.items() if k != "measurements"} | {"context": lat.context}
    summary["wall_s"] = time.perf_counter() - t0
    write_json(args.out, summary)
    print(json.dumps(summary, indent=2, default=str))
    ex = summary.get("exactness", {})
    if ex and not (ex["full_schedule_ok"] and ex["tome_ok"] and ex["joint_ok"]):
        raise SystemExit("gpu-check: exactness FAILED (see the summary above)")
    return summary


if __name__ == "__main__":
    main()
