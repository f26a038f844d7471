"""The shipped Fashion-MNIST reference ViT: its data facts, model config, weights and training recipe (the only place
that knows them). Importing it registers `tcl.data.split("fashion_mnist", ...)` and `tcl.models.create("reference")`."""
from __future__ import annotations

from .. import data as _data
from .. import models as _models
from .data import (DEBIAN_ROOT, FMNIST_CLASSES, FMNIST_FILES, FMNIST_MEAN, FMNIST_STD, HELDOUT_SEED, HELDOUT_SIZE,
                   fashion_mnist, heldout_indices, load_arrays, read_idx)
from .data import split as _split
from .model import REFERENCE_CONFIG, WEIGHTS, build_reference, load, reference_config

__all__ = ["DEBIAN_ROOT", "FMNIST_CLASSES", "FMNIST_FILES", "FMNIST_MEAN", "FMNIST_STD", "HELDOUT_SEED", "HELDOUT_SIZE",
           "fashion_mnist", "heldout_indices", "load_arrays", "read_idx", "REFERENCE_CONFIG", "WEIGHTS",
           "build_reference", "load", "reference_config"]

_data.register("fashion_mnist", _split)
_models.register(("reference", "tcl_reference"), load)
