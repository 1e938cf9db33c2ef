// What the compressed-KV CPU kernels share (quant_kv.cpp: decode attention, quant_kv_write.cpp:
// a decode step's quantize-on-write): the argument struct, the page kinds, fp16 decoding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

// Why the kernels cannot run these arguments (null: they can). quant_kv.cpp.
const char* check(const BitfoldQuantDecodeArgs& a);

}  // namespace bitfold_qkv
