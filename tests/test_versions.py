"""The declared timm floor: one number in pyproject.toml and environment.yml, met by the timm under test."""
from __future__ import annotations

import re
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]


def floor(text: str) -> tuple[int, ...]:
    found = re.findall(r"^\s*(?:- )?\"?timm>=([0-9.]+)", text, flags=re.M)
    assert len(found) == 1, f"expected one timm>=X line, found {found}"
    return tuple(int(p) for p in found[0].split("."))


def test_timm_floor_is_declared_once_and_met() -> None:
    declared = floor((ROOT / "pyproject.toml").read_text())
    assert floor((ROOT / "environment.yml").read_text()) == declared
    running = tuple(int(p) for p in re.match(r"[0-9.]+", timm.__version__).group().rstrip(".").split("."))
    assert running >= declared, f"timm {timm.__version__} is older than the declared floor {declared}"
