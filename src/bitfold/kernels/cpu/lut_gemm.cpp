// Lookup-table GEMV/GEMM for 1-4-bit group-quantized weights on x86 CPUs (T-MAC's method,
// arXiv 2407.00088; batched reuse of the index stream as in SAIL).
//
// Weights: w[n, k] = scale[n, g] * q[n, k] + min[n, g], q in [0, 2^bits), g = k / group.
// q is split into `bits` one-bit planes. For every run of 4 activations x[4c..4c+3] ("chunk" c)
// we precompute the table T_c[i] = sum_{j: bit j of i set} x[4c+j] for i in 0..15, quantized to
// int8 per group of the activation with scale ls_g (max |T| / 127). The 4 bits of one plane
// that a weight row holds for chunk c form an index i into T_c, so one byte shuffle (vpshufb)
// looks up 32 (AVX2) or 64 (AVX-512) indices at once:
//     sum_k q[n,k] x[k] ~= ls_g * sum_c sum_p 2^p T_c[idx_p(n, c)]
// and the cost falls linearly with the number of planes (bits). Two lookups that belong to the
// same row sit in adjacent bytes, so one vpmaddubsw multiplies them by their plane weights 2^p
// and adds them into an int16 per row (no sign extension, no per-plane shifts); the int16 sums
// are flushed to fp32 before they can overflow, and
//     y[n] = sum_g scale[n,g] * ls_g * acc[n,g] + min[n,g] * sum_{k in g} x[k].
//
// Layout written by bitfold/kernels/lut_gemm.py `pack_lut` (tile = 64 rows, natural row order):
//   packed uint8 [tiles][groups][streams][64 B blocks]. Byte 2i+e of a block holds, in its low
//   nibble, an index of row i and, in its high nibble, the same index of row 32+i:
//   - plane-pair stream m (planes 2m, 2m+1), one block per chunk c: e selects the plane 2m+e;
//   - for odd bits, a last single-plane stream (plane bits-1), one block per chunk pair (c, c+1):
//     e selects the chunk c+e (looked up in T_c or T_c+1 by a blended pair of shuffles).
//   scales, mins fp16 [tiles][groups][64].
// Tables (built here once per activation vector): int8 [K/4][16].
//
// The pure-PyTorch reference of the same computation is bitfold/kernels/lut_gemm.py
// `lut_gemm_ref`; the scalar path below is the fallback where AVX2 is missing.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int kTile = 64;
constexpr int kBlock = 64;  // bytes per block

// Chunks accumulated in int16 before a flush: |sum_p 2^p T| <= 127 * (2^bits - 1) per chunk.
// The largest even divisor of the group's chunk count under that bound (even: the single-plane
// stream takes chunks in pairs; a group is a multiple of 8 weights, so 2 always qualifies).
inline int flush_chunks(int bits, int chunks_per_group) {
  const int fmax = 32767 / (127 * ((1 << bits) - 1));
  int best = 2;
  for (int f = 2; f <= std::min(fmax, chunks_per_group); f += 2)
    if (chunks_per_group % f == 0) best = f;
  return best;
}

// Bytes of one (tile, group): a block per chunk per plane pair, a block per chunk pair for the
// odd plane = 64 rows * group * bits / 8.
inline size_t group_bytes(int bits, int cpg) {
  return static_cast<size_t>(bits / 2) * cpg * kBlock + (bits & 1) * static_cast<size_t>(cpg / 2) * kBlock;
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign << 31;
    } else {  // subnormal
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = (sign << 31) | ((127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = (sign << 31) | 0x7f800000 | (man << 13);
  } else {
    bits = (sign << 31) | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Problem {
  const float* x;          // [B, K]
  int B, K, N, bits, group;
  const uint8_t* w;        // packed
  const uint16_t* scales;  // fp16 [tiles][groups][64]
  const uint16_t* mins;
  float* y;                // [B, N]
  const int8_t* tables;    // [B][K/4][16]
  const float* lscale;     // [B][groups]
  const float* sumx;       // [B][groups]
};

// ---- tables -----------------------------------------------------------------------------------
// T_c[i] adds x[4c+j] for the set bits j of i in ascending j, starting from 0: the reference adds
// the same terms in the same order (masked terms are exact zeros, and an FMA with a 0/1 mask is
// exact), so every path produces bit-identical tables. Entries are rounded to int8 against
// 127 / max|T| of the group with the current rounding mode (nearest-even, as std::nearbyint and
// torch.round). The vector paths build one chunk's 16 entries per register (AVX-512) or pair of
// registers (AVX2), twice per group (once for the max, once to round) instead of keeping them.
// At 4 activations a chunk this is a step's fixed cost per GEMV: scalar it was ~10 us for a
// 1536-wide input and ~48 us for 8960 (a tile of 64 rows is ~1 us).

void build_tables_scalar(const float* x, int K, int group, int8_t* tab, float* lscale, float* sumx) {
  const int cpg = group / 4, groups = K / group;
  std::vector<float> t(static_cast<size_t>(cpg) * 16);
  for (int g = 0; g < groups; ++g) {
    float amax = 0.f, s = 0.f;
    for (int c = 0; c < cpg; ++c) {
      const float* xc = x + (static_cast<size_t>(g) * cpg + c) * 4;
      float* tc = t.data() + c * 16;
      tc[0] = 0.f;  // T[i + 2^j] = T[i] + x_j for i < 2^j
      for (int j = 0, n = 1; j < 4; ++j, n *= 2)
        for (int i = 0; i < n; ++i) tc[n + i] = tc[i] + xc[j];
      for (int i = 0; i < 16; ++i) amax = std::max(amax, std::fabs(tc[i]));
    }
    for (int k = 0; k < group; ++k) s += x[static_cast<size_t>(g) * group + k];
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    lscale[g] = amax / 127.f;
    sumx[g] = s;
    int8_t* dst = tab + static_cast<size_t>(g) * cpg * 16;
    for (int i = 0; i < cpg * 16; ++i) dst[i] = static_cast<int8_t>(std::nearbyint(t[i] * inv));
  }
}

// One chunk's entries: sum_j mask_j * x_j accumulated in ascending j (lambdas would not inherit
// the target attribute, hence functions).
__attribute__((target("avx512f,fma"))) inline __m512 chunk_avx512(const __m512* mask, const float* xc) {
  __m512 t = _mm512_mul_ps(mask[0], _mm512_set1_ps(xc[0]));
  for (int j = 1; j < 4; ++j) t = _mm512_fmadd_ps(mask[j], _mm512_set1_ps(xc[j]), t);
  return t;
}

__attribute__((target("avx2,fma"))) inline __m256 chunk_avx2(const __m256* mask, const float* xc) {
  __m256 t = _mm256_mul_ps(mask[0], _mm256_set1_ps(xc[0]));
  for (int j = 1; j < 4; ++j) t = _mm256_fmadd_ps(mask[j], _mm256_set1_ps(xc[j]), t);
  return t;
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void build_tables_avx512(const float* x, int K, int group,
                                                                                    int8_t* tab, float* lscale,
                                                                                    float* sumx) {
  const int cpg = group / 4, groups = K / group;
  __m512 mask[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) float m[16];
    for (int i = 0; i < 16; ++i) m[i] = static_cast<float>((i >> j) & 1);
    mask[j] = _mm512_load_ps(m);
  }
  for (int g = 0; g < groups; ++g) {
    const float* xg = x + static_cast<size_t>(g) * group;
    __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
    for (int c = 0; c < cpg; ++c) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(chunk_avx512(mask, xg + 4 * c)));
    int k = 0;
    for (; k + 16 <= group; k += 16) vsum = _mm512_add_ps(vsum, _mm512_loadu_ps(xg + k));
    float s = _mm512_reduce_add_ps(vsum);
    for (; k < group; ++k) s += xg[k];
    const float amax = _mm512_reduce_max_ps(vmax);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    lscale[g] = amax / 127.f;
    sumx[g] = s;
    const __m512 vinv = _mm512_set1_ps(inv);
    int8_t* dst = tab + static_cast<size_t>(g) * cpg * 16;
    for (int c = 0; c < cpg; ++c)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * c),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(chunk_avx512(mask, xg + 4 * c), vinv))));
  }
}

__attribute__((target("avx2,fma"))) void build_tables_avx2(const float* x, int K, int group, int8_t* tab,
                                                           float* lscale, float* sumx) {
  const int cpg = group / 4, groups = K / group;
  __m256 mask[2][4];  // entries 0..7 and 8..15
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      alignas(32) float m[8];
      for (int i = 0; i < 8; ++i) m[i] = static_cast<float>(((8 * h + i) >> j) & 1);
      mask[h][j] = _mm256_load_ps(m);
    }
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int g = 0; g < groups; ++g) {
    const float* xg = x + static_cast<size_t>(g) * group;
    __m256 vmax = _mm256_setzero_ps();
    for (int c = 0; c < cpg; ++c)
      for (int h = 0; h < 2; ++h) vmax = _mm256_max_ps(vmax, _mm256_and_ps(chunk_avx2(mask[h], xg + 4 * c), absmask));
    alignas(32) float m8[8];
    _mm256_store_ps(m8, vmax);
    float amax = 0.f, s = 0.f;
    for (int i = 0; i < 8; ++i) amax = std::max(amax, m8[i]);
    for (int k = 0; k < group; ++k) s += xg[k];
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    lscale[g] = amax / 127.f;
    sumx[g] = s;
    const __m256 vinv = _mm256_set1_ps(inv);
    int8_t* dst = tab + static_cast<size_t>(g) * cpg * 16;
    for (int c = 0; c < cpg; ++c) {
      const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(chunk_avx2(mask[0], xg + 4 * c), vinv));
      const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(chunk_avx2(mask[1], xg + 4 * c), vinv));
      // int32 -> int16 (saturating, per 128-bit lane) -> int8, then undo the lane interleave
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xd8);
      const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * c), b8);
    }
  }
}

void build_tables(const float* x, int K, int group, int8_t* tab, float* lscale, float* sumx, int isa) {
  if (isa == 2) return build_tables_avx512(x, K, group, tab, lscale, sumx);
  if (isa == 1) return build_tables_avx2(x, K, group, tab, lscale, sumx);
  build_tables_scalar(x, K, group, tab, lscale, sumx);
}

// ---- scalar fallback (int32 accumulators) -----------------------------------------------------
void tiles_scalar(const Problem& P, int t0, int t1) {
  const int groups = P.K / P.group, cpg = P.group / 4, bits = P.bits, KC = P.K / 4;
  const size_t gbytes = group_bytes(bits, cpg);
  for (int t = t0; t < t1; ++t) {
    for (int b = 0; b < P.B; ++b) {
      const int8_t* tb = P.tables + static_cast<size_t>(b) * KC * 16;
      float acc[kTile] = {0};
      for (int g = 0; g < groups; ++g) {
        const uint8_t* wg = P.w + (static_cast<size_t>(t) * groups + g) * gbytes;
        const int8_t* tg = tb + static_cast<size_t>(g) * cpg * 16;
        const uint16_t* sc = P.scales + (static_cast<size_t>(t) * groups + g) * kTile;
        const uint16_t* mn = P.mins + (static_cast<size_t>(t) * groups + g) * kTile;
        const float ls = P.lscale[static_cast<size_t>(b) * groups + g];
        const float sx = P.sumx[static_cast<size_t>(b) * groups + g];
        for (int r = 0; r < kTile; ++r) {
          const int i = r & 31, shift = 4 * (r >> 5);
          int32_t a = 0;
          for (int m = 0; m < bits / 2; ++m)
            for (int c = 0; c < cpg; ++c) {
              const uint8_t* blk = wg + (static_cast<size_t>(m) * cpg + c) * kBlock;
              for (int e = 0; e < 2; ++e) a += (1 << (2 * m + e)) * tg[c * 16 + ((blk[2 * i + e] >> shift) & 15)];
            }
          if (bits & 1) {
            const uint8_t* single = wg + static_cast<size_t>(bits / 2) * cpg * kBlock;
            for (int c = 0; c < cpg; c += 2) {
              const uint8_t* blk = single + static_cast<size_t>(c / 2) * kBlock;
              for (int e = 0; e < 2; ++e) a += (1 << (bits - 1)) * tg[(c + e) * 16 + ((blk[2 * i + e] >> shift) & 15)];
            }
          }
          acc[r] += half_to_float(sc[r]) * (ls * static_cast<float>(a)) + half_to_float(mn[r]) * sx;
        }
      }
      for (int r = 0; r < kTile; ++r) {
        const int n = t * kTile + r;
        if (n < P.N) P.y[static_cast<size_t>(b) * P.N + n] = acc[r];
      }
    }
  }
}

// ---- AVX-512BW: a block (64 B = 32 rows x 2 lookups per nibble) per instruction --------------
template <int BITS, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void tile_avx512(const Problem& P, int t, int b0) {
  const int groups = P.K / P.group, cpg = P.group / 4, KC = P.K / 4;
  const int F = flush_chunks(BITS, cpg);
  const size_t gbytes = group_bytes(BITS, cpg);
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  const __mmask64 odd = 0xAAAAAAAAAAAAAAAAull;
  alignas(64) float acc[NB][kTile];
  std::memset(acc, 0, sizeof(acc));
  for (int g = 0; g < groups; ++g) {
    const uint8_t* wg = P.w + (static_cast<size_t>(t) * groups + g) * gbytes;
    const uint16_t* sc = P.scales + (static_cast<size_t>(t) * groups + g) * kTile;
    const uint16_t* mn = P.mins + (static_cast<size_t>(t) * groups + g) * kTile;
    for (int c0 = 0; c0 < cpg; c0 += F) {
      __m512i alo[NB], ahi[NB];  // int16 per row: rows 0..31 and 32..63
      for (int b = 0; b < NB; ++b) alo[b] = ahi[b] = _mm512_setzero_si512();
#pragma GCC unroll 2
      for (int m = 0; m < BITS / 2; ++m) {
        const __m512i wpair = _mm512_set1_epi16(static_cast<short>((1 << (2 * m)) | (1 << (2 * m + 1)) << 8));
        for (int c = c0; c < c0 + F; ++c) {
          const __m512i raw = _mm512_loadu_si512(wg + (static_cast<size_t>(m) * cpg + c) * kBlock);
          const __m512i il = _mm512_and_si512(raw, lo4);
          const __m512i ih = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            const __m512i tab = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                P.tables + (static_cast<size_t>(b0 + b) * KC + static_cast<size_t>(g) * cpg + c) * 16)));
            alo[b] = _mm512_add_epi16(alo[b], _mm512_maddubs_epi16(wpair, _mm512_shuffle_epi8(tab, il)));
            ahi[b] = _mm512_add_epi16(ahi[b], _mm512_maddubs_epi16(wpair, _mm512_shuffle_epi8(tab, ih)));
          }
        }
      }
      if (BITS & 1) {
        const __m512i wsingle = _mm512_set1_epi8(static_cast<char>(1 << (BITS - 1)));
        const uint8_t* single = wg + static_cast<size_t>(BITS / 2) * cpg * kBlock;
        for (int c = c0; c < c0 + F; c += 2) {
          const __m512i raw = _mm512_loadu_si512(single + static_cast<size_t>(c / 2) * kBlock);
          const __m512i il = _mm512_and_si512(raw, lo4);
          const __m512i ih = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            const int8_t* tb = P.tables + (static_cast<size_t>(b0 + b) * KC + static_cast<size_t>(g) * cpg + c) * 16;
            const __m512i t0 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb)));
            const __m512i t1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + 16)));
            // even bytes look up chunk c, odd bytes chunk c+1
            const __m512i rl = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(t0, il), odd, t1, il);
            const __m512i rh = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(t0, ih), odd, t1, ih);
            alo[b] = _mm512_add_epi16(alo[b], _mm512_maddubs_epi16(wsingle, rl));
            ahi[b] = _mm512_add_epi16(ahi[b], _mm512_maddubs_epi16(wsingle, rh));
          }
        }
      }
      for (int b = 0; b < NB; ++b) {
        const __m512 ls = _mm512_set1_ps(P.lscale[static_cast<size_t>(b0 + b) * groups + g]);
        const __m512i parts[2] = {alo[b], ahi[b]};
        for (int h = 0; h < 2; ++h)
          for (int q = 0; q < 2; ++q) {
            const __m256i v16 = q ? _mm512_extracti64x4_epi64(parts[h], 1) : _mm512_castsi512_si256(parts[h]);
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(v16)), ls);
            const int pos = h * 32 + q * 16;
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + pos)));
            _mm512_store_ps(acc[b] + pos, _mm512_fmadd_ps(s, v, _mm512_load_ps(acc[b] + pos)));
          }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 sx = _mm512_set1_ps(P.sumx[static_cast<size_t>(b0 + b) * groups + g]);
      for (int q = 0; q < 4; ++q) {
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + q * 16)));
        _mm512_store_ps(acc[b] + q * 16, _mm512_fmadd_ps(m, sx, _mm512_load_ps(acc[b] + q * 16)));
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int n0 = t * kTile, rows = std::min(kTile, P.N - n0);
    std::memcpy(P.y + static_cast<size_t>(b0 + b) * P.N + n0, acc[b], sizeof(float) * rows);
  }
}

template <int BITS>
void tiles_avx512(const Problem& P, int t0, int t1) {
  for (int t = t0; t < t1; ++t) {
    int b = 0;
    for (; b + 4 <= P.B; b += 4) tile_avx512<BITS, 4>(P, t, b);
    for (; b + 2 <= P.B; b += 2) tile_avx512<BITS, 2>(P, t, b);
    for (; b < P.B; ++b) tile_avx512<BITS, 1>(P, t, b);
  }
}

// ---- AVX2: the same blocks as two 32-byte halves (rows 0..15|32..47, then 16..31|48..63) ------
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) void tiles_avx2(const Problem& P, int t0, int t1) {
  const int groups = P.K / P.group, cpg = P.group / 4, KC = P.K / 4;
  const int F = flush_chunks(BITS, cpg);
  const size_t gbytes = group_bytes(BITS, cpg);
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  const __m256i odd = _mm256_set1_epi16(static_cast<short>(0xff00));
  for (int t = t0; t < t1; ++t) {
    for (int b = 0; b < P.B; ++b) {
      alignas(32) float acc[kTile] = {0};
      const int8_t* tb = P.tables + static_cast<size_t>(b) * KC * 16;
      for (int g = 0; g < groups; ++g) {
        const uint8_t* wg = P.w + (static_cast<size_t>(t) * groups + g) * gbytes;
        const uint16_t* sc = P.scales + (static_cast<size_t>(t) * groups + g) * kTile;
        const uint16_t* mn = P.mins + (static_cast<size_t>(t) * groups + g) * kTile;
        const __m256 ls = _mm256_set1_ps(P.lscale[static_cast<size_t>(b) * groups + g]);
        const __m256 sx = _mm256_set1_ps(P.sumx[static_cast<size_t>(b) * groups + g]);
        for (int c0 = 0; c0 < cpg; c0 += F) {
          // a[half][nibble]: rows 16*half + 32*nibble .. +15
          __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;
          for (int m = 0; m < BITS / 2; ++m) {
            const __m256i wpair = _mm256_set1_epi16(static_cast<short>((1 << (2 * m)) | (1 << (2 * m + 1)) << 8));
            for (int c = c0; c < c0 + F; ++c) {
              const __m256i tab = _mm256_broadcastsi128_si256(
                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + (static_cast<size_t>(g) * cpg + c) * 16)));
              const uint8_t* blk = wg + (static_cast<size_t>(m) * cpg + c) * kBlock;
              for (int h = 0; h < 2; ++h) {
                const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * h));
                const __m256i rl = _mm256_shuffle_epi8(tab, _mm256_and_si256(raw, lo4));
                const __m256i rh = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4));
                if (h == 0) {
                  a00 = _mm256_add_epi16(a00, _mm256_maddubs_epi16(wpair, rl));
                  a01 = _mm256_add_epi16(a01, _mm256_maddubs_epi16(wpair, rh));
                } else {
                  a10 = _mm256_add_epi16(a10, _mm256_maddubs_epi16(wpair, rl));
                  a11 = _mm256_add_epi16(a11, _mm256_maddubs_epi16(wpair, rh));
                }
              }
            }
          }
          if (BITS & 1) {
            const __m256i wsingle = _mm256_set1_epi8(static_cast<char>(1 << (BITS - 1)));
            const uint8_t* single = wg + static_cast<size_t>(BITS / 2) * cpg * kBlock;
            for (int c = c0; c < c0 + F; c += 2) {
              const int8_t* tc = tb + (static_cast<size_t>(g) * cpg + c) * 16;
              const __m256i t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tc)));
              const __m256i t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tc + 16)));
              const uint8_t* blk = single + static_cast<size_t>(c / 2) * kBlock;
              for (int h = 0; h < 2; ++h) {
                const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * h));
                const __m256i il = _mm256_and_si256(raw, lo4), ih = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
                const __m256i rl = _mm256_blendv_epi8(_mm256_shuffle_epi8(t0, il), _mm256_shuffle_epi8(t1, il), odd);
                const __m256i rh = _mm256_blendv_epi8(_mm256_shuffle_epi8(t0, ih), _mm256_shuffle_epi8(t1, ih), odd);
                if (h == 0) {
                  a00 = _mm256_add_epi16(a00, _mm256_maddubs_epi16(wsingle, rl));
                  a01 = _mm256_add_epi16(a01, _mm256_maddubs_epi16(wsingle, rh));
                } else {
                  a10 = _mm256_add_epi16(a10, _mm256_maddubs_epi16(wsingle, rl));
                  a11 = _mm256_add_epi16(a11, _mm256_maddubs_epi16(wsingle, rh));
                }
              }
            }
          }
          const __m256i parts[4] = {a00, a10, a01, a11};  // rows 0, 16, 32, 48 (+0..15)
          for (int q = 0; q < 4; ++q)
            for (int h = 0; h < 2; ++h) {
              const __m128i v16 = h ? _mm256_extracti128_si256(parts[q], 1) : _mm256_castsi256_si128(parts[q]);
              const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v16)), ls);
              const int pos = q * 16 + h * 8;
              const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + pos)));
              _mm256_store_ps(acc + pos, _mm256_fmadd_ps(s, v, _mm256_load_ps(acc + pos)));
            }
        }
        for (int pos = 0; pos < kTile; pos += 8) {
          const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + pos)));
          _mm256_store_ps(acc + pos, _mm256_fmadd_ps(m, sx, _mm256_load_ps(acc + pos)));
        }
      }
      const int n0 = t * kTile, rows = std::min(kTile, P.N - n0);
      std::memcpy(P.y + static_cast<size_t>(b) * P.N + n0, acc, sizeof(float) * rows);
    }
  }
}

using TileFn = void (*)(const Problem&, int, int);

TileFn pick(int isa, int bits) {
  static const TileFn avx512[4] = {tiles_avx512<1>, tiles_avx512<2>, tiles_avx512<3>, tiles_avx512<4>};
  static const TileFn avx2[4] = {tiles_avx2<1>, tiles_avx2<2>, tiles_avx2<3>, tiles_avx2<4>};
  if (isa == 2) return avx512[bits - 1];
  if (isa == 1) return avx2[bits - 1];
  return tiles_scalar;
}

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
  return 0;
}

// ---- a small persistent thread pool ----------------------------------------------------------
// Tiles are claimed from a counter tagged with the job's generation, and the caller works too: a
// worker that is not on a core (2 cores shared with PyTorch's own threads, or a busy machine)
// never holds a step up, it simply claims nothing. The caller only waits for workers that are
// inside a range. Claims are guided (OpenMP's schedule(guided)): a claim takes 1/(2 x threads)
// of what is left, at least one tile, so each thread streams long contiguous runs of the packed
// weight (one prefetch stream, few contended atomics: one per tile cost ~0.1-0.5 us, a tile of a
// 1536-wide layer at 2 bits is ~1 us of reading) and the shrinking tail still balances the load.
// Idle workers spin a while (kSpinMicros), then sleep.
// How long an idle worker spins before sleeping. Between two linear layers of a decode step the
// caller runs a few small ops (norm, rotary, attention: tens of microseconds); a worker still
// spinning when the next GEMV comes joins it at once instead of after a futex wake-up.
constexpr int kSpinMicros = 400;

class Pool {
 public:
  // fn(t0, t1) runs tiles [t0, t1).
  void run(int nthreads, int tiles, const std::function<void(int, int)>& fn) {
    if (nthreads <= 1 || tiles <= 1) {
      fn(0, tiles);
      return;
    }
    ensure(nthreads - 1);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      tiles_ = tiles;
      split_ = 2 * nthreads;
      gen = ++gen_counter_;
      next_.store(gen << 32, std::memory_order_release);  // [generation | next tile]
      wake_gen_.store(gen, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    drain(gen, fn, tiles, 2 * nthreads);
    for (int spin = 0; busy_.load(std::memory_order_acquire) != 0; ++spin)
      spin < 4096 ? _mm_pause() : std::this_thread::yield();
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      wake_gen_.store(~0ull);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  // Claim and run ranges of job `gen` until none is left (or a newer job replaced it).
  void drain(uint64_t gen, const std::function<void(int, int)>& fn, int tiles, int split) {
    uint64_t cur = next_.load(std::memory_order_acquire);
    for (;;) {
      const int t0 = static_cast<int>(cur & 0xffffffffu);
      if ((cur >> 32) != gen || t0 >= tiles) return;
      const int n = std::max(1, (tiles - t0) / split);
      if (next_.compare_exchange_weak(cur, cur + n, std::memory_order_acq_rel)) {
        fn(t0, t0 + n);
        cur = next_.load(std::memory_order_acquire);
      }
    }
  }
  void ensure(int workers) {
    while (static_cast<int>(threads_.size()) < workers) threads_.emplace_back([this] { loop(); });
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = wake_gen_.load(std::memory_order_acquire);
      const auto t0 = std::chrono::steady_clock::now();
      for (int spin = 0; g == seen; ++spin) {
        _mm_pause();
        g = wake_gen_.load(std::memory_order_acquire);
        if ((spin & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinMicros)) break;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lk, [&] { return wake_gen_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1);
        g = wake_gen_.load(std::memory_order_acquire);
      }
      seen = g;
      const std::function<void(int, int)>* fn;
      int tiles, split;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) return;
        if (gen_counter_ != g) continue;  // already replaced by a newer job
        fn = fn_;
        tiles = tiles_;
        split = split_;
        busy_.fetch_add(1, std::memory_order_acq_rel);  // under the lock: the job is still current
      }
      drain(g, *fn, tiles, split);
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> next_{0}, wake_gen_{0};
  std::atomic<int> busy_{0}, sleepers_{0};
  uint64_t gen_counter_ = 0;
  const std::function<void(int, int)>* fn_ = nullptr;
  int tiles_ = 0, split_ = 2;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p;
  return p;
}

// ---- table-free GEMMs: 8-bit codes, 4-bit codebook codes, Q6_K blocks times float32 activations
// The LUT path rounds its activation tables to int8 per group, ~2-3% error per product: fine
// under 4-bit weights' own error, not under 8-bit ones' (Qwen2.5-1.5B int8: +4.8% perplexity), and
// a codebook's values are not sums of bit planes. Here every weight meets its float activation:
//   y[b, n] = sum_g s[n,g] * sum_{k in g} v(n,k) x[b,k] + m[n,g] * sum_{k in g} x[b,k]
// with v the code (uint8 [N][K], `Q8`) or the codebook's value of a nibble (uint32 words [N][K/8],
// nibble j = input 8i + j, `Cb4`: bitfold/kernels/codebook.py; m = 0) or a GGUF Q6_K block's
// 6-bit code minus 32 (`Q6K`: the file's bytes, s = d * sub-scale, m = 0). One template runs all:
// R weight rows x NB activation rows per pass, each 8 weights decoded and scaled once and then
// met by NB activation vectors (one FMA each, straight into the output's accumulator: no
// per-group horizontal sum, which cost as much as a 32-weight group's FMAs).
struct RowsProblem {
  const float* x;
  int B, K, N, group;
  const uint16_t* scales;  // fp16 [N][groups]
  const uint16_t* mins;    // fp16 [N][groups], or null (no mins)
  const float* sumx;       // [B][groups] when mins
  float* y;
};

// Decoders take their per-group scale from RowsProblem's fp16 array (`Fp16Scales`) or, Q6K, from
// their own blocks; `scale` is the portable decode, `scale_f16c` the AVX2 path's.
struct Fp16Scales {
  float scale(const RowsProblem& P, int n, int g, int groups) const {
    return half_to_float(P.scales[static_cast<size_t>(n) * groups + g]);
  }
  __attribute__((target("avx2,fma,f16c"))) float scale_f16c(const RowsProblem& P, int n, int g, int groups) const {
    return _cvtsh_ss(P.scales[static_cast<size_t>(n) * groups + g]);  // F16C: not the portable bit decode
  }
};

struct Q8 : Fp16Scales {  // uint8 codes
  const uint8_t* q;
  float at(int n, int k, int K) const { return static_cast<float>(q[static_cast<size_t>(n) * K + k]); }
  __attribute__((target("avx2,fma,f16c"))) __m256 load8(int n, int k, int K) const {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + static_cast<size_t>(n) * K + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
  }
};

struct Cb4 : Fp16Scales {  // 4-bit codebook codes: two 8-entry permutes and a blend on bit 3 per 8 nibbles
  const uint32_t* codes;
  const float* codebook;
  float at(int n, int k, int K) const {
    return codebook[(codes[static_cast<size_t>(n) * (K / 8) + k / 8] >> (4 * (k % 8))) & 15];
  }
  __attribute__((target("avx2,fma,f16c"))) __m256 load8(int n, int k, int K) const {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const uint32_t w = codes[static_cast<size_t>(n) * (K / 8) + k / 8];
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts),
                                         _mm256_set1_epi32(15));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(codebook), idx),
                            _mm256_permutevar8x32_ps(_mm256_loadu_ps(codebook + 8), idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
};

// GGUF Q6_K blocks as the file stores them (ggml-common.h block_q6_K), 210 bytes per 256 weights
// of a row: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d fp16. Weight
// 128h + 32s + l of a block (half h, quarter s, l < 32) is
//   q = ((ql[64h + 32(s&1) + l] >> 4(s>>1)) & 15) | (((qh[32h + l] >> 2s) & 3) << 4)
//   w = (d * scales[(128h + 32s + l) / 16]) * (q - 32)
// in that float32 order, as the gguf package dequantizes it. A group is a 16-weight sub-block
// (group 16, no mins; the zero 32 is subtracted from the code, so the code is exact in float):
// 8 consecutive weights share one run of ql bytes, one of qh bytes and both shifts.
struct Q6K {
  static constexpr int kBytes = 210;
  const uint8_t* blocks;  // [N][K / 256][210]
  const uint8_t* block(int n, int k, int K) const {
    return blocks + (static_cast<size_t>(n) * (K / 256) + k / 256) * kBytes;
  }
  float scale(const RowsProblem&, int n, int g, int groups) const {
    const uint8_t* b = block(n, 16 * g, 16 * groups);
    uint16_t d;
    std::memcpy(&d, b + 208, 2);
    return half_to_float(d) * static_cast<float>(static_cast<int8_t>(b[192 + g % 16]));
  }
  __attribute__((target("avx2,fma,f16c"))) float scale_f16c(const RowsProblem& P, int n, int g, int groups) const {
    const uint8_t* b = block(n, 16 * g, 16 * groups);
    uint16_t d;
    std::memcpy(&d, b + 208, 2);
    return _cvtsh_ss(d) * static_cast<float>(static_cast<int8_t>(b[192 + g % 16]));
  }
  float at(int n, int k, int K) const {
    const uint8_t* b = block(n, k, K);
    const int kb = k % 256, h = kb / 128, s = (kb % 128) / 32, l = kb % 32;
    const int lo = (b[64 * h + 32 * (s & 1) + l] >> (4 * (s >> 1))) & 15;
    const int hi = (b[128 + 32 * h + l] >> (2 * s)) & 3;
    return static_cast<float>((lo | (hi << 4)) - 32);
  }
  __attribute__((target("avx2,fma,f16c"))) __m256 load8(int n, int k, int K) const {
    const uint8_t* b = block(n, k, K);
    const int kb = k % 256, h = kb / 128, s = (kb % 128) / 32, l = kb % 32;
    const __m128i ql = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 64 * h + 32 * (s & 1) + l));
    const __m128i qh = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 128 + 32 * h + l));
    // byte shifts through 16-bit lanes, then masks: bits shifted in from the neighbour byte are cut
    const __m128i lo = _mm_and_si128(_mm_srl_epi16(ql, _mm_cvtsi32_si128(4 * (s >> 1))), _mm_set1_epi8(15));
    const __m128i hi = _mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * s)), _mm_set1_epi8(3));
    const __m128i q = _mm_or_si128(lo, _mm_slli_epi16(hi, 4));  // hi < 4: no bit leaves its byte
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(q), _mm256_set1_epi32(32)));
  }
};

template <class W>
void rows_scalar(const RowsProblem& P, const W& w, int n0, int n1) {
  const int groups = P.K / P.group;
  for (int n = n0; n < n1; ++n)
    for (int b = 0; b < P.B; ++b) {
      const float* xb = P.x + static_cast<size_t>(b) * P.K;
      float acc = 0.f;
      for (int g = 0; g < groups; ++g) {
        float d = 0.f;
        for (int k = g * P.group; k < (g + 1) * P.group; ++k) d += w.at(n, k, P.K) * xb[k];
        acc += w.scale(P, n, g, groups) * d;
        if (P.mins)
          acc += half_to_float(P.mins[static_cast<size_t>(n) * groups + g]) * P.sumx[static_cast<size_t>(b) * groups + g];
      }
      P.y[static_cast<size_t>(b) * P.N + n] = acc;
    }
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <class W, int R, int NB>
__attribute__((target("avx2,fma,f16c"))) void rows_block_avx2(const RowsProblem& P, const W& w, int n, int b0) {
  const int groups = P.K / P.group;
  const float* xb[NB];
  for (int j = 0; j < NB; ++j) xb[j] = P.x + static_cast<size_t>(b0 + j) * P.K;
  __m256 acc[R][NB];
  float mtot[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps(), mtot[r][j] = 0.f;
  for (int g = 0; g < groups; ++g) {
    __m256 sv[R];
    for (int r = 0; r < R; ++r) {
      sv[r] = _mm256_set1_ps(w.scale_f16c(P, n + r, g, groups));
      if (P.mins) {
        const float mn = _cvtsh_ss(P.mins[static_cast<size_t>(n + r) * groups + g]);
        for (int j = 0; j < NB; ++j) mtot[r][j] += mn * P.sumx[static_cast<size_t>(b0 + j) * groups + g];
      }
    }
    for (int k = g * P.group; k < (g + 1) * P.group; k += 8) {  // group: a multiple of 8
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_mul_ps(w.load8(n + r, k, P.K), sv[r]);
      for (int j = 0; j < NB; ++j) {
        const __m256 xv = _mm256_loadu_ps(xb[j] + k);
        for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) P.y[static_cast<size_t>(b0 + j) * P.N + n + r] = hsum_avx2(acc[r][j]) + mtot[r][j];
}

// 4 weight rows per pass for one activation row (its loads shared wider), 2 for up to 4 rows
// (8 accumulators in registers).
template <class W>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const RowsProblem& P, const W& w, int n0, int n1) {
  int n = n0;
  if (P.B == 1) {
    for (; n + 4 <= n1; n += 4) rows_block_avx2<W, 4, 1>(P, w, n, 0);
  } else {
    for (; n + 2 <= n1; n += 2) {
      int b = 0;
      for (; b + 4 <= P.B; b += 4) rows_block_avx2<W, 2, 4>(P, w, n, b);
      switch (P.B - b) {
        case 3: rows_block_avx2<W, 2, 3>(P, w, n, b); break;
        case 2: rows_block_avx2<W, 2, 2>(P, w, n, b); break;
        case 1: rows_block_avx2<W, 2, 1>(P, w, n, b); break;
        default: break;
      }
    }
  }
  if (n < n1) rows_scalar(P, w, n, n1);
}

// Q6K's AVX2 pass: a whole 256-weight block at a time instead of `load8` per 8 weights (which
// recomputes the block address, shifts and the sub-block's scale for every 8 weights: 4-6x slower
// than the int6-g16 LUT path it replaces). Per row and block the 16 scales d * sc are computed
// once (float32, gguf's order); per quarter (32 weights: one ql run, one qh run, two fixed
// shifts) the codes are assembled as 32 bytes in 4 vector ops, minus 32 as int8, then widened 8
// at a time and scaled; the FMAs are the template's (NB activation rows per decoded vector).
template <int R, int NB>
__attribute__((target("avx2,fma,f16c"))) void q6k_block_avx2(const RowsProblem& P, const Q6K& w, int n, int b0) {
  const int nblk = P.K / 256;
  const float* xb[NB];
  for (int j = 0; j < NB; ++j) xb[j] = P.x + static_cast<size_t>(b0 + j) * P.K;
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi8(15), lo2 = _mm256_set1_epi8(3), zero32 = _mm256_set1_epi8(32);
  for (int blk = 0; blk < nblk; ++blk) {
    const uint8_t* bp[R];
    alignas(32) float sc[R][16];
    for (int r = 0; r < R; ++r) {
      bp[r] = w.blocks + (static_cast<size_t>(n + r) * nblk + blk) * Q6K::kBytes;
      uint16_t d;
      std::memcpy(&d, bp[r] + 208, 2);
      const __m256 dv = _mm256_set1_ps(_cvtsh_ss(d));
      const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bp[r] + 192));
      _mm256_store_ps(sc[r], _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8))));
      _mm256_store_ps(sc[r] + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8)))));
    }
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s) {
        __m256i q[R];  // int8 codes - 32 of weights 128h + 32s + 0..31
        for (int r = 0; r < R; ++r) {
          const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp[r] + 64 * h + 32 * (s & 1)));
          const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp[r] + 128 + 32 * h));
          const __m256i lo = _mm256_and_si256(s >> 1 ? _mm256_srli_epi16(ql, 4) : ql, lo4);
          const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s)), lo2);
          q[r] = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), zero32);
        }
        const int k0 = blk * 256 + 128 * h + 32 * s;
        for (int c = 0; c < 4; ++c) {
          __m256 wv[R];
          for (int r = 0; r < R; ++r) {
            const __m128i half = c < 2 ? _mm256_castsi256_si128(q[r]) : _mm256_extracti128_si256(q[r], 1);
            const __m128i b8 = c & 1 ? _mm_srli_si128(half, 8) : half;
            wv[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8)),
                                  _mm256_broadcast_ss(&sc[r][8 * h + 2 * s + c / 2]));
          }
          for (int j = 0; j < NB; ++j) {
            const __m256 xv = _mm256_loadu_ps(xb[j] + k0 + 8 * c);
            for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
          }
        }
      }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) P.y[static_cast<size_t>(b0 + j) * P.N + n + r] = hsum_avx2(acc[r][j]);
}

template <>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2<Q6K>(const RowsProblem& P, const Q6K& w, int n0, int n1) {
  int n = n0;
  if (P.B == 1) {
    for (; n + 4 <= n1; n += 4) q6k_block_avx2<4, 1>(P, w, n, 0);
  } else {
    for (; n + 2 <= n1; n += 2) {
      int b = 0;
      for (; b + 4 <= P.B; b += 4) q6k_block_avx2<2, 4>(P, w, n, b);
      switch (P.B - b) {
        case 3: q6k_block_avx2<2, 3>(P, w, n, b); break;
        case 2: q6k_block_avx2<2, 2>(P, w, n, b); break;
        case 1: q6k_block_avx2<2, 1>(P, w, n, b); break;
        default: break;
      }
    }
  }
  if (n < n1) rows_scalar(P, w, n, n1);
}

// y = x @ W^T over the pool: 16-row tasks, AVX2 where the CPU (and isa) allow. Returns 0, or -1
// for bad arguments (K a multiple of group, group a multiple of 8).
template <class W>
int rows_gemm(const float* x, int B, int K, int N, int group, const uint16_t* scales, const uint16_t* mins,
              const W& w, float* y, int nthreads, int isa) {
  if (B <= 0 || N <= 0 || K <= 0 || group < 8 || group % 8 || K % group) return -1;
  const int best = detect_isa();
  if (isa < 0 || isa > best) isa = best;
  const int groups = K / group;
  thread_local std::vector<float> sumx;
  if (mins) {
    sumx.resize(static_cast<size_t>(B) * groups);
    for (int b = 0; b < B; ++b)
      for (int g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int k = g * group; k < (g + 1) * group; ++k) s += x[static_cast<size_t>(b) * K + k];
        sumx[static_cast<size_t>(b) * groups + g] = s;
      }
  }
  const RowsProblem P{x, B, K, N, group, scales, mins, mins ? sumx.data() : nullptr, y};
  constexpr int kRowsPerTask = 16;  // a multiple of every pass's rows
  const int tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  nthreads = std::max(1, std::min(nthreads, tasks));
  pool().run(nthreads, tasks, [&](int t0, int t1) {
    const int n0 = t0 * kRowsPerTask, n1 = std::min(N, t1 * kRowsPerTask);
    if (isa >= 1) rows_avx2(P, w, n0, n1); else rows_scalar(P, w, n0, n1);
  });
  return 0;
}

}  // namespace

extern "C" {

// y[B, N] = x[B, K] @ W^T for 4-bit codebook codes (layout above): K a multiple of group, group a
// multiple of 8. isa < 0 picks the best (AVX2 or scalar). Returns 0, or -1 for bad arguments.
int bitfold_cb4_gemm(const float* x, int B, int K, const uint32_t* codes, const uint16_t* scales,
                     const float* codebook, int N, int group, float* y, int nthreads, int isa) {
  return rows_gemm(x, B, K, N, group, scales, nullptr, Cb4{{}, codes, codebook}, y, nthreads, isa);
}

// y[B, N] = x[B, K] @ W^T, W[n, k] = s[n, k / group] * q[n, k] + m[n, k / group] with uint8
// codes q [N, K] and fp16 s, m [N, K / group]: every product in float32, no activation tables.
// K a multiple of group, group a multiple of 8. isa < 0 picks the best (AVX2 or scalar).
// Returns 0, or -1 for bad arguments.
int bitfold_q8_gemm(const float* x, int B, int K, const uint8_t* q, const uint16_t* scales, const uint16_t* mins,
                    int N, int group, float* y, int nthreads, int isa) {
  return rows_gemm(x, B, K, N, group, scales, mins, Q8{{}, q}, y, nthreads, isa);
}

// y[B, N] = x[B, K] @ W^T for W stored as GGUF Q6_K blocks (`Q6K` above: [N][K / 256][210] bytes,
// the file's tensor as it is), every weight times its float activation. K a multiple of 256.
// isa < 0 picks the best (AVX2 or scalar). Returns 0, or -1 for bad arguments.
int bitfold_q6k_gemm(const float* x, int B, int K, const uint8_t* blocks, int N, float* y, int nthreads, int isa) {
  if (K <= 0 || K % 256) return -1;
  return rows_gemm(x, B, K, N, 16, nullptr, nullptr, Q6K{blocks}, y, nthreads, isa);
}

// 2 = AVX-512BW, 1 = AVX2, 0 = scalar.
int bitfold_lut_isa() { return detect_isa(); }

// The pool above for the library's other kernels (cpu/quant_kv.cpp): fn(ctx, t0, t1) runs tasks
// [t0, t1), on up to nthreads threads, the caller among them. One pool per process: a second one
// would spin against this one for the same cores.
void bitfold_parallel_for(int nthreads, int tasks, void (*fn)(void*, int, int), void* ctx) {
  if (tasks <= 0) return;
  nthreads = std::max(1, std::min(nthreads, tasks));
  pool().run(nthreads, tasks, [&](int t0, int t1) { fn(ctx, t0, t1); });
}

// y[B, N] = x[B, K] @ W^T for W packed as described above. K must be a multiple of `group`
// (the Python wrapper pads), group a multiple of 8, bits in 1..4. isa < 0 picks the best.
// Returns 0, or -1 for bad arguments.
int bitfold_lut_gemm(const float* x, int B, int K, const uint8_t* packed, const uint16_t* scales,
                     const uint16_t* mins, int N, int bits, int group, float* y, int nthreads, int isa) {
  if (B <= 0 || N <= 0 || K <= 0 || bits < 1 || bits > 4 || group < 8 || group % 8 || K % group) return -1;
  const int best = detect_isa();
  if (isa < 0 || isa > best) isa = best;
  const int groups = K / group, tiles = (N + kTile - 1) / kTile;
  // Per-call scratch, kept per calling thread (no allocation per GEMV once warm).
  thread_local std::vector<int8_t> tables;
  thread_local std::vector<float> lscale, sumx;
  tables.resize(static_cast<size_t>(B) * (K / 4) * 16);
  lscale.resize(static_cast<size_t>(B) * groups);
  sumx.resize(static_cast<size_t>(B) * groups);
  for (int b = 0; b < B; ++b)
    build_tables(x + static_cast<size_t>(b) * K, K, group, tables.data() + static_cast<size_t>(b) * (K / 4) * 16,
                 lscale.data() + static_cast<size_t>(b) * groups, sumx.data() + static_cast<size_t>(b) * groups, isa);
  Problem P{x, B, K, N, bits, group, packed, scales, mins, y, tables.data(), lscale.data(), sumx.data()};
  const TileFn fn = pick(isa, bits);
  nthreads = std::max(1, std::min(nthreads, tiles));
  pool().run(nthreads, tiles, [&](int t0, int t1) { fn(P, t0, t1); });
  return 0;
}

}  // extern "C"

#ifndef BITFOLD_NO_PYMODULE
// Built by setup.py as the (method-less) extension module bitfold._lut so that pip compiles it
// at install; Python reaches the C functions above through ctypes.
#include <Python.h>
static struct PyModuleDef lut_module = {PyModuleDef_HEAD_INIT, "_lut", "bitfold LUT GEMM kernels (ctypes)", -1,
                                        nullptr};
PyMODINIT_FUNC PyInit__lut(void) { return PyModule_Create(&lut_module); }
#endif
