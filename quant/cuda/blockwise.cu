// Blockwise quantize / dequantize (eightbit.quant.quantize_blockwise on CUDA tensors).
// Templated on the data type T in {float, __half, __nv_bfloat16}; block_size is a runtime power
// of two in 64 .. 4096 (a group of block_size / 8 threads per quantization block, see
// eightbit_quant.cuh). Launch: blockDim.x = max(256, block_size / 8), any grid (grid-stride).
#include "eightbit_quant.cuh"

namespace eightbit {

// codes[i] = code of x[i] / absmax[i / block_size]; absmax[b] = max |x| over block b.
// aligned != 0: x is 16-byte and codes 8-byte aligned (vector loads/stores).
template <typename T>
__global__ void __launch_bounds__(512)
    quantize_blockwise_kernel(const T* __restrict__ x, unsigned char* __restrict__ codes,
                              float* __restrict__ absmax, const float* __restrict__ codebook,
                              long long n, int block_size, int aligned) {
  __shared__ Codebook cb;
  __shared__ unsigned scratch[kMaxWarps];
  load_codebook(cb, codebook);
  __syncthreads();
  const int group = block_size / kItems;
  const int block_shift = __ffs(block_size) - 1;  // block_size is a power of two
  const long long tile = static_cast<long long>(blockDim.x) * kItems;
  const long long stride = static_cast<long long>(gridDim.x) * tile;
  // The loop bound depends on the CTA only, so every thread reaches group_max's barriers.
  for (long long start = blockIdx.x * tile; start < n; start += stride) {
    const long long i = start + static_cast<long long>(threadIdx.x) * kItems;
    float v[kItems];
    load_items(x, i, n, aligned != 0, v);
    unsigned c[kItems];
    const Scale s = quantize_items(v, group, cb.tree, scratch, c);
    store_codes(codes, i, n, aligned != 0, c);
    if ((threadIdx.x & (group - 1)) == 0 && i < n) absmax[i >> block_shift] = s.stored;
  }
}

// out[i] = codebook[codes[i]] * absmax[i / block_size], rounded to T.
// aligned != 0: codes is 8-byte and out 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(512)
    dequantize_blockwise_kernel(const unsigned char* __restrict__ codes,
                                const float* __restrict__ absmax,
                                const float* __restrict__ codebook, T* __restrict__ out,
                                long long n, int block_size, int aligned) {
  __shared__ float values[kCodes];
  for (int j = threadIdx.x; j < kCodes; j += blockDim.x) values[j] = codebook[j];
  __syncthreads();
  const int block_shift = __ffs(block_size) - 1;  // block_size is a power of two
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x * kItems;
  for (long long i = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) * kItems;
       i < n; i += stride) {
    unsigned c[kItems];
    load_codes(codes, i, n, aligned != 0, c);
    float v[kItems];
    decode_items(c, absmax[i >> block_shift], values, v);
    store_items(out, i, n, aligned != 0, v);
  }
}

}  // namespace eightbit
