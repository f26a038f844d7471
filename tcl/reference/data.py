"""Fashion-MNIST, the reference model's data: IDX files, the fixed held-out split of train, normalisation facts."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..data import DataNotFoundError, Which

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
HELDOUT_SIZE, HELDOUT_SEED = 5000, 0

Split = Literal["train", "heldout", "search", "test"]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file; re-install the dataset files")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} bytes); re-install the dataset files")
    return arr.reshape(shape)


def _candidate_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = [Path(root)] if root is not None else []
    if env := os.environ.get("TCL_DATA"):
        roots.append(Path(env))
    roots.append(DEBIAN_ROOT)
    return roots


def _find_root(root: str | os.PathLike | None, download: bool) -> Path:
    needed = [f for pair in FMNIST_FILES.values() for f in pair]
    for r in _candidate_roots(root):
        for d in (r, r / "FashionMNIST" / "raw"):
            if all((d / f).exists() for f in needed):
                return d
    if download:
        target = Path(root) if root is not None else Path.home() / ".cache" / "tcl"
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
            return target / "FashionMNIST" / "raw"
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            raise DataNotFoundError(_advice(root) + f" (download failed: {e})") from e
    raise DataNotFoundError(_advice(root))


def _advice(root: str | os.PathLike | None) -> str:
    tried = ", ".join(str(r) for r in _candidate_roots(root))
    return ("Fashion-MNIST IDX files not found (looked in " + tried + "). Install them with "
            "`sudo apt-get install dataset-fashion-mnist`, pass root= a folder holding the four "
            "*-ubyte.gz files, set TCL_DATA, or call with download=True on a machine with internet.")


def load_arrays(train: bool, root: str | os.PathLike | None = None,
                download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) of the Fashion-MNIST train or test set."""
    d = _find_root(root, download)
    img, lab = FMNIST_FILES["train" if train else "test"]
    x, y = read_idx(d / img), read_idx(d / lab).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{d}: {x.shape[0]} images but {y.shape[0]} labels; re-install the dataset files")
    return x, y


def heldout_indices(n_train: int = 60000, size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> np.ndarray:
    """Indices of the fixed, seeded held-out split of the training set (sorted)."""
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[:size])


def _to_tensor(x: np.ndarray, normalize: bool) -> torch.Tensor:
    t = torch.from_numpy(x.copy()).float().div_(255).unsqueeze(1)
    return (t - FMNIST_MEAN[0]) / FMNIST_STD[0] if normalize else t


def fashion_mnist(split: Split = "test", root: str | os.PathLike | None = None, download: bool = False,
                  normalize: bool = True, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST as tensors: 'train' (55k, minus held-out), 'heldout'/'search' (5k of train), 'test' (10k)."""
    if split not in ("train", "heldout", "search", "test"):
        raise ValueError(f"split must be 'train', 'heldout' (alias 'search') or 'test', got {split!r}")
    x, y = load_arrays(split != "test", root, download)
    if split != "test":
        held = heldout_indices(len(x))
        mask = np.zeros(len(x), dtype=bool)
        mask[held] = True
        idx = np.nonzero(mask if split in ("heldout", "search") else ~mask)[0]
        x, y = x[idx], y[idx]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(_to_tensor(x, normalize), torch.from_numpy(y.copy()))


def split(which: Which, heldout_size: int | None = None) -> tuple[Dataset, dict[str, Any]]:
    """(dataset, info) of tcl.data.split("fashion_mnist", which): search = the held-out split (first heldout_size)."""
    part = {"search": "heldout", "train": "train", "val": "test"}[which]
    ds = fashion_mnist(part, limit=heldout_size if which == "search" else None)  # type: ignore[arg-type]
    ds.classes = list(FMNIST_CLASSES)  # type: ignore[attr-defined]
    info = {"name": "fashion_mnist", "split": part}
    return ds, {**info, "heldout_size": HELDOUT_SIZE, "heldout_seed": HELDOUT_SEED} if which != "val" else info


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Check that Fashion-MNIST is available.")
    ap.add_argument("--check", action="store_true", help="exit non-zero (with advice) when the data is missing")
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    try:
        print(f"Fashion-MNIST found in {_find_root(args.root, download=False)}")
    except DataNotFoundError as err:
        raise SystemExit(str(err))
