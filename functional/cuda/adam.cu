// Fused 8-bit Adam / AdamW step (optional AMSGrad), the arithmetic and order of
// torch.optim.Adam's single-tensor path and of eightbit.functional.adam._adam_chunk:
//   g <- -g if maximize;  AdamW: p <- p (1 - lr wd);  Adam: g <- g + wd p
//   m <- lerp(m, g, 1 - beta1);  v <- v beta2 + (1 - beta2) g^2;  AMSGrad: vmax <- max(vmax, v)
//   p <- p - lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
// States: 0 = exp_avg (signed map), 1 = exp_avg_sq, 2 = max_exp_avg_sq (unsigned map; absent
// without AMSGrad). Scalars derived from the hyperparameters are computed in double and rounded
// to float once, as torch does with Python floats.
#include "eightbit_optim.cuh"

namespace eightbit {

struct AdamRule {
  static constexpr int kStates = 3;
  static constexpr unsigned kSignedMask = 0x1u;
  const float* lr_ptr;
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad, maximize;
  // per parameter
  float decay, l2, w1, b2, w2, step_size, bc2_sqrt, epsf;

  __device__ __forceinline__ void prepare(const float* step) {
    const double rate = read_or(lr_ptr, lr);
    const double t = static_cast<double>(*step);
    decay = static_cast<float>(1.0 - rate * weight_decay);
    l2 = static_cast<float>(weight_decay);
    w1 = static_cast<float>(1.0 - beta1);
    b2 = static_cast<float>(beta2);
    w2 = static_cast<float>(1.0 - beta2);
    step_size = static_cast<float>(rate / (1.0 - pow(beta1, t)));
    bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, t)));
    epsf = static_cast<float>(eps);
  }

  __device__ __forceinline__ void update(float& p, float g, float (&s)[kStates]) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0) {
      if (decoupled) p = p * decay;
      else g = g + l2 * p;
    }
    s[0] = lerp(s[0], g, w1);
    s[1] = s[1] * b2 + w2 * (g * g);
    float v = s[1];
    if (amsgrad) {
      s[2] = nan_max(s[2], s[1]);
      v = s[2];
    }
    const float denom = __fsqrt_rn(v) / bc2_sqrt + epsf;
    p = p + (-step_size) * (s[0] / denom);
  }
};

// One launch updates every parameter of the table (see eightbit_optim.cuh). lr_ptr (or null:
// use lr) is read on the device, and so is each parameter's step, so that graph replays see them.
template <typename T, typename G>
__global__ void __launch_bounds__(512)
    adam_kernel(const long long* __restrict__ table, int num_tensors, long long num_tiles,
                const float* __restrict__ signed_codebook,
                const float* __restrict__ unsigned_codebook, int block_size, int state_bits,
                const float* __restrict__ lr_ptr, double lr, double beta1, double beta2, double eps,
                double weight_decay, int decoupled, int amsgrad, int maximize,
                const long long* __restrict__ seed) {
  AdamRule rule{lr_ptr, lr, beta1, beta2, eps, weight_decay,
                decoupled != 0, amsgrad != 0, maximize != 0};
  multi_tensor_step<T, G>(rule, table, num_tensors, num_tiles, signed_codebook,
                          unsigned_codebook, block_size, state_bits, seed);
}

}  // namespace eightbit
