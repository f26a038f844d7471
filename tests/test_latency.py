"""tcl.compress.latency: cost-model features and fit, held-out error, refusal of other settings, tables selected by latency."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tcl
from tcl import search
from tcl.compress import joint, latency
from tcl.compress.latency import LatencyError, LatencyModel
from tcl.compress.schedule import Schedule, vit_dims
from tcl.compress.table import BudgetError, LookupTable

INPUT = (3, 32, 32)


def tiny(depth: int = 3, heads: int = 4) -> VisionTransformer:
    """A random-weight timm ViT: 32x32 input, patch 4 (64 patches + CLS), dim 64."""
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=4, num_classes=5, embed_dim=64, depth=depth, num_heads=heads,
                          mlp_ratio=2.0)
    m.pretrained_cfg = {"input_size": INPUT, "architecture": "tiny_latency"}
    return m.eval()


def test_features_count_heads_tokens_and_multiples_of_16() -> None:
    d = vit_dims(tiny())
    f = latency.features(d, Schedule([65, 48, 48], [60, 48, 48], heads=[4, 2, 0]))
    assert f.shape == (3, len(latency.FEATURES))
    col = {k: f[:, i].tolist() for i, k in enumerate(latency.FEATURES)}
    assert col["tokens"] == [65, 60, 48] and col["attn_n"] == [65, 60 * 0.5, 0]
    assert col["attn_n2"] == [65 ** 2, 3600 * 0.5, 0] and col["attn_heads"] == [4, 2, 0]
    assert col["attn_n2_not16"] == [65 ** 2, 3600 * 0.5, 0]  # 65 and 60 are not multiples of 16
    assert latency.features(d, Schedule([65, 48, 48], [64, 48, 48]))[1, 3] == 0  # 64 incoming tokens: no penalty
    assert col["prune_on"] == [0, 1, 0] and col["prune_n"] == [0, 60, 0]
    assert col["merge_on"] == [1, 0, 0] and col["merge_pairs"] == [5 * 60, 0, 0] and col["mlp_k"] == [60, 48, 48]


def test_fit_recovers_a_linear_cost_and_snap16() -> None:
    d = vit_dims(tiny())
    scheds = latency.random_schedules(d, 40, seed=1)
    true = np.arange(1, len(latency.FEATURES) + 2) * 1e-3
    ms = [float(latency.features(d, s).sum(0) @ true[:-1] + true[-1]) for s in scheds]
    assert np.allclose(latency.fit(d, scheds, ms), true, rtol=1e-6, atol=1e-9)
    s = latency.snap16(d, Schedule([60, 50, 40], [55, 45, 20], heads=[2, 3, 4]))
    assert s.prune == (48, 48, 32) and s.merge == (48, 32, 16) and s.heads == (2, 3, 4)
    assert tcl.macs(d, s) < tcl.macs(d, Schedule([60, 50, 40], [55, 45, 20], heads=[2, 3, 4]))


def test_calibrate_reports_held_out_error_and_refuses_other_settings(tmp_path) -> None:
    torch.set_num_threads(1)
    m = tiny()
    lat = latency.calibrate(m, batch_size=4, schedules=12, held_out=6, runs=1)
    meas = lat.error["measurements"]
    held = [r for r in meas if r["held_out"]]
    assert lat.error["held_out"] == len(held) == 6
    rel = [abs(lat.predict(Schedule.from_dict(r["schedule"])) - r["ms"]) / r["ms"] for r in held]
    assert lat.error["median_rel"] == pytest.approx(float(np.median(rel)))
    assert lat.context["batch_size"] == 4 and lat.context["dtype"] == "float32" and lat.context["threads"] == 1
    back = LatencyModel.load(lat.save(tmp_path / "lat.json"))
    s = Schedule([65, 40, 30], [50, 35, 20], heads=[4, 3, 2])
    assert back.predict(s) == lat.predict(s) and back.context == lat.context
    lat.check(device="cpu", batch_size=4, dtype="float32", threads=1, model=m)
    with pytest.raises(LatencyError, match="batch_size=4, not 8"):
        lat.predict(s, batch_size=8)
    with pytest.raises(LatencyError, match="dtype='float32', not 'bfloat16'"):
        lat.check(dtype="bfloat16")
    with pytest.raises(LatencyError, match="threads=1, not 2"):
        lat.check(device="cpu", threads=2)
    with pytest.raises(LatencyError, match="device='cpu', not 'cuda'"):
        lat.check(device="cuda")
    with pytest.raises(LatencyError, match="dims"):
        lat.check(model=tiny(depth=2))


def _table(m: VisionTransformer) -> LookupTable:
    d = vit_dims(m)
    scheds = [Schedule.full(m), Schedule([65, 40, 30], [50, 35, 20]), Schedule([65, 65, 65], [65, 65, 65], heads=[1, 1, 1])]
    entries = [{"id": i, "macs": tcl.macs(m, s), "schedule": s.to_dict(), "scores": {"acc": 0.9 - 0.1 * i}}
               for i, s in enumerate(scheds)]
    return LookupTable(entries, tcl.table.model_info(m), score="acc")


def test_macs_budget_at_picks_the_bin_nearest_the_latency(tmp_path) -> None:
    torch.set_num_threads(1)
    m = tiny(depth=2, heads=2)
    x, y = torch.randn(16, *INPUT, generator=torch.Generator().manual_seed(4)), torch.arange(16) % 5
    sc = search.ReferenceScorer(m, (x, y), batch_size=16)
    search.search(m, sc, search.SearchConfig(candidates=20, subset=8, topk=1, bin_width=0.1, min_fraction=0.4,
                                             anchors=False), tmp_path / "s", progress=False)
    coef = [0.0] * len(latency.FEATURES) + [0.0]
    coef[latency.FEATURES.index("mlp_k")] = 1e-3  # predicted ms = 1e-3 x kept tokens summed over blocks
    lat = LatencyModel(coef, dataclasses.asdict(vit_dims(m)), latency.device_context("cpu", 8), 1.0)
    target = 0.7 * lat.predict(Schedule.full(m))
    b = search.macs_budget_at(m, tmp_path / "s", lat, target, bin_width=0.1)
    assert 0.4 < b <= 1.0 and abs(round(b / 0.1) * 0.1 - b) < 1e-9


def test_table_selects_by_latency_and_refuses_other_settings(tmp_path) -> None:
    m = tiny()
    coef = [1e-4] * len(latency.FEATURES) + [0.01]
    lat = LatencyModel(coef, dataclasses.asdict(vit_dims(m)), latency.device_context("cpu", 256, threads=2), 1.0)
    table = _table(m)
    with pytest.raises(BudgetError, match="with_latency"):
        table.select(latency_ms=1.0)
    t = LookupTable.load(table.with_latency(lat).save(tmp_path / "t.json"), m)
    ms = {e["id"]: e["latency_ms"] for e in t.entries}
    assert ms[0] == pytest.approx(lat.predict(Schedule.full(m)))
    cheap = min(ms, key=ms.get)
    assert t.select(latency_ms=ms[0]).meta["scores"]["acc"] == pytest.approx(0.9)  # all fit: the best
    assert t.select(latency_ms=ms[cheap] * 1.0001) == Schedule.from_dict(t.entries[[e["id"] for e in t.entries].index(cheap)]["schedule"])
    with pytest.raises(BudgetError, match="fastest"):
        t.select(latency_ms=ms[cheap] * 0.5)
    with pytest.raises(LatencyError, match="batch_size=256, not 64"):
        t.select(latency_ms=ms[0], batch_size=64)
    with pytest.raises(LatencyError, match="dtype"):
        t.select(latency_ms=ms[0], dtype="float16")
    with pytest.raises(BudgetError, match="not both"):
        t.select(0.5, latency_ms=1.0)
    assert t.select(0.99) == t.select(fraction=0.99)  # the MACs budget still works


def test_latency_table_from_a_search_log(tmp_path) -> None:
    torch.set_num_threads(1)
    m = tiny(depth=2, heads=2)
    x, y = torch.randn(24, *INPUT, generator=torch.Generator().manual_seed(3)), torch.arange(24) % 5
    imp = joint.head_importance(m, (x, y), batch_size=12)
    sc = search.joint_scorer(m, (x, y), imp, batch_size=24)
    cfg = search.SearchConfig(candidates=12, subset=8, topk=1, bin_width=0.1, min_fraction=0.4, heads="joint",
                              anchors=False)
    search.search(m, sc, cfg, tmp_path / "s", progress=False)
    coef = [1e-4] * len(latency.FEATURES) + [0.01]
    lat = LatencyModel(coef, dataclasses.asdict(vit_dims(m)), latency.device_context("cpu", 8), 1.0)
    t = search.latency_table(m, sc, tmp_path / "s", lat, bin_width=0.05)
    assert t.latency == lat.to_dict() and len(t.entries) >= 2
    for e in t.entries:
        s = Schedule.from_dict(e["schedule"])
        assert e["latency_ms"] == pytest.approx(lat.predict(s)) and e["macs"] == tcl.macs(m, s)
        assert e["scores"] == sc(s)  # scored on the whole split
    assert t.data["head_importance"]["scores"] == imp.tolist()  # select() ranks a pick's heads by it
    fast = min(e["latency_ms"] for e in t.entries)
    pick = t.select(latency_ms=fast * 1.0001)
    assert pick.meta["macs"] == min(t.entries, key=lambda e: e["latency_ms"])["macs"]
    assert pick.heads is None or pick.head_order is not None


def test_dtype_of_names_the_recorded_dtype_of_an_amp_setting() -> None:
    assert [latency.dtype_of(a) for a in (None, "off", "bf16", "fp16")] == ["float32", "float32", "bfloat16", "float16"]
    with pytest.raises(LatencyError, match="amp must be"):
        latency.dtype_of("int8")
