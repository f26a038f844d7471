"""tcl: token compression and head modularization for Vision Transformers, without fine-tuning."""
from . import data, evaluate, models, schedule
from .schedule import Schedule, ScheduleError, macs
from . import tokens
from .patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["data", "evaluate", "models", "schedule", "Schedule", "ScheduleError", "macs"]
from . import heads


def __getattr__(name: str):  # tcl.search loads on first use, so `python -m tcl.search` does not import it twice
    if name == "search":
        import importlib

        return importlib.import_module(".search", __name__)
    raise AttributeError(f"module 'tcl' has no attribute {name!r}")
