"""NSA's attention over whole sequences on the fused CPU op (``attention_cpu.cpp``): the autograd
functions behind the ``"cpu"`` backend (``nsa/ops/<op>/cpu.py``). :class:`BranchAttention` is one
branch; :class:`NativeSparseAttention` is all three and their gated sum in one pass.

Per query and KV head the op attends the G query heads of the group to a few contiguous key
spans (the window; the selected blocks, cut at the query; the visible compressed blocks) and,
for the compressed branch, also picks the selected blocks from its probabilities. The backward
recomputes each query's scores and probabilities (and, fused, the selection) exactly as the
forward computed them and needs neither ``o`` nor any per-branch copy of it (``delta = rowsum(P *
dP)``), so only the inputs are kept: no ``lse``, no selection. The torch
references in ``nsa/ops/<op>/reference.py`` are the oracle (tests/nsa/test_attention_cpu.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nsa.ops import cpu_build

ENV = "NSA_CPU_KERNEL"  # "0": the "cpu" backend is never picked by default (backend=None)
WINDOW, SELECTED, COMPRESSED = 0, 1, 2
TILE = 64  # keys per tile of the transposed K / V (TW in attention_cpu.cpp)
_NO_INDEX = torch.empty(0, dtype=torch.int32)


def applies(x: torch.Tensor) -> bool:
    """Whether the fused op takes ``x``'s op: a CPU float32 tensor, the kernels built."""
    return x.device.type == "cpu" and x.dtype is torch.float32 and cpu_build.load() is not None


def default_for(x: torch.Tensor) -> bool:
    """Whether ``backend=None`` picks the ``"cpu"`` backend for ``x``: :func:`applies`, not switched off."""
    return os.environ.get(ENV) != "0" and applies(x)


def _tiled_t(x: torch.Tensor) -> torch.Tensor:
    """``[B,S,Hkv,D]`` -> ``[B,Hkv,NT,D,TILE]``: each tile of ``TILE`` keys transposed, so a span's
    scores read contiguous ``[D, TILE]`` blocks; zero-padded with one spare tile (``NT = S//TILE + 1``
    or more), so the op may read a whole vector past a span's end."""
    B, S, Hkv, D = x.shape
    nt = S // TILE + 2 if S % TILE else S // TILE + 1
    x = F.pad(x, (0, 0, 0, 0, 0, nt * TILE - S))
    return x.view(B, nt, TILE, Hkv, D).permute(0, 3, 1, 4, 2).contiguous()


def _layouts(k: torch.Tensor, v: torch.Tensor, with_vt: bool, with_kt: bool = True):
    """``k [B,S,Hkv,Dk]``, ``v`` as they are (made contiguous: the op reads a head's rows ``Hkv D``
    apart); tiled transposed ``kT`` (an empty tensor unless ``with_kt``) and ``vT``, see
    :func:`_tiled_t`."""
    kt = _tiled_t(k) if with_kt else torch.empty(0)
    return k.contiguous(), kt, v.contiguous(), (_tiled_t(v) if with_vt else None)


def _forward_kt(mode: int, window: int, seqlen: int) -> bool:
    """Whether a forward hands the op a transposed copy of the branch's whole K (``kT``): only a
    window's over a quarter of the sequence or more. A shorter window's tiles the op transposes as
    it slides (a few per thread, each used by every query group that sees it), the compressed
    branch's once per query group, and the selected branch's, of random blocks, it keeps in the rows
    of its output no query has written yet (attention_cpu.cpp, ForwardPlan). So only a long
    window's forward holds a copy of K."""
    return mode == WINDOW and 4 * window >= seqlen


class BranchAttention(torch.autograd.Function):
    """``(o [B,T,H,Dv], lse [B,T,H], selected [B,T,Hkv,n] int32 or empty)`` of one branch;
    gradients for ``q``, ``k``, ``v`` (``lse``'s gradient included)."""

    @staticmethod
    def forward(ctx, q, k, v, idx, mode, params, select):
        q = q.contiguous()
        kc, kt, vc, _ = _layouts(k, v, False, _forward_kt(mode, params[0], k.shape[1]))
        ix = _NO_INDEX if idx is None else idx
        o, lse, sel = cpu_build.require().attention_forward(q, kc, kt, vc, ix, mode, *params, *select)
        ctx.save_for_backward(q, k, v, idx)
        ctx.mode, ctx.params = mode, params
        ctx.mark_non_differentiable(sel)
        ctx.set_materialize_grads(False)
        return o, lse, sel

    @staticmethod
    def backward(ctx, do, dlse, _):
        q, k, v, idx = ctx.saved_tensors
        if do is None and dlse is None:
            return None, None, None, None, None, None, None
        B, T, H, _ = q.shape
        do = q.new_zeros(B, T, H, v.shape[-1]) if do is None else do.contiguous()
        dlse = _NO_INDEX.float() if dlse is None else dlse.contiguous()
        kc, kt, vc, vt = _layouts(k, v, True)
        ix = _NO_INDEX if idx is None else idx
        dq, dkh, dvh = cpu_build.require().attention_backward(q, kc, kt, vc, vt, ix, do, dlse, ctx.mode, *ctx.params)
        return dq, dkh.transpose(1, 2), dvh.transpose(1, 2), None, None, None, None


@torch.compiler.disable  # a C++ op dynamo cannot trace: run it eagerly, a graph break
def window_attention(q, k, v, window: int, scale: float) -> torch.Tensor:
    """One sequence batch (no ``cu_seqlens``): ``o [B,T,H,Dv]``."""
    return BranchAttention.apply(q, k, v, None, WINDOW, (window, 0, 0, 0, scale), (0, 0, 0))[0]


@torch.compiler.disable  # a C++ op dynamo cannot trace: run it eagerly, a graph break
def selected_attention(q, k, v, block_indices, select_len: int, scale: float) -> torch.Tensor:
    idx = block_indices.to(torch.int32).contiguous()
    return BranchAttention.apply(q, k, v, idx, SELECTED, (0, select_len, 0, 0, scale), (0, 0, 0))[0]


@torch.compiler.disable  # a C++ op dynamo cannot trace: run it eagerly, a graph break
def compressed_attention(q, k_cmp, v_cmp, block_len: int, stride: int, scale: float, select=None):
    """``(o, lse)``; with ``select = (select_len, num_select, num_init, num_local)`` also the
    selected blocks: ``(o, lse, idx [B,T,Hkv,n] int32)``."""
    select_len, n, n_init, n_local = select if select is not None else (0, 0, 0, 0)
    o, lse, idx = BranchAttention.apply(q, k_cmp, v_cmp, None, COMPRESSED, (0, select_len, block_len, stride, scale),
                                        (n, n_init, n_local))
    return (o, lse, idx) if select is not None else (o, lse)


def _branch_layouts(pairs, run, with_vt: bool, with_kt=(True, True, True)):
    """Per branch (compressed, selected, window): ``(k, kT, v, vT)`` of its ``(k, v)`` when it runs
    (``kT`` empty where ``with_kt`` says no), empty tensors otherwise; a K/V pair shared between
    branches is laid out once."""
    empty = torch.empty(0)
    done, tiles, out = {}, {}, []
    for (k, v), r, wk in zip(pairs, run, with_kt, strict=True):
        if not r:
            out.append((empty, empty, empty, empty))
            continue
        key = (id(k), id(v))
        if key not in done:
            kc, _, vc, vt = _layouts(k, v, with_vt, False)
            done[key] = (kc, vc, vt if vt is not None else empty)
        kc, vc, vt = done[key]
        if wk and id(k) not in tiles:
            tiles[id(k)] = _tiled_t(kc)
        out.append((kc, tiles[id(k)] if wk else empty, vc, vt))
    return [list(x) for x in zip(*out, strict=True)]


class NativeSparseAttention(torch.autograd.Function):
    """``(o [B,T,H,Dv], selected blocks [B,T,Hkv,n] int32 or empty)``: the three branches gated and
    summed in one pass per query. Saves only the inputs (the backward recomputes the probabilities and
    the selection); gradients for q, every branch's K/V and the gates."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, on, params, select, keep_selection):
        q = q.contiguous()
        pairs = ((k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win))
        ctx.run = (on[0] or on[1], on[1], on[2])  # the compressed branch also runs to select
        with_kt = tuple(_forward_kt(m, params[0], q.shape[1]) for m in (COMPRESSED, SELECTED, WINDOW))
        kc, kt, vc, _ = _branch_layouts(pairs, ctx.run, False, with_kt)
        g = torch.empty(0) if gates is None else gates.contiguous()
        o, sel = cpu_build.require().nsa_forward(q, kc, kt, vc, list(on), g, *params, *select, keep_selection)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g if gates is not None else None)
        ctx.on, ctx.params, ctx.select = on, params, select
        ctx.mark_non_differentiable(sel)
        ctx.set_materialize_grads(False)
        return o, sel

    @staticmethod
    def backward(ctx, do, _):
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = ctx.saved_tensors
        if do is None:
            return (None,) * 12
        on = ctx.on
        pairs = ((k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win))
        kc, kt, vc, vt = _branch_layouts(pairs, ctx.run, True)
        g = torch.empty(0) if gates is None else gates
        dq, *dkv, dg = cpu_build.require().nsa_backward(q, kc, kt, vc, vt, list(on), g, do.contiguous(), *ctx.params,
                                                         *ctx.select)
        grads = [None if not on[c // 2] else dkv[c].transpose(1, 2) for c in range(6)]
        return (dq, *grads, dg if gates is not None else None, None, None, None, None)


@torch.compiler.disable  # a C++ op dynamo cannot trace: run it eagerly, a graph break
def native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, on, block_len: int, stride: int,
                            select_len: int, num_select: int, num_init: int, num_local: int, window: int,
                            scale: float, return_selection: bool = True):
    """One batch of sequences (no ``cu_seqlens``): ``(o [B,T,H,Dv], idx [B,T,Hkv,n] int32 or None)``
    (``idx`` None when the selected branch is off or ``return_selection`` is False: then the op
    never holds the whole selection). ``on``: (compressed, selected, window) output flags."""
    params = (window, select_len, block_len, stride, scale)
    o, idx = NativeSparseAttention.apply(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, tuple(on), params,
                                         (num_select, num_init, num_local), bool(return_selection))
    return o, (idx if return_selection and on[1] else None)
