// One ISA's decode-attention kernels, included three times by quant_kv.cpp, each time under its own
// `#pragma GCC target` with BITFOLD_QKV_ISA = 0 (scalar), 1 (AVX2 + FMA + F16C) or 2 (AVX-512):
// the kernels are written once against the vector operations of struct S. No include guard on
// purpose.
namespace bitfold_qkv {
namespace BITFOLD_QKV_NS(BITFOLD_QKV_ISA) {
namespace {  // internal linkage: three copies of every helper, one per ISA

// ---- the vector operations the kernels use, per ISA -------------------------------------------
#if BITFOLD_QKV_ISA == 0
struct S {  // one lane: plain C++, the portable reference of the vector paths
  static constexpr int W = 1;
  using F = float;
  static F zero() { return 0.f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F set1(float x) { return x; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F max(F a, F b) { return std::max(a, b); }
  static F min(F a, F b) { return std::min(a, b); }
  static float hsum(F v) { return v; }
  static void hsum8(const F* a, float* out) {
    for (int i = 0; i < 8; ++i) out[i] = a[i];
  }
  static float hmax(F v) { return v; }
  static F codes(const uint8_t* p, int shift, int mask) { return static_cast<float>((*p >> shift) & mask); }
  static F i8(const int8_t* p) { return static_cast<float>(*p); }
  static F fp8(const uint8_t* p) { return half_to_float(fp8_as_half(*p)) * 256.f; }
  static F half(const uint16_t* p) { return half_to_float(*p); }
  static F exp(F x) { return exp_scalar(x); }
};
#elif BITFOLD_QKV_ISA == 1
struct S {  // AVX2 + FMA + F16C, 8 lanes
  static constexpr int W = 8;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static void hsum8(const F* a, float* out) { store(out, sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])); }
  // The lane sums of 8 vectors as one: a transposing tree of horizontal adds (~2.6 instructions a
  // sum against ~6 for hsum, which a score per (head, token) paid every 16 FMAs).
  static __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // lanes 0-3 | 4-7 per vector
    const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
  }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static F codes(const uint8_t* p, int shift, int mask) {
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask)));
  }
  static F i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F fp8(const uint8_t* p) {  // fp8_as_half on 8 lanes, F16C, x 256
    const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x7f)), 7));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
  }
  static F half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F pow2(F n) {  // 2^n for integral n in [-126, 127]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static F exp(F x);
};
#else
struct S {  // AVX-512F/BW/VL, 16 lanes
  static constexpr int W = 16;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static __m256 fold(F v) {  // the two 256-bit halves added
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static void hsum8(const F* a, float* out) {  // folded to 256 bits, then the AVX2 tree
    const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(fold(a[0]), fold(a[1])), _mm256_hadd_ps(fold(a[2]), fold(a[3])));
    const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(fold(a[4]), fold(a[5])), _mm256_hadd_ps(fold(a[6]), fold(a[7])));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                        _mm256_permute2f128_ps(h0123, h4567, 0x31)));
  }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static F codes(const uint8_t* p, int shift, int mask) {
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(x, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask)));
  }
  static F i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F fp8(const uint8_t* p) {
    const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
  }
  static F half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F pow2(F n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static F exp(F x);
};
#endif

using F = S::F;
constexpr int W = S::W;
// Independent accumulators the register-blocked loops keep: at least the FMA latency x throughput
// product (8), and a multiple of 8 for hsum8; AVX-512 has 32 registers.
constexpr int kAcc = W == 16 ? 16 : 8;

#if BITFOLD_QKV_ISA != 0
inline F S::exp(F x) {  // exp_scalar on W lanes
  const F xc = min(max(x, set1(-87.3f)), set1(88.f));
  const F n = sub(fma(xc, set1(kLog2e), set1(kRound)), set1(kRound));
  const F r = fma(n, set1(-kLn2Lo), fma(n, set1(-kLn2Hi), xc));  // as exp_scalar's r
  F p = set1(kP[0]);
  for (int i = 1; i < 6; ++i) p = fma(p, r, set1(kP[i]));
  p = add(fma(mul(p, r), r, r), set1(1.f));
  return mul(p, pow2(n));
}
#endif

// n fp16 values -> float.
inline void halves(const uint16_t* h, int n, float* out) {
  int i = 0;
  for (; i + W <= n; i += W) S::store(out + i, S::half(h + i));
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

// ---- the two dense loops every side ends in -----------------------------------------------------

// s[g * ld + t] = q_g . row_t for GB heads (q [GB][D]) and TB rows (row t at rows + t * stride).
template <int GB, int TB>
inline void dot_tile(const float* q, int D, const float* rows, int64_t stride, float* s, int ld) {
  F acc[GB][TB];
  for (int g = 0; g < GB; ++g)
    for (int t = 0; t < TB; ++t) acc[g][t] = S::zero();
  for (int c = 0; c < D; c += W) {
    F k[TB];
    for (int t = 0; t < TB; ++t) k[t] = S::load(rows + t * stride + c);
    for (int g = 0; g < GB; ++g) {
      const F qv = S::load(q + g * D + c);
      for (int t = 0; t < TB; ++t) acc[g][t] = S::fma(qv, k[t], acc[g][t]);
    }
  }
  if constexpr (GB * TB % 8 == 0) {
    float sums[GB * TB];
    for (int i = 0; i < GB * TB; i += 8) S::hsum8(&acc[0][0] + i, sums + i);
    for (int g = 0; g < GB; ++g)
      for (int t = 0; t < TB; ++t) s[g * ld + t] = sums[g * TB + t];
  } else {
    for (int g = 0; g < GB; ++g)
      for (int t = 0; t < TB; ++t) s[g * ld + t] = S::hsum(acc[g][t]);
  }
}

template <int GB>
inline void scores_heads(const float* q, int D, const float* rows, int64_t stride, int n, float* s, int ld) {
  constexpr int TB = kAcc / GB > 0 ? kAcc / GB : 1;
  int t = 0;
  for (; t + TB <= n; t += TB) dot_tile<GB, TB>(q, D, rows + t * stride, stride, s + t, ld);
  for (; t < n; ++t) dot_tile<GB, 1>(q, D, rows + t * stride, stride, s + t, ld);
}

// Heads per register tile: 4, then 2, then 1, so that heads x rows is always kAcc.
inline int head_block(int left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

// s[g * ld + t] = q_g . row_t, g < G, t < n: register tiles of up to 4 heads x a few rows.
inline void scores(const float* q, int G, int D, const float* rows, int64_t stride, int n, float* s, int ld) {
  for (int g0 = 0, gb; g0 < G; g0 += gb) {
    gb = head_block(G - g0);
    const float* qg = q + static_cast<int64_t>(g0) * D;
    float* sg = s + static_cast<int64_t>(g0) * ld;
    switch (gb) {
      case 1: scores_heads<1>(qg, D, rows, stride, n, sg, ld); break;
      case 2: scores_heads<2>(qg, D, rows, stride, n, sg, ld); break;
      default: scores_heads<4>(qg, D, rows, stride, n, sg, ld);
    }
  }
}

// acc[g][c0, c0 + CB W) += sum_t p[g * ld + t] * row_t[...] for GB heads.
template <int GB, int CB>
inline void axpy_tile(const float* p, int ld, const float* rows, int64_t stride, int n, float* acc, int D, int c0) {
  F a[GB][CB];
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < CB; ++j) a[g][j] = S::load(acc + g * D + c0 + j * W);
  for (int t = 0; t < n; ++t) {
    F v[CB];
    for (int j = 0; j < CB; ++j) v[j] = S::load(rows + t * stride + c0 + j * W);
    for (int g = 0; g < GB; ++g) {
      const F pb = S::set1(p[g * ld + t]);
      for (int j = 0; j < CB; ++j) a[g][j] = S::fma(pb, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < CB; ++j) S::store(acc + g * D + c0 + j * W, a[g][j]);
}

template <int GB, int CB>
inline void axpy_heads(const float* p, int ld, const float* rows, int64_t stride, int n, float* acc, int D) {
  for (int c0 = 0; c0 < D; c0 += CB * W) axpy_tile<GB, CB>(p, ld, rows, stride, n, acc, D, c0);
}

// acc[g] += sum_t p[g * ld + t] * row_t, g < G, t < n. D is a multiple of 2 W (checked); a tile
// holds GB heads x CB column vectors, kAcc accumulators where D allows.
template <int GB>
inline void accumulate_heads(const float* p, int ld, const float* rows, int64_t stride, int n, float* acc, int D) {
  constexpr int CB = kAcc / GB;
  if (D % (CB * W) == 0) return axpy_heads<GB, CB>(p, ld, rows, stride, n, acc, D);
  if constexpr (CB / 2 >= 2)
    if (D % (CB / 2 * W) == 0) return axpy_heads<GB, CB / 2>(p, ld, rows, stride, n, acc, D);
  if constexpr (CB / 4 >= 2)
    if (D % (CB / 4 * W) == 0) return axpy_heads<GB, CB / 4>(p, ld, rows, stride, n, acc, D);
  axpy_heads<GB, 2>(p, ld, rows, stride, n, acc, D);
}

inline void accumulate(const float* p, int ld, int G, int D, const float* rows, int64_t stride, int n, float* acc) {
  for (int g0 = 0, gb; g0 < G; g0 += gb) {
    gb = head_block(G - g0);
    const float* pg = p + static_cast<int64_t>(g0) * ld;
    float* ag = acc + static_cast<int64_t>(g0) * D;
    switch (gb) {
      case 1: accumulate_heads<1>(pg, ld, rows, stride, n, ag, D); break;
      case 2: accumulate_heads<2>(pg, ld, rows, stride, n, ag, D); break;
      default: accumulate_heads<4>(pg, ld, rows, stride, n, ag, D);
    }
  }
}

// Scores s[g * ld + t] (t < n) of one run of tokens become probabilities exp(s - m_new) in place;
// m, l (per head) and acc [G][D] are updated as the online softmax does (FlashAttention-2).
inline void softmax_update(float* s, int ld, int n, int G, int D, float* m, float* l, float* acc) {
  for (int g = 0; g < G; ++g) {
    float* sg = s + static_cast<int64_t>(g) * ld;
    float mx = kNegInf;
    int t = 0;
    if (n >= W) {
      F vm = S::load(sg);
      for (t = W; t + W <= n; t += W) vm = S::max(vm, S::load(sg + t));
      mx = S::hmax(vm);
    }
    for (; t < n; ++t) mx = std::max(mx, sg[t]);
    const float m_new = std::max(m[g], mx);
    const float alpha = m[g] == kNegInf ? 0.f : exp_scalar(m[g] - m_new);
    const F mv = S::set1(m_new);
    F vs = S::zero();
    for (t = 0; t + W <= n; t += W) {
      const F e = S::exp(S::sub(S::load(sg + t), mv));
      S::store(sg + t, e);
      vs = S::add(vs, e);
    }
    float sum = S::hsum(vs);
    for (; t < n; ++t) {
      sg[t] = exp_scalar(sg[t] - m_new);
      sum += sg[t];
    }
    l[g] = l[g] * alpha + sum;
    m[g] = m_new;
    if (alpha != 1.f) {
      float* a = acc + static_cast<int64_t>(g) * D;
      const F av = S::set1(alpha);
      for (int d = 0; d < D; d += W) S::store(a + d, S::mul(S::load(a + d), av));
    }
  }
}

// ---- unpacking one page of one head into float rows [n][D] ------------------------------------

// KIVI codes of tokens [t0, t0 + n) of a page-head (codes [BS / P][D], token r P + i at bits i * bits
// of row r), as floats (not dequantized).
inline void unpack_group(const uint8_t* codes, int bits, int t0, int n, int D, float* out) {
  const int P = 8 / bits, mask = (1 << bits) - 1;
  for (int t = 0; t < n; ++t) {
    const uint8_t* row = codes + static_cast<int64_t>((t0 + t) / P) * D;
    const int shift = ((t0 + t) % P) * bits;
    float* o = out + static_cast<int64_t>(t) * D;
    for (int c = 0; c < D; c += W) S::store(o + c, S::codes(row + c, shift, mask));
  }
}

// As unpack_group, dequantized per token and group of VG channels: code * scale + zero, with the
// n tokens' V meta already converted to float (meta [n][2][NG]: NG scales, then NG zeros).
inline void unpack_group_v(const uint8_t* codes, const float* meta, int bits, int t0, int n, int D, int VG,
                           float* out) {
  const int P = 8 / bits, mask = (1 << bits) - 1, NG = D / VG;
  for (int t = 0; t < n; ++t) {
    const uint8_t* row = codes + static_cast<int64_t>((t0 + t) / P) * D;
    const int shift = ((t0 + t) % P) * bits;
    const float* mt = meta + static_cast<int64_t>(t) * 2 * NG;
    float* o = out + static_cast<int64_t>(t) * D;
    for (int j = 0; j < NG; ++j) {
      const F sc = S::set1(mt[j]), zp = S::set1(mt[NG + j]);
      for (int c = j * VG; c < (j + 1) * VG; c += W) S::store(o + c, S::fma(S::codes(row + c, shift, mask), sc, zp));
    }
  }
}

// int8 / fp8 codes [n][D] (contiguous) as floats, unscaled.
inline void unpack_bytes(int kind, const uint8_t* codes, int n, int D, float* out) {
  const int64_t total = static_cast<int64_t>(n) * D;
  if (kind == kInt8) {
    const int8_t* c = reinterpret_cast<const int8_t*>(codes);
    for (int64_t i = 0; i < total; i += W) S::store(out + i, S::i8(c + i));
  } else {
    for (int64_t i = 0; i < total; i += W) S::store(out + i, S::fp8(codes + i));
  }
}

// ---- one task: a (sequence, KV head, split) ---------------------------------------------------

struct Scratch {
  std::vector<float> qf, qs, s, ktile, vtile, kmeta, vmeta, acc, m, l, bias;
};

inline void grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Bytes of one page-head of a side: codes, then meta (fp16).
inline void side_bytes(const BitfoldQuantDecodeArgs& a, bool is_k, int64_t* codes, int64_t* meta) {
  const int kind = is_k ? a.k_kind : a.v_kind, bits = is_k ? a.k_bits : a.v_bits;
  const int64_t BS = a.block_size, D = a.head_dim;
  if (kind == kDense) {
    *codes = BS * D * 4, *meta = 0;
  } else if (kind == kGroup) {
    *codes = BS * D * bits / 8, *meta = 2 * (is_k ? 2 * D : 2 * BS * (D / a.v_group));
  } else {
    *codes = BS * D, *meta = 2 * BS;
  }
}

// Ask for the next page-head's bytes while this one is computed: pages sit anywhere in the pool,
// so every page restarts the hardware prefetcher's streams. Measured small: Llama-3-8B layer,
// 4 x 32K tokens, one thread, 1-3% (int4 66.4 vs 68.5 ms, int8 62.3 vs 63.0, medians of 6).
inline void prefetch_page(const BitfoldQuantDecodeArgs& a, int64_t ph) {
  for (int side = 0; side < 2; ++side) {
    int64_t nc, nm;
    side_bytes(a, side == 0, &nc, &nm);
    const char* codes = static_cast<const char*>(side == 0 ? a.k : a.v) + ph * nc;
    const char* meta = reinterpret_cast<const char*>(side == 0 ? a.k_meta : a.v_meta) + ph * nm;
    for (int64_t o = 0; o < nc; o += 64) __builtin_prefetch(codes + o);
    for (int64_t o = 0; o < nm; o += 64) __builtin_prefetch(meta + o);
  }
}

// Tokens a page is unpacked in: a run's float tile (kRun x D) stays in L1 beside the next run's
// codes (whole-page tiles, 32 KB each at D = 128, spilled to L2 and cost ~40% of the time).
constexpr int kRun = 16;

// s[g * ld + t] = scale * q_g . k_t for tokens [t0, t0 + n) of page-head ph (sc.qf: q x scale).
void page_scores(const BitfoldQuantDecodeArgs& a, Scratch& sc, int64_t ph, int t0, int n, int G, int ld) {
  const int D = a.head_dim, BS = a.block_size;
  float *qf = sc.qf.data(), *s = sc.s.data(), *tile = sc.ktile.data();
  if (a.k_kind == kDense) {
    scores(qf, G, D, static_cast<const float*>(a.k) + (ph * BS + t0) * D, D, n, s, ld);
    return;
  }
  if (a.k_kind == kGroup) {  // q' = q * scale (per channel), bias = q . zero: codes need no dequantizing
    const uint8_t* codes = static_cast<const uint8_t*>(a.k) + ph * (BS / (8 / a.k_bits)) * D;
    float *km = sc.kmeta.data(), *qs = sc.qs.data();
    halves(a.k_meta + ph * 2 * D, 2 * D, km);  // scale row, zero row
    for (int g = 0; g < G; ++g) {
      const float* qg = qf + static_cast<int64_t>(g) * D;
      F bias = S::zero();
      for (int d = 0; d < D; d += W) {
        const F qv = S::load(qg + d);
        S::store(qs + static_cast<int64_t>(g) * D + d, S::mul(qv, S::load(km + d)));
        bias = S::fma(qv, S::load(km + D + d), bias);
      }
      sc.bias[g] = S::hsum(bias);
    }
    for (int u = 0; u < n; u += kRun) {
      const int nn = std::min(kRun, n - u);
      unpack_group(codes, a.k_bits, t0 + u, nn, D, tile);
      scores(qs, G, D, tile, D, nn, s + u, ld);
    }
    for (int g = 0; g < G; ++g)
      for (int t = 0; t < n; ++t) s[g * ld + t] += sc.bias[g];
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(a.k) + (ph * BS + t0) * D;  // int8 / fp8
  float* ks = sc.kmeta.data();
  halves(a.k_meta + ph * BS + t0, n, ks);
  for (int u = 0; u < n; u += kRun) {
    const int nn = std::min(kRun, n - u);
    unpack_bytes(a.k_kind, codes + static_cast<int64_t>(u) * D, nn, D, tile);
    scores(qf, G, D, tile, D, nn, s + u, ld);
  }
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < n; ++t) s[g * ld + t] *= ks[t];  // the token's scale
}

// acc[g] += sum_t p[g * ld + t] v_t for tokens [t0, t0 + n) of page-head ph (p: sc.s).
void page_values(const BitfoldQuantDecodeArgs& a, Scratch& sc, int64_t ph, int t0, int n, int G, int ld) {
  const int D = a.head_dim, BS = a.block_size;
  float *s = sc.s.data(), *acc = sc.acc.data(), *tile = sc.vtile.data();
  if (a.v_kind == kDense) {
    accumulate(s, ld, G, D, static_cast<const float*>(a.v) + (ph * BS + t0) * D, D, n, acc);
    return;
  }
  if (a.v_kind == kGroup) {  // dequantized per token and channel group into the tile
    const int NG = D / a.v_group;
    const uint8_t* codes = static_cast<const uint8_t*>(a.v) + ph * (BS / (8 / a.v_bits)) * D;
    float* vm = sc.vmeta.data();
    halves(a.v_meta + (ph * BS + t0) * 2 * NG, n * 2 * NG, vm);
    for (int u = 0; u < n; u += kRun) {
      const int nn = std::min(kRun, n - u);
      unpack_group_v(codes, vm + static_cast<int64_t>(u) * 2 * NG, a.v_bits, t0 + u, nn, D, a.v_group, tile);
      accumulate(s + u, ld, G, D, tile, D, nn, acc);
    }
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(a.v) + (ph * BS + t0) * D;  // int8 / fp8
  float* vs = sc.vmeta.data();
  halves(a.v_meta + ph * BS + t0, n, vs);
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < n; ++t) s[g * ld + t] *= vs[t];  // the token's scale into its probability
  for (int u = 0; u < n; u += kRun) {
    const int nn = std::min(kRun, n - u);
    unpack_bytes(a.v_kind, codes + static_cast<int64_t>(u) * D, nn, D, tile);
    accumulate(s + u, ld, G, D, tile, D, nn, acc);
  }
}

void run_task(Shared& sh, int task) {
  const BitfoldQuantDecodeArgs& a = *sh.a;
  const int NS = a.num_splits, KVH = a.kv_heads, H = a.heads, G = H / KVH, D = a.head_dim, BS = a.block_size;
  const int split = task % NS, kh = (task / NS) % KVH, b = task / NS / KVH;
  const int ld = (BS + W - 1) / W * W;  // scores of one page (or ring run) per head
  thread_local Scratch sc;
  grow(sc.qf, static_cast<size_t>(G) * D);
  grow(sc.qs, static_cast<size_t>(G) * D);
  grow(sc.acc, static_cast<size_t>(G) * D);
  grow(sc.s, static_cast<size_t>(G) * ld);
  grow(sc.ktile, static_cast<size_t>(kRun) * D);
  grow(sc.vtile, static_cast<size_t>(kRun) * D);
  grow(sc.kmeta, std::max(2 * D, BS) + W);
  grow(sc.vmeta, static_cast<size_t>(2 * BS) * (a.v_kind == kGroup ? D / a.v_group : 1) + W);
  grow(sc.m, G);
  grow(sc.l, G);
  grow(sc.bias, G);
  float *qf = sc.qf.data(), *acc = sc.acc.data(), *s = sc.s.data(), *m = sc.m.data(),
        *l = sc.l.data();
  std::fill(m, m + G, kNegInf);
  std::fill(l, l + G, 0.f);
  std::fill(acc, acc + static_cast<size_t>(G) * D, 0.f);

  const int L = a.context_lens[b];
  if (L > 0) {
    const bool ring = a.ring_cap > 0;
    const int start = a.sliding_window > 0 ? std::max(0, L - a.sliding_window) : 0;
    const int sealed = ring ? std::max(L - a.residual, 0) / BS * BS : L;  // positions below are in pages
    const float* qb = a.q + (static_cast<int64_t>(b) * H + static_cast<int64_t>(kh) * G) * D;
    for (int i = 0; i < G * D; ++i) qf[i] = qb[i] * a.scale;

    if (sealed > start) {
      const int p_first = start / BS, p_end = (sealed + BS - 1) / BS;
      if (p_end > a.max_blocks) {  // the context is longer than its block table
        sh.error.store(1);
        return;
      }
      const int per = (p_end - p_first + NS - 1) / NS;
      const int lo = p_first + split * per, hi = std::min(p_end, lo + per);
      const int32_t* table = a.block_tables + static_cast<int64_t>(b) * a.max_blocks;
      for (int j = lo; j < hi; ++j) {
        const int p0 = j * BS, t0 = std::max(start - p0, 0), t1 = std::min(sealed - p0, BS), n = t1 - t0;
        if (n <= 0) continue;
        const int64_t page = table[j];
        if (page < 0 || page >= a.num_blocks) {
          sh.error.store(1);
          return;
        }
        const int64_t ph = page * KVH + kh;  // (page, head)
        if (j + 1 < hi) {
          const int64_t next = table[j + 1];
          if (next >= 0 && next < a.num_blocks) prefetch_page(a, next * KVH + kh);
        }
        page_scores(a, sc, ph, t0, n, G, ld);
        softmax_update(s, ld, n, G, D, m, l, acc);
        page_values(a, sc, ph, t0, n, G, ld);
      }
    }

    // The newest tokens, [max(sealed, start), L), from the ring: the last split takes them.
    const int slot = a.seq_slots ? a.seq_slots[b] : -1;
    if (ring && split == NS - 1 && slot >= 0) {  // slot < 0: a padding row, nothing in a ring
      if (slot >= a.num_slots) {
        sh.error.store(1);
        return;
      }
      const int cap = a.ring_cap;
      const int64_t stride = static_cast<int64_t>(KVH) * D;
      for (int pos = std::max(sealed, start); pos < L;) {
        const int idx = pos % cap, n = std::min({L - pos, BS, cap - idx});  // runs never wrap
        const int64_t off = ((static_cast<int64_t>(slot) * cap + idx) * KVH + kh) * D;
        scores(qf, G, D, a.ring_k + off, stride, n, s, ld);
        softmax_update(s, ld, n, G, D, m, l, acc);
        accumulate(s, ld, G, D, a.ring_v + off, stride, n, acc);
        pos += n;
      }
    }
  }

  const int64_t row0 = static_cast<int64_t>(b) * H + static_cast<int64_t>(kh) * G;  // first output row
  for (int g = 0; g < G; ++g) {
    const float* ag = acc + static_cast<int64_t>(g) * D;
    if (NS == 1) {
      float* o = a.out + (row0 + g) * D;
      const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;  // no position at all: zeros
      for (int d = 0; d < D; ++d) o[d] = ag[d] * inv;
    } else {
      const int64_t part = (row0 + g) * NS + split;
      a.part_m[part] = m[g];
      a.part_l[part] = l[g];
      std::copy(ag, ag + D, a.part_acc + part * D);
    }
  }
}

void run_tasks(Shared& sh, int t0, int t1) {
  for (int t = t0; t < t1; ++t) run_task(sh, t);
}

}  // namespace
}  // namespace BITFOLD_QKV_NS(BITFOLD_QKV_ISA)
}  // namespace bitfold_qkv
