"""Head modularization, by step: gates, gradient-reset training, importance scores, physical pruning with folded
gates, class modules, composition, metrics.

Data is a Dataset, a DataLoader or an (images, labels) pair (see `tcl.stream`), streamed in batches to the model's
device. Functions that change a model in place (insert_gates, reset_train, head_importance) run where the model is;
functions that copy it take `device` (default: the model's device). `amp` ("bf16"; "fp16" for forward-only passes;
None = float32) autocasts the forwards. Small results (gates, masks, importances, scores) come back on the CPU.
"""
from __future__ import annotations

from ..vit import attend
from .compose import *  # noqa: F401,F403
from .compose import __all__ as _compose
from .gates import *  # noqa: F401,F403
from .gates import Target
from .gates import __all__ as _gates
from .importance import *  # noqa: F401,F403
from .importance import __all__ as _importance
from .metrics import *  # noqa: F401,F403
from .metrics import __all__ as _metrics
from .module import *  # noqa: F401,F403
from .module import Method
from .module import __all__ as _module
from .objective import *  # noqa: F401,F403
from .objective import __all__ as _objective
from .prune import *  # noqa: F401,F403
from .prune import __all__ as _prune
from .reset import *  # noqa: F401,F403
from .reset import __all__ as _reset

__all__ = ["Target", "Method", "attend", *_gates, *_objective, *_reset, *_importance, *_prune, *_module, *_compose, *_metrics]
