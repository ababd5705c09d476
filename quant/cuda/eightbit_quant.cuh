// eightbit's device header: element conversion, vector load/store, codebook thresholds and
// search, and the block absmax reduction. The quantize/dequantize kernels (blockwise.cu) and
// every optimizer kernel (functional/cuda/*.cu) include it, so there is one codebook search.
//
// Numerics (the contract of eightbit.quant, identical to the torch path quant/_torch.py):
//   absmax  = max |x| over the block in fp32; a block holding inf or NaN gets absmax NaN and the
//             code of 0.0 everywhere; a block of zeros gets absmax 0 and the code of 0.0.
//   y       = x / absmax, IEEE fp32 division, subnormals kept (see "exact arithmetic" below).
//   code    = #{ j : t_j < y }, t_j = the exact midpoint (c_j + c_j+1) / 2 rounded down to fp32
//             (quant/codebook.py midpoints), so ties go to the lower index.
//   decode  = codebook[code] * absmax, one fp32 multiply.
//
// Work layout shared by all kernels: a thread owns kItems = 8 consecutive elements, so a
// quantization block of block_size elements is a group of block_size / 8 consecutive threads
// (8 .. 512). Blocks of the CTA are whole groups; a CTA has max(256, block_size / 8) threads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace eightbit {

constexpr int kItems = 8;          // elements per thread
constexpr int kCodes = 256;        // codebook entries
constexpr int kMaxWarps = 16;      // a CTA has at most 512 threads
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- element conversion (fp32 math)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's fp32 -> fp16/bf16 conversion does.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// ---------------------------------------------------------------- exact arithmetic
// CuPy compiles every module with -ftz=true (cupy/cuda/compiler.py appends it after the caller's
// options), and under that flag the compiler flushes subnormal fp32 inputs and results of its own
// instructions to zero. The quantization arithmetic must equal the torch path bit for bit,
// subnormals included, so it uses PTX instructions without .ftz (inline asm is not rewritten by
// the flag) and integer operations on bit patterns. The compile test checks that the blockwise
// kernels contain no .ftz instruction.

__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ bool less_than(float a, float b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r)
      : "f"(a), "f"(b));
  return r != 0;
}

__device__ __forceinline__ double float_to_double(float x) {
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float double_to_float_down(double x) {
  float r;
  asm("cvt.rm.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
  return r;
}

// ---------------------------------------------------------------- 8-element vector load/store
// Element i (a multiple of 8) of an array of n. `vec` says the base pointer is aligned for
// 16-byte (values) or 8-byte (codes) accesses; the ragged tail and unaligned views take the
// scalar path. Elements past n read as 0 and are not written.

// kItems values of T packed into 16-byte words (32 bytes for float, 16 for half and bfloat16).
template <typename T>
union Pack {
  static constexpr int kVecs = kItems * sizeof(T) / 16;
  uint4 words[kVecs];
  T items[kItems];
};

template <typename T>
__device__ __forceinline__ void load_items(const T* __restrict__ p, long long i, long long n,
                                           bool vec, float (&v)[kItems]) {
  if (vec && i + kItems <= n) {
    Pack<T> pack;
    const uint4* src = reinterpret_cast<const uint4*>(p + i);
#pragma unroll
    for (int k = 0; k < Pack<T>::kVecs; ++k) pack.words[k] = src[k];
#pragma unroll
    for (int k = 0; k < kItems; ++k) v[k] = to_float(pack.items[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) v[k] = i + k < n ? to_float(p[i + k]) : 0.0f;
  }
}

// Round v to T and store the elements below n.
template <typename T>
__device__ __forceinline__ void store_items(T* __restrict__ p, long long i, long long n, bool vec,
                                            const float (&v)[kItems]) {
  Pack<T> pack;
#pragma unroll
  for (int k = 0; k < kItems; ++k) pack.items[k] = from_float<T>(v[k]);
  if (vec && i + kItems <= n) {
    uint4* dst = reinterpret_cast<uint4*>(p + i);
#pragma unroll
    for (int k = 0; k < Pack<T>::kVecs; ++k) dst[k] = pack.words[k];
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (i + k < n) p[i + k] = pack.items[k];
  }
}

__device__ __forceinline__ void load_codes(const unsigned char* __restrict__ p, long long i,
                                           long long n, bool vec, unsigned (&c)[kItems]) {
  if (vec && i + kItems <= n) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      c[k] = (raw.x >> (8 * k)) & 0xffu;
      c[k + 4] = (raw.y >> (8 * k)) & 0xffu;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) c[k] = i + k < n ? p[i + k] : 0u;
  }
}

__device__ __forceinline__ void store_codes(unsigned char* __restrict__ p, long long i, long long n,
                                            bool vec, const unsigned (&c)[kItems]) {
  if (vec && i + kItems <= n) {
    uint2 raw;
    raw.x = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
    raw.y = c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24);
    *reinterpret_cast<uint2*>(p + i) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (i + k < n) p[i + k] = static_cast<unsigned char>(c[k]);
  }
}

// ---------------------------------------------------------------- codebook in shared memory

// The 255 thresholds are kept in breadth-first (Eytzinger) order: tree[1] is the median t_127,
// tree[2k] and tree[2k + 1] the children of tree[k]. A search reads one node per level and the
// nodes of a level are contiguous, so the lanes of a warp hit distinct banks (at most 2- and
// 4-way conflicts on the two widest levels). The in-order layout would put every node of a level
// in the same bank (up to 8-way conflicts on five of the eight levels).
struct Codebook {
  float values[kCodes];  // c_0 .. c_255
  float tree[kCodes];    // tree[1 .. 255]: the thresholds in breadth-first order (tree[0] unused)
};

// The in-order index j of breadth-first node k (1 .. 255) of the perfect tree of depth 8.
__device__ __forceinline__ int inorder_index(int k) {
  const int depth = 31 - __clz(k);
  return ((k - (1 << depth)) << (8 - depth)) + (1 << (7 - depth)) - 1;
}

// The exact midpoint rounded down to fp32: the fp64 sum of two floats is exact for every
// codebook eightbit builds (neighbours within 2^29 of each other, or one of them 0), the halving
// is exact, and cvt.rm rounds toward -inf: the value quant/codebook.py's midpoints()
// gets with nextafter.
__device__ __forceinline__ float threshold(float lo, float hi) {
  return double_to_float_down(
      __dmul_rn(__dadd_rn(float_to_double(lo), float_to_double(hi)), 0.5));
}

// Fill `cb` from 256 fp32 values in global memory. All threads of the CTA call it; the caller
// synchronises (__syncthreads) before the first use.
__device__ __forceinline__ void load_codebook(Codebook& cb, const float* __restrict__ values) {
  for (int k = threadIdx.x; k < kCodes; k += blockDim.x) {
    cb.values[k] = values[k];
    if (k > 0) {
      const int j = inorder_index(k);
      cb.tree[k] = threshold(values[j], values[j + 1]);
    }
  }
}

// The number of thresholds strictly below y: descend the breadth-first tree, right when the
// node is below y; after the 8 levels the leaf index k is 256 + that number. NaN gives 0.
__device__ __forceinline__ unsigned encode(float y, const float* __restrict__ tree) {
  unsigned k = 1;
#pragma unroll
  for (int level = 0; level < 8; ++level) k = 2 * k + (less_than(tree[k], y) ? 1u : 0u);
  return k - kCodes;
}

// ---------------------------------------------------------------- block absmax
// Reduced on bit patterns: for |x| (sign bit cleared) the unsigned order of the patterns is the
// order of the values, subnormals included. Every non-finite value is mapped to the pattern of
// +inf, so the group maximum is +inf exactly when the block holds inf or NaN.

__device__ __forceinline__ unsigned magnitude_bits(float x) {
  const unsigned a = __float_as_uint(x) & 0x7fffffffu;
  return a < 0x7f800000u ? a : 0x7f800000u;
}

// Maximum of v over the group of `group` consecutive threads (a power of two, 8 .. 512; the
// CTA size is a multiple of it). Every thread of the CTA must call it (it may synchronise the
// CTA when a group spans warps); scratch holds kMaxWarps words of shared memory.
__device__ __forceinline__ unsigned group_max(unsigned v, int group, unsigned* scratch) {
  const int width = group < 32 ? group : 32;
  for (int offset = width >> 1; offset > 0; offset >>= 1) {
    const unsigned other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  if (group > 32) {
    const int warp = threadIdx.x >> 5;
    const int warps = group >> 5;
    __syncthreads();  // earlier readers of scratch are done
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    const int first = warp & ~(warps - 1);
    v = scratch[first];
    for (int w = 1; w < warps; ++w) v = scratch[first + w] > v ? scratch[first + w] : v;
  }
  return v;
}

// Block scale from the group maximum of magnitude_bits(): what is stored (NaN for a non-finite
// block) and whether the values are divided by it (finite and non-zero) or coded as 0.0.
struct Scale {
  float stored;
  bool divide;
};

__device__ __forceinline__ Scale block_scale(unsigned max_bits) {
  const bool finite = max_bits < 0x7f800000u;
  return Scale{finite ? __uint_as_float(max_bits) : quiet_nan(), finite && max_bits != 0u};
}

// Codes of one thread's values in a block of the given scale.
__device__ __forceinline__ void encode_items(const float (&v)[kItems], Scale s,
                                             const float* __restrict__ tree,
                                             unsigned (&c)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    c[k] = encode(s.divide ? div_rn(v[k], s.stored) : 0.0f, tree);
}

// Quantize one thread's values: reduce the absmax over the thread's group, compute the codes,
// and return the block scale (the group's first thread stores scale.stored).
__device__ __forceinline__ Scale quantize_items(const float (&v)[kItems], int group,
                                                const float* __restrict__ tree,
                                                unsigned* scratch, unsigned (&c)[kItems]) {
  unsigned m = 0u;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const unsigned a = magnitude_bits(v[k]);
    m = a > m ? a : m;
  }
  const Scale s = block_scale(group_max(m, group, scratch));
  encode_items(v, s, tree, c);
  return s;
}

__device__ __forceinline__ void decode_items(const unsigned (&c)[kItems], float absmax,
                                             const float* __restrict__ values,
                                             float (&v)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) v[k] = mul_rn(values[c[k]], absmax);
}

}  // namespace eightbit
