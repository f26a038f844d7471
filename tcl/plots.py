"""Figure helpers shared by the notebooks."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402

from .utils import atomic_path  # noqa: E402


def figure_dir(default: str | os.PathLike = "../figures") -> Path:
    """Where figures go: $TCL_FIGURES when set (tests), else default; created if missing."""
    d = Path(os.environ.get("TCL_FIGURES", default))
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(fig: plt.Figure, name: str, fig_dir: str | os.PathLike | None = None) -> Path:
    """Save fig as fig_dir/name.png (atomically) and return the path."""
    d = figure_dir() if fig_dir is None else Path(fig_dir)
    path = d / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return path


def training_curve(history: Sequence[dict[str, Any]]) -> plt.Figure:
    """Loss and held-out accuracy per epoch."""
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [h["epoch"] for h in history]
    ax[0].plot(ep, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss (smoothed)")
    ax[1].plot(ep, [100 * h["heldout_acc"] for h in history], marker="o", color="C1")
    ax[1].set(xlabel="epoch", ylabel="held-out accuracy (%)")
    fig.tight_layout()
    return fig


def confusion(pred: Sequence[int], true: Sequence[int], labels: Sequence[str]) -> plt.Figure:
    """Row-normalised confusion matrix heatmap."""
    import numpy as np
    import seaborn as sns

    k = len(labels)
    cm = np.zeros((k, k))
    np.add.at(cm, (np.asarray(true), np.asarray(pred)), 1)
    cm = cm / cm.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(6, 5))
    sns.heatmap(100 * cm, annot=True, fmt=".0f", cmap="Blues", xticklabels=labels, yticklabels=labels, ax=ax, cbar=False)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (% of true class)")
    fig.tight_layout()
    return fig


def pareto(records: Sequence[dict[str, Any]], x: str, y: str, hue: str = "method",
           xlabel: str | None = None, ylabel: str | None = None, ref: float | None = None) -> plt.Figure:
    """One line per `hue` value through (x, y) points sorted by x; optional horizontal reference line."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r[hue]), []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", ms=4, label=name)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=0.8, label="uncompressed")
    ax.set(xlabel=xlabel or x, ylabel=ylabel or y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def denormalize(x: Any, model: Any) -> Any:
    """Model inputs [B, C, H, W] back to images in [0, 1] with the model's pretrained_cfg mean/std: [B, H, W(, 3)]."""
    import torch

    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype).view(1, -1, 1, 1)
    img = (x.detach().cpu() * std + mean).clamp(0, 1)
    return img[:, 0] if img.shape[1] == 1 else img.permute(0, 2, 3, 1)


def merge_overlay(images: Any, source: Any, grid: int, prefix: int, titles: Sequence[str] | None = None) -> plt.Figure:
    """ToMe-style view: each final token's input patches drawn in one colour (their mean colour) with outlines."""
    import numpy as np

    imgs = np.asarray(images)  # [B, H, W] grey or [B, H, W, 3] RGB, in [0, 1]
    rgb_in = imgs if imgs.ndim == 4 else np.repeat(imgs[..., None], 3, -1)
    src = np.asarray(source)[:, :, prefix:]  # [B, tokens, patches]
    b = imgs.shape[0]
    fig, axes = plt.subplots(2, b, figsize=(1.6 * b, 3.4), squeeze=False)
    ps = imgs.shape[2] // grid
    for i in range(b):
        owner = src[i].argmax(0).reshape(grid, grid)  # final token holding each patch
        tok = np.kron(owner, np.ones((ps, ps), dtype=int))
        rgb = np.zeros_like(rgb_in[i])
        for t in np.unique(tok):
            rgb[tok == t] = rgb_in[i][tok == t].mean(0)
        edge = (np.diff(tok, axis=0, prepend=tok[:1]) != 0) | (np.diff(tok, axis=1, prepend=tok[:, :1]) != 0)
        rgb[edge] = (1.0, 0.3, 0.1)
        dropped = src[i].sum(0).reshape(grid, grid) == 0
        rgb[np.kron(dropped, np.ones((ps, ps))) > 0] = (0.1, 0.2, 0.6)
        axes[0, i].imshow(imgs[i], cmap="gray" if imgs.ndim == 3 else None)
        axes[1, i].imshow(rgb)
        axes[0, i].set_title(titles[i] if titles else "", fontsize=7)
        for a in axes[:, i]:
            a.axis("off")
    axes[1, 0].set_title("tokens (pruned = blue)", fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def schedules(named: dict[str, Any], tokens: int) -> plt.Figure:
    """Kept tokens after prune (solid) and after merge (dashed) per block, one colour per schedule."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (name, s) in enumerate(named.items()):
        blocks = list(range(len(s.prune) + 1))
        ax.step(blocks, [tokens, *s.prune], where="post", color=f"C{i}", label=f"{name} prune")
        ax.step(blocks, [tokens, *s.merge], where="post", color=f"C{i}", ls="--", label=f"{name} merge")
    ax.set(xlabel="block", ylabel="kept tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmaps(named: dict[str, Any], title: str = "") -> plt.Figure:
    """One blocks x heads heatmap per name (e.g. per-class head importance)."""
    import numpy as np

    k = len(named)
    fig, axes = plt.subplots(1, k, figsize=(2.2 * k + 0.5, 3), squeeze=False)
    for ax, (name, m) in zip(axes[0], named.items()):
        a = np.asarray(m, dtype=float)
        ax.imshow(a, cmap="viridis", aspect="auto")
        ax.set(title=name, xlabel="head", ylabel="block", xticks=range(a.shape[1]), yticks=range(a.shape[0]))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def bars(records: Sequence[dict[str, Any]], x: str, y: str, hue: str, ylabel: str | None = None) -> plt.Figure:
    """Grouped bar chart: one group per `x` value, one bar per `hue` value (NaN values, e.g. an undefined correlation,
    get no bar)."""
    import pandas as pd
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.barplot(pd.DataFrame(records), x=x, y=y, hue=hue, ax=ax)
    lo = min((float(r[y]) for r in records if math.isfinite(float(r[y]))), default=0.0)  # NaN: undefined, no bar
    ax.set(ylabel=ylabel or y, ylim=(lo - 0.1 * abs(lo) - 1, None))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
