"""DeepSeekMoE layer: dispatch numerics, routing weights, capacity drops, balancing."""

import pytest
import torch
import torch.nn.functional as F

from train.model import MoEConfig
from train.model.moe import MoE, load_summary

from .helpers import rel_err

C = 16


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = dict(num_experts=6, num_shared_experts=1, top_k=2, expert_size=8)
    cfg.update(kw)
    return MoE(C, MoEConfig(**cfg)).double()


def _dense_reference(moe: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """Every expert on every token, combined with the routed weights (dropped slots zeroed)."""
    x2 = x.reshape(-1, C)
    idx, w, _, _ = moe.route(x2, x.shape[0])
    all_out = torch.stack([F.linear(F.silu(F.linear(x2, moe.w_gate[e])) * F.linear(x2, moe.w_up[e]), moe.w_down[e])
                           for e in range(moe.cfg.num_experts)], 1)  # [N, E, C]
    if keep is not None:
        w = w * keep
    y = (all_out.gather(1, idx[..., None].expand(-1, -1, C)) * w[..., None].to(x.dtype)).sum(1)
    return (y + moe.shared(x2)).view_as(x)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sorted_dispatch_equals_dense_compute(score_func):
    moe = _moe(score_func=score_func)
    x = torch.randn(3, 10, C, dtype=torch.float64)
    y, _, stats = moe(x)
    assert rel_err(y, _dense_reference(moe, x)) < 1e-12  # float64: only summation order differs
    assert stats["load"].sum() == 30 * 2 and stats["dropped"] == 0


def test_topk_weights_sigmoid_normalised_softmax_raw():
    x = torch.randn(20, C, dtype=torch.float64)
    _, w_sig, _, _ = _moe(score_func="sigmoid", route_scale=2.5).route(x, 1)
    assert torch.allclose(w_sig.sum(-1), torch.full((20,), 2.5, dtype=torch.float32))
    moe = _moe(score_func="softmax")
    idx, w_soft, _, _ = moe.route(x, 1)
    probs = F.linear(x.float(), moe.router.weight.float()).softmax(-1)
    assert torch.allclose(w_soft, probs.gather(1, idx))
    assert (w_soft.sum(-1) < 1).all()


def _skewed(moe: MoE, expert: int = 0, strength: float = 5.0, std: float = 0.01) -> None:
    """Make tokens prefer ``expert``: a router row aligned with a constant input direction
    (plus ``std`` noise, which spreads the other experts' preferences across tokens)."""
    with torch.no_grad():
        moe.router.weight.normal_(std=std)
        moe.router.weight[expert] += strength / C


def test_capacity_drops_counted_and_loads_before_dropping():
    moe = _moe(num_experts=4, top_k=1, capacity_factor=1.0)
    _skewed(moe)
    x = torch.randn(2, 16, C, dtype=torch.float64) * 0.1 + 1.0  # all tokens route to expert 0
    y, _, stats = moe(x)
    cap = moe.capacity(32)
    assert cap == 8
    assert stats["load"][0] == 32  # counted before dropping
    assert stats["dropped"] == 32 - cap
    keep = torch.zeros(32, 1)
    keep[:cap] = 1  # the first `cap` tokens in token order keep their slot
    assert rel_err(y, _dense_reference(moe, x, keep=keep)) < 1e-12


def test_aux_loss_seq_vs_batch():
    """Two sequences, each routed entirely to a different expert: balanced over the batch,
    unbalanced within each sequence, so the sequence-wise loss is the larger."""
    losses = {}
    for kind in ("seq", "batch"):
        moe = _moe(num_experts=2, num_shared_experts=0, top_k=1, aux_loss_type=kind, aux_loss_coef=1.0)
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[0, 0], moe.router.weight[1, 0] = 10.0, -10.0
        x = torch.zeros(2, 8, C, dtype=torch.float64)
        x[0, :, 0], x[1, :, 0] = 1.0, -1.0
        losses[kind] = float(moe.route(x.view(-1, C), 2)[2].detach())
    # seq: each row has f = (2, 0) and P ~ (1, 0): loss ~ 2; batch: f = (1, 1), P = (.5, .5): loss 1
    assert losses["seq"] == pytest.approx(2.0, rel=1e-3)
    assert losses["batch"] == pytest.approx(1.0, rel=1e-3)


def test_z_loss_value():
    moe = _moe(aux_loss_type="none", z_loss_coef=0.1)
    x = torch.randn(12, C, dtype=torch.float64)
    z = moe.route(x, 1)[2].detach()
    lse = F.linear(x.float(), moe.router.weight.float()).logsumexp(-1)
    assert float(z) == pytest.approx(0.1 * float(lse.detach().square().mean()), rel=1e-6)


def test_aux_loss_gradient_balances_router():
    moe = _moe(num_experts=4, top_k=1, aux_loss_coef=1.0, aux_loss_type="batch")
    _skewed(moe, strength=2.0)
    x = torch.randn(4, 32, C, dtype=torch.float64) + 0.5
    opt = torch.optim.SGD([moe.router.weight], lr=0.5)
    before = load_summary(moe(x)[2]["load"])["cv"]
    for _ in range(30):
        opt.zero_grad()
        moe(x)[1].backward()
        opt.step()
    after = load_summary(moe(x)[2]["load"])["cv"]
    assert before > 1.0 and after < 0.5 * before


def test_bias_update_moves_load_toward_balance_without_changing_weights():
    moe = _moe(num_experts=4, top_k=1, score_func="sigmoid", aux_loss_type="none", bias_update_rate=0.01)
    _skewed(moe, strength=2.0, std=0.3)
    x = torch.randn(4, 32, C, dtype=torch.float64) + 0.5
    before = load_summary(moe(x)[2]["load"])["cv"]
    for _ in range(40):
        moe.record_load(moe(x)[2]["load"])
        moe.update_bias()
    after = load_summary(moe(x)[2]["load"])["cv"]
    # sign updates of a fixed step settle into a small oscillation around balance
    assert before > 0.5 and after < 0.25 * before
    assert moe.expert_bias[0] < 0 and (moe.expert_bias[1:] > 0).any()
    assert moe.load_accum.sum() == 0  # consumed by the update
    # the bias steers selection only: weights are the unbiased (normalised) sigmoid scores
    idx, w, _, _ = moe.route(x.view(-1, C), 4)
    assert torch.allclose(w, torch.ones_like(w))  # top-1 sigmoid renormalised to 1
    assert "expert_bias" in moe.state_dict() and "load_accum" not in moe.state_dict()


def test_bias_update_off_by_default():
    moe = _moe()
    moe.record_load(torch.tensor([5, 0, 0, 0, 0, 0]))
    moe.update_bias()
    assert moe.expert_bias.abs().sum() == 0


def test_every_expert_gets_a_gradient():
    """Stacked expert weights: an expert that received no token still has a (zero) grad."""
    moe = _moe(num_experts=4, top_k=1)
    _skewed(moe)
    x = torch.randn(1, 8, C, dtype=torch.float64) * 0.1 + 1.0
    y, aux, stats = moe(x)
    assert stats["load"][1:].sum() == 0
    (y.sum() + aux).backward()
    assert moe.w_down.grad is not None and moe.w_down.grad[0].abs().sum() > 0
    assert moe.w_down.grad[1:].abs().sum() == 0
