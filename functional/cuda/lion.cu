// Fused 8-bit Lion step (Chen et al. 2023, arXiv:2302.06675, Algorithm 2), the arithmetic and
// order of eightbit.functional.lion._lion_chunk:
//   g <- -g if maximize;  c <- m beta1 + (1 - beta1) g
//   p <- p (1 - lr wd);  p <- p - lr sign(c);  m <- m beta2 + (1 - beta2) g
// State 0 = exp_avg (signed map).
#include "eightbit_optim.cuh"

namespace eightbit {

struct LionRule {
  static constexpr int kStates = 1;
  static constexpr unsigned kSignedMask = 0x1u;
  const float* lr_ptr;
  double lr, beta1, beta2, weight_decay;
  bool maximize;
  // per parameter
  float neg_lr, decay, b1, w1, b2, w2;

  __device__ __forceinline__ void prepare(const float*) {
    const double rate = read_or(lr_ptr, lr);
    neg_lr = static_cast<float>(-rate);
    decay = static_cast<float>(1.0 - rate * weight_decay);
    b1 = static_cast<float>(beta1);
    w1 = static_cast<float>(1.0 - beta1);
    b2 = static_cast<float>(beta2);
    w2 = static_cast<float>(1.0 - beta2);
  }

  __device__ __forceinline__ void update(float& p, float g, float (&s)[kStates]) const {
    if (maximize) g = -g;
    const float c = s[0] * b1 + w1 * g;
    // torch.sign, (0 < c) - (c < 0): -1, 0 or +1, and 0 for NaN
    const float direction = (c > 0.0f ? 1.0f : 0.0f) - (c < 0.0f ? 1.0f : 0.0f);
    if (weight_decay != 0.0) p = p * decay;
    p = p + neg_lr * direction;
    s[0] = s[0] * b2 + w2 * g;
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(512)
    lion_kernel(const long long* __restrict__ table, int num_tensors, long long num_tiles,
                const float* __restrict__ signed_codebook,
                const float* __restrict__ unsigned_codebook, int block_size, int state_bits,
                const float* __restrict__ lr_ptr, double lr, double beta1, double beta2,
                double weight_decay, int maximize, const long long* __restrict__ seed) {
  LionRule rule{lr_ptr, lr, beta1, beta2, weight_decay, maximize != 0};
  multi_tensor_step<T, G>(rule, table, num_tensors, num_tiles, signed_codebook,
                          unsigned_codebook, block_size, state_bits, seed);
}

}  // namespace eightbit
