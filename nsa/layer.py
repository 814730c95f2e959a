"""The NSA attention layer: projections, compression phi, gates, and the three branches.

Implements ``NSA_SPEC.md`` on top of the functional ops (``nsa.compressed_attention``,
``nsa.select_blocks``, ``nsa.selected_attention``, ``nsa.sliding_window_attention``),
so the same weights run on CPU (torch backend) and GPU (triton backend).
Incremental decoding goes through :class:`nsa.cache.NSACache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import nsa
from nsa.cache import (
    NSACache,
    decode_compressed,
    decode_select,
    decode_selected,
    decode_token,
    decode_window,
)
from nsa.ops import decode_cpu
from nsa.ops.common import BRANCHES, check_block_params, check_selection_params, resolve_backend
from nsa.ops.native_sparse_attention.reference import gated_sum
from nsa.ops.select_blocks.distill import selection_distill
from nsa.rope import apply_rotary

# torch and cpu backends, packed documents: attend over them as one padded batch [docs, longest, ...] when
# that holds at most this many times the row's tokens; else one document at a time
PAD_DOCUMENTS_MAX_FILL = 2.0


@dataclass
class NSAConfig:
    """Shapes and NSA settings of one layer (paper names: l, d, l', n, w)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    block_len: int = 16
    stride: int = 8
    select_len: int = 32
    num_select: int = 4
    num_init: int = 1
    num_local: int = 2
    window: int = 64
    share_kv: bool = False  # one K/V projection for all three branches instead of one each
    compress: str = "mlp"  # "mlp": pe + MLP over the flattened block; "mean": mean pooling
    compress_hidden: int | None = None  # phi hidden width; None -> the phi's output dim (Dk or Dv)
    # Where the compressed branch's keys get RoPE. "tokens": on the raw keys before phi (the spec's
    # choice). "block": phi compresses un-rotated keys and each compressed key is then rotated as its
    # block's last token, so q . k_cmp depends on content and distance alone, as a full-attention
    # score does (phi of rotated keys sees every block's content turned by its absolute position).
    cmp_rope: str = "tokens"
    backend: str | None = None  # "torch" | "cpu" | "triton" | None (the API default for the device and dtype)
    # The branches whose gated outputs are summed: an ablation drops some, e.g. ("win",) keeps only
    # the sliding window (nothing outside it can be attended to); the others are not computed.
    branches: tuple[str, ...] = BRANCHES
    # Gates g = sigmoid(b + gate_weight_scale * W x): each branch's gate starts at gate_init[branch]
    # (b = logit of it, W = 0). The defaults keep the selected and sliding-window outputs near full
    # strength and the compressed branch's output small at first: a small model forms its content
    # look-up (induction head) only through the token-level branches, and at 1/3 each it did not
    # within 1000+ steps (docs/results/retrieval_probe). None -> 1/hidden_size, so that under Adam a
    # step moves a gate's logit about as far as its bias rather than hidden_size times farther:
    # token-dependent gates that learn at the full rate shut the still-noisy token branches before
    # the look-up forms.
    gate_init: tuple[float, float, float] = (0.05, 0.95, 0.95)  # (cmp, slc, win)
    gate_weight_scale: float | None = None
    # Not in the spec: weight of the selection distillation (nsa.ops.select_blocks.distill), a
    # training loss that teaches the compressed keys to rank blocks as the selected attention reads
    # them; 0 = off (the spec's NSA, where no gradient reaches the ranking)
    select_distill: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first impossible setting."""
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim_k", "head_dim_v", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NSAConfig.{name} must be an int >= 1, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim_k % 2:
            raise ValueError(f"head_dim_k ({self.head_dim_k}) must be even for RoPE")
        check_block_params(self.block_len, self.stride, self.select_len)
        check_selection_params(self.num_select, self.num_init, self.num_local)
        if self.cmp_rope not in ("tokens", "block"):
            raise ValueError(f"cmp_rope must be 'tokens' or 'block', got {self.cmp_rope!r}")
        if self.compress not in ("mlp", "mean"):
            raise ValueError(f"compress must be 'mlp' or 'mean', got {self.compress!r}")
        h = self.compress_hidden
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"compress_hidden must be a positive int or None, got {h!r}")
        if self.backend not in (None, "torch", "cpu", "triton"):
            raise ValueError(f"backend must be 'torch', 'cpu', 'triton' or None, got {self.backend!r}")
        branches = tuple(self.branches)
        if not branches or len(set(branches)) != len(branches) or not set(branches) <= set(BRANCHES):
            raise ValueError(f"branches must be a non-empty subset of {list(BRANCHES)} without repeats, "
                             f"got {list(branches)}")
        gi = tuple(self.gate_init)
        if len(gi) != 3 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1 for p in gi):
            raise ValueError(f"gate_init must be 3 gate values (cmp, slc, win) strictly between 0 and 1, got {gi!r}")
        s = self.gate_weight_scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0):
            raise ValueError(f"gate_weight_scale must be a positive number or None, got {s!r}")
        w = self.select_distill
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
            raise ValueError(f"select_distill must be a finite number >= 0, got {w!r}")
        if w > 0 and "slc" not in branches:
            raise ValueError(f"select_distill > 0 trains the block selection: it needs the slc branch, "
                             f"got branches {list(branches)}")
        free = self.num_select - self.num_init - self.num_local
        if w > 0 and free < 2:
            # the loss compares two distributions over the freely chosen blocks: over one block both are 1
            raise ValueError(f"select_distill > 0 needs at least 2 freely chosen blocks, got num_select - num_init "
                             f"- num_local = {free}: with fewer the loss ranks nothing and is always 0")


class BlockCompressor(nn.Module):
    """phi: a block of ``l`` tokens ``[..., l, D]`` -> one token ``[..., D]``.

    ``"mlp"``: ``Linear(l*D -> h) -> SiLU -> Linear(h -> D)`` applied to the
    flattened block plus a learned intra-block position embedding ``pe [l, D]``;
    weights shared across KV heads. ``"mean"``: parameter-free mean over the block.
    ``out_bias=False`` for keys: a bias shared by every compressed key shifts all of
    a query's scores equally, which softmax ignores, so it could never learn.
    """

    def __init__(self, block_len: int, dim: int, hidden: int | None, mode: str, out_bias: bool = True):
        super().__init__()
        self.block_len, self.dim, self.mode = block_len, dim, mode
        if mode == "mlp":
            h = hidden or dim
            self.pe = nn.Parameter(torch.zeros(block_len, dim))
            self.fc1 = nn.Linear(block_len * dim, h)
            self.act = nn.SiLU()
            self.fc2 = nn.Linear(h, dim, bias=out_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pe = 0 (blocks start as raw keys); fc1/fc2 ~ N(0, fan_in^-1/2) so a block of
        unit-variance keys gives compressed keys of about unit variance; biases 0."""
        if self.mode != "mlp":
            return
        nn.init.zeros_(self.pe)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=fc.in_features ** -0.5)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return blocks.mean(-2)
        x = (blocks + self.pe.to(blocks.dtype)).flatten(-2)
        return self.fc2(self.act(self.fc1(x)))


def _padded_documents(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For the documents of a packed row: ``index [N, L]`` (the packed position of each
    document's token ``j``, clamped) and ``valid [N, L]`` (``j`` < its length), ``L`` the longest;
    ``None`` for a single document or when ``N * L`` exceeds ``PAD_DOCUMENTS_MAX_FILL * total``."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    lengths, starts = lengths[lengths > 0], cu[:-1][lengths > 0]
    N = lengths.numel()
    L = int(lengths.max()) if N else 0
    if N < 2 or N * L > PAD_DOCUMENTS_MAX_FILL * total:
        return None
    j = torch.arange(L, device=cu.device)
    index = (starts[:, None] + j).clamp(max=total - 1)
    return index, j < lengths[:, None]


class NSAAttention(nn.Module):
    """Native Sparse Attention: ``y = W_o( sum_c g_c * Attn_c(q, K_c, V_c) )``, c in {cmp, slc, win}.

    ``forward(x [B,T,C], cos, sin [B,T,Dk//2], cu_seqlens=None, cache=None) -> y [B,T,C]``.

    Init (``reset_parameters``): q/k/v ~ N(0, C^-1/2) and out ~ N(0, (H*Dv)^-1/2)
    (unit-variance in, unit-variance out); the gate weight is 0 and its bias
    ``logit(cfg.gate_init)``, so each branch's gate starts at its ``gate_init`` for every
    token. Gate logits are ``bias + gate_weight_scale * (W x)`` (see :class:`NSAConfig`).
    """

    def __init__(self, cfg: NSAConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        H, Hkv, Dk, Dv, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.hidden_size
        self.branches_kv = 1 if cfg.share_kv else 3
        self.q_proj = nn.Linear(C, H * Dk, bias=False)
        self.kv_proj = nn.Linear(C, self.branches_kv * Hkv * (Dk + Dv), bias=False)
        self.gate_proj = nn.Linear(C, 3 * H, bias=True)
        self.o_proj = nn.Linear(H * Dv, C, bias=False)
        self.compress_k = BlockCompressor(cfg.block_len, Dk, cfg.compress_hidden, cfg.compress, out_bias=False)
        self.compress_v = BlockCompressor(cfg.block_len, Dv, cfg.compress_hidden, cfg.compress)
        self.scale = Dk ** -0.5
        self._gates: torch.Tensor | None = None  # [B|1, T|1, H, 3], last forward's gates (detached)
        # diagnostics (eval.retrieval): with keep_selection, a forward over a whole sequence (no
        # cu_seqlens, no cache) keeps its selected blocks, [B, T, Hkv, n] int (-1: none), and the
        # queries and compressed keys they were picked from (q [B, T, H, Dk] with RoPE, k_cmp
        # [B, N, Hkv, Dk])
        self.keep_selection = False
        self.last_selection: torch.Tensor | None = None
        self.last_selection_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        # training with cfg.select_distill > 0: this forward's selection-distillation loss (already
        # weighted; the model adds it to its loss) and its unweighted mean KL (detached, for logging);
        # None otherwise. _distill_terms: (kl, valid) [B|N, T|L, Hkv] while the forward runs
        self.aux_loss: torch.Tensor | None = None
        self.last_select_kl: torch.Tensor | None = None
        self._distill_terms: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.kv_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        self.reset_gates(BRANCHES)
        self.compress_k.reset_parameters()
        self.compress_v.reset_parameters()

    @torch.no_grad()
    def reset_gates(self, branches) -> None:
        """Restart the gates of ``branches`` (names from ``BRANCHES``) at ``cfg.gate_init``: weight
        rows 0, bias ``logit(gate_init)`` in every head; the other gates keep their weights."""
        unknown = sorted(set(branches) - set(BRANCHES))
        if unknown:
            raise ValueError(f"unknown branches {unknown}; expected some of {list(BRANCHES)}")
        H = self.cfg.num_heads
        w, b = self.gate_proj.weight.view(H, 3, -1), self.gate_proj.bias.view(H, 3)  # head-major rows
        for c, name in enumerate(BRANCHES):
            if name in branches:
                w[:, c].zero_()
                p = float(self.cfg.gate_init[c])
                b[:, c].fill_(math.log(p / (1.0 - p)))  # logit(p), in float64 before the cast

    @property
    def gate_weight_scale(self) -> float:
        """The gate weight's scale ``s`` in ``sigmoid(b + s * W x)``: ``cfg.gate_weight_scale``, or
        ``1 / hidden_size`` when that is None."""
        s = self.cfg.gate_weight_scale
        return s if s is not None else 1.0 / self.cfg.hidden_size

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B,T,C]`` -> gates ``[B,T,H,3]`` (cmp, slc, win), ``sigmoid(b + s * W x)``."""
        B, T, _ = x.shape
        logits = torch.addmm(self.gate_proj.bias, x.reshape(B * T, -1), self.gate_proj.weight.t(),
                             alpha=self.gate_weight_scale)
        return torch.sigmoid(logits).view(B, T, self.cfg.num_heads, 3)

    @property
    def last_gate_means(self) -> dict[str, torch.Tensor]:
        """Mean gate of each kept branch in the last forward (``{"g_cmp": 0-d tensor, ...}``), for
        logging. A forward keeps its gates averaged over rows and positions, a one-token decode step
        its gates as they are; the mean over heads is taken only when read."""
        if self._gates is None:
            return {}
        kept = [b for b in BRANCHES if b in self.cfg.branches]
        g = self._gates
        if len(kept) < 3:
            g = g[..., [BRANCHES.index(b) for b in kept]]
        means = g.float().mean((0, 1, 2))
        return {f"g_{b}": means[i] for i, b in enumerate(kept)}

    # ------------------------------------------------------------------ pieces

    def _branch_kv(self, x, cos, sin) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-branch ``(k [B,T,Hkv,Dk] with RoPE, v [B,T,Hkv,Dv])``; shared tensors if share_kv.
        With ``cmp_rope="block"`` the compressed branch's keys come without RoPE (it is applied after phi)."""
        cfg = self.cfg
        B, T, _ = x.shape
        Hkv, Dk, Dv = cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v
        kv = self.kv_proj(x).view(B, T, self.branches_kv * Hkv, Dk + Dv)
        k_raw, v = kv.split((Dk, Dv), dim=-1)
        k = apply_rotary(k_raw, cos, sin)  # every branch's keys in one rotation
        out = [(k[:, :, i * Hkv:(i + 1) * Hkv], v[:, :, i * Hkv:(i + 1) * Hkv]) for i in range(self.branches_kv)]
        if cfg.share_kv:
            out = out * 3
        kv = dict(zip(("cmp", "slc", "win"), out, strict=True))
        if cfg.cmp_rope == "block":
            kv["cmp"] = (k_raw[:, :, :Hkv], kv["cmp"][1])
        if self._distills():
            # the compressed branch's keys again, from a detached x: the selection distillation trains
            # the key projection and phi, never the residual stream below (as DeepSeek-V3.2 keeps its
            # indexer's loss off the model). Through x (weight 1) it set the retrieval probe's
            # language-model loss at step 60 to 3.96, against 2.62 with x detached, 1.95 without it
            # (the module itself, not its weight's rows: ZeRO-3 promises a weight whole only inside its
            # module's forward)
            k_det = self.kv_proj(x.detach()).view(B, T, self.branches_kv * Hkv, Dk + Dv)[:, :, :Hkv, :Dk]
            if cfg.cmp_rope != "block":
                k_det = apply_rotary(k_det, cos, sin)
            kv["distill"] = (k_det, kv["cmp"][1].detach())
        return kv

    def _distills(self) -> bool:
        """Whether this forward trains the selection distillation (``cfg.select_distill``)."""
        return self.cfg.select_distill > 0 and self.training and torch.is_grad_enabled()

    def compress(self, kb: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``kb [..., l, Dk]``, ``vb [..., l, Dv]`` -> compressed ``[..., Dk]``, ``[..., Dv]``."""
        return self.compress_k(kb), self.compress_v(vb)

    def _compressed_kv(self, k, v, cu_seqlens, rope):
        """Compressed K/V from raw ``k, v [B,T,Hkv,D]``: block ``i`` = tokens ``[i*d, i*d + l)``.

        Without ``cu_seqlens``: ``[B, N, Hkv, D]`` via unfold. With it: per document,
        never straddling a boundary, packed as ``[1, sum N_doc, Hkv, D]`` in
        ``nsa.compressed_cu_seqlens`` order. ``rope = (cos, sin) [B,T,Dk//2]``: with
        ``cmp_rope="block"`` each compressed key is rotated as its block's last token.
        """
        l, d = self.cfg.block_len, self.cfg.stride
        B, T, Hkv = k.shape[:3]
        if cu_seqlens is None:
            if T < l:
                return self.compress(k.new_zeros(B, 0, Hkv, l, k.shape[-1]), v.new_zeros(B, 0, Hkv, l, v.shape[-1]))
            kb = k.unfold(1, l, d).transpose(-1, -2)  # [B, N, Hkv, l, Dk]
            vb = v.unfold(1, l, d).transpose(-1, -2)
            k_cmp, v_cmp = self.compress(kb, vb)
            last = torch.arange(l - 1, T, d, device=k.device)[:k_cmp.shape[1]]
            return self._rotate_blocks(k_cmp, rope, last), v_cmp
        cu_cmp = nsa.compressed_cu_seqlens(cu_seqlens, l, d).to(torch.int64)
        counts = cu_cmp[1:] - cu_cmp[:-1]
        total = int(cu_cmp[-1])
        doc = torch.repeat_interleave(torch.arange(counts.numel(), device=k.device), counts.to(k.device),
                                      output_size=total)
        block = torch.arange(total, device=k.device) - cu_cmp.to(k.device)[doc]
        start = cu_seqlens.to(k.device, torch.int64)[doc] + block * d
        tok = start[:, None] + torch.arange(l, device=k.device)  # [total, l]
        kb = k[0, tok].transpose(1, 2).unsqueeze(0)  # [1, total, Hkv, l, Dk]
        vb = v[0, tok].transpose(1, 2).unsqueeze(0)
        k_cmp, v_cmp = self.compress(kb, vb)
        return self._rotate_blocks(k_cmp, rope, tok[:, -1]), v_cmp

    def _cache_compress(self, cos, sin, s: int, m: int):
        """The ``compress`` a cache calls when ``m`` new tokens (positions ``s .. s+m-1``, angles
        ``cos/sin [B,m,Dk//2]``) complete blocks: phi, and with ``cmp_rope="block"`` the rotation of
        each new compressed key as its block's last token, which is always one of the new tokens."""
        if self.cfg.cmp_rope != "block":
            return self.compress
        l, d = self.cfg.block_len, self.cfg.stride

        def compress(kb, vb):
            k_cmp, v_cmp = self.compress(kb, vb)
            n, n_total = kb.shape[1], (s + m - l) // d + 1  # the n newest of n_total complete blocks
            last = torch.arange(n_total - n, n_total, device=kb.device) * d + (l - 1 - s)
            return self._rotate_blocks(k_cmp, (cos, sin), last), v_cmp

        return compress

    def _rotate_blocks(self, k_cmp, rope, last):
        """``cmp_rope="block"``: rotate compressed keys ``[B, N, Hkv, Dk]`` by the angles of their
        blocks' last tokens (packed positions ``last [N]`` into ``rope = (cos, sin) [B, T, Dk//2]``,
        so per-document positions and scaled RoPE carry over); unchanged otherwise."""
        if self.cfg.cmp_rope != "block":
            return k_cmp
        cos, sin = rope
        return apply_rotary(k_cmp, cos[:, last], sin[:, last])

    def _attend(self, q, kv, g, cu_seqlens, rope):
        """The gated sum of the branch outputs ``o [B,T,H,Dv]`` over the full sequence, via
        :func:`nsa.native_sparse_attention` (gates ``g [B,T,H,3]``), and the compressed K/V."""
        cfg = self.cfg
        if cu_seqlens is not None and resolve_backend(cfg.backend, q) != "triton":
            docs = _padded_documents(cu_seqlens, q.shape[1])
            if docs is not None:
                return self._attend_padded(q, kv, g, rope, *docs), None
        compressed = (None, None)
        if "cmp" in cfg.branches or "slc" in cfg.branches:  # selection scores come from the compressed branch
            compressed = self._compressed_kv(*kv["cmp"], cu_seqlens, rope)
        keep = self.keep_selection and cu_seqlens is None
        distill = "distill" in kv
        sel = dict(block_len=cfg.block_len, stride=cfg.stride, select_len=cfg.select_len, num_init=cfg.num_init,
                   num_local=cfg.num_local)
        o, idx = nsa.native_sparse_attention(
            q, *compressed, *kv["slc"], *kv["win"], g, num_select=cfg.num_select, window=cfg.window,
            branches=cfg.branches, cu_seqlens=cu_seqlens, backend=cfg.backend, return_selection=keep or distill, **sel)
        if keep:
            self.last_selection = idx.detach()
            self.last_selection_inputs = (q.detach(), compressed[0].detach())
        if distill:
            k_cmp = self._compressed_kv(*kv["distill"], cu_seqlens, rope)[0]
            self._distill_terms = selection_distill(q, k_cmp, kv["slc"][0], idx, scale=self.scale,
                                                    cu_seqlens=cu_seqlens, **sel)
        return o, (compressed if compressed[0] is not None else None)  # None lets a cache prefill build its own

    def _attend_padded(self, q, kv, g, rope, index, valid):
        """Packed documents (``[1, T, ...]``) as one batch: document ``i`` is row ``i`` of
        ``[N, L, ...]`` (``index``/``valid [N, L]`` from :func:`_padded_documents`), then the outputs
        are packed back. Same result as one document at a time: every op is causal and the
        padding only follows a document's last token, so no real query sees it (a compressed block
        that reaches into it ends after every real token); padded queries' outputs are dropped, so
        no gradient flows from them. The torch ops then run a few batched calls per layer instead
        of a few per document (many short documents: ~1.6x faster training step on a CPU)."""
        N, L = index.shape
        flat, keep = index.reshape(-1), valid.reshape(-1)

        def pad(x):  # [1, T, H, D] -> [N, L, H, D], zeros after each document
            return (x[0].index_select(0, flat) * keep[:, None, None].to(x.dtype)).view(N, L, *x.shape[2:])

        kv_p = {b: (pad(k), pad(v)) for b, (k, v) in kv.items()}
        rope_p = tuple(pad(r.unsqueeze(2)).squeeze(2) for r in rope)
        o, _ = self._attend(pad(q), kv_p, pad(g), None, rope_p)
        if self._distill_terms is not None:  # padded queries count for nothing
            kl, ok = self._distill_terms
            self._distill_terms = (kl, ok & valid[..., None])
        return o.reshape(N * L, *o.shape[2:])[keep].unsqueeze(0)

    def _decode(self, q, kv, cos, sin, cache: NSACache):
        """Branch outputs ``[B,m,H,Dv]`` for ``m`` new tokens computed from the cache alone (``None`` for
        a branch that ``cfg.branches`` leaves out)."""
        cfg = self.cfg
        B, m, H, _ = q.shape
        Hkv = cfg.num_kv_heads
        s = cache.length
        pos = torch.arange(s, s + m, device=q.device)
        qg = q.float().view(B, m, Hkv, H // Hkv, -1)
        if m == 1:  # one token: attend in place over the cache's head-major buffers
            cache.append(kv, self._cache_compress(cos, sin, s, m))
            o = decode_token(qg[:, 0], cache, self.scale, num_select=cfg.num_select, num_init=cfg.num_init,
                             num_local=cfg.num_local, branches=cfg.branches)
            return tuple(o[b].reshape(B, 1, H, -1).to(q.dtype) if b in o else None for b in BRANCHES)
        # window first: it reads the ring as it was before the new tokens overwrite slots
        kw, vw, kpos = cache.window_state()
        k_new, v_new = kv["win"]
        o_win = decode_window(qg, torch.cat((kw, k_new.to(kw.dtype)), 1), torch.cat((vw, v_new.to(vw.dtype)), 1),
                              torch.cat((kpos, pos)), pos, cfg.window, self.scale)
        cache.append(kv, self._cache_compress(cos, sin, s, m))
        o_cmp = o_slc = None
        if "cmp" in cfg.branches or "slc" in cfg.branches:
            o_cmp, p = decode_compressed(qg, cache, pos, self.scale)
        if "slc" in cfg.branches:
            idx = decode_select(p, cache, pos, num_select=cfg.num_select, num_init=cfg.num_init,
                                num_local=cfg.num_local)
            o_slc = decode_selected(qg, cache, pos, idx, self.scale)
        return tuple(o if o is None else o.reshape(B, m, H, -1).to(q.dtype) for o in (o_cmp, o_slc, o_win))

    def _decode_step_cpu(self, x, cos, sin, cache: NSACache) -> torch.Tensor:
        """One-token step on the fused CPU op (``nsa.ops.decode_cpu``): the projections, then RoPE and
        cache write in one call, attention, gates and their sum in another; same result as the torch path."""
        cfg = self.cfg
        q, kv = self.q_proj(x), self.kv_proj(x)  # [B, 1, H*Dk], [B, 1, nb*Hkv*(Dk+Dv)]
        s = cache.length
        decode_cpu.rope_store(q, kv, cos, sin, cache, self.branches_kv, rotate_cmp=cfg.cmp_rope == "tokens")
        cache.commit_one(self._cache_compress(cos, sin, s, 1))
        gate = (x, self.gate_proj.weight, self.gate_proj.bias, self.gate_weight_scale)
        _, _, o, self._gates = decode_cpu.attend(q, cache, self.scale, num_select=cfg.num_select,
                                                 num_init=cfg.num_init, num_local=cfg.num_local,
                                                 branches=cfg.branches, gates=gate)  # o [B, 1, H*Dv]
        return self.o_proj(o)

    # ------------------------------------------------------------------ public

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype = torch.float32) -> NSACache:
        """An empty decoding state for ``batch_size`` rows of up to ``max_len`` tokens."""
        cfg = self.cfg
        return NSACache(batch_size=batch_size, max_len=max_len, num_kv_heads=cfg.num_kv_heads,
                        head_dim_k=cfg.head_dim_k, head_dim_v=cfg.head_dim_v, block_len=cfg.block_len,
                        stride=cfg.stride, select_len=cfg.select_len, window=cfg.window, device=device,
                        dtype=dtype)

    def _check_inputs(self, x, cos, sin, cu_seqlens, cache) -> None:
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"NSAAttention: x must be [B, T, {cfg.hidden_size}], got {tuple(x.shape)}")
        want = (*x.shape[:2], cfg.head_dim_k // 2)
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"NSAAttention: cos/sin must be [B, T, head_dim_k//2] = {want}, "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("NSAAttention: cu_seqlens and cache cannot be combined (decode rows share a length)")
            if not isinstance(cache, NSACache):
                raise ValueError(f"NSAAttention: cache must be an NSACache, got {type(cache).__name__}")
            if x.shape[0] != cache.batch_size:
                raise ValueError(f"NSAAttention: x has {x.shape[0]} rows, cache has {cache.batch_size}")
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
                raise ValueError("NSAAttention: cu_seqlens must be a 1-D int32 tensor [N+1]")
            if x.shape[0] != 1:
                raise ValueError(f"NSAAttention: cu_seqlens requires B == 1 (packed row), got B={x.shape[0]}")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: NSACache | None = None) -> torch.Tensor:
        """``x [B,T,C]``, ``cos/sin [B,T,Dk//2]`` for the positions of ``x`` -> ``y [B,T,C]``.

        With ``cache``: ``x`` holds only the new tokens. An empty cache is
        prefilled by the full (kernel) path; a non-empty one is extended and
        the new tokens attend to it through the dense decode path.
        """
        self._check_inputs(x, cos, sin, cu_seqlens, cache)
        cfg = self.cfg
        B, T, _ = x.shape
        H = cfg.num_heads
        if T == 1 and cache is not None and cache.length > 0 and decode_cpu.usable(x, cache):
            return self._decode_step_cpu(x, cos, sin, cache)
        q = apply_rotary(self.q_proj(x).view(B, T, H, cfg.head_dim_k), cos, sin)
        kv = self._branch_kv(x, cos, sin)
        g = self.gates(x)
        self._gates = g.detach().float().mean((0, 1), keepdim=True)  # [1, 1, H, 3]: not B*T*H*3 per layer
        self.aux_loss = self.last_select_kl = self._distill_terms = None
        if cache is not None and cache.length > 0:
            outs = self._decode(q, kv, cos, sin, cache)
            o = gated_sum(outs, g, cfg.branches)
        else:
            o, compressed = self._attend(q, kv, g, cu_seqlens, (cos, sin))
            if self._distill_terms is not None:
                kl, valid = self._distill_terms
                self._distill_terms = None
                mean_kl = (kl * valid).sum() / valid.sum().clamp_min(1)
                self.aux_loss, self.last_select_kl = cfg.select_distill * mean_kl, mean_kl.detach()
            if cache is not None:
                cache.append(kv, self._cache_compress(cos, sin, 0, T), compressed=compressed)
        return self.o_proj(o.reshape(B, T, H * cfg.head_dim_v))
