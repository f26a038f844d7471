"""Head modularization: gate equivalence, gradient-reset updates, scorers, physical pruning, folding, MACs, modules."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import Attention
from timm.models.vision_transformer import VisionTransformer

from tcl import evaluate, heads, schedule
from tcl.heads import reset as reset_mod

torch.set_num_threads(1)
SIZE = (1, 16, 16)


def tiny(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
    return VisionTransformer(**{**cfg, **kw}).eval()


def batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SIZE, generator=g), torch.arange(n) % 5


VARIANTS = [dict(), dict(class_token=False, global_pool="avg"), dict(reg_tokens=2), dict(init_values=0.1),
            dict(qk_norm=True), dict(no_embed_class=True, reg_tokens=1, init_values=1e-2, qk_norm=True)]


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("fused", [True, False])
def test_gates_are_equivalent_and_prune_fold_exact(kw: dict, fused: bool) -> None:
    model = tiny(**kw)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x, _ = batch()
    with torch.no_grad():
        ref = model(x)
        gated = heads.insert_gates(copy.deepcopy(model))
        assert (gated(x) - ref).abs().max() <= 1e-6
        assert heads.gates(gated).shape == (2, 4) and bool((heads.gates(gated) == 1).all())
        vals = torch.rand(2, 4, generator=torch.Generator().manual_seed(3)) + 0.5
        mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
        heads.set_gates(gated, vals * mask)
        masked = gated(x)
        heads.set_gates(gated, vals)
        out = gated(x)
        pruned = heads.prune_heads(gated, mask)  # uses the model's gates, folded
        assert heads.head_counts(pruned) == [3, 1]
        assert (pruned(x) - masked).abs().max() <= 1e-5
        folded = heads.fold_gates(copy.deepcopy(gated))
        assert (folded(x) - out).abs().max() <= 1e-5 and bool((heads.gates(folded) == 1).all())
        restored = heads.remove_gates(copy.deepcopy(gated), fold=True)
        assert type(restored.blocks[0].attn) is Attention and (restored(x) - out).abs().max() <= 1e-5
        unfolded = heads.remove_gates(heads.insert_gates(copy.deepcopy(model)), fold=False)
        assert (unfolded(x) - ref).abs().max() <= 1e-6


def test_params_and_macs_are_real() -> None:
    model = tiny(reg_tokens=1)
    full = heads.head_macs(model)
    assert full == schedule.macs(model) == evaluate.counted_macs(model, SIZE)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    pruned = heads.prune_heads(model, mask)
    assert heads.head_macs(pruned) == evaluate.counted_macs(pruned, SIZE) < full
    d, c = 8, 32  # head_dim, embed dim: each removed head drops 3 qkv row blocks (+bias) and d proj columns
    assert heads.param_count(model) - heads.param_count(pruned) == 5 * (3 * d * c + 3 * d + d * c)
    module = heads.extract_module(model, 2, mask)
    assert heads.head_macs(module) == evaluate.counted_macs(module, SIZE) == heads.head_macs(pruned)


def test_empty_block_needs_flag_and_equals_zero_gates() -> None:
    model = heads.insert_gates(tiny(init_values=0.5))
    mask = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    with pytest.raises(heads.HeadsError, match="allow_empty_blocks"):
        heads.keep_mask(torch.rand(2, 4), 1)
    assert heads.keep_mask(torch.rand(2, 4), 1, allow_empty_blocks=True).sum() == 1
    x, _ = batch()
    with torch.no_grad():
        heads.set_gates(model, mask.float())
        masked = model(x)
        pruned = heads.prune_heads(model, mask)
        assert heads.head_counts(pruned) == [0, 2] and (pruned(x) - masked).abs().max() <= 1e-5
    assert heads.head_macs(pruned) == evaluate.counted_macs(pruned, SIZE)


def test_reset_step_masks_objective_and_adds_penalty_by_hand() -> None:
    model = heads.insert_gates(tiny())
    for p in model.parameters():
        p.requires_grad_(False)
    params = heads.gate_params(model)
    for p in params:
        p.requires_grad_(True)
    x, y = batch()
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    for penalty, clip in (("sign", None), ("unit", None), ("l2", None), ("sign", 1e-4)):
        heads.set_gates(model, torch.tensor([[1.0, 0.7, -0.4, 1.2], [0.9, 1.1, 0.8, 0.0]]))
        cfg = heads.ResetConfig(lr=0.5, lam=0.01, penalty=penalty, clip=clip)
        before = heads.gates(model)
        loss = heads.vs_rest_loss(model(x), y, (1,))
        objective = torch.stack(torch.autograd.grad(loss, params))
        opt = torch.optim.SGD(params, lr=cfg.lr)
        out = heads.reset_step(model, opt, x, y, (1,), mask, cfg)
        assert torch.equal(out["objective_grad"], objective)
        kept = objective * mask
        assert out["grad_norm"] == pytest.approx(float(kept.norm())) and float(kept.norm()) > 1e-4
        step = kept if clip is None else kept * (clip / kept.norm())  # clipped: the kept gates move by lr * clip
        expected = before - cfg.lr * (step + heads.penalty_grad(before, cfg))
        assert torch.allclose(heads.gates(model), expected, atol=1e-7, rtol=0)
        assert torch.equal(heads.penalty_grad(before, cfg)[1, 3], torch.tensor(0.0))  # sign/unit/l2 of 0 is 0


def test_forgotten_gates_decay_and_schedule_reaches_keep() -> None:
    model, data = tiny(), batch(40)
    fixed = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    cfg = heads.ResetConfig(steps=30, batch_size=8, lr=0.5, lam=0.1)
    out = heads.reset_train(model, data, 0, 6, cfg, fixed_mask=fixed, progress=False)
    g = out["gates"].abs()
    assert float(g[~fixed].max()) <= cfg.lr * cfg.lam + 1e-6  # fell by lr*lam per step from 1 and stays at 0
    assert len(out["history"]) >= 3 and out["history"][0]["gate_forgotten"] > out["history"][-1]["gate_forgotten"]
    counts = [heads.forgotten_at(s, 5, cfg) for s in range(cfg.steps)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 5 and counts[int(cfg.ramp * 30) - 1] == 5
    out = heads.reset_train(tiny(), data, [1, 2], 3, cfg, progress=False)
    assert int(out["mask"].sum()) == 3 and bool((out["mask"].sum(1) >= 1).all())


def test_reset_train_resumes_exactly(tmp_path, monkeypatch) -> None:
    data, cfg = batch(40), heads.ResetConfig(steps=12, batch_size=8, lr=0.5, lam=0.05, criterion="taylor")
    ref = heads.reset_train(tiny(), data, 3, 4, cfg, progress=False)
    save = reset_mod.save_atomic

    def crash(obj, path):
        save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(reset_mod, "save_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        heads.reset_train(tiny(), data, 3, 4, cfg, checkpoint=tmp_path / "s.pt", save_every=5, progress=False)
    monkeypatch.setattr(reset_mod, "save_atomic", save)
    out = heads.reset_train(tiny(), data, 3, 4, cfg, checkpoint=tmp_path / "s.pt", save_every=5, progress=False)
    assert torch.equal(out["gates"], ref["gates"]) and torch.equal(out["mask"], ref["mask"])
    with pytest.raises(heads.HeadsError, match="different run"):
        heads.reset_train(tiny(), data, 2, 4, cfg, checkpoint=tmp_path / "s.pt", progress=False)


def test_scorers_match_their_definitions() -> None:
    model = heads.insert_gates(tiny())
    x, y = batch(12)
    imp = heads.head_importance(model, (x, y), [0, [1, 2]], batch_size=5, probes=1, progress=False)
    assert set(imp) == {*heads.SCORERS, "hessian_diag"} and all(v.shape == (2, 2, 4) for v in imp.values())
    params = heads.gate_params(model)
    for p in params:
        p.requires_grad_(True)
    tgt = (1, 2)
    is_pos = torch.isin(y, torch.tensor(tgt))
    w = heads.balance_weights(is_pos)
    per = torch.stack([torch.stack(torch.autograd.grad(heads.vs_rest_loss(model(x[i:i + 1]), y[i:i + 1], tgt, True).sum(), params))
                       for i in range(len(x))])  # per-example gradients, one backward each
    full = torch.stack(torch.autograd.grad(heads.vs_rest_loss(model(x), y, tgt), params))
    ww = w.view(-1, 1, 1)
    assert torch.allclose((ww * per).sum(0), full, atol=1e-6)
    assert torch.allclose(imp["taylor"][1], full.abs(), atol=1e-6)  # gates are 1
    assert torch.allclose(imp["fisher"][1], (ww * per.square()).sum(0), atol=1e-7)
    assert torch.allclose(imp["michel"][1], (ww * per.abs()).sum(0), atol=1e-6)
    jac = torch.stack([torch.stack(torch.autograd.grad(heads.log_odds(model(x[i:i + 1]), tgt).sum(), params))
                       for i in range(len(x))])
    p = heads.log_odds(model(x), tgt).detach().sigmoid().view(-1, 1, 1)
    assert torch.allclose(imp["kl"][1], 0.5 * (ww * p * (1 - p) * jac.square()).sum(0), atol=1e-7)


def test_hutchinson_estimates_the_hessian_diagonal() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = heads.insert_gates(tiny(depth=1, num_heads=2, embed_dim=16))
    x, y = batch(10)
    imp = heads.head_importance(model, (x, y), [0], ["hessian"], probes=64, progress=False)
    g = heads.gate_params(model)[0].requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        grad = torch.autograd.grad(heads.vs_rest_loss(model(x), y, (0,)), g, create_graph=True)[0]
        hess = torch.stack([torch.autograd.grad(grad[i], g, retain_graph=True)[0] for i in range(2)])
    # with 2 gates, v * Hv = diag(H) + v_0 v_1 H_01: the mean over 64 probes is off by (mean v_0 v_1) * |H_01|
    err = (imp["hessian_diag"][0, 0] - hess.diagonal()).abs()
    assert bool((err <= 0.5 * hess[0, 1].abs() + 1e-7).all())
    assert torch.allclose(imp["hessian"][0, 0], 0.5 * imp["hessian_diag"][0, 0])


def test_modules_compose_and_union() -> None:
    model = tiny()
    x, y = batch(30)
    full = torch.ones(2, 4, dtype=torch.bool)
    mods = [heads.extract_module(model, c, full) for c in (0, 2, 4)]
    with torch.no_grad():
        logits = model(x)
        p = logits.softmax(-1)[:, 2]
        assert torch.allclose(mods[1].score(x).sigmoid(), p, atol=1e-6)  # log-odds of the softmax
        assert torch.equal(mods[1](x).argmax(-1) == 1, logits.argmax(-1) == 2)  # top-1 rule, as for the original
        assert torch.equal(mods[1].predict(x), logits.argmax(-1) == 2)
        mods[1].threshold = 0.0
        assert torch.equal(mods[1].predict(x), p > 0.5)
        mods[1].threshold = None
    composed = heads.compose(mods, calibration="none")
    ref = heads.restricted(model, [0, 2, 4])
    assert torch.equal(heads.scores(composed, (x, y))[0].argmax(-1), heads.scores(ref, (x, y))[0].argmax(-1))
    assert heads.subset_accuracy(composed, (x, y)) == heads.subset_accuracy(ref, (x, y))
    with pytest.raises(heads.HeadsError, match="calibrate"):
        heads.compose(mods, calibration="threshold")
    for m in mods:
        heads.calibrate(m, (x, y))
    thr = heads.compose(mods, calibration="threshold")
    assert torch.equal(thr.shift, torch.tensor([m.threshold for m in mods]))
    std = heads.compose(mods, (x, y))
    z = heads.scores(std, (x[torch.isin(y, torch.tensor([0, 2, 4]))], y))[0]
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5)
    small = [heads.extract_module(model, c, heads.random_mask((2, 4), 3, seed=c)) for c in (0, 2)]
    union = heads.union_classifier(model, small)
    assert union.classes == [0, 2]
    assert heads.head_counts(union) == (small[0].mask | small[1].mask).sum(1).tolist()
    assert torch.equal(heads.jaccard(torch.stack([m.mask for m in small]))[0, 0], torch.tensor(1.0))


def test_decompose_every_method_and_report() -> None:
    model, data = tiny(), batch(40)
    cfg = heads.ResetConfig(steps=8, batch_size=8)
    for method in ("reset", "taylor", "fisher", "michel", "kl", "random"):
        mod = heads.decompose_class(model, data, 1, 4, method, cfg=cfg, progress=False)
        assert int(mod.mask.sum()) == 4 and heads.head_counts(mod) == mod.mask.sum(1).tolist()
        assert mod.info["method"] == method and mod.info["seconds"] >= 0
    assert mod.threshold is not None  # calibrated on data
    rec = heads.module_report(mod, model, data, ref_threshold=heads.reference_threshold(model, data, 1))
    assert rec["heads_kept"] == 4 and rec["macs"] < rec["original_macs"] and 0 <= rec["module_f1"] <= 1
    assert 0.5 <= rec["original_calibrated_balanced_accuracy"] <= 1 and 0 <= rec["module_auc"] <= 1
    best, recs = heads.search_keep(model, data, 1, [8, 6, 3, 4, 5], "taylor", tolerance=1.0, cfg=cfg, progress=False)
    assert [r["heads_kept"] for r in recs] == [5, 4, 3] and best is not None and int(best.mask.sum()) == 3
    best, recs = heads.search_keep(model, data, 1, [8, 6, 3, 4, 5], "fisher", tolerance=-1.0, cfg=cfg, progress=False)
    assert [r["heads_kept"] for r in recs] == [5, 8] and best is None


def test_recover_distils_the_remaining_weights_and_keeps_the_structure() -> None:
    model, data = tiny(), batch(40)
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident logits, so removing heads moves them
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    mod = heads.decompose_class(model, data, 1, 4, "taylor", cfg=heads.ResetConfig(steps=4, batch_size=8),
                                progress=False)
    before = {k: v.clone() for k, v in mod.state_dict().items()}

    def kl(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(m(data[0]).log_softmax(-1), model(data[0]).log_softmax(-1),
                                                    log_target=True, reduction="batchmean"))

    same = heads.recover(mod, model, data, heads.RecoverConfig(steps=0), progress=False)
    assert (same.backbone(data[0]) - mod.backbone(data[0])).abs().max() <= 1e-6 and same.threshold is None
    rec = heads.recover(mod, model, data, heads.RecoverConfig(steps=80, lr=1e-3, batch_size=16), progress=False)
    assert kl(rec.backbone) < 0.5 * kl(mod.backbone)
    assert all(torch.equal(v, mod.state_dict()[k]) for k, v in before.items())  # the input module is untouched
    assert heads.head_counts(rec) == heads.head_counts(mod) and heads.param_count(rec) == heads.param_count(mod)
    assert rec.info["recover"]["steps"] == 80 and len(rec.info["recover"]["history"]) == 9
    assert all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())
    full = heads.decompose_class(model, data, 1, 4, "taylor", cfg=heads.ResetConfig(steps=4, batch_size=8),
                                 progress=False, recover_data=data, recover_cfg=heads.RecoverConfig(steps=3))
    assert full.info["recover"]["steps"] == 3 and full.threshold is not None
    cal = heads.recover_calibrated(mod, model, data, data, heads.RecoverConfig(steps=3), progress=False)
    assert cal.threshold == heads.best_threshold(heads.scores(cal, data)[0], data[1] == 1)
    assert cal.info["seconds"] == mod.info["seconds"] + cal.info["recover"]["seconds"]
    with pytest.raises(heads.HeadsError, match="target .* and of the rest"):
        heads.recover(mod, model, (data[0][:8], torch.ones(8, dtype=torch.long)), progress=False)
    with pytest.raises(heads.HeadsError, match="RecoverConfig needs"):
        heads.recover(mod, model, data, heads.RecoverConfig(lr=0.0), progress=False)


def test_metrics() -> None:
    pred = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    truth = torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.bool)
    m = heads.binary_metrics(pred, truth)
    assert m["tpr"] == pytest.approx(2 / 3) and m["tnr"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    z = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.9, -0.2])
    t = heads.best_threshold(z, torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool))
    assert 0.1 < t < 0.35 and heads.binary_metrics(z > t, torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool))["tnr"] == 2 / 3
    assert heads.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1], dtype=torch.bool)) == 0.75
    assert heads.auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1], dtype=torch.bool)) == 0.5
    a = torch.tensor([[[1, 1], [0, 0]], [[1, 0], [1, 0]]], dtype=torch.bool)
    assert torch.allclose(heads.jaccard(a), torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]))


def test_bad_input_raises_clear_errors() -> None:
    model = tiny()
    with pytest.raises(heads.HeadsError, match=r"\[0, 5\)"):
        heads.decompose_class(model, batch(), 7, 4, "taylor", progress=False)
    with pytest.raises(heads.HeadsError, match="keep=1"):
        heads.decompose_class(model, batch(), 1, 1, "taylor", progress=False)
    with pytest.raises(TypeError, match="VisionTransformer"):
        heads.insert_gates(torch.nn.Sequential(torch.nn.Linear(2, 2)))  # type: ignore[arg-type]
    normed = tiny()
    normed.blocks[1].attn.norm = torch.nn.LayerNorm(32)  # what timm's scale_attn_norm=True builds (newer timm only)
    with pytest.raises(heads.HeadsError, match="scale_attn_norm"):
        heads.insert_gates(normed)
    with pytest.raises(heads.HeadsError, match="insert_gates"):
        heads.gates(model)
    with pytest.raises(heads.HeadsError, match="shape"):
        heads.prune_heads(model, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(heads.HeadsError, match="both"):
        heads.reset_train(model, (batch()[0], torch.zeros(24, dtype=torch.long)), 0, 4, progress=False)
    with pytest.raises(heads.HeadsError, match="needs data"):
        heads.compose([heads.extract_module(model, 0, torch.ones(2, 4, dtype=torch.bool))])
    with pytest.raises(heads.HeadsError, match="method"):
        heads.decompose_class(model, batch(), 1, 4, "magic", progress=False)  # type: ignore[arg-type]


def test_keep_is_a_count_or_a_fraction_of_all_heads() -> None:
    assert heads.keep_count((8, 4), 16) == 16 and heads.keep_count((8, 4), 0.5) == 16
    assert heads.keep_count((12, 3), 0.5) == 18 and heads.keep_count((12, 6), 1.0) == 72
    assert heads.keep_count((2, 4), 0.3) == 2  # 2.4 rounds to 2
    with pytest.raises(heads.HeadsError, match=r"keep=1.5 is neither a head count \(pass an int"):
        heads.keep_count((8, 4), 1.5)
    with pytest.raises(heads.HeadsError, match="keep=0.1 of the 32 heads is 3: .*between 8 and 32"):
        heads.keep_count((8, 4), 0.1)
    with pytest.raises(heads.HeadsError, match="keep=40 heads is infeasible"):
        heads.keep_count((8, 4), 40)
    with pytest.raises(heads.HeadsError, match="head count"):
        heads.keep_count((8, 4), True)


def test_module_latency_is_measured_on_both_models() -> None:
    model = tiny()
    mod = heads.decompose_class(model, batch(), 0, 4, "random", progress=False)
    lat = heads.latency(mod, model, batch_size=8, runs=3)
    assert lat["module_latency_s"] > 0 and lat["original_latency_s"] > 0
    assert lat["latency_speedup"] == pytest.approx(lat["original_latency_s"] / lat["module_latency_s"])
