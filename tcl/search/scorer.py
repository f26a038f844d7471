"""Scoring a compression schedule against the uncompressed model on the search split, on any device and dataset size.

The split's uncompressed logits are computed once; the preprocessed images (and, for the first `cache_images`, the
input of every block) are kept on the model's device only within `max_cache_bytes`; images past that bound are streamed
from a DataLoader at every evaluation, so a folder dataset is never held whole in memory.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from ..compress.patch import forward_from, is_patched, patch, unpatch
from ..compress.schedule import Schedule, vit_dims
from ..compress.settings import PatchSettings
from ..data import check_input, first_shape, loader
from ..utils import autocast, device_of

MAX_CACHE_BYTES = 2 * 2**30  # default bound on what a ReferenceScorer keeps: logits, labels, images, block inputs


class SearchError(RuntimeError):
    """Raised for a search (or its scorer) that cannot run or resume as asked."""


class Scorer(Protocol):
    """Scores a schedule on the first n images of a fixed evaluation set; `size` images are available."""

    size: int

    def __call__(self, schedule: Schedule, n: int) -> dict[str, float]: ...


Apply = Callable[[torch.nn.Module, Schedule], ContextManager[Any]]


def patched(**patch_kwargs: Any) -> Apply:
    """An Apply that compresses the model by a schedule's counts with the settings of patch_kwargs (tcl.patch's
    keywords; whatever settings the schedule carries are replaced) and unpatches on exit."""
    trace = bool(patch_kwargs.get("trace_source", False))
    settings = PatchSettings.from_dict(patch_kwargs)

    @contextlib.contextmanager
    def apply(model: torch.nn.Module, schedule: Schedule) -> Iterator[torch.nn.Module]:
        patch(model, schedule.with_settings(settings), trace_source=trace)
        try:
            yield model
        finally:
            unpatch(model)

    return apply


def _means(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: v.mean().item() for k, v in per_image.items()}


class _Indexed(Dataset):
    """Items (index, image, label) of ds, or None for an image ds skipped as unreadable."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.ds[i]
        return None if item is None else (i, *item)


class ReferenceScorer:
    """Scores compressed models against the uncompressed model's logits, computed once on a fixed (shuffled) dataset.

    Returns kl (mean KL(uncompressed || compressed), lower is better), agree (top-1 agreement with the uncompressed
    model) and acc (top-1 accuracy). Image order is a seeded permutation, so the first n images are a random subset.
    Runs on the model's device under `amp` ('bf16' / 'fp16' / None). Kept on that device, within max_cache_bytes (the
    logits and labels of every image first): the inputs of the first `cache_images` images' blocks and their images,
    then as many further images as fit; the rest is streamed (`workers` loader processes) at every evaluation.
    A schedule whose first reduction is at block s runs only blocks s.. on cached block inputs (checked once against
    the plain patched forward; off if they disagree). Images the dataset skips as unreadable are left out.
    """

    def __init__(self, model: torch.nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor],
                 apply: Apply | None = None, batch_size: int = 1000, order_seed: int = 0, cache_images: int = 512,
                 info: dict[str, Any] | None = None, max_cache_bytes: int = MAX_CACHE_BYTES, workers: int = 0,
                 amp: str | None = None, head_order: Sequence[Sequence[int]] | None = None, **patch_kwargs: Any):
        if is_patched(model):
            raise SearchError("the model is patched; call tcl.unpatch(model) first (scores compare against the "
                              "uncompressed model's predictions)")
        ds = TensorDataset(*data) if isinstance(data, tuple) else data
        self.model, self.batch_size, self.amp, self.workers = model.eval(), batch_size, amp, workers
        self.device, self.dims = device_of(model), vit_dims(model)
        self.apply = apply if apply is not None else patched(**patch_kwargs)
        self.head_order = None if head_order is None else [list(o) for o in head_order]  # ranks a schedule's heads
        # the op every schedule is scored with (what the search's table carries); unknown for a custom apply
        self.settings = PatchSettings.from_dict(patch_kwargs) if apply is None else None
        shape = first_shape(ds)
        check_input(model, shape, "the search data")
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(order_seed))  # type: ignore[arg-type]
        self.ds, self.max_cache_bytes = ds, max_cache_bytes
        self._loaders: dict[tuple[int, int], Any] = {}
        self._reference_pass(perm.tolist(), shape, cache_images)
        self.info = {"size": self.size, "order_seed": order_seed, "patch": patch_kwargs, **(info or {})}
        if self.skipped:
            self.info["skipped_images"] = self.skipped
        self.full = Schedule.full(model)
        self.ref_logp = F.log_softmax(self.ref, -1)
        self.reference_scores = _means(self._per_image(self.ref, self.size))
        if self.cache and not self._cache_agrees():
            self.cache = []

    # ---- caching ---------------------------------------------------------------------------------------------
    def _plan(self, n: int, shape: tuple[int, ...], cache_images: int, classes: int) -> tuple[int, int]:
        """(images kept, images whose block inputs are kept) within max_cache_bytes."""
        d = self.dims
        image = 4 * int(torch.tensor(shape).prod())
        blocks = 4 * (d.depth - 1) * d.tokens * d.dim
        left = self.max_cache_bytes - n * (4 * classes + 8)
        if left < 0:
            raise SearchError(f"max_cache_bytes={self.max_cache_bytes} cannot hold even the logits of {n} images "
                              f"({n * (4 * classes + 8)} bytes); raise max_cache_bytes or use a smaller held-out split")
        both = max(0, min(cache_images, n, left // (image + blocks))) if d.depth > 1 else 0
        return min(n, both + (left - both * (image + blocks)) // image), both

    @torch.inference_mode()
    def _reference_pass(self, order: list[int], shape: tuple[int, ...], cache_images: int) -> None:
        """Uncompressed logits of every readable image; images and block inputs kept as _plan allows."""
        m, got = self.model, [[] for _ in self.model.blocks]  # type: ignore[var-annotated]
        want = [0]
        hooks = [blk.register_forward_pre_hook(lambda _m, a, k=k: got[k].append(a[0][:want[0]].clone()) if want[0] else None)
                 for k, blk in enumerate(m.blocks) if k > 0]
        classes = m.num_classes if getattr(m, "num_classes", 0) else 1000
        keep_images, keep_blocks = self._plan(len(order), shape, cache_images, classes)
        idx, xs, ys, out, n = [], [], [], [], 0
        try:
            for i, x, y in self._stream(_Indexed(self.ds), order):
                want[0] = max(0, min(keep_blocks - n, len(x)))
                with autocast(self.device, self.amp):
                    out.append(m(x).float())
                if n < keep_images:
                    xs.append(x[:keep_images - n])
                idx.append(i)
                ys.append(y)
                n += len(x)
        finally:
            for h in hooks:
                h.remove()
        self.order = torch.cat(idx).tolist()  # dataset indices of the readable images, in scoring order
        self.size, self.skipped = len(self.order), len(order) - len(self.order)
        self.ref, self.y = torch.cat(out), torch.cat(ys)
        self.x = torch.cat(xs) if xs else self.ref.new_empty((0, *shape))
        keep_blocks = min(keep_blocks, self.size)
        self.cache = [torch.empty(0)] + [torch.cat(g)[:keep_blocks] for g in got[1:]] if keep_blocks else []
        self.cached_bytes = sum(t.numel() * t.element_size() for t in (self.ref, self.y, self.x, *self.cache))

    def _stream(self, ds: Dataset, order: list[int], key: tuple[int, int] | None = None) -> Iterator[Any]:
        """Batches of ds[order] moved to the model's device (the loader, and its workers, kept under key)."""
        dl = self._loaders.get(key) if key is not None else None
        if dl is None:
            dl = loader(Subset(ds, order), self.batch_size, workers=self.workers, pin_memory=self.device.type == "cuda")
            if key is not None:
                self._loaders[key] = dl
        for batch in dl:
            yield [t.to(self.device, non_blocking=True) for t in batch]

    def _inputs(self, n: int) -> Iterator[torch.Tensor]:
        """Image batches of the first n images: kept ones first, then the rest streamed."""
        kept = min(n, len(self.x))
        for i in range(0, kept, self.batch_size):
            yield self.x[i:min(i + self.batch_size, kept)]
        if n > kept:
            for x, _ in self._stream(self.ds, self.order[kept:n], (kept, n)):
                yield x

    # ---- scoring ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _logits(self, n: int, start: int = 0) -> torch.Tensor:
        out, m = [], self.model
        with autocast(self.device, self.amp):
            if start == 0:
                for x in self._inputs(n):
                    out.append(m(x).float())
                return torch.cat(out)
            for i in range(0, n, self.batch_size):
                out.append(forward_from(m, self.cache[start][i:min(i + self.batch_size, n)], start).float())
        return torch.cat(out)

    def _start(self, s: Schedule) -> int:
        """The first block that removes tokens or heads (the ones before it equal the uncompressed model's)."""
        heads = s.kept_heads(self.dims.attn_heads)
        return next((i for i, (m, h) in enumerate(zip(s.merge, heads)) if m < self.dims.tokens
                     or h < self.dims.attn_heads), len(s))

    def _cache_agrees(self) -> bool:
        d, k = self.dims, self.dims.depth // 2
        if k == 0 or d.tokens - d.prefix < 3:
            return False
        keep = [d.tokens] * k + [d.tokens - 1] * (d.depth - k)
        s = Schedule(keep, keep)
        with self.apply(self.model, s):
            if not is_patched(self.model):
                return False
            n = min(8, len(self.cache[k]))
            return torch.allclose(self._logits(n, k), self._logits(n), atol=1e-4, rtol=1e-4)

    def _per_image(self, logits: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        logp, ref_logp = F.log_softmax(logits, -1), self.ref_logp[:n]
        pred = logits.argmax(-1)
        return {"kl": (ref_logp.exp() * (ref_logp - logp)).sum(-1).cpu(),
                "agree": (pred == ref_logp.argmax(-1)).float().cpu(), "acc": (pred == self.y[:n]).float().cpu()}

    def per_image(self, schedule: Schedule, n: int | None = None) -> dict[str, torch.Tensor]:
        """Per-image kl, agree and acc ([n] CPU tensors) of the model compressed by schedule on the first n images."""
        n = self.size if n is None else min(n, self.size)
        if schedule.heads is not None and self.head_order is not None:
            schedule = schedule.with_heads(schedule.heads, self.head_order)
        start = self._start(schedule)
        if start == len(schedule):
            return self._per_image(self.ref[:n], n)
        with self.apply(self.model, schedule):
            return self._per_image(self._logits(n, start if self.cache and n <= len(self.cache[-1]) else 0), n)

    def __call__(self, schedule: Schedule, n: int | None = None) -> dict[str, float]:
        """Scores of the model compressed by schedule on the first n images (all when None)."""
        return _means(self.per_image(schedule, n))


def joint_scorer(model: torch.nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor], importance: torch.Tensor,
                 method: str = "fisher", info: dict[str, Any] | None = None, **kwargs: Any) -> ReferenceScorer:
    """A ReferenceScorer of schedules with kept heads, ranked by `importance` [blocks, heads] (recorded in its info,
    so the search's table carries it); kwargs are ReferenceScorer's and tcl.patch's keywords."""
    from ..compress.joint import check_importance, head_order

    imp = check_importance(model, importance)
    order = head_order(imp)
    info = {**(info or {}), "head_importance": {"method": method, "scores": imp.tolist(), "order": order}}
    return ReferenceScorer(model, data, info=info, head_order=order, **kwargs)
