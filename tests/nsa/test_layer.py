"""NSAAttention: config validation, shapes, causality, varlen isolation, variants, gradients, RoPE.

Numerics are compared as relative error ||a - b|| / ||b||. Paths that compute
the same sums in a different order (packed vs per-document, a future token
changed) agree to float32 rounding, ~1e-7 relative; 1e-5 leaves room for
accumulation over a few hundred keys and still catches any wrong mask (a
single leaked or missing key moves an output by ~1e-2 relative).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from nsa.layer import NSAAttention, NSAConfig
from nsa.rope import apply_rotary, rotary_tables

TOL = 1e-5

# l=8, d=4, l'=16, n=3, w=16: at T=96 there are 6 selection blocks, so top-n is a real choice.
SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim_k=16, head_dim_v=8, block_len=8, stride=4,
             select_len=16, num_select=3, num_init=1, num_local=1, window=16)


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_layer(seed: int = 0, **overrides) -> NSAAttention:
    """A layer with random (non-init) gate weights, so gates differ per head and token."""
    torch.manual_seed(seed)
    layer = NSAAttention(NSAConfig(**{**SMALL, **overrides}))
    with torch.no_grad():
        # gate logits vary with std ~0.3 * ||x|| whatever the weight's step scale
        layer.gate_proj.weight.normal_(std=0.3 / layer.gate_weight_scale)
        if layer.cfg.compress == "mlp":
            layer.compress_k.pe.normal_(std=0.5)
            layer.compress_v.pe.normal_(std=0.5)
    return layer


def tables(B: int, T: int, head_dim: int, start: int = 0):
    pos = torch.arange(start, start + T)[None].expand(B, T)
    return rotary_tables(pos, head_dim)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
        (dict(head_dim_k=15), "even"),
        (dict(stride=3), "divide block_len"),
        (dict(block_len=32, select_len=16, stride=8), "select_len"),
        (dict(num_select=2, num_init=1, num_local=2), "num_select"),
        (dict(compress="max"), "compress"),
        (dict(compress_hidden=0), "compress_hidden"),
        (dict(window=0), "window"),
        (dict(backend="cuda"), "backend"),
        (dict(gate_init=(0.0, 0.5, 0.5)), "gate_init"),
        (dict(gate_init=(0.5, 0.5)), "gate_init"),
        (dict(gate_weight_scale=0.0), "gate_weight_scale"),
        (dict(branches=()), "branches"),
        (dict(branches=("win", "dense")), "branches"),
        (dict(branches=("win", "win")), "branches"),
        (dict(select_distill=-0.1), "select_distill"),
        (dict(select_distill=True), "select_distill"),
        (dict(select_distill=float("inf")), "select_distill"),
        (dict(select_distill=0.1, branches=("cmp", "win")), "slc branch"),
        (dict(select_distill=0.1), "2 freely chosen blocks"),  # SMALL: 3 selected, 2 of them forced
    ],
)
def test_config_rejects_impossible_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        NSAAttention(NSAConfig(**{**SMALL, **bad}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_dtypes_and_initial_gates(dtype):
    torch.manual_seed(0)
    layer = NSAAttention(NSAConfig(**SMALL)).to(dtype)
    B, T = 2, 40
    x = torch.randn(B, T, SMALL["hidden_size"], dtype=dtype)
    cos, sin = tables(B, T, SMALL["head_dim_k"])
    y = layer(x, cos, sin)
    assert y.shape == (B, T, SMALL["hidden_size"]) and y.dtype == dtype
    assert torch.isfinite(y.float()).all()
    # documented init: zero gate weight, bias logit(gate_init) -> every gate is its gate_init
    assert set(layer.last_gate_means) == {"g_cmp", "g_slc", "g_win"}
    for v, want in zip(layer.last_gate_means.values(), layer.cfg.gate_init, strict=True):
        assert not v.requires_grad
        assert abs(v.item() - want) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_reset_gates_restarts_only_the_named_branches():
    """train.init_reset_gates: after training moved every gate, reset_gates(["cmp"]) puts the
    compressed branch's gate back at gate_init for every token and leaves the other two as trained."""
    torch.manual_seed(0)
    layer = NSAAttention(NSAConfig(**SMALL))
    with torch.no_grad():  # as after training: token-dependent gates away from their init
        layer.gate_proj.weight.normal_()
        layer.gate_proj.bias.normal_()
    x = torch.randn(2, 40, SMALL["hidden_size"])
    before = layer.gates(x).detach()
    layer.reset_gates(["cmp"])
    after = layer.gates(x).detach()
    assert torch.allclose(after[..., 0], torch.full_like(after[..., 0], layer.cfg.gate_init[0]), atol=1e-6)
    assert torch.equal(after[..., 1:], before[..., 1:])
    with pytest.raises(ValueError, match="unknown branches"):
        layer.reset_gates(["dense"])


def test_gate_logits_move_at_the_bias_rate_under_adam():
    """Issue 18: gates whose weight learnt at the full rate (a logit moving ~lr * ||x||_1, ~25x its
    bias's step here, ~hidden_size x in general) became token-dependent before the content look-up
    formed and shut the token-level branches; NSA stayed at the no-look-up loss for 1000-3200
    steps of dense MQAR where full attention left it (docs/results/retrieval_probe). With
    ``gate_weight_scale`` None (1/hidden_size) Adam's first step (each parameter moves by lr)
    moves a token's gate logit by at most ~2 lr for unit-RMS inputs."""
    torch.manual_seed(0)
    lr = 1e-2
    for scale, bounded in ((None, True), (1.0, False)):
        layer = NSAAttention(NSAConfig(**SMALL, gate_weight_scale=scale))
        x = torch.randn(2, 40, SMALL["hidden_size"])
        cos, sin = tables(2, 40, SMALL["head_dim_k"])
        before = layer.gates(x).detach().logit()
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        layer(x, cos, sin).square().mean().backward()
        opt.step()
        step = (layer.gates(x).detach().logit() - before).abs().max().item()
        assert (step <= 2.2 * lr) == bounded, (scale, step / lr)


@pytest.mark.parametrize("branches", [("win",), ("cmp", "slc"), ("slc", "win")])
def test_branch_ablation_sums_only_the_kept_branches(branches):
    """``branches`` keeps some gated branch outputs: the result is exactly the full layer's sum
    restricted to them (same weights), the others are not computed, their gates not reported,
    and a layer with only the window is blind beyond it."""
    full = make_layer(3)
    part = make_layer(3, branches=branches)
    B, T = 2, 70
    x = torch.randn(B, T, 32)
    cos, sin = tables(B, T, 16)
    q = apply_rotary(full.q_proj(x).view(B, T, 4, 16), cos, sin)
    kv = full._branch_kv(x, cos, sin)
    onehot = torch.eye(3).expand(B, T, 4, 3, 3)  # branch i alone: gates e_i
    outs = [full._attend(q, kv, onehot[..., i, :], None, (cos, sin))[0] for i in range(3)]
    g = torch.sigmoid(full.gate_proj.bias + full.gate_weight_scale * x @ full.gate_proj.weight.t()).view(B, T, 4, 3)
    keep = [i for i, name in enumerate(("cmp", "slc", "win")) if name in branches]
    want = full.o_proj(sum(g[..., i, None] * outs[i] for i in keep).reshape(B, T, -1))
    assert relerr(part(x, cos, sin), want) < TOL
    assert set(part.last_gate_means) == {f"g_{b}" for b in branches}
    if branches == ("win",):
        assert part._attend(q, part._branch_kv(x, cos, sin), g, None, (cos, sin))[1] is None  # no compressed K/V built
        changed = x.clone()
        changed[:, :T - SMALL["window"] - 1] += 1.0  # tokens no query at T-1 can see in its window
        assert relerr(part(changed, cos, sin)[:, -1], part(x, cos, sin)[:, -1]) < 1e-6
    # decoding token by token after a prefill gives the same outputs as the whole sequence at once
    cache = part.new_cache(B, T)
    steps = [part(x[:, :40], cos[:, :40], sin[:, :40], cache=cache)]
    steps += [part(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache=cache) for t in range(40, T)]
    assert relerr(torch.cat(steps, 1), want) < TOL


def test_bad_inputs_raise():
    layer = make_layer()
    x = torch.randn(1, 20, 32)
    cos, sin = tables(1, 20, 16)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(1, 20, 31), cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        layer(x, cos[:, :10], sin[:, :10])
    with pytest.raises(ValueError, match="int32"):
        layer(x, cos, sin, cu_seqlens=torch.tensor([0, 20]))
    x2, (c2, s2) = torch.randn(2, 20, 32), tables(2, 20, 16)
    with pytest.raises(ValueError, match="B == 1"):
        layer(x2, c2, s2, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))


def test_causality_future_token_does_not_change_the_past():
    layer = make_layer()
    B, T, t0 = 2, 96, 57
    x = torch.randn(B, T, 32)
    cos, sin = tables(B, T, 16)
    with torch.no_grad():
        y = layer(x, cos, sin)
        x2 = x.clone()
        x2[:, t0] += 3.0
        y2 = layer(x2, cos, sin)
    assert relerr(y2[:, :t0], y[:, :t0]) < TOL
    assert relerr(y2[:, t0:], y[:, t0:]) > 1e-3  # the change is visible from t0 on


def _doc_tables(lens):
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return rotary_tables(pos, SMALL["head_dim_k"])


def test_varlen_equals_per_document_loop_and_isolates_documents():
    layer = make_layer(1)
    lens = [37, 5, 70, 0, 24]  # shorter than a compression block, past the window, empty
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    x = torch.randn(1, T, 32)
    cos, sin = _doc_tables(lens)
    with torch.no_grad():
        y = layer(x, cos, sin, cu_seqlens=cu)
        for i, n in enumerate(lens):
            if n == 0:
                continue
            a, b = cu[i].item(), cu[i + 1].item()
            yd = layer(x[:, a:b], *tables(1, n, 16))
            assert relerr(y[:, a:b], yd) < TOL, f"document {i}"
        # change document 2 only: every other document's output is unchanged
        x2 = x.clone()
        a, b = cu[2].item(), cu[3].item()
        x2[:, a:b] = torch.randn(1, b - a, 32)
        y2 = layer(x2, cos, sin, cu_seqlens=cu)
    keep = torch.ones(T, dtype=torch.bool)
    keep[a:b] = False
    assert relerr(y2[:, keep], y[:, keep]) < TOL
    assert relerr(y2[:, a:b], y[:, a:b]) > 1e-2


@pytest.mark.parametrize("overrides", [{}, dict(num_heads=8, num_kv_heads=1, num_select=4, num_local=2),
                                       dict(branches=("cmp", "slc")), dict(branches=("win",)), dict(cmp_rope="block")])
def test_padded_documents_equal_one_document_at_a_time(monkeypatch, overrides):
    """The torch backend runs packed documents as one padded batch when that is cheap
    (``PAD_DOCUMENTS_MAX_FILL``); outputs and every gradient equal the per-document loop's."""
    import nsa.layer as nsa_layer

    lens = [37, 5, 1, 70, 0, 24, 9]  # shorter than a block, one token, past the window, empty
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    x0 = torch.randn(1, sum(lens), 32)
    cos, sin = _doc_tables(lens)
    results = []
    for fill in (0.0, 100.0):  # 0: never pad (one document at a time); 100: always
        monkeypatch.setattr(nsa_layer, "PAD_DOCUMENTS_MAX_FILL", fill)
        assert (nsa_layer._padded_documents(cu, x0.shape[1]) is None) == (fill == 0.0)
        layer = make_layer(4, **overrides)
        x = x0.clone().requires_grad_(True)
        y = layer(x, cos, sin, cu_seqlens=cu)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad, grads))
    (y_doc, gx_doc, g_doc), (y_pad, gx_pad, g_pad) = results
    assert relerr(y_pad, y_doc) < TOL and relerr(gx_pad, gx_doc) < TOL
    assert g_pad.keys() == g_doc.keys() and len(g_doc) > 3
    for name in g_doc:
        assert relerr(g_pad[name], g_doc[name]) < TOL, name


def _distill_run(layer, x, cos, sin, cu=None):
    """Forward + backward of the selection distillation alone: (aux loss, x.grad, {param: grad})."""
    x = x.clone().requires_grad_(True)
    layer(x, cos, sin, cu_seqlens=cu)
    aux = layer.aux_loss
    aux.backward()
    return aux.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cmp_rope", ["tokens", "block"])
def test_select_distill_trains_only_the_compressed_keys(cmp_rope):
    """With ``select_distill`` the training forward leaves a positive, weighted loss whose gradient
    reaches the compressed keys' projection rows and phi, and nothing else: not x (the residual
    stream), not the queries, values or gates; the output is the same as without it; eval and
    no-grad forwards leave no loss."""
    T = 96
    x, (cos, sin) = torch.randn(2, T, 32), tables(2, T, 16)
    layer = make_layer(5, select_distill=0.5, cmp_rope=cmp_rope, num_select=4)
    plain = make_layer(5, cmp_rope=cmp_rope, num_select=4)
    with torch.no_grad():
        assert relerr(layer(x, cos, sin), plain(x, cos, sin)) == 0
    assert layer.aux_loss is None and plain.aux_loss is None  # no grad: no loss
    aux, gx, grads = _distill_run(layer, x, cos, sin)
    assert aux > 0 and torch.isfinite(aux)
    assert relerr(aux, 0.5 * layer.last_select_kl) < 1e-6
    assert gx is None or gx.abs().max() == 0
    assert set(grads) == {"kv_proj.weight", "compress_k.pe", "compress_k.fc1.weight", "compress_k.fc1.bias",
                          "compress_k.fc2.weight"}
    H, Dk, Dv = 2, 16, 8  # KV heads; the compressed branch's key rows come first in kv_proj
    rows = grads["kv_proj.weight"].view(3 * H, Dk + Dv, -1).abs().sum(-1)
    assert rows[:H, :Dk].min() > 0 and rows[H:].max() == 0 and rows[:H, Dk:].max() == 0
    layer.eval()
    with torch.enable_grad():
        layer(x, cos, sin)
    assert layer.aux_loss is None


def test_select_distill_padded_documents_equal_one_document_at_a_time(monkeypatch):
    """Packed documents: the padded batch (padding queries masked out of the mean) gives the same
    loss and gradients as one document at a time."""
    import nsa.layer as nsa_layer

    lens = [37, 5, 90, 0, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    x, (cos, sin) = torch.randn(1, sum(lens), 32), _doc_tables(lens)
    results = []
    for fill in (0.0, 100.0):
        monkeypatch.setattr(nsa_layer, "PAD_DOCUMENTS_MAX_FILL", fill)
        results.append(_distill_run(make_layer(6, select_distill=1.0, num_select=4), x, cos, sin, cu))
    (a_doc, _, g_doc), (a_pad, _, g_pad) = results
    assert a_doc > 0 and relerr(a_pad, a_doc) < TOL
    assert g_pad.keys() == g_doc.keys()
    for name in g_doc:
        assert relerr(g_pad[name], g_doc[name]) < 1e-4, name


def test_padded_documents_only_when_padding_is_cheap():
    from nsa.layer import PAD_DOCUMENTS_MAX_FILL, _padded_documents

    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    index, valid = _padded_documents(cu([3, 0, 2]), 5)
    assert index.tolist() == [[0, 1, 2], [3, 4, 4]] and valid.tolist() == [[True] * 3, [True, True, False]]
    assert _padded_documents(cu([64]), 64) is None  # one document: nothing to batch
    long_and_short = [900] + [31] * 4  # padding to 5 x 900 would be ~4.4x the row
    assert 5 * 900 > PAD_DOCUMENTS_MAX_FILL * 1024 and _padded_documents(cu(long_and_short), 1024) is None


def test_share_kv_and_mean_variants():
    full = NSAAttention(NSAConfig(**SMALL))
    shared = NSAAttention(NSAConfig(**SMALL, share_kv=True))
    mean = NSAAttention(NSAConfig(**SMALL, compress="mean"))
    Hkv, Dk, Dv, C, l = 2, 16, 8, 32, 8
    assert full.kv_proj.weight.shape == (3 * Hkv * (Dk + Dv), C)
    assert shared.kv_proj.weight.shape == (Hkv * (Dk + Dv), C)
    assert sum(p.numel() for p in mean.compress_k.parameters()) == 0
    # default phi width: the output head dim (documented choice)
    assert full.compress_k.fc1.weight.shape == (Dk, l * Dk) and full.compress_v.fc2.weight.shape == (Dv, Dv)
    wide = NSAAttention(NSAConfig(**SMALL, compress_hidden=40))
    assert wide.compress_k.fc1.out_features == 40 and wide.compress_v.fc1.out_features == 40
    # share_kv: all branches read one projection, so the per-branch K/V tensors are identical
    x = torch.randn(1, 24, C)
    kv = shared._branch_kv(x, *tables(1, 24, Dk))
    assert kv["cmp"][0] is kv["slc"][0] is kv["win"][0]
    # mean pooling: the compressed key is the mean of the block's (RoPE'd) keys
    k, v = kv["cmp"]
    kc, vc = mean._compressed_kv(k, v, None, tables(1, 24, Dk))
    assert kc.shape == (1, (24 - l) // 4 + 1, Hkv, Dk)
    assert relerr(kc[:, 2], k[:, 8:16].mean(1)) < 1e-6
    for layer in (shared, mean):
        y = layer(x, *tables(1, 24, Dk))
        assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("variant", [{}, {"share_kv": True}, {"compress": "mean"}, {"cmp_rope": "block"}])
def test_gradients_reach_every_parameter(variant):
    """float64, so that rounding noise (~1e-16) cannot pass for a gradient: a parameter the
    loss cannot depend on (e.g. a bias shared by all compressed keys) has |grad| ~ 1e-16."""
    layer = make_layer(2, **variant).double()
    B, T = 2, 48
    x = torch.randn(B, T, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x, *tables(B, T, 16))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.norm() > 1e-6, name
    assert x.grad.norm() > 1e-6
    # the fused K/V projection: every branch's keys and values are used
    cfg = layer.cfg
    g = layer.kv_proj.weight.grad.view(layer.branches_kv, cfg.num_kv_heads, cfg.head_dim_k + cfg.head_dim_v, -1)
    for i in range(layer.branches_kv):
        assert g[i, :, : cfg.head_dim_k].norm() > 1e-6 and g[i, :, cfg.head_dim_k :].norm() > 1e-6, f"branch {i}"


def test_rotary_convention_and_relative_positions():
    D = 8
    cos, sin = rotary_tables(torch.tensor([[0, 1, 5]]), D)
    x = torch.randn(1, 3, 2, D)
    y = apply_rotary(x, cos, sin)
    assert relerr(y[:, 0], x[:, 0]) == 0  # position 0: identity
    assert relerr(y.norm(dim=-1), x.norm(dim=-1)) < 1e-6  # a rotation
    # rotate-half: pair (i, i + D/2) turns by angle p * theta^(-2i/D); check pair 0 at position 1
    c, s = math.cos(1.0), math.sin(1.0)
    x0, x4 = x[0, 1, 0, 0].item(), x[0, 1, 0, 4].item()
    assert abs(y[0, 1, 0, 0].item() - (x0 * c - x4 * s)) < 1e-6
    assert abs(y[0, 1, 0, 4].item() - (x4 * c + x0 * s)) < 1e-6
    # <R(p) q, R(p') k> depends only on p - p'
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    dots = []
    for p in (3, 40):
        cq, sq = rotary_tables(torch.tensor([[p + 7]]), D)
        ck, sk = rotary_tables(torch.tensor([[p]]), D)
        dots.append((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item())
    assert abs(dots[0] - dots[1]) < 1e-5
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary(x, cos[..., :2], sin[..., :2])


def test_block_rope_makes_the_layer_depend_on_relative_positions_only():
    """``cmp_rope="block"``: every score is between a query and a key rotated at their own positions
    (a compressed key at its block's last token), so moving a whole sequence by P positions leaves the
    output unchanged; with RoPE before phi ("tokens") the compressed keys see absolute positions. Each
    compressed key is phi of the un-rotated keys, rotated as its block's last token."""
    T, P = 60, 37
    x = torch.randn(1, T, 32, dtype=torch.float64)
    shifted = rotary_tables(torch.arange(P, P + T)[None], 16)
    for mode, invariant in (("block", True), ("tokens", False)):
        layer = make_layer(5, cmp_rope=mode).double()
        with torch.no_grad():
            err = relerr(layer(x, *shifted), layer(x, *tables(1, T, 16)))
        # 1e-6: rotary_tables rounds cos/sin to float32 (~6e-8 each), the rest is float64
        assert (err < 1e-6) if invariant else (err > 1e-3), (mode, err)
    cos, sin = shifted
    k_raw = layer.kv_proj(x).view(1, T, 3 * 2, 24)[:, :, :2, :16]  # the compressed branch's keys, no RoPE
    layer.cfg.cmp_rope = "block"
    kv = layer._branch_kv(x, cos, sin)
    assert relerr(kv["cmp"][0], k_raw) == 0 and relerr(kv["slc"][0], apply_rotary(kv["slc"][0], cos, sin)) > 1e-3
    k_cmp, _ = layer._compressed_kv(*kv["cmp"], None, (cos, sin))
    i, l, d = 5, 8, 4
    want = layer.compress_k(k_raw[:, i * d:i * d + l].transpose(1, 2))  # [1, Hkv, Dk]
    last = i * d + l - 1
    want = apply_rotary(want[:, None], cos[:, last:last + 1], sin[:, last:last + 1])[:, 0]
    assert relerr(k_cmp[:, i], want) < 1e-12


def _backend_pair(device: str, B: int, T: int, **cfg):
    """Outputs and gradients of one layer (same weights) under the torch and the triton backend."""
    layer = make_layer(7, **cfg).to(device)
    x = torch.randn(B, T, layer.cfg.hidden_size, device=device)
    cos, sin = (t.to(device) for t in tables(B, T, layer.cfg.head_dim_k))
    g = torch.randn(B, T, layer.cfg.hidden_size, device=device)
    out = {}
    for be in ("torch", "triton"):
        layer.cfg.backend = be
        xb = x.clone().requires_grad_(True)
        y = layer(xb, cos, sin)
        grads = torch.autograd.grad((y * g).sum(), [xb, *layer.parameters()])
        out[be] = (y.detach(), grads)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    return out, names


def _assert_backends_agree(out, names, tol):
    assert relerr(out["triton"][0], out["torch"][0]) < tol
    for name, a, b in zip(names, out["triton"][1], out["torch"][1], strict=True):
        assert relerr(a, b) < tol, name


@pytest.mark.slow  # ~10 s of CPU in the interpreter; the CUDA test below covers the same on a GPU
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_backend_matches_torch_on_cpu_interpreter():
    """Same weights, both backends (Triton through TRITON_INTERPRET on CPU): float32
    kernels use IEEE dots, so outputs and all gradients agree to rounding (1e-5)."""
    out, names = _backend_pair("cpu", 1, 64)
    _assert_backends_agree(out, names, TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", [{}, {"share_kv": True, "compress": "mean"}])
def test_triton_backend_matches_torch_on_cuda(variant):
    """As above on a GPU, at a length with many selection blocks; 1e-4 allows for the
    kernels' different float32 summation order over ~500 keys and through backward."""
    out, names = _backend_pair("cuda", 2, 500, **variant)
    _assert_backends_agree(out, names, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_is_close_to_float32():
    """bf16 weights and activations (8-bit mantissa, ~4e-3 per rounding) stay within 5e-2
    of the float32 layer over the whole output; gradients are finite."""
    layer = make_layer(9).cuda()
    B, T = 2, 700
    x = torch.randn(B, T, layer.cfg.hidden_size, device="cuda")
    cos, sin = (t.cuda() for t in tables(B, T, layer.cfg.head_dim_k))
    with torch.no_grad():
        y32 = layer(x, cos, sin)
    layer16 = layer.to(torch.bfloat16)
    x16 = x.bfloat16().requires_grad_(True)
    y16 = layer16(x16, cos, sin)
    y16.float().square().mean().backward()
    assert y16.dtype == torch.bfloat16 and relerr(y16.float(), y32) < 5e-2
    assert all(torch.isfinite(p.grad).all() for p in layer16.parameters()) and torch.isfinite(x16.grad).all()
