"""Small shared helpers: atomic file writes, metrics records, run-output folders."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path via a temp file + rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def run_dir(path: str | os.PathLike) -> Path:
    """A run-output folder, moved under $TCL_RUNS when set (so tests leave `make reproduce` outputs alone):
    with TCL_RUNS=/x, ../runs/a/b -> /x/a/b; paths without a `runs` folder stay as they are."""
    path, root = Path(path), os.environ.get("TCL_RUNS")
    if not root or "runs" not in path.parts:
        return path
    return Path(root).joinpath(*path.parts[path.parts.index("runs") + 1:])


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write obj as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
