"""Token reduction as pure, batched tensor ops: attention prune (optional fused token: EViT's or tcl's mean), ToMe's
bipartite soft matching and tcl's bipartite variant, attention-guided merge, DiffRate's prune-and-merge step, size /
source tracking and proportional attention.

Every matching function computes its indices once and returns a `Reduce` closure that applies them to any
[B, N, ...] tensor (features, sizes, sources, importances): output token j is the group made of the kept input
token ``keep[:, j]`` plus every source token merged into it. ``f(t)`` sums each group; ``f(t, w)`` takes its
w-weighted mean (a group of one token is returned exactly as it was). Protected prefix tokens (CLS,
distillation, registers) are always kept, at output positions 0..prefix-1, and never merged.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Reduce(Protocol):
    """Maps [B, N, ...] to [B, M, ...]: the sum of each output token's group, or its w-weighted mean."""

    def __call__(self, t: Tensor, w: Tensor | None = None) -> Tensor: ...


MAX_BIPARTITE_SHARE = 0.5  # a bipartite merge removes at most this share of the non-protected tokens (max_bipartite)


def max_bipartite(n: int, protected: int) -> int:
    """The most tokens a bipartite merge of n tokens removes: half of the non-protected ones (the one rule)."""
    return max(n - protected, 0) // 2


def _flat(idx: Tensor, n: int) -> Tensor:
    """Batch-row indices [B, K] into n tokens as indices into the flattened [B * n] token axis."""
    return (idx + n * torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)).reshape(-1)


def _rows(t: Tensor, flat: Tensor, k: int) -> Tensor:
    """The rows of t [B, N, ...] at flat indices into its [B * N] token axis, as [B, k, ...]."""
    return t.reshape(-1, *t.shape[2:]).index_select(0, flat).view(t.shape[0], k, *t.shape[2:])


def take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows idx[b] of t[b] for every batch row: [B, N, ...] and [B, K] -> [B, K, ...]."""
    return _rows(t, _flat(idx, t.shape[1]), idx.shape[1])


def identity(t: Tensor, w: Tensor | None = None) -> Tensor:
    """The Reduce that keeps every token as it is."""
    return t


def groups(keep: Tensor, src: Tensor | None = None, dst: Tensor | None = None, *, n: int) -> Reduce:
    """The Reduce from n tokens whose output token j is input keep[:, j] plus each src[:, i] with dst[:, i] == j."""
    m = keep.shape[1]
    keep_f = _flat(keep, n)  # flat indices are computed once and serve every tensor the Reduce is applied to
    if src is None or dst is None or src.shape[1] == 0:
        return lambda t, w=None: _rows(t, keep_f, m)
    r, src_f, dst_f = src.shape[1], _flat(src, n), _flat(dst, m)

    def add(out: Tensor, rows: Tensor) -> Tensor:  # out[b, dst[b, i]] += rows[b, i], in place on a fresh out
        out.view(-1, *out.shape[2:]).index_add_(0, dst_f, rows.reshape(-1, *out.shape[2:]))
        return out

    def reduce(t: Tensor, w: Tensor | None = None) -> Tensor:
        out, ts = _rows(t, keep_f, m), _rows(t, src_f, r)
        if w is None:
            return add(out, ts)
        ws = _rows(w, src_f, r)
        total = add(_rows(w, keep_f, m), ws)
        # x_d + sum_s w_s (x_s - x_d) / W_d  ==  (w_d x_d + sum_s w_s x_s) / W_d, exact for untouched tokens
        return add(out, ws / _rows(total, dst_f, r) * (ts - _rows(out, dst_f, r)))

    return reduce


def head_sum(metric: Tensor) -> Tensor:
    """A per-head metric [B, N, H, D] (keys) summed over heads, the head mean up to scale; [B, N, D] as it is."""
    if metric.dim() == 3 or metric.shape[2] == 1:
        return metric if metric.dim() == 3 else metric[:, :, 0]
    out = metric[:, :, 0] + metric[:, :, 1]
    for h in range(2, metric.shape[2]):  # strided adds beat one reduction over the strided head axis
        out += metric[:, :, h]
    return out


def _prefix_idx(batch: int, prefix: int, device: torch.device) -> Tensor:
    return torch.arange(prefix, device=device).expand(batch, prefix)


def _check_keep(keep: int, prefix: int, n: int) -> None:
    if not prefix <= keep:
        raise ValueError(f"cannot keep {keep} of {n} tokens with {prefix} protected ones; keep at least {prefix}")


def prune_merge(importance: Tensor, metric: Tensor | None, prune_keep: int, merge_keep: int, prefix: int) -> Reduce:
    """In one pass: keep the prefix and the top-(prune_keep - prefix) tokens by importance [B, N], then merge the
    lowest-importance of those beyond merge_keep each into its most cosine-similar (by metric [B, N, D]) token
    among the (merge_keep - prefix) highest; kept tokens come in descending importance when anything merges.
    A per-head metric [B, N, H, D] (keys) is summed over heads, i.e. compared by its head mean."""
    batch, n = importance.shape
    _check_keep(merge_keep, prefix, n)
    if merge_keep > prune_keep:
        raise ValueError(f"merge_keep={merge_keep} exceeds prune_keep={prune_keep}; a merge only removes tokens")
    prune_keep = min(prune_keep, n)
    if merge_keep >= n:
        return identity
    head = _prefix_idx(batch, prefix, importance.device)
    order = importance[:, prefix:].topk(prune_keep - prefix, dim=1, sorted=merge_keep < prune_keep).indices + prefix
    if merge_keep == prune_keep:
        return groups(torch.cat([head, order], 1), n=n)
    if merge_keep == prefix or metric is None:
        raise ValueError(f"merging down to {merge_keep} tokens needs a metric and a destination besides the "
                         f"{prefix} protected ones; pass metric and keep at least {prefix + 1}")
    dst_pool, src = order[:, :merge_keep - prefix], order[:, merge_keep - prefix:]
    dst_metric, src_metric = head_sum(take(metric, dst_pool)), head_sum(take(metric, src))
    # cosine similarity up to each source's own (positive) norm, which does not change its argmax
    sim = src_metric @ dst_metric.transpose(1, 2) / dst_metric.norm(dim=-1).clamp_min(1e-12).unsqueeze(1)
    return groups(torch.cat([head, dst_pool], 1), src, sim.argmax(dim=-1) + prefix, n=n)


def prune(importance: Tensor, keep: int, prefix: int, fuse: bool = False) -> Reduce:
    """Keep the prefix and the top-(keep - prefix) other tokens by importance [B, N] (in no set order); with fuse,
    the last of the `keep` slots is one token holding every pruned token (tcl's fused-token variant: apply with
    w = importance for the attention-weighted mean; EViT's own fused token is evit_prune)."""
    batch, n = importance.shape
    _check_keep(keep, prefix, n)
    if not (fuse and prefix < keep < n):
        return prune_merge(importance, None, keep, keep, prefix)
    order = importance[:, prefix:].argsort(dim=1, descending=True) + prefix
    src = order[:, keep - prefix:]  # order[:, keep - prefix - 1] is the pruned token the others fuse into
    return groups(torch.cat([_prefix_idx(batch, prefix, order.device), order[:, :keep - prefix]], 1), src,
                  torch.full_like(src, keep - 1), n=n)


def attention_merge(importance: Tensor, metric: Tensor, keep: int, prefix: int) -> Reduce:
    """Merge the (N - keep) lowest-importance non-prefix tokens each into its most cosine-similar (by metric
    [B, N, D]) token among the (keep - prefix) highest-importance ones; kept tokens come in descending importance."""
    return prune_merge(importance, metric, importance.shape[1], keep, prefix)


def bipartite_merge(metric: Tensor, r: int, prefix: int) -> Reduce:
    """tcl's bipartite variant of ToMe (not ToMe's split, see tome_merge): split only the non-prefix tokens
    alternately into A (even) and B (odd), merge the r tokens of A most cosine-similar to B each into its best match
    (metric [B, N, D], or [B, N, H, D] summed over heads); output [prefix, unmerged A in order, B in order]."""
    batch, n = metric.shape[:2]
    if not 0 <= r <= max_bipartite(n, prefix):
        raise ValueError(f"bipartite merge removes at most half of the {n - prefix} non-protected tokens, "
                         f"asked for r={r}; use fewer merges or merge='attention'")
    if r == 0:
        return identity
    m = F.normalize(head_sum(metric[:, prefix:]), dim=-1)
    a, b = m[:, ::2], m[:, 1::2]
    best, match = (a @ b.transpose(1, 2)).max(dim=-1)
    rank = best.argsort(dim=1, descending=True)
    src_a, unmerged_a = rank[:, :r], rank[:, r:].sort(dim=1).values
    dev = metric.device
    b_idx = (prefix + 1 + 2 * torch.arange(b.shape[1], device=dev)).expand(batch, -1)
    keep = torch.cat([_prefix_idx(batch, prefix, dev), prefix + 2 * unmerged_a, b_idx], 1)
    dst = prefix + unmerged_a.shape[1] + match.gather(1, src_a)
    return groups(keep, prefix + 2 * src_a, dst, n=n)


def tome_merge(metric: Tensor, r: int, class_token: bool, distill_token: bool) -> Reduce:
    """ToMe's bipartite soft matching: all N tokens alternate into A (even) and B (odd); the class token (A's first) is
    never merged, the distillation token (B's first) never a destination; the r tokens of A most cosine-similar to B
    (metric [B, N, D], or [B, N, H, D] by its head mean) merge each into its best match. Output: [unmerged A, B], A by
    position with a class token and by descending score without, the distillation token moved to position 1."""
    batch, n = metric.shape[:2]
    protected = int(class_token) + int(distill_token)
    if not 0 <= r <= max_bipartite(n, protected):
        raise ValueError(f"ToMe merges at most half of the {n - protected} non-protected tokens, asked for r={r}; "
                         "use fewer merges (Schedule.tome caps r)")
    if r == 0:
        return identity
    m = F.normalize(head_sum(metric), dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    best, match = scores.max(dim=-1)
    rank = best.argsort(dim=1, descending=True)
    src, unm = rank[:, :r], rank[:, r:]
    if class_token:
        unm = unm.sort(dim=1).values
    dev, na, nb = metric.device, unm.shape[1], n // 2
    keep = torch.cat([2 * unm, (1 + 2 * torch.arange(nb, device=dev)).expand(batch, nb)], 1)
    b_pos = na + torch.arange(nb, device=dev)  # output position of B's j-th token
    if distill_token:  # ToMe's order [unm[0], B[0], unm[1:], B[1:]]
        perm = torch.cat([torch.tensor([0, na], device=dev), torch.arange(1, na, device=dev),
                          torch.arange(na + 1, na + nb, device=dev)])
        keep, b_pos = keep[:, perm], torch.cat([torch.ones(1, dtype=b_pos.dtype, device=dev), b_pos[1:]])
    return groups(keep, 2 * src, b_pos[match.gather(1, src)], n=n)


def evit_prune(importance: Tensor, keep: int, prefix: int) -> tuple[Reduce, Tensor]:
    """EViT's inattentive-token fusion: keep the prefix and the top-(keep - prefix - 1) other tokens by importance
    [B, N] (class attention), in descending importance, and fold every other token into one last token. Returns the
    Reduce (group sums) and per-token weights [B, N, 1] (1 for kept tokens, the importance for fused ones): features
    become f(x * weights), EViT's attention-weighted sum; sizes and sources f(size), f(source)."""
    batch, n = importance.shape
    if not prefix < keep < n:
        raise ValueError(f"an EViT fused token needs {prefix} < keep < {n} tokens, got keep={keep}; keep one token "
                         "more than the prefix at least, and fewer than all")
    order = importance[:, prefix:].argsort(dim=1, descending=True) + prefix
    kept, fused = order[:, :keep - prefix - 1], order[:, keep - prefix - 1:]
    head = _prefix_idx(batch, prefix, order.device)
    f = groups(torch.cat([head, kept, fused[:, :1]], 1), fused[:, 1:], torch.full_like(fused[:, 1:], keep - 1), n=n)
    weights = torch.ones_like(importance).scatter(1, fused, importance.gather(1, fused)).unsqueeze(-1)
    return f, weights


def diffrate_merge(importance: Tensor, metric: Tensor, prune_keep: int, merge_keep: int,
                   prefix: int) -> tuple[Reduce, Tensor]:
    """DiffRate's inference step: keep the prefix and the top-(prune_keep - prefix) tokens by importance [B, N], then
    merge the lowest-importance of those beyond merge_keep each into its most cosine-similar (by metric [B, N, D])
    token among the (merge_keep - prefix) highest; kept tokens in descending importance. Returns the Reduce and
    per-token weights [B, N, 1] (the cosine similarity of a merged token's match, 1 otherwise): features become the
    unweighted group mean f(x, ones), sizes f(size * weights)."""
    batch, n = importance.shape
    _check_keep(merge_keep, prefix, n)
    if merge_keep > prune_keep:
        raise ValueError(f"merge_keep={merge_keep} exceeds prune_keep={prune_keep}; a merge only removes tokens")
    ones = torch.ones_like(importance).unsqueeze(-1)
    prune_keep = min(prune_keep, n)
    if merge_keep >= prune_keep:
        return prune_merge(importance, None, prune_keep, prune_keep, prefix), ones
    if merge_keep == prefix:
        raise ValueError(f"merging down to the {prefix} protected tokens leaves no destination; keep at least "
                         f"{prefix + 1}")
    order = importance[:, prefix:].topk(prune_keep - prefix, dim=1).indices + prefix
    dst_pool, src = order[:, :merge_keep - prefix], order[:, merge_keep - prefix:]
    unit = F.normalize(head_sum(metric), dim=-1)
    best, match = (take(unit, src) @ take(unit, dst_pool).transpose(1, 2)).max(dim=-1)
    f = groups(torch.cat([_prefix_idx(batch, prefix, order.device), dst_pool], 1), src, match + prefix, n=n)
    return f, ones.scatter(1, src.unsqueeze(-1), best.unsqueeze(-1).to(ones.dtype))


def merge_wavg(f: Reduce, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Apply f to features x as a size-weighted mean and to sizes [B, N, 1] as a sum (None = all ones)."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    return f(x, size), f(size)


def init_source(batch: int, n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Source matrix [B, N, N] of unreduced tokens: token i holds input patch i (reduce it with f(source))."""
    return torch.eye(n, device=device, dtype=dtype).expand(batch, n, n)


def size_bias(size: Tensor) -> Tensor:
    """Proportional attention: log(size) [B, N, 1] as an additive attention mask [B, 1, 1, N]."""
    return size.log().transpose(1, 2).unsqueeze(1)


def cls_attention(q: Tensor, k: Tensor, scale: float, readers: int, size: Tensor | None = None) -> Tensor:
    """Softmax attention [B, H, N] of the first `readers` tokens' queries (averaged) over all keys, log(size) added;
    with readers == 0 the query is the size-weighted mean query (a proxy for the mean attention received)."""
    if readers > 0:
        qr = q[:, :, :readers]
    elif size is None:
        qr = q.mean(dim=2, keepdim=True)
    else:
        qr = (q * size.unsqueeze(1)).sum(dim=2, keepdim=True) / size.sum(dim=1).view(-1, 1, 1, 1)
    b, h, n, d = k.shape
    r = qr.shape[2]
    # one GEMM of the block-diagonal [H*R, H*d] matrix of the scaled queries against k as [B, N, H*d] (a view of
    # the qkv output; a [B*H]-batched matmul would copy k): H x the needed MACs (N*C*H*R), no copy of k
    eye = torch.eye(h, dtype=q.dtype, device=q.device).view(1, h, 1, h, 1)
    qd = (eye * (qr * scale).unsqueeze(3)).reshape(b, h * r, h * d)
    logits = torch.bmm(qd, k.transpose(1, 2).reshape(b, n, h * d).transpose(1, 2)).view(b, h, r, n)
    if size is not None:
        logits = logits + size_bias(size)
    attn = logits.softmax(dim=-1)
    return attn.squeeze(2) if attn.shape[2] == 1 else attn.mean(dim=2)
