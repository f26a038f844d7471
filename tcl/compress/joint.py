"""Joint token and head compression without fine-tuning: an all-classes, training-free head importance on the search
split ranks each block's heads; a schedule's kept-head counts keep the top ones (physically removed by tcl.patch).

Importance per head: the gate gradient of the cross-entropy with the true labels, per image, averaged over the split:
'fisher' squares it (Kwon et al. 2022), 'michel' takes its absolute value (Michel et al. 2019).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..heads.gates import HeadsError, insert_gates
from ..heads.importance import per_example_gates
from ..stream import Amp, Data, batches, n_items
from ..utils import autocast, device_of, save_atomic, write_json
from .patch import is_patched, patch, patch_state, unpatch
from .schedule import Schedule, ScheduleError, vit_dims

Importance = Literal["fisher", "michel"]
FORMAT = "tcl.joint_model"

__all__ = ["head_importance", "head_order", "check_importance", "importance_of", "build", "save", "load", "FORMAT"]


def head_importance(model: nn.Module, data: Data, method: Importance = "fisher", batch_size: int = 128,
                    limit: int | None = None, amp: Amp = None, progress: bool = False) -> torch.Tensor:
    """All-classes head importance [blocks, heads] (CPU float32) of an unpatched model on data (the search split)."""
    from tqdm.auto import tqdm

    if method not in ("fisher", "michel"):
        raise HeadsError(f"importance method must be 'fisher' or 'michel', got {method!r}")
    if is_patched(model):
        raise ScheduleError("the model is patched; score heads of the unpatched model (tcl.unpatch first)")
    gated = insert_gates(copy.deepcopy(model).eval())
    for p in gated.parameters():
        p.requires_grad_(False)
    dev, total, n = device_of(gated), None, 0
    count = n_items(data) if limit is None else min(limit, n_items(data))
    for x, y in tqdm(batches(data, batch_size, limit, dev), desc="head importance", disable=not progress,
                     total=-(-count // batch_size), leave=False):
        with per_example_gates(gated, len(x)) as leaves:
            with autocast(dev, amp, grads=True):
                logits = gated(x)
            loss = F.cross_entropy(logits.float(), y.to(dev), reduction="sum")
            g = torch.stack(torch.autograd.grad(loss, leaves), 1)  # [batch, blocks, heads]: per-image gradients
        part = (g.square() if method == "fisher" else g.abs()).sum(0)
        total = part if total is None else total + part
        n += len(x)
    if total is None:
        raise HeadsError("the importance data holds no images; pass the search split")
    return (total / n).float().cpu()


def head_order(importance: torch.Tensor | Sequence[Sequence[float]]) -> list[list[int]]:
    """Per block the head indices by decreasing importance (ties: the lower index first)."""
    imp = torch.as_tensor(importance, dtype=torch.float32)
    if imp.dim() != 2:
        raise HeadsError(f"head importance must be a [blocks, heads] tensor, got shape {tuple(imp.shape)}")
    return [sorted(range(imp.shape[1]), key=lambda j: (-float(row[j]), j)) for row in imp]


def check_importance(model: nn.Module, importance: Any) -> torch.Tensor:
    """importance as a CPU float32 [blocks, heads] tensor; HeadsError unless that is the model's shape."""
    d, imp = vit_dims(model), torch.as_tensor(importance, dtype=torch.float32).detach().cpu()
    if tuple(imp.shape) != (d.depth, d.attn_heads):
        raise HeadsError(f"head importance must be [blocks, heads] = [{d.depth}, {d.attn_heads}], got "
                         f"{list(imp.shape)}; compute it with tcl.compress.joint.head_importance(model, split)")
    return imp


def importance_of(table: Any) -> torch.Tensor:
    """The head importance a joint search recorded in its table (a LookupTable, or its data dict)."""
    data = getattr(table, "data", table)
    rec = data.get("head_importance") if isinstance(data, dict) else None
    if rec is None:
        raise HeadsError("no head importance recorded; search with tcl.search.joint_scorer, or pass the importance")
    return torch.tensor(rec["scores"], dtype=torch.float32)


def build(model: nn.Module, schedule: Schedule, importance: torch.Tensor | Any = None) -> nn.Module:
    """A token-compressed, head-pruned copy of an unpatched model: tcl.patch on a copy, the heads ranked by the
    schedule's head_order, else by importance (a [blocks, heads] tensor or a table that recorded one)."""
    if is_patched(model):
        raise ScheduleError("the model is patched; build from the unpatched model (tcl.unpatch first)")
    if importance is not None:
        imp = check_importance(model, importance if isinstance(importance, torch.Tensor) else importance_of(importance))
        schedule = schedule.with_heads(schedule.heads, head_order(imp))
    new = patch(copy.deepcopy(model), schedule)
    new._tcl_info["own_attention"] = {}  # a copy: unpatch keeps its pruned heads rather than holding the originals
    return new


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a tcl.compress.joint.build model to folder `path`: weights.pt (state_dict) and model.json (schedule)."""
    if not is_patched(model):
        raise ScheduleError("the model is not patched; build it with tcl.compress.joint.build first")
    st = patch_state(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(model.state_dict(), out / "weights.pt")
    write_json(out / "model.json", {"format": FORMAT, "schedule": st.schedule.with_settings(st.settings).to_dict(),
                                    "trace_source": model._tcl_info["config"].trace_source})
    return out


def load(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved tcl.compress.joint model on a copy of `base` (the same architecture; its weights are replaced)."""
    folder = Path(path)
    if not (folder / "model.json").is_file() or not (folder / "weights.pt").is_file():
        raise FileNotFoundError(f"{folder} holds no saved joint model (model.json + weights.pt); write it with "
                                "tcl.compress.joint.save")
    meta = json.loads((folder / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise ScheduleError(f"{folder}/model.json is not a {FORMAT}; write it with tcl.compress.joint.save")
    new = build(unpatch(copy.deepcopy(base)), Schedule.from_dict(meta["schedule"]))
    patch(new, patch_state(new).schedule, trace_source=bool(meta.get("trace_source", False)))  # pruned heads stay
    try:
        new.load_state_dict(torch.load(folder / "weights.pt", map_location=device_of(new), weights_only=True))
    except RuntimeError as err:
        raise ScheduleError(f"{folder}: the saved weights do not fit the schedule's heads or the base model ({err}); "
                            "pass the base architecture the model was built from") from err
    return new.eval()
