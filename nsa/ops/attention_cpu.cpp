// NSA's three attention branches over whole sequences on the CPU, float32, forward and backward:
// the "cpu" backend (nsa/ops/<op>/cpu.py, nsa/ops/attention_cpu.py; the torch references in
// nsa/ops/<op>/reference.py are the oracle). Built at first use by nsa/ops/cpu_build.py.
//
// Every branch is attention of query t over a few contiguous key spans:
//   window      [max(0, t - w + 1), t]
//   selected    the tokens s <= t of each selected block [j l', (j + 1) l')  (-1, repeated and
//               non-causal indices ignored)
//   compressed  compressed blocks [0, nvis(t)), nvis(t) = floor((t + 1 - l) / d) + 1 (0 if t + 1 < l)
// so one kernel does all three. Work unit: a group of queries of one KV head, their G query heads
// together (the paper's group-centric order): the selected branch one query at a time over its
// blocks; the window and compressed branches QG consecutive queries over the union of their
// ranges, each row masking the few keys outside its own (see group_spans). Scores are built span
// by span into a row buffer, softmaxed once, then multiplied by V span by span; no gathered copies
// of K/V. The compressed branch also picks the selected blocks from its own probabilities
// (nsa/ops/select_blocks/reference.py: overlap weighting, forced blocks, top-n, ties to the lower
// index), as compressed_attention_and_select does.
//
// Entry points: forward / backward for one branch (nsa.compressed_attention, selected_attention,
// sliding_window_attention, compressed_attention_and_select), and nsa_forward / nsa_backward for
// the three at once, gated and summed (nsa.native_sparse_attention): per query block the compressed
// branch selects, the selected branch reads that selection, and o = sum_c gate_c o_c is written
// once, with no per-branch output tensor.
//
// Backward per query: scores and dP = dO V^T recomputed, and P with them, by the forward's own
// softmax (its row max and sum come back with the scores, so no lse is kept), delta = rowsum(P * dP)
// (equal to rowsum(dO * O), so O is not needed; it is also the gate's gradient), dS = gate P
// (dP - delta + dlse); dQ rows written once, dK / dV rows accumulated. The fused backward also
// selects the blocks again from the recomputed compressed probabilities, in the forward's query
// groups, so the same bits give the same selection and the forward keeps nothing but its output.
// Threads take whole (batch, KV head) pairs when there are enough of them (nothing shared);
// otherwise each part of a pair's queries accumulates into its own buffer, summed at the end.
//
// Layouts (contiguous): q, dO [B, T, H, D] (the G heads of a group are adjacent rows); K, V as
// given, k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] (a head's key rows Hkv D apart: no copies); transposed
// in tiles of TW keys, kT
// [B, Hkv, NT, Dk, TW], vT [B, Hkv, NT, Dv, TW] with NT >= S / TW + 1 (a span's scores read one
// contiguous [D, TW] tile at a time, and whole vectors past a span's end stay inside the
// tensor); lse [B, T, H] (one branch's output).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_vec.h"

namespace {

using at::Tensor;
using namespace nsa_cpu;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t TW = 64;  // keys per tile of the transposed K / V (nsa/ops/attention_cpu.py)
enum Mode : int64_t { kWindow = 0, kSelected = 1, kCompressed = 2 };

// ---------------------------------------------------------------------------------------------- gemm

// Y[r][0 : CB W] = alpha * sum_{i < m} A[r ars + i acs] X[i ldx + (0 : CB W)]  (+ Y if ACC), r < R:
// the R x CB accumulators stay in registers, each X vector is used R times.
template <int R, int CB, bool ACC>
NSA_INLINE void gemm_tile(const float* A, int64_t ars, int64_t acs, const float* X, int64_t ldx, int64_t m,
                          float* Y, int64_t ldy, float alpha) {
  vf acc[R][CB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = vf{};
  for (int64_t i = 0; i < m; ++i) {
    vf x[CB];
    for (int c = 0; c < CB; ++c) x[c] = load(X + i * ldx + c * W);
    for (int r = 0; r < R; ++r) {
      const vf a = splat(A[r * ars + i * acs]);
      for (int c = 0; c < CB; ++c) acc[r][c] += a * x[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) {
      float* y = Y + r * ldy + c * W;
      vf v = acc[r][c] * alpha;
      if constexpr (ACC) v += load(y);
      store(y, v);
    }
}

// the same for the last nt < W columns; XPAD: X rows may be read a whole vector past them
template <int R, bool ACC, bool XPAD>
NSA_INLINE void gemm_tail(const float* A, int64_t ars, int64_t acs, const float* X, int64_t ldx, int64_t m,
                          float* Y, int64_t ldy, float alpha, int64_t nt) {
  vf acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vf{};
  float xb[W] = {};
  for (int64_t i = 0; i < m; ++i) {
    vf x;
    if constexpr (XPAD) {
      x = load(X + i * ldx);
    } else {
      std::memcpy(xb, X + i * ldx, nt * sizeof(float));
      x = load(xb);
    }
    for (int r = 0; r < R; ++r) acc[r] += splat(A[r * ars + i * acs]) * x;
  }
  for (int r = 0; r < R; ++r) {
    float* y = Y + r * ldy;
    for (int64_t c = 0; c < nt; ++c) y[c] = ACC ? y[c] + alpha * acc[r][c] : alpha * acc[r][c];
  }
}

template <int R, bool ACC, bool XPAD>
NSA_INLINE void gemm_rows(const float* A, int64_t ars, int64_t acs, const float* X, int64_t ldx, int64_t m, float* Y,
                          int64_t ldy, int64_t N, float alpha) {
  int64_t j = 0;
  for (; j + kTileVecs * W <= N; j += kTileVecs * W)
    gemm_tile<R, kTileVecs, ACC>(A, ars, acs, X + j, ldx, m, Y + j, ldy, alpha);
  switch ((N - j) / W) {  // fewer than kTileVecs vectors left
    case 3: gemm_tile<R, 3, ACC>(A, ars, acs, X + j, ldx, m, Y + j, ldy, alpha), j += 3 * W; break;
    case 2: gemm_tile<R, 2, ACC>(A, ars, acs, X + j, ldx, m, Y + j, ldy, alpha), j += 2 * W; break;
    case 1: gemm_tile<R, 1, ACC>(A, ars, acs, X + j, ldx, m, Y + j, ldy, alpha), j += W; break;
    default: break;
  }
  if (j < N) gemm_tail<R, ACC, XPAD>(A, ars, acs, X + j, ldx, m, Y + j, ldy, alpha, N - j);
}

// Y [M, N] (row stride ldy) = alpha * A X (+ Y if ACC): A [M, m] read as A[r ars + i acs] (so a
// transposed operand is just other strides), X [m, N] row-major (row stride ldx); kTileRows rows at
// a time (cpu_vec.h), then the rows left
template <bool ACC, bool XPAD = false>
void gemm(const float* A, int64_t ars, int64_t acs, const float* X, int64_t ldx, int64_t m, float* Y, int64_t ldy,
          int64_t M, int64_t N, float alpha) {
  constexpr int RT = kTileRows;
  int64_t r = 0;
  for (; r + RT <= M; r += RT) gemm_rows<RT, ACC, XPAD>(A + r * ars, ars, acs, X, ldx, m, Y + r * ldy, ldy, N, alpha);
  const float* Ar = A + r * ars;
  float* Yr = Y + r * ldy;
  switch (M - r) {
    case 5: gemm_rows<5, ACC, XPAD>(Ar, ars, acs, X, ldx, m, Yr, ldy, N, alpha); break;
    case 4: gemm_rows<4, ACC, XPAD>(Ar, ars, acs, X, ldx, m, Yr, ldy, N, alpha); break;
    case 3: gemm_rows<3, ACC, XPAD>(Ar, ars, acs, X, ldx, m, Yr, ldy, N, alpha); break;
    case 2: gemm_rows<2, ACC, XPAD>(Ar, ars, acs, X, ldx, m, Yr, ldy, N, alpha); break;
    case 1: gemm_rows<1, ACC, XPAD>(Ar, ars, acs, X, ldx, m, Yr, ldy, N, alpha); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------- spans

struct Args {  // one branch's inputs and settings
  const float *q, *k, *kT, *v, *vT, *dout, *dlse;
  const int32_t* idx;
  int32_t* sel;  // the compressed branch: where it writes the selected blocks (null: it does not select)
  int64_t B, T, S, NT, H, Hkv, G, Dk, Dv, n;  // NT: tiles of kT / vT; n: width of idx
  int64_t mode, w, ls, l, d, num_select, num_init, num_local;
  float scale;
  // idx / sel hold the rows of queries [sel_t0, sel_t0 + QB) of one (b, h) only (a task's own
  // buffer, [QB, width]) instead of the whole [B, T, Hkv, width]: the fused op's selection when
  // nothing keeps it
  bool sel_local;
  int64_t sel_t0;
};

constexpr int64_t QB = 16;  // queries per task of the fused op (and per block of a backward part)

// offset of query t's row (KV head h of row b) in a selection of the given width (see Args)
NSA_INLINE int64_t sel_row(const Args& a, int64_t b, int64_t h, int64_t t, int64_t width) {
  return a.sel_local ? (t - a.sel_t0) * width : ((b * a.T + t) * a.Hkv + h) * width;
}

// the selected branch's key spans [st[e], st[e] + ln[e]) of query t in KV head h of row b (its
// blocks, cut at t, ascending, adjacent ones merged); returns their count
int64_t selected_spans(const Args& a, int64_t b, int64_t h, int64_t t, int64_t* st, int64_t* ln) {
  const int32_t* ix = a.idx + sel_row(a, b, h, t, a.n);
  const int64_t cur = t / a.ls;
  int64_t c = 0;
  for (int64_t e = 0; e < a.n; ++e) {
    const int64_t j = ix[e];
    bool skip = j < 0 || j > cur;
    for (int64_t f = 0; f < e && !skip; ++f) skip = ix[f] == j;
    if (skip) continue;
    int64_t pos = c++;  // insert in ascending order of start
    for (; pos > 0 && st[pos - 1] > j * a.ls; --pos) st[pos] = st[pos - 1], ln[pos] = ln[pos - 1];
    st[pos] = j * a.ls, ln[pos] = std::min(a.ls, t + 1 - st[pos]);
  }
  // adjacent blocks (the local ones always, the initial ones often) become one span: fewer,
  // longer matmuls, which matters most for short blocks
  int64_t m = 0;
  for (int64_t e = 0; e < c; ++e) {
    if (m > 0 && st[m - 1] + ln[m - 1] == st[e]) {
      ln[m - 1] += ln[e];
    } else {
      st[m] = st[e], ln[m] = ln[e], ++m;
    }
  }
  return m;
}

// the longest span list's total length: the width of a query's score row
int64_t max_keys(const Args& a) {
  if (a.mode == kWindow) return std::min(a.w, a.T);
  if (a.mode == kCompressed) return a.S;
  return std::min(a.n * a.ls, a.T);
}

// scores s[r][0:n] = scale q[r] . K[keys of the spans] for M rows q [M, D] (stride D), s stride ld;
// kt: the (b, h) pair's tiled K^T [NT, D, TW]; columns [n, n rounded up to W) are set to pad
int64_t span_scores(const float* q, int64_t M, int64_t D, const float* kt, int64_t ns, const int64_t* st,
                    const int64_t* ln, float* s, int64_t ld, float scale, float pad) {
  int64_t n = 0;
  for (int64_t e = 0; e < ns; ++e)
    for (int64_t pos = st[e], end = st[e] + ln[e]; pos < end;) {  // one tile at a time
      const int64_t off = pos % TW, len = std::min(end - pos, TW - off);
      gemm<false, true>(q, D, 1, kt + (pos / TW) * D * TW + off, TW, D, s + n, ld, M, len, scale);
      n += len, pos += len;
    }
  const int64_t nr = (n + W - 1) / W * W;
  for (int64_t r = 0; r < M; ++r) std::fill(s + r * ld + n, s + r * ld + nr, pad);
  return n;
}

// Row groups. The selected branch takes one query at a time (its G rows; its spans are its own
// blocks). The window and compressed branches take QG consecutive queries at once (QG G rows): the
// ranges of neighbouring queries overlap almost entirely, so the group reads their union once, as
// one span, and each row masks the few columns outside its own range; its matmuls then have QG
// times more rows per K/V tile (and dK / dV updates QG times more rows per read-modify-write).
constexpr int64_t QG = 16;

int64_t group_size(const Args& a, int64_t t0, int64_t t_end) {
  return a.mode == kSelected ? 1 : std::min(QG, t_end - t0);
}

// the keys [lo, hi) query t sees in the window / compressed branch
NSA_INLINE void own_range(const Args& a, int64_t t, int64_t& lo, int64_t& hi) {
  if (a.mode == kWindow) {
    lo = std::max<int64_t>(0, t - a.w + 1), hi = t + 1;
  } else {
    lo = 0, hi = t + 1 >= a.l ? std::min(a.S, (t + 1 - a.l) / a.d + 1) : 0;
  }
}

// the spans of queries [t0, t0 + Q) (Q > 1: their union, one span); s rows of queries whose own
// range is smaller are masked with -inf (G rows per query, stride ld)
int64_t group_spans(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, int64_t* st, int64_t* ln) {
  if (a.mode == kSelected) return selected_spans(a, b, h, t0, st, ln);  // Q == 1 (group_size)
  int64_t lo, hi, lo1, hi1;
  own_range(a, t0, lo, hi), own_range(a, t0 + Q - 1, lo1, hi1);
  st[0] = lo, ln[0] = hi1 - lo;
  return ln[0] > 0;
}

void mask_group(const Args& a, int64_t t0, int64_t Q, int64_t u0, int64_t n, float* s, int64_t ld) {
  if (a.mode == kSelected) return;
  for (int64_t t = t0; t < t0 + Q; ++t) {
    int64_t lo, hi;
    own_range(a, t, lo, hi);
    lo = std::min(std::max<int64_t>(lo - u0, 0), n), hi = std::min(std::max<int64_t>(hi - u0, lo), n);
    for (int64_t g = 0; g < a.G; ++g) {
      float* x = s + ((t - t0) * a.G + g) * ld;
      std::fill(x, x + lo, kNegInf), std::fill(x + hi, x + n, kNegInf);
    }
  }
}

// ---------------------------------------------------------------------------------------------- forward

// rows g < G of s (n >= 1 columns, -inf up to n rounded to W): s <- exp(s - max) (not normalised:
// the caller scales the row's P @ V by inv[g] = 1 / sum instead of the whole row), lse[g] = max + log(sum)
void softmax_lse(float* s, int64_t G, int64_t n, int64_t ld, float* lse, float* inv) {
  const int64_t nr = (n + W - 1) / W * W;
  for (int64_t g = 0; g < G; ++g) {
    float* x = s + g * ld;
    vf m = splat(kNegInf);
    for (int64_t i = 0; i < nr; i += W) {
      const vf v = load(x + i);
      m = v > m ? v : m;
    }
    float mx = m[0];
    for (int k = 1; k < W; ++k) mx = std::max(mx, m[k]);
    if (mx == kNegInf) {  // a row with no visible key (a masked row of a group): o = 0, lse = -inf
      std::fill(x, x + nr, 0.f);
      lse[g] = kNegInf, inv[g] = 0.f;
      continue;
    }
    vf sum = vf{};
    for (int64_t i = 0; i < nr; i += W) {
      const vf e = vexp(load(x + i) - mx);
      store(x + i, e);
      sum += e;
    }
    float tot = 0.f;
    for (int k = 0; k < W; ++k) tot += sum[k];
    lse[g] = mx + std::log(tot), inv[g] = 1.f / tot;
  }
}

// the selected blocks of query t from its compressed probabilities p [G, nv] (stride ld), as
// nsa/ops/select_blocks/reference.py: group sum, overlap weights, forced blocks, exact top-n with
// ties to the lower index, ascending, -1 after
void select_query(const Args& a, int64_t b, int64_t h, int64_t t, const float* p, int64_t ld, const float* inv,
                  int64_t nv, std::vector<float>& buf, std::vector<int64_t>& top) {
  const int64_t n_sel = t / a.ls + 1, per = a.ls / a.d, span = a.l / a.d, K = n_sel * per;
  const int64_t k = std::min(a.num_select, n_sel);
  buf.resize(K + span + n_sel);
  top.resize(k);
  float* P = buf.data();  // padded: P[span - 1 + i] = group sum of p[:, i]
  std::fill(P, P + K + span - 1, 0.f);
  const int64_t Nk = std::min(nv, K);
  for (int64_t g = 0; g < a.G; ++g)
    for (int64_t i = 0; i < Nk; ++i) P[span - 1 + i] += p[g * ld + i] * inv[g];
  select_top(P, P + K + span, n_sel, per, span, k, a.num_init, a.num_local, top.data());
  int32_t* out = a.sel + sel_row(a, b, h, t, a.num_select);
  for (int64_t e = 0; e < a.num_select; ++e) out[e] = e < k ? static_cast<int32_t>(top[e]) : -1;
}

struct Scratch {
  std::vector<float> s, dp, qb, db, ob, dqb, lse, inv, sel;
  std::vector<int64_t> st, ln, top;
  int64_t ld = 0;
  void init(const Args* const* branches, int64_t count) {
    int64_t keys = 0, n = 1, G = 0, Dk = 0, Dv = 0;
    for (int64_t c = 0; c < count; ++c)
      if (branches[c] != nullptr) {
        const Args& a = *branches[c];
        keys = std::max(keys, max_keys(a) + QG), n = std::max(n, a.n), G = a.G, Dk = a.Dk, Dv = a.Dv;
      }
    const int64_t M = QG * G;
    ld = (keys + 2 * W - 1) / W * W;
    s.resize(M * ld), dp.resize(M * ld), qb.resize(M * Dk), db.resize(M * Dv), ob.resize(M * Dv);
    dqb.resize(M * Dk), lse.resize(M), inv.resize(M), st.resize(n), ln.resize(n);
  }
};

// rows [t0, t0 + Q) x G of x [B, T, H, D] (KV head h of row b) -> y [Q G, D]
NSA_INLINE void gather_rows(const Args& a, const float* x, int64_t D, int64_t b, int64_t h, int64_t t0, int64_t Q,
                            float* y) {
  for (int64_t t = t0; t < t0 + Q; ++t)
    std::memcpy(y + (t - t0) * a.G * D, x + ((b * a.T + t) * a.H + h * a.G) * D, a.G * D * sizeof(float));
}

// the compressed branch's block selection for queries [t0, t0 + Q) from s = exp(S - max) of their
// rows and w.inv (softmax_lse's; n visible columns in all, 0: none): the same call in the forward
// and in the backward, which recomputes the selection instead of keeping it
void select_group(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, int64_t n, const float* s, Scratch& w) {
  for (int64_t t = t0; t < t0 + Q; ++t) {
    int64_t lo, hi;
    own_range(a, t, lo, hi);
    select_query(a, b, h, t, s + (t - t0) * a.G * w.ld, w.ld, w.inv.data() + (t - t0) * a.G, n == 0 ? 0 : hi, w.sel,
                 w.top);
  }
}

// The first half of both the forward and the backward of queries [t0, t0 + Q) of KV head h in row
// b, one code path so that both see the same bits: their q rows into w.qb, their key spans (w.st,
// w.ln; count into ns), w.s <- exp(S - max) with w.inv = 1 / sum and w.lse (-inf, row zeroed, where
// nothing is visible), and for the compressed branch with a.sel set the selected blocks. Returns n,
// the columns of the score rows (0: no key visible to any of them).
int64_t softmax_rows(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, Scratch& w, int64_t& ns) {
  const int64_t M = Q * a.G, bh = b * a.Hkv + h;
  float* s = w.s.data();
  gather_rows(a, a.q, a.Dk, b, h, t0, Q, w.qb.data());
  ns = group_spans(a, b, h, t0, Q, w.st.data(), w.ln.data());
  const int64_t n = span_scores(w.qb.data(), M, a.Dk, a.kT + bh * a.NT * a.Dk * TW, ns, w.st.data(), w.ln.data(),
                                s, w.ld, a.scale, kNegInf);
  if (n == 0) {
    std::fill(w.lse.begin(), w.lse.begin() + M, kNegInf);
  } else {
    mask_group(a, t0, Q, w.st[0], n, s, w.ld);
    softmax_lse(s, M, n, w.ld, w.lse.data(), w.inv.data());
  }
  if (a.sel != nullptr) select_group(a, b, h, t0, Q, n, s, w);
  return n;
}

// one branch's outputs for queries [t0, t0 + Q) of KV head h in row b: w.ob [Q G, Dv], w.lse [Q G];
// the compressed branch also writes each query's selected blocks when a.sel is set
void attend_group(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, Scratch& w) {
  const int64_t M = Q * a.G, ld = w.ld;
  float *s = w.s.data(), *ob = w.ob.data();
  int64_t ns;
  const int64_t n = softmax_rows(a, b, h, t0, Q, w, ns);
  std::fill(ob, ob + M * a.Dv, 0.f);
  if (n == 0) return;
  const int64_t ldv = a.Hkv * a.Dv;  // V rows of head h
  const float* vh = a.v + b * a.S * ldv + h * a.Dv;
  for (int64_t e = 0, c = 0; e < ns; c += w.ln[e], ++e)
    gemm<true>(s + c, ld, 1, vh + w.st[e] * ldv, ldv, w.ln[e], ob, a.Dv, M, a.Dv, 1.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t e = 0; e < a.Dv; ++e) ob[m * a.Dv + e] *= w.inv[m];
}

// ---------------------------------------------------------------------------------------------- backward

// adds one branch's gradients for queries [t0, t0 + Q) of KV head h in row b: dq rows of dq
// [B, T, H, Dk] (+=), dK / dV rows of dkh, dvh ([S, D] of this (b, h); +=). P is recomputed as the
// forward computed it (softmax_rows, in the same query groups), so nothing of the forward is kept:
// not its lse, and for the compressed branch with a.sel set, not its selection, which is picked
// again here from those same probabilities. Per global row r: gate[r lgs] the weight of this
// branch's output in o (null: 1); dgate[r lgs] (if not null) <- rowsum(dO * o_branch) = rowsum(P * dP)
void backward_group(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, Scratch& w, float* dq, float* dkh,
                    float* dvh, const float* gate, float* dgate, int64_t lgs) {
  const int64_t G = a.G, M = Q * G, bh = b * a.Hkv + h, ld = w.ld, r0 = (b * a.T + t0) * a.H + h * G;
  float *s = w.s.data(), *dp = w.dp.data(), *qb = w.qb.data(), *db = w.db.data(), *dqb = w.dqb.data();
  const int64_t* st = w.st.data();
  const int64_t* ln = w.ln.data();
  auto grow = [&](int64_t m) { return r0 + (m / G) * a.H + m % G; };  // group row -> global row
  int64_t ns;
  const int64_t n = softmax_rows(a, b, h, t0, Q, w, ns);  // s <- exp(S - max), as the forward
  if (n == 0) {
    if (dgate != nullptr)
      for (int64_t m = 0; m < M; ++m) dgate[grow(m) * lgs] = 0.f;
    return;
  }
  gather_rows(a, a.dout, a.Dv, b, h, t0, Q, db);
  span_scores(db, M, a.Dv, a.vT + bh * a.NT * a.Dv * TW, ns, st, ln, dp, ld, 1.f, 0.f);
  const int64_t nr = (n + W - 1) / W * W;
  for (int64_t m = 0; m < M; ++m) {  // s <- gate P, dp <- dS = gate P (dP - delta)
    float *x = s + m * ld, *y = dp + m * ld;
    const int64_t r = grow(m);
    if (w.lse[m] == kNegInf) {  // nothing visible: no gradient (softmax_lse zeroed x)
      std::fill(y, y + nr, 0.f);
      if (dgate != nullptr) dgate[r * lgs] = 0.f;
      continue;
    }
    vf acc = vf{};
    for (int64_t i = 0; i < nr; i += W) acc += load(x + i) * load(y + i);
    float delta = 0.f;
    for (int k = 0; k < W; ++k) delta += acc[k];
    delta *= w.inv[m];
    if (dgate != nullptr) dgate[r * lgs] = delta;
    if (a.dlse != nullptr) delta -= a.dlse[r];
    const float pscale = w.inv[m] * (gate != nullptr ? gate[r * lgs] : 1.f);
    for (int64_t i = 0; i < nr; i += W) {
      const vf p = load(x + i) * pscale;
      store(x + i, p);
      store(y + i, p * (load(y + i) - delta));
    }
  }
  const int64_t ldk = a.Hkv * a.Dk;  // K rows of head h
  const float* kh = a.k + b * a.S * ldk + h * a.Dk;
  std::fill(dqb, dqb + M * a.Dk, 0.f);
  for (int64_t e = 0, c = 0; e < ns; c += ln[e], ++e) {
    gemm<true>(dp + c, ld, 1, kh + st[e] * ldk, ldk, ln[e], dqb, a.Dk, M, a.Dk, a.scale);
    gemm<true>(dp + c, 1, ld, qb, a.Dk, M, dkh + st[e] * a.Dk, a.Dk, ln[e], a.Dk, a.scale);
    gemm<true>(s + c, 1, ld, db, a.Dv, M, dvh + st[e] * a.Dv, a.Dv, ln[e], a.Dv, 1.f);
  }
  for (int64_t m = 0; m < M; ++m) {
    float* y = dq + grow(m) * a.Dk;
    const float* x = dqb + m * a.Dk;
    for (int64_t e = 0; e < a.Dk; ++e) y[e] += x[e];
  }
}

// Work split of a backward: whole (b, h) pairs per task when there are as many as threads, else
// `parts` query ranges per pair, each accumulating dK / dV into its own zeroed buffer (floats per
// task: `per_task`), summed into the outputs by reduce(). cut: the ranges' bounds, multiples of QB
// (then the backward's query groups are the forward's, and so are their scores to the last bit).
struct BackwardSplit {
  int64_t parts, tasks, per_task;
  std::vector<int64_t> cut;
  std::vector<float> local;
  BackwardSplit(int64_t BH, int64_t T, int64_t per_task_, bool work_grows_with_t) : per_task(per_task_) {
    const int nth = std::max(1, at::get_num_threads());
    parts = BH >= nth ? 1 : (nth + BH - 1) / BH, tasks = BH * parts;
    cut.resize(parts + 1);
    for (int64_t p = 0; p <= parts; ++p) {  // compressed alone: equal work, which grows with t
      const double f = static_cast<double>(p) / parts;
      const double at = T * (work_grows_with_t ? std::sqrt(f) : f) / QB;
      cut[p] = p == parts ? T : std::min(T, static_cast<int64_t>(std::llround(at)) * QB);
    }
    if (parts > 1) local.assign(tasks * per_task, 0.f);
  }
  float* buffer(int64_t task) { return parts > 1 ? local.data() + task * per_task : nullptr; }
  // out[bh][0 : len] += the parts' buffers [offset, offset + len) for every pair
  void reduce(float* out, int64_t BH, int64_t offset, int64_t len) {
    if (parts == 1) return;
    at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bh = b0; bh < b1; ++bh)
        for (int64_t p = 0; p < parts; ++p) {
          const float* src = local.data() + (bh * parts + p) * per_task + offset;
          float* dst = out + bh * len;
          for (int64_t i = 0; i < len; ++i) dst[i] += src[i];
        }
    });
  }
};

// ---------------------------------------------------------------------------------------------- entry points

void check_f32(const Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == dim,
              "nsa attention_cpu: ", name, " must be a contiguous float32 CPU tensor with ", dim, " dims");
}

Args make_args(const Tensor& q, const Tensor& k, const Tensor& kT, const Tensor& v, const Tensor& idx,
               int64_t mode, int64_t window, int64_t select_len, int64_t block_len, int64_t stride, double scale) {
  check_f32(q, "q", 4), check_f32(k, "k", 4), check_f32(kT, "kT", 5), check_f32(v, "v", 4);
  Args a{};
  a.B = q.size(0), a.T = q.size(1), a.H = q.size(2), a.Dk = q.size(3);
  a.S = k.size(1), a.Hkv = k.size(2), a.Dv = v.size(3), a.NT = kT.size(2);
  TORCH_CHECK(k.size(0) == a.B && k.size(3) == a.Dk && a.H % a.Hkv == 0, "nsa attention_cpu: bad k shape");
  TORCH_CHECK(v.size(0) == a.B && v.size(1) == a.S && v.size(2) == a.Hkv, "nsa attention_cpu: bad v shape");
  TORCH_CHECK(kT.size(0) == a.B && kT.size(1) == a.Hkv && kT.size(3) == a.Dk && kT.size(4) == TW &&
                  a.NT * TW >= a.S + TW,
              "nsa attention_cpu: kT must be [B, Hkv, >= S / 64 + 1, Dk, 64]");
  TORCH_CHECK(mode == kWindow || mode == kSelected || mode == kCompressed, "nsa attention_cpu: bad mode");
  TORCH_CHECK(mode == kCompressed || a.S == a.T, "nsa attention_cpu: keys and queries differ in length");
  a.G = a.H / a.Hkv, a.mode = mode, a.w = window, a.ls = select_len, a.l = block_len, a.d = stride;
  a.scale = static_cast<float>(scale);
  a.q = q.data_ptr<float>(), a.k = k.data_ptr<float>(), a.kT = kT.data_ptr<float>(), a.v = v.data_ptr<float>();
  if (mode == kSelected) {
    TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.dim() == 4 &&
                    idx.size(0) == a.B && idx.size(1) == a.T && idx.size(2) == a.Hkv && select_len > 0,
                "nsa attention_cpu: block indices must be contiguous int32 [B, T, Hkv, n]");
    a.idx = idx.data_ptr<int32_t>(), a.n = idx.size(3);
  }
  if (mode == kWindow) TORCH_CHECK(window > 0, "nsa attention_cpu: window must be positive");
  if (mode == kCompressed) TORCH_CHECK(block_len > 0 && stride > 0, "nsa attention_cpu: bad block_len / stride");
  return a;
}

void set_selection(Args& a, Tensor& sel, int64_t num_select, int64_t num_init, int64_t num_local) {
  TORCH_CHECK(a.ls > 0 && a.ls % a.d == 0 && a.l % a.d == 0 && num_select > 0,
              "nsa attention_cpu: selection needs select_len and block_len multiples of stride");
  a.sel = sel.data_ptr<int32_t>(), a.num_select = num_select, a.num_init = num_init, a.num_local = num_local;
}

// one branch: o [B, T, H, Dv], lse [B, T, H] and, for the compressed branch with num_select > 0,
// the selected blocks [B, T, Hkv, num_select] int32 (else an empty tensor)
std::vector<Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& kT, const Tensor& v, const Tensor& idx,
                            int64_t mode, int64_t window, int64_t select_len, int64_t block_len, int64_t stride,
                            double scale, int64_t num_select, int64_t num_init, int64_t num_local) {
  Args a = make_args(q, k, kT, v, idx, mode, window, select_len, block_len, stride, scale);
  Tensor o = at::empty({a.B, a.T, a.H, a.Dv}, q.options());
  Tensor lse = at::empty({a.B, a.T, a.H}, q.options());
  const bool select = mode == kCompressed && num_select > 0;
  Tensor sel = at::empty({select ? a.B : 0, a.T, a.Hkv, num_select}, q.options().dtype(at::kInt));
  if (select) set_selection(a, sel, num_select, num_init, num_local);
  float *op = o.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t nq = (a.T + QB - 1) / QB, tasks = a.B * a.Hkv * nq;
  const Args* br[1] = {&a};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t bh = i / nq, b = bh / a.Hkv, h = bh % a.Hkv, t0 = (i % nq) * QB, t1 = std::min(a.T, t0 + QB);
      for (int64_t t = t0, Q; t < t1; t += Q) {
        Q = group_size(a, t, t1);
        attend_group(a, b, h, t, Q, w);
        for (int64_t m = 0; m < Q * a.G; ++m) {
          const int64_t r = (b * a.T + t + m / a.G) * a.H + h * a.G + m % a.G;
          std::memcpy(op + r * a.Dv, w.ob.data() + m * a.Dv, a.Dv * sizeof(float));
          lp[r] = w.lse[m];
        }
      }
    }
  }
  return {o, lse, sel};
}

// one branch: dq [B, T, H, Dk], dkh [B, Hkv, S, Dk], dvh [B, Hkv, S, Dv] (head-major) from dout
// [B, T, H, Dv] and (optional, numel 0 for none) the gradient of lse
std::vector<Tensor> backward(const Tensor& q, const Tensor& k, const Tensor& kT, const Tensor& v, const Tensor& vT,
                             const Tensor& idx, const Tensor& dout, const Tensor& dlse, int64_t mode, int64_t window,
                             int64_t select_len, int64_t block_len, int64_t stride, double scale) {
  Args a = make_args(q, k, kT, v, idx, mode, window, select_len, block_len, stride, scale);
  check_f32(vT, "vT", 5), check_f32(dout, "dout", 4);
  TORCH_CHECK(vT.size(2) == a.NT && vT.size(3) == a.Dv && vT.size(4) == TW && dout.size(3) == a.Dv &&
                  dout.size(1) == a.T && dout.size(2) == a.H,
              "nsa attention_cpu: vT or dout shape");
  a.vT = vT.data_ptr<float>(), a.dout = dout.data_ptr<float>();
  if (dlse.numel() > 0) {
    check_f32(dlse, "dlse", 3);
    a.dlse = dlse.data_ptr<float>();
  }
  Tensor dq = at::zeros({a.B, a.T, a.H, a.Dk}, q.options());
  Tensor dkh = at::zeros({a.B, a.Hkv, a.S, a.Dk}, q.options());
  Tensor dvh = at::zeros({a.B, a.Hkv, a.S, a.Dv}, q.options());
  float *dqp = dq.data_ptr<float>(), *dkp = dkh.data_ptr<float>(), *dvp = dvh.data_ptr<float>();
  const int64_t BH = a.B * a.Hkv;
  BackwardSplit split(BH, a.T, a.S * (a.Dk + a.Dv), mode == kCompressed);
  const Args* br[1] = {&a};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < split.tasks; ++i) {
      const int64_t bh = i / split.parts, p = i % split.parts, b = bh / a.Hkv, h = bh % a.Hkv;
      float* buf = split.buffer(i);
      float* dk = buf != nullptr ? buf : dkp + bh * a.S * a.Dk;
      float* dv = buf != nullptr ? buf + a.S * a.Dk : dvp + bh * a.S * a.Dv;
      for (int64_t t = split.cut[p], Q; t < split.cut[p + 1]; t += Q) {
        Q = group_size(a, t, split.cut[p + 1]);
        backward_group(a, b, h, t, Q, w, dqp, dk, dv, nullptr, nullptr, 0);
      }
    }
  }
  split.reduce(dkp, BH, 0, a.S * a.Dk);
  split.reduce(dvp, BH, a.S * a.Dk, a.S * a.Dv);
  return {dq, dkh, dvh};
}

// ---------------------------------------------------------------------------------------------- fused

// The three branches of a query at once, gated and summed: o = sum_c gate_c o_c (nsa.native_sparse_attention).
// Per branch c (0 compressed, 1 selected, 2 window) the caller passes k[c], kT[c], v[c] (and vT[c]
// for the backward), empty tensors for a branch that is off; the compressed branch runs when it or
// the selected branch is on (it selects the blocks). gates [B, T, H, 3] float32, or empty: all 1.
struct Fused {
  Args br[3];
  bool on[3] = {false, false, false};  // the branch's output is part of o
  bool run[3] = {false, false, false};  // the branch is computed (compressed: also to select)
  bool local_sel = false;  // the selection lives in each task's own rows (see Args::sel_local)
  int64_t num_select = 0;
  const float* gates = nullptr;
};

// sel: where the selection is kept, [B, T, Hkv, num_select] int32, or [B, T, Hkv, 0] for none (each
// task then keeps its own queries' rows only; the backward always does)
Fused make_fused(const Tensor& q, const std::vector<Tensor>& k, const std::vector<Tensor>& kT,
                 const std::vector<Tensor>& v, Tensor& sel, const std::vector<bool>& on, const Tensor& gates,
                 int64_t window, int64_t select_len, int64_t block_len, int64_t stride, double scale,
                 int64_t num_select, int64_t num_init, int64_t num_local) {
  TORCH_CHECK(k.size() == 3 && kT.size() == 3 && v.size() == 3 && on.size() == 3,
              "nsa attention_cpu: three branches (compressed, selected, window)");
  Fused f;
  const int64_t modes[3] = {kCompressed, kSelected, kWindow};
  for (int c = 0; c < 3; ++c) {
    f.on[c] = on[c];
    f.run[c] = on[c] || (c == 0 && on[1]);
    if (f.run[c])
      f.br[c] = make_args(q, k[c], kT[c], v[c], sel, modes[c], window, select_len, block_len, stride, scale);
  }
  TORCH_CHECK(f.run[0] || f.run[1] || f.run[2], "nsa attention_cpu: no branch is on");
  if (on[1]) {
    set_selection(f.br[0], sel, num_select, num_init, num_local);
    f.local_sel = sel.size(3) == 0, f.num_select = num_select, f.br[1].n = num_select;
    TORCH_CHECK(f.local_sel || sel.size(3) == num_select, "nsa attention_cpu: selection width");
  }
  if (gates.numel() > 0) {
    check_f32(gates, "gates", 4);
    TORCH_CHECK(gates.size(0) == q.size(0) && gates.size(1) == q.size(1) && gates.size(2) == q.size(2) &&
                    gates.size(3) == 3,
                "nsa attention_cpu: gates must be [B, T, H, 3]");
    f.gates = gates.data_ptr<float>();
  }
  return f;
}

// One thread's copies of the branches' settings, its selection rows pointed at its own buffer when
// the selection is not kept; at(t0) sets the first query of its current task.
struct ThreadBranches {
  Args br[3];
  std::vector<int32_t> rows;
  explicit ThreadBranches(const Fused& f) : br{f.br[0], f.br[1], f.br[2]} {
    if (!f.local_sel) return;
    rows.resize(QB * f.num_select);
    br[0].sel = rows.data(), br[1].idx = rows.data(), br[0].sel_local = br[1].sel_local = true;
  }
  void at(int64_t t0) { br[0].sel_t0 = br[1].sel_t0 = t0; }
};

// o [B, T, H, Dv] and the selected blocks [B, T, Hkv, num_select] int32 when keep_selection (else,
// or when the selected branch is off, an empty tensor). Nothing else is kept for the backward: it
// recomputes each branch's probabilities and the selection (backward_group).
std::vector<Tensor> nsa_forward(const Tensor& q, const std::vector<Tensor>& k, const std::vector<Tensor>& kT,
                                const std::vector<Tensor>& v, const std::vector<bool>& on, const Tensor& gates,
                                int64_t window, int64_t select_len, int64_t block_len, int64_t stride, double scale,
                                int64_t num_select, int64_t num_init, int64_t num_local, bool keep_selection) {
  check_f32(q, "q", 4);
  TORCH_CHECK(on.size() == 3, "nsa attention_cpu: three branches (compressed, selected, window)");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  const bool select = on[1], keep = select && keep_selection;
  Tensor sel = at::empty({select ? B : 0, T, select ? k[1].size(2) : 0, keep ? num_select : 0},
                         q.options().dtype(at::kInt));
  Fused f = make_fused(q, k, kT, v, sel, on, gates, window, select_len, block_len, stride, scale, num_select,
                       num_init, num_local);
  const Args& a0 = f.run[0] ? f.br[0] : f.br[2];
  const int64_t G = a0.G, Hkv = a0.Hkv, Dv = a0.Dv;
  Tensor o = at::empty({B, T, H, Dv}, q.options());
  float* op = o.data_ptr<float>();
  const int64_t nq = (T + QB - 1) / QB, tasks = B * Hkv * nq;
  const Args* br[3] = {f.run[0] ? &f.br[0] : nullptr, f.run[1] ? &f.br[1] : nullptr, f.run[2] ? &f.br[2] : nullptr};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 3);
    ThreadBranches mine(f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t bh = i / nq, b = bh / Hkv, h = bh % Hkv, t0 = (i % nq) * QB, t1 = std::min(T, t0 + QB);
      mine.at(t0);
      for (int64_t t = t0; t < t1; ++t) {
        float* rows = op + ((b * T + t) * H + h * G) * Dv;
        std::fill(rows, rows + G * Dv, 0.f);
      }
      for (int c = 0; c < 3; ++c) {  // compressed first: it selects the blocks the selected branch reads
        if (!f.run[c]) continue;
        const Args& a = mine.br[c];
        for (int64_t t = t0, Q; t < t1; t += Q) {
          Q = group_size(a, t, t1);
          attend_group(a, b, h, t, Q, w);
          if (!f.on[c]) continue;
          for (int64_t m = 0; m < Q * G; ++m) {
            const int64_t r = (b * T + t + m / G) * H + h * G + m % G;
            const float gg = f.gates != nullptr ? f.gates[r * 3 + c] : 1.f;
            float* out = op + r * Dv;
            const float* ob = w.ob.data() + m * Dv;
            for (int64_t e = 0; e < Dv; ++e) out[e] += gg * ob[e];
          }
        }
      }
    }
  }
  return {o, sel};
}

// dq [B, T, H, Dk]; per branch dkh[c] [B, Hkv, S_c, Dk], dvh[c] (undefined for a branch that is off);
// dgates [B, T, H, 3] (zeros for an off branch). vT: per branch, as kT (the compressed branch's also
// when only the selected branch is on: it selects again here).
std::vector<Tensor> nsa_backward(const Tensor& q, const std::vector<Tensor>& k, const std::vector<Tensor>& kT,
                                 const std::vector<Tensor>& v, const std::vector<Tensor>& vT,
                                 const std::vector<bool>& on, const Tensor& gates, const Tensor& dout, int64_t window,
                                 int64_t select_len, int64_t block_len, int64_t stride, double scale,
                                 int64_t num_select, int64_t num_init, int64_t num_local) {
  check_f32(q, "q", 4), check_f32(dout, "dout", 4);
  TORCH_CHECK(vT.size() == 3 && on.size() == 3, "nsa attention_cpu: three vT");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  Tensor sel = at::empty({on[1] ? B : 0, T, on[1] ? k[1].size(2) : 0, 0}, q.options().dtype(at::kInt));
  Fused f = make_fused(q, k, kT, v, sel, on, gates, window, select_len, block_len, stride, scale, num_select,
                       num_init, num_local);
  const Args& a0 = f.run[0] ? f.br[0] : f.br[2];
  const int64_t G = a0.G, Hkv = a0.Hkv, Dk = a0.Dk, BH = B * Hkv;
  Tensor dq = at::zeros({B, T, H, Dk}, q.options());
  Tensor dgates = at::zeros({B, T, H, 3}, q.options());
  std::vector<Tensor> dkh(3), dvh(3);
  int64_t per_task = 0, offset[3] = {0, 0, 0};
  for (int c = 0; c < 3; ++c) {
    if (!f.on[c]) continue;
    Args& a = f.br[c];
    check_f32(vT[c], "vT", 5);
    TORCH_CHECK(vT[c].size(2) == a.NT && vT[c].size(3) == a.Dv && vT[c].size(4) == TW, "nsa attention_cpu: vT shape");
    a.vT = vT[c].data_ptr<float>(), a.dout = dout.data_ptr<float>();
    dkh[c] = at::zeros({B, Hkv, a.S, a.Dk}, q.options()), dvh[c] = at::zeros({B, Hkv, a.S, a.Dv}, q.options());
    offset[c] = per_task, per_task += a.S * (a.Dk + a.Dv);
  }
  TORCH_CHECK(dout.size(1) == T && dout.size(2) == H && dout.size(3) == a0.Dv, "nsa attention_cpu: dout shape");
  BackwardSplit split(BH, T, per_task, false);
  float *dqp = dq.data_ptr<float>(), *dgp = dgates.data_ptr<float>();
  const Args* br[3] = {f.run[0] ? &f.br[0] : nullptr, f.run[1] ? &f.br[1] : nullptr, f.run[2] ? &f.br[2] : nullptr};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 3);
    ThreadBranches mine(f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < split.tasks; ++i) {
      const int64_t bh = i / split.parts, p = i % split.parts, b = bh / Hkv, h = bh % Hkv;
      float *dk[3], *dv[3];
      float* buf = split.buffer(i);
      for (int c = 0; c < 3; ++c) {
        if (!f.on[c]) continue;
        const Args& a = f.br[c];
        dk[c] = buf != nullptr ? buf + offset[c] : dkh[c].data_ptr<float>() + bh * a.S * a.Dk;
        dv[c] = buf != nullptr ? buf + offset[c] + a.S * a.Dk : dvh[c].data_ptr<float>() + bh * a.S * a.Dv;
      }
      // the forward's query blocks (split.cut are multiples of QB), compressed first: it selects again
      for (int64_t t0 = split.cut[p]; t0 < split.cut[p + 1]; t0 += QB) {
        const int64_t t1 = std::min(split.cut[p + 1], t0 + QB);
        mine.at(t0);
        for (int c = 0; c < 3; ++c) {
          if (!f.run[c]) continue;
          const Args& a = mine.br[c];
          const float* gate = f.gates != nullptr ? f.gates + c : nullptr;
          for (int64_t t = t0, Q; t < t1; t += Q) {
            Q = group_size(a, t, t1);
            if (f.on[c]) {
              backward_group(a, b, h, t, Q, w, dqp, dk[c], dv[c], gate, dgp + c, 3);
            } else {
              attend_group(a, b, h, t, Q, w);  // the compressed branch, off: only its selection
            }
          }
        }
      }
    }
  }
  for (int c = 0; c < 3; ++c) {
    if (!f.on[c]) continue;
    const Args& a = f.br[c];
    split.reduce(dkh[c].data_ptr<float>(), BH, offset[c], a.S * a.Dk);
    split.reduce(dvh[c].data_ptr<float>(), BH, offset[c] + a.S * a.Dk, a.S * a.Dv);
  }
  return {dq, dkh[0], dvh[0], dkh[1], dvh[1], dkh[2], dvh[2], dgates};
}

}  // namespace

// registered by cpu_module.cpp, with the other CPU ops, into one extension
void bind_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_forward", &forward, "one NSA branch over whole sequences: o, lse (and selected blocks)",
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_backward", &backward, "gradients of one NSA branch: dq, dk, dv (dk, dv head-major [B, Hkv, S, D])",
        py::call_guard<py::gil_scoped_release>());
  m.def("nsa_forward", &nsa_forward, "the three branches gated and summed: o and (if kept) the selected blocks",
        py::call_guard<py::gil_scoped_release>());
  m.def("nsa_backward", &nsa_backward, "gradients of the gated sum: dq, per-branch dk / dv, dgates",
        py::call_guard<py::gil_scoped_release>());
}
