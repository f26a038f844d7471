"""tcl: token compression and head modularization for Vision Transformers, without fine-tuning."""
from . import data, evaluate, models, schedule
from .schedule import Schedule, ScheduleError, macs
from . import tokens
from .patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["data", "evaluate", "models", "schedule", "Schedule", "ScheduleError", "macs"]
from . import heads
from . import search
