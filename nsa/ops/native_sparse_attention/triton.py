"""NSA's output composed from the Triton branch kernels (:func:`reference.compose`)."""

from __future__ import annotations

from nsa.ops.native_sparse_attention.reference import compose


def native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, **kw):
    return compose(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, backend="triton", **kw)
