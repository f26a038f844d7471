"""The ToMe, EViT and DiffRate modes equal test-local restatements of their official code (reference_methods.py),
op by op on random tensors and end to end on small timm ViTs; schedules and tables carry the settings they belong to."""
from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import reference_methods as ref
import tcl
from tcl import tokens
from tcl.compress.schedule import Schedule, ScheduleError, vit_dims
from tcl.compress.settings import PatchSettings, SettingsError

SETTINGS = settings(max_examples=40, deadline=None)
ATOL = 1e-5


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def vit(kind: str = "cls", depth: int = 4, dim: int = 48, heads: int = 3, patch: int = 8, img: int = 32,
        seed: int = 0) -> VisionTransformer:
    """A random-weight timm ViT: 'cls', 'distilled' (DeiT dist token) or 'avg' (no class token, average pooling)."""
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"class_token": False, "global_pool": "avg"} if kind == "avg" else {}
    cls = VisionTransformerDistilled if kind == "distilled" else VisionTransformer
    model = cls(img_size=img, patch_size=patch, num_classes=7, embed_dim=dim, depth=depth, num_heads=heads, **kw)
    model.pretrained_cfg = {"input_size": (3, img, img), "architecture": f"tiny_{kind}"}
    return model.eval()


def images(n: int = 4, img: int = 32, seed: int = 1) -> torch.Tensor:
    return _rand(seed, n, 3, img, img)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- ops on random tensors -----------------------------------------------------------------------------------------
@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(3, 30), flags=st.sampled_from([(False, False), (True, False), (True, True)]),
       seed=st.integers(0, 2**30), data=st.data())
def test_tome_merge_equals_the_restated_bipartite_soft_matching(b: int, n: int, flags: tuple[bool, bool], seed: int,
                                                                 data: st.DataObject) -> None:
    cls, dist = flags
    r = data.draw(st.integers(0, (n - cls - dist) // 2))
    x, metric = _rand(seed, b, n, 6), _rand(seed + 1, b, n, 4)
    size = torch.randint(1, 5, (b, n, 1), generator=torch.Generator().manual_seed(seed + 2)).float()
    f = tokens.tome_merge(metric, r, cls, dist)
    want_x, want_size = ref.tome_merge(x, size, metric, r, cls, dist)
    got_x, got_size = tokens.merge_wavg(f, x, size)
    assert got_x.shape == want_x.shape and max_diff(got_x, want_x) <= ATOL and torch.equal(got_size, want_size)
    # the class token stays first, the distillation token second
    pos = f(torch.arange(n, dtype=torch.float).expand(b, n).unsqueeze(-1), torch.ones(b, n, 1))[..., 0]
    assert (pos[:, 0] == 0).all() if cls else True
    assert (pos[:, 1] == 1).all() if dist and r else True


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(3, 30), seed=st.integers(0, 2**30), data=st.data())
def test_evit_prune_is_the_attention_weighted_sum_of_the_inattentive_tokens(b: int, n: int, seed: int,
                                                                             data: st.DataObject) -> None:
    keep = data.draw(st.integers(2, n - 1))
    x, imp = _rand(seed, b, n, 5), _rand(seed + 1, b, n).softmax(-1)
    f, w = tokens.evit_prune(imp, keep, 1)
    got = f(x * w)
    for row in range(b):
        top = imp[row, 1:].topk(keep - 2).indices + 1
        rest = [j for j in range(1, n) if j not in set(top.tolist())]
        want = torch.cat([x[row, :1], x[row, top], (x[row, rest] * imp[row, rest, None]).sum(0, keepdim=True)])
        assert max_diff(got[row], want) <= ATOL
    assert torch.equal(f(torch.ones(b, n, 1)).sum(1), torch.full((b, 1), float(n)))  # sizes (if tracked) add up


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(4, 30), seed=st.integers(0, 2**30), data=st.data())
def test_diffrate_merge_equals_the_restated_step(b: int, n: int, seed: int, data: st.DataObject) -> None:
    p = data.draw(st.integers(3, n))
    m = data.draw(st.integers(2, p - 1))
    x, imp = _rand(seed, b, n, 6), _rand(seed + 1, b, n).softmax(-1)
    size = torch.rand(b, n, 1, generator=torch.Generator().manual_seed(seed + 2)) + 0.5
    f, w = tokens.diffrate_merge(imp, x, p, m, 1)
    got_x, got_size = f(x, torch.ones_like(w)), f(size * w)
    for row in range(b):
        order = [0] + (imp[row, 1:].argsort(descending=True) + 1).tolist()[:p - 1]
        xr, sr = x[row, order], size[row, order]
        out_x, out_s, count = xr[:m].clone(), sr[:m].clone(), torch.ones(m, 1)
        unit = xr / xr.norm(dim=-1, keepdim=True)
        best, dst = (unit[m:] @ unit[1:m].T).max(-1)
        for s, d in enumerate((dst + 1).tolist()):
            out_x[d] += xr[m + s]
            out_s[d] += sr[m + s] * best[s]
            count[d] += 1
        assert max_diff(got_x[row], out_x / count) <= ATOL and max_diff(got_size[row], out_s) <= ATOL


# ---- whole models against the restated official forwards -------------------------------------------------------------
SHAPES = [dict(kind="cls"), dict(kind="cls", depth=3, dim=64, heads=4, patch=4),  # 65 tokens
          dict(kind="distilled"), dict(kind="avg"), dict(kind="distilled", depth=3, dim=32, heads=2, patch=4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("r", [1, 3, 6])
def test_tome_schedule_patched_with_no_options_is_tome(shape: dict, r: int) -> None:
    model, x = vit(**shape), images()
    s = Schedule.tome(model, r)
    with torch.no_grad():
        want = ref.tome_forward(model, x, [r] * len(model.blocks))
        got = tcl.patch(model, s)(x)
    assert max_diff(got, want) <= ATOL
    assert list(s.merge) == _tome_counts(model, [r] * len(model.blocks))


def _tome_counts(model: VisionTransformer, r: list[int]) -> list[int]:
    """Tokens after each block of ToMe: r capped at (t - protected) // 2, protected = class + distillation token."""
    protected = (model.cls_token is not None) + (getattr(model, "dist_token", None) is not None)
    t, out = vit_dims(model).tokens, []
    for r_i in r:
        t -= max(0, min(r_i, (t - protected) // 2))
        out.append(t)
    return out


def test_tome_r_forms_follow_tomes_parse_r() -> None:
    model = vit("distilled", depth=6)
    for r, per_block in [(2, [2] * 6), (2.5, [2, 2, 2, 2, 2, 3]), ((4, -1.0), [8, 6, 4, 3, 1, 0]),
                         ((3, 0.5), [1, 1, 2, 3, 4, 5]), ([9, 1], [9, 1, 0, 0, 0, 0])]:
        s = Schedule.tome(model, r)
        assert list(s.merge) == _tome_counts(model, per_block), r
    with pytest.raises(ScheduleError, match="r must be >= 0"):
        Schedule.tome(model, [-1])


def test_tome_on_a_224px_deit_tiny() -> None:
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = images(2, 224)
    with torch.no_grad():
        want = ref.tome_forward(model, x, [8] * 12)
        got = tcl.patch(model, Schedule.tome(model, 8))(x)
    assert max_diff(got, want) <= ATOL


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep", [0.7, 0.5, 0.3])
@pytest.mark.parametrize("shape", [dict(kind="cls"), dict(kind="cls", depth=6, dim=64, heads=4, patch=4)],
                         ids=["17tok", "65tok"])
def test_evit_schedule_patched_with_no_options_is_evit(shape: dict, keep: float, fuse: bool) -> None:
    model, x = vit(**shape), images()
    s = Schedule.evit(model, keep, fuse=fuse)
    layers = s.meta["layers"]
    with torch.no_grad():
        want = ref.evit_forward(model, x, [keep if i in layers else 1.0 for i in range(len(model.blocks))], fuse)
        got = tcl.patch(model, s)(x)
    assert max_diff(got, want) <= ATOL
    if fuse and keep < 1:  # sizes are tracked (the fused token holds the pruned patches), unused with prop_attn=False
        assert tcl.patch_state(model).size[:, -1].min() > 1 and not tcl.patch_state(model).settings.prop_attn


@pytest.mark.parametrize("shape", [dict(kind="cls"), dict(kind="cls", depth=5, dim=64, heads=4, patch=4)],
                         ids=["17tok", "65tok"])
def test_diffrate_op_equals_diffrates_inference(shape: dict) -> None:
    model, x = vit(**shape), images()
    n, depth = vit_dims(model).tokens, len(model.blocks)
    cases = [([n] + [n - 2 * i for i in range(1, depth)], [n - 2 * (i + 1) for i in range(depth)]),  # merging only
             ([n - 3 * i for i in range(depth)], [n - 3 * i - 2 for i in range(depth)]),  # prune and merge
             ([n - 1, n - 1, n // 2] + [n // 3] * (depth - 3), [n - 1, n - 4, n // 3] + [n // 3] * (depth - 3))]
    for prune, merge in cases:
        with torch.no_grad():
            want = ref.diffrate_forward(model, x, prune, merge)
            got = tcl.patch(model, Schedule(prune, merge), merge="diffrate")(x)
        assert max_diff(got, want) <= ATOL, (prune, merge)


def test_baselines_refuse_models_they_do_not_define() -> None:
    dist, avg = vit("distilled"), vit("avg")
    for model in (dist, avg):
        n = vit_dims(model).tokens
        with pytest.raises(ValueError, match="one class token"):
            tcl.patch(model, Schedule([n, n - 4, n - 6, n - 6], [n - 2, n - 6, n - 6, n - 6]), merge="diffrate")
        with pytest.raises(ValueError, match="one class token"):
            tcl.patch(model, Schedule([n, n - 4, n - 4, n - 4], [n, n - 4, n - 4, n - 4]), fuse="evit")
        with pytest.raises(ScheduleError, match="one class token"):
            Schedule.evit(model, 0.7)
    reg = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2).eval()
    with pytest.raises(ValueError, match="register tokens"):
        tcl.patch(reg, Schedule.tome(reg, 2))
    tcl.patch(reg, Schedule.tome(reg, 2), merge="bipartite", override=True)  # tcl's split protects registers
    with pytest.raises(SettingsError, match="order='prune_merge'"):
        tcl.patch(vit(), Schedule.full(vit()), merge="diffrate", order="merge_prune")


def test_tome_keeps_timms_unweighted_average_pooling() -> None:
    model, x = vit("avg"), images()
    tcl.patch(model, Schedule.tome(model, 3))
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model.pool(feats), feats.mean(1))


# ---- settings travel with schedules and tables ---------------------------------------------------------------------
def test_schedules_carry_their_settings_and_contradicting_kwargs_raise() -> None:
    model, x = vit(), images()
    s = Schedule.tome(model, 3)
    assert s.settings == PatchSettings(merge="tome") and Schedule(s.prune, s.merge).settings is None
    with torch.no_grad():
        plain = tcl.patch(model, s)(x)
        assert torch.equal(tcl.patch(model, s, merge="tome", prop_attn=True, similarity="keys")(x), plain)
        with pytest.raises(SettingsError, match="carries merge='tome'.*override=True"):
            tcl.patch(model, s, merge="bipartite")
        with pytest.raises(SettingsError, match="carries similarity='keys'"):
            tcl.patch(model, s, similarity="features")
        other = tcl.patch(model, s, merge="bipartite", override=True)(x)
        assert tcl.patch_state(model).settings.merge == "bipartite" and not torch.allclose(other, plain)
        e = Schedule.evit(model, 0.5, fuse=True)
        assert e.settings == PatchSettings(fuse="evit", prop_attn=False)
        tcl.patch(model, e, fuse=True)  # fuse=True is EViT's fused token
        with pytest.raises(SettingsError, match="carries fuse='evit'"):
            tcl.patch(model, e, fuse="mean")
        # a plain schedule carries nothing: keyword arguments and defaults apply
        tcl.patch(model, Schedule(s.prune, s.merge), merge="bipartite")
        assert tcl.patch_state(model).settings == PatchSettings(merge="bipartite")
    assert Schedule.from_dict(s.to_dict()).settings == s.settings
    assert "settings" not in Schedule(s.prune, s.merge).to_dict()
    with pytest.raises(ScheduleError, match="settings are malformed"):
        Schedule.from_dict({**s.to_dict(), "settings": {"merge": "average"}})


def _table(model: VisionTransformer, version: int, patch: dict[str, Any]) -> dict[str, Any]:
    """A small table dict (the search's JSON layout) of three schedules of the model."""
    from tcl.compress.table import model_info

    n, depth = vit_dims(model).tokens, len(model.blocks)
    scheds = [Schedule([n] + [n - k] * (depth - 1), [n - k] * depth) for k in (2, 4, 6)]
    entries = [{"id": i, "kind": "subset", "macs": tcl.macs(model, s), "fraction": 0.0,
                "scores": {"kl": 0.1 * (i + 1)}, "schedule": s.to_dict()} for i, s in enumerate(scheds)]
    d = {"format": "tcl.lookup_table", "version": version, "model": model_info(model),
         "data": {"patch": patch}, "search": {}, "score": "kl", "entries": entries}
    if version == 2:
        d["settings"] = PatchSettings.from_dict(patch).to_dict()
    return d


@pytest.mark.parametrize("patch", [{"merge": "bipartite", "prop_attn": True}, {"merge": "tome"},
                                   {"fuse": True, "similarity": "features"}, {}])
def test_a_table_applies_the_settings_it_was_searched_with(patch: dict[str, Any]) -> None:
    from tcl.compress.table import LookupTable

    model, x = vit(), images()
    table = LookupTable.from_dict(_table(model, 2, patch), model)
    s = table.select(1.0)
    assert s.settings == PatchSettings.from_dict(patch) == table.settings
    with torch.no_grad():
        got = tcl.patch(model, s)(x)
        want = tcl.patch(model, Schedule(s.prune, s.merge), **patch)(x)
        assert torch.equal(got, want)
        assert torch.equal(tcl.patch(model, s, **table.patch_kwargs)(x), want)
    with pytest.raises(SettingsError, match="contradicts"):
        tcl.patch(model, s, merge="attention" if patch.get("merge") else "tome")
    again = LookupTable.from_dict(table.to_dict(), model)
    assert again.settings == table.settings and table.to_dict()["version"] == 2


def test_version_1_tables_load_and_apply_the_op_they_were_searched_with() -> None:
    from tcl.compress.table import LookupTable

    model, x = vit(), images()
    for patch, want in [({"merge": "bipartite", "prop_attn": True}, PatchSettings(merge="bipartite")),
                        ({"fuse": True}, PatchSettings(fuse="mean")), ({}, PatchSettings())]:
        table = LookupTable.from_dict(_table(model, 1, patch), model)
        assert table.settings == want and table.select(1.0).settings == want
        old_kwargs = {**patch, "fuse": "mean"} if patch.get("fuse") else patch  # v1 fuse=True: tcl's mean
        s = table.select(1.0)
        with torch.no_grad():
            assert torch.equal(tcl.patch(model, s)(x), tcl.patch(model, Schedule(s.prune, s.merge), **old_kwargs)(x))


def test_shipped_v1_tables_apply_tcls_bipartite_split() -> None:
    from pathlib import Path

    from tcl.compress.table import LookupTable

    path = Path(__file__).parent.parent / "results" / "search_random_table.json"  # written by tcl 0.1 (version 1)
    assert '"version": 1,' in path.read_text()
    table = LookupTable.load(path)
    assert table.settings == PatchSettings(merge="bipartite", prop_attn=True)


# ---- DiffRate's published schedules ----------------------------------------------------------------------------------
# kept-token lists of DeiT-S and DeiT-B from DiffRate's compression_rate.json (OpenGVLab/DiffRate), as published
DIFFRATE = {
    "ViT-S-DeiT": {"2.9": {"prune_kept_num": "[197,196,190,168,150,139,129,117,99,78,58,3]",
                           "merge_kept_num": "[197,194,176,156,141,133,121,107,88,64,56,3]"}},
    "ViT-B-DeiT": {"11.5": {"prune_kept_num": "[197,197,197,188,170,154,139,123,107,72,43,3]",
                            "merge_kept_num": "[197,197,192,178,158,145,127,111,94,50,35,3]"}},
}


@pytest.mark.parametrize("name,key,budget,gmacs", [("deit_small_patch16_224", "ViT-S-DeiT", "2.9", 2.905),
                                                   ("deit_base_patch16_224", "ViT-B-DeiT", "11.5", 11.517)])
def test_diffrate_published_schedules_give_the_published_macs(name: str, key: str, budget: str, gmacs: float,
                                                              tmp_path) -> None:
    import json

    from tcl.compress.table import LookupTable

    model = timm.create_model(name, pretrained=False)
    path = tmp_path / "compression_rate.json"
    path.write_text(json.dumps(DIFFRATE))
    for source in (DIFFRATE, path):
        table = LookupTable.from_diffrate(source, model, key)
        s = table.select(1.0)
        assert round(tcl.macs(model, s) / 1e9, 3) == gmacs
        assert s.settings == PatchSettings(merge="diffrate") and table.entries[0]["label"] == budget
    with pytest.raises(KeyError, match="ViT-T-DeiT"):
        LookupTable.from_diffrate(DIFFRATE, model, "ViT-T-DeiT")


def test_diffrate_table_applies_diffrates_op_with_ste_min_counts() -> None:
    from tcl.compress.table import LookupTable

    model, x = vit(depth=4), images()
    published = {"tiny": {"1.0": {"prune_kept_num": "[17, 15, 14, 12]", "merge_kept_num": "[17, 12, 13, 6]"}}}
    table = LookupTable.from_diffrate(published, model, "tiny")
    s = table.select(1.0)
    assert list(s.prune) == [17, 15, 12, 12] and list(s.merge) == [17, 12, 12, 6]  # DiffRate's min(N, prune, merge)
    with torch.no_grad():
        want = ref.diffrate_forward(model, x, [17, 15, 14, 12], [17, 12, 13, 6])
        assert max_diff(tcl.patch(model, s)(x), want) <= ATOL


@pytest.mark.parametrize("patch", [{"merge": "tome"}, {"merge": "diffrate"}])
def test_a_search_records_its_settings_and_its_table_applies_them(patch: dict[str, Any], tmp_path) -> None:
    from tcl import search
    from tcl.compress.table import LookupTable

    model, x = vit(depth=3), images(24)
    scorer = search.ReferenceScorer(model, (x, torch.randint(0, 7, (24,))), **patch)
    cfg = search.SearchConfig(candidates=16, topk=1, subset=8, anchors=False, max_merge=0.5 if patch["merge"] == "tome" else 1.0)
    table = search.search(model, scorer, cfg, tmp_path, progress=False)
    loaded = LookupTable.load(tmp_path / "table.json", model)
    assert table.settings == loaded.settings == PatchSettings(**patch)
    e = loaded.entries[len(loaded.entries) // 2]
    s = loaded.select(gmacs=e["macs"] / 1e9)
    with torch.no_grad():  # the table's schedule applied as a user would scores what the search logged
        tcl.patch(model, s)
        agree = (model(scorer.x).argmax(-1) == scorer.ref.argmax(-1)).float().mean()
        tcl.unpatch(model)
    assert agree.item() == pytest.approx(loaded.entry(gmacs=e["macs"] / 1e9)["scores"]["agree"])
