// One-token NSA decode step on the CPU, float32: the attention core of nsa.cache.decode_token
// (compressed attention, selection scores, top-n, selected attention, sliding window) fused into
// one call that reads the cache's head-major buffers in place, plus the RoPE + cache write of the
// new token. Built at first use by nsa/ops/decode_cpu.py; nsa.cache.decode_token is the reference.
//
// Built with -march=native for the CPU it runs on (the build folder's name carries a fingerprint of
// that CPU); the vector code is GCC's generic vector extension, 16 float lanes.
//
// Layout: q [B, Hkv, G, Dk]; buffers [B, Hkv, rows, D] contiguous; out [B, Hkv, G, 3, Dv]
// (branches cmp, slc, win). One (row, KV head) per task of at::parallel_for: the G query heads of
// a group share every K/V row they read (the paper's group-centric order).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#define NSA_INLINE inline __attribute__((always_inline))

namespace {

using at::Tensor;

constexpr int W = 16;  // lanes of the generic vector type (one AVX-512 register)
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

NSA_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
NSA_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
NSA_INLINE vf splat(float x) { return vf{} + x; }

// lane k of the result = sum of the lanes of a[k] (a 16 x 16 transpose-and-add in 4 shuffle rounds)
NSA_INLINE vf hsum16(const vf* a) {
  vf t[8], u[4], v[2];
  for (int m = 0; m < 8; ++m)
    t[m] = __builtin_shuffle(a[2 * m], a[2 * m + 1], vi{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(a[2 * m], a[2 * m + 1], vi{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int m = 0; m < 4; ++m)
    u[m] = __builtin_shuffle(t[2 * m], t[2 * m + 1], vi{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(t[2 * m], t[2 * m + 1], vi{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int m = 0; m < 2; ++m)
    v[m] = __builtin_shuffle(u[2 * m], u[2 * m + 1], vi{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(u[2 * m], u[2 * m + 1], vi{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(v[0], v[1], vi{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(v[0], v[1], vi{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

// exp(x) for x <= 0 (softmax after the max is subtracted): 2^n * poly(r), Cephes' expf
// polynomial, ~1 ulp; exactly 0 below -87.3 (where float32 exp leaves the normal range) and at -inf
NSA_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.3f);
  const vf xc = x < lo ? lo : x;
  const vf t = xc * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(t, vi);  // truncation; floor for the negative t below
  n += (__builtin_convertvector(n, vf) > t);  // true lanes are -1
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (n + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < lo ? vf{} : p * two_n;
}

#ifndef NSA_PREFETCH
#define NSA_PREFETCH 1024  // floats ahead of the row being read (4 KB): K/V rows stream from L3/DRAM
#endif

// s[r][i] = scale * q[r] . K[i] for R query rows and n key rows (both Dk long). C > 0: Dk == C * W and
// the query rows stay in registers; C == 0: any Dk.
template <int R, int C>
NSA_INLINE void scores_rows(const float* q, int64_t Dk, const float* K, int64_t n, float* s, int64_t lds,
                            float scale) {
  const int64_t Dw = C ? C * W : Dk - Dk % W;
  vf qr[R][C ? C : 1];
  if constexpr (C > 0)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) qr[r][c] = load(q + r * Dk + c * W);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vf acc[R][W];
    float tail[R][W];
    for (int k = 0; k < W; ++k) {
      const float* kr = K + (i + k) * Dk;
      vf a[R];
      for (int r = 0; r < R; ++r) a[r] = vf{};
      if constexpr (C > 0) {
        for (int c = 0; c < C; ++c) {
          __builtin_prefetch(kr + c * W + NSA_PREFETCH);
          const vf kv = load(kr + c * W);
          for (int r = 0; r < R; ++r) a[r] += qr[r][c] * kv;
        }
      } else {
        for (int64_t d = 0; d < Dw; d += W) {
          __builtin_prefetch(kr + d + NSA_PREFETCH);
          const vf kv = load(kr + d);
          for (int r = 0; r < R; ++r) a[r] += load(q + r * Dk + d) * kv;
        }
      }
      for (int r = 0; r < R; ++r) {
        acc[r][k] = a[r];
        float x = 0.f;
        for (int64_t d = Dw; d < Dk; ++d) x += q[r * Dk + d] * kr[d];
        tail[r][k] = x;
      }
    }
    for (int r = 0; r < R; ++r) store(s + r * lds + i, (hsum16(acc[r]) + load(tail[r])) * scale);
  }
  for (; i < n; ++i) {
    const float* kr = K + i * Dk;
    for (int r = 0; r < R; ++r) {
      vf a = vf{};
      for (int64_t d = 0; d < Dw; d += W) a += load(q + r * Dk + d) * load(kr + d);
      float x = 0.f;
      for (int k = 0; k < W; ++k) x += a[k];
      for (int64_t d = Dw; d < Dk; ++d) x += q[r * Dk + d] * kr[d];
      s[r * lds + i] = x * scale;
    }
  }
}

// o[r][c0 : c0 + CB*W] += sum_i p[r][i] V[i][c0 : c0 + CB*W], the R x CB accumulators in registers
template <int R, int CB>
NSA_INLINE void pv_block(const float* p, int64_t ldp, const float* V, int64_t n, int64_t Dv, int64_t c0, float* o,
                         int64_t ldo) {
  vf a[R][CB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) a[r][c] = load(o + r * ldo + c0 + c * W);
  for (int64_t i = 0; i < n; ++i) {
    const float* vr = V + i * Dv + c0;
    vf v[CB];
    for (int c = 0; c < CB; ++c) {
      __builtin_prefetch(vr + c * W + NSA_PREFETCH);
      v[c] = load(vr + c * W);
    }
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * ldp + i];
      for (int c = 0; c < CB; ++c) a[r][c] += pr * v[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CB; ++c) store(o + r * ldo + c0 + c * W, a[r][c]);
}

// o[r] += sum_i p[r][i] V[i] for R rows (p stride ldp, o stride ldo), n value rows (stride Dv)
template <int R>
NSA_INLINE void pv_rows(const float* p, int64_t ldp, const float* V, int64_t n, int64_t Dv, float* o, int64_t ldo) {
  const int64_t Dw = Dv - Dv % W;
  int64_t c0 = 0;
  for (; c0 + 4 * W <= Dw; c0 += 4 * W) pv_block<R, 4>(p, ldp, V, n, Dv, c0, o, ldo);
  switch ((Dw - c0) / W) {
    case 3: pv_block<R, 3>(p, ldp, V, n, Dv, c0, o, ldo); break;
    case 2: pv_block<R, 2>(p, ldp, V, n, Dv, c0, o, ldo); break;
    case 1: pv_block<R, 1>(p, ldp, V, n, Dv, c0, o, ldo); break;
    default: break;
  }
  for (int64_t c = Dw; c < Dv; ++c)  // columns past the last whole vector
    for (int r = 0; r < R; ++r) {
      float a = o[r * ldo + c];
      for (int64_t i = 0; i < n; ++i) a += p[r * ldp + i] * V[i * Dv + c];
      o[r * ldo + c] = a;
    }
}

template <int R>
NSA_INLINE void scores_dispatch(const float* q, int64_t Dk, const float* K, int64_t n, float* s, int64_t lds,
                                float scale) {
  switch (Dk % W ? 0 : Dk / W) {
    case 1: scores_rows<R, 1>(q, Dk, K, n, s, lds, scale); break;
    case 2: scores_rows<R, 2>(q, Dk, K, n, s, lds, scale); break;
    case 3: scores_rows<R, 3>(q, Dk, K, n, s, lds, scale); break;
    case 4: scores_rows<R, 4>(q, Dk, K, n, s, lds, scale); break;
    default: scores_rows<R, 0>(q, Dk, K, n, s, lds, scale);
  }
}

// the G query rows in groups of up to 4 (each K/V row loaded once per group)
NSA_INLINE void scores(const float* q, int64_t G, int64_t Dk, const float* K, int64_t n, float* s, int64_t lds,
                       float scale) {
  for (int64_t g = 0; g < G; g += 4) {
    const float* qg = q + g * Dk;
    float* sg = s + g * lds;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: scores_dispatch<4>(qg, Dk, K, n, sg, lds, scale); break;
      case 3: scores_dispatch<3>(qg, Dk, K, n, sg, lds, scale); break;
      case 2: scores_dispatch<2>(qg, Dk, K, n, sg, lds, scale); break;
      default: scores_dispatch<1>(qg, Dk, K, n, sg, lds, scale);
    }
  }
}

NSA_INLINE void pv(const float* p, int64_t G, int64_t ldp, const float* V, int64_t n, int64_t Dv, float* o,
                   int64_t ldo) {
  for (int64_t g = 0; g < G; g += 4) {
    const float* pg = p + g * ldp;
    float* og = o + g * ldo;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: pv_rows<4>(pg, ldp, V, n, Dv, og, ldo); break;
      case 3: pv_rows<3>(pg, ldp, V, n, Dv, og, ldo); break;
      case 2: pv_rows<2>(pg, ldp, V, n, Dv, og, ldo); break;
      default: pv_rows<1>(pg, ldp, V, n, Dv, og, ldo);
    }
  }
}

// softmax of each of the G rows s[g][:n] in place (n >= 1)
NSA_INLINE void softmax(float* s, int64_t G, int64_t n, int64_t lds) {
  const int64_t nw = n - n % W;
  for (int64_t g = 0; g < G; ++g) {
    float* x = s + g * lds;
    float tail[W];
    for (int k = 0; k < W; ++k) tail[k] = nw + k < n ? x[nw + k] : -std::numeric_limits<float>::infinity();
    vf m = load(tail);
    for (int64_t i = 0; i < nw; i += W) {
      const vf v = load(x + i);
      m = v > m ? v : m;
    }
    float mx = m[0];
    for (int k = 1; k < W; ++k) mx = std::max(mx, m[k]);
    vf sum = vf{};
    for (int64_t i = 0; i < nw; i += W) {
      const vf e = vexp(load(x + i) - mx);
      store(x + i, e);
      sum += e;
    }
    const vf et = vexp(load(tail) - mx);
    sum += et;
    float tot = 0.f;
    for (int k = 0; k < W; ++k) tot += sum[k];
    const float inv = 1.f / tot;
    for (int64_t i = 0; i < nw; i += W) store(x + i, load(x + i) * inv);
    for (int64_t i = nw; i < n; ++i) x[i] = et[i - nw] * inv;
  }
}

struct Step {
  const float *q, *k_cmp, *v_cmp, *k_slc, *v_slc, *k_win, *v_win;
  float* out;
  int64_t* idx;
  int64_t G, Dk, Dv, N, rows_cmp, rows_slc, rows_win;  // rows_*: each buffer's rows per (row, KV head)
  int64_t t, l, d, ls, w, num_select, num_init, num_local, k;
  float scale;
  bool want_cmp, want_slc, want_win;
};

// the three branch outputs of one (row, KV head) pair
void head_step(const Step& a, int64_t bh) {
  static thread_local std::vector<float> buf;
  const int64_t G = a.G, Dk = a.Dk, Dv = a.Dv, ld_out = 3 * Dv;
  const float* q = a.q + bh * G * Dk;
  float* out = a.out + bh * G * ld_out;
  const int64_t n_sel = a.t / a.ls + 1, per = a.ls / a.d, span = a.l / a.d, K = n_sel * per;
  const int64_t n_win = std::min(a.t + 1, a.w);
  const int64_t cols = std::max({a.N, a.k * a.ls, n_win});
  buf.resize(G * cols + K + span + n_sel);
  float* s = buf.data();

  // compressed branch: every cached entry is visible to the newest token
  if (a.want_cmp || a.want_slc) {
    const int64_t N = a.N;
    float* P = s + G * cols;  // group sum of the probabilities, padded: P[span - 1 + i] = p[i]
    std::fill(P, P + K + span - 1, 0.f);
    if (N > 0) {
      const float* kc = a.k_cmp + bh * a.rows_cmp * Dk;
      const float* vc = a.v_cmp + bh * a.rows_cmp * Dv;
      scores(q, G, Dk, kc, N, s, N, a.scale);
      softmax(s, G, N, N);
      if (a.want_cmp) pv(s, G, N, vc, N, Dv, out, ld_out);
      const int64_t Nk = std::min(N, K);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < Nk; ++i) P[span - 1 + i] += s[g * N + i];
    }
    if (a.want_slc) {
      // S[j] = sum_{m < l'/d} sum_{u < l/d} P_t[(l'/d) j + m - u] (in the padded P: P[per j + m + span-1-u]),
      // summed in the torch path's order; forced blocks first; top-n, ties to the lower j
      float* S = P + K + span;
      for (int64_t j = 0; j < n_sel; ++j) {
        float x = 0.f;
        for (int64_t m = 0; m < per; ++m) {
          float y = 0.f;
          for (int64_t u = 0; u < span; ++u) y += P[per * j + m + u];
          x += y;
        }
        const bool forced = j < a.num_init || j >= n_sel - a.num_local;
        S[j] = forced ? std::numeric_limits<float>::infinity() : x;
      }
      int64_t* top = a.idx + bh * a.k;
      int64_t cnt = 0;
      for (int64_t j = 0; j < n_sel; ++j) {  // ascending j: an equal score never displaces a kept one
        int64_t pos = cnt;
        while (pos > 0 && S[top[pos - 1]] < S[j]) --pos;
        if (pos >= a.k) continue;
        for (int64_t e = std::min(cnt, a.k - 1); e > pos; --e) top[e] = top[e - 1];
        top[pos] = j;
        cnt = std::min(cnt + 1, a.k);
      }
      std::sort(top, top + a.k);
      // attend over the tokens s <= t of the selected blocks, gathered block by block
      const float* ks = a.k_slc + bh * a.rows_slc * Dk;
      const float* vs = a.v_slc + bh * a.rows_slc * Dv;
      const int64_t ld = a.k * a.ls;
      int64_t n = 0;
      for (int64_t e = 0; e < a.k; ++e) {
        const int64_t r0 = top[e] * a.ls, rn = std::min(a.ls, a.t + 1 - r0);
        scores(q, G, Dk, ks + r0 * Dk, rn, s + n, ld, a.scale);
        n += rn;
      }
      softmax(s, G, n, ld);
      n = 0;
      for (int64_t e = 0; e < a.k; ++e) {
        const int64_t r0 = top[e] * a.ls, rn = std::min(a.ls, a.t + 1 - r0);
        pv(s + n, G, ld, vs + r0 * Dv, rn, Dv, out + Dv, ld_out);
        n += rn;
      }
    }
  }
  // sliding window: before the ring is full position p is in slot p, after it holds exactly the window
  if (a.want_win) {
    const float* kw = a.k_win + bh * a.rows_win * Dk;
    const float* vw = a.v_win + bh * a.rows_win * Dv;
    scores(q, G, Dk, kw, n_win, s, n_win, a.scale);
    softmax(s, G, n_win, n_win);
    pv(s, G, n_win, vw, n_win, Dv, out + 2 * Dv, ld_out);
  }
}

void check_buffer(const Tensor& x, const char* name, int64_t B, int64_t Hkv) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 4 &&
                  x.size(0) == B && x.size(1) == Hkv,
              "nsa decode_cpu: ", name, " must be a contiguous float32 CPU tensor [B, Hkv, rows, D]");
}

NSA_INLINE float dot(const float* a, const float* b, int64_t n) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + W <= n; i += W) acc += load(a + i) * load(b + i);
  float x = 0.f;
  for (int k = 0; k < W; ++k) x += acc[k];
  for (; i < n; ++i) x += a[i] * b[i];
  return x;
}

// The newest token's branch outputs out [B, Hkv, G, 3, Dv] (zeros for a branch not asked for) and
// selected blocks idx [B, Hkv, k]. With the gate inputs x [B, 1, C], gate_w [H*3, C], gate_b [H*3]:
// also the gates g = sigmoid(gate_b + gate_scale * gate_w x) [B, 1, H, 3] and the gated sum
// o = sum_c g_c * out_c [B, 1, H*Dv] (NSAAttention.gates and its sum, for the layer's step).
std::vector<Tensor> attend(const Tensor& q, const Tensor& k_cmp, const Tensor& v_cmp, int64_t N, const Tensor& k_slc,
                           const Tensor& v_slc, const Tensor& k_win, const Tensor& v_win, int64_t t, int64_t block_len,
                           int64_t stride, int64_t select_len, int64_t num_select, int64_t num_init,
                           int64_t num_local, double scale, bool want_cmp, bool want_slc, bool want_win,
                           const std::optional<Tensor>& x_, const std::optional<Tensor>& gate_w_,
                           const std::optional<Tensor>& gate_b_, double gate_scale) {
  const int64_t B = k_slc.size(0), Hkv = k_slc.size(1), Dk = k_slc.size(3), Dv = v_slc.size(3);
  for (auto [x, name] : {std::pair<const Tensor&, const char*>{k_cmp, "k_cmp"}, {v_cmp, "v_cmp"}, {k_slc, "k_slc"},
                         {v_slc, "v_slc"}, {k_win, "k_win"}, {v_win, "v_win"}})
    check_buffer(x, name, B, Hkv);
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.is_contiguous() &&
                  q.numel() % (B * Hkv * Dk) == 0,
              "nsa decode_cpu: q must be a contiguous float32 CPU tensor [B, Hkv, G, Dk]");
  TORCH_CHECK(k_cmp.size(3) == Dk && k_win.size(3) == Dk && v_cmp.size(3) == Dv && v_win.size(3) == Dv,
              "nsa decode_cpu: head dims differ between buffers");
  TORCH_CHECK(t >= 0 && (t + 1) <= k_slc.size(2) && N >= 0 && N <= k_cmp.size(2) && N <= v_cmp.size(2) &&
                  k_win.size(2) == v_win.size(2) && k_slc.size(2) == v_slc.size(2) && k_slc.size(2) % select_len == 0,
              "nsa decode_cpu: position or compressed count outside the buffers");
  TORCH_CHECK(select_len % stride == 0 && block_len % stride == 0 && num_select >= 1,
              "nsa decode_cpu: bad block parameters");
  const int64_t G = q.numel() / (B * Hkv * Dk), n_sel = t / select_len + 1;
  Step a;
  a.q = q.data_ptr<float>();
  a.k_cmp = k_cmp.data_ptr<float>(), a.v_cmp = v_cmp.data_ptr<float>();
  a.k_slc = k_slc.data_ptr<float>(), a.v_slc = v_slc.data_ptr<float>();
  a.k_win = k_win.data_ptr<float>(), a.v_win = v_win.data_ptr<float>();
  a.G = G, a.Dk = Dk, a.Dv = Dv, a.N = N;
  a.rows_cmp = k_cmp.size(2), a.rows_slc = k_slc.size(2), a.rows_win = k_win.size(2);
  TORCH_CHECK(v_cmp.size(2) == a.rows_cmp, "nsa decode_cpu: k_cmp and v_cmp rows differ");
  a.t = t, a.l = block_len, a.d = stride, a.ls = select_len, a.w = k_win.size(2);
  a.num_select = num_select, a.num_init = num_init, a.num_local = num_local;
  a.k = std::min(num_select, n_sel);
  a.scale = static_cast<float>(scale);
  a.want_cmp = want_cmp, a.want_slc = want_slc, a.want_win = want_win;
  Tensor out = at::zeros({B, Hkv, G, 3, Dv}, q.options());
  Tensor idx = at::empty({B, Hkv, want_slc ? a.k : 0}, q.options().dtype(at::kLong));
  a.out = out.data_ptr<float>();
  a.idx = idx.data_ptr<int64_t>();
  // K/V floats the step reads: below ~1 MB a second thread costs more than it saves
  const int64_t work = B * Hkv * (N + a.k * select_len + std::min(t + 1, a.w)) * (Dk + Dv);
  at::parallel_for(0, B * Hkv, work >= (1 << 18) ? 1 : B * Hkv, [&](int64_t b0, int64_t b1) {
    for (int64_t bh = b0; bh < b1; ++bh) head_step(a, bh);
  });
  if (!x_.has_value()) return {out, idx};

  const int64_t H = Hkv * G;
  const Tensor x = x_->contiguous(), gate_w = gate_w_.value().contiguous(), gate_b = gate_b_.value().contiguous();
  const int64_t C = gate_w.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && gate_w.scalar_type() == at::kFloat &&
                  gate_b.scalar_type() == at::kFloat && x.numel() == B * C && gate_w.size(0) == 3 * H &&
                  gate_b.numel() == 3 * H,
              "nsa decode_cpu: gate inputs must be float32 x [B, 1, C], gate_w [H*3, C], gate_b [H*3]");
  Tensor g = at::empty({B, 1, H, 3}, q.options()), o = at::empty({B, 1, H * Dv}, q.options());
  const float *xp = x.data_ptr<float>(), *wp = gate_w.data_ptr<float>(), *bp = gate_b.data_ptr<float>();
  const float* op = a.out;
  float *gp = g.data_ptr<float>(), *yp = o.data_ptr<float>();
  const bool want[3] = {want_cmp, want_slc, want_win};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float* gh = gp + (b * H + h) * 3;
      for (int64_t c = 0; c < 3; ++c) {
        const float z = bp[h * 3 + c] + static_cast<float>(gate_scale) * dot(xp + b * C, wp + (h * 3 + c) * C, C);
        gh[c] = 1.f / (1.f + std::exp(-z));
      }
      float* y = yp + (b * H + h) * Dv;
      const float* ob = op + (b * H + h) * 3 * Dv;
      for (int64_t e = 0; e < Dv; ++e) y[e] = 0.f;
      for (int64_t c = 0; c < 3; ++c)
        if (want[c])
          for (int64_t e = 0; e < Dv; ++e) y[e] += gh[c] * ob[c * Dv + e];
    }
  return {out, idx, o, g};
}

// RoPE (rotate-half) of q in place and of each branch's new key, written with its value into the
// cache: the compressed branch's tail at row ti, the selected branch's raw buffer at row s, the
// window ring at row slot. q [B, 1, H*Dk], kv [B, 1, nb*Hkv*(Dk+Dv)] (branch-major: cmp, slc, win;
// nb = 1 when the branches share K/V), cos/sin [B, 1, Dk/2].
void rope_store(const Tensor& q, const Tensor& kv, const Tensor& cos_, const Tensor& sin_, int64_t nb,
                const Tensor& k_tail, const Tensor& v_tail, int64_t ti, const Tensor& k_slc, const Tensor& v_slc,
                int64_t s, const Tensor& k_win, const Tensor& v_win, int64_t slot) {
  const int64_t B = k_slc.size(0), Hkv = k_slc.size(1), Dk = k_slc.size(3), Dv = v_slc.size(3), half = Dk / 2;
  for (auto [x, name] : {std::pair<const Tensor&, const char*>{k_tail, "k_tail"}, {v_tail, "v_tail"},
                         {k_slc, "k_slc"}, {v_slc, "v_slc"}, {k_win, "k_win"}, {v_win, "v_win"}})
    check_buffer(x, name, B, Hkv);
  TORCH_CHECK(nb == 1 || nb == 3, "nsa decode_cpu: nb must be 1 or 3");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat && q.is_contiguous() &&
                  kv.is_contiguous() && q.numel() % (B * Dk) == 0 && kv.numel() == B * nb * Hkv * (Dk + Dv),
              "nsa decode_cpu: q, kv must be contiguous float32 [B, 1, H*Dk], [B, 1, nb*Hkv*(Dk+Dv)]");
  TORCH_CHECK(0 <= ti && ti < k_tail.size(2) && 0 <= s && s < k_slc.size(2) && 0 <= slot && slot < k_win.size(2),
              "nsa decode_cpu: write position outside the buffers");
  const Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  TORCH_CHECK(cos.numel() == B * half && sin.numel() == B * half, "nsa decode_cpu: cos/sin must be [B, 1, Dk/2]");
  const int64_t H = q.numel() / (B * Dk);
  float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  auto rotate = [half](const float* x, const float* c, const float* sn, float* y) {
    for (int64_t i = 0; i < half; ++i) {  // same products and sums as nsa.rope.apply_rotary
      const float x1 = x[i], x2 = x[i + half];
      y[i] = x1 * c[i] - x2 * sn[i];
      y[i + half] = x2 * c[i] + x1 * sn[i];
    }
  };
  struct Dst {
    const Tensor &k, &v;
    int64_t row, branch;
  };
  const Dst dst[3] = {{k_tail, v_tail, ti, 0}, {k_slc, v_slc, s, nb == 3 ? 1 : 0}, {k_win, v_win, slot, nb == 3 ? 2 : 0}};
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos.data_ptr<float>() + b * half;
    const float* sn = sin.data_ptr<float>() + b * half;
    float tmp[1024];
    TORCH_CHECK(Dk <= 1024, "nsa decode_cpu: head_dim_k > 1024");
    for (int64_t h = 0; h < H; ++h) {
      float* x = qp + (b * H + h) * Dk;
      rotate(x, c, sn, tmp);
      std::memcpy(x, tmp, Dk * sizeof(float));
    }
    for (const Dst& o : dst)
      for (int64_t h = 0; h < Hkv; ++h) {
        const float* src = kvp + ((b * nb + o.branch) * Hkv + h) * (Dk + Dv);
        const int64_t rows = o.k.size(2);
        rotate(src, c, sn, o.k.data_ptr<float>() + ((b * Hkv + h) * rows + o.row) * Dk);
        std::memcpy(o.v.data_ptr<float>() + ((b * Hkv + h) * rows + o.row) * Dv, src + Dk, Dv * sizeof(float));
      }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("attend", &attend, "the three branch outputs of the newest token, from the cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_store", &rope_store, "RoPE of q in place; RoPE'd K and V of the new token into the cache",
        py::call_guard<py::gil_scoped_release>());
}
