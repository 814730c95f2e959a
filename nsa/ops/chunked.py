"""Masked dense attention over query chunks: the engine of the compressed-attention reference
(and of the fused compressed attention + selection, which reads its probabilities).

A chunk ``[q0, q1)`` of queries attends to one key range ``[k0, k1)`` under a per-token mask
(``mask_fn``), so only a ``[chunk * H, k1 - k0]`` score block exists at a time and memory stays
linear in T; the backward recomputes each chunk's probabilities from the saved ``lse``.
"""

from __future__ import annotations

import torch

from nsa.ops.common import acc_dtype, from_groups, neg_inf_safe, to_groups, to_kv_heads


class ChunkedAttention(torch.autograd.Function):
    """Masked softmax attention computed one query chunk at a time, recomputed in backward.

    ``plan`` is a list of ``(q0, q1, k0, k1)``: queries ``[q0, q1)`` attend to keys
    ``[k0, k1)`` under ``mask_fn(q0, q1, k0, k1) -> bool [q1-q0, k1-k0]`` (True = visible),
    shared by all heads. Only one ``[chunk*H, k1-k0]`` score block exists at a time, and only
    ``o`` and ``lse`` are kept for backward (flash-attention style), so memory stays linear
    in T. Rows with no visible key get ``o = 0``, ``lse = -inf`` and zero gradients.

    Shapes: ``q [B,T,H,Dk]``, ``k [B,S,Hkv,Dk]``, ``v [B,S,Hkv,Dv]`` ->
    ``o [B,T,H,Dv]`` (input dtype), ``lse [B,T,H]`` (float32, float64 for float64 input).

    ``on_probs(q0, q1, k0, k1, e, inv_denom)``, if given, receives each chunk's softmax
    probabilities during the forward, factored as ``p = e * inv_denom[..., None]`` with
    ``e [B, Hkv, C, G, k1-k0]`` (``exp(s - max)``, 0 on hidden keys; no columns for a chunk
    without keys) and ``inv_denom [B, Hkv, C, G]``, so that a consumer such as block selection
    can reuse them instead of recomputing the scores, and can weight and reduce them (a sum
    over the heads of a group) in one pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, plan, mask_fn, on_probs=None):
        acc, Hkv = acc_dtype(q.dtype), k.shape[2]
        qs, kh, vh = to_groups(q, Hkv, acc) * scale, to_kv_heads(k, acc), to_kv_heads(v, acc)
        B, _, T, G, _ = qs.shape
        o = qs.new_zeros(B, Hkv, T, G, vh.shape[-1])
        lse = qs.new_full((B, Hkv, T, G), float("-inf"))
        if on_probs is not None:  # chunks without keys still reach the consumer, with no columns
            for q0, q1, k0, k1 in plan:
                if k1 <= k0:
                    on_probs(q0, q1, k0, k0, o.new_zeros(B, Hkv, q1 - q0, G, 0), o.new_ones(B, Hkv, q1 - q0, G))
        plan = [(q0, q1, k0, k1) for q0, q1, k0, k1 in plan if k1 > k0]  # no keys: o = 0, lse = -inf
        for q0, q1, k0, k1 in plan:
            e = masked_scores(qs, kh, q0, q1, k0, k1, mask_fn)  # [B, Hkv, C, G, S]
            m = neg_inf_safe(e.amax(-1, keepdim=True))
            e = e.sub_(m).exp_()
            denom = e.sum(-1)  # 0 exactly when no key is visible
            o_c = (e.view(B, Hkv, -1, k1 - k0) @ vh[:, :, k0:k1]).view(B, Hkv, q1 - q0, G, -1)
            denom_safe = torch.where(denom > 0, denom, 1.0)[..., None]
            o[:, :, q0:q1] = o_c / denom_safe
            lse[:, :, q0:q1] = m[..., 0] + torch.log(denom)
            if on_probs is not None:
                on_probs(q0, q1, k0, k1, e, denom_safe[..., 0].reciprocal())
        out = from_groups(o).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)  # the returned o, not a second copy
        ctx.scale, ctx.plan, ctx.mask_fn = scale, plan, mask_fn
        ctx.set_materialize_grads(False)
        return out, lse.permute(0, 2, 1, 3).reshape(B, T, Hkv * G)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        acc, Hkv, scale = lse.dtype, k.shape[2], ctx.scale
        qs, kh, vh = to_groups(q, Hkv, acc) * scale, to_kv_heads(k, acc), to_kv_heads(v, acc)
        B, _, T, G, Dk = qs.shape
        if do is None:
            dog, delta = qs.new_zeros(B, Hkv, T, G, v.shape[-1]), torch.zeros_like(lse)
        else:  # dS = P * (dP - delta + dlse), delta = rowsum(dO * O)
            dog = to_groups(do, Hkv, acc)
            delta = to_groups((do.to(acc) * out.to(acc)).sum(-1, keepdim=True), Hkv, acc)[..., 0]
        if dlse is not None:
            delta -= to_groups(dlse[..., None], Hkv, acc)[..., 0]
        lse = neg_inf_safe(lse)
        dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(kh), torch.zeros_like(vh)
        for q0, q1, k0, k1 in ctx.plan:
            C, S = q1 - q0, k1 - k0
            p = masked_scores(qs, kh, q0, q1, k0, k1, ctx.mask_fn).sub_(lse[:, :, q0:q1, :, None]).exp_()
            p = p.view(B, Hkv, C * G, S)
            do_c = dog[:, :, q0:q1].reshape(B, Hkv, C * G, -1)
            dv[:, :, k0:k1] += p.transpose(-1, -2) @ do_c
            ds = (do_c @ vh[:, :, k0:k1].transpose(-1, -2)).view(B, Hkv, C, G, S)
            ds = ds.sub_(delta[:, :, q0:q1, :, None]).view(B, Hkv, C * G, S).mul_(p)
            dq[:, :, q0:q1] = (ds @ kh[:, :, k0:k1]).view(B, Hkv, C, G, Dk)
            dk[:, :, k0:k1] += ds.transpose(-1, -2) @ qs[:, :, q0:q1].reshape(B, Hkv, C * G, Dk)
        dk, dv = dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)
        return from_groups(dq * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def masked_scores(qs, kh, q0, q1, k0, k1, mask_fn):
    """Scores ``[B, Hkv, C, G, S]`` of pre-scaled queries ``qs[:, :, q0:q1]`` (``[B,Hkv,T,G,Dk]``)
    against keys ``kh[:, :, k0:k1]`` (``[B,Hkv,S,Dk]``), ``-inf`` where ``mask_fn`` hides the key.

    Columns visible to every query of the chunk (the middle of a window, the early compressed
    blocks) are left alone; only the columns before and after that run are masked.
    """
    B, Hkv, _, G, Dk = qs.shape
    C, S = q1 - q0, k1 - k0
    s = (qs[:, :, q0:q1].reshape(B, Hkv, C * G, Dk) @ kh[:, :, k0:k1].transpose(-1, -2)).view(B, Hkv, C, G, S)
    mask = mask_fn(q0, q1, k0, k1)
    a, b = visible_run(mask)
    for lo, hi in ((0, a), (b, S)):
        if hi > lo:
            s[..., lo:hi].masked_fill_(~mask[:, None, lo:hi], float("-inf"))
    return s


def visible_run(mask: torch.Tensor) -> tuple[int, int]:
    """``[a, b)``: the run of columns of ``mask [C, S]`` visible to every row (the middle of a
    window, the early compressed blocks); ``(S, S)`` when there is none or it is not one run."""
    S = mask.shape[1]
    full = mask.all(0).nonzero()
    if not full.numel():
        return S, S
    a, b = int(full[0]), int(full[-1]) + 1
    return (a, b) if bool(mask[:, a:b].all()) else (S, S)


def chunked_attention(q, k, v, scale: float, plan, mask_fn, on_probs=None):
    """Functional form of :class:`ChunkedAttention`; returns ``(o, lse)``."""
    return ChunkedAttention.apply(q, k, v, scale, plan, mask_fn, on_probs)
