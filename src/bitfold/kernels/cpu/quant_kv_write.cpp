// A CPU decode step's quantize-on-write into compressed KV pages (issue #11 part 2), reached
// through kernels/quant_kv_cpu.py `write_quant_kv_decode_cpu`: write_quant_kv_ref
// (kernels/quant_kv_write.py) for one new token per sequence, in C++, because the reference's
// per-sequence Python loop cost 26-94 us per layer and step. The same float32 operations in the
// same order (IEEE division, round-half-up of (x - zero) / scale with the stored fp16 scale and
// zero, fp8 rounded by hand onto e4m3's grid), so the codes are the reference's bit for bit
// (tests/kernels/test_quant_kv_cpu.py compares them). Scalar: a step writes B x KVH rows and
// seals at most one page per sequence.
#include <vector>

#include "quant_kv.h"

namespace bitfold_qkv {
namespace {

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
      if (n_old / BS >= a.max_blocks) return -2;
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
