"""Selection distillation (nsa.ops.select_blocks.distill) against the brute force of
tests/nsa/brute_force.py, its gradient (numerical, and where it must not flow), and varlen."""

import pytest
import torch

import nsa
from nsa.ops.select_blocks import distill
from nsa.ops.select_blocks.distill import selection_distill
from tests.nsa import brute_force as bf

# B, T, H, Hkv, Dk, l, d, l', n, n_init, n_local: T not a multiple of any block, G = 1 ... 8
CASES = [
    (2, 150, 4, 2, 8, 16, 8, 16, 6, 1, 2),
    (1, 330, 8, 1, 8, 32, 16, 64, 4, 1, 1),  # paper l, d, l' (weights 1,2,2,2,1), G = 8
    (3, 77, 2, 2, 8, 8, 8, 8, 5, 0, 1),  # l = d = l', no initial block, G = 1
    (1, 140, 4, 1, 8, 8, 4, 16, 7, 1, 3),
]


def _params(case):
    _, _, _, _, _, l, d, ls, n, ni, nl = case
    return dict(block_len=l, stride=d, select_len=ls, num_init=ni, num_local=nl)


def _inputs(case, cu=None, seed=0):
    B, T, H, Hkv, Dk, l, d, ls, n, ni, nl = case
    q, k, _, kc, _ = bf.make_inputs(B, T, H, Hkv, Dk, Dk, l, d, cu_seqlens=cu, dtype=torch.float64, seed=seed)
    idx = nsa.select_blocks(q, kc, block_len=l, stride=d, select_len=ls, num_select=n, num_init=ni,
                            num_local=nl, cu_seqlens=cu, backend="torch")
    return q, k, kc, idx


@pytest.fixture(params=["one-chunk", "small-chunks"])
def distill_chunks(request, monkeypatch):
    """The default chunking (one chunk at test sizes) and one selection block of queries a chunk."""
    if request.param == "small-chunks":
        monkeypatch.setattr(distill, "DISTILL_BUDGET", 1)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}G{c[2] // c[3]}l{c[5]}d{c[6]}ls{c[7]}" for c in CASES])
@pytest.mark.usefixtures("distill_chunks")
def test_distill_equals_brute_force(case):
    """float64 on both sides: the same KL up to rounding (1e-10 relative), the same valid queries."""
    q, k, kc, idx = _inputs(case)
    kl, valid = selection_distill(q, kc, k, idx, **_params(case))
    kl_bf, valid_bf = bf.selection_distill(q, k, kc, idx, *[_params(case)[x] for x in
                                           ("block_len", "stride", "select_len", "num_init", "num_local")],
                                           q.shape[-1] ** -0.5)
    assert torch.equal(valid, valid_bf)
    assert valid.float().mean() > 0.25  # a real test: many queries have blocks to rank
    assert bf.relerr(kl, kl_bf) < 1e-10
    assert kl.min() >= -1e-12 and kl[~valid].abs().max() == 0


def test_distill_varlen_equals_per_document():
    """Packed documents give each document's own result (no block crosses a boundary)."""
    case = (1, 230, 4, 2, 8, 16, 8, 16, 6, 1, 2)
    cu = torch.tensor([0, 61, 61, 180, 230], dtype=torch.int32)
    q, k, kc, idx = _inputs(case, cu=cu)
    kl, valid = selection_distill(q, kc, k, idx, cu_seqlens=cu, **_params(case))
    kl_bf, valid_bf = bf.selection_distill(q, k, kc, idx, 16, 8, 16, 1, 2, 8 ** -0.5, cu)
    assert torch.equal(valid, valid_bf) and valid.any()
    assert bf.relerr(kl, kl_bf) < 1e-10


def test_distill_gradient_reaches_compressed_keys_only():
    """Numerical gradient check in k_cmp; q and the selected keys get none (detached on purpose)."""
    case = (1, 100, 4, 2, 4, 16, 8, 16, 5, 1, 1)
    q, k, kc, idx = _inputs(case)
    q.requires_grad_(True)
    k.requires_grad_(True)

    def loss(kc_):
        kl, valid = selection_distill(q, kc_, k, idx, **_params(case))
        return (kl * valid).sum()

    assert torch.autograd.gradcheck(loss, (kc.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    kc.requires_grad_(True)
    loss(kc).backward()
    assert q.grad is None and k.grad is None and kc.grad.abs().sum() > 0


def test_distill_teaches_the_ranking():
    """Gradient steps on k_cmp alone bring the selection scores to the selected attention's
    block mass: the KL falls by more than half."""
    case = (1, 200, 4, 2, 8, 16, 8, 32, 5, 1, 1)
    q, k, kc, idx = _inputs(case, seed=3)
    kc = kc.clone().requires_grad_(True)
    opt = torch.optim.Adam([kc], lr=0.05)
    first = None
    for _ in range(60):
        kl, valid = selection_distill(q, kc, k, idx, **_params(case))
        loss = kl[valid].mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_distill_keeps_k_cmp_in_the_graph_without_blocks_to_rank():
    """Rows too short to have free blocks give kl = 0 everywhere, but still a backward into k_cmp
    (zero): under ZeRO-3 every rank must run the same backward (tests/train/test_zero.py)."""
    case = (1, 40, 4, 2, 8, 8, 4, 16, 4, 1, 1)  # 3 selection blocks: never two free ones
    q, k, kc, idx = _inputs(case)
    kc.requires_grad_(True)
    kl, valid = selection_distill(q, kc, k, idx, **_params(case))
    assert not valid.any() and kl.abs().max() == 0
    (kl * valid).sum().backward()
    assert kc.grad is not None and kc.grad.abs().max() == 0
