"""Triton compressed and sliding-window attention against the torch backend.

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by the
root conftest) in float32 and float16 (its bfloat16 math is wrong, triton issue 11584);
on CUDA the same tests also run in bfloat16. The truth is the torch backend on float64
copies of the same (already rounded) inputs, so only the kernel's own error is measured.

Tolerances on ``||a - b|| / ||b||``:
* float32: 1e-5. Everything is float32 (``tl.dot`` in exact "ieee" mode, not TF32); only
  the summation order differs from the reference, which costs ~1e-7 at these sizes.
* float16: 2e-3. The output is rounded to float16 (unit roundoff 4.9e-4) and, as in every
  flash-attention, the probabilities are rounded to float16 before the ``p @ v`` product
  (and ``ds`` before ``ds @ k`` in backward): a few roundings of 4.9e-4 each.
* bfloat16 (GPU only): 2e-2. The same roundings with bfloat16's unit roundoff 3.9e-3.
"""

import pytest
import torch

import nsa

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def inputs(B, T, H, Hkv, Dk, Dv, Tk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g)
    k = torch.randn(B, Tk, Hkv, Dk, generator=g)
    v = torch.randn(B, Tk, Hkv, Dv, generator=g)
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def run_both(fn_triton, fn_torch, tensors, cotangents):
    """Outputs and input gradients of both backends; the torch one on float64 copies."""
    outs = fn_triton(*tensors)
    torch.autograd.backward(outs, [c.to(o.dtype) for o, c in zip(outs, cotangents, strict=True)])
    grads = [x.grad for x in tensors]
    ref_in = [x.detach().double().requires_grad_() for x in tensors]
    ref_outs = fn_torch(*ref_in)
    torch.autograd.backward(ref_outs, [c.to(o.dtype) for o, c in zip(ref_outs, cotangents, strict=True)])
    return outs, grads, ref_outs, [x.grad for x in ref_in]


def check(outs, grads, ref_outs, ref_grads, tol):
    for name, a, b in zip(("o", "lse"), outs, ref_outs, strict=False):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b)), "lse = -inf on different rows"
            a, b = a.masked_fill(torch.isinf(a), 0), b.masked_fill(torch.isinf(b), 0)
        assert rel(a, b) < tol, f"{name}: rel err {rel(a, b):.2e}"
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert rel(a, b) < tol, f"{name}: rel err {rel(a, b):.2e}"


# ----------------------------------------------------------------------------- compressed


def _compressed(q, k, v, block_len, stride, cu, backend):
    return nsa.compressed_attention(q, k, v, block_len=block_len, stride=stride, scale=0.3, cu_seqlens=cu,
                                    backend=backend)


def _num_cmp(length, block_len, stride):
    return (length - block_len) // stride + 1 if length >= block_len else 0


CMP_CASES = {
    # B, T, H, Hkv, Dk, Dv, l, d, cu_seqlens
    "G1_oddT": (2, 37, 2, 2, 32, 16, 8, 4, None),
    "G2_varlen": (1, 60, 4, 2, 32, 16, 8, 4, [0, 5, 30, 31, 60]),
    "G4_dims24x40": (1, 45, 8, 2, 24, 40, 16, 8, None),
    "G16_l_eq_d": (1, 29, 16, 1, 16, 32, 8, 8, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CMP_CASES))
def test_compressed_matches_torch(case, dtype):
    B, T, H, Hkv, Dk, Dv, l, d, cu = CMP_CASES[case]
    if cu is None:
        Tk = _num_cmp(T, l, d)
    else:
        Tk = sum(_num_cmp(e - s, l, d) for s, e in zip(cu[:-1], cu[1:], strict=True))
        cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q, k, v = inputs(B, T, H, Hkv, Dk, Dv, Tk, dtype)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, Dv, generator=g).to(DEVICE)
    dlse = torch.randn(B, T, H, generator=g).to(DEVICE)  # lse is differentiable too
    res = run_both(lambda *x: _compressed(*x, l, d, cu, "triton"),
                   lambda *x: _compressed(*x, l, d, cu, "torch"), [q, k, v], [do, dlse])
    o, lse = res[0]
    assert o.shape == (B, T, H, Dv) and o.dtype == dtype and lse.dtype == torch.float32
    # rows before the first complete block see nothing: o = 0, lse = -inf
    assert torch.isinf(lse[:, : l - 1]).all() and (o[:, : l - 1] == 0).all()
    check(*res, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32])
def test_compressed_shorter_than_one_block(dtype):
    """T < block_len: no compressed block, o = 0, lse = -inf, zero gradients."""
    q, k, v = inputs(1, 5, 4, 2, 16, 16, 0, dtype)
    from nsa.ops.compressed_attention.triton import compressed_attention

    o, lse = compressed_attention(q, k, v, block_len=8, stride=4)
    assert (o == 0).all() and torch.isinf(lse).all() and (lse < 0).all()
    o.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


# ----------------------------------------------------------------------------- window


def _window(q, k, v, window, cu, backend):
    return (nsa.sliding_window_attention(q, k, v, window=window, scale=0.3, cu_seqlens=cu, backend=backend),)


WIN_CASES = {
    # B, T, H, Hkv, Dk, Dv, w, cu_seqlens
    "G1_oddT_w8": (2, 37, 2, 2, 32, 16, 8, None),
    "G2_varlen_w7": (1, 60, 4, 2, 32, 16, 7, [0, 5, 30, 31, 60]),
    "G4_w2": (1, 21, 8, 2, 24, 40, 2, None),
    "G16_w_gt_T": (1, 23, 16, 1, 16, 32, 64, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(WIN_CASES))
def test_window_matches_torch(case, dtype):
    B, T, H, Hkv, Dk, Dv, w, cu = WIN_CASES[case]
    if cu is not None:
        cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q, k, v = inputs(B, T, H, Hkv, Dk, Dv, T, dtype)
    do = torch.randn(B, T, H, Dv, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    res = run_both(lambda *x: _window(*x, w, cu, "triton"), lambda *x: _window(*x, w, cu, "torch"), [q, k, v], [do])
    assert res[0][0].shape == (B, T, H, Dv) and res[0][0].dtype == dtype
    check(*res, TOL[dtype])


def test_window_of_one_is_identity():
    """w = 1: every query sees only itself, so o is its group's v (and dq = 0 up to rounding)."""
    from nsa.ops.sliding_window_attention.triton import sliding_window_attention

    q, k, v = inputs(1, 13, 4, 2, 16, 24, 13, torch.float32)
    o = sliding_window_attention(q, k, v, window=1)
    assert rel(o, v.repeat_interleave(2, dim=2)) < 1e-6
    o.square().sum().backward()
    assert q.grad.abs().max() < 1e-5 * v.grad.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="paper-sized shapes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_paper_dims_on_gpu(dtype):
    """Paper head dims (Dk 192, Dv 128, G 16, l 32, d 16, w 512) at T = 1500: the GPU tile
    configs (several query and key tiles, masked and unmasked) against the torch backend."""
    T, H, Hkv, Dk, Dv, l, d, w = 1500, 16, 1, 192, 128, 32, 16, 512
    q, k, v = inputs(1, T, H, Hkv, Dk, Dv, T, dtype)
    kc, vc = [x[:, : _num_cmp(T, l, d)].detach().requires_grad_() for x in (k, v)]
    do = torch.randn(1, T, H, Dv, device=DEVICE)
    res = run_both(lambda *x: _compressed(*x, l, d, None, "triton"), lambda *x: _compressed(*x, l, d, None, "torch"),
                   [q, kc, vc], [do, torch.zeros(1, T, H, device=DEVICE)])
    check(*res, TOL[dtype])
    res = run_both(lambda *x: _window(*x, w, None, "triton"), lambda *x: _window(*x, w, None, "torch"),
                   [q.detach().requires_grad_(), k, v], [do])
    check(*res, TOL[dtype])


@pytest.mark.skipif(CUDA, reason="the GPU runs bfloat16 natively (test_*_matches_torch)")
def test_bfloat16_upcast_in_interpreter():
    """bfloat16 inputs on CPU run the kernels in float32 (the interpreter's bf16 math is wrong)
    and come back in bfloat16: error is the bf16 rounding of inputs and outputs only."""
    q, k, v = inputs(1, 33, 4, 2, 16, 24, 33, torch.bfloat16)
    res = run_both(lambda *x: _window(*x, 9, None, "triton"), lambda *x: _window(*x, 9, None, "torch"), [q, k, v],
                   [torch.randn(1, 33, 4, 24)])
    assert res[0][0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in res[1])
    check(*res, TOL[torch.bfloat16])


@pytest.mark.parametrize("branch", ["compressed", "window"])
def test_dkv_row_split(branch, monkeypatch):
    """dk/dv with the query rows of each key tile split over several programs (partial sums
    in float32, reduced afterwards), as long compressed sequences use on the GPU."""
    import nsa.ops.compressed_attention.triton as kernels

    monkeypatch.setattr(kernels, "DKV_SPLIT_ROWS", 64)
    T, H, Hkv, Dk, Dv = 70, 16, 1, 24, 40
    if branch == "compressed":
        q, k, v = inputs(1, T, H, Hkv, Dk, Dv, _num_cmp(T, 16, 8), torch.float32)
        fns = [lambda *x, b=b: _compressed(*x, 16, 8, None, b) for b in ("triton", "torch")]
        cot = [torch.randn(1, T, H, Dv).to(DEVICE), torch.zeros(1, T, H).to(DEVICE)]
        band = (16, 8, kernels.NO_WINDOW)
    else:
        q, k, v = inputs(1, T, H, Hkv, Dk, Dv, T, torch.float32)
        fns = [lambda *x, b=b: _window(*x, 20, None, b) for b in ("triton", "torch")]
        cot = [torch.randn(1, T, H, Dv).to(DEVICE)]
        band = (1, 1, 20)
    assert kernels._dkv_row_chunks(T, H // Hkv, *band)[0] > 1
    check(*run_both(*fns, [q, k, v], cot), TOL[torch.float32])


def _check_last_rows(T, H, Hkv, Dk, Dv, dtype, l=32, d=16, w=64, n_last=4):
    """Forward of both branches on ``T`` tokens; the last ``n_last`` queries against a direct
    float32 softmax (cheap at any ``T``: only their rows are recomputed)."""
    G, Tc = H // Hkv, _num_cmp(T, l, d)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, T, H, Dk, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(1, T, Hkv, Dk, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(1, T, Hkv, Dv, device=DEVICE, dtype=dtype, generator=g)
    kc, vc = k[:, :Tc], v[:, :Tc]  # any values serve as compressed keys
    o_cmp, _ = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, backend="triton")
    o_win = nsa.sliding_window_attention(q, k, v, window=w, backend="triton")
    for t in range(T - n_last, T):
        qt = q[0, t].float() * Dk**-0.5  # [H, Dk]
        for o, keys, vals in ((o_cmp, kc[0, : (t - l + 1) // d + 1], vc[0, : (t - l + 1) // d + 1]),
                              (o_win, k[0, t - w + 1 : t + 1], v[0, t - w + 1 : t + 1])):
            kk, vv = keys.float().repeat_interleave(G, 1), vals.float().repeat_interleave(G, 1)
            p = torch.softmax(torch.einsum("hd,shd->hs", qt, kk), -1)
            assert rel(o[0, t], torch.einsum("hs,shd->hd", p, vv)) < TOL[dtype]


def test_last_rows_small():
    _check_last_rows(101, 4, 2, 24, 16, torch.float32, l=8, d=4, w=9)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs about 10 GB of GPU memory")
def test_int64_addressing_on_gpu():
    """q has more than 2**31 elements (T = 2**17 + 3, H = 64, Dk = 256): offsets need int64."""
    T, H, Dk = 2**17 + 3, 64, 256
    assert T * H * Dk > 2**31
    _check_last_rows(T, H, 4, Dk, 128, torch.bfloat16)


_SM90_BUILD = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

import nsa.ops.compressed_attention.triton as kernels

meta = dict(G=16, DK=192, DV=128, BLOCK_DA=128, BLOCK_DB=64, SPLIT=True, BLOCK_DV=128, PREC="tf32")
bf, f32, i32 = "*bf16", "*fp32", "*i32"
args = {"fwd": [bf] * 4 + [f32, i32, i32, "fp32"] + ["i32"] * 12,
        "dq": [bf] * 4 + [f32, f32, bf, i32, i32, "fp32", "fp32"] + ["i32"] * 14,
        "dkv": [bf] * 4 + [f32] * 4 + [i32, i32, "fp32", "fp32"] + ["i32"] * 19}
for kind, types in args.items():
    fn, cfg = kernels._KERNELS[kind], kernels._default_config(kind, meta)
    consts = {**meta, **cfg.kwargs}
    it = iter(types)
    sig = {name: "constexpr" if name in consts else next(it) for name in fn.arg_names}
    assert next(it, None) is None, kind + ": more types than arguments"
    out = compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert out.asm["cubin"], kind
print("built")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The kernels build for Hopper (sm_90, ptxas from the triton wheel) at the paper's head
    dims with their default tiles: catches GPU-only compile errors on a machine without one.
    Runs in a subprocess, since this session's kernels may be the interpreter's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", _SM90_BUILD], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[3])
    assert res.returncode == 0 and "built" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- custom ops


def test_custom_ops_registered():
    """Both ops are torch.library custom ops with fake and autograd kernels (opcheck)."""
    import nsa.ops.compressed_attention.triton  # noqa: F401  (registers the ops)
    import nsa.ops.sliding_window_attention.triton  # noqa: F401

    q, k, v = inputs(1, 19, 4, 2, 16, 16, 19, torch.float32)
    kc, vc = k[:, :3].detach().requires_grad_(), v[:, :3].detach().requires_grad_()
    torch.library.opcheck(torch.ops.nsa.compressed_attention.default, (q, kc, vc, None, 8, 4, 0.25))
    torch.library.opcheck(torch.ops.nsa.sliding_window_attention.default, (q, k, v, None, 5, 0.25))


def test_compile_fullgraph():
    """torch.compile traces a function using both ops without graph breaks."""
    from nsa.ops.compressed_attention.triton import compressed_attention
    from nsa.ops.sliding_window_attention.triton import sliding_window_attention

    def branches(q, k, v):
        o_cmp, _ = compressed_attention(q, k[:, :3], v[:, :3], block_len=8, stride=4)
        return o_cmp + sliding_window_attention(q, k, v, window=5)

    q, k, v = inputs(1, 19, 4, 2, 16, 16, 19, torch.float32)
    compiled = torch.compile(branches, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    ref = branches(*[x.detach() for x in (q, k, v)])
    assert rel(out, ref) < 1e-6
    assert q.grad is not None and k.grad is not None
