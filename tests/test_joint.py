"""Joint token + head compression: schedules with kept heads (validation, JSON, MACs vs FlopCounterMode), tcl.patch
removing heads physically (and unpatch restoring them), all-classes head importance, save / load, the joint search
and its table."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tcl
from tcl import search
from tcl.compress import joint
from tcl.compress.patch import extra_macs, is_patched
from tcl.compress.schedule import Schedule, ScheduleError, vit_dims
from tcl.evaluate import counted_macs

INPUT = (3, 32, 32)


def tiny(depth: int = 3, heads: int = 4, seed: int = 0) -> VisionTransformer:
    """A random-weight timm ViT: 32x32 input, patch 8 (16 patches + CLS), dim 64, `heads` heads."""
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=depth, num_heads=heads,
                          mlp_ratio=2.0)
    m.pretrained_cfg = {"input_size": INPUT, "architecture": "tiny_joint"}
    return m.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *INPUT, generator=torch.Generator().manual_seed(seed))


def data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return images(n, 2), torch.arange(n) % 5


ORDER = [[2, 0, 3, 1], [1, 2, 0, 3], [0, 1, 2, 3]]
JOINT = Schedule([17, 14, 10], [15, 12, 8], heads=[3, 2, 4], head_order=ORDER)


def test_schedule_heads_validate_and_round_trip() -> None:
    m = tiny()
    assert JOINT.check(m) is JOINT
    back = Schedule.from_json(JOINT.to_json())
    assert back == JOINT and back.heads == (3, 2, 4) and back.head_order == tuple(map(tuple, ORDER))
    assert back.kept_head_indices(4) == [[0, 2, 3], [1, 2], [0, 1, 2, 3]]
    old = {"prune": [17, 14, 10], "merge": [15, 12, 8], "meta": {}}  # written before heads existed
    assert Schedule.from_dict(old).heads is None and "heads" not in Schedule.from_dict(old).to_dict()
    assert Schedule([17] * 3, [17] * 3, heads=[None, None, None]).heads is None
    assert JOINT.with_settings(tcl.settings.PatchSettings(merge="bipartite")).head_order == JOINT.head_order
    with pytest.raises(ScheduleError, match="one kept-head count"):
        Schedule([17] * 3, [17] * 3, heads=[1, 2])
    with pytest.raises(ScheduleError, match=">= 0"):
        Schedule([17] * 3, [17] * 3, heads=[1, -1, 2])
    with pytest.raises(ScheduleError, match="at most 4"):
        Schedule([17] * 3, [17] * 3, heads=[5, 1, 1]).check(m)
    with pytest.raises(ScheduleError, match="at least one head"):
        Schedule([17, 16, 16], [17, 16, 16], heads=[4, 0, 4]).check(m)
    with pytest.raises(ScheduleError, match="permutation"):
        Schedule([17] * 3, [17] * 3, heads=[1, 1, 1], head_order=[[0, 0, 1, 2]] * 3).check(m)
    Schedule([17, 17, 16], [17, 17, 16], heads=[4, 0, 4]).check(m)  # no heads in a block that keeps every token


def test_patch_without_a_head_ranking_refuses() -> None:
    m = tiny()
    with pytest.raises(ScheduleError, match="head ranking"):
        tcl.patch(m, Schedule([17] * 3, [17] * 3, heads=[3, 2, 4]))
    assert not is_patched(m) and all(type(b.attn).__name__ == "Attention" for b in m.blocks)


def test_macs_count_heads_and_equal_flop_counter() -> None:
    m = tiny()
    assert tcl.macs(m, Schedule.full(m).with_heads([4, 4, 4])) == tcl.macs(m)
    for s in (JOINT, Schedule([17] * 3, [17] * 3, heads=[1, 0, 2], head_order=ORDER), JOINT.with_heads(None)):
        built = joint.build(m, s)
        assert counted_macs(built) == tcl.macs(m, s) + extra_macs(built)
    d = vit_dims(m)
    by_hand = d.patch_macs + d.dim * d.classes + sum(  # qkv 3NC(h·d) + proj N(h·d)C + 2N^2(h·d), per block
        4 * n * d.dim * h * d.head_dim + 2 * n * n * h * d.head_dim + 2 * k * d.dim * d.hidden
        for n, k, h in zip([17, 15, 12], JOINT.merge, JOINT.heads))
    assert tcl.macs(m, JOINT) == by_hand < tcl.macs(m, JOINT.with_heads(None))
    with pytest.raises(ScheduleError, match="its own heads"):
        tcl.macs(m, JOINT, heads=[4, 4, 4])


def test_all_heads_equal_token_only_patch_and_unpatch_restores() -> None:
    m, x = tiny(), images()
    s = Schedule([17, 14, 10], [15, 12, 8])
    ref = tcl.patch(tiny(), s)(x)
    for heads in (None, [4, 4, 4]):
        assert torch.allclose(joint.build(m, s.with_heads(heads, ORDER))(x), ref, atol=1e-5)
    with torch.inference_mode():
        plain = m(x)
        tcl.patch(m, JOINT)
        assert [b.attn.num_heads for b in m.blocks] == [3, 2, 4]
        tcl.unpatch(m)
        assert [type(b.attn).__name__ for b in m.blocks] == ["Attention"] * 3 and torch.equal(m(x), plain)


def test_pruned_heads_equal_gated_model_with_zero_gates() -> None:
    """tcl.patch keeps exactly the ranked heads: equal to masking the others' outputs (no token reduction)."""
    m, x = tiny(), images()
    imp = torch.rand(3, 4, generator=torch.Generator().manual_seed(3))
    s = Schedule([17] * 3, [17] * 3, heads=[2, 1, 3])
    order = joint.head_order(imp)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for i, (o, h) in enumerate(zip(order, s.heads)):
        mask[i, o[:h]] = True
    assert all(bool(mask[i, imp[i].argmax()]) for i in range(3))
    gated = tcl.heads.insert_gates(tiny())
    tcl.heads.set_gates(gated, mask.float())
    with torch.inference_mode():
        assert torch.allclose(joint.build(m, s, imp)(x), gated(x), atol=1e-5)
        assert torch.allclose(tcl.patch(tiny(), s.with_heads(s.heads, order))(x), gated(x), atol=1e-5)


def test_head_importance_all_classes() -> None:
    m = tiny()
    for method in ("fisher", "michel"):
        imp = joint.head_importance(m, data(), method, batch_size=10)
        assert imp.shape == (3, 4) and bool((imp >= 0).all()) and bool((imp > 0).any())
    fisher = joint.head_importance(m, data(), "fisher", batch_size=24)
    assert torch.allclose(fisher, joint.head_importance(m, data(), "fisher", batch_size=7), rtol=1e-4, atol=1e-9)
    # by hand: the squared per-image gradient of the cross-entropy w.r.t. a gate on head (1, 2)
    x, y = data()
    gated = tcl.heads.insert_gates(tiny())
    want = 0.0
    for i in range(len(x)):
        g = tcl.heads.gate_params(gated)
        loss = torch.nn.functional.cross_entropy(gated(x[i:i + 1]), y[i:i + 1])
        want += torch.autograd.grad(loss, g)[1][2].item() ** 2 / len(x)
    assert fisher[1, 2].item() == pytest.approx(want, rel=1e-4)
    with pytest.raises(tcl.heads.HeadsError, match="fisher"):
        joint.head_importance(m, data(), "taylor")  # type: ignore[arg-type]
    with pytest.raises(tcl.heads.HeadsError, match=r"\[3, 4\]"):
        joint.build(m, JOINT, torch.rand(2, 4))


def test_save_load_round_trip(tmp_path) -> None:
    m, x = tiny(), images()
    s = JOINT.with_settings(tcl.settings.PatchSettings(merge="bipartite"))
    built = joint.build(m, s)
    joint.save(built, tmp_path / "jm")
    loaded = joint.load(tiny(seed=5), tmp_path / "jm")
    with torch.inference_mode():
        assert torch.equal(loaded(x), built(x))
    st = tcl.patch_state(loaded)
    assert st.schedule == s and st.settings.merge == "bipartite" and [b.attn.num_heads for b in loaded.blocks] == [3, 2, 4]
    meta = json.loads((tmp_path / "jm" / "model.json").read_text())
    meta["schedule"]["heads"] = [4, 4, 4]
    (tmp_path / "jm" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ScheduleError, match="do not fit"):
        joint.load(tiny(), tmp_path / "jm")


def test_scorer_applies_heads_and_restores_model() -> None:
    m = tiny()
    x, y = data(32)
    imp = joint.head_importance(m, (x, y), batch_size=16)
    sc = search.joint_scorer(m, (x, y), imp, batch_size=16, cache_images=32)
    own = [blk.attn for blk in m.blocks]
    for s in (JOINT.with_heads(JOINT.heads, joint.head_order(imp)), Schedule([17] * 3, [17] * 3, heads=[4, 1, 4]),
              Schedule([17] * 3, [17] * 3, heads=[1, 4, 4])):
        got = sc.per_image(s)
        with torch.inference_mode():
            logits = joint.build(m, s, imp)(x[sc.order])
        assert torch.equal(got["acc"], (logits.argmax(-1) == y[sc.order]).float())
    assert [blk.attn for blk in m.blocks] == own and not is_patched(m)
    assert sc.info["head_importance"]["scores"] == imp.tolist()


@pytest.mark.parametrize("mode", ["joint", "only"])
def test_joint_search_table_and_patch(tmp_path, mode: str) -> None:
    torch.set_num_threads(1)
    m = tiny()
    x, y = data(32)
    imp = joint.head_importance(m, (x, y), batch_size=16)
    sc = search.joint_scorer(m, (x, y), imp, batch_size=32, merge="bipartite")
    cfg = search.SearchConfig(candidates=30, subset=8, topk=1, bin_width=0.05, min_fraction=0.5, heads=mode,  # type: ignore[arg-type]
                              max_merge=0.5, anchors=False)
    table = search.search(m, sc, cfg, tmp_path / mode, progress=False)
    d = vit_dims(m)
    for i in range(10):
        s = search.sample_schedule(d, 0, i, 0.5, 1.0, 0.5, mode)
        assert s.check(d) is s and search.space._macs(d, s.merge, s.heads) == tcl.macs(m, s)
        if mode == "only":
            assert s.merge == (17,) * 3 and s.heads is not None
    assert any(e["schedule"].get("heads") for e in table.entries)
    loaded = tcl.table.LookupTable.load(tmp_path / mode / "table.json", m)
    heads_only = dataclasses.replace(loaded, entries=[e for e in loaded.entries if e["schedule"].get("heads")])
    e = heads_only.entries[-1]
    s = heads_only.select(gmacs=e["macs"] / 1e9)
    assert s.heads is not None and s.settings is not None and s.settings.merge == "bipartite"
    assert torch.equal(joint.importance_of(loaded), imp)
    with torch.inference_mode():  # the obvious call: the table's pick patched onto the model
        acc = (tcl.patch(m, s)(x[sc.order]).argmax(-1) == y[sc.order]).float().mean().item()
    tcl.unpatch(m)
    assert acc == pytest.approx(s.meta["scores"]["acc"]) and e["macs"] == tcl.macs(m, s)
    with pytest.raises(search.SearchError, match="method='random'"):
        search.SearchConfig(method="evolve", heads="only")
    with pytest.raises(search.SearchError, match="joint_scorer"):
        search.search(m, search.ReferenceScorer(m, (x, y)), cfg)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_joint_macs_equal_flop_counter_on_timm_models(name: str) -> None:
    """A head-pruned, token-compressed timm model at 224 px: analytic MACs + the patch's extra = FlopCounterMode."""
    import timm

    m = timm.create_model(name, pretrained=False).eval()
    d = vit_dims(m)
    s = Schedule.tome(m, 8).with_heads([3, 2, 1] * 4, [[2, 0, 1]] * 12)
    built = joint.build(m, s)
    assert [b.attn.num_heads for b in built.blocks] == [3, 2, 1] * 4 and d.attn_heads == 3
    assert counted_macs(built) == tcl.macs(m, s) + extra_macs(built)


def test_joint_mutation_moves_one_head_count_and_evolve_runs(tmp_path) -> None:
    import numpy as np

    m = tiny()
    d, parent = vit_dims(m), Schedule([17, 14, 10], [15, 12, 8], heads=[3, 2, 4])
    rng = np.random.default_rng(0)
    kids = [search.mutate_schedule(d, parent, rng, tcl.macs(d, parent), heads=True) for _ in range(40)]
    moved = [sum(a != b for a, b in zip(k.kept_heads(4), parent.kept_heads(4))) for k in kids]
    assert set(moved) == {0, 1} and all(1 <= h <= 4 for k in kids for h in k.kept_heads(4))
    assert all(search.mutate_schedule(d, parent, rng, tcl.macs(d, parent)).heads == parent.heads for _ in range(10))
    x, y = data(16)
    sc = search.joint_scorer(m, (x, y), joint.head_importance(m, (x, y), batch_size=16), batch_size=16)
    cfg = search.SearchConfig(method="evolve", candidates=16, init=8, round_size=4, subset=8, topk=1, bin_width=0.1,
                              min_fraction=0.5, heads="joint", anchors=False)
    search.search(m, sc, cfg, tmp_path / "evo", progress=False)
    logged = search.read_log(tmp_path / "evo")
    assert sum(st == "subset" for st, _ in logged) == 16
    assert all(r["macs"] == tcl.macs(m, Schedule.from_dict(r["schedule"])) for r in logged.values())


def test_joint_search_resumes_on_the_same_head_ranking_only(tmp_path) -> None:
    m = tiny()
    x, y = data(16)
    imp = joint.head_importance(m, (x, y), batch_size=16)
    cfg = search.SearchConfig(candidates=6, subset=8, topk=1, bin_width=0.1, min_fraction=0.5, heads="joint",
                              anchors=False)
    search.search(m, search.joint_scorer(m, (x, y), imp, batch_size=16), cfg, tmp_path / "s", progress=False)
    same_rank = imp * (1 + 1e-6)  # other rounding, same order
    search.search(m, search.joint_scorer(m, (x, y), same_rank, batch_size=16), cfg, tmp_path / "s", progress=False)
    flipped = imp.clone()
    flipped[0] = imp[0].flip(0)
    with pytest.raises(search.SearchError, match="head_importance"):
        search.search(m, search.joint_scorer(m, (x, y), flipped, batch_size=16), cfg, tmp_path / "s", progress=False)


def test_joint_sampler_writes_all_heads_as_a_token_only_schedule() -> None:
    d = vit_dims(tiny())
    samples = [search.sample_schedule(d, 0, i, 0.5, 1.0, 1.0, "joint") for i in range(40)]
    assert any(s.heads is None for s in samples) and any(s.heads is not None for s in samples)
    assert all(s.heads is None or min(s.kept_heads(4)) < 4 for s in samples)
