// Vector helpers shared by the fused CPU ops (decode_cpu.cpp, attention_cpu.cpp): GCC's generic
// vector extension, one register wide for the CPU the op is built for (-march=native, see
// nsa/ops/cpu_build.py): 16 float lanes with AVX-512, 8 with AVX / AVX2, 4 otherwise (SSE, NEON),
// an exp for softmax, and the small dot-product / P @ V kernels over the G query heads of one KV
// group. A vector wider than the register splits into several, and register tiles sized for 32
// AVX-512 registers then spill on a 16-register AVX2 CPU (the op ran 5-7x slower there).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define NSA_INLINE inline __attribute__((always_inline))

namespace nsa_cpu {

#if defined(__AVX512F__)
constexpr int W = 16;  // float lanes of the generic vector type: one register
constexpr int kRegs = 32;  // vector registers
#elif defined(__AVX__)
constexpr int W = 8;
constexpr int kRegs = 16;
#elif defined(__aarch64__)
constexpr int W = 4;
constexpr int kRegs = 32;
#else
constexpr int W = 4;
constexpr int kRegs = 16;
#endif
// register tiles of the matmuls (gemm in attention_cpu.cpp; P @ V here, with 4 rows): kTileRows x
// kTileVecs accumulators. 32 registers: 4 x 4 + 4 operands; 16: 6 x 2 + 2 operands + 1 broadcast
// (twelve independent FMA chains hide the FMA latency on two pipes; 4 x 2 left it exposed: the
// NSA op at 8k ran ~20% slower forward and forward+backward on AVX2, bench/RESULTS.md)
constexpr int kTileVecs = kRegs >= 32 ? 4 : 2;
constexpr int kTileRows = kRegs >= 32 ? 4 : 6;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

NSA_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
NSA_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
NSA_INLINE vf splat(float x) { return x - vf{}; }  // a broadcast (x + 0 would add first: -0 + 0 = +0)

// lane k of the result = sum of the lanes of a[k] (a W x W transpose-and-add in log2 W shuffle
// rounds: each round adds the two halves of every chunk, packing two vectors' sums into one)
#if defined(__AVX512F__)
NSA_INLINE vf hsum(const vf* a) {
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
#elif defined(__AVX__)
NSA_INLINE vf hsum(const vf* a) {
  vf t[4], u[2];
  for (int m = 0; m < 4; ++m)
    t[m] = __builtin_shuffle(a[2 * m], a[2 * m + 1], vi{0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(a[2 * m], a[2 * m + 1], vi{4, 5, 6, 7, 12, 13, 14, 15});
  for (int m = 0; m < 2; ++m)
    u[m] = __builtin_shuffle(t[2 * m], t[2 * m + 1], vi{0, 1, 4, 5, 8, 9, 12, 13}) +
           __builtin_shuffle(t[2 * m], t[2 * m + 1], vi{2, 3, 6, 7, 10, 11, 14, 15});
  return __builtin_shuffle(u[0], u[1], vi{0, 2, 4, 6, 8, 10, 12, 14}) +
         __builtin_shuffle(u[0], u[1], vi{1, 3, 5, 7, 9, 11, 13, 15});
}
#else
NSA_INLINE vf hsum(const vf* a) {
  vf t[2];
  for (int m = 0; m < 2; ++m)
    t[m] = __builtin_shuffle(a[2 * m], a[2 * m + 1], vi{0, 1, 4, 5}) +
           __builtin_shuffle(a[2 * m], a[2 * m + 1], vi{2, 3, 6, 7});
  return __builtin_shuffle(t[0], t[1], vi{0, 2, 4, 6}) + __builtin_shuffle(t[0], t[1], vi{1, 3, 5, 7});
}
#endif

// exp(x) for x <= 0 (softmax after the max is subtracted): 2^n * poly(r), Cephes' expf
// polynomial, ~1 ulp; exactly 0 below -87.3 (where float32 exp leaves the normal range) and at -inf
NSA_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.3f);
  const vf xc = x < lo ? lo : x;
#if defined(__AVX512F__)
  // n = round(x / ln 2) in one instruction and 2^n p by scalef: ~6 of the ~20 instructions less
  // than the integer route below, the same polynomial (exp is ~15% of a forward's time)
  const vf nf = _mm512_roundscale_ps(xc * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf t = xc * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(t, vi);  // truncation; floor for the negative t below
  n += (__builtin_convertvector(n, vf) > t);  // true lanes are -1
  const vf nf = __builtin_convertvector(n, vf);
#endif
  const vf r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
#if defined(__AVX512F__)
  const vf e = _mm512_scalef_ps(p, nf);
#else
  const vi bits = (n + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const vf e = p * two_n;
#endif
  return x < lo ? vf{} : e;
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
    for (int r = 0; r < R; ++r) store(s + r * lds + i, (hsum(acc[r]) + load(tail[r])) * scale);
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
  for (; c0 + kTileVecs * W <= Dw; c0 += kTileVecs * W) pv_block<R, kTileVecs>(p, ldp, V, n, Dv, c0, o, ldo);
  switch ((Dw - c0) / W) {  // fewer than kTileVecs vectors left
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
  // the query rows in registers (4 x C of them) only where they fit beside the accumulators
  switch (Dk % W || Dk / W > kTileVecs ? 0 : Dk / W) {
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

// The selected blocks of one query (nsa/ops/select_blocks/reference.py, steps 3-4) from its
// group-summed compressed probabilities, padded: P[span - 1 + i] = P_t[i] for i < n_sel * per, 0 in
// the span - 1 entries before (per = l'/d, span = l/d, n_sel = the causal blocks). S[j] = sum_{m < per}
// sum_{u < span} P_t[per j + m - u], summed in the torch path's order; the num_init first and
// num_local last blocks forced; the k best into top[0:k], ascending, ties to the lower index.
// S: scratch of n_sel floats.
inline void select_top(const float* P, float* S, int64_t n_sel, int64_t per, int64_t span, int64_t k,
                       int64_t num_init, int64_t num_local, int64_t* top) {
  for (int64_t j = 0; j < n_sel; ++j) {
    float x = 0.f;
    for (int64_t m = 0; m < per; ++m) {
      float y = 0.f;
      for (int64_t u = 0; u < span; ++u) y += P[per * j + m + u];
      x += y;
    }
    const bool forced = j < num_init || j >= n_sel - num_local;
    S[j] = forced ? std::numeric_limits<float>::infinity() : x;
  }
  int64_t cnt = 0;
  for (int64_t j = 0; j < n_sel; ++j) {  // ascending j: an equal score never displaces a kept one
    int64_t pos = cnt;
    while (pos > 0 && S[top[pos - 1]] < S[j]) --pos;
    if (pos >= k) continue;
    for (int64_t e = std::min(cnt, k - 1); e > pos; --e) top[e] = top[e - 1];
    top[pos] = j;
    cnt = std::min(cnt + 1, k);
  }
  std::sort(top, top + k);
}

}  // namespace nsa_cpu
