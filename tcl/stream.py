"""Data plumbing of the per-class steps: labels without images, subsets, batches streamed (in order or at sampled
indices) and moved to a device.

Data is a map-style Dataset (TensorDataset, ImageFolder, Subset, ...), a DataLoader (its dataset, read with its
workers, pinned memory and collate) or an (images, labels) tensor pair; nothing stacks a whole Dataset into one tensor.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .utils import device_of

Data = Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor]
Amp = Literal["bf16", "fp16"] | None


def tensor_pair(data: Data) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (images, labels) tensors of a tensor pair or TensorDataset (None for any other data)."""
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise ValueError("tensor data must be an (images, labels) pair; or pass a Dataset / DataLoader")
        return data
    if hasattr(data, "tensors"):
        return data.tensors[0], data.tensors[1]  # type: ignore[attr-defined]
    return None


def dataset_of(data: Data) -> Dataset:
    """The map-style dataset of data (a DataLoader's own dataset); ValueError for anything else."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(ds, Dataset) or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise ValueError(f"data must be a map-style Dataset, a DataLoader over one or an (images, labels) pair, "
                         f"got {type(ds).__name__}")
    return ds


def _loader(data: Data, ds: Dataset, **kw: Any) -> DataLoader:
    """A DataLoader over ds with data's loading settings when data is a DataLoader (workers, pinned memory, collate)."""
    if isinstance(data, DataLoader):
        kw = {"num_workers": data.num_workers, "pin_memory": data.pin_memory, "collate_fn": data.collate_fn,
              "worker_init_fn": data.worker_init_fn, **kw}
    return DataLoader(ds, **kw)


def n_items(data: Data) -> int:
    """Number of items in data."""
    pair = tensor_pair(data)
    return len(pair[1]) if pair is not None else len(dataset_of(data))  # type: ignore[arg-type]


def labels(data: Data) -> torch.Tensor:
    """The labels of data in dataset order ([N] long, CPU), read from the dataset's own record where it keeps one
    (TensorDataset, ImageFolder `targets`, Subset); any other dataset is read once, item by item."""
    ds = data if isinstance(data, tuple) else dataset_of(data)
    pair = tensor_pair(ds)
    if pair is not None:
        return pair[1].cpu()
    if isinstance(ds, Subset):
        return labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if getattr(ds, "targets", None) is not None:
        return torch.as_tensor(ds.targets)  # type: ignore[attr-defined]
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def subset(data: Data, idx: torch.Tensor | Sequence[int]) -> Data:
    """Items idx of data, as the same kind of data (tensor pairs stay tensors, a DataLoader keeps its settings)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    pair = tensor_pair(data)
    if pair is not None:
        return pair[0][idx], pair[1][idx.to(pair[1].device)]
    sub = Subset(dataset_of(data), idx.tolist())
    return _loader(data, sub, batch_size=data.batch_size or 1) if isinstance(data, DataLoader) else sub


def batches(data: Data, batch_size: int = 256, limit: int | None = None,
            device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of data in dataset order (the first `limit` items), moved to device."""
    pair, n = tensor_pair(data), n_items(data) if limit is None else min(limit, n_items(data))
    if pair is not None:
        for s in range(0, n, batch_size):
            yield pair[0][s:s + batch_size].to(device), pair[1][s:s + batch_size].to(device)
        return
    ds = dataset_of(data)
    ds = ds if n == len(ds) else Subset(ds, range(n))  # type: ignore[arg-type]
    for x, y in _loader(data, ds, batch_size=batch_size, shuffle=False):
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


def sampled(data: Data, index_batches: Sequence[torch.Tensor],
            device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of data at the given index lists, in order, moved to device (a Dataset through a DataLoader)."""
    pair = tensor_pair(data)
    if pair is not None:
        for idx in index_batches:
            yield pair[0][idx].to(device), pair[1][idx.to(pair[1].device)].to(device)
        return
    for x, y in _loader(data, dataset_of(data), batch_sampler=[i.tolist() for i in index_batches]):
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


def moved(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    """model itself when it is on device (or device is None), else a copy of it there."""
    if device is None or device_of(model) == torch.device(device):
        return model
    return copy.deepcopy(model).to(device)
