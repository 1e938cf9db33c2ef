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
// ISAs: the kernels (quant_kv_isa.h) are written once against a small set of vector operations
// (struct S) and compiled three times, included under `#pragma GCC target`: AVX-512 (16 lanes),
// AVX2 + FMA + F16C (8 lanes) and plain scalar C++ (1 lane, the portable fallback the tests
// compare too). `isa` picks one (< 0: the best this CPU has). A decode step's write is
// quant_kv_write.cpp.

#include <immintrin.h>

#include <atomic>
#include <vector>

#include "quant_kv.h"

namespace bitfold_qkv {

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
#include "quant_kv_isa.h"
#undef BITFOLD_QKV_ISA

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define BITFOLD_QKV_ISA 1
#include "quant_kv_isa.h"
#undef BITFOLD_QKV_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define BITFOLD_QKV_ISA 2
#include "quant_kv_isa.h"
#undef BITFOLD_QKV_ISA
#pragma GCC pop_options

namespace bitfold_qkv {

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

}  // extern "C"
