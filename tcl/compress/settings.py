"""Patch settings: which token-reduction op a schedule is applied with (`tcl.patch` options), typed and JSON-able.

A Schedule made by a method's constructor (Schedule.tome, Schedule.evit) and a LookupTable's selections carry the
settings they belong to, so `tcl.patch(model, schedule)` applies exactly that op; keyword arguments that contradict
carried settings are refused unless override=True.

merge: 'tome' is ToMe's bipartite soft matching (facebookresearch/ToMe, all tokens split alternately, the class token
kept out by its score); 'bipartite' is tcl's variant (only the non-protected tokens split alternately); 'attention'
merges the lowest-importance kept tokens each into its most similar higher-importance one (size-weighted);
'diffrate' is DiffRate's inference op (OpenGVLab/DiffRate: prune, then an unweighted mean into the most similar
high-attention token, sizes scaled by the match similarity). fuse: 'evit' folds pruned tokens into one token, the
class-attention-weighted sum (EViT); 'mean' is tcl's variant (the attention-weighted mean, with token sizes).
similarity None means the merge's own metric: the block's features for 'diffrate', head-mean keys otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

from .tokens import MAX_BIPARTITE_SHARE

MergeKind = Literal["attention", "bipartite", "tome", "diffrate"]
Fuse = Literal["none", "evit", "mean"]
Similarity = Literal["keys", "head_keys", "features"]
Order = Literal["prune_merge", "merge_prune"]
_KINDS: dict[str, Any] = {"merge": MergeKind, "fuse": Fuse, "similarity": Similarity, "order": Order}


class SettingsError(ValueError):
    """Raised for unknown patch settings, or keyword arguments that contradict a schedule's carried settings."""


@dataclass(frozen=True)
class PatchSettings:
    """The op a schedule is applied with (see the module docstring); defaults are tcl.patch's defaults."""

    merge: MergeKind = "attention"
    fuse: Fuse = "none"
    prop_attn: bool = True
    similarity: Similarity | None = None  # None: the merge's own metric (see `metric`)
    order: Order = "prune_merge"

    def __post_init__(self) -> None:
        if isinstance(self.fuse, bool):  # fuse=True is EViT's fused token, False none
            object.__setattr__(self, "fuse", "evit" if self.fuse else "none")
        for name, kind in _KINDS.items():
            value, allowed = getattr(self, name), get_args(kind)
            if not (value in allowed or (name == "similarity" and value is None)):
                raise SettingsError(f"{name}={value!r} is not one of {allowed}")
        if not isinstance(self.prop_attn, bool):
            raise SettingsError(f"prop_attn must be True or False, got {self.prop_attn!r}")
        if self.merge == "diffrate" and (self.order != "prune_merge" or self.fuse != "none"):
            raise SettingsError("merge='diffrate' is DiffRate's prune-then-merge step: use order='prune_merge' and "
                                "fuse='none'")

    @property
    def metric(self) -> Similarity:
        """The similarity merges match by: the given one, else the merge's own."""
        if self.similarity is not None:
            return self.similarity
        return "features" if self.merge == "diffrate" else "keys"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (similarity None stays None: the merge's own)."""
        return dataclasses.asdict(self)

    @property
    def max_merge(self) -> float:
        """The most of the non-protected tokens one merge step can remove: half for bipartite matching, else all."""
        return MAX_BIPARTITE_SHARE if self.merge in ("bipartite", "tome") else 1.0

    def kwargs(self) -> dict[str, Any]:
        """The tcl.patch keyword arguments that reproduce these settings."""
        return {**self.to_dict(), "similarity": self.metric}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PatchSettings":
        """Inverse of to_dict (also accepts a partial dict of tcl.patch kwargs; trace_source is not a setting)."""
        if not isinstance(d, Mapping):
            raise SettingsError(f"patch settings are a dict of tcl.patch options, got {str(d)[:80]}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"trace_source"}
        if unknown:
            raise SettingsError(f"unknown patch setting(s) {sorted(unknown)}; use {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_v1(cls, d: Mapping[str, Any]) -> "PatchSettings":
        """Settings of a version-1 table's data['patch'] kwargs: there fuse=True meant tcl's mean, now fuse='mean'
        ('bipartite' keeps its meaning, tcl's split; missing keys were tcl.patch's defaults, which are unchanged)."""
        d = dict(d)
        if "fuse" in d and isinstance(d["fuse"], bool):
            d["fuse"] = "mean" if d["fuse"] else "none"
        return cls.from_dict(d)

    def resolve(self, given: Mapping[str, Any], override: bool = False) -> "PatchSettings":
        """These carried settings with explicit kwargs applied: a contradicting kwarg raises unless override."""
        new = dataclasses.replace(self, **given)
        if not override:
            for k in given:
                mine, theirs = ((self.metric, new.metric) if k == "similarity" else (getattr(self, k), getattr(new, k)))
                if mine != theirs:
                    raise SettingsError(f"the schedule carries {k}={mine!r} (the op it was made or searched with), "
                                        f"which {k}={given[k]!r} contradicts; drop that keyword, or pass override=True "
                                        "to apply it instead")
        return new
