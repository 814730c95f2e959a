"""The functional API: validation (ValueError naming the problem), backend dispatch,
compressed_cu_seqlens, and varlen == a loop over documents."""

import sys
import types

import pytest
import torch

import nsa
from tests.nsa import brute_force as bf

L, D, LS = 16, 8, 32  # block_len, stride, select_len


def _qkv(B=1, T=40, H=4, Hkv=2, Dk=8, Dv=8, dtype=torch.float32):
    return bf.make_inputs(B, T, H, Hkv, Dk, Dv, L, D, dtype=dtype)


def test_compressed_cu_seqlens():
    cu = torch.tensor([0, 5, 16, 40, 40, 73], dtype=torch.int32)  # lengths 5, 11... 16, 24, 0, 33
    out = nsa.compressed_cu_seqlens(cu, 16, 8)
    # Nc(len) = floor((len - 16)/8) + 1 or 0: 5 -> 0, 11 -> 0, 24 -> 2, 0 -> 0, 33 -> 3
    assert out.dtype == torch.int32 and out.tolist() == [0, 0, 0, 2, 2, 5]
    assert nsa.compressed_cu_seqlens(torch.tensor([0, 16], dtype=torch.int32), 16, 16).tolist() == [0, 1]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v, kc, vc: nsa.compressed_attention(q[0], kc, vc, block_len=L, stride=D), "4 dims"),
        (
            lambda q, k, v, kc, vc: nsa.compressed_attention(q[:, :, :3], kc, vc, block_len=L, stride=D),
            "multiple",
        ),
        (lambda q, k, v, kc, vc: nsa.compressed_attention(q, kc, vc, block_len=L, stride=6), "divide"),
        (
            lambda q, k, v, kc, vc: nsa.compressed_attention(
                q, kc[:, :-1], vc[:, :-1], block_len=L, stride=D
            ),
            "compressed blocks",
        ),
        (
            lambda q, k, v, kc, vc: nsa.compressed_attention(q, kc, vc[:, :, :1], block_len=L, stride=D),
            "v_cmp shape",
        ),
        (
            lambda q, k, v, kc, vc: nsa.compressed_attention(q, kc.double(), vc, block_len=L, stride=D),
            "dtype",
        ),
        (
            lambda q, k, v, kc, vc: nsa.compressed_attention(
                q, kc, vc, block_len=L, stride=D, backend="cuda"
            ),
            "backend",
        ),
        (
            lambda q, k, v, kc, vc: nsa.compressed_attention(q, kc, vc, block_len=L, stride=D, scale=-1.0),
            "scale",
        ),
        (lambda q, k, v, kc, vc: nsa.compressed_attention(q.long(), kc, vc, block_len=L, stride=D), "float"),
        (
            lambda q, k, v, kc, vc: nsa.select_blocks(
                q, kc, block_len=L, stride=D, select_len=LS, num_select=2
            ),
            "num_init",
        ),
        (
            lambda q, k, v, kc, vc: nsa.select_blocks(
                q, kc, block_len=L, stride=D, select_len=20, num_select=4
            ),
            "select_len",
        ),
        (
            lambda q, k, v, kc, vc: nsa.select_blocks(
                q, kc, block_len=64, stride=D, select_len=LS, num_select=4
            ),
            "compressed blocks|block_len",
        ),
        (
            lambda q, k, v, kc, vc: nsa.select_blocks(
                q, kc, block_len=L, stride=D, select_len=LS, num_select=4, lse=q[:, :, :2, 0]
            ),
            "lse",
        ),
        (
            lambda q, k, v, kc, vc: nsa.selected_attention(q, k, v, torch.zeros(1, 40, 2, 3), select_len=LS),
            "int32",
        ),
        (
            lambda q, k, v, kc, vc: nsa.selected_attention(
                q, k, v, torch.zeros(1, 40, 1, 3, dtype=torch.int32), select_len=LS
            ),
            "block_indices shape",
        ),
        (
            lambda q, k, v, kc, vc: nsa.selected_attention(
                q, k[:, :30], v[:, :30], torch.zeros(1, 30, 2, 3, dtype=torch.int32), select_len=LS
            ),
            "length",
        ),
        (lambda q, k, v, kc, vc: nsa.sliding_window_attention(q, k, v, window=0), "window"),
        (lambda q, k, v, kc, vc: nsa.sliding_window_attention(q, k[..., :4], v, window=8), "head dim"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_qkv())


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([0, 20, 40]), "int32"),
        (torch.tensor([1, 20, 40], dtype=torch.int32), "start at 0"),
        (torch.tensor([0, 30, 20, 40], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 20, 39], dtype=torch.int32), "ends at"),
        (torch.tensor([[0, 40]], dtype=torch.int32), "1-D"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    q, k, v, _, _ = _qkv()
    with pytest.raises(ValueError, match=match):
        nsa.sliding_window_attention(q, k, v, window=8, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    q, k, v, _, _ = _qkv(B=2)
    with pytest.raises(ValueError, match="batch size 1"):
        nsa.sliding_window_attention(q, k, v, window=8, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))


def test_backend_dispatch(monkeypatch):
    """backend=None -> torch on CPU; "triton" imports nsa.ops.<op>.triton and calls ``<op>``
    with the same keyword arguments (scale resolved to a float)."""
    q, k, v, kc, vc = _qkv()
    calls = []
    for op in ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention"):
        fake = types.ModuleType(f"nsa.ops.{op}.triton")
        setattr(fake, op, lambda *args, _op=op, **kw: calls.append((_op, len(args), kw)) or "sentinel")
        monkeypatch.setitem(sys.modules, f"nsa.ops.{op}.triton", fake)
    idx = nsa.select_blocks(q, kc, block_len=L, stride=D, select_len=LS, num_select=3)  # torch (CPU default)
    assert idx.dtype == torch.int32 and not calls
    assert nsa.compressed_attention(q, kc, vc, block_len=L, stride=D, backend="triton") == "sentinel"
    nsa.select_blocks(q, kc, block_len=L, stride=D, select_len=LS, num_select=3, backend="triton")
    nsa.selected_attention(q, k, v, idx, select_len=LS, backend="triton")
    nsa.sliding_window_attention(q, k, v, window=8, scale=0.5, backend="triton")
    assert [c[0] for c in calls] == [
        "compressed_attention",
        "select_blocks",
        "selected_attention",
        "sliding_window_attention",
    ]
    assert calls[0][2] == dict(block_len=L, stride=D, scale=8**-0.5, cu_seqlens=None)
    assert calls[1][2]["num_init"] == 1 and calls[1][2]["num_local"] == 2 and calls[1][2]["lse"] is None
    assert calls[2][1] == 4 and calls[3][2]["scale"] == 0.5


def test_varlen_equals_loop_over_documents():
    """Packed documents give exactly what separate calls per document give (including
    documents shorter than a block and an empty one)."""
    cu_list = [0, 9, 80, 80, 150]
    cu = torch.tensor(cu_list, dtype=torch.int32)
    q, k, v, kc, vc = bf.make_inputs(1, 150, 4, 2, 8, 12, L, D, cu)
    cmp_cu = nsa.compressed_cu_seqlens(cu, L, D).tolist()
    blk = dict(block_len=L, stride=D)
    o, lse = nsa.compressed_attention(q, kc, vc, **blk, cu_seqlens=cu)
    idx = nsa.select_blocks(q, kc, **blk, select_len=LS, num_select=3, cu_seqlens=cu)
    o_slc = nsa.selected_attention(q, k, v, idx, select_len=LS, cu_seqlens=cu)
    o_win = nsa.sliding_window_attention(q, k, v, window=20, cu_seqlens=cu)
    for i in range(len(cu_list) - 1):
        s, e, cs, ce = cu_list[i], cu_list[i + 1], cmp_cu[i], cmp_cu[i + 1]
        if e == s:
            continue
        qd, kd, vd, kcd, vcd = q[:, s:e], k[:, s:e], v[:, s:e], kc[:, cs:ce], vc[:, cs:ce]
        od, lsed = nsa.compressed_attention(qd, kcd, vcd, **blk)
        idxd = nsa.select_blocks(qd, kcd, **blk, select_len=LS, num_select=3)
        assert torch.equal(o[:, s:e], od) and torch.equal(lse[:, s:e], lsed)
        assert torch.equal(idx[:, s:e], idxd)
        assert torch.equal(o_slc[:, s:e], nsa.selected_attention(qd, kd, vd, idxd, select_len=LS))
        assert torch.equal(o_win[:, s:e], nsa.sliding_window_attention(qd, kd, vd, window=20))


def test_empty_sequence():
    q, k, v, kc, vc = _qkv(T=0)
    o, lse = nsa.compressed_attention(q, kc, vc, block_len=L, stride=D)
    idx = nsa.select_blocks(q, kc, block_len=L, stride=D, select_len=LS, num_select=3)
    assert o.shape == (1, 0, 4, 8) and lse.shape == (1, 0, 4) and idx.shape == (1, 0, 2, 3)
    assert nsa.selected_attention(q, k, v, idx, select_len=LS).shape == (1, 0, 4, 8)
    assert nsa.sliding_window_attention(q, k, v, window=4).shape == (1, 0, 4, 8)
