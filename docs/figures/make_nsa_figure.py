"""Draw which keys each query reads in NSA's three branches (README figure).

    .venv/bin/python docs/figures/make_nsa_figure.py   ->  docs/figures/nsa_branches.png

Computed with the library itself (torch backend) on one random head, T=320, with small
settings (l=16, d=8, l'=32, n=5, w=32), so the picture is the algorithm, not a sketch:
compressed branch = probability mass of each visible compressed block spread over its
tokens; selected branch = the tokens of the blocks ``select_blocks`` chose (causal);
sliding window = the last w tokens.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import nsa  # noqa: E402

T, D, L, S, LS, N, W = 320, 16, 16, 8, 32, 5, 32


def main() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, T, 1, D, generator=g)
    k = torch.randn(1, T, 1, D, generator=g)
    v = torch.randn(1, T, 1, D, generator=g)
    nc = (T - L) // S + 1
    k_cmp = k[0, : (nc - 1) * S + L, 0].unfold(0, L, S).mean(-1)[None, :, None]  # mean-pooled blocks
    v_cmp = v[0, : (nc - 1) * S + L, 0].unfold(0, L, S).mean(-1)[None, :, None]
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, block_len=L, stride=S, backend="torch")
    p = torch.exp(q[0, :, 0] @ k_cmp[0, :, 0].T * D**-0.5 - lse[0, :, 0, None]).nan_to_num(0.0)
    t = torch.arange(T)
    visible = (torch.arange(nc)[None] * S + L - 1) <= t[:, None]
    p = p * visible
    cmp = torch.zeros(T, T)
    for i in range(nc):  # spread block i's probability over its l tokens
        cmp[:, i * S : i * S + L] += p[:, i : i + 1] / (L // S)
    idx = nsa.select_blocks(q, k_cmp, block_len=L, stride=S, select_len=LS, num_select=N, backend="torch")
    slc = torch.zeros(T, T)
    for j in range(T // LS + 1):
        chosen = (idx[0, :, 0] == j).any(-1)
        slc[chosen, j * LS : (j + 1) * LS] = 1.0
    causal = t[None] <= t[:, None]
    slc = slc[:, :T] * causal
    win = (causal & (t[None] > t[:, None] - W)).float()
    panels = [("compressed (coarse, global)", cmp, "Blues"), ("selected top-n blocks (fine)", slc, "Oranges"),
              ("sliding window (local)", win, "Greens")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (title, m, cmap) in zip(axes, panels, strict=True):
        shown = (m / m.amax(1, keepdim=True).clamp_min(1e-12)) ** 0.5  # per query, so late rows stay visible
        ax.imshow(shown.numpy(), cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xlabel("key position")
    axes[0].set_ylabel("query position")
    fig.suptitle(f"NSA: keys read per query, T={T}, l={L}, d={S}, l'={LS}, n={N}, w={W} (computed with nsa/)")
    fig.tight_layout()
    out = Path(__file__).with_name("nsa_branches.png")
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
