// A whole CPU decode step's decoder stack in one call (issue #6): embedding, every layer and the
// final norm for B sequences of one new token each, so no Python runs between layers.
//
// Why: on a 2-core CPU the per-op path (kernels/cpu_ops.py + the LUT GEMV per Linear) costs ~7
// ctypes calls and ~20 PyTorch ops per layer, 0.1-0.2 ms of interpreter and allocator time per
// layer that llama.cpp does not pay (measured: Qwen2.5-1.5B int4 20.3 -> 16.3 ms per step, SmolLM2
// 7.4 -> 3.5 ms; benchmarks/profile_cpu_step.py). Here a layer is
//   [residual add +] RMSNorm -> qkv GEMV (+bias) -> [per-head q/k RMSNorm] -> rotary
//   -> paged attention with the new K/V written to its slot -> o GEMV (+bias)
//   -> residual add + RMSNorm -> gate|up GEMV (+bias) -> silu(gate) * up -> down GEMV (+bias)
// exactly the order and the kernels of models/llama.py's per-op path (bitfold_add_rms_norm,
// bitfold_rotary, bitfold_paged_decode, bitfold_silu_mul from decode_ops.cpp, bitfold_lut_gemm
// from lut_gemm.cpp), which stays the reference: tests/kernels/test_cpu_step.py compares the two
// end to end. This file only orchestrates (and adds biases).
//
// Linear layers take their input zero-padded to whole quantization groups (`in_padded`, see
// weights/lowbit.py), so activations feeding a GEMV live in buffers with that row stride.
// Scratch buffers are thread_local and grow to the largest step seen. The plan (pointers to every
// packed weight, norm weight, bias and KV page) is built once by kernels/cpu_step.py; the struct
// layouts below are mirrored there as ctypes Structures and must stay in step with them.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" {
// lut_gemm.cpp and decode_ops.cpp (same library).
int bitfold_lut_gemm(const float* x, int B, int K, const uint8_t* packed, const uint16_t* scales,
                     const uint16_t* mins, int N, int bits, int group, float* y, int nthreads, int isa);
void bitfold_add_rms_norm(const float* x, const float* residual, const float* w, float* out, float* res_out, int T,
                          int D, float eps);
void bitfold_rotary(const float* q, const float* k, const int64_t* pos, const float* cache, float* qo, float* ko,
                    int T, int H, int KVH, int D);
void bitfold_paged_decode(const float* q, float* kc, float* vc, const int32_t* block_tables,
                          const int32_t* context_lens, float* out, int B, int H, int KVH, int D, int block_size,
                          int max_blocks, float scale, int sliding_window, const float* new_k, const float* new_v,
                          const int64_t* slots);
void bitfold_silu_mul(const float* gu, float* out, int B, int I, int ld);

// One low-bit Linear (packed by lut_gemm.py pack_lut): y[B, out] = x[B, in_padded] @ W^T + bias.
struct BitfoldLinearPlan {
  const uint8_t* packed;
  const uint16_t* scales;  // fp16
  const uint16_t* mins;    // fp16
  const float* bias;       // [out_features] or null
  int32_t in_features;     // columns the layer sees
  int32_t in_padded;       // columns of the packed weight (a multiple of group), zeros past in_features
  int32_t out_features;
  int32_t bits;
  int32_t group;
  int32_t reserved;
};

struct BitfoldLayerPlan {
  BitfoldLinearPlan qkv, o, gate_up, down;
  const float* attn_norm;  // [hidden]
  const float* mlp_norm;   // [hidden]
  const float* q_norm;     // [head_dim] or null (Qwen3)
  const float* k_norm;     // [head_dim] or null
  float* k_cache;          // [num_blocks, block_size, kv_heads, head_dim]
  float* v_cache;
};

struct BitfoldStepArgs {
  // the model (fixed once the plan is built)
  int32_t hidden, heads, kv_heads, head_dim, intermediate, vocab;
  int32_t sliding_window;  // 0 = full attention
  int32_t rope_positions;  // rows of the rotary cache
  int32_t num_blocks, block_size;
  float eps, scale;
  const float* embed;       // [vocab, hidden]
  const float* rope;        // [rope_positions, head_dim]: cos | sin
  const float* final_norm;  // [hidden]
  // this step
  int32_t batch, max_blocks, num_threads, reserved;
  const int64_t* input_ids;     // [B]
  const int64_t* positions;     // [B]
  const int64_t* slots;         // [B] cache slot of the new token (< 0: not written)
  const int32_t* block_tables;  // [B, max_blocks]
  const int32_t* context_lens;  // [B], the new token included
  float* out;                   // [B, hidden] final normed hidden states
};
}  // extern "C"

namespace {

#define BITFOLD_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))

thread_local char g_error[256];

// Wall time of each phase of the steps run on this thread, for profiling (a clock read costs
// ~20 ns; 12 per layer). Read and reset by bitfold_decode_profile; names in cpu_step.py PHASES.
enum Phase { kQkv, kO, kGateUp, kDown, kAttention, kOther, kPhases };
thread_local double g_seconds[kPhases];

struct Laps {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(Phase p) {
    const auto now = std::chrono::steady_clock::now();
    g_seconds[p] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};

int fail(const char* fmt, long long a, long long b = 0, long long c = 0) {
  std::snprintf(g_error, sizeof(g_error), fmt, a, b, c);
  return -1;
}

BITFOLD_SIMD void add_bias(float* y, const float* bias, int B, int N) {
  for (int b = 0; b < B; ++b) {
    float* r = y + static_cast<int64_t>(b) * N;
    for (int i = 0; i < N; ++i) r[i] += bias[i];
  }
}

// Rows of `ld` floats: zero columns from..ld-1 (a GEMV input's group padding).
void zero_pad(float* x, int B, int from, int ld) {
  if (from == ld) return;
  for (int b = 0; b < B; ++b) std::memset(x + static_cast<int64_t>(b) * ld + from, 0, sizeof(float) * (ld - from));
}

// out (row stride ld) = norm(x [+ residual]) * w; with a residual, res_out = x + residual.
void norm_rows(const float* x, const float* residual, const float* w, float* out, int ld, float* res_out, int B, int D,
               float eps) {
  if (ld == D) {
    bitfold_add_rms_norm(x, residual, w, out, res_out, B, D, eps);
    return;
  }
  for (int b = 0; b < B; ++b) {
    const int64_t r = static_cast<int64_t>(b) * D;
    bitfold_add_rms_norm(x + r, residual ? residual + r : nullptr, w, out + static_cast<int64_t>(b) * ld,
                         res_out ? res_out + r : nullptr, 1, D, eps);
  }
  zero_pad(out, B, D, ld);
}

int gemv(const BitfoldLinearPlan& L, const float* x, int B, float* y, int nthreads) {
  if (bitfold_lut_gemm(x, B, L.in_padded, L.packed, L.scales, L.mins, L.out_features, L.bits, L.group, y, nthreads,
                       -1) != 0)
    return -1;
  if (L.bias) add_bias(y, L.bias, B, L.out_features);
  return 0;
}

struct Scratch {
  std::vector<float> h, resid, x_attn, qkv, qn, kn, q, k, v, attn_raw, attn, x_mlp, gu, act;
};

int check_linear(const BitfoldLinearPlan& L, int in, int out, int layer, const char* name) {
  if (!L.packed || !L.scales || !L.mins || L.in_features != in || L.out_features != out || L.group <= 0 ||
      L.in_padded < in || L.in_padded % L.group || L.bits < 1 || L.bits > 4) {
    std::snprintf(g_error, sizeof(g_error), "layer %d: %s plan does not fit in=%d out=%d (has in=%d/%d out=%d)",
                  layer, name, in, out, L.in_features, L.in_padded, L.out_features);
    return -1;
  }
  return 0;
}

}  // namespace

extern "C" {

// The last error of bitfold_decode_layers on this thread.
const char* bitfold_decode_error() { return g_error; }

// Runs embedding -> n_layers decoder layers -> final RMSNorm for a.batch decode tokens, writing
// a.out [B, hidden] and each layer's new K/V into its pages. Returns 0, or -1 with a message in
// bitfold_decode_error() (bad shapes, a token id, position, slot or context length out of range).
int bitfold_decode_layers(const BitfoldLayerPlan* layers, int n_layers, const BitfoldStepArgs* args) {
  const BitfoldStepArgs& a = *args;
  const int B = a.batch, hid = a.hidden, H = a.heads, KVH = a.kv_heads, D = a.head_dim, I = a.intermediate;
  g_error[0] = 0;
  if (B <= 0 || hid <= 0 || H <= 0 || KVH <= 0 || H % KVH || D <= 0 || D % 2 || I <= 0 || n_layers <= 0 ||
      a.block_size <= 0 || a.max_blocks <= 0)
    return fail("bad step shape: batch=%lld layers=%lld max_blocks=%lld", B, n_layers, a.max_blocks);
  const int qkv_n = (H + 2 * KVH) * D;
  for (int l = 0; l < n_layers; ++l) {
    const BitfoldLayerPlan& L = layers[l];
    if (check_linear(L.qkv, hid, qkv_n, l, "qkv") || check_linear(L.o, H * D, hid, l, "o") ||
        check_linear(L.gate_up, hid, 2 * I, l, "gate_up") || check_linear(L.down, I, hid, l, "down"))
      return -1;
    if (!L.attn_norm || !L.mlp_norm || !L.k_cache || !L.v_cache || !L.q_norm != !L.k_norm ||
        !L.q_norm != !layers[0].q_norm)
      return fail("layer %lld: missing norm weights or KV pages", l);
  }
  const int64_t capacity = static_cast<int64_t>(a.num_blocks) * a.block_size;
  for (int b = 0; b < B; ++b) {
    const int64_t id = a.input_ids[b], pos = a.positions[b], slot = a.slots[b];
    const int len = a.context_lens[b];
    if (id < 0 || id >= a.vocab) return fail("token id %lld out of range [0, %lld)", id, a.vocab);
    if (pos < 0 || pos >= a.rope_positions)
      return fail("position %lld beyond the rotary cache (%lld)", pos, a.rope_positions);
    if (slot >= capacity) return fail("slot %lld beyond the KV cache (%lld slots)", slot, capacity);
    if (len < 1 || static_cast<int64_t>(len) > static_cast<int64_t>(a.max_blocks) * a.block_size)
      return fail("context length %lld of sequence %lld does not fit its block table", len, b);
    for (int j = 0; j < (len + a.block_size - 1) / a.block_size; ++j) {
      const int32_t blk = a.block_tables[static_cast<int64_t>(b) * a.max_blocks + j];
      if (blk < 0 || blk >= a.num_blocks) return fail("block %lld of sequence %lld out of range (%lld blocks)", blk, b,
                                                      a.num_blocks);
    }
  }

  thread_local Scratch s;
  const BitfoldLayerPlan& L0 = layers[0];
  const int ld_attn = L0.qkv.in_padded, ld_o = L0.o.in_padded, ld_mlp = L0.gate_up.in_padded,
            ld_down = L0.down.in_padded;
  for (int l = 1; l < n_layers; ++l)  // every layer has the same shapes and format (checked by the plan)
    if (layers[l].qkv.in_padded != ld_attn || layers[l].o.in_padded != ld_o ||
        layers[l].gate_up.in_padded != ld_mlp || layers[l].down.in_padded != ld_down)
      return fail("layer %lld pads its inputs differently from layer 0", l);
  auto grow = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  };
  float* h = grow(s.h, static_cast<int64_t>(B) * hid);
  float* resid = grow(s.resid, static_cast<int64_t>(B) * hid);
  float* x_attn = grow(s.x_attn, static_cast<int64_t>(B) * ld_attn);
  float* qkv = grow(s.qkv, static_cast<int64_t>(B) * qkv_n);
  float* q = grow(s.q, static_cast<int64_t>(B) * H * D);
  float* k = grow(s.k, static_cast<int64_t>(B) * KVH * D);
  float* v = grow(s.v, static_cast<int64_t>(B) * KVH * D);
  float* attn = grow(s.attn, static_cast<int64_t>(B) * ld_o);
  // attention writes rows of H * D; when the o projection pads its input they go through here
  float* attn_raw = ld_o == H * D ? attn : grow(s.attn_raw, static_cast<int64_t>(B) * H * D);
  float* qn = layers[0].q_norm ? grow(s.qn, static_cast<int64_t>(B) * H * D) : nullptr;
  float* kn = layers[0].q_norm ? grow(s.kn, static_cast<int64_t>(B) * KVH * D) : nullptr;
  float* x_mlp = grow(s.x_mlp, static_cast<int64_t>(B) * ld_mlp);
  float* gu = grow(s.gu, static_cast<int64_t>(B) * 2 * I);
  float* act = grow(s.act, static_cast<int64_t>(B) * ld_down);
  const int nt = std::max(1, a.num_threads);

  Laps laps;
  for (int b = 0; b < B; ++b)
    std::memcpy(h + static_cast<int64_t>(b) * hid, a.embed + a.input_ids[b] * hid, sizeof(float) * hid);

  for (int l = 0; l < n_layers; ++l) {
    const BitfoldLayerPlan& L = layers[l];
    // attention block: x = norm(h + residual), residual = h + residual (layer 0: residual = h)
    if (l == 0) {
      std::memcpy(resid, h, sizeof(float) * B * hid);
      norm_rows(h, nullptr, L.attn_norm, x_attn, ld_attn, nullptr, B, hid, a.eps);
    } else {
      norm_rows(h, resid, L.attn_norm, x_attn, ld_attn, resid, B, hid, a.eps);
    }
    laps.lap(kOther);
    if (gemv(L.qkv, x_attn, B, qkv, nt)) return fail("layer %lld: qkv GEMV rejected its shape", l);
    laps.lap(kQkv);
    for (int b = 0; b < B; ++b) {
      const float* row = qkv + static_cast<int64_t>(b) * qkv_n;
      const float* qs = row;
      const float* ks = row + H * D;
      float* qb = q + static_cast<int64_t>(b) * H * D;
      float* kb = k + static_cast<int64_t>(b) * KVH * D;
      if (L.q_norm) {  // Qwen3: RMSNorm over each head before rotary (which cannot work in place)
        float* qnb = qn + static_cast<int64_t>(b) * H * D;
        float* knb = kn + static_cast<int64_t>(b) * KVH * D;
        bitfold_add_rms_norm(qs, nullptr, L.q_norm, qnb, nullptr, H, D, a.eps);
        bitfold_add_rms_norm(ks, nullptr, L.k_norm, knb, nullptr, KVH, D, a.eps);
        qs = qnb;
        ks = knb;
      }
      bitfold_rotary(qs, ks, a.positions + b, a.rope, qb, kb, 1, H, KVH, D);
      std::memcpy(v + static_cast<int64_t>(b) * KVH * D, row + (H + KVH) * D, sizeof(float) * KVH * D);
    }
    bitfold_paged_decode(q, L.k_cache, L.v_cache, a.block_tables, a.context_lens, attn_raw, B, H, KVH, D,
                         a.block_size, a.max_blocks, a.scale, a.sliding_window, k, v, a.slots);
    laps.lap(kAttention);
    if (attn_raw != attn) {
      for (int b = 0; b < B; ++b)
        std::memcpy(attn + static_cast<int64_t>(b) * ld_o, attn_raw + static_cast<int64_t>(b) * H * D,
                    sizeof(float) * H * D);
      zero_pad(attn, B, H * D, ld_o);
    }
    laps.lap(kOther);
    if (gemv(L.o, attn, B, h, nt)) return fail("layer %lld: o GEMV rejected its shape", l);
    laps.lap(kO);
    // MLP block
    norm_rows(h, resid, L.mlp_norm, x_mlp, ld_mlp, resid, B, hid, a.eps);
    laps.lap(kOther);
    if (gemv(L.gate_up, x_mlp, B, gu, nt)) return fail("layer %lld: gate_up GEMV rejected its shape", l);
    laps.lap(kGateUp);
    bitfold_silu_mul(gu, act, B, I, ld_down);
    laps.lap(kOther);
    if (gemv(L.down, act, B, h, nt)) return fail("layer %lld: down GEMV rejected its shape", l);
    laps.lap(kDown);
  }
  bitfold_add_rms_norm(h, resid, a.final_norm, a.out, resid, B, hid, a.eps);
  laps.lap(kOther);
  return 0;
}

// Seconds spent in each phase (qkv, o, gate_up, down GEMVs, attention, the rest) by the steps
// run on this thread since the last call; seconds[kPhases]. Resets the counters.
void bitfold_decode_profile(double* seconds) {
  for (int p = 0; p < kPhases; ++p) {
    seconds[p] = g_seconds[p];
    g_seconds[p] = 0.0;
  }
}

}  // extern "C"
