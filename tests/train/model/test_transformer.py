"""The LM: loss and labels, stats, packing, gradient checkpointing, and learning."""

import pytest
import torch

from train.model import build_model
from train.model.transformer import positions_from_cu_seqlens

from .helpers import attn_cfg, model_cfg, rel_err


@torch.no_grad()
def test_loss_ignores_minus_100_and_adds_aux():
    torch.manual_seed(0)
    model = build_model(model_cfg("moe", moe=dict(num_experts=4, top_k=2, expert_size=32, aux_loss_coef=0.1)),
                        attn_cfg("full"))
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[1, :5] = -100
    out = model(ids, labels=labels)
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(out.logits[keep].float(), labels[keep])
    assert out.stats["lm_loss"] == pytest.approx(float(ce), rel=1e-6)
    assert float(out.loss) == pytest.approx(float(ce + out.aux_loss), rel=1e-6)
    assert out.aux_loss > 0 and len(out.stats["moe/loads"]) == 1  # first_k_dense=1 of 2 layers
    assert sum(out.stats["moe/loads"][0]) == 2 * 12 * 2
    for key in ("moe/load_cv", "moe/max_over_mean", "moe/dropped_frac", "moe/aux_loss"):
        assert isinstance(out.stats[key], float)
    all_ignored = model(ids, labels=torch.full_like(ids, -100))
    assert torch.isfinite(all_ignored.loss)


def test_nsa_select_distill_joins_the_aux_loss_not_the_moe_stats():
    """attention.select_distill: in training the layers' weighted distillation losses are added to
    aux_loss (so to loss), their mean KL is logged as nsa/select_kl, and moe/aux_loss stays the
    MoE's alone; evaluation adds nothing."""
    from dataclasses import replace

    torch.manual_seed(0)
    moe = dict(num_experts=4, top_k=2, expert_size=32, aux_loss_coef=0.1)
    cfg, attn = model_cfg("moe", moe=moe), attn_cfg("nsa")
    ids = torch.randint(0, 97, (2, 130))
    outs = []
    for w in (0.0, 0.3):
        torch.manual_seed(1)
        model = build_model(cfg, replace(attn, select_distill=w, num_select=4, num_local=1))
        outs.append(model(ids, labels=ids.roll(-1, 1)))
        distill = float(sum(blk.attn.aux_loss for blk in model.layers)) if w else 0.0
    off, on = outs
    assert distill > 0
    assert float(on.loss.detach() - on.stats["lm_loss"]) == pytest.approx(float(on.aux_loss), rel=1e-5)
    assert float(on.aux_loss.detach()) == pytest.approx(float(off.aux_loss.detach()) + distill, rel=1e-5)
    assert distill == pytest.approx(0.3 * on.stats["nsa/select_kl"] * len(model.layers), rel=1e-5)
    assert on.stats["moe/aux_loss"] == pytest.approx(off.stats["moe/aux_loss"], rel=1e-5)
    assert "nsa/select_kl" not in off.stats
    model.eval()
    with torch.no_grad():
        assert "nsa/select_kl" not in model(ids).stats


def test_nsa_gate_stats():
    model = build_model(model_cfg(), attn_cfg("nsa"))
    out = model(torch.randint(0, 97, (1, 20)))
    assert set(out.stats) == {"nsa/gate_cmp", "nsa/gate_slc", "nsa/gate_win"}
    assert 0 < out.stats["nsa/gate_cmp"] < 1
    cache = model.new_cache(1, 8)  # decoding steps (prefill included) skip the gate summary
    with torch.no_grad():
        assert model(torch.randint(0, 97, (1, 4)), cache=cache).stats == {}
        assert model(torch.randint(0, 97, (1, 1)), cache=cache).stats == {}


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 8).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_bad_inputs_raise():
    model = build_model(model_cfg(), attn_cfg("full"))
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="end at the packed length"):
        model(ids, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("kind", ["full", "nsa"])
def test_gradient_checkpointing_same_gradients(kind):
    torch.manual_seed(0)
    model = build_model(model_cfg("moe"), attn_cfg(kind)).double()
    ids = torch.randint(0, 97, (1, 48))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)

    def grads():
        model.zero_grad()
        model(ids, cu_seqlens=cu, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = grads()
    model.set_gradient_checkpointing(True)
    ckpt = grads()
    # float64: recomputation repeats the same operations; the result must agree to rounding
    assert rel_err(ckpt, plain) < 1e-12
    assert model.layers[1].mlp.load_accum.sum() == 2 * 48 * 2  # recomputation does not double-count


@pytest.mark.parametrize("kind", ["full", "nsa"])
@pytest.mark.parametrize("mlp", ["swiglu", "moe"])
def test_few_steps_reduce_loss(kind, mlp):
    """Overfitting one fixed packed batch: 12 AdamW steps must cut the loss clearly
    (from ~ln(97) = 4.6); a broken gradient path (e.g. a branch detached) would not."""
    torch.manual_seed(0)
    cfg = model_cfg(mlp, moe=dict(num_experts=4, top_k=2, expert_size=32, bias_update_rate=1e-3))
    model = build_model(cfg, attn_cfg(kind))
    ids = torch.randint(0, 97, (2, 40))
    labels = ids.roll(-1, 1)
    cu = torch.tensor([0, 30, 55, 80], dtype=torch.int32)
    labels.view(-1)[cu[1:].long() - 1] = -100  # no target across a document end
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        out = model(ids, cu_seqlens=cu, labels=labels)
        out.loss.backward()
        opt.step()
        model.update_moe_bias()
        losses.append(out.stats["lm_loss"])
    assert losses[-1] < 0.6 * losses[0]


def test_bf16_cast_keeps_rope_and_router_bias_in_float32():
    model = build_model(model_cfg("moe"), attn_cfg("full"))
    model.layers[1].mlp.expert_bias.fill_(0.3001)
    model = model.to(torch.bfloat16)
    assert model.layers[1].mlp.expert_bias.dtype == torch.float32
    assert float(model.layers[1].mlp.expert_bias[0]) == pytest.approx(0.3001, rel=1e-6)
    assert model.rotary.inv_freq.dtype == torch.float64
    assert model(torch.zeros(1, 5, dtype=torch.long)).logits.dtype == torch.bfloat16


@torch.no_grad()
@pytest.mark.parametrize("kind", ["full", "nsa"])
def test_meta_build_then_materialise(kind):
    """Build on meta, allocate with to_empty, initialise: same init statistics as a direct build."""
    with torch.device("meta"):
        model = build_model(model_cfg("moe"), attn_cfg(kind))
    model = model.to_empty(device="cpu")
    model.reset_parameters()
    torch.manual_seed(0)
    direct = build_model(model_cfg("moe"), attn_cfg(kind))
    for (name, p), q in zip(model.named_parameters(), direct.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        assert float(p.std() if p.numel() > 1 else p.abs()) == pytest.approx(
            float(q.std() if q.numel() > 1 else q.abs()), rel=0.35, abs=1e-6), name
    assert model.layers[1].mlp.expert_bias.abs().sum() == 0


def test_embed_init_std():
    """The token embedding has its own init std (None: init_std); other weights keep init_std."""
    torch.manual_seed(0)
    default = build_model(model_cfg(vocab_size=2000, hidden_size=128), attn_cfg("full"))
    big = build_model(model_cfg(vocab_size=2000, hidden_size=128, embed_init_std=0.088), attn_cfg("full"))
    assert abs(default.embed.weight.std().item() - 0.02) < 1e-3
    assert abs(big.embed.weight.std().item() - 0.088) < 3e-3
    assert abs(big.layers[0].attn.q_proj.weight.std().item() - 0.02) < 2e-3
    with pytest.raises(ValueError, match="embed_init_std"):
        model_cfg(embed_init_std=0.0).validate()
