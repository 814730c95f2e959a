// One-token NSA decode step on the CPU, float32: the attention core of nsa.cache.decode_token
// (compressed attention, selection scores, top-n, selected attention, sliding window) fused into
// one call that reads the cache's head-major buffers in place, plus the RoPE + cache write of the
// new token. Built at first use by nsa/ops/cpu_build.py (used by nsa/ops/decode_cpu.py); nsa.cache.decode_token is the reference.
//
// Built with -march=native for the CPU it runs on (the build folder's name carries a fingerprint of
// that CPU); the vector code is GCC's generic vector extension, one register wide (cpu_vec.h).
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

#include "cpu_vec.h"

namespace {

using at::Tensor;
using namespace nsa_cpu;

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
      int64_t* top = a.idx + bh * a.k;
      select_top(P, P + K + span, n_sel, per, span, a.k, a.num_init, a.num_local, top);
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
                bool rotate_cmp, const Tensor& k_tail, const Tensor& v_tail, int64_t ti, const Tensor& k_slc, const Tensor& v_slc,
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
        float* k_dst = o.k.data_ptr<float>() + ((b * Hkv + h) * rows + o.row) * Dk;
        if (&o == dst && !rotate_cmp)  // the compressed branch's tail, RoPE'd after compression instead
          std::memcpy(k_dst, src, Dk * sizeof(float));
        else
          rotate(src, c, sn, k_dst);
        std::memcpy(o.v.data_ptr<float>() + ((b * Hkv + h) * rows + o.row) * Dv, src + Dk, Dv * sizeof(float));
      }
  }
}

}  // namespace

// registered by cpu_module.cpp, with the other CPU ops, into one extension
void bind_decode(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attend", &attend, "the three branch outputs of the newest token, from the cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_store", &rope_store, "RoPE of q in place; RoPE'd K (the compressed branch's only if rotate_cmp) and V of the new token into the cache",
        py::call_guard<py::gil_scoped_release>());
}
