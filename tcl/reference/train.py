"""The reference model's training recipe: AdamW, warm-up + cosine, label smoothing, shift/flip/erase augmentation."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import load_weights, save_weights
from ..utils import save_atomic
from .data import fashion_mnist
from .model import WEIGHTS, build_reference, reference_config


@dataclass
class Recipe:
    """Hyper-parameters of the reference training run."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 2
    erase_p: float = 0.0
    seed: int = 0
    bf16: bool = False


def augment(x: torch.Tensor, shift: int, erase_p: float, g: torch.Generator) -> torch.Tensor:
    """Batched random translation (zero pad), horizontal flip and random erasing of a normalized image batch."""
    b, _, h, w = x.shape
    bg = x.amin()
    if shift > 0:
        pad = F.pad(x, (shift,) * 4, value=float(bg))
        dx, dy = torch.randint(0, 2 * shift + 1, (2, b), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * shift)
        pad = pad.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
        x = pad.gather(3, cols)
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if erase_p > 0:
        eh, ew = torch.randint(4, h // 2 + 1, (2, b), generator=g)
        y0 = (torch.rand(b, generator=g) * (h - eh)).long()
        x0 = (torch.rand(b, generator=g) * (w - ew)).long()
        ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
        box = ((ys >= y0[:, None]) & (ys < (y0 + eh)[:, None]))[:, :, None] & \
              ((xs >= x0[:, None]) & (xs < (x0 + ew)[:, None]))[:, None, :]
        on = (torch.rand(b, generator=g) < erase_p)[:, None, None]
        x = x.masked_fill((box & on)[:, None], float(bg))
    return x


def train_reference(out: str | os.PathLike = WEIGHTS, recipe: Recipe | None = None,
                    state_path: str | os.PathLike = "runs/train_state.pt", limit: int | None = None,
                    init: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the reference ViT on Fashion-MNIST (train split minus held-out), resumably; write safetensors.

    With init, start from those weights (a further stage: e.g. a warm restart); its metadata is kept as 'stages'.
    One function over 60 lines: the resumable state (model, optimiser, schedule, generator, history) is its locals."""
    r = recipe or Recipe()
    torch.manual_seed(r.seed)
    model = build_reference()
    stages = []
    if init is not None:
        prev = load_weights(model, init)
        stages = prev.get("stages", []) + [{k: prev[k] for k in ("recipe", "history") if k in prev}]
    ds = fashion_mnist("train", limit=limit)
    held = fashion_mnist("heldout", limit=limit)
    x_all, y_all = ds.tensors
    steps_per_epoch = len(x_all) // r.batch_size
    total = r.epochs * steps_per_epoch
    warm = int(r.warmup_epochs * steps_per_epoch)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(r.seed)
    start, history = 0, []
    state_path = Path(state_path)
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st["recipe"] == asdict(r):
            model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
            g.set_state(st["gen"]); start, history = st["epoch"], st["history"]
    for epoch in range(start, r.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x_all), generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{r.epochs}", mininterval=10)
        run_loss = 0.0
        for i in bar:
            idx = perm[i * r.batch_size:(i + 1) * r.batch_size]
            xb = augment(x_all[idx], r.shift, r.erase_p, g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
                loss = F.cross_entropy(model(xb), y_all[idx], label_smoothing=r.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step()
            run_loss = 0.98 * run_loss + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(loss=f"{run_loss:.3f}", refresh=False)
        from ..evaluate import accuracy
        acc = accuracy(model.eval(), held, progress=False)
        history.append({"epoch": epoch + 1, "loss": run_loss, "heldout_acc": acc, "seconds": time.time() - t0})
        print(history[-1], flush=True)
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "gen": g.get_state(), "epoch": epoch + 1, "history": history, "recipe": asdict(r)}, state_path)
    meta = {"recipe": asdict(r), "history": history, "stages": stages, "config": reference_config(),
            "data": "fashion-mnist train minus held-out (seed 0, 5000)"}
    save_weights(model.eval(), out, meta)
    return meta
