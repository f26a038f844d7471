"""tcl: token compression and head modularization for Vision Transformers, without fine-tuning."""
from . import data, evaluate, heads, models, reference
from .compress import schedule, settings, table, tokens
from .compress.patch import forward_from, patch, patch_state, unpatch
from .compress.schedule import Schedule, ScheduleError, macs

modules = heads  # the former name of the head-module half of tcl.heads

__version__ = "0.1.0"
__all__ = ["data", "evaluate", "heads", "models", "modules", "reference", "schedule", "settings", "table", "tokens",
           "search", "scorer", "patch", "unpatch", "patch_state", "forward_from", "Schedule", "ScheduleError", "macs"]


def __getattr__(name: str):  # tcl.search loads on first use, so `python -m tcl.search` does not import it twice
    import importlib

    if name in ("search", "scorer"):
        return importlib.import_module(".search" if name == "search" else ".search.scorer", __name__)
    raise AttributeError(f"module 'tcl' has no attribute {name!r}")
