"""tcl.tokens: prune / merge ops against naive references, and their invariants (hypothesis)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tcl import tokens

SETTINGS = settings(max_examples=60, deadline=None)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """A random batch: B, N, prefix, features, importance (softmax), sizes and a source matrix."""
    b, prefix = draw(st.integers(1, 3)), draw(st.integers(0, 3))
    n = draw(st.integers(prefix + 2, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    size = torch.randint(1, 4, (b, n, 1), generator=torch.Generator().manual_seed(seed)).float()
    return dict(b=b, n=n, prefix=prefix, x=_rand(seed, b, n, 5), metric=_rand(seed + 1, b, n, 4),
                imp=_rand(seed + 2, b, n).softmax(-1), size=size, source=tokens.init_source(b, n))


def _op(p: dict, kind: str, keep: int) -> tuple[tokens.Reduce, torch.Tensor | None]:
    """A reduction of p to `keep` tokens and the feature weights it averages with (None: plain gather)."""
    n, prefix = p["n"], p["prefix"]
    if kind == "prune":
        return tokens.prune(p["imp"], keep, prefix), None
    if kind == "fuse":
        return tokens.prune(p["imp"], keep, prefix, fuse=True), p["imp"].unsqueeze(-1)
    if kind == "attention":
        return tokens.attention_merge(p["imp"], p["metric"], keep, prefix), p["size"]
    if kind == "prune_merge":
        return tokens.prune_merge(p["imp"], p["metric"], (n + keep + 1) // 2, keep, prefix), p["size"]
    return tokens.bipartite_merge(p["metric"], n - keep, prefix), p["size"]


def _keep_range(kind: str, n: int, prefix: int) -> tuple[int, int]:
    low = {"prune": max(prefix, 1), "fuse": prefix + 1, "attention": prefix + 1, "prune_merge": prefix + 1,
           "bipartite": n - (n - prefix) // 2}[kind]
    return low, n


KINDS = ["prune", "fuse", "attention", "prune_merge", "bipartite"]


@SETTINGS
@given(p=problems(), kind=st.sampled_from(KINDS), data=st.data())
def test_counts_protected_tokens_sizes_and_sources(p: dict, kind: str, data: st.DataObject) -> None:
    keep = data.draw(st.integers(*_keep_range(kind, p["n"], p["prefix"])))
    f, w = _op(p, kind, keep)
    x, size, source, prefix = p["x"], p["size"], p["source"], p["prefix"]
    out_x, out_size, out_src = f(x, w), f(size), f(source * size)  # source weighted by size: patches per token
    assert out_x.shape == (p["b"], keep, 5) and out_size.shape == (p["b"], keep, 1)
    # protected tokens: kept at 0..prefix-1, bit-identical
    assert torch.equal(out_x[:, :prefix], x[:, :prefix]) and torch.equal(out_size[:, :prefix], size[:, :prefix])
    # every input token lands in at most one output token (exactly one when nothing is dropped)
    held = f(source).sum(1)
    assert set(held.unique().tolist()) <= {0.0, 1.0}
    if kind in ("fuse", "attention", "bipartite"):
        assert torch.equal(held, torch.ones_like(held))
        assert torch.allclose(out_size.sum(1), size.sum(1))  # sizes are conserved
    # each output token's size is the summed size of the inputs it holds
    assert torch.allclose(out_src.sum(-1, keepdim=True), out_size)
    # size-weighted mean: features equal (sizes x sources) @ x / size
    if kind in ("attention", "prune_merge", "bipartite"):
        assert torch.allclose(out_x, out_src @ x / out_size, atol=1e-5)


@SETTINGS
@given(p=problems(), data=st.data())
def test_prune_keeps_the_highest_importance_tokens(p: dict, data: st.DataObject) -> None:
    prefix, n = p["prefix"], p["n"]
    keep = data.draw(st.integers(prefix, n))
    f = tokens.prune(p["imp"], keep, prefix)
    kept = f(torch.arange(n).expand(p["b"], n).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(kept[:, :prefix], torch.arange(prefix).expand(p["b"], prefix))
    for b in range(p["b"]):
        best = set((p["imp"][b, prefix:].argsort(descending=True)[:keep - prefix] + prefix).tolist())
        assert set(kept[b, prefix:].tolist()) == best


@SETTINGS
@given(p=problems(), data=st.data())
def test_fused_token_is_the_attention_weighted_mean_of_the_pruned(p: dict, data: st.DataObject) -> None:
    prefix, n = p["prefix"], p["n"]
    keep = data.draw(st.integers(prefix + 1, n - 1))
    f = tokens.prune(p["imp"], keep, prefix, fuse=True)
    kept = f(torch.ones(p["b"], n, 1) * torch.arange(n).view(1, n, 1), None)  # only meaningful for singletons
    fused_x = f(p["x"], p["imp"].unsqueeze(-1))[:, -1]
    for b in range(p["b"]):
        real = set(kept[b, :keep - 1, 0].long().tolist())
        pruned = [i for i in range(prefix, n) if i not in real]
        a = p["imp"][b, pruned]
        assert torch.allclose(fused_x[b], (a[:, None] * p["x"][b, pruned]).sum(0) / a.sum(), atol=1e-5)


def _naive_bipartite(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, prefix: int) -> torch.Tensor:
    """ToMe by the definition, token by token."""
    out = []
    for b in range(x.shape[0]):
        others = list(range(prefix, x.shape[1]))
        a_set, b_set = others[0::2], others[1::2]
        m = F.normalize(metric[b], dim=-1)
        match = {a: max(b_set, key=lambda j: float(m[a] @ m[j])) for a in a_set}
        merged = sorted(a_set, key=lambda a: -float(m[a] @ m[match[a]]))[:r]
        group = {t: [t] for t in range(x.shape[1]) if t not in merged}
        for a in merged:
            group[match[a]].append(a)
        order = list(range(prefix)) + [a for a in a_set if a not in merged] + b_set
        out.append(torch.stack([(size[b, group[t]] * x[b, group[t]]).sum(0) / size[b, group[t]].sum() for t in order]))
    return torch.stack(out)


@pytest.mark.parametrize("prefix,n,r", [(1, 11, 3), (0, 10, 5), (2, 13, 4), (1, 12, 1)])
def test_bipartite_merge_equals_naive_reference(prefix: int, n: int, r: int) -> None:
    x, metric = _rand(0, 2, n, 6), _rand(1, 2, n, 4)
    size = torch.randint(1, 5, (2, n, 1), generator=torch.Generator().manual_seed(2)).float()
    f = tokens.bipartite_merge(metric, r, prefix)
    assert torch.allclose(f(x, size), _naive_bipartite(x, metric, size, r, prefix), atol=1e-6)
    assert tokens.bipartite_merge(metric, 0, prefix) is tokens.identity  # r = 0 leaves tokens (and order) alone


def test_attention_merge_and_prune_merge_equal_naive_reference() -> None:
    b, n, prefix, keep = 2, 12, 1, 6
    x, metric, imp = _rand(0, b, n, 5), _rand(1, b, n, 4), _rand(2, b, n).softmax(-1)
    size = torch.randint(1, 4, (b, n, 1), generator=torch.Generator().manual_seed(3)).float()
    want = []
    for i in range(b):
        order = (imp[i, prefix:].argsort(descending=True) + prefix).tolist()
        kept, tail = order[:keep - prefix], order[keep - prefix:]
        m = F.normalize(metric[i], dim=-1)
        group = {t: [t] for t in list(range(prefix)) + kept}
        for s in tail:
            group[max(kept, key=lambda j: float(m[s] @ m[j]))].append(s)
        want.append(torch.stack([(size[i, g] * x[i, g]).sum(0) / size[i, g].sum() for g in group.values()]))
    got = tokens.attention_merge(imp, metric, keep, prefix)(x, size)
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
    # one-pass prune+merge == prune, then attention merge of what is left
    fp = tokens.prune(imp, 9, prefix)
    two = tokens.attention_merge(fp(imp), fp(metric), keep, prefix)(fp(x), fp(size))
    assert torch.allclose(tokens.prune_merge(imp, metric, 9, keep, prefix)(x, size), two, atol=1e-6)


def test_per_head_metric_is_compared_by_its_head_mean() -> None:
    x, imp, keys = _rand(0, 2, 12, 5), _rand(1, 2, 12).softmax(-1), _rand(2, 2, 12, 3, 4)
    size = torch.ones(2, 12, 1)
    for f4, f3 in [(tokens.prune_merge(imp, keys, 9, 5, 1), tokens.prune_merge(imp, keys.mean(2), 9, 5, 1)),
                   (tokens.bipartite_merge(keys, 4, 1), tokens.bipartite_merge(keys.mean(2), 4, 1))]:
        assert torch.equal(f4(x, size), f3(x, size))


@pytest.mark.parametrize("readers", [0, 1, 2])
def test_cls_attention_equals_the_rows_of_the_full_attention_map(readers: int) -> None:
    b, h, n, d = 2, 3, 9, 4
    q, k = _rand(0, b, h, n, d), _rand(1, b, h, n, d)
    size = torch.randint(1, 4, (b, n, 1), generator=torch.Generator().manual_seed(2)).float()
    full = (q @ k.transpose(-2, -1) * d**-0.5 + size.log().view(b, 1, 1, n)).softmax(-1)
    if readers:
        want = full[:, :, :readers].mean(2)
    else:  # proxy: the attention row of the size-weighted mean query
        qm = (q * size.view(b, 1, n, 1)).sum(2, keepdim=True) / size.sum(1).view(b, 1, 1, 1)
        want = (qm @ k.transpose(-2, -1) * d**-0.5 + size.log().view(b, 1, 1, n)).softmax(-1)[:, :, 0]
    strided_k = torch.cat([k, k], -1)[..., :d]  # also the no-copy path on a strided view
    for kk in (k, strided_k):
        assert torch.allclose(tokens.cls_attention(q, kk, d**-0.5, readers, size), want, atol=1e-6)


def test_proportional_attention_equals_attention_over_duplicated_tokens() -> None:
    b, h, d = 1, 2, 4
    q, k, v = _rand(0, b, h, 3, d), _rand(1, b, h, 3, d), _rand(2, b, h, 3, d)
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    rep = torch.tensor([0, 1, 1, 1, 2, 2])
    dup = F.scaled_dot_product_attention(q, k[:, :, rep], v[:, :, rep])
    prop = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens.size_bias(size))
    assert torch.allclose(dup, prop, atol=1e-6)


def test_bad_counts_raise_value_errors_naming_the_fix() -> None:
    metric, imp = _rand(0, 1, 8, 4), _rand(1, 1, 8).softmax(-1)
    with pytest.raises(ValueError, match="at most half"):
        tokens.bipartite_merge(metric, 4, 1)
    with pytest.raises(ValueError, match="keep at least 2"):
        tokens.prune(imp, 1, 2)
    with pytest.raises(ValueError, match="keep at least 2"):
        tokens.attention_merge(imp, metric, 1, 1)
    assert tokens.prune(imp, 8, 1) is tokens.identity
