// The small per-layer operations of a CPU decode step, in C++ so that a step costs a few calls
// per layer instead of dozens of PyTorch ops (on a 2-core CPU a PyTorch op costs 5-30 us, and a
// decode layer had ~40 of them: more than the low-bit GEMVs themselves on small models).
// float32 only. Each has a PyTorch reference of the same meaning, used by the tests:
//   bitfold_add_rms_norm  <-> kernels/rms_norm.py  rms_norm_ref / fused_add_rms_norm_ref
//   bitfold_rotary        <-> kernels/rotary.py    rotary_ref (HF rotate_half convention)
//   bitfold_paged_decode  <-> kernels/paged_decode.py paged_decode_ref (GQA, sliding window)
// Compiled with the LUT kernel into one library (see lut_gemm.py); target_clones picks AVX-512,
// AVX2 or plain code at load time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define BITFOLD_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))

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
    float ss = 0.f;
    for (int i = 0; i < D; ++i) ss += h[i] * h[i];
    const float inv = 1.f / std::sqrt(ss / D + eps);
    for (int i = 0; i < D; ++i) o[i] = (h[i] * inv) * w[i];
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
// paged_decode_ref's fused write does. Online softmax, all query heads of a KV group per pass.
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
  std::vector<float> m(G), l(G), acc(static_cast<size_t>(G) * D);
  for (int b = 0; b < B; ++b) {
    const int len = context_lens[b];
    const int start = sliding_window > 0 ? std::max(0, len - sliding_window) : 0;
    for (int kh = 0; kh < KVH; ++kh) {
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* qg = q + (static_cast<int64_t>(b) * H + static_cast<int64_t>(kh) * G) * D;
      for (int p = start; p < len; ++p) {
        const int64_t blk = block_tables[static_cast<int64_t>(b) * max_blocks + p / block_size];
        const int64_t off = ((blk * block_size + p % block_size) * KVH + kh) * D;
        const bool fresh = new_k && p == len - 1;
        const float* kv = fresh ? new_k + (static_cast<int64_t>(b) * KVH + kh) * D : kc + off;
        const float* vv = fresh ? new_v + (static_cast<int64_t>(b) * KVH + kh) * D : vc + off;
        for (int g = 0; g < G; ++g) {
          const float* qq = qg + static_cast<int64_t>(g) * D;
          float s = 0.f;
          for (int d = 0; d < D; ++d) s += qq[d] * kv[d];
          s *= scale;
          float* a = acc.data() + static_cast<size_t>(g) * D;
          if (s > m[g]) {
            const float c = std::exp(m[g] - s);  // exp(-inf) = 0 on the first position
            l[g] *= c;
            for (int d = 0; d < D; ++d) a[d] *= c;
            m[g] = s;
          }
          const float e = std::exp(s - m[g]);
          l[g] += e;
          for (int d = 0; d < D; ++d) a[d] += e * vv[d];
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = out + (static_cast<int64_t>(b) * H + static_cast<int64_t>(kh) * G + g) * D;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int d = 0; d < D; ++d) o[d] = acc[static_cast<size_t>(g) * D + d] * inv;
      }
    }
  }
}

}  // extern "C"
