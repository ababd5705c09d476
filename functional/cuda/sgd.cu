// Fused 8-bit SGD step (momentum, dampening, Nesterov), the arithmetic and order of
// torch.optim.SGD's single-tensor path and of eightbit.functional.sgd._sgd_chunk:
//   g <- -g if maximize;  g <- g + wd p
//   momentum: b <- g on the first step, else b <- b momentum + (1 - dampening) g
//             g <- g + momentum b if nesterov, else g <- b
//   p <- p - lr g
// State 0 = momentum_buffer (signed map); absent (null in the table) when momentum is 0. torch
// starts the buffer from a copy of g when it has none; here the step counter says when (step 1).
#include "eightbit_optim.cuh"

namespace eightbit {

struct SGDRule {
  static constexpr int kStates = 1;
  static constexpr unsigned kSignedMask = 0x1u;
  const float* lr_ptr;
  double lr, momentum, dampening, weight_decay;
  bool has_momentum, nesterov, maximize;
  // per parameter
  float neg_lr, l2, mom, w;
  bool first;

  __device__ __forceinline__ void prepare(const float* step) {
    neg_lr = static_cast<float>(-read_or(lr_ptr, lr));
    l2 = static_cast<float>(weight_decay);
    mom = static_cast<float>(momentum);
    w = static_cast<float>(1.0 - dampening);
    first = *step == 1.0f;
  }

  __device__ __forceinline__ void update(float& p, float g, float (&s)[kStates]) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0) g = g + l2 * p;
    if (has_momentum) {
      s[0] = first ? g : s[0] * mom + w * g;
      g = nesterov ? g + mom * s[0] : s[0];
    }
    p = p + neg_lr * g;
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(512)
    sgd_kernel(const long long* __restrict__ table, int num_tensors, long long num_tiles,
               const float* __restrict__ signed_codebook,
               const float* __restrict__ unsigned_codebook, int block_size, int state_bits,
               const float* __restrict__ lr_ptr, double lr, double momentum, double dampening,
               double weight_decay, int nesterov, int maximize,
               const long long* __restrict__ seed) {
  SGDRule rule{lr_ptr, lr, momentum, dampening, weight_decay,
               momentum != 0.0, nesterov != 0, maximize != 0};
  multi_tensor_step<T, G>(rule, table, num_tensors, num_tiles, signed_codebook,
                          unsigned_codebook, block_size, state_bits, seed);
}

}  // namespace eightbit
