"""tcl.patch on timm ViTs: exactness of the full schedule, per-block counts, sizes / sources, MACs, errors."""
from __future__ import annotations

import itertools
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import tcl
from tcl.evaluate import counted_macs
from tcl.compress.patch import extra_macs, is_patched
from tcl.compress.schedule import Schedule, ScheduleError, vit_dims

VARIANTS: dict[str, dict[str, Any]] = {
    "cls": {},
    "distilled": {"distilled": True},
    "avg_pool": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 4},
    "registers_avg": {"class_token": False, "reg_tokens": 2, "global_pool": "avg"},
    "layerscale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
}
SIMILARITIES = ["keys", "head_keys", "features"]
MERGES, FUSES = ["attention", "bipartite", "tome", "diffrate"], ["none", "mean", "evit"]
CLS_ONLY = {"cls", "layerscale", "qk_norm"}  # variants with one class token and no other prefix token


def defined(variant: str, merge: str, fuse: str, order: str) -> bool:
    """Whether the options are defined on the variant (ToMe: no registers; EViT, DiffRate: one class token)."""
    if merge == "diffrate" and (order != "prune_merge" or fuse != "none"):
        return False
    return (merge != "tome" or "registers" not in variant) and (
        variant in CLS_ONLY or (merge != "diffrate" and fuse != "evit"))


OPTIONS = [dict(merge=m, fuse=f, order=o, similarity=s, prop_attn=p, trace_source=t)
           for m, f, o, s, p, t in itertools.product(MERGES, FUSES, ["prune_merge", "merge_prune"], SIMILARITIES,
                                                     [True, False], [False, True])]
ORDERS = ["prune_merge", "merge_prune"]
INPUT = (3, 32, 32)


def tiny(variant: str, depth: int = 3, seed: int = 0, **extra: Any) -> VisionTransformer:
    """A random-weight timm ViT: 32x32 input, patch 8 (16 patches), dim 32, 2 heads."""
    kw = {**VARIANTS[variant], **extra}
    cls = VisionTransformerDistilled if kw.pop("distilled", False) else VisionTransformer
    torch.manual_seed(seed)
    model = cls(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0, **kw)
    model.pretrained_cfg = {"input_size": INPUT, "architecture": f"tiny_{variant}"}
    return model.eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *INPUT, generator=torch.Generator().manual_seed(seed))


def counts(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Token count coming out of every block in a forward of x."""
    got: list[int] = []
    hooks = [blk.register_forward_hook(lambda _m, _a, out: got.append(out.shape[1])) for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


@st.composite
def schedules(draw: st.DrawFn, model: torch.nn.Module, merge: str, order: str) -> Schedule:
    """A random schedule the given merge and order can run: per block, prune to p, then merge r away."""
    d = vit_dims(model)
    n, prune, kept = d.tokens, [], []
    for _ in range(d.depth):
        if order == "prune_merge":
            p = draw(st.integers(d.prefix + 1, n))
            r = draw(st.integers(0, (p - d.prefix) // 2 if merge in ("bipartite", "tome") else p - d.prefix - 1))
        else:  # the merge step sees all n tokens, then the prune step keeps p - r
            r = draw(st.integers(0, (n - d.prefix) // 2 if merge in ("bipartite", "tome") else n - d.prefix - 1))
            p = draw(st.integers(r + d.prefix + 1, n))
        prune.append(p)
        kept.append(p - r)
        n = p - r
    return Schedule(prune, kept)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_schedule_reproduces_the_unpatched_model(variant: str) -> None:
    model, x = tiny(variant), images()
    with torch.no_grad():
        ref = model(x)
        for opts in (o for o in OPTIONS if defined(variant, o["merge"], o["fuse"], o["order"])):
            tcl.patch(model, Schedule.full(model), **opts)
            assert (model(x) - ref).abs().max() <= 1e-5, opts
        tcl.unpatch(model)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("variant", ["cls", "distilled", "registers", "layerscale", "qk_norm"])
def test_pruning_the_last_block_to_its_prefix_tokens_is_exact_under_token_pooling(variant: str) -> None:
    """After the last attention only the prefix tokens reach the head: the searched tables' free MACs saving."""
    model, x = tiny(variant), images()
    d = vit_dims(model)
    s = Schedule([d.tokens] * (d.depth - 1) + [d.prefix], [d.tokens] * (d.depth - 1) + [d.prefix])
    with torch.no_grad():
        ref = model(x)
        for opts in ({}, {"merge": "bipartite", "prop_attn": True}):
            tcl.patch(model, s, **opts)
            assert (model(x) - ref).abs().max() <= 1e-5, opts
    assert tcl.macs(model, s) < tcl.macs(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_compressed_forward_follows_the_schedule(variant: str, data: st.DataObject) -> None:
    model, x = tiny(variant), images()
    d = vit_dims(model)
    merge, order = data.draw(st.sampled_from(MERGES)), data.draw(st.sampled_from(ORDERS))
    s = data.draw(schedules(model, merge, order))
    fuse, similarity = data.draw(st.sampled_from(FUSES)), data.draw(st.sampled_from(SIMILARITIES))
    assume(defined(variant, merge, fuse, order))
    try:
        tcl.patch(model, s, merge=merge, order=order, fuse=fuse, similarity=similarity, trace_source=True)
    except ScheduleError:
        assume(False)
    assert counts(model, x) == list(s.merge)  # kept counts match the schedule at every block
    state = tcl.patch_state(model)
    source, size = state.source, state.size
    assert source.shape == (len(x), s.merge[-1], d.tokens)
    # protected tokens stay at 0..prefix-1, each holding only itself
    assert torch.equal(source[:, :d.prefix], torch.eye(d.tokens)[:d.prefix].expand(len(x), -1, -1))
    held = source.sum(1)
    assert set(held.unique().tolist()) <= {0.0, 1.0}  # each input patch in at most one token
    if size is not None and merge != "diffrate":  # (DiffRate scales merged sizes by their match similarity)
        assert torch.equal(size[..., 0], source.sum(-1))  # a token's size is the patches it holds
        if all(p == n for p, n in zip(s.prune, (d.tokens, *s.merge[:-1]))) or fuse != "none":  # nothing dropped
            assert torch.equal(size.sum(1), torch.full((len(x), 1), float(d.tokens)))
    # analytic MACs + the documented extras (class-attention rows, similarities) == counted on the real forward
    assert counted_macs(model) == tcl.macs(model, s) + extra_macs(model)


def test_macs_identity_deit_small_and_compressed_cross_check() -> None:
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    s = Schedule.full(model)
    tcl.patch(model, s)
    assert counted_macs(model) == tcl.macs(model, s) == tcl.macs(model) and round(tcl.macs(model) / 1e9, 2) == 4.60
    assert extra_macs(model) == 0  # blocks that remove nothing compute no class-attention row or keys
    for sched, kw in [(Schedule.tome(model, 13), {}), (Schedule.tome(model, 13), dict(merge="bipartite", override=True)),
                      (Schedule.evit(model, 0.7, fuse=True), dict(fuse=True)),
                      (Schedule([197, 180, 170] + [150] * 9, [180, 170] + [150] * 10), dict(merge="diffrate"))]:
        tcl.patch(model, sched, **kw)
        assert counted_macs(model) == tcl.macs(model, sched) + extra_macs(model)
        assert extra_macs(model) < 0.002 * tcl.macs(model, sched)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_macs_cross_check_on_tiny_variants(variant: str) -> None:
    model = tiny(variant)
    d = vit_dims(model)
    n = d.tokens
    s = Schedule([n - 2, n - 5, n - 7], [n - 3, n - 6, n - 8])
    for opts in [dict(), dict(fuse="mean"), dict(similarity="features"),
                 dict(similarity="head_keys"), dict(order="merge_prune")]:
        tcl.patch(model, s, **opts)
        assert counted_macs(model) == tcl.macs(model, s) + extra_macs(model), opts
    t = Schedule.tome(model, 2)
    for kw in ({}, dict(merge="bipartite", override=True)) if "registers" not in variant else ({"merge": "bipartite",
                                                                                                 "override": True},):
        tcl.patch(model, t, **kw)
        assert counted_macs(model) == tcl.macs(model, t) + extra_macs(model), kw


def test_average_pooling_is_size_weighted() -> None:
    model, x = tiny("avg_pool"), images()
    tcl.patch(model, Schedule.tome(model, 3), merge="bipartite", override=True)  # (ToMe keeps timm's pooling)
    with torch.no_grad():
        feats = model.forward_features(x)
        size = tcl.patch_state(model).size
        assert torch.allclose(model.pool(feats), (feats * size).sum(1) / size.sum(1), atol=1e-6)
        assert not torch.allclose(model.pool(feats), feats.mean(1), atol=1e-4)


def test_unpatch_restores_the_model_and_repatching_replaces() -> None:
    model, x = tiny("distilled"), images()
    cfg, classes = dict(model.pretrained_cfg), (type(model), type(model.blocks[0]), type(model.blocks[0].attn))
    with torch.no_grad():
        ref = model(x)
        n = vit_dims(model).tokens
        tcl.patch(model, Schedule.tome(model, 2))
        assert type(model).__name__ == "TclVisionTransformerDistilled" and model.pretrained_cfg == cfg
        tcl.patch(model, Schedule([n - 4] * 3, [n - 4] * 3))
        assert counts(model, x) == [n - 4] * 3
        assert tcl.unpatch(model) is model and tcl.unpatch(model) is model
    assert (type(model), type(model.blocks[0]), type(model.blocks[0].attn)) == classes
    assert model.pretrained_cfg == cfg and not is_patched(model) and not hasattr(model.blocks[0], "_tcl_info")
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_patched_forward_is_differentiable() -> None:
    model = tiny("cls")
    n = vit_dims(model).tokens
    tcl.patch(model, Schedule([n - 2, n - 4, n - 6], [n - 3, n - 5, n - 7]), fuse=True)
    model(images()).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny("cls")
    n = vit_dims(model).tokens
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        tcl.patch(torch.nn.Linear(2, 2), Schedule([1], [1]))
    with pytest.raises(ScheduleError, match="the model has 3"):
        tcl.patch(model, Schedule([n], [n]))
    with pytest.raises(ScheduleError, match="at most half"):
        tcl.patch(model, Schedule([n, n - 9, n - 9], [n - 9, n - 9, n - 9]), merge="bipartite")
    with pytest.raises(ScheduleError, match="no destination"):
        tcl.patch(model, Schedule([n, 1, 1], [1, 1, 1]))
    with pytest.raises(ValueError, match="merge="):
        tcl.patch(model, Schedule.full(model), merge="average")  # type: ignore[arg-type]
    assert not is_patched(model)  # nothing half-patched
    tcl.patch(model, Schedule.tome(model, 2), trace_source=True)
    with pytest.raises(ScheduleError):
        tcl.patch(model, Schedule([n, n - 9, n - 9], [n - 9, n - 9, n - 9]), merge="bipartite")
    assert tcl.patch_state(model).schedule == Schedule.tome(model, 2)  # a refused re-patch keeps the old one
    with torch.no_grad():
        model(images(3)), model(images(1))
    assert tcl.patch_state(model).source.shape[0] == 1  # state is per forward
    post = tiny("cls", block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="standard Block"):
        tcl.patch(post, Schedule.full(post))
    dyn = tiny("cls", dynamic_img_size=True)
    tcl.patch(dyn, Schedule.tome(dyn, 2))
    with pytest.raises(ScheduleError, match="expects 17 tokens"):
        dyn(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="attention masks"):
        dyn.blocks[0](torch.randn(1, n, 32), attn_mask=torch.zeros(n, n))


def test_head_keys_similarity_is_the_mean_of_per_head_key_cosines() -> None:
    model = tcl.patch(tiny("cls"), Schedule.tome(tiny("cls"), 2), similarity="head_keys", override=True)
    attn, x = model.blocks[0].attn, torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, metric = attn.forward_tcl(x, None, 1, False, "head_keys")
        k = attn.qkv(x).reshape(2, 17, 3, attn.num_heads, attn.head_dim)[:, :, 1]  # [B, N, H, D]
        per_head = F.cosine_similarity(k[:, :, None], k[:, None], dim=-1).mean(-1)  # [B, N, N]
    unit = F.normalize(metric, dim=-1)
    assert metric.shape == (2, 17, attn.num_heads * attn.head_dim)
    assert torch.allclose(unit @ unit.transpose(1, 2), per_head, atol=1e-5)


def test_forward_from_a_block_input_equals_the_patched_forward_and_state_is_public() -> None:
    model, x = tiny("cls", depth=4), images()
    d = vit_dims(model)
    s = Schedule([d.tokens] * 2 + [d.tokens - 4, d.tokens - 6], [d.tokens] * 2 + [d.tokens - 6, d.tokens - 8])
    tcl.patch(model, s, trace_source=True)
    got: list[torch.Tensor] = []
    hook = model.blocks[2].register_forward_pre_hook(lambda _m, a: got.append(a[0].clone()))
    with torch.no_grad():
        want = model(x)
        hook.remove()
        state = tcl.patch_state(model)
        assert state.schedule == s and state.settings.merge == "attention" and state.size is not None
        assert (tcl.forward_from(model, got[0], 2) - want).abs().max() <= 1e-5
        assert torch.equal(tcl.patch_state(model).source, state.source)  # the same op on the same tokens
    with pytest.raises(AttributeError):
        state.size = None  # type: ignore[misc]  # a frozen snapshot
    tcl.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        tcl.patch_state(model)
