// Decode attention over compressed KV pages on the CPU (issue #11 part 2): the C++ counterpart of
// kernels/quant_kv_attention.py's `quant_paged_decode_ref`, same inputs, same meaning, float32.
//
// Why: the reference dequantizes every page of every sequence into float tensors at every step and
// runs einsum attention over them, so a compressed cache read ~8 bytes of float per element where
// it stores 0.25-1 (Qwen2.5-1.5B's CPU eval spent ~80% of its time there). Here each (sequence,
// KV head, split) task walks the sequence's sealed pages one at a time: it unpacks one page of one
// head into a small float tile that stays in L1, scores it for the G query heads of the GQA group,
// updates an online softmax (float32), unpacks the page's V and accumulates; then the newest tokens
// from the sequence's 16-bit residual ring (compute dtype, float32 here) the same way.
// Page layout (kernels/quant_kv_write.py):
// - dense side: float32 [N, KVH, BS, D];
// - int8 / fp8 (e4m3): codes [N, KVH, BS, D], one fp16 scale per token [N, KVH, BS];
// - KIVI groups: codes [N, KVH, BS / P, D], P = 8 / bits tokens per byte (token r * P + i at bits
//   i * bits of byte row r); K: fp16 [N, KVH, 2, D] (scale row, zero row: per channel over the
//   page), V: fp16 [N, KVH, BS, 2, D / VG] (per token: NG scales, then NG zeros).
// Folds (as the GPU kernel does): the softmax scale into q once per task; a KIVI page's K scale
// into q (q' = q * s) and its zero point into one bias per query row (q . z), so K codes are only
// converted, never dequantized; an int8 / fp8 token's K scale into its score and its V scale into
// its probability. KIVI values are dequantized (code * s + z) into the tile.
//
// Long sequences are split into `num_splits` runs of pages (flash-decoding) when B x KVH tasks are
// too few for the threads; the partial (max, sum, accumulator) triples are merged at the end.
// Tasks run on lut_gemm.cpp's thread pool (bitfold_parallel_for).
//
// ISAs: the kernels below are written once against a small set of vector operations (struct S) and
// compiled three times by including this file into itself under `#pragma GCC target`: AVX-512
// (16 lanes), AVX2 + FMA + F16C (8 lanes) and plain scalar C++ (1 lane, the portable fallback the
// tests compare too). `isa` picks one (< 0: the best this CPU has).
#ifndef BITFOLD_QKV_ISA

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
int bitfold_lut_isa();  // lut_gemm.cpp: 2 = AVX-512BW, 1 = AVX2 + FMA + F16C, 0 = neither
void bitfold_parallel_for(int nthreads, int tasks, void (*fn)(void*, int, int), void* ctx);

// Mirrored by kernels/quant_kv_cpu.py `_Args`: keep the two in step.
struct BitfoldQuantDecodeArgs {
  const float* q;               // [B, H, D]
  const void* k;                // K codes (or float32 rows for a dense side)
  const uint16_t* k_meta;       // fp16 scales / zeros (unused for a dense side)
  const void* v;
  const uint16_t* v_meta;
  const float* ring_k;          // [num_slots, ring_cap, KVH, D], or null without a ring
  const float* ring_v;
  const int32_t* block_tables;  // [B, max_blocks]
  const int32_t* context_lens;  // [B], the new token included
  const int32_t* seq_slots;     // [B] ring slot per sequence (< 0: a padding row, no ring), or null
  float* out;                   // [B, H, D]
  float* part_m;                // [B, H, S] running max per split (S > 1 only)
  float* part_l;                // [B, H, S] softmax denominators
  float* part_acc;              // [B, H, S, D] unnormalized outputs
  int32_t batch, heads, kv_heads, head_dim, block_size, max_blocks, num_blocks, num_slots;
  int32_t k_kind, k_bits, v_kind, v_bits, v_group, residual, ring_cap, sliding_window;
  int32_t num_splits, num_threads, isa, reserved;
  float scale;
};
}

namespace bitfold_qkv {

enum Kind { kDense = 0, kInt8 = 1, kFp8 = 2, kGroup = 3 };
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Exact fp16 -> fp32 (subnormals, inf, NaN), for the scalar path.
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while (!(man & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// e4m3 bits as fp16 bits of the value / 256: the 4 exponent and 3 mantissa bits slide into
// fp16's low exponent and top mantissa bits (bias 7 vs 15: a factor 2^-8, subnormals included).
inline uint16_t fp8_as_half(uint8_t b) {
  return static_cast<uint16_t>((b & 0x80) << 8 | (b & 0x7f) << 7);
}

// exp(x) as 2^n * p(r), r = x - n ln2, Cephes expf's degree-6 polynomial (~1 ulp); decode_ops.cpp's
// exp_approx, written here once per vector type (see vexp below). Clamps x to [-87.3, 88].
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_scalar(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.f);
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  p = p * r * r + r + 1.f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return p * s;
}

// What every task of one call shares: the arguments and the first error any of them met.
struct Shared {
  const BitfoldQuantDecodeArgs* a;
  std::atomic<int> error{0};
};

}  // namespace bitfold_qkv

#define BITFOLD_QKV_NS_(n) isa##n
#define BITFOLD_QKV_NS(n) BITFOLD_QKV_NS_(n)

#define BITFOLD_QKV_ISA 0
#include "quant_kv.cpp"
#undef BITFOLD_QKV_ISA

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define BITFOLD_QKV_ISA 1
#include "quant_kv.cpp"
#undef BITFOLD_QKV_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define BITFOLD_QKV_ISA 2
#include "quant_kv.cpp"
#undef BITFOLD_QKV_ISA
#pragma GCC pop_options

namespace bitfold_qkv {
namespace {

using TaskFn = void (*)(Shared&, int, int);
constexpr TaskFn kTasks[3] = {isa0::run_tasks, isa1::run_tasks, isa2::run_tasks};

struct Job {
  Shared* shared;
  TaskFn fn;
};

void trampoline(void* ctx, int t0, int t1) {
  Job* job = static_cast<Job*>(ctx);
  job->fn(*job->shared, t0, t1);
}

// Why the arguments cannot be run (null: they can).
const char* check(const BitfoldQuantDecodeArgs& a) {
  const int D = a.head_dim;
  if (a.batch < 0 || a.kv_heads <= 0 || a.heads <= 0 || a.heads % a.kv_heads) return "heads";
  if (D <= 0 || D % 32) return "head_dim must be a positive multiple of 32";
  if (a.block_size <= 0 || a.max_blocks < 0 || a.num_blocks < 0) return "block sizes";
  for (int side = 0; side < 2; ++side) {
    const int kind = side ? a.v_kind : a.k_kind, bits = side ? a.v_bits : a.k_bits;
    if (kind < kDense || kind > kGroup) return "kind";
    if (kind == kGroup && (bits < 1 || 8 % bits || a.block_size % (8 / bits))) return "group bits";
    if (kind != kDense && !(side ? a.v_meta : a.k_meta)) return "meta";
  }
  if (a.v_kind == kGroup && (a.v_group <= 0 || a.v_group % 16 || D % a.v_group)) return "v_group";
  if (a.ring_cap > 0 && (!a.ring_k || !a.ring_v || a.residual < 0 || a.ring_cap < a.residual + a.block_size))
    return "ring";
  if (a.num_splits < 1 || (a.num_splits > 1 && (!a.part_m || !a.part_l || !a.part_acc))) return "splits";
  return nullptr;
}

// Partial results of the splits of each (sequence, head) -> out.
void merge(const BitfoldQuantDecodeArgs& a) {
  const int S = a.num_splits, D = a.head_dim;
  for (int64_t row = 0; row < static_cast<int64_t>(a.batch) * a.heads; ++row) {
    const float* pm = a.part_m + row * S;
    const float* pl = a.part_l + row * S;
    float* o = a.out + row * D;
    float mx = kNegInf;
    for (int s = 0; s < S; ++s) mx = std::max(mx, pm[s]);
    std::fill(o, o + D, 0.f);
    if (mx == kNegInf) continue;  // nothing to attend to: zeros
    float l = 0.f;
    for (int s = 0; s < S; ++s) {
      if (pm[s] == kNegInf) continue;
      const float w = std::exp(pm[s] - mx);
      l += pl[s] * w;
      const float* acc = a.part_acc + (row * S + s) * D;
      for (int d = 0; d < D; ++d) o[d] += w * acc[d];
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = 0; d < D; ++d) o[d] *= inv;
  }
}

// ---- quantize-on-write for decode steps ------------------------------------------------------
// write_quant_kv_ref (kernels/quant_kv_write.py) for one new token per sequence, in C++: the same
// float32 operations in the same order (IEEE division, round-half-up of (x - zero) / scale with the
// stored fp16 scale and zero, fp8 rounded by hand onto e4m3's grid), so the codes are the
// reference's bit for bit (tests/kernels/test_quant_kv_cpu.py compares them). Scalar: a step writes
// B x KVH rows and seals at most one page per sequence.

// float -> fp16 bits, round to nearest even (torch's .half()), overflow to inf, subnormals kept.
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00);  // NaN, inf
  if (x >= 0x477ff000u) return sign | 0x7c00;                              // >= 65520 rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, m x 2^-24 (m = 1024 is the smallest normal)
    float a;
    std::memcpy(&a, &x, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.f));  // exact scaling, then RNE
  }
  uint32_t h = ((x >> 23) - 112) << 10 | (x & 0x7fffffu) >> 13;  // rebias 127 -> 15
  const uint32_t rest = x & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // a carry into the exponent is right
  return sign | static_cast<uint16_t>(h);
}

// e4m3 bits of y (already scaled, |y| <= 448 after the clamp): fp8_round_ref, then the exact
// conversion of an on-grid value (sign kept, so -0.0 is 0x80 as torch writes it).
uint8_t fp8_encode(float y) {
  y = std::min(std::max(y, -448.f), 448.f);
  const float a = std::fabs(y);
  uint32_t ab;
  std::memcpy(&ab, &a, 4);
  const int e = std::max(static_cast<int>((ab >> 23) & 0xff) - 127, -6);
  const float step = std::ldexp(1.f, e - 3);
  const float r = std::floor(a / step + 0.5f) * step;
  const uint8_t sign = y < 0 ? 0x80 : 0;
  if (r == 0.f) return sign;
  uint32_t rb;
  std::memcpy(&rb, &r, 4);
  const int re = static_cast<int>(rb >> 23) - 127;
  if (re < -6) return sign | static_cast<uint8_t>(r * 512.f);  // subnormal: m x 2^-9
  return sign | static_cast<uint8_t>((re + 7) << 3 | ((rb >> 20) & 7));
}

// One token of one head, x [D], into an int8 / fp8 page row (codes [D], one fp16 scale).
void store_token(int kind, const float* x, int D, uint8_t* codes, uint16_t* scale) {
  float amax = 0.f;
  for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const uint16_t h = float_to_half(amax / (kind == kInt8 ? 127.f : 448.f));
  *scale = h;
  const float sc = half_to_float(h), div = sc > 0.f ? sc : 1.f;
  for (int d = 0; d < D; ++d) {
    const float y = x[d] / div;
    if (kind == kInt8) {
      const float q = std::min(std::max(std::floor(y + 0.5f), -127.f), 127.f);
      codes[d] = static_cast<uint8_t>(static_cast<int8_t>(q));
    } else {
      codes[d] = fp8_encode(y);
    }
  }
}

// (x - zero) / scale rounded half up and clamped, with the scale and zero as stored.
inline int group_code(float x, float sc, float zp, int qmax) {
  const float q = std::floor((x - zp) / (sc > 0.f ? sc : 1.f) + 0.5f);
  return static_cast<int>(std::min(std::max(q, 0.f), static_cast<float>(qmax)));
}

// One whole page of one head, rows[t] = token t's [D] floats, into its codes and meta.
void store_page(const BitfoldQuantDecodeArgs& a, bool is_k, const float* const* rows, int64_t ph) {
  const int kind = is_k ? a.k_kind : a.v_kind, bits = is_k ? a.k_bits : a.v_bits;
  const int BS = a.block_size, D = a.head_dim;
  char* base = static_cast<char*>(const_cast<void*>(is_k ? a.k : a.v));
  uint16_t* meta = const_cast<uint16_t*>(is_k ? a.k_meta : a.v_meta);
  if (kind == kDense) {
    float* out = reinterpret_cast<float*>(base) + ph * BS * D;
    for (int t = 0; t < BS; ++t) std::copy(rows[t], rows[t] + D, out + static_cast<int64_t>(t) * D);
    return;
  }
  if (kind != kGroup) {
    for (int t = 0; t < BS; ++t)
      store_token(kind, rows[t], D, reinterpret_cast<uint8_t*>(base) + (ph * BS + t) * D, meta + ph * BS + t);
    return;
  }
  const int P = 8 / bits, qmax = (1 << bits) - 1;
  uint8_t* codes = reinterpret_cast<uint8_t*>(base) + ph * (BS / P) * D;
  std::fill(codes, codes + static_cast<int64_t>(BS / P) * D, 0);
  if (is_k) {  // per channel over the page: meta [2][D] = scale row, zero row
    uint16_t* m = meta + ph * 2 * D;
    for (int d = 0; d < D; ++d) {
      float mn = rows[0][d], mx = rows[0][d];
      for (int t = 1; t < BS; ++t) mn = std::min(mn, rows[t][d]), mx = std::max(mx, rows[t][d]);
      m[d] = float_to_half((mx - mn) / static_cast<float>(qmax));
      m[D + d] = float_to_half(mn);
      const float sc = half_to_float(m[d]), zp = half_to_float(m[D + d]);
      for (int t = 0; t < BS; ++t)
        codes[static_cast<int64_t>(t / P) * D + d] |= static_cast<uint8_t>(group_code(rows[t][d], sc, zp, qmax) << (t % P) * bits);
    }
    return;
  }
  const int VG = a.v_group, NG = D / VG;  // per token, groups of VG channels: meta [BS][2][NG]
  for (int t = 0; t < BS; ++t) {
    uint16_t* m = meta + (ph * BS + t) * 2 * NG;
    for (int j = 0; j < NG; ++j) {
      const float* x = rows[t] + j * VG;
      float mn = x[0], mx = x[0];
      for (int c = 1; c < VG; ++c) mn = std::min(mn, x[c]), mx = std::max(mx, x[c]);
      m[j] = float_to_half((mx - mn) / static_cast<float>(qmax));
      m[NG + j] = float_to_half(mn);
      const float sc = half_to_float(m[j]), zp = half_to_float(m[NG + j]);
      for (int c = 0; c < VG; ++c)
        codes[static_cast<int64_t>(t / P) * D + j * VG + c] |=
            static_cast<uint8_t>(group_code(x[c], sc, zp, qmax) << (t % P) * bits);
    }
  }
}

// The decode step's write (see bitfold_quant_write_decode). Returns 0 or -2 (an index out of range).
int write_decode(const BitfoldQuantDecodeArgs& a, const float* k_new, const float* v_new, const int64_t* slot_mapping) {
  const int KVH = a.kv_heads, D = a.head_dim, BS = a.block_size;
  const int64_t row = static_cast<int64_t>(KVH) * D;
  if (a.ring_cap == 0) {  // every token straight into its page slot
    for (int b = 0; b < a.batch; ++b) {
      const int64_t slot = slot_mapping[b];
      if (slot < 0) continue;
      const int64_t page = slot / BS, off = slot % BS;
      if (page >= a.num_blocks) return -2;
      for (int kh = 0; kh < KVH; ++kh) {
        const int64_t ph = page * KVH + kh;
        for (int side = 0; side < 2; ++side) {
          const float* x = (side ? v_new : k_new) + b * row + static_cast<int64_t>(kh) * D;
          const int kind = side ? a.v_kind : a.k_kind;
          char* base = static_cast<char*>(const_cast<void*>(side ? a.v : a.k));
          if (kind == kDense) {
            std::copy(x, x + D, reinterpret_cast<float*>(base) + (ph * BS + off) * D);
          } else {
            uint16_t* meta = const_cast<uint16_t*>(side ? a.v_meta : a.k_meta);
            store_token(kind, x, D, reinterpret_cast<uint8_t*>(base) + (ph * BS + off) * D, meta + ph * BS + off);
          }
        }
      }
    }
    return 0;
  }
  const int cap = a.ring_cap;
  float* ring_k = const_cast<float*>(a.ring_k);
  float* ring_v = const_cast<float*>(a.ring_v);
  std::vector<const float*> krows(BS), vrows(BS);
  for (int b = 0; b < a.batch; ++b) {
    const int slot = a.seq_slots[b];
    if (slot < 0) continue;  // a padding row
    if (slot >= a.num_slots) return -2;
    const int L = a.context_lens[b], len_old = L - 1;
    const int n_old = std::max(len_old - a.residual, 0) / BS * BS, n_new = std::max(L - a.residual, 0) / BS * BS;
    const float* kb = k_new + b * row;
    const float* vb = v_new + b * row;
    if (n_new > n_old) {  // this token completes the page [n_old, n_old + BS): seal it from the ring (+ this token)
      const int64_t page = a.block_tables[static_cast<int64_t>(b) * a.max_blocks + n_old / BS];
      if (page < 0 || page >= a.num_blocks) return -2;
      for (int kh = 0; kh < KVH; ++kh) {
        for (int t = 0; t < BS; ++t) {
          const int pos = n_old + t;
          const int64_t r = ((static_cast<int64_t>(slot) * cap + pos % cap) * KVH + kh) * D;
          const int64_t nr = static_cast<int64_t>(kh) * D;
          krows[t] = pos < len_old ? ring_k + r : kb + nr;
          vrows[t] = pos < len_old ? ring_v + r : vb + nr;
        }
        store_page(a, true, krows.data(), page * KVH + kh);
        store_page(a, false, vrows.data(), page * KVH + kh);
      }
    }
    if (len_old >= n_new) {  // the new token stays 16-bit for now
      const int64_t r = (static_cast<int64_t>(slot) * cap + len_old % cap) * row;
      std::copy(kb, kb + row, ring_k + r);
      std::copy(vb, vb + row, ring_v + r);
    }
  }
  return 0;
}

}  // namespace
}  // namespace bitfold_qkv

extern "C" {

// Decode attention over compressed pages + rings (see the top of this file and
// kernels/quant_kv_cpu.py). Returns 0; -1 for arguments it cannot run (the wrapper checks them
// first); -2 when a block table entry or a sequence slot it needed was out of range.
int bitfold_quant_decode(const BitfoldQuantDecodeArgs* args) {
  using namespace bitfold_qkv;
  const BitfoldQuantDecodeArgs& a = *args;
  if (check(a)) return -1;
  if (a.batch == 0) return 0;
  const int best = bitfold_lut_isa();
  const int isa = a.isa < 0 || a.isa > best ? best : a.isa;
  Shared shared;
  shared.a = &a;
  Job job{&shared, kTasks[isa]};
  const int tasks = a.batch * a.kv_heads * a.num_splits;
  bitfold_parallel_for(std::max(1, a.num_threads), tasks, trampoline, &job);
  if (shared.error.load()) return -2;
  if (a.num_splits > 1) merge(a);
  return 0;
}

// Why bitfold_quant_decode would refuse these arguments (null: it would not).
const char* bitfold_quant_decode_check(const BitfoldQuantDecodeArgs* args) { return bitfold_qkv::check(*args); }

// A decode step's quantize-on-write into the storage `args` describes (its code, meta and ring
// pointers are written through): k_new, v_new [B, KVH, D] float32, one new token per sequence;
// slot_mapping int64 [B] (codecs without a ring: the token's cache slot, < 0 = not written). With a
// ring (seq_slots, context_lens including the new token): the page this token completes is sealed,
// then the token goes into the ring if it stays 16-bit. Returns 0, -1 for arguments it cannot run,
// -2 for an index out of range (nothing after it written).
int bitfold_quant_write_decode(const BitfoldQuantDecodeArgs* args, const float* k_new, const float* v_new,
                               const int64_t* slot_mapping) {
  const BitfoldQuantDecodeArgs& a = *args;
  if (bitfold_qkv::check(a) || (a.ring_cap > 0 ? !a.seq_slots : !slot_mapping)) return -1;
  return bitfold_qkv::write_decode(a, k_new, v_new, slot_mapping);
}

}  // extern "C"

#else  // ------------------------------------------------------------ one ISA's kernels

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

#endif
