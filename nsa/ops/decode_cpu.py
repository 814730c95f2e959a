"""Fused one-token NSA decode step for CPU float32: a C++ op (``decode_cpu.cpp``) built at first use
(with the other CPU ops, :mod:`nsa.ops.cpu_build`).

A one-token step at batch 1 is a few hundred small torch ops, each costing more in dispatch than
its arithmetic; this op does the attention core of :func:`nsa.cache.decode_token` (compressed
attention, selection scores, top-n, selected attention, sliding window) in one call that reads
the cache's buffers in place, and the new token's RoPE and cache write in another.
:func:`nsa.cache.decode_token` stays the readable reference; the two agree to float32
rounding and select the same blocks (tests/nsa/test_decode_cpu.py).

``NSAAttention`` uses it for a one-token step of a CPU float32 layer without autograd. Off with
``NSA_DECODE_KERNEL=0``. Without a compiler, or if the build fails, one warning and the torch path.
"""

from __future__ import annotations

import os

import torch

from nsa.cache import NSACache
from nsa.ops import cpu_build
from nsa.ops.common import BRANCHES

ENV = "NSA_DECODE_KERNEL"  # "0": never use the kernel


def load():
    """The compiled module of the fused CPU ops (:mod:`nsa.ops.cpu_build`), or None."""
    return cpu_build.load()


def _require():
    return cpu_build.require()


def usable(x: torch.Tensor, cache: NSACache) -> bool:
    """Whether a one-token step of ``x`` against ``cache`` runs on the kernel: CPU, float32, no autograd,
    not switched off, built."""
    return cache._k_slc.dtype is torch.float32 and not torch.is_grad_enabled() and applies(x.device, x.dtype)


def applies(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether one-token steps (without autograd) of a layer in ``dtype`` on ``device`` run on the kernel."""
    return (torch.device(device).type == "cpu" and dtype is torch.float32 and os.environ.get(ENV) != "0"
            and load() is not None)


def rope_store(q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: NSACache,
               branches_kv: int, rotate_cmp: bool = True) -> None:
    """RoPE of ``q [B,1,H*Dk]`` in place; the new token's RoPE'd keys and values from ``kv
    [B,1,nb*Hkv*(Dk+Dv)]`` (the layer's kv_proj output, branches cmp, slc, win; ``nb = branches_kv``)
    written into the cache; the compressed branch's key un-rotated unless ``rotate_cmp`` (the layer's
    ``cmp_rope="block"`` rotates compressed keys instead). Follow with ``cache.commit_one``."""
    s, slot, ti = cache.reserve_one()
    _require().rope_store(q, kv, cos, sin, branches_kv, rotate_cmp, cache._k_tail, cache._v_tail, ti, cache._k_slc,
                          cache._v_slc, s, cache._k_win, cache._v_win, slot)


def attend(q: torch.Tensor, cache: NSACache, scale: float, *, num_select: int, num_init: int, num_local: int,
           branches=BRANCHES, gates=None) -> list[torch.Tensor]:
    """``[out, idx]``: the newest token's branch outputs ``out [B,Hkv,G,3,Dv]`` (cmp, slc, win; zeros for a
    branch not in ``branches``) and selected blocks ``idx [B,Hkv,k]`` (ascending, ``k = min(n, blocks so
    far)``) from ``q`` (``[B,Hkv,G,Dk]`` or ``[B,1,H*Dk]``, contiguous, RoPE'd) and the cache (which holds
    the token). ``gates = (x [B,1,C], gate weight [H*3,C], bias [H*3], weight scale)`` adds the layer's
    gated sum ``o [B,1,H*Dv]`` and gates ``g [B,1,H,3]``: ``[out, idx, o, g]``."""
    x, w, b, s = gates if gates is not None else (None, None, None, 1.0)
    return _require().attend(q, cache._k_cmp, cache._v_cmp, cache.num_cmp, cache._k_slc, cache._v_slc,
                             cache._k_win, cache._v_win, cache.length - 1, cache.block_len, cache.stride,
                             cache.select_len, num_select, num_init, num_local, scale, "cmp" in branches,
                             "slc" in branches, "win" in branches, x, w, b, s)


def decode_token(q: torch.Tensor, cache: NSACache, scale: float, *, num_select: int, num_init: int,
                 num_local: int, branches=BRANCHES) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`nsa.cache.decode_token` on the kernel: ``({branch: [B,Hkv,G,Dv]}, selected blocks [B,Hkv,k])``."""
    out, idx = attend(q.contiguous(), cache, scale, num_select=num_select, num_init=num_init,
                      num_local=num_local, branches=branches)
    return {b: out[..., i, :] for i, b in enumerate(BRANCHES) if b in branches}, idx
