"""Brute-force NSA, written from NSA_SPEC.md independently of ``nsa.ops``.

Everything is float64 over the whole (packed) row with dense per-token masks
``[B, T, Hkv, S]``: documents are handled by a "same document" term in the mask, not by
slicing, so any leak across documents shows up. Selection loops over tokens in Python and
follows the spec sentence by sentence. Slow on purpose; for small test shapes only.
"""

from __future__ import annotations

import math

import torch


def doc_ids(cu_seqlens, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: document id and position inside its document (one document without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(T, dtype=torch.long), torch.arange(T)
    cu = [int(x) for x in cu_seqlens]
    doc = torch.zeros(T, dtype=torch.long)
    for i in range(len(cu) - 1):
        doc[cu[i] : cu[i + 1]] = i
    start = torch.tensor(cu[:-1])[doc]
    return doc, torch.arange(T) - start


def cmp_ids(cu_seqlens, T: int, l: int, d: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per packed compressed block: document id and index inside its document; plus offsets."""
    cu = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    doc, rel, offsets = [], [], [0]
    for i in range(len(cu) - 1):
        length = cu[i + 1] - cu[i]
        count = 0
        while count * d + l <= length:  # block `count` is complete
            doc.append(i)
            rel.append(count)
            count += 1
        offsets.append(offsets[-1] + count)
    return torch.tensor(doc, dtype=torch.long), torch.tensor(rel, dtype=torch.long), offsets


def attend(q, k, v, mask, scale):
    """Masked softmax attention in float64. ``q [B,T,H,Dk]``, ``k [B,S,Hkv,Dk]``, ``v [B,S,Hkv,Dv]``,
    ``mask`` bool broadcastable to ``[B,T,Hkv,S]``. Returns ``o [B,T,H,Dv]``, ``lse [B,T,H]``,
    ``p [B,T,H,S]``; rows without a visible key give 0, ``-inf`` and 0 (no NaN in gradients)."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, _ = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    kk, vv = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bths", q, kk) * scale
    m = mask.expand(B, T, Hkv, k.shape[1]).repeat_interleave(G, dim=2)
    any_visible = m.any(-1, keepdim=True)
    lse = torch.logsumexp(
        s.masked_fill(~m, float("-inf")).masked_fill(~any_visible, 0.0), dim=-1, keepdim=True
    )
    p = torch.exp(s.masked_fill(~m, float("-inf")) - lse)
    o = torch.einsum("bths,bshd->bthd", p, vv)
    lse = lse.squeeze(-1).masked_fill(~any_visible.squeeze(-1), float("-inf"))
    return o, lse, p


def compressed_mask(T, l, d, cu_seqlens):
    """``[1, T, 1, Nc]``: block visible iff same document and ``i*d + l - 1 <= t`` (relative)."""
    tdoc, trel = doc_ids(cu_seqlens, T)
    cdoc, crel, _ = cmp_ids(cu_seqlens, T, l, d)
    m = (tdoc[:, None] == cdoc[None, :]) & (crel[None, :] * d + l - 1 <= trel[:, None])
    return m[None, :, None, :]


def compressed_attention(q, kc, vc, l, d, scale, cu_seqlens=None):
    o, lse, _ = attend(q, kc, vc, compressed_mask(q.shape[1], l, d, cu_seqlens), scale)
    return o, lse


def select_blocks(q, kc, l, d, ls, n, n_init, n_local, scale, cu_seqlens=None):
    """Spec selection, token by token. Returns (indices int64 ``[B,T,Hkv,n]``, scores: a dict
    ``(b, t, g) -> {j: S_t[j]}`` over the causal blocks)."""
    B, T, H, _ = q.shape
    Hkv = kc.shape[2]
    G = H // Hkv
    _, _, p = attend(q, kc, kc, compressed_mask(T, l, d, cu_seqlens), scale)
    P = p.view(B, T, Hkv, G, -1).sum(3)  # group sum, [B, T, Hkv, Nc_packed]
    tdoc, trel = doc_ids(cu_seqlens, T)
    _, _, offsets = cmp_ids(cu_seqlens, T, l, d)
    a, bb = ls // d, l // d
    out = torch.full((B, T, Hkv, n), -1, dtype=torch.long)
    scores = {}
    for b in range(B):
        for t in range(T):
            lo, hi = offsets[int(tdoc[t])], offsets[int(tdoc[t]) + 1]
            tr = int(trel[t])
            cur = tr // ls
            for g in range(Hkv):
                Pd = P[b, t, g, lo:hi].tolist()
                S = {}
                for j in range(cur + 1):
                    total = 0.0
                    for m_ in range(a):
                        for u in range(bb):
                            i = a * j + m_ - u
                            if 0 <= i < len(Pd):
                                total += Pd[i]
                    S[j] = total
                scores[(b, t, g)] = S
                forced = {j for j in range(cur + 1) if j < n_init or j > cur - n_local}
                rest = sorted((j for j in S if j not in forced), key=lambda j: (-S[j], j))
                chosen = sorted(forced | set(rest[: n - len(forced)]))
                out[b, t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out, scores


def selected_mask(block_indices, ls, T, cu_seqlens):
    """``[B, T, Hkv, T]``: key ``s`` visible to ``(t, g)`` iff same document, ``s <= t`` and the
    block of ``s`` (relative) is one of the valid selected blocks."""
    tdoc, trel = doc_ids(cu_seqlens, T)
    idx = block_indices.long()
    sblk = trel // ls  # [S]
    in_sel = ((idx[..., None, :] == sblk[:, None]) & (idx[..., None, :] >= 0)).any(-1)  # [B,T,Hkv,S]
    causal = (tdoc[:, None] == tdoc[None, :]) & (trel[None, :] <= trel[:, None])
    return in_sel & causal[None, :, None, :]


def selected_attention(q, k, v, block_indices, ls, scale, cu_seqlens=None):
    return attend(q, k, v, selected_mask(block_indices, ls, q.shape[1], cu_seqlens), scale)[0]


def window_mask(T, w, cu_seqlens):
    tdoc, trel = doc_ids(cu_seqlens, T)
    diff = trel[:, None] - trel[None, :]
    m = (tdoc[:, None] == tdoc[None, :]) & (diff >= 0) & (diff < w)
    return m[None, :, None, :]


def sliding_window_attention(q, k, v, w, scale, cu_seqlens=None):
    return attend(q, k, v, window_mask(q.shape[1], w, cu_seqlens), scale)[0]


# ----------------------------------------------------------------------------- test inputs


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def num_cmp(length: int, l: int, d: int) -> int:
    return (length - l) // d + 1 if length >= l else 0


def make_inputs(B, T, H, Hkv, Dk, Dv, l, d, cu_seqlens=None, dtype=torch.float32, seed=0, cmp_gain=2.0):
    """Random ``q, k, v, k_cmp, v_cmp`` (k_cmp scaled by ``cmp_gain`` so the compressed softmax
    is far from uniform and selection is a real choice)."""
    g = torch.Generator().manual_seed(seed)
    cu = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    Nc = sum(num_cmp(cu[i + 1] - cu[i], l, d) for i in range(len(cu) - 1))

    def rnd(*shape, gain=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * gain).to(dtype)

    return (
        rnd(B, T, H, Dk),
        rnd(B, T, Hkv, Dk),
        rnd(B, T, Hkv, Dv),
        rnd(B, Nc, Hkv, Dk, gain=cmp_gain),
        rnd(B, Nc, Hkv, Dv),
    )


def random_block_indices(B, T, Hkv, n, ls, cu_seqlens=None, seed=0):
    """Arbitrary indices in ``[-1, blocks of the document)``: includes ``-1``, repeats and
    non-causal blocks, which the ops must ignore (tokens after ``t`` are masked anyway)."""
    g = torch.Generator().manual_seed(seed)
    _, trel = doc_ids(cu_seqlens, T)
    cu = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    longest = max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    hi = max(1, -(-longest // ls))
    idx = torch.randint(-1, hi, (B, T, Hkv, n), generator=g)
    cur = (trel // ls)[None, :, None]
    idx[..., 0] = torch.minimum(idx[..., 0].abs(), cur)  # a causal first slot for most queries
    return idx.to(torch.int32)


def selection_distill(q, k, kc, block_indices, l, d, ls, n_init, n_local, scale, cu_seqlens=None):
    """Selection distillation (``nsa.ops.select_blocks.distill``), query by query: for each
    ``(b, t, g)`` the free selected blocks F (chosen, neither initial nor local); the target is
    the selected attention's mass on each block of F summed over the group's heads, the student
    the spec's ``S_t[j]`` over F, both renormalised over F; returns ``(kl, valid)`` ``[B,T,Hkv]``
    (``valid`` iff ``|F| >= 2``, ``kl`` 0 otherwise)."""
    B, T, H, _ = q.shape
    Hkv = kc.shape[2]
    G = H // Hkv
    _, S = select_blocks(q, kc, l, d, ls, 1, 0, 0, scale, cu_seqlens)  # only the scores are used
    _, _, p = attend(q, k, k, selected_mask(block_indices, ls, T, cu_seqlens), scale)  # [B, T, H, T]
    _, trel = doc_ids(cu_seqlens, T)
    kl = torch.zeros(B, T, Hkv, dtype=torch.float64)
    valid = torch.zeros(B, T, Hkv, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            tr = int(trel[t])
            cur = tr // ls
            for g in range(Hkv):
                F = sorted({int(j) for j in block_indices[b, t, g].tolist() if n_init <= j <= cur - n_local})
                if len(F) < 2:
                    continue
                valid[b, t, g] = True
                mass = []
                for j in F:
                    keys = [s for s in range(T) if s <= t and t - tr + j * ls <= s < t - tr + (j + 1) * ls]
                    mass.append(float(p[b, t, g * G:(g + 1) * G][:, keys].sum()))
                score = [S[(b, t, g)][j] for j in F]
                m_total, s_total = sum(mass), sum(score)
                kl[b, t, g] = sum(m / m_total * math.log((m / m_total) / (s / s_total))
                                  for m, s in zip(mass, score, strict=True) if m > 0)
    return kl, valid
