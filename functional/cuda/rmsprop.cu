// Fused 8-bit RMSprop step (optional momentum and centering), the arithmetic and order of
// torch.optim.RMSprop and of eightbit.functional.rmsprop._rmsprop_chunk:
//   g <- -g if maximize;  g <- g + wd p
//   s <- s alpha + (1 - alpha) g^2
//   centered: a <- lerp(a, g, 1 - alpha); d <- sqrt(max(s - a^2, 0)) + eps
//   otherwise d <- sqrt(s) + eps
//   momentum: b <- b momentum + g / d; p <- p - lr b          else p <- p - lr g / d
// The centered variance is clamped at 0 because quantization can make it slightly negative.
// States: 0 = square_avg (unsigned map), 1 = momentum_buffer, 2 = grad_avg (signed map); the
// last two are absent (null in the table) when momentum is 0 / centered is off.
#include "eightbit_optim.cuh"

namespace eightbit {

struct RMSpropRule {
  static constexpr int kStates = 3;
  static constexpr unsigned kSignedMask = 0x6u;
  const float* lr_ptr;
  double lr, alpha, eps, weight_decay, momentum;
  bool has_momentum, centered, maximize;
  // per parameter
  float neg_lr, l2, a, w, epsf, mom;

  __device__ __forceinline__ void prepare(const float*) {
    neg_lr = static_cast<float>(-read_or(lr_ptr, lr));
    l2 = static_cast<float>(weight_decay);
    a = static_cast<float>(alpha);
    w = static_cast<float>(1.0 - alpha);
    epsf = static_cast<float>(eps);
    mom = static_cast<float>(momentum);
  }

  __device__ __forceinline__ void update(float& p, float g, float (&s)[kStates]) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0) g = g + l2 * p;
    s[0] = s[0] * a + w * (g * g);
    float avg;
    if (centered) {
      s[2] = lerp(s[2], g, w);
      const float var = s[0] - s[2] * s[2];
      avg = __fsqrt_rn(var < 0.0f ? 0.0f : var);  // keeps NaN, unlike fmaxf
    } else {
      avg = __fsqrt_rn(s[0]);
    }
    avg = avg + epsf;
    if (has_momentum) {
      s[1] = s[1] * mom + g / avg;
      p = p + neg_lr * s[1];
    } else {
      p = p + neg_lr * (g / avg);
    }
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(512)
    rmsprop_kernel(const long long* __restrict__ table, int num_tensors, long long num_tiles,
                   const float* __restrict__ signed_codebook,
                   const float* __restrict__ unsigned_codebook, int block_size, int state_bits,
                   const float* __restrict__ lr_ptr, double lr, double alpha, double eps,
                   double weight_decay, double momentum, int centered, int maximize,
                   const long long* __restrict__ seed) {
  RMSpropRule rule{lr_ptr, lr, alpha, eps, weight_decay, momentum,
                   momentum != 0.0, centered != 0, maximize != 0};
  multi_tensor_step<T, G>(rule, table, num_tensors, num_tiles, signed_codebook,
                          unsigned_codebook, block_size, state_bits, seed);
}

}  // namespace eightbit
