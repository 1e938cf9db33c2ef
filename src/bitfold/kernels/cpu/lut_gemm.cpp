// Lookup-table GEMV/GEMM for 1-4-bit group-quantized weights on x86 CPUs (T-MAC's method,
// arXiv 2407.00088; batched reuse of the index stream as in SAIL).
//
// Weights: w[n, k] = scale[n, g] * q[n, k] + min[n, g], q in [0, 2^bits), g = k / group.
// q is split into `bits` one-bit planes. For every run of 4 activations x[4c..4c+3] ("chunk" c)
// we precompute the table T_c[i] = sum_{j: bit j of i set} x[4c+j] for i in 0..15, quantized to
// int8 per group of the activation with scale ls_g (max |T| / 127). The 4 bits of one plane
// that a weight row holds for chunk c form an index i into T_c, so one byte shuffle (vpshufb)
// looks up 32 (AVX2) or 64 (AVX-512) rows at once:
//     sum_k q[n,k] x[k] ~= ls_g * sum_c sum_p 2^p T_c[idx_p(n, c)]
// and the cost falls linearly with the number of planes (bits). The int8 lookups accumulate in
// int16 (flushed to fp32 before they can overflow), then
//     y[n] = sum_g scale[n,g] * ls_g * acc[n,g] + min[n,g] * sum_{k in g} x[k].
//
// Layout written by bitfold/weights/lowbit.py `pack_lut`:
//   packed  uint8 [tiles][groups][bits][group/4 chunks][32]: tile = 64 rows; byte j of a chunk
//           holds row j's index in its low nibble and row 32+j's in its high nibble.
//   scales, mins  fp16 [tiles][groups][64] in "kernel order": position pos holds row
//           32*(pos>>5) + 2*(pos&15) + ((pos>>4)&1), which is how the even/odd-byte int16
//           accumulators come out of the shuffle without any permute.
// Tables (built here once per activation vector) are stored twice per chunk ([T_c, T_c], 32 B)
// so that one 32-byte load is an AVX2 table and one 64-byte load is [T_c,T_c,T_c+1,T_c+1].
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

// Chunks accumulated in int16 before a flush: |sum_p 2^p T| <= 127 * (2^bits - 1) per chunk.
// The largest even divisor of the group's chunk count under that bound (even: AVX-512 takes
// chunks in pairs; a group is a multiple of 8 weights, so 2 always qualifies).
inline int flush_chunks(int bits, int chunks_per_group) {
  const int fmax = 32767 / (127 * ((1 << bits) - 1));
  int best = 2;
  for (int f = 2; f <= std::min(fmax, chunks_per_group); f += 2)
    if (chunks_per_group % f == 0) best = f;
  return best;
}

inline int row_of(int pos) { return 32 * (pos >> 5) + 2 * (pos & 15) + ((pos >> 4) & 1); }

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
  const int8_t* tables;    // [B][K/4][32]
  const float* lscale;     // [B][groups]
  const float* sumx;       // [B][groups]
};

// ---- tables -----------------------------------------------------------------------------------
// Subset sums add x[4c+j] for j ascending, starting from 0: the reference adds the same terms in
// the same order (masked terms are exact zeros), so both produce bit-identical tables.
void build_tables(const float* x, int K, int group, int8_t* tab, float* lscale, float* sumx) {
  const int chunks = K / 4, cpg = group / 4, groups = K / group;
  std::vector<float> t(static_cast<size_t>(cpg) * 16);
  for (int g = 0; g < groups; ++g) {
    float amax = 0.f, s = 0.f;
    for (int c = 0; c < cpg; ++c) {
      const float* xc = x + (static_cast<size_t>(g) * cpg + c) * 4;
      for (int i = 0; i < 16; ++i) {
        float v = 0.f;
        for (int j = 0; j < 4; ++j)
          if (i >> j & 1) v += xc[j];
        t[c * 16 + i] = v;
        amax = std::max(amax, std::fabs(v));
      }
    }
    for (int k = 0; k < group; ++k) s += x[static_cast<size_t>(g) * group + k];
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    lscale[g] = amax / 127.f;
    sumx[g] = s;
    for (int c = 0; c < cpg; ++c) {
      int8_t* dst = tab + (static_cast<size_t>(g) * cpg + c) * 32;
      for (int i = 0; i < 16; ++i) {
        const int8_t q = static_cast<int8_t>(std::nearbyint(t[c * 16 + i] * inv));
        dst[i] = q;
        dst[16 + i] = q;
      }
    }
  }
  (void)chunks;
}

// ---- scalar fallback (natural row order, int32 accumulators) ----------------------------------
void tiles_scalar(const Problem& P, int t0, int t1) {
  const int groups = P.K / P.group, cpg = P.group / 4, bits = P.bits, KC = P.K / 4;
  for (int t = t0; t < t1; ++t) {
    const uint8_t* wt = P.w + static_cast<size_t>(t) * groups * bits * cpg * 32;
    for (int b = 0; b < P.B; ++b) {
      float acc[kTile] = {0};
      const int8_t* tb = P.tables + static_cast<size_t>(b) * KC * 32;
      for (int g = 0; g < groups; ++g) {
        const uint16_t* sc = P.scales + (static_cast<size_t>(t) * groups + g) * kTile;
        const uint16_t* mn = P.mins + (static_cast<size_t>(t) * groups + g) * kTile;
        const float ls = P.lscale[static_cast<size_t>(b) * groups + g];
        const float sx = P.sumx[static_cast<size_t>(b) * groups + g];
        for (int pos = 0; pos < kTile; ++pos) {
          const int r = row_of(pos), j = r & 31, hi = r >> 5;
          int32_t a = 0;
          for (int p = 0; p < bits; ++p) {
            const uint8_t* src = wt + (static_cast<size_t>(g) * bits + p) * cpg * 32;
            int32_t ap = 0;
            for (int c = 0; c < cpg; ++c) {
              const int idx = (src[c * 32 + j] >> (4 * hi)) & 15;
              ap += tb[(static_cast<size_t>(g) * cpg + c) * 32 + idx];
            }
            a += ap * (1 << p);
          }
          acc[pos] += half_to_float(sc[pos]) * (ls * static_cast<float>(a)) + half_to_float(mn[pos]) * sx;
        }
      }
      for (int pos = 0; pos < kTile; ++pos) {
        const int n = t * kTile + row_of(pos);
        if (n < P.N) P.y[static_cast<size_t>(b) * P.N + n] = acc[pos];
      }
    }
  }
}

// ---- AVX2: one chunk (32 bytes = 64 rows) per step -------------------------------------------
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) void tiles_avx2(const Problem& P, int t0, int t1) {
  const int groups = P.K / P.group, cpg = P.group / 4, KC = P.K / 4;
  const int F = flush_chunks(BITS, cpg);
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  const __m256i himask = _mm256_set1_epi16(static_cast<short>(0xff00));
  for (int t = t0; t < t1; ++t) {
    const uint8_t* wt = P.w + static_cast<size_t>(t) * groups * BITS * cpg * 32;
    for (int b = 0; b < P.B; ++b) {
      alignas(32) float acc[kTile] = {0};
      const int8_t* tb = P.tables + static_cast<size_t>(b) * KC * 32;
      for (int g = 0; g < groups; ++g) {
        const uint16_t* sc = P.scales + (static_cast<size_t>(t) * groups + g) * kTile;
        const uint16_t* mn = P.mins + (static_cast<size_t>(t) * groups + g) * kTile;
        const __m256 ls = _mm256_set1_ps(P.lscale[static_cast<size_t>(b) * groups + g]);
        const __m256 sx = _mm256_set1_ps(P.sumx[static_cast<size_t>(b) * groups + g]);
        for (int c0 = 0; c0 < cpg; c0 += F) {
          __m256i el = _mm256_setzero_si256(), ol = el, eh = el, oh = el;
          for (int c = c0; c < c0 + F; ++c) {
            const __m256i tab = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + (static_cast<size_t>(g) * cpg + c) * 32));
#pragma GCC unroll 4
            for (int p = 0; p < BITS; ++p) {
              const __m256i raw = _mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(wt + ((static_cast<size_t>(g) * BITS + p) * cpg + c) * 32));
              const __m256i rl = _mm256_shuffle_epi8(tab, _mm256_and_si256(raw, lo4));
              const __m256i rh = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4));
              // int8 -> int16 times 2^p without a shuffle: even bytes via (r << 8) >> (8 - p),
              // odd bytes via (r & 0xff00) >> (8 - p), both arithmetic.
              el = _mm256_add_epi16(el, _mm256_srai_epi16(_mm256_slli_epi16(rl, 8), 8 - p));
              ol = _mm256_add_epi16(ol, _mm256_srai_epi16(_mm256_and_si256(rl, himask), 8 - p));
              eh = _mm256_add_epi16(eh, _mm256_srai_epi16(_mm256_slli_epi16(rh, 8), 8 - p));
              oh = _mm256_add_epi16(oh, _mm256_srai_epi16(_mm256_and_si256(rh, himask), 8 - p));
            }
          }
          const __m256i parts[4] = {el, ol, eh, oh};
          for (int q = 0; q < 4; ++q) {
            for (int h = 0; h < 2; ++h) {
              const __m128i v16 = h ? _mm256_extracti128_si256(parts[q], 1) : _mm256_castsi256_si128(parts[q]);
              const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v16)), ls);
              const int pos = q * 16 + h * 8;
              const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + pos)));
              _mm256_store_ps(acc + pos, _mm256_fmadd_ps(s, v, _mm256_load_ps(acc + pos)));
            }
          }
        }
        for (int pos = 0; pos < kTile; pos += 8) {
          const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + pos)));
          _mm256_store_ps(acc + pos, _mm256_fmadd_ps(m, sx, _mm256_load_ps(acc + pos)));
        }
      }
      for (int pos = 0; pos < kTile; ++pos) {
        const int n = t * kTile + row_of(pos);
        if (n < P.N) P.y[static_cast<size_t>(b) * P.N + n] = acc[pos];
      }
    }
  }
}

// ---- AVX-512: two chunks (64 bytes) per step, NB activation vectors share each index load ----
template <int BITS, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void tile_avx512(const Problem& P, int t, int b0) {
  const int groups = P.K / P.group, cpg = P.group / 4, KC = P.K / 4;
  const int F = flush_chunks(BITS, cpg);
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  const __m512i himask = _mm512_set1_epi16(static_cast<short>(0xff00));
  const uint8_t* wt = P.w + static_cast<size_t>(t) * groups * BITS * cpg * 32;
  alignas(64) float acc[NB][kTile];
  std::memset(acc, 0, sizeof(acc));
  for (int g = 0; g < groups; ++g) {
    const uint16_t* sc = P.scales + (static_cast<size_t>(t) * groups + g) * kTile;
    const uint16_t* mn = P.mins + (static_cast<size_t>(t) * groups + g) * kTile;
    for (int c0 = 0; c0 < cpg; c0 += F) {
      __m512i el[NB], ol[NB], eh[NB], oh[NB];
      for (int b = 0; b < NB; ++b) el[b] = ol[b] = eh[b] = oh[b] = _mm512_setzero_si512();
      for (int c = c0; c < c0 + F; c += 2) {
#pragma GCC unroll 4
        for (int p = 0; p < BITS; ++p) {
          const __m512i raw = _mm512_loadu_si512(wt + ((static_cast<size_t>(g) * BITS + p) * cpg + c) * 32);
          const __m512i il = _mm512_and_si512(raw, lo4);
          const __m512i ih = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            const __m512i tab = _mm512_loadu_si512(P.tables + (static_cast<size_t>(b0 + b) * KC + static_cast<size_t>(g) * cpg + c) * 32);
            const __m512i rl = _mm512_shuffle_epi8(tab, il);
            const __m512i rh = _mm512_shuffle_epi8(tab, ih);
            el[b] = _mm512_add_epi16(el[b], _mm512_srai_epi16(_mm512_slli_epi16(rl, 8), 8 - p));
            ol[b] = _mm512_add_epi16(ol[b], _mm512_srai_epi16(_mm512_and_si512(rl, himask), 8 - p));
            eh[b] = _mm512_add_epi16(eh[b], _mm512_srai_epi16(_mm512_slli_epi16(rh, 8), 8 - p));
            oh[b] = _mm512_add_epi16(oh[b], _mm512_srai_epi16(_mm512_and_si512(rh, himask), 8 - p));
          }
        }
      }
      for (int b = 0; b < NB; ++b) {
        const __m512 ls = _mm512_set1_ps(P.lscale[static_cast<size_t>(b0 + b) * groups + g]);
        const __m512i parts[4] = {el[b], ol[b], eh[b], oh[b]};
        for (int q = 0; q < 4; ++q) {
          // chunks c and c+1 sit in the two 256-bit halves: fold them, then widen 16 lanes.
          const __m256i f = _mm256_add_epi16(_mm512_castsi512_si256(parts[q]), _mm512_extracti64x4_epi64(parts[q], 1));
          const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(f)), ls);
          const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + q * 16)));
          _mm512_store_ps(acc[b] + q * 16, _mm512_fmadd_ps(s, v, _mm512_load_ps(acc[b] + q * 16)));
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
  for (int b = 0; b < NB; ++b)
    for (int pos = 0; pos < kTile; ++pos) {
      const int n = t * kTile + row_of(pos);
      if (n < P.N) P.y[static_cast<size_t>(b0 + b) * P.N + n] = acc[b][pos];
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
// Tiles are claimed one at a time from a counter tagged with the job's generation, and the caller
// works too: a worker that is not on a core (2 cores shared with PyTorch's own threads, or a busy
// machine) never holds a step up, it simply claims nothing. The caller only waits for workers
// that are inside a tile. Idle workers spin ~50 us (decode calls come back to back), then sleep.
class Pool {
 public:
  void run(int nthreads, int tiles, const std::function<void(int)>& fn) {
    if (nthreads <= 1 || tiles <= 1) {
      for (int t = 0; t < tiles; ++t) fn(t);
      return;
    }
    ensure(nthreads - 1);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      tiles_ = tiles;
      gen = ++gen_counter_;
      next_.store(gen << 32, std::memory_order_release);  // [generation | next tile]
      wake_gen_.store(gen, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    drain(gen, fn, tiles);
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
  // Claim and run tiles of job `gen` until none is left (or a newer job replaced it).
  void drain(uint64_t gen, const std::function<void(int)>& fn, int tiles) {
    uint64_t cur = next_.load(std::memory_order_acquire);
    for (;;) {
      if ((cur >> 32) != gen || static_cast<int>(cur & 0xffffffffu) >= tiles) return;
      if (next_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) {
        fn(static_cast<int>(cur & 0xffffffffu));
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
        if ((spin & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50)) break;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lk, [&] { return wake_gen_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1);
        g = wake_gen_.load(std::memory_order_acquire);
      }
      seen = g;
      const std::function<void(int)>* fn;
      int tiles;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) return;
        if (gen_counter_ != g) continue;  // already replaced by a newer job
        fn = fn_;
        tiles = tiles_;
        busy_.fetch_add(1, std::memory_order_acq_rel);  // under the lock: the job is still current
      }
      drain(g, *fn, tiles);
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> next_{0}, wake_gen_{0};
  std::atomic<int> busy_{0}, sleepers_{0};
  uint64_t gen_counter_ = 0;
  const std::function<void(int)>* fn_ = nullptr;
  int tiles_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

extern "C" {

// 2 = AVX-512BW, 1 = AVX2, 0 = scalar.
int bitfold_lut_isa() { return detect_isa(); }

// y[B, N] = x[B, K] @ W^T for W packed as described above. K must be a multiple of `group`
// (the Python wrapper pads), group a multiple of 8, bits in 1..4. isa < 0 picks the best.
// Returns 0, or -1 for bad arguments.
int bitfold_lut_gemm(const float* x, int B, int K, const uint8_t* packed, const uint16_t* scales,
                     const uint16_t* mins, int N, int bits, int group, float* y, int nthreads, int isa) {
  if (B <= 0 || N <= 0 || K <= 0 || bits < 1 || bits > 4 || group < 8 || group % 8 || K % group) return -1;
  const int best = detect_isa();
  if (isa < 0 || isa > best) isa = best;
  const int groups = K / group, tiles = (N + kTile - 1) / kTile;
  std::vector<int8_t> tables(static_cast<size_t>(B) * (K / 4) * 32);
  std::vector<float> lscale(static_cast<size_t>(B) * groups), sumx(static_cast<size_t>(B) * groups);
  for (int b = 0; b < B; ++b)
    build_tables(x + static_cast<size_t>(b) * K, K, group, tables.data() + static_cast<size_t>(b) * (K / 4) * 32,
                 lscale.data() + static_cast<size_t>(b) * groups, sumx.data() + static_cast<size_t>(b) * groups);
  Problem P{x, B, K, N, bits, group, packed, scales, mins, y, tables.data(), lscale.data(), sumx.data()};
  const TileFn fn = pick(isa, bits);
  nthreads = std::max(1, std::min(nthreads, tiles));
  pool().run(nthreads, tiles, [&](int t) { fn(P, t, t + 1); });
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
