"""NSA's output composed from the branch ops (NSA_SPEC.md, "Output"): compressed attention (which
also selects the blocks), selected attention over those blocks, sliding-window attention, then
``o = sum_c g_c * o_c`` over the branches that are on. The "torch" and "triton" backends run this
with their branch ops; the "cpu" backend fuses it (``nsa.ops.native_sparse_attention.cpu``)."""

from __future__ import annotations

from nsa.ops.common import BRANCHES, backend_fn


def gated_sum(outs, gates, branches):
    """``sum_c g_c * o_c`` over ``branches`` (``outs``: the branch outputs in ``BRANCHES`` order,
    ``gates [..., 3]`` in the same order, or None: all 1), in the gates' dtype."""
    on = [(i, b) for i, b in enumerate(BRANCHES) if b in branches]
    if gates is None:
        return sum(outs[i] for i, _ in on)
    return sum(gates[..., i, None] * outs[i].to(gates.dtype) for i, _ in on)


def compose(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, block_len, stride, select_len, num_select,
            num_init, num_local, window, branches, scale, cu_seqlens, backend, return_selection=True):
    """``(o [B,T,H,Dv], idx [B,T,Hkv,n] int32 or None)`` from the branch ops of ``backend`` (``idx``
    None without "slc" or with ``return_selection`` False)."""
    outs, idx = {}, None
    if "cmp" in branches or "slc" in branches:  # selection scores come from the compressed branch
        fn = backend_fn("select_blocks", backend, "compressed_attention_and_select")
        outs["cmp"], _, idx = fn(q, k_cmp, v_cmp, block_len=block_len, stride=stride, select_len=select_len,
                                 num_select=num_select, num_init=num_init, num_local=num_local, scale=scale,
                                 cu_seqlens=cu_seqlens)
    if "slc" in branches:
        outs["slc"] = backend_fn("selected_attention", backend)(q, k_slc, v_slc, idx, select_len=select_len,
                                                                scale=scale, cu_seqlens=cu_seqlens)
    if "win" in branches:
        outs["win"] = backend_fn("sliding_window_attention", backend)(q, k_win, v_win, window=window, scale=scale,
                                                                      cu_seqlens=cu_seqlens)
    o = gated_sum([outs.get(b) for b in BRANCHES], gates, branches)
    return o, (idx if "slc" in branches and return_selection else None)


def native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, **kw):
    """:func:`compose` with the torch reference ops."""
    return compose(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, backend="torch", **kw)
