// Fused 8-bit Adagrad step, the arithmetic and order of torch.optim.Adagrad's single-tensor path
// and of eightbit.functional.adagrad._adagrad_chunk (Duchi et al. 2011, JMLR 12, "Adaptive
// Subgradient Methods", diagonal variant):
//   g <- -g if maximize;  g <- g + wd p;  clr <- lr / (1 + (t - 1) lr_decay)
//   s <- s + g^2;  p <- p - clr g / (sqrt(s) + eps)
// State 0 = sum (unsigned map). The step size is computed in double per parameter and rounded
// to float once, as torch does with its Python-float clr.
#include "eightbit_optim.cuh"

namespace eightbit {

struct AdagradRule {
  static constexpr int kStates = 1;
  static constexpr unsigned kSignedMask = 0x0u;
  const float* lr_ptr;
  double lr, lr_decay, weight_decay, eps;
  bool maximize;
  // per parameter
  float neg_clr, l2, epsf;

  __device__ __forceinline__ void prepare(const float* step) {
    const double t = static_cast<double>(*step);
    neg_clr = static_cast<float>(-read_or(lr_ptr, lr) / (1.0 + (t - 1.0) * lr_decay));
    l2 = static_cast<float>(weight_decay);
    epsf = static_cast<float>(eps);
  }

  __device__ __forceinline__ void update(float& p, float g, float (&s)[kStates]) const {
    if (maximize) g = -g;
    if (weight_decay != 0.0) g = g + l2 * p;
    s[0] = s[0] + g * g;
    const float denom = __fsqrt_rn(s[0]) + epsf;
    p = p + neg_clr * (g / denom);
  }
};

template <typename T, typename G>
__global__ void __launch_bounds__(512)
    adagrad_kernel(const long long* __restrict__ table, int num_tensors, long long num_tiles,
                   const float* __restrict__ signed_codebook,
                   const float* __restrict__ unsigned_codebook, int block_size, int state_bits,
                   const float* __restrict__ lr_ptr, double lr, double lr_decay,
                   double weight_decay, double eps, int maximize,
                   const long long* __restrict__ seed) {
  AdagradRule rule{lr_ptr, lr, lr_decay, weight_decay, eps, maximize != 0};
  multi_tensor_step<T, G>(rule, table, num_tensors, num_tiles, signed_codebook,
                          unsigned_codebook, block_size, state_bits, seed);
}

}  // namespace eightbit
