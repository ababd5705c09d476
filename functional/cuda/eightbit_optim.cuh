// The multi-tensor driver shared by the fused 8-bit optimizer kernels (adam.cu, rmsprop.cu,
// lion.cu). One launch updates a list of parameters: per element it loads the parameter, the
// gradient and up to three 8-bit states, dequantizes the states, applies the rule in fp32,
// stores the parameter, requantizes the states (block absmax reduction and codebook search of
// eightbit_quant.cuh) and stores codes and absmax: one read and one write of every tensor.
//
// Multi-tensor table (int64, kFields per parameter, built by functional/cuda/_launch.py):
//   param, grad, codes/absmax of states 0..2 (0 = state absent), step (float*, or 0),
//   numel, first tile, aligned (param and grad 16-byte, codes 8-byte aligned).
// state_bits = 32: the fp32-state twins (small parameters, state_bits=32 groups) use the same
// table with each state's float32 tensor in its codes slot (16-byte aligned) and no absmax.
// seed (int64 on the device, or null): bfloat16 parameters are rounded stochastically with
// Philox keyed by it; the launcher draws it from torch's generator at every step.
// A tile is blockDim.x * 8 elements of one parameter (whole quantization blocks); every
// parameter starts on a fresh tile, so one launch mixes any sizes and a CTA finds its parameter
// by binary search over the first tiles. Indices are 64-bit throughout.
//
// Optimizer-state rule (issue 17; the torch path's functional/_chunked.requantize, the CPU
// kernels): (a) an element any of whose fresh 8-bit states is NaN or +-inf gets 0.0 in all of
// them before the block is requantized, so the block's absmax stays finite (the parameter keeps
// the non-finite value the rule computed); (b) on the unsigned map (code of zero at index 0) a
// positive value whose nearest code is 0 is stored as code 1, so a positive second moment never
// decodes to 0. fp32 states (state_bits = 32) keep torch's arithmetic, NaN included.
//
// Numerics: dequantization and requantization are exact (eightbit_quant.cuh). The update rules
// are plain fp32 expressions, compiled with FMA contraction and under CuPy's -ftz=true, so an
// intermediate below 2^-126 (1.2e-38) is flushed to zero: differences from the torch path are
// at the level of fp32 rounding.
#pragma once

#include "eightbit_quant.cuh"

namespace eightbit {

enum Field : int {
  kParam = 0,
  kGrad = 1,
  kStateCodes = 2,   // state j: codes at kStateCodes + 2 j, absmax at kStateCodes + 2 j + 1
  kStep = 8,
  kNumel = 9,
  kFirstTile = 10,
  kAligned = 11,
  kFields = 12,
};
constexpr int kMaxStates = 3;

template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

// Hyperparameters read from device memory when a pointer is given, so that a captured CUDA
// graph sees the current learning rate and step at every replay.
__device__ __forceinline__ double read_or(const float* __restrict__ pointer, double value) {
  return pointer != nullptr ? static_cast<double>(*pointer) : value;
}

// Largest t with first_tile[t] <= tile (the parameter owning the tile; every entry is non-empty).
__device__ __forceinline__ int find_tensor(const long long* __restrict__ table, int num_tensors,
                                           long long tile) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[static_cast<long long>(mid) * kFields + kFirstTile] <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// torch.lerp's formula (ATen/native/Lerp.h): a + w (b - a) for |w| < 0.5, else
// b - (b - a)(1 - w), so that both ends are exact. w is uniform, so the branch does not diverge.
__device__ __forceinline__ float lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// NaN and +-inf have all exponent bits set (a bit test: no -ftz or fast-math can change it).
__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// NaN-propagating maximum (torch.maximum); fmaxf would drop a NaN.
__device__ __forceinline__ float nan_max(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// ---------------------------------------------------------------- stochastic rounding to bf16
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator torch uses on CUDA: 10 rounds of the published multipliers and Weyl
// key increments. Written from the paper's description.
struct Philox {
  unsigned x, y, z, w;
};

__device__ __forceinline__ Philox philox4x32_10(Philox c, unsigned k0, unsigned k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = Philox{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The bfloat16 value next to x, rounded up in magnitude with probability (low 16 bits) / 2^16,
// so E[result] = x: add 16 random bits to the fp32 pattern and clear the low half. The result is
// exactly representable in bfloat16, so the round-to-nearest store keeps it. inf/NaN unchanged.
__device__ __forceinline__ float round_bf16_stochastic(float x, unsigned random16) {
  if ((__float_as_uint(x) & 0x7fffffffu) >= 0x7f800000u) return x;
  return __uint_as_float((__float_as_uint(x) + random16) & 0xffff0000u);
}

__device__ __forceinline__ void round_items_stochastic(float (&v)[kItems], unsigned long long seed,
                                                       int tensor, long long i) {
  const unsigned long long chunk = static_cast<unsigned long long>(i) / kItems;
  const Philox r = philox4x32_10(
      Philox{static_cast<unsigned>(chunk), static_cast<unsigned>(chunk >> 32),
             static_cast<unsigned>(tensor), 0u},
      static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32));
  v[0] = round_bf16_stochastic(v[0], r.x & 0xffffu);
  v[1] = round_bf16_stochastic(v[1], r.x >> 16);
  v[2] = round_bf16_stochastic(v[2], r.y & 0xffffu);
  v[3] = round_bf16_stochastic(v[3], r.y >> 16);
  v[4] = round_bf16_stochastic(v[4], r.z & 0xffffu);
  v[5] = round_bf16_stochastic(v[5], r.z >> 16);
  v[6] = round_bf16_stochastic(v[6], r.w & 0xffffu);
  v[7] = round_bf16_stochastic(v[7], r.w >> 16);
}

// ---------------------------------------------------------------- the driver
// Rule (one per optimizer) provides:
//   static constexpr int kStates;            states the rule may use (0 .. 3)
//   static constexpr unsigned kSignedMask;   bit j set: state j uses the signed codebook
//   __device__ void prepare(const float* step);                  per parameter, uniform
//   __device__ void update(float& p, float g, float (&s)[kStates]) const;   one element, fp32
template <typename T, typename G, typename Rule>
__device__ __forceinline__ void multi_tensor_step(Rule rule, const long long* __restrict__ table,
                                                  int num_tensors, long long num_tiles,
                                                  const float* __restrict__ signed_codebook,
                                                  const float* __restrict__ unsigned_codebook,
                                                  int block_size, int state_bits,
                                                  const long long* __restrict__ seed) {
  constexpr int S = Rule::kStates;
  const bool quantized = state_bits == 8;
  static_assert(S >= 1 && S <= kMaxStates, "a rule keeps one to three 8-bit states");
  __shared__ Codebook books[2];  // [0] signed map, [1] unsigned map
  __shared__ unsigned scratch[kMaxWarps];
  load_codebook(books[0], signed_codebook);
  load_codebook(books[1], unsigned_codebook);
  __syncthreads();
  const int group = block_size / kItems;
  const int block_shift = __ffs(block_size) - 1;  // block_size is a power of two
  const long long tile_items = static_cast<long long>(blockDim.x) * kItems;
  const unsigned long long random_key =
      seed != nullptr ? static_cast<unsigned long long>(*seed) : 0ull;
  int t = -1;
  long long first_tile = 0, end_tile = 0;  // the tiles of parameter t
  // Every branch below depends on the tile (the CTA) only, so all threads reach the barriers.
  for (long long tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    if (tile < first_tile || tile >= end_tile) {  // another parameter: find it, prepare it
      t = find_tensor(table, num_tensors, tile);
      const long long* e = table + static_cast<long long>(t) * kFields;
      first_tile = e[kFirstTile];
      end_tile = first_tile + (e[kNumel] + tile_items - 1) / tile_items;
      rule.prepare(reinterpret_cast<const float*>(e[kStep]));
    }
    const long long* e = table + static_cast<long long>(t) * kFields;
    const long long n = e[kNumel];
    const bool vec = e[kAligned] != 0;
    const long long i = (tile - first_tile) * tile_items +
                        static_cast<long long>(threadIdx.x) * kItems;
    const bool live = i < n;  // the thread holds at least one element
    T* param = reinterpret_cast<T*>(e[kParam]);
    float p[kItems], g[kItems], s[S][kItems];
    load_items(param, i, n, vec, p);
    load_items(reinterpret_cast<const G*>(e[kGrad]), i, n, vec, g);
    unsigned present = 0u;  // bit j: state j is in use (8-bit; fp32 states do not take the rule)
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const unsigned char* codes = reinterpret_cast<const unsigned char*>(e[kStateCodes + 2 * j]);
      const float* absmax = reinterpret_cast<const float*>(e[kStateCodes + 2 * j + 1]);
      if (quantized && codes != nullptr) present |= 1u << j;
      if (!quantized && codes != nullptr) {  // an fp32 state: its values, in the codes slot
        load_items(reinterpret_cast<const float*>(codes), i, n, vec, s[j]);
      } else if (codes != nullptr) {
        unsigned c[kItems];
        load_codes(codes, i, n, vec, c);
        decode_items(c, live ? absmax[i >> block_shift] : 0.0f,
                     books[(Rule::kSignedMask >> j) & 1u ? 0 : 1].values, s[j]);
      } else {
#pragma unroll
        for (int k = 0; k < kItems; ++k) s[j][k] = 0.0f;
      }
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      float state[S];
#pragma unroll
      for (int j = 0; j < S; ++j) state[j] = s[j][k];
      rule.update(p[k], g[k], state);
      bool bad = false;  // rule (a): a non-finite 8-bit state restarts all states of the element
#pragma unroll
      for (int j = 0; j < S; ++j)
        bad = bad || (((present >> j) & 1u) != 0u && !is_finite(state[j]));
      // Elements past the end hold 0 so that they leave the block absmax alone.
#pragma unroll
      for (int j = 0; j < S; ++j) s[j][k] = i + k < n && !bad ? state[j] : 0.0f;
    }
    if constexpr (same_type<T, __nv_bfloat16>::value) {
      if (seed != nullptr) round_items_stochastic(p, random_key, t, i);
    }
    store_items(param, i, n, vec, p);
#pragma unroll
    for (int j = 0; j < S; ++j) {
      unsigned char* codes = reinterpret_cast<unsigned char*>(e[kStateCodes + 2 * j]);
      float* absmax = reinterpret_cast<float*>(e[kStateCodes + 2 * j + 1]);
      if (!quantized && codes != nullptr) {
        store_items(reinterpret_cast<float*>(codes), i, n, vec, s[j]);
      } else if (codes != nullptr) {
        unsigned c[kItems];
        const bool is_signed = ((Rule::kSignedMask >> j) & 1u) != 0u;
        const Scale scale = quantize_items(s[j], group, books[is_signed ? 0 : 1].tree, scratch, c);
        if (!is_signed) {  // rule (b); less_than is exact for subnormals under -ftz
#pragma unroll
          for (int k = 0; k < kItems; ++k)
            if (c[k] == 0u && less_than(0.0f, s[j][k])) c[k] = 1u;
        }
        store_codes(codes, i, n, vec, c);
        if ((threadIdx.x & (group - 1)) == 0 && live) absmax[i >> block_shift] = scale.stored;
      }
    }
  }
}

}  // namespace eightbit
