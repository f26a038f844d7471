"""tcl: token compression and head modularization for Vision Transformers, without fine-tuning."""
from . import data, evaluate, heads, models, modules, schedule, settings, table, tokens
from .patch import patch, unpatch
from .schedule import Schedule, ScheduleError, macs

__version__ = "0.1.0"
__all__ = ["data", "evaluate", "heads", "models", "modules", "schedule", "settings", "table", "tokens", "search",
           "patch", "unpatch", "Schedule", "ScheduleError", "macs"]


def __getattr__(name: str):  # tcl.search loads on first use, so `python -m tcl.search` does not import it twice
    if name == "search":
        import importlib

        return importlib.import_module(".search", __name__)
    raise AttributeError(f"module 'tcl' has no attribute {name!r}")
