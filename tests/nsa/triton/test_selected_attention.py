"""Triton selected attention (forward, dq, deterministic dk/dv) against the torch backend.

On CPU the kernels run in the Triton interpreter in float32 and float16 (its bfloat16
math is wrong, triton issue 11584); on CUDA bfloat16 runs too. The truth is the torch
backend on float64 copies of the same rounded inputs, so only the kernel's error counts.

Tolerances on ``||a - b|| / ||b||``:
* float32: 1e-5. float32 loads, exact ("ieee") ``tl.dot``, float32 accumulation; only the
  summation order differs from the reference (~1e-7 here).
* float16: 2e-3. Outputs are rounded to float16 (unit roundoff 4.9e-4) and, as in any
  flash-attention, ``p`` and ``ds`` are rounded to float16 before their matmuls.
* bfloat16 (GPU only): 2e-2, the same roundings at bfloat16's unit roundoff 3.9e-3.
"""

import pytest
import torch

import nsa

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def random_selection(lens, Hkv, n, select_len, seed, device=DEVICE):
    """Random causal block indices ``[1, T, Hkv, n]``: distinct, ascending, -1 last."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for L in lens:
        t = torch.arange(L)
        ns = max(1, -(-L // select_len))
        key = torch.rand(L, Hkv, ns, generator=g)
        key = key.masked_fill(torch.arange(ns)[None, None, :] > (t // select_len)[:, None, None], -1.0)
        top = key.topk(min(n, ns), dim=-1)
        idx = top.indices.masked_fill(top.values < 0, -1)
        idx = torch.cat([idx, idx.new_full((L, Hkv, n - idx.shape[-1]), -1)], -1)
        idx = idx.masked_fill(idx < 0, 1 << 20).sort(-1).values
        rows.append(idx.masked_fill(idx == 1 << 20, -1))
    return torch.cat(rows)[None].to(device, torch.int32)


def make(lens, H, Hkv, Dk, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    x = [torch.randn(1, T, h, d, generator=g) for h, d in ((H, Dk), (Hkv, Dk), (Hkv, Dv))]
    do = torch.randn(1, T, H, Dv, generator=g).to(DEVICE)
    return [t.to(DEVICE, dtype).requires_grad_() for t in x], do


def both(q, k, v, idx, do, select_len, cu):
    """(o, dq, dk, dv) of the triton backend and of the torch backend on float64 copies."""
    out = []
    for backend, xs in (("triton", (q, k, v)), ("torch", [t.detach().double().requires_grad_() for t in (q, k, v)])):
        o = nsa.selected_attention(*xs, idx, select_len=select_len, scale=0.3, cu_seqlens=cu, backend=backend)
        grads = torch.autograd.grad(o, xs, do.to(o.dtype))
        out.append((o, *grads))
    return out


CASES = {
    # lens (one entry: plain batch of one row), H, Hkv, Dk, Dv, l', n
    "G1_oddT": ([37], 2, 2, 32, 16, 16, 3),
    "G2_varlen_short_doc": ([5, 30, 1, 24], 4, 2, 16, 32, 16, 2),
    "G4_Dk24_Dv40": ([29], 8, 2, 24, 40, 16, 2),
    "G16_lsel32": ([41], 16, 1, 16, 32, 32, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, dtype):
    lens, H, Hkv, Dk, Dv, sel, n = CASES[case]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    cu = cu if len(lens) > 1 else None
    (q, k, v), do = make(lens, H, Hkv, Dk, Dv, dtype)
    idx = random_selection(lens, Hkv, n, sel, seed=1)
    idx[0, 3] = -1  # an all-padding row: o = 0, no gradient
    (o, *g), (o_ref, *g_ref) = both(q, k, v, idx, do, sel, cu)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert (o[0, 3] == 0).all() and (g[0][0, 3] == 0).all()
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *g), (o_ref, *g_ref), strict=True):
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


def test_batch_of_rows():
    """B = 2 rows without cu_seqlens (each row its own sequence)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = [torch.randn(2, 19, h, d, generator=g).to(DEVICE).requires_grad_() for h, d in ((4, 16), (2, 16), (2, 24))]
    do = torch.randn(2, 19, 4, 24, generator=g).to(DEVICE)
    idx = torch.cat([random_selection([19], 2, 2, 8, seed=s) for s in (10, 11)])
    (o, *gr), (o_ref, *g_ref) = both(q, k, v, idx, do, 8, None)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *gr), (o_ref, *g_ref), strict=True):
        assert rel_err(a, b) < 1e-5, f"{name}: {rel_err(a, b):.2e}"


def test_odd_indices_and_chunked_dkdv(monkeypatch):
    """Repeated, non-causal and unsorted indices are ignored like the reference does; with a
    tiny chunk the dk/dv lists are split and reduced in order, with the same result."""
    import nsa.ops.selected_attention.triton as slc

    lens, H, Hkv, sel = [40, 3], 4, 1, 16
    cu = torch.tensor([0, 40, 43], dtype=torch.int32, device=DEVICE)
    (q, k, v), do = make(lens, H, Hkv, 16, 24, torch.float32, seed=3)
    idx = random_selection(lens, Hkv, 3, sel, seed=4)
    idx[0, 30:40, 0] = torch.tensor([2, 0, 2], dtype=torch.int32, device=DEVICE)  # unsorted + repeat
    idx[0, 20, 0, 2] = 3  # block after the query: ignored
    monkeypatch.setattr(slc, "MIN_CHUNK", 4)  # the first block's list (~40 queries) gets ~10 chunks
    (o, *g), (o_ref, *g_ref) = both(q, k, v, idx, do, sel, cu)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *g), (o_ref, *g_ref), strict=True):
        assert rel_err(a, b) < 1e-5, f"{name}: {rel_err(a, b):.2e}"


def test_dkdv_deterministic(monkeypatch):
    """Two backward passes give bitwise equal dk/dv (no float atomics), with split lists."""
    import nsa.ops.selected_attention.triton as slc

    monkeypatch.setattr(slc, "MIN_CHUNK", 4)
    lens, H, Hkv, sel = [27], 4, 2, 16
    (q, k, v), do = make(lens, H, Hkv, 16, 16, torch.float16, seed=5)
    idx = random_selection(lens, Hkv, 3, sel, seed=6)
    runs = []
    for _ in range(2):
        o = slc.selected_attention(q, k, v, idx, select_len=sel)
        runs.append(torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_custom_op_registration():
    """The forward op passes torch.library.opcheck (schema, fake kernel, autograd)."""
    import nsa.ops.selected_attention.triton  # noqa: F401  (registers the ops)

    (q, k, v), _ = make([13], 2, 1, 16, 16, torch.float32, seed=12)
    idx = random_selection([13], 1, 2, 8, seed=13)
    torch.library.opcheck(torch.ops.nsa.selected_attention.default, (q, k, v, idx, None, 8, 0.25))


def test_compile_fullgraph():
    """torch.compile traces the custom op (forward and backward) without graph breaks."""
    from nsa.ops.selected_attention.triton import selected_attention

    (q, k, v), do = make([21], 4, 2, 16, 16, torch.float32, seed=7)
    idx = random_selection([21], 2, 2, 16, seed=8)
    fn = torch.compile(lambda q, k, v: selected_attention(q, k, v, idx, select_len=16) * 2, fullgraph=True,
                       backend="inductor" if CUDA else "aot_eager")
    o = fn(q, k, v)
    (dq,) = torch.autograd.grad(o, (q,), do)
    o_eager = selected_attention(q, k, v, idx, select_len=16) * 2
    (dq_eager,) = torch.autograd.grad(o_eager, (q,), do)
    assert rel_err(o, o_eager) < 1e-6 and rel_err(dq, dq_eager) < 1e-6
