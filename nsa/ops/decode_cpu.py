"""Fused one-token NSA decode step for CPU float32: a C++ op (``decode_cpu.cpp``) built at first use.

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

import hashlib
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

from nsa.cache import BRANCHES, NSACache

ENV = "NSA_DECODE_KERNEL"  # "0": never use the kernel
SOURCE = Path(__file__).with_name("decode_cpu.cpp")
_module = None
_tried = False


def _cpu_flags() -> tuple[list[str], str]:
    """Compiler flags for this CPU and a name for the build that differs between CPU kinds, so a
    ``-march=native`` build kept in a shared cache folder never runs on a CPU that lacks its instructions."""
    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return [], machine
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [], machine
    fields = ("model name", "flags", "Features", "CPU part")
    keep = sorted({ln for ln in info.splitlines() if ln.split(":")[0].strip() in fields})
    return ["-march=native"], machine + "_" + hashlib.sha1("\n".join(keep).encode()).hexdigest()[:10]


def _build():
    from torch.utils import cpp_extension

    env_path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the ninja pip package, when its bin/ is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + env_path
        except ImportError:
            pass
    try:
        arch, cpu = _cpu_flags()
        name = f"nsa_decode_cpu_{cpu}"
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:  # left by a killed build: torch
            lock.unlink(missing_ok=True)  # would wait on it forever
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=["-O3", *arch, "-fopenmp", "-Wno-psabi"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        os.environ["PATH"] = env_path


def load():
    """The compiled module, or None (after one warning) when it cannot be built."""
    global _module, _tried
    if not _tried:
        _tried = True
        try:
            _module = _build()
        except Exception as e:  # no compiler, no ninja, a build error: fall back to the torch path
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(f"nsa: fused CPU decode kernel unavailable, using the torch path "
                          f"({type(e).__name__}: {msg[:200]})", RuntimeWarning, stacklevel=2)
    return _module


def _require():
    mod = load()
    if mod is None:
        raise RuntimeError("nsa: the fused CPU decode kernel is not available")
    return mod


def usable(x: torch.Tensor, cache: NSACache) -> bool:
    """Whether a one-token step of ``x`` against ``cache`` runs on the kernel: CPU, float32, no autograd,
    not switched off, built."""
    return cache._k_slc.dtype is torch.float32 and not torch.is_grad_enabled() and applies(x.device, x.dtype)


def applies(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether one-token steps (without autograd) of a layer in ``dtype`` on ``device`` run on the kernel."""
    return (torch.device(device).type == "cpu" and dtype is torch.float32 and os.environ.get(ENV) != "0"
            and load() is not None)


def rope_store(q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: NSACache,
               branches_kv: int) -> None:
    """RoPE of ``q [B,1,H*Dk]`` in place; the new token's RoPE'd keys and values from ``kv
    [B,1,nb*Hkv*(Dk+Dv)]`` (the layer's kv_proj output, branches cmp, slc, win; ``nb = branches_kv``)
    written into the cache. Follow with ``cache.commit_one``."""
    s, slot, ti = cache.reserve_one()
    _require().rope_store(q, kv, cos, sin, branches_kv, cache._k_tail, cache._v_tail, ti, cache._k_slc,
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
