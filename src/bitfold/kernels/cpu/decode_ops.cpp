// The small per-layer operations of a CPU decode step, in C++ so that a step costs a few calls
// per layer instead of dozens of PyTorch ops (on a 2-core CPU a PyTorch op costs 5-30 us, and a
// decode layer had ~40 of them: more than the low-bit GEMVs themselves on small models).
// float32 only. Each has a PyTorch reference of the same meaning, used by the tests:
//   bitfold_add_rms_norm  <-> kernels/rms_norm.py  rms_norm_ref / fused_add_rms_norm_ref
//   bitfold_rotary        <-> kernels/rotary.py    rotary_ref (HF rotate_half convention)
//   bitfold_paged_decode  <-> kernels/paged_decode.py paged_decode_ref (GQA, sliding window)
//   bitfold_silu_mul      <-> kernels/silu_mul.py  silu_and_mul_ref
// Compiled with the LUT kernel into one library (see lut_gemm.py); target_clones picks AVX-512,
// AVX2 or plain code at load time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define BITFOLD_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))

namespace {

// Sums of products in 16 independent lanes: without -ffast-math the compiler may not reorder a
// plain `s += a[i] * b[i]`, which then runs at one add per FP latency (~4 cycles) per element;
// written as 16 running sums it becomes one vector FMA per 16 elements, then a tree of halves.
// (Not bit-identical to a sequential sum; the tests allow float32 rounding.)
__attribute__((always_inline)) inline float dot(const float* a, const float* b, int n) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[i & 15] += a[i] * b[i];
  // a tree, not a chain: 4 dependent vector adds instead of 16 scalar ones (for a 64-wide head
  // the chain cost more than the products)
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// exp(x) as 2^n * p(r), r = x - n ln2 (Cephes expf's degree-6 polynomial, ~1 ulp on [-87, 88]),
// with plain float/int ops so that a loop of them vectorizes (std::exp does not). Saturates
// outside [-87.3, 88] (n must stay a normal exponent): ~1e-38 instead of 0 below, e^88 instead
// of up to 3.4e38 above; harmless in a softmax (x <= 0) and a sigmoid. NaN stays NaN.
__attribute__((always_inline)) inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.f);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return x != x ? x : p * scale;
}

// 16 floats as one value (GCC/Clang vector extension): one zmm in the AVX-512 clone, two ymm or
// four xmm in the others. aligned(4): loads from any float address.
typedef float vf16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

// Sum of the 16 lanes by halves (compiles to extracts and vector adds, no trip through memory).
__attribute__((always_inline)) inline float hsum(vf16 v) {
  vf8 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const vf8 s8 = lo + hi;
  vf4 l4, h4;
  std::memcpy(&l4, &s8, sizeof(l4));
  std::memcpy(&h4, reinterpret_cast<const char*>(&s8) + sizeof(l4), sizeof(h4));
  const vf4 s4 = l4 + h4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// In place: sc[i] = exp(sc[i] - max) / sum.
__attribute__((always_inline)) inline void softmax(float* sc, int n) {
  float m = sc[0];
  for (int i = 1; i < n; ++i) m = std::max(m, sc[i]);
  float l = 0.f;
  for (int i = 0; i < n; ++i) {
    sc[i] = exp_approx(sc[i] - m);
    l += sc[i];
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int i = 0; i < n; ++i) sc[i] *= inv;
}

// One KV head's group of G query heads over n positions: qg [G, D], krow/vrow the positions'
// K and V rows, sc scratch [G, n], o [G, D]. C = D / 16 known at compile time keeps a head's
// dot product and its output row in registers (C <= 8 for D <= 128); C = 0 is any D.
template <int C>
__attribute__((always_inline)) inline void attend(const float* qg, const float* const* krow, const float* const* vrow,
                                                  int n, int G, int D, float scale, float* sc, float* o) {
  for (int p = 0; p < n; ++p) {  // scores: each K row once, for every head of the group
    if constexpr (C > 0) {
      const vf16* k = reinterpret_cast<const vf16*>(krow[p]);
      for (int g = 0; g < G; ++g) {
        const vf16* qv = reinterpret_cast<const vf16*>(qg + g * D);
        vf16 acc = qv[0] * k[0];
        for (int c = 1; c < C; ++c) acc += qv[c] * k[c];
        sc[static_cast<size_t>(g) * n + p] = hsum(acc) * scale;
      }
    } else {
      for (int g = 0; g < G; ++g) sc[static_cast<size_t>(g) * n + p] = dot(qg + g * D, krow[p], D) * scale;
    }
  }
  for (int g = 0; g < G; ++g) softmax(sc + static_cast<size_t>(g) * n, n);
  if constexpr (C > 0) {
    // Weighted sum of V by tiles of positions small enough to stay in L1 while every head of the
    // group reads them, one head at a time with its output row in registers.
    constexpr int kTileRows = 16384 / (64 * C);
    std::fill(o, o + static_cast<size_t>(G) * D, 0.f);
    for (int p0 = 0; p0 < n; p0 += kTileRows) {
      const int p1 = std::min(n, p0 + kTileRows);
      for (int g = 0; g < G; ++g) {
        const float* e = sc + static_cast<size_t>(g) * n;
        vf16* og = reinterpret_cast<vf16*>(o + static_cast<size_t>(g) * D);
        vf16 a[C];
        for (int c = 0; c < C; ++c) a[c] = og[c];
        for (int p = p0; p < p1; ++p) {
          const vf16* v = reinterpret_cast<const vf16*>(vrow[p]);
          for (int c = 0; c < C; ++c) a[c] += e[p] * v[c];
        }
        for (int c = 0; c < C; ++c) og[c] = a[c];
      }
    }
    return;
  }
  for (int g = 0; g < G; ++g) {  // any D: the weighted sum of V head by head
    const float* e = sc + static_cast<size_t>(g) * n;
    float* a = o + static_cast<size_t>(g) * D;
    std::fill(a, a + D, 0.f);
    for (int p = 0; p < n; ++p)
      for (int d = 0; d < D; ++d) a[d] += e[p] * vrow[p][d];
  }
}

}  // namespace

extern "C" {

// out = norm(x + residual) * w, res_out = x + residual (residual may be null: out = norm(x) * w).
BITFOLD_SIMD void bitfold_add_rms_norm(const float* x, const float* residual, const float* w, float* out,
                                       float* res_out, int T, int D, float eps) {
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<int64_t>(t) * D;
    float* o = out + static_cast<int64_t>(t) * D;
    const float* h = xr;
    if (residual) {
      const float* rr = residual + static_cast<int64_t>(t) * D;
      float* ro = res_out + static_cast<int64_t>(t) * D;
      for (int i = 0; i < D; ++i) ro[i] = xr[i] + rr[i];
      h = ro;
    }
    const float ss = dot(h, h, D);
    const float inv = 1.f / std::sqrt(ss / D + eps);
    for (int i = 0; i < D; ++i) o[i] = (h[i] * inv) * w[i];
  }
}

// out[b, i] = silu(gu[b, i]) * gu[b, I + i] for i < I (gate | up halves, silu(x) = x / (1 + e^-x));
// out's rows have stride ld >= I and columns I..ld-1 are zeroed (a GEMV's group padding).
BITFOLD_SIMD void bitfold_silu_mul(const float* gu, float* out, int B, int I, int ld) {
  for (int b = 0; b < B; ++b) {
    const float* g = gu + static_cast<int64_t>(b) * 2 * I;
    const float* u = g + I;
    float* o = out + static_cast<int64_t>(b) * ld;
    for (int i = 0; i < I; ++i) o[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
    for (int i = I; i < ld; ++i) o[i] = 0.f;
  }
}

// q [T, H, D], k [T, KVH, D] rotated into qo, ko; cache [max_pos, D] = [cos | sin] halves.
BITFOLD_SIMD void bitfold_rotary(const float* q, const float* k, const int64_t* pos, const float* cache, float* qo,
                                 float* ko, int T, int H, int KVH, int D) {
  const int half = D / 2;
  for (int t = 0; t < T; ++t) {
    const float* cs = cache + pos[t] * D;
    const float* sn = cs + half;
    for (int which = 0; which < 2; ++which) {
      const int heads = which ? KVH : H;
      const float* src = (which ? k : q) + static_cast<int64_t>(t) * heads * D;
      float* dst = (which ? ko : qo) + static_cast<int64_t>(t) * heads * D;
      for (int h = 0; h < heads; ++h) {
        const float* a = src + h * D;
        float* o = dst + h * D;
        for (int i = 0; i < half; ++i) {
          o[i] = a[i] * cs[i] - a[i + half] * sn[i];
          o[i + half] = a[i + half] * cs[i] + a[i] * sn[i];
        }
      }
    }
  }
}

// One query token per sequence. q [B, H, D]; caches [blocks, block_size, KVH, D]; block_tables
// int32 [B, max_blocks]; context_lens int32 [B] (including the new token); out [B, H, D].
// With new_k/new_v [B, KVH, D] and slots int64 [B], the new token's K/V are first written to
// their slots (slot < 0: not written) and the last position reads them directly, as
// paged_decode_ref's fused write does. Per sequence and KV head, all G query heads of the group
// in two passes over the pages: scores for every position, then softmax and the weighted sum of
// V (a decode step's context fits a scores buffer of G * len floats; two passes let the exp and
// the dot products vectorize, where an online softmax has one exp per position).
BITFOLD_SIMD void bitfold_paged_decode(const float* q, float* kc, float* vc, const int32_t* block_tables,
                                       const int32_t* context_lens, float* out, int B, int H, int KVH, int D,
                                       int block_size, int max_blocks, float scale, int sliding_window,
                                       const float* new_k, const float* new_v, const int64_t* slots) {
  const int G = H / KVH;
  if (new_k) {
    for (int b = 0; b < B; ++b) {
      if (slots[b] < 0) continue;
      const int64_t row = static_cast<int64_t>(KVH) * D;
      std::copy(new_k + b * row, new_k + (b + 1) * row, kc + slots[b] * row);
      std::copy(new_v + b * row, new_v + (b + 1) * row, vc + slots[b] * row);
    }
  }
  thread_local std::vector<float> scores;
  thread_local std::vector<const float*> krow, vrow;
  for (int b = 0; b < B; ++b) {
    const int len = context_lens[b];
    const int start = sliding_window > 0 ? std::max(0, len - sliding_window) : 0;
    const int n = len - start;
    float* ob = out + static_cast<int64_t>(b) * H * D;
    if (n <= 0) {
      std::fill(ob, ob + static_cast<int64_t>(H) * D, 0.f);
      continue;
    }
    if (scores.size() < static_cast<size_t>(G) * n) scores.resize(static_cast<size_t>(G) * n);
    if (krow.size() < static_cast<size_t>(n)) krow.resize(n), vrow.resize(n);
    const int32_t* table = block_tables + static_cast<int64_t>(b) * max_blocks;
    for (int kh = 0; kh < KVH; ++kh) {
      for (int p = start; p < len; ++p) {
        const int64_t blk = table[p / block_size];
        const int64_t off = ((blk * block_size + p % block_size) * KVH + kh) * D;
        krow[p - start] = kc + off;
        vrow[p - start] = vc + off;
      }
      if (new_k) {  // the new token's K/V straight from the inputs (fused write)
        krow[n - 1] = new_k + (static_cast<int64_t>(b) * KVH + kh) * D;
        vrow[n - 1] = new_v + (static_cast<int64_t>(b) * KVH + kh) * D;
      }
      const float* qg = q + (static_cast<int64_t>(b) * H + static_cast<int64_t>(kh) * G) * D;
      float* o = ob + static_cast<int64_t>(kh) * G * D;
      switch (D) {
        case 64: attend<4>(qg, krow.data(), vrow.data(), n, G, D, scale, scores.data(), o); break;
        case 128: attend<8>(qg, krow.data(), vrow.data(), n, G, D, scale, scores.data(), o); break;
        default: attend<0>(qg, krow.data(), vrow.data(), n, G, D, scale, scores.data(), o);
      }
    }
  }
}

}  // extern "C"
