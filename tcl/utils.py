"""Small shared helpers: atomic file writes, run-output folders, devices and precision, gradient flags."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path next to `path` to write to; renamed onto path when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path atomically, so readers never see a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save obj to path atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def run_dir(path: str | os.PathLike) -> Path:
    """A run-output folder, moved under $TCL_RUNS when set (so tests leave `make reproduce` outputs alone):
    with TCL_RUNS=/x, ../runs/a/b -> /x/a/b; paths without a `runs` folder stay as they are."""
    path, root = Path(path), os.environ.get("TCL_RUNS")
    if not root or "runs" not in path.parts:
        return path
    return Path(root).joinpath(*path.parts[path.parts.index("runs") + 1:])


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write obj as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ---- devices and precision -------------------------------------------------------------------------------------
AMP_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def default_device() -> "torch.device":
    """CUDA when available (this process's LOCAL_RANK GPU under torchrun), else CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def device_of(module: "torch.nn.Module") -> "torch.device":
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    import torch

    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def autocast(device: "torch.device | str", amp: str | None, grads: bool = False) -> Any:
    """torch.autocast for amp 'bf16' / 'fp16' on device, or a no-op context for None / 'off' / 'float32'; fp16
    refuses gradient passes (grads=True)."""
    import torch

    if amp in (None, "off", "none", "float32", "fp32"):
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be 'bf16', 'fp16' or None (off), got {amp!r}")
    if grads and AMP_DTYPES[amp] == "float16":
        raise ValueError("amp='fp16' gradients would need loss scaling; use amp='bf16' (or None) for gate training, "
                         "importance and recovery (fp16 is fine for scores and latency)")
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, AMP_DTYPES[amp]))


def synchronize(device: "torch.device | str") -> None:
    """Wait for the device's queued work (CUDA); no-op on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(device: "torch.device | str") -> bool:
    """Whether the device computes bfloat16 natively (CUDA: is_bf16_supported; CPU: AVX512-BF16 or AMX)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(c()) for c in checks if c is not None)
    return False


@contextlib.contextmanager
def requires_grad(module: "torch.nn.Module", value: bool, also: "Iterable[torch.nn.Parameter]" = ()) -> Iterator[None]:
    """Within the block, module's parameters require grad `value` (those in `also`: True); restored on exit."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(value)
        for p in also:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
