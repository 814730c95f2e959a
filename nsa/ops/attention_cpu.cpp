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
// together (the paper's group-centric order): the window and compressed branches QG consecutive
// queries over the union of their ranges, each row masking the few keys outside its own (see
// group_spans); the selected branch the QB queries of a task block by block, each selected block's
// K / V tile read once for all the task's queries that picked it (see selected_pairs). Scores are
// built span by span into a row buffer (the selected branch: a slab per query and block), softmaxed
// once, then multiplied by V span by span; no gathered copies of K/V. The compressed branch also
// picks the selected blocks from its own probabilities (nsa/ops/select_blocks/reference.py: overlap
// weighting, forced blocks, top-n, ties to the lower index), as compressed_attention_and_select does.
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
// (dP - delta + dlse); dQ rows written once, dK / dV rows accumulated (the selected branch's once
// per block and task, over all the task's queries that picked it). The fused backward also
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
// tensor); lse [B, T, H] (one branch's output). A forward is given kT only for a long window; a short
// window transposes its tiles as it slides, the compressed branch per query group (TileCache), the
// selected branch into the not yet written rows of o, as [B, NT, Hkv, Dk, TW] (ForwardPlan): so a
// forward holds little more than its output.

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

// X operands of the matmuls: row i of X is xr(i), its columns from j on xr.from(j)
struct Strided {  // row-major rows ld floats apart
  const float* x;
  int64_t ld;
  NSA_INLINE const float* operator()(int64_t i) const { return x + i * ld; }
  NSA_INLINE Strided from(int64_t j) const { return {x + j, ld}; }
};
struct Gathered {  // rows anywhere: row i at rows[i] (the selected branch's q / dO rows of a block's pairs)
  const float* const* rows;
  int64_t off;
  NSA_INLINE const float* operator()(int64_t i) const { return rows[i] + off; }
  NSA_INLINE Gathered from(int64_t j) const { return {rows, off + j}; }
};

// Y[r][0 : CB W] = alpha * sum_{i < m} A[r ars + i acs] X[i][0 : CB W]  (+ Y if ACC), r < R:
// the R x CB accumulators stay in registers, each X vector is used R times.
template <int R, int CB, bool ACC, class XR>
NSA_INLINE void gemm_tile(const float* A, int64_t ars, int64_t acs, XR X, int64_t m, float* Y, int64_t ldy,
                          float alpha) {
  vf acc[R][CB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = vf{};
  for (int64_t i = 0; i < m; ++i) {
    vf x[CB];
    const float* xi = X(i);
    for (int c = 0; c < CB; ++c) x[c] = load(xi + c * W);
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
template <int R, bool ACC, bool XPAD, class XR>
NSA_INLINE void gemm_tail(const float* A, int64_t ars, int64_t acs, XR X, int64_t m, float* Y, int64_t ldy,
                          float alpha, int64_t nt) {
  vf acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vf{};
  float xb[W] = {};
  for (int64_t i = 0; i < m; ++i) {
    vf x;
    if constexpr (XPAD) {
      x = load(X(i));
    } else {
      std::memcpy(xb, X(i), nt * sizeof(float));
      x = load(xb);
    }
    for (int r = 0; r < R; ++r) acc[r] += splat(A[r * ars + i * acs]) * x;
  }
  for (int r = 0; r < R; ++r) {
    float* y = Y + r * ldy;
    for (int64_t c = 0; c < nt; ++c) y[c] = ACC ? y[c] + alpha * acc[r][c] : alpha * acc[r][c];
  }
}

template <int R, bool ACC, bool XPAD, class XR>
NSA_INLINE void gemm_rows(const float* A, int64_t ars, int64_t acs, XR X, int64_t m, float* Y, int64_t ldy,
                          int64_t N, float alpha) {
  int64_t j = 0;
  for (; j + kTileVecs * W <= N; j += kTileVecs * W)
    gemm_tile<R, kTileVecs, ACC>(A, ars, acs, X.from(j), m, Y + j, ldy, alpha);
  switch ((N - j) / W) {  // fewer than kTileVecs vectors left
    case 3: gemm_tile<R, 3, ACC>(A, ars, acs, X.from(j), m, Y + j, ldy, alpha), j += 3 * W; break;
    case 2: gemm_tile<R, 2, ACC>(A, ars, acs, X.from(j), m, Y + j, ldy, alpha), j += 2 * W; break;
    case 1: gemm_tile<R, 1, ACC>(A, ars, acs, X.from(j), m, Y + j, ldy, alpha), j += W; break;
    default: break;
  }
  if (j < N) gemm_tail<R, ACC, XPAD>(A, ars, acs, X.from(j), m, Y + j, ldy, alpha, N - j);
}

// Y [M, N] (row stride ldy) = alpha * A X (+ Y if ACC): A [M, m] read as A[r ars + i acs] (so a
// transposed operand is just other strides), X [m, N] by rows (Strided, Gathered); kTileRows rows at
// a time (cpu_vec.h), then the rows left
template <bool ACC, bool XPAD = false, class XR>
void gemm(const float* A, int64_t ars, int64_t acs, XR X, int64_t m, float* Y, int64_t ldy, int64_t M, int64_t N,
          float alpha) {
  constexpr int RT = kTileRows;
  int64_t r = 0;
  for (; r + RT <= M; r += RT) gemm_rows<RT, ACC, XPAD>(A + r * ars, ars, acs, X, m, Y + r * ldy, ldy, N, alpha);
  const float* Ar = A + r * ars;
  float* Yr = Y + r * ldy;
  switch (M - r) {
    case 5: gemm_rows<5, ACC, XPAD>(Ar, ars, acs, X, m, Yr, ldy, N, alpha); break;
    case 4: gemm_rows<4, ACC, XPAD>(Ar, ars, acs, X, m, Yr, ldy, N, alpha); break;
    case 3: gemm_rows<3, ACC, XPAD>(Ar, ars, acs, X, m, Yr, ldy, N, alpha); break;
    case 2: gemm_rows<2, ACC, XPAD>(Ar, ars, acs, X, m, Yr, ldy, N, alpha); break;
    case 1: gemm_rows<1, ACC, XPAD>(Ar, ars, acs, X, m, Yr, ldy, N, alpha); break;
    default: break;
  }
}
// X [m, N] row-major, rows ldx floats apart
template <bool ACC, bool XPAD = false>
NSA_INLINE void gemm(const float* A, int64_t ars, int64_t acs, const float* X, int64_t ldx, int64_t m, float* Y,
                     int64_t ldy, int64_t M, int64_t N, float alpha) {
  gemm<ACC, XPAD>(A, ars, acs, Strided{X, ldx}, m, Y, ldy, M, N, alpha);
}

// ---------------------------------------------------------------------------------------------- spans

struct Args {  // one branch's inputs and settings
  const float *q, *k, *kT, *v, *vT, *dout, *dlse;
  const int32_t* idx;
  int32_t* sel;  // the compressed branch: where it writes the selected blocks (null: it does not select)
  int64_t B, T, S, NT, H, Hkv, G, Dk, Dv, n;  // NT: tiles of kT / vT; n: width of idx
  int64_t kt_b, kt_h, kt_t;  // kT's strides (floats) between batch rows, heads and tiles
  int64_t mode, w, ls, l, d, num_select, num_init, num_local;
  float scale;
  // idx / sel hold the rows of queries from sel_t0 on of one (b, h) only (the thread's buffer for a
  // task or backward block, ThreadBranches) instead of the whole [B, T, Hkv, width]: the fused op's
  // selection when nothing keeps it
  bool sel_local;
  int64_t sel_t0;
};

// queries per task of a forward (the backward's blocks: backward_block). The selected branch takes a
// task's queries at once, so each block it reads serves more of them the larger the task (its
// forward holds one block's slabs: 128 KB per thread at paper shapes). At 8k, paper shapes, 16 -> 32
// -> 64 made the op's forward ~6% and then ~4% faster (bench/RESULTS.md, eighteenth session).
constexpr int64_t QB = 64;

// offset of query t's row (KV head h of row b) in a selection of the given width (see Args)
NSA_INLINE int64_t sel_row(const Args& a, int64_t b, int64_t h, int64_t t, int64_t width) {
  return a.sel_local ? (t - a.sel_t0) * width : ((b * a.T + t) * a.Hkv + h) * width;
}

// the selected blocks of query t in KV head h of row b: its valid indices (>= 0, not after t's own
// block, each once), ascending, into blk; returns their count
int64_t selected_blocks(const Args& a, int64_t b, int64_t h, int64_t t, int64_t* blk) {
  const int32_t* ix = a.idx + sel_row(a, b, h, t, a.n);
  const int64_t cur = t / a.ls;
  int64_t c = 0;
  for (int64_t e = 0; e < a.n; ++e) {
    const int64_t j = ix[e];
    bool skip = j < 0 || j > cur;
    for (int64_t f = 0; f < e && !skip; ++f) skip = ix[f] == j;
    if (skip) continue;
    int64_t pos = c++;  // insert in ascending order
    for (; pos > 0 && blk[pos - 1] > j; --pos) blk[pos] = blk[pos - 1];
    blk[pos] = j;
  }
  return c;
}

// the longest span list's total length: the width of a query's score row (the selected branch
// keeps its scores in slabs instead, see selected_pairs)
int64_t max_keys(const Args& a) {
  if (a.mode == kWindow) return std::min(a.w, a.T);
  return a.mode == kCompressed ? a.S : 0;
}

// ---------------------------------------------------------------------------------------------- tiles

// one level of a W x W transpose in registers: rows i and i | S swap their off-diagonal S x S blocks
template <int S>
NSA_INLINE void transpose_level(vf* r) {
  vi lo, hi;
  for (int l = 0; l < W; ++l) lo[l] = (l & S) ? W + (l ^ S) : l, hi[l] = (l & S) ? W + l : (l ^ S);
  for (int i = 0; i < W; ++i)
    if (!(i & S)) {
      const vf a = r[i], b = r[i | S];
      r[i] = __builtin_shuffle(a, b, lo), r[i | S] = __builtin_shuffle(a, b, hi);
    }
}

// out [D, TW] = the first n <= TW of the key rows (stride ldr, D floats each) transposed, zeros after
void transpose_tile(const float* rows, int64_t ldr, int64_t n, int64_t D, float* out) {
  const int64_t nw = n - n % W, dw = D - D % W;
  for (int64_t c0 = 0; c0 < nw; c0 += W)
    for (int64_t d0 = 0; d0 < dw; d0 += W) {  // W x W blocks in registers
      vf r[W];
      for (int i = 0; i < W; ++i) r[i] = load(rows + (c0 + i) * ldr + d0);
      if constexpr (W >= 16) transpose_level<8>(r);
      if constexpr (W >= 8) transpose_level<4>(r);
      transpose_level<2>(r), transpose_level<1>(r);
      for (int i = 0; i < W; ++i) store(out + (d0 + i) * TW + c0, r[i]);
    }
  for (int64_t d = 0; d < D; ++d) {
    float* o = out + d * TW;
    for (int64_t c = (d < dw ? nw : 0); c < n; ++c) o[c] = rows[c * ldr + d];
    std::fill(o + n, o + TW, 0.f);
  }
}

// A thread's transposed tiles of one branch's K, made as span_scores asks for them, in a ring of
// slots indexed by tile number (a span of up to slots - 1 tiles never evicts its own), for a
// forward given no kT: then it holds no transposed copy of the whole sequence. Cheap for the
// window branch, whose tiles each serve the ~w / QB groups the window slides over; the selected
// branch's random blocks would each be fetched and transposed once per task (~25% more forward
// time at 8k, measured), so its forward keeps its tiles in o instead (ForwardPlan) and uses this
// only for the first few queries, whose rows hold them.
struct TileCache {
  std::vector<float> buf;
  std::vector<const float*> rows_of;
  std::vector<int64_t> tile_of;
  int64_t slots = 0, size = 0;
  void init(int64_t n, int64_t D) {
    slots = n, size = D * TW + W;  // a vector of zeros after each: whole-vector reads past a span's end
    buf.assign(n * size, 0.f), rows_of.assign(n, nullptr), tile_of.assign(n, -1);
  }
  // tile t of the key rows (the (b, h) pair's, stride ldr, S of them): [D, TW]
  const float* get(const float* rows, int64_t ldr, int64_t S, int64_t D, int64_t t) {
    const int64_t k = t % slots;
    float* out = buf.data() + k * size;
    if (rows_of[k] != rows || tile_of[k] != t) {
      transpose_tile(rows + t * TW * ldr, ldr, std::min(TW, S - t * TW), D, out);
      rows_of[k] = rows, tile_of[k] = t;
    }
    return out;
  }
};

// tile t of one (b, h) pair's K^T (or V^T), [D, TW]: from the precomputed tiles (kT / vT) when given,
// else from the thread's TileCache
struct Tiles {
  const float* pre;  // the pair's first [D, TW] tile, the next ts floats on; or null
  const float* rows;  // the pair's first key row (stride ldr), when pre is null
  int64_t ldr, S, D;
  TileCache* cache;
  int64_t ts;
  NSA_INLINE const float* operator()(int64_t t) const {
    return pre != nullptr ? pre + t * ts : cache->get(rows, ldr, S, D, t);
  }
};

// scores s[r][0:n] = scale q[r] . K[keys of the spans] for M rows q [M, D] (stride D), s stride ld;
// kt: the (b, h) pair's K^T tiles; columns [n, n rounded up to W) are set to pad
int64_t span_scores(const float* q, int64_t M, int64_t D, const Tiles& kt, int64_t ns, const int64_t* st,
                    const int64_t* ln, float* s, int64_t ld, float scale, float pad) {
  int64_t n = 0;
  for (int64_t e = 0; e < ns; ++e)
    for (int64_t pos = st[e], end = st[e] + ln[e]; pos < end;) {  // one tile at a time
      const int64_t off = pos % TW, len = std::min(end - pos, TW - off);
      gemm<false, true>(q, D, 1, kt(pos / TW) + off, TW, D, s + n, ld, M, len, scale);
      n += len, pos += len;
    }
  const int64_t nr = (n + W - 1) / W * W;
  for (int64_t r = 0; r < M; ++r) std::fill(s + r * ld + n, s + r * ld + nr, pad);
  return n;
}

// Row groups. The window and compressed branches take QG consecutive queries at once (QG G rows): the
// ranges of neighbouring queries overlap almost entirely, so the group reads their union once, as
// one span, and each row masks the few columns outside its own range; its matmuls then have QG
// times more rows per K/V tile (and dK / dV updates QG times more rows per read-modify-write).
constexpr int64_t QG = 16;

int64_t group_size(int64_t t0, int64_t t_end) { return std::min(QG, t_end - t0); }

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
  int64_t lo, hi, lo1, hi1;
  own_range(a, t0, lo, hi), own_range(a, t0 + Q - 1, lo1, hi1);
  st[0] = lo, ln[0] = hi1 - lo;
  return ln[0] > 0;
}

void mask_group(const Args& a, int64_t t0, int64_t Q, int64_t u0, int64_t n, float* s, int64_t ld) {
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

// softmax_row: x <- exp(x - max) for a row of len columns (a multiple of W; not normalised: the
// caller scales the row's P @ V by inv = 1 / sum instead of the whole row), lse = max + log(sum); a
// row with no visible key (all -inf: a masked row of a group) becomes 0 with lse = -inf, inv = 0.
// The backward's rows may be stored as ns segments of len columns each (seg(e) -> segment e's first
// float): the contiguous row of backward_group is one segment; a query's row in the selected
// branch's backward is its slabs, one per block, whose maxes it takes as it makes them.

// the largest of a row's len (a multiple of W) floats from x on
NSA_INLINE float row_max(const float* x, int64_t len) {
  vf m = splat(kNegInf);
  for (int64_t i = 0; i < len; i += W) {
    const vf v = load(x + i);
    m = v > m ? v : m;
  }
  float mx = m[0];
  for (int k = 1; k < W; ++k) mx = std::max(mx, m[k]);
  return mx;
}

// x <- exp(x - mx) for len floats (a multiple of W) from x on; returns their sum
NSA_INLINE float exp_sum(float* x, int64_t len, float mx) {
  vf sum = vf{};
  for (int64_t i = 0; i < len; i += W) {
    const vf v = vexp(load(x + i) - mx);
    store(x + i, v);
    sum += v;
  }
  float tot = 0.f;
  for (int k = 0; k < W; ++k) tot += sum[k];
  return tot;
}

NSA_INLINE void softmax_row(float* x, int64_t len, float& lse, float& inv) {
  const float mx = row_max(x, len);
  if (mx == kNegInf) {
    std::fill(x, x + len, 0.f);
    lse = kNegInf, inv = 0.f;
    return;
  }
  const float tot = exp_sum(x, len, mx);
  lse = mx + std::log(tot), inv = 1.f / tot;
}

// softmax_row of rows g < G of s (n >= 1 columns, -inf up to n rounded to W, row stride ld)
void softmax_lse(float* s, int64_t G, int64_t n, int64_t ld, float* lse, float* inv) {
  const int64_t nr = (n + W - 1) / W * W;
  for (int64_t g = 0; g < G; ++g) softmax_row(s + g * ld, nr, lse[g], inv[g]);
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

struct Pair {  // selected block j of query t0 + i of a task, its first len keys visible to the query
  int64_t j, i, len;
};

// columns of a (query, block) slab of the selected branch's scores: l' rounded up to whole vectors
NSA_INLINE int64_t slab_width(const Args& a) { return (a.ls + W - 1) / W * W; }

struct Scratch {
  std::vector<float> s, dp, qb, db, ob, lse, inv, sel;
  std::vector<int64_t> st, ln, top;
  // the selected branch by block (selected_forward / _backward): score slabs, each slab row's max,
  // the q / dO rows of a block's pairs, the pairs
  std::vector<float> ps, dps, pmax;
  std::vector<const float*> xrows;
  std::vector<int64_t> nslab, slab, first, blk, nsel;  // first, blk, nsel: selected_pairs' sort
  std::vector<Pair> pairs;
  TileCache tiles[3];  // per mode: K^T tiles of a branch given no kT
  int64_t ld = 0;
  // backward: also dP and dO rows (a forward's would be touched memory it need not hold: ~1 MB
  // per thread at 32k, paper shapes)
  void init(const Args* const* branches, int64_t count, bool backward) {
    int64_t keys = 0, n = 1, G = 0, Dk = 0, Dv = 0;
    for (int64_t c = 0; c < count; ++c)
      if (branches[c] != nullptr) {
        const Args& a = *branches[c];
        keys = std::max(keys, max_keys(a) + QG), n = std::max(n, a.n), G = a.G, Dk = a.Dk, Dv = a.Dv;
        // the tiles a span can cover (+ 1), so that it never evicts its own: the window's union
        // span (the next group's mostly), one selected block at a time. Not the compressed
        // branch's: each group reads every compressed tile once, and a ring of them all would be
        // a copy of K per thread; it makes them again per group (at 32k, paper shapes: ~7% of its
        // forward, 0.64 -> 0.68 s, ~2% of the whole op's).
        // (A forward's selected branch may get no kT for its first queries: see ForwardPlan.)
        const int64_t span = a.mode == kSelected ? a.ls : a.mode == kWindow ? max_keys(a) + QG : 0;
        if (a.kT == nullptr || (a.mode == kSelected && !backward)) tiles[a.mode].init(span / TW + 3, a.Dk);
      }
    const int64_t M = QG * G, Mt = std::max(QB, QG) * G;  // rows of a group, of a task
    ld = (keys + 2 * W - 1) / W * W;
    s.resize(M * ld), qb.resize(M * Dk), ob.resize(Mt * Dv), lse.resize(Mt), inv.resize(Mt), st.resize(n), ln.resize(n);
    if (backward) dp.resize(M * ld), db.resize(M * Dv);
  }
};

// the (b, h) pair's K^T tiles of branch a (its kT, or made here into w's cache) and V^T tiles (vT:
// the backward's, always given)
NSA_INLINE Tiles k_tiles(const Args& a, int64_t b, int64_t h, Scratch& w) {
  const int64_t ldk = a.Hkv * a.Dk;
  return {a.kT != nullptr ? a.kT + b * a.kt_b + h * a.kt_h : nullptr, a.k + b * a.S * ldk + h * a.Dk, ldk, a.S, a.Dk,
          &w.tiles[a.mode], a.kt_t};
}
NSA_INLINE Tiles v_tiles(const Args& a, int64_t b, int64_t h) {
  return {a.vT + (b * a.Hkv + h) * a.NT * a.Dv * TW, nullptr, 0, a.S, a.Dv, nullptr, a.Dv * TW};
}

// the G rows of query t of KV head h in row b of x [B, T, H, D]: [G, D], contiguous
template <class F>
NSA_INLINE F* head_rows(const Args& a, F* x, int64_t D, int64_t b, int64_t h, int64_t t) {
  return x + ((b * a.T + t) * a.H + h * a.G) * D;
}

// rows [t0, t0 + Q) x G of x [B, T, H, D] (KV head h of row b) -> y [Q G, D]
NSA_INLINE void gather_rows(const Args& a, const float* x, int64_t D, int64_t b, int64_t h, int64_t t0, int64_t Q,
                            float* y) {
  for (int64_t t = t0; t < t0 + Q; ++t)
    std::memcpy(y + (t - t0) * a.G * D, head_rows(a, x, D, b, h, t), a.G * D * sizeof(float));
}

// the compressed branch's block selection for queries [t0, t0 + Q) from s = exp(S - max) of their
// rows and inv = 1 / sum of each (n visible columns in all, 0: none): the same call in the forward
// and in the backward, which recomputes the selection instead of keeping it
void select_group(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, int64_t n, const float* s,
                  const float* inv, Scratch& w) {
  for (int64_t t = t0; t < t0 + Q; ++t) {
    int64_t lo, hi;
    own_range(a, t, lo, hi);
    select_query(a, b, h, t, s + (t - t0) * a.G * w.ld, w.ld, inv + (t - t0) * a.G, n == 0 ? 0 : hi, w.sel, w.top);
  }
}

// The scores of queries [t0, t0 + Q) of KV head h in row b, for both the forward and the backward, one
// code path so that both see the same bits: their q rows into w.qb, their key spans (w.st, w.ln;
// count into ns), w.s <- S, -inf where a row's own range ends. Returns n, the columns of the score
// rows (0: no key visible to any of them).
int64_t scores_group(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, Scratch& w, int64_t& ns) {
  gather_rows(a, a.q, a.Dk, b, h, t0, Q, w.qb.data());
  ns = group_spans(a, b, h, t0, Q, w.st.data(), w.ln.data());
  const int64_t n = span_scores(w.qb.data(), Q * a.G, a.Dk, k_tiles(a, b, h, w), ns, w.st.data(), w.ln.data(),
                                w.s.data(), w.ld, a.scale, kNegInf);
  if (n > 0) mask_group(a, t0, Q, w.st[0], n, w.s.data(), w.ld);
  return n;
}

// The forward's first half: scores_group, then w.s <- exp(S - max) with w.inv = 1 / sum and w.lse
// (-inf, row zeroed, where nothing is visible), and for the compressed branch with a.sel set the
// selected blocks (select_group). Returns scores_group's n.
int64_t softmax_rows(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, Scratch& w, int64_t& ns) {
  const int64_t M = Q * a.G;
  float* s = w.s.data();
  const int64_t n = scores_group(a, b, h, t0, Q, w, ns);
  if (n == 0)
    std::fill(w.lse.begin(), w.lse.begin() + M, kNegInf);
  else
    softmax_lse(s, M, n, w.ld, w.lse.data(), w.inv.data());
  if (a.sel != nullptr) select_group(a, b, h, t0, Q, n, s, w.inv.data(), w);
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

// The backward of one score row (segments: sx(e) of S, sy(e) of dP) of global row r, in two passes.
// softmax_delta: x <- exp(S - mx) (mx the row's max, as the forward's softmax_row makes it) while
// summing delta = rowsum(P * dP); inv = 1 / sum (0: nothing visible, x zeroed). dscores_write: x <-
// gate P, y <- dS = gate P (dP - delta + dlse), dgate[r lgs] <- delta (see backward_group);
// dscores_none for a row with nothing visible (no gradient).
template <class SegX, class SegY>
NSA_INLINE void softmax_delta(float mx, int64_t ns, int64_t len, SegX sx, SegY sy, float& inv, float& delta) {
  if (mx == kNegInf) {
    for (int64_t e = 0; e < ns; ++e) std::fill(sx(e), sx(e) + len, 0.f);
    inv = delta = 0.f;
    return;
  }
  vf sum = vf{}, acc = vf{};
  for (int64_t e = 0; e < ns; ++e) {
    float* x = sx(e);
    const float* y = sy(e);
    for (int64_t i = 0; i < len; i += W) {
      const vf v = vexp(load(x + i) - mx);
      store(x + i, v);
      sum += v;
      acc += v * load(y + i);
    }
  }
  float tot = 0.f, d = 0.f;
  for (int k = 0; k < W; ++k) tot += sum[k];
  for (int k = 0; k < W; ++k) d += acc[k];
  inv = 1.f / tot, delta = d * inv;
}

template <class SegX, class SegY>
NSA_INLINE void dscores_write(const Args& a, int64_t ns, int64_t len, SegX sx, SegY sy, float delta, float inv,
                              int64_t r, const float* gate, float* dgate, int64_t lgs) {
  if (dgate != nullptr) dgate[r * lgs] = delta;
  if (a.dlse != nullptr) delta -= a.dlse[r];
  const float pscale = inv * (gate != nullptr ? gate[r * lgs] : 1.f);
  for (int64_t e = 0; e < ns; ++e) {
    float *x = sx(e), *y = sy(e);
    for (int64_t i = 0; i < len; i += W) {
      const vf p = load(x + i) * pscale;
      store(x + i, p);
      store(y + i, p * (load(y + i) - delta));
    }
  }
}

template <class SegY>
NSA_INLINE void dscores_none(int64_t ns, int64_t len, SegY sy, int64_t r, float* dgate, int64_t lgs) {
  for (int64_t e = 0; e < ns; ++e) std::fill(sy(e), sy(e) + len, 0.f);
  if (dgate != nullptr) dgate[r * lgs] = 0.f;
}

// both passes of one row (the selected branch's: nothing comes between them)
template <class SegX, class SegY>
NSA_INLINE void softmax_dscores_row(const Args& a, float mx, int64_t ns, int64_t len, SegX sx, SegY sy, int64_t r,
                                    const float* gate, float* dgate, int64_t lgs) {
  float inv, delta;
  softmax_delta(mx, ns, len, sx, sy, inv, delta);
  if (inv == 0.f) return dscores_none(ns, len, sy, r, dgate, lgs);
  dscores_write(a, ns, len, sx, sy, delta, inv, r, gate, dgate, lgs);
}

// adds one branch's gradients for queries [t0, t0 + Q) of KV head h in row b: dq rows of dq
// [B, T, H, Dk] (+=), dK / dV rows of dkh, dvh ([S, D] of this (b, h); +=). P is recomputed as the
// forward computed it (scores_group and the same exponentials, in the same query groups; the same
// bits), so nothing of the forward is kept:
// not its lse, and for the compressed branch with a.sel set, not its selection, which is picked
// again here from those same probabilities. Per global row r: gate[r lgs] the weight of this
// branch's output in o (null: 1); dgate[r lgs] (if not null) <- rowsum(dO * o_branch) = rowsum(P * dP)
void backward_group(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t Q, Scratch& w, float* dq, float* dkh,
                    float* dvh, const float* gate, float* dgate, int64_t lgs) {
  const int64_t G = a.G, M = Q * G, ld = w.ld, r0 = (b * a.T + t0) * a.H + h * G;
  float *s = w.s.data(), *dp = w.dp.data(), *qb = w.qb.data(), *db = w.db.data();
  const int64_t* st = w.st.data();
  const int64_t* ln = w.ln.data();
  auto grow = [&](int64_t m) { return r0 + (m / G) * a.H + m % G; };  // group row -> global row
  int64_t ns;
  const int64_t n = scores_group(a, b, h, t0, Q, w, ns);  // S, as the forward's
  if (n == 0) {
    if (a.sel != nullptr) select_group(a, b, h, t0, Q, 0, s, w.inv.data(), w);
    if (dgate != nullptr)
      for (int64_t m = 0; m < M; ++m) dgate[grow(m) * lgs] = 0.f;
    return;
  }
  gather_rows(a, a.dout, a.Dv, b, h, t0, Q, db);
  span_scores(db, M, a.Dv, v_tiles(a, b, h), ns, st, ln, dp, ld, 1.f, 0.f);
  const int64_t nr = (n + W - 1) / W * W;
  float* inv = w.inv.data();
  float* delta = w.lse.data();  // the forward's lse slots, free here
  for (int64_t i = 0; i < Q; ++i) {  // per query: P (softmax_lse's bits) and rowsum(P dP), its selection, dS
    for (int64_t m = i * G; m < (i + 1) * G; ++m) {
      const auto x = [&](int64_t) { return s + m * ld; };
      softmax_delta(row_max(s + m * ld, nr), 1, nr, x, [&](int64_t) { return dp + m * ld; }, inv[m], delta[m]);
    }
    if (a.sel != nullptr) select_group(a, b, h, t0 + i, 1, n, s + i * G * ld, inv + i * G, w);
    for (int64_t m = i * G; m < (i + 1) * G; ++m) {
      const auto x = [&](int64_t) { return s + m * ld; };
      const auto y = [&](int64_t) { return dp + m * ld; };
      if (inv[m] == 0.f)
        dscores_none(1, nr, y, grow(m), dgate, lgs);
      else
        dscores_write(a, 1, nr, x, y, delta[m], inv[m], grow(m), gate, dgate, lgs);
    }
  }
  const int64_t ldk = a.Hkv * a.Dk;  // K rows of head h
  const float* kh = a.k + b * a.S * ldk + h * a.Dk;
  for (int64_t e = 0, c = 0; e < ns; c += ln[e], ++e) {
    for (int64_t i = 0; i < Q; ++i)  // dQ into dq: one query's G rows at a time (contiguous there)
      gemm<true>(dp + c + i * G * ld, ld, 1, kh + st[e] * ldk, ldk, ln[e], head_rows(a, dq, a.Dk, b, h, t0 + i),
                 a.Dk, G, a.Dk, a.scale);
    gemm<true>(dp + c, 1, ld, qb, a.Dk, M, dkh + st[e] * a.Dk, a.Dk, ln[e], a.Dk, a.scale);
    gemm<true>(s + c, 1, ld, db, a.Dv, M, dvh + st[e] * a.Dv, a.Dv, ln[e], a.Dv, 1.f);
  }
}

// ---------------------------------------------------------------------------------------------- selected, by block

// The selected branch over the queries [t0, t1) of one task (t1 - t0 <= QB), block by block instead
// of query by query. The queries of a task select overlapping blocks (the initial and local ones
// all of them), so each block's K / V tiles are read once for all the queries that selected it
// while they are in cache, and in the backward its dK / dV rows are one matmul over all their head
// rows (inner dimension G x queries instead of G). Each (query, block) pair's scores live in a slab
// [G, lp] of w.ps (and dP / dS of w.dps), the slabs in block order, so a block's slabs are one
// matrix. The forward keeps one block's slabs at a time (an online softmax, selected_forward); the
// backward keeps the task's, a query's row being its slabs in ascending block order, with
// backward_group's per-row arithmetic (each S row's max taken as its slab is made, in L1, and
// rowsum(P dP) summed as P is made: two passes over a row instead of four).

// the pairs of queries [t0, t1) sorted by block (w.pairs); for the backward also each query's slabs
// in ascending block order (w.slab[i n + e], e < w.nslab[i]); sizes the slabs
void selected_pairs(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& w, bool backward) {
  const int64_t Q = t1 - t0, lp = slab_width(a), nblk = (t1 - 1) / a.ls + 1;  // blocks <= the last query's
  // counting sort by block of the pairs made in query order: (block, query) order
  w.first.assign(nblk + 1, 0), w.blk.resize(Q * a.n), w.nsel.resize(Q);
  for (int64_t i = 0; i < Q; ++i) {
    int64_t* blk = w.blk.data() + i * a.n;
    w.nsel[i] = selected_blocks(a, b, h, t0 + i, blk);
    for (int64_t e = 0; e < w.nsel[i]; ++e) ++w.first[blk[e] + 1];
  }
  for (int64_t j = 0; j < nblk; ++j) w.first[j + 1] += w.first[j];
  w.pairs.resize(w.first[nblk]);
  for (int64_t i = 0; i < Q; ++i)
    for (int64_t e = 0; e < w.nsel[i]; ++e) {
      const int64_t j = w.blk[i * a.n + e];
      w.pairs[w.first[j]++] = {j, i, std::min(a.ls, t0 + i + 1 - j * a.ls)};
    }
  if (!backward) {  // the forward goes block by block (selected_forward): one block's slabs
    if (w.ps.size() < static_cast<size_t>(Q * a.G * lp)) w.ps.resize(Q * a.G * lp);
    return;
  }
  w.nslab.assign(Q, 0), w.slab.resize(Q * a.n);
  for (size_t k = 0; k < w.pairs.size(); ++k) {
    const int64_t i = w.pairs[k].i;
    w.slab[i * a.n + w.nslab[i]++] = static_cast<int64_t>(k);
  }
  const size_t need = w.pairs.size() * a.G * lp;
  if (w.ps.size() < need) w.ps.resize(need);
  if (w.pmax.size() < w.pairs.size() * a.G) w.pmax.resize(w.pairs.size() * a.G);
  if (w.dps.size() < need) w.dps.resize(need);
}

// the end of the run of pairs (sorted by block) that starts at p0: the pairs of block pairs[p0].j
NSA_INLINE size_t block_end(const std::vector<Pair>& pairs, size_t p0) {
  size_t p1 = p0;
  while (p1 < pairs.size() && pairs[p1].j == pairs[p0].j) ++p1;
  return p1;
}

// the backward's S and dP = dO V^T per pair into its slabs, -inf (0) from the pair's keys to lp, and
// the max of each S row into w.pmax: the block's K (V) tile is read once for all its queries (t0:
// the task's first), their q (dO) rows read where they are
void selected_scores(const Args& a, int64_t b, int64_t h, int64_t t0, Scratch& w) {
  const int64_t G = a.G, lp = slab_width(a);
  const Tiles tiles[2] = {k_tiles(a, b, h, w), v_tiles(a, b, h)};
  const float* rows[2] = {head_rows(a, a.q, a.Dk, b, h, t0), head_rows(a, a.dout, a.Dv, b, h, t0)};
  const int64_t ld[2] = {a.H * a.Dk, a.H * a.Dv};  // floats from one query's rows to the next's
  float* out[2] = {w.ps.data(), w.dps.data()};
  const int64_t D[2] = {a.Dk, a.Dv};
  const float scale[2] = {a.scale, 1.f}, pad[2] = {kNegInf, 0.f};
  for (size_t p0 = 0, p1; p0 < w.pairs.size(); p0 = p1) {
    p1 = block_end(w.pairs, p0);
    for (int x = 0; x < 2; ++x)  // S for the block's queries, then dP: one tile in L1 at a time
      for (size_t k = p0; k < p1; ++k) {
        const Pair& p = w.pairs[k];
        const int64_t st = p.j * a.ls, len = p.len, nr = (len + W - 1) / W * W;
        float* s = out[x] + k * G * lp;
        span_scores(rows[x] + p.i * ld[x], G, D[x], tiles[x], 1, &st, &len, s, lp, scale[x], pad[x]);
        if (nr < lp)
          for (int64_t g = 0; g < G; ++g) std::fill(s + g * lp + nr, s + (g + 1) * lp, pad[x]);
        if (x == 0)  // while the slab is in L1
          for (int64_t g = 0; g < G; ++g) w.pmax[k * G + g] = row_max(s + g * lp, lp);
      }
  }
}

// the segments of query i's row g in the slabs x (w.ps or w.dps): its slabs, in ascending block order
struct SlabRow {
  float* x;
  const int64_t* slab;
  int64_t g, G, lp;
  float* operator()(int64_t e) const { return x + (slab[e] * G + g) * lp; }
};

// row g of query i: the max of its slabs' rows (selected_scores'), -inf when it has none
NSA_INLINE float slab_max(const Scratch& w, int64_t n, int64_t G, int64_t i, int64_t g) {
  float mx = kNegInf;
  for (int64_t e = 0; e < w.nslab[i]; ++e) mx = std::max(mx, w.pmax[w.slab[i * n + e] * G + g]);
  return mx;
}

// the selected branch's outputs for queries [t0, t1): w.ob [Q G, Dv], w.lse [Q G]. Block by block
// with an online softmax (running max and sum per row, the row's output rescaled when its max
// grows): a block's slabs are gone once their P V is added, so it holds one block's slabs (at most
// a task's queries) instead of the task's (1 MB per thread with 32-query tasks, paper shapes). Per
// block its S for every pair (its K^T tile in L1), then P, then P V (its V rows in L1).
void selected_forward(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& w) {
  const int64_t G = a.G, Q = t1 - t0, lp = slab_width(a), Dv = a.Dv, ldv = a.Hkv * Dv;
  selected_pairs(a, b, h, t0, t1, w, false);
  float *ps = w.ps.data(), *ob = w.ob.data(), *mx = w.lse.data(), *sum = w.inv.data();
  std::fill(ob, ob + Q * G * Dv, 0.f), std::fill(mx, mx + Q * G, kNegInf), std::fill(sum, sum + Q * G, 0.f);
  const Tiles kt = k_tiles(a, b, h, w);
  const float* q0 = head_rows(a, a.q, a.Dk, b, h, t0);
  const float* vh = a.v + b * a.S * ldv + h * Dv;
  for (size_t p0 = 0, p1; p0 < w.pairs.size(); p0 = p1) {
    p1 = block_end(w.pairs, p0);
    const int64_t st = w.pairs[p0].j * a.ls;
    for (size_t k = p0; k < p1; ++k) {  // S and P of the block's pairs
      const Pair& p = w.pairs[k];
      const int64_t len = p.len, nr = (len + W - 1) / W * W;
      float* s = ps + (k - p0) * G * lp;
      span_scores(q0 + p.i * a.H * a.Dk, G, a.Dk, kt, 1, &st, &len, s, lp, a.scale, kNegInf);
      for (int64_t g = 0; g < G; ++g) {
        float* x = s + g * lp;
        const int64_t r = p.i * G + g;
        const float m = std::max(mx[r], row_max(x, nr));
        if (m == kNegInf) {  // nothing visible yet: P = 0
          std::fill(x, x + nr, 0.f);
          continue;
        }
        const float add = exp_sum(x, nr, m);
        if (m > mx[r]) {  // the row's max grew: rescale what it has summed
          if (mx[r] != kNegInf) {
            const float c = std::exp(mx[r] - m);
            sum[r] *= c;
            for (int64_t e = 0; e < Dv; ++e) ob[r * Dv + e] *= c;
          }
          mx[r] = m;
        }
        sum[r] += add;
      }
    }
    for (size_t k = p0; k < p1; ++k) {  // o += P V
      const Pair& p = w.pairs[k];
      gemm<true>(ps + (k - p0) * G * lp, lp, 1, vh + st * ldv, ldv, p.len, ob + p.i * G * Dv, Dv, G, Dv, 1.f);
    }
  }
  for (int64_t r = 0; r < Q * G; ++r) {  // mx, sum -> lse, inv (the same slots)
    const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
    mx[r] = sum[r] > 0.f ? mx[r] + std::log(sum[r]) : kNegInf, sum[r] = inv;
    for (int64_t e = 0; e < Dv; ++e) ob[r * Dv + e] *= inv;
  }
}

// The selected branch's backward for queries [t0, t1) (backward_group's arguments): S and dP per
// pair, softmax and dS per query, then per block the dQ of each of its queries (added to dq) and its
// dK / dV as one matmul each over the block's slabs and their q / dO rows, read where they are.
void selected_backward(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& w, float* dq,
                       float* dkh, float* dvh, const float* gate, float* dgate, int64_t lgs) {
  const int64_t G = a.G, Q = t1 - t0, ls = a.ls, lp = slab_width(a), Dk = a.Dk, Dv = a.Dv;
  selected_pairs(a, b, h, t0, t1, w, true);
  selected_scores(a, b, h, t0, w);
  float *ps = w.ps.data(), *dps = w.dps.data();
  const int64_t r0 = (b * a.T + t0) * a.H + h * G;
  for (int64_t i = 0; i < Q; ++i)  // P and dS per query, over its slabs
    for (int64_t g = 0; g < G; ++g) {
      const int64_t* sl = w.slab.data() + i * a.n;
      const SlabRow x{ps, sl, g, G, lp}, y{dps, sl, g, G, lp};
      softmax_dscores_row(a, slab_max(w, a.n, G, i, g), w.nslab[i], lp, x, y, r0 + i * a.H + g, gate, dgate, lgs);
    }
  const int64_t ldk = a.Hkv * Dk;  // K rows of head h
  const float* kh = a.k + b * a.S * ldk + h * Dk;
  w.xrows.resize(Q * G);
  for (size_t p0 = 0, p1; p0 < w.pairs.size(); p0 = p1) {  // per block: its queries' dQ, then dK, dV
    const int64_t st = w.pairs[p0].j * ls;
    int64_t len = 0;
    p1 = block_end(w.pairs, p0);
    for (size_t k = p0; k < p1; ++k) {
      const Pair& p = w.pairs[k];
      len = std::max(len, p.len);
      gemm<true>(dps + k * G * lp, lp, 1, kh + st * ldk, ldk, p.len, head_rows(a, dq, Dk, b, h, t0 + p.i), Dk, G,
                 Dk, a.scale);
    }
    // dK += scale dS^T q, dV += P^T dO: the slabs [m, lp] are A^T as they are
    const int64_t m = static_cast<int64_t>(p1 - p0) * G;
    for (int pass = 0; pass < 2; ++pass) {
      const float* x = pass == 0 ? a.q : a.dout;
      const int64_t D = pass == 0 ? Dk : Dv;
      for (size_t e = p0; e < p1; ++e)
        for (int64_t g = 0; g < G; ++g)
          w.xrows[(e - p0) * G + g] = head_rows(a, x, D, b, h, t0 + w.pairs[e].i) + g * D;
      const float* A = (pass == 0 ? dps : ps) + p0 * G * lp;
      float* y = pass == 0 ? dkh + st * Dk : dvh + st * Dv;
      gemm<true>(A, 1, lp, Gathered{w.xrows.data(), 0}, m, y, D, len, D, pass == 0 ? a.scale : 1.f);
    }
  }
}

// One branch over the next queries of [t, t_end) of KV head h in row b, in the unit its code takes:
// the selected branch up to QB queries at once (a task's; its backward all of [t, t_end), a
// backward block), the others one row group. attend_rows leaves the outputs in w.ob / w.lse
// (attend_group's), backward_rows adds the gradients (backward_group's arguments); both return how
// many queries they took.
int64_t attend_rows(const Args& a, int64_t b, int64_t h, int64_t t, int64_t t_end, Scratch& w) {
  if (a.mode == kSelected) {
    const int64_t Q = std::min(QB, t_end - t);
    selected_forward(a, b, h, t, t + Q, w);
    return Q;
  }
  const int64_t Q = group_size(t, t_end);
  attend_group(a, b, h, t, Q, w);
  return Q;
}

int64_t backward_rows(const Args& a, int64_t b, int64_t h, int64_t t, int64_t t_end, Scratch& w, float* dq,
                      float* dkh, float* dvh, const float* gate, float* dgate, int64_t lgs) {
  if (a.mode == kSelected) {
    selected_backward(a, b, h, t, t_end, w, dq, dkh, dvh, gate, dgate, lgs);
    return t_end - t;
  }
  const int64_t Q = group_size(t, t_end);
  backward_group(a, b, h, t, Q, w, dq, dkh, dvh, gate, dgate, lgs);
  return Q;
}

// Queries per block of a backward, whole QG groups (so the compressed branch selects exactly as in
// the forward): the selected branch's backward holds a block's P and dS slabs, and each selected
// block it reads serves more queries the larger the block (at 8k, paper shapes, 64 queries ~3%
// faster forward+backward than 32: bench/RESULTS.md, eighteenth session). So as many as keep
// those slabs within kSlabBytes per thread: 64 at paper shapes (64 KB of slabs per query), 32 at
// G = 16.
constexpr int64_t kSlabBytes = 4 << 20;
int64_t backward_block(const Args* sel) {
  if (sel == nullptr) return QB;
  const int64_t per_query = sel->n * sel->G * slab_width(*sel) * 2 * static_cast<int64_t>(sizeof(float));
  return std::clamp<int64_t>(kSlabBytes / std::max<int64_t>(per_query, 1) / QG, 1, 16) * QG;
}

// zeroes dq's rows of queries [t0, t1) of KV head h in row b (dq [B, T, H, Dk]) just before a task's
// branches add into them: in cache, by the task's thread, instead of a pass over the whole of dq first
NSA_INLINE void zero_dq(const Args& a, float* dq, int64_t b, int64_t h, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) std::fill_n(dq + ((b * a.T + t) * a.H + h * a.G) * a.Dk, a.G * a.Dk, 0.f);
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
  check_f32(q, "q", 4), check_f32(k, "k", 4), check_f32(v, "v", 4);
  Args a{};
  a.B = q.size(0), a.T = q.size(1), a.H = q.size(2), a.Dk = q.size(3);
  a.S = k.size(1), a.Hkv = k.size(2), a.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == a.B && k.size(3) == a.Dk && a.H % a.Hkv == 0, "nsa attention_cpu: bad k shape");
  TORCH_CHECK(v.size(0) == a.B && v.size(1) == a.S && v.size(2) == a.Hkv, "nsa attention_cpu: bad v shape");
  if (kT.numel() > 0) {  // else the forward makes the tiles it reads (TileCache)
    check_f32(kT, "kT", 5);
    a.NT = kT.size(2), a.kT = kT.data_ptr<float>();
    a.kt_t = a.Dk * TW, a.kt_h = a.NT * a.kt_t, a.kt_b = a.Hkv * a.kt_h;
    TORCH_CHECK(kT.size(0) == a.B && kT.size(1) == a.Hkv && kT.size(3) == a.Dk && kT.size(4) == TW &&
                    a.NT * TW >= a.S + TW,
                "nsa attention_cpu: kT must be [B, Hkv, >= S / 64 + 1, Dk, 64] (or empty)");
  }
  TORCH_CHECK(mode == kWindow || mode == kSelected || mode == kCompressed, "nsa attention_cpu: bad mode");
  TORCH_CHECK(mode == kCompressed || a.S == a.T, "nsa attention_cpu: keys and queries differ in length");
  a.G = a.H / a.Hkv, a.mode = mode, a.w = window, a.ls = select_len, a.l = block_len, a.d = stride;
  a.scale = static_cast<float>(scale);
  a.q = q.data_ptr<float>(), a.k = k.data_ptr<float>(), a.v = v.data_ptr<float>();
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

// ---------------------------------------------------------------------------------------------- forward phases

// Where a forward's selected branch finds its K^T tiles when it is given none. It reads random
// blocks, so transposing them as it goes (TileCache) costs ~25% of its forward at 8k; a transposed
// copy of K costs memory (an eighth of o at the paper's shapes, 4 MB at 8k). So the tiles live in
// o itself, in the rows no query has written yet: queries [0, c) read only the tiles of keys < c,
// which fill the first reach(c) ~ c Hkv Dk floats of o's batch row ([NT, Hkv, Dk, TW]: tile j of
// every head before tile j + 1), about c / G of its query rows. The queries run from the last to
// the first in phases, phase p over [cut[p + 1], cut[p]), each writing only rows above what it
// and every later phase read; the first few queries (at the paper's shapes 16: the last phase),
// whose rows hold the first tiles, transpose their tiles themselves (TileCache). Where the tiles do
// not fit (G = 1, or Dv much smaller than Dk), they get a tensor of their own, as the backward's kT.
struct ForwardPlan {
  std::vector<int64_t> cut;  // descending query cuts, cut[0] = T, cut.back() = 0
  bool in_output = false;  // the tiles are in o (the last phase uses TileCache)
  Tensor own;  // or here
  float* tiles = nullptr;  // what build_tiles fills (null: the tiles were given, or none are read)
};

// floats of a batch row of kT ([NT, Hkv, Dk, TW] tiles) that queries [0, c) read: the tiles of
// their keys and the next (a span's last whole vector may read past its tile)
NSA_INLINE int64_t tile_reach(int64_t c, int64_t Hkv, int64_t Dk) { return ((c - 1) / TW + 2) * Hkv * Dk * TW; }

// the plan of a forward whose output is o [B, T, H, Dv]; sets the selected branch's kT (sel: its
// Args, null when it does not run) when it was given none
ForwardPlan plan_forward(Args* sel, const Tensor& o) {
  ForwardPlan p;
  const int64_t T = o.size(1), row = o.size(2) * o.size(3);  // floats per query row of o
  p.cut = {T, 0};
  if (sel == nullptr || sel->kT != nullptr || T == 0) return p;
  Args& a = *sel;
  std::vector<int64_t> cut{T};
  for (int64_t c = T;;) {  // the rows the tiles of queries < c reach, rounded up to whole tasks
    const int64_t next = ((tile_reach(c, a.Hkv, a.Dk) + row - 1) / row + QB - 1) / QB * QB;
    if (next >= c) break;
    cut.push_back(c = next);
  }
  a.NT = (T - 1) / TW + 2, a.kt_t = a.Dk * TW;
  p.in_output = tile_reach(T, a.Hkv, a.Dk) <= T * row && cut.back() <= T / 2;
  if (p.in_output) {  // [B, T, H, Dv] rows hold [B, NT, Hkv, Dk, TW] tiles
    p.cut = cut, p.cut.push_back(0), p.tiles = o.data_ptr<float>();
    a.kt_h = a.kt_t, a.kt_t *= a.Hkv, a.kt_b = T * row;
  } else {
    p.own = at::empty({a.B, a.Hkv, a.NT, a.Dk, TW}, o.options()), p.tiles = p.own.data_ptr<float>();
    a.kt_h = a.NT * a.kt_t, a.kt_b = a.Hkv * a.kt_h;
  }
  a.kT = p.tiles;
  return p;
}

// p.tiles <- a's K^T tiles (zeros past S), by the threads of the caller's parallel region
void build_tiles(const Args& a, const ForwardPlan& p) {
  if (p.tiles == nullptr) return;
  const int64_t per_b = a.NT * a.Hkv, ldk = a.Hkv * a.Dk;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < a.B * per_b; ++i) {
    const int64_t b = i / per_b, j = i % per_b / a.Hkv, h = i % a.Hkv;
    const int64_t n = std::max<int64_t>(0, std::min(TW, a.S - j * TW));
    float* out = p.tiles + b * a.kt_b + h * a.kt_h + j * a.kt_t;
    transpose_tile(a.k + (b * a.S + j * TW) * ldk + h * a.Dk, ldk, n, a.Dk, out);
  }
}

// task(b, h, t0, t1, cached) for every task of the forward (QB queries [t0, t1) of KV head h in
// batch row b), phase after phase (each a barrier: its tasks read tiles in rows no task of it or
// before it writes); cached: the task must make its selected tiles itself. Call inside a parallel
// region, from every thread.
template <class Task>
void forward_tasks(const ForwardPlan& p, int64_t B, int64_t Hkv, Task&& task) {
  for (size_t f = 0; f + 1 < p.cut.size(); ++f) {
    const int64_t hi = p.cut[f], g0 = p.cut[f + 1] / QB, ng = (hi + QB - 1) / QB - g0, tasks = B * Hkv * ng;
    const bool cached = p.in_output && f + 2 == p.cut.size();
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t bh = i / ng, t0 = (g0 + i % ng) * QB;
      task(bh / Hkv, bh % Hkv, t0, std::min(hi, t0 + QB), cached);
    }
  }
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
  const ForwardPlan plan = plan_forward(mode == kSelected ? &a : nullptr, o);
  const Args* br[1] = {&a};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 1, false);
    Args mine = a;
    build_tiles(a, plan);
    forward_tasks(plan, a.B, a.Hkv, [&](int64_t b, int64_t h, int64_t t0, int64_t t1, bool cached) {
      mine.kT = cached ? nullptr : a.kT;
      for (int64_t t = t0, Q; t < t1; t += Q) {
        Q = attend_rows(mine, b, h, t, t1, w);
        for (int64_t m = 0; m < Q * a.G; ++m) {
          const int64_t r = (b * a.T + t + m / a.G) * a.H + h * a.G + m % a.G;
          std::memcpy(op + r * a.Dv, w.ob.data() + m * a.Dv, a.Dv * sizeof(float));
          lp[r] = w.lse[m];
        }
      }
    });
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
  TORCH_CHECK(a.kT != nullptr, "nsa attention_cpu: the backward needs kT");
  a.vT = vT.data_ptr<float>(), a.dout = dout.data_ptr<float>();
  if (dlse.numel() > 0) {
    check_f32(dlse, "dlse", 3);
    a.dlse = dlse.data_ptr<float>();
  }
  Tensor dq = at::empty({a.B, a.T, a.H, a.Dk}, q.options());  // zeroed by the tasks (zero_dq)
  Tensor dkh = at::zeros({a.B, a.Hkv, a.S, a.Dk}, q.options());
  Tensor dvh = at::zeros({a.B, a.Hkv, a.S, a.Dv}, q.options());
  float *dqp = dq.data_ptr<float>(), *dkp = dkh.data_ptr<float>(), *dvp = dvh.data_ptr<float>();
  const int64_t BH = a.B * a.Hkv;
  BackwardSplit split(BH, a.T, a.S * (a.Dk + a.Dv), mode == kCompressed);
  const int64_t qbb = backward_block(mode == kSelected ? &a : nullptr);
  const Args* br[1] = {&a};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 1, true);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < split.tasks; ++i) {
      const int64_t bh = i / split.parts, p = i % split.parts, b = bh / a.Hkv, h = bh % a.Hkv;
      float* buf = split.buffer(i);
      float* dk = buf != nullptr ? buf : dkp + bh * a.S * a.Dk;
      float* dv = buf != nullptr ? buf + a.S * a.Dk : dvp + bh * a.S * a.Dv;
      for (int64_t t0 = split.cut[p]; t0 < split.cut[p + 1]; t0 += qbb) {  // whole QG groups: the forward's
        const int64_t t1 = std::min(split.cut[p + 1], t0 + qbb);
        zero_dq(a, dqp, b, h, t0, t1);
        for (int64_t t = t0; t < t1;) t += backward_rows(a, b, h, t, t1, w, dqp, dk, dv, nullptr, nullptr, 0);
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
  // queries: the most one task or backward block takes
  ThreadBranches(const Fused& f, int64_t queries) : br{f.br[0], f.br[1], f.br[2]} {
    if (!f.local_sel) return;
    rows.resize(queries * f.num_select);
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
  const ForwardPlan plan = plan_forward(f.run[1] ? &f.br[1] : nullptr, o);
  const Args* br[3] = {f.run[0] ? &f.br[0] : nullptr, f.run[1] ? &f.br[1] : nullptr, f.run[2] ? &f.br[2] : nullptr};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 3, false);
    ThreadBranches mine(f, QB);
    build_tiles(f.br[1], plan);
    forward_tasks(plan, B, Hkv, [&](int64_t b, int64_t h, int64_t t0, int64_t t1, bool cached) {
      mine.at(t0);
      if (f.run[1]) mine.br[1].kT = cached ? nullptr : f.br[1].kT;
      for (int64_t t = t0; t < t1; ++t) {
        float* rows = op + ((b * T + t) * H + h * G) * Dv;
        std::fill(rows, rows + G * Dv, 0.f);
      }
      for (int c = 0; c < 3; ++c) {  // compressed first: it selects the blocks the selected branch reads
        if (!f.run[c]) continue;
        const Args& a = mine.br[c];
        for (int64_t t = t0, Q; t < t1; t += Q) {
          Q = attend_rows(a, b, h, t, t1, w);
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
    });
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
  Tensor dq = at::empty({B, T, H, Dk}, q.options());  // zeroed by the tasks (zero_dq)
  Tensor dgates = at::zeros({B, T, H, 3}, q.options());
  std::vector<Tensor> dkh(3), dvh(3);
  int64_t per_task = 0, offset[3] = {0, 0, 0};
  for (int c = 0; c < 3; ++c) {
    if (!f.on[c]) continue;
    Args& a = f.br[c];
    check_f32(vT[c], "vT", 5);
    TORCH_CHECK(vT[c].size(2) == a.NT && vT[c].size(3) == a.Dv && vT[c].size(4) == TW, "nsa attention_cpu: vT shape");
    TORCH_CHECK(a.kT != nullptr, "nsa attention_cpu: the backward needs kT");
    a.vT = vT[c].data_ptr<float>(), a.dout = dout.data_ptr<float>();
    dkh[c] = at::zeros({B, Hkv, a.S, a.Dk}, q.options()), dvh[c] = at::zeros({B, Hkv, a.S, a.Dv}, q.options());
    offset[c] = per_task, per_task += a.S * (a.Dk + a.Dv);
  }
  TORCH_CHECK(dout.size(1) == T && dout.size(2) == H && dout.size(3) == a0.Dv, "nsa attention_cpu: dout shape");
  BackwardSplit split(BH, T, per_task, false);
  const int64_t qbb = backward_block(f.run[1] ? &f.br[1] : nullptr);
  float *dqp = dq.data_ptr<float>(), *dgp = dgates.data_ptr<float>();
  const Args* br[3] = {f.run[0] ? &f.br[0] : nullptr, f.run[1] ? &f.br[1] : nullptr, f.run[2] ? &f.br[2] : nullptr};
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    Scratch w;
    w.init(br, 3, true);
    ThreadBranches mine(f, qbb);
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
      for (int64_t t0 = split.cut[p]; t0 < split.cut[p + 1]; t0 += qbb) {
        const int64_t t1 = std::min(split.cut[p + 1], t0 + qbb);
        mine.at(t0);
        zero_dq(a0, dqp, b, h, t0, t1);
        for (int c = 0; c < 3; ++c) {
          if (!f.run[c]) continue;
          const Args& a = mine.br[c];
          const float* gate = f.gates != nullptr ? f.gates + c : nullptr;
          for (int64_t t = t0; t < t1;)  // the compressed branch, off: only its selection
            t += f.on[c] ? backward_rows(a, b, h, t, t1, w, dqp, dk[c], dv[c], gate, dgp + c, 3)
                         : attend_rows(a, b, h, t, t1, w);
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
