"""The one data layer: built-in datasets by name (sklearn digits; Fashion-MNIST from tcl.reference), or an ImageNet-layout folder.

`split(data, "search" | "val" | "train", model)` gives any of them by name or path: the search / importance split is a
seeded, class-stratified held-out subset of train; reported numbers use val. Folder images are read lazily with the
model's own eval transform (timm resolve_data_config + create_transform) and streamed by `loader`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data import default_collate

HELDOUT_SEED = 0  # default seed of held-out splits
Which = Literal["search", "train", "val"]
OnBadImage = Literal["fail", "skip"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_HELDOUT_SIZE = 5000


class DataError(ValueError):
    """Raised for data tcl cannot use: a missing or malformed folder, an unreadable image, images the model cannot take."""


class DataNotFoundError(DataError, FileNotFoundError):
    """Raised when a dataset (a built-in dataset's files, an image folder) cannot be found."""


def digits(split: Literal["train", "test"] = "train", size: int = 16) -> TensorDataset:
    """sklearn's 8x8 digits upsampled to size x size, 1 channel; a 1,437/360 train/test split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    idx = perm[:1437] if split == "train" else perm[1437:]
    return TensorDataset((x[idx] - 0.5) / 0.5, torch.tensor(y, dtype=torch.long)[idx])


def image_folder(root: str | os.PathLike, model: torch.nn.Module | None = None,
                 input_size: int = 224) -> Dataset:
    """An ImageFolder with timm's eval transforms (derived from the model's pretrained_cfg when given)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise DataNotFoundError(f"{root} is not a folder; pass the path of an ImageFolder tree (root/class/img.jpg)")
    cfg = resolve_data_config({}, model=model) if model is not None else {"input_size": (3, input_size, input_size)}
    return ImageFolder(str(root), transform=create_transform(**cfg, is_training=False))


# ---- ImageNet-layout folders ----------------------------------------------------------------------------------
def scan_split(split_dir: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(image path, class index)]) of ROOT/<split>/<class>/... (class index = sorted position)."""
    if not split_dir.is_dir():
        raise DataNotFoundError(f"{split_dir} does not exist; an image folder needs ImageNet layout: "
                                f"{split_dir.parent}/train/<class>/<image> and {split_dir.parent}/val/<class>/<image>")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataNotFoundError(f"{split_dir} holds no class folders; put each class's images in "
                                f"{split_dir}/<class name>/")
    if classes is not None and found != list(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DataError(f"{split_dir} has other class folders than train/ (missing {missing[:5]}, extra {extra[:5]}); "
                        "val/ and train/ need the same class folder names")
    samples: list[tuple[str, int]] = []
    for k, name in enumerate(found):
        files = sorted(e.path for e in os.scandir(split_dir / name)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            "add images or remove the folder")
        samples += [(f, k) for f in files]
    return found, samples


def _collate(batch: list[Any]) -> Any:
    """default_collate over the items that are not None (images skipped as unreadable)."""
    items = [b for b in batch if b is not None]
    if not items:
        raise DataError("every image of a batch was unreadable; check the image files (see the warnings above)")
    return default_collate(items)


class FolderImages(Dataset):
    """Images read lazily (PIL, RGB) through transform; an unreadable file fails with its name, or is skipped
    (None, dropped by `loader`, with a warning) when on_bad_image='skip'."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Any,
                 on_bad_image: OnBadImage = "fail"):
        if on_bad_image not in ("fail", "skip"):
            raise DataError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
        self.samples, self.classes, self.transform, self.on_bad_image = list(samples), list(classes), transform, on_bad_image

    @property
    def targets(self) -> list[int]:
        """The class index of every image, in order."""
        return [k for _, k in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ... for broken files
            if self.on_bad_image == "skip":
                warnings.warn(f"skipped unreadable image {path} ({type(e).__name__}: {e})", stacklevel=2)
                return None
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or delete the file, "
                            "or pass on_bad_image='skip' (--on-bad-image skip) to skip unreadable images") from None
        return self.transform(img), label


def model_transform(model: torch.nn.Module, crop_pct: float | None = None, interpolation: str | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> tuple[Any, dict[str, Any]]:
    """(eval transform, its resolved config) from the model's pretrained_cfg at the model's own input size;
    crop_pct, interpolation, mean, std override it."""
    from timm.data import create_transform, resolve_data_config

    args = {k: v for k, v in dict(crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std,
                                  input_size=model_input(model)).items() if v is not None}
    cfg = resolve_data_config({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in args.items()}, model=model)
    cfg = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}
    return create_transform(**cfg, is_training=False), {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def stratified_heldout(labels: Sequence[int], size: int, seed: int = HELDOUT_SEED) -> np.ndarray:
    """Sorted indices of a seeded held-out subset of `size` items whose class counts are proportional to the labels'
    (largest remainder; ties to the lower class index)."""
    labels = np.asarray(labels)
    if not 0 < size <= len(labels):
        raise DataError(f"held-out size {size} must be between 1 and the {len(labels)} training images; "
                        "pass a smaller heldout_size (--heldout-size)")
    classes, counts = np.unique(labels, return_counts=True)
    quota = size * counts / len(labels)
    take = np.floor(quota).astype(int)
    order = sorted(range(len(classes)), key=lambda k: (-(quota[k] - take[k]), k))
    take[order[:size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _digits_split(which: Which, heldout_size: int | None) -> tuple[Dataset, dict[str, Any]]:
    """(dataset, info) of split("digits", which): search and train are its train part (search: first heldout_size)."""
    ds = digits("test" if which == "val" else "train")
    if which == "search" and heldout_size is not None:
        ds = TensorDataset(*(t[:heldout_size] for t in ds.tensors))
    ds.classes = [str(k) for k in range(10)]  # type: ignore[attr-defined]
    return ds, {"name": "digits", "split": "test" if which == "val" else "train"}


Builtin = Callable[[Which, "int | None"], "tuple[Dataset, dict[str, Any]]"]
BUILTINS: dict[str, Builtin] = {"digits": _digits_split}  # tcl.reference adds "fashion_mnist"


def register(name: str, split_fn: Builtin) -> None:
    """Make split(name, which) a built-in dataset read by split_fn(which, heldout_size)."""
    BUILTINS[name] = split_fn


def is_folder(data: str | os.PathLike) -> bool:
    """Whether data names an image folder (anything but the built-in dataset names)."""
    return str(data) not in BUILTINS


def split(data: str | os.PathLike, which: Which, model: torch.nn.Module | None = None, *,
          heldout_size: int | None = None, heldout_seed: int = HELDOUT_SEED, on_bad_image: OnBadImage = "fail",
          crop_pct: float | None = None, interpolation: str | None = None, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None) -> tuple[Dataset, dict[str, Any]]:
    """(dataset, info recorded in tables) of a built-in dataset name ('fashion_mnist', 'digits') or an ImageNet-layout folder path.

    which='search': the held-out split of train (folders: `heldout_size` images, default 5,000, class-stratified and
    seeded; built-ins: their fixed held-out split, first `heldout_size` images); 'train': the rest of train; 'val':
    the reported split (Fashion-MNIST test, digits test, folder val/). Folders need `model` for the transform.
    """
    if which not in ("search", "train", "val"):
        raise DataError(f"which must be 'search', 'train' or 'val', got {which!r}")
    if str(data) in BUILTINS:
        return BUILTINS[str(data)](which, heldout_size)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is not a folder; pass --data fashion_mnist, digits, or the path of an image "
                                "folder in ImageNet layout (ROOT/train/<class>/<image>, ROOT/val/<class>/<image>)")
    if model is None:
        raise DataError("reading an image folder needs the model (its pretrained_cfg gives the eval transform); "
                        "pass model=")
    classes, train = scan_split(root / "train")
    transform, tcfg = model_transform(model, crop_pct, interpolation, mean, std)
    info = {"name": "folder", "root": str(root.resolve()), "classes": len(classes), "transform": tcfg,
            "on_bad_image": on_bad_image}
    if which == "val":
        samples = scan_split(root / "val", classes)[1]
        return FolderImages(samples, classes, transform, on_bad_image), {**info, "split": "val", "images": len(samples)}
    scan_split(root / "val", classes)  # a folder without a usable val/ fails before any search starts
    size = FOLDER_HELDOUT_SIZE if heldout_size is None else heldout_size
    held = stratified_heldout([k for _, k in train], min(size, len(train)) if heldout_size is None else size,
                              heldout_seed)
    mask = np.zeros(len(train), dtype=bool)
    mask[held] = True
    idx = np.flatnonzero(mask if which == "search" else ~mask)
    if not len(idx):
        raise DataError(f"all {len(train)} images of {root / 'train'} are in the held-out search split, none is left "
                        f"for the train split; pass a heldout_size below {len(train)} (--heldout-size)")
    info = {**info, "split": "heldout" if which == "search" else "train", "train_images": len(train),
            "heldout_size": int(mask.sum()), "heldout_seed": heldout_seed}
    return FolderImages([train[i] for i in idx], classes, transform, on_bad_image), info


def class_names(ds: Dataset) -> list[str]:
    """The class names of a dataset from `split` (its `classes`: folder names, a built-in's names), else []."""
    return [str(c) for c in getattr(ds, "classes", [])]


def model_input(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """(channels, height, width) a timm ViT takes, or None where it is not fixed (dynamic_img_size)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_size", False) or getattr(pe, "img_size", None) is None:
        return None
    return (pe.proj.in_channels, *pe.img_size)


def check_input(model: torch.nn.Module, shape: Sequence[int], what: str = "the data") -> None:
    """Raise DataError unless images of shape (C, H, W) fit the model."""
    want = model_input(model)
    if want is not None and tuple(shape) != want:
        got, exp = "x".join(map(str, shape)), "x".join(map(str, want))
        raise DataError(f"{what} gives {got} images but the model takes {exp}; pass data made for this model (an "
                        f"image folder is read at the model's own input size) or a model built for {got} images "
                        "(e.g. img_size=, in_chans= in the model kwargs)")


def first_shape(ds: Dataset) -> tuple[int, ...]:
    """Shape of the first readable item's image."""
    for i in range(len(ds)):  # type: ignore[arg-type]
        item = ds[i]
        if item is not None:
            return tuple(item[0].shape)
    raise DataError("the dataset holds no readable image; check the image files")


def loader(ds: Dataset, batch_size: int = 256, shuffle: bool = False, limit: int | None = None,
           seed: int = 0, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A deterministic, streaming DataLoader over ds (first `limit` items when given); unreadable images are dropped."""
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      pin_memory=pin_memory, collate_fn=_collate, persistent_workers=workers > 0)

