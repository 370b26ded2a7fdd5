#pragma once
// The per-element math of every algorithm: ONE copy, used by the CPU kernels (both
// their vectorized body and their scalar tail, on every ISA) and by the CUDA kernels.
//
// Note [matching torch.optim bit for bit]
// Each rule performs, in the same order and with the same roundings, the tensor ops of
// torch.optim's for-loop implementation (`foreach=False`) as torch's own CPU kernels
// compute them. torch builds its kernels with floating-point contraction, so where the
// for-loop writes `a.add(b, alpha=s)` torch computes fma(b, s, a), `addcmul` is
// fma(value * t1, t2, self), and `lerp` is the fma form; `addcdiv` and division by a
// Python scalar are true divisions. We spell every fma out (std::fma) and build with
// -ffp-contract=off (Note [no FP contraction] in setup.py), so the result does not depend
// on where a vector or thread boundary falls. Scalars arrive as double, as in torch,
// and are rounded to the math type once (see the *Coeffs structs).
//
// For float16/bfloat16 params the math runs in float (at::opmath_type) and only the
// stored values are rounded, as torch's `fused=True` kernels do; the for-loop instead
// rounds every intermediate to 16 bits, so it is not the reference there.

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FO_HOST_DEVICE __host__ __device__
#define FO_INLINE __forceinline__
#else
#define FO_HOST_DEVICE
#define FO_INLINE inline __attribute__((always_inline))
#endif

namespace fused_optim {

template <typename M>
FO_HOST_DEVICE FO_INLINE M fma_(M a, M b, M c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FO_HOST_DEVICE FO_INLINE double pow_(double a, double b) {
#if defined(__CUDA_ARCH__)
  return ::pow(a, b);
#else
  return std::pow(a, b);
#endif
}

template <typename M>
FO_HOST_DEVICE FO_INLINE M sqrt_(M a) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(a);
#else
  return std::sqrt(a);
#endif
}

// a * b + c with one rounding (fma), as torch's kernels compute `x.add(y, alpha=s)` on real
// tensors, or with two (a multiply, then an add), as they do on complex tensors.
template <bool kFused, typename M>
FO_HOST_DEVICE FO_INLINE M madd_(M a, M b, M c) {
  if constexpr (kFused) {
    return fma_(a, b, c);
  } else {
    return a * b + c;  // not contracted: see Note [no FP contraction]
  }
}

// torch.maximum: NaN if either side is NaN (a's where both are). A select, so the loops
// that use it still vectorize; no arithmetic, so which NaN comes out does not depend on
// the operand order a compiler picks for an add (x86 returns the first operand's NaN),
// and the vector and scalar loops store the same bits.
template <typename M>
FO_HOST_DEVICE FO_INLINE M maximum_(M a, M b) {
  return (a > b) | (a != a) ? a : b;
}

// x < y ? a : b (a comparison: a NaN x or y takes b). Lane by lane on the vector types of
// cpu/simd.h, so the rules that choose per element vectorize (Note [Rprop's selects]).
template <typename M>
FO_HOST_DEVICE FO_INLINE M if_less_(M x, M y, M a, M b) {
  return x < y ? a : b;
}

// x == y ? a : b (a NaN x or y takes b), as if_less_.
template <typename M>
FO_HOST_DEVICE FO_INLINE M if_equal_(M x, M y, M a, M b) {
  return x == y ? a : b;
}

// The unsigned integer of float's or double's width, void for any other type (the vector
// types of cpu/simd.h, c10::complex): what invariant_select_ and negated_if_ work on in
// host code.
template <typename M>
struct BitsOf {
  using type = void;
};
template <>
struct BitsOf<float> {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};
template <typename M>
using bits_of_t = typename BitsOf<M>::type;

// c ? a : b for a c that is the same for a whole loop (a tensor's constant), as bit
// operations on float and double: written as a ternary, GCC made it a branch and moved
// a's arithmetic under it (a division and a square root, which it does not compute where
// they are not asked for), and such a loop does not vectorize on AVX2 (RAdam, found
// 2026-12-07). The same bits as the ternary, NaN included; the vector types and CUDA
// choose whole values with a branch on c.
template <typename M>
FO_HOST_DEVICE FO_INLINE M invariant_select_(bool c, M a, M b) {
#if !defined(__CUDACC__) && !defined(__HIPCC__)
  if constexpr (!std::is_void_v<bits_of_t<M>>) {
    using U = bits_of_t<M>;
    const U mask = U(0) - static_cast<U>(c);  // all ones where c, else 0
    return __builtin_bit_cast(M, static_cast<U>((__builtin_bit_cast(U, a) & mask) |
                                                (__builtin_bit_cast(U, b) & ~mask)));
  }
#endif
  // (a branch: a ternary of two vector structs became a select of their addresses and a
  // copy through memory, whose reload stalled RAdam's float16 AVX2 loop, 2x slower)
  if (c) return a;
  return b;
}

// maximize's `-grad`, with grad_sign -1 (maximize) or +1: g with its sign bit flipped where
// grad_sign's is set, as torch's negation flips it, a NaN's included (`g * grad_sign` kept
// a NaN's sign, and under MXCSR.DAZ made a subnormal 0). Lane by lane on the vector types
// of cpu/simd.h.
template <typename M>
FO_HOST_DEVICE FO_INLINE M negated_if_(M grad_sign, M g) {
#if !defined(__CUDACC__) && !defined(__HIPCC__)
  if constexpr (!std::is_void_v<bits_of_t<M>>) {
    using U = bits_of_t<M>;
    constexpr U kSign = U(1) << (8 * sizeof(M) - 1);
    return __builtin_bit_cast(M, static_cast<U>(__builtin_bit_cast(U, g) ^
                                                (__builtin_bit_cast(U, grad_sign) & kSign)));
  }
#endif
  if (grad_sign < M(0)) return -g;
  return g;
}

// |a| (torch.abs): the sign bit cleared, NaN included.
template <typename M>
FO_HOST_DEVICE FO_INLINE M abs_(M a) {
#if defined(__CUDA_ARCH__)
  return ::fabs(a);
#else
  return std::fabs(a);
#endif
}

// a / b, where b is the same for a whole tensor and inv_b is 1 / b rounded: the division,
// except on AVX-512 vectors, where a multiply and a correction give the same bits (Note
// [division by a constant] in cpu/simd.h).
template <typename M>
FO_HOST_DEVICE FO_INLINE M div_by_(M a, M b, M /*inv_b*/) {
  return a / b;
}

// The same for any a, where b (the same for a whole tensor) is in [2^-53, 1], as a bias
// correction 1 - beta^step is: AVX-512 vectors check a's range and divide where it is
// outside the one div_by_ is exact in (Note [division by a bias correction] in cpu/simd.h).
template <typename M>
FO_HOST_DEVICE FO_INLINE M div_by_bias_correction_(M a, M b, M /*inv_b*/) {
  return a / b;
}

// The element type of a math type: M itself, or float for the CPU's vectors of floats
// (Note [vector rules] in cpu/simd.h), where a rule runs on eight or sixteen elements at
// once.
template <typename M>
struct ScalarOf {
  using type = M;
};

// Tensor.lerp_(end, weight) with a scalar weight, as torch computes it: for a small
// weight from `start`, otherwise from `end` (better accuracy near weight 1).
template <typename M>
struct LerpWeight {
  M coeff;     // weight if small, weight - 1 otherwise
  bool small;  // |weight| < 0.5
  LerpWeight() = default;
  FO_HOST_DEVICE explicit LerpWeight(double w) {
    using S = typename ScalarOf<M>::type;
    const S wm = static_cast<S>(w);
    small = (wm < S(0) ? -wm : wm) < S(0.5);
    coeff = M(small ? wm : wm - S(1));
  }
  FO_HOST_DEVICE FO_INLINE M operator()(M start, M end) const {
    return small ? fma_(coeff, end - start, start) : fma_(coeff, end - start, end);
  }
};

enum class WeightDecay { kNone, kL2, kDecoupled };

// Note [per-step coefficients]
// Each *Coeffs struct holds an algorithm's scalars as double. Its `at(lr, lr_is_f32, step)`
// sets the ones that depend on lr and on the param's step count, as torch's for-loop
// computes them: Python floats (double) and Python's ** (C pow); with a float32 Tensor lr
// the quotients by lr are float32 tensor ops (Note [Tensor lr] in plan.h). One copy for
// every device: the CPU kernels call it on the host; the CUDA kernels call it on the host
// where lr and the steps live there (so CUDA gets the CPU kernels' bits), and on the GPU
// where they live there (capturable steps, a CUDA Tensor lr: no host synchronisation;
// the GPU's pow may differ from the host's in the last bit).

// ---------------------------------------------------------------------------------------
// SGD (torch.optim.SGD): weight decay, momentum with dampening, Nesterov, maximize.
// ---------------------------------------------------------------------------------------
enum class Momentum { kNone, kFirstStep, kFirstStepNesterov, kUpdate, kUpdateNesterov };

struct SgdCoeffs {  // as double, straight from the param group
  double grad_sign, weight_decay, momentum, one_minus_dampening, neg_lr;
  // torch's for-loop uses alpha=-lr; a Tensor lr becomes that Scalar exactly.
  FO_HOST_DEVICE void at(double lr, bool /*lr_is_f32*/, double /*step*/) { neg_lr = -lr; }
};

inline SgdCoeffs sgd_coeffs(bool maximize, double weight_decay, double momentum,
                            double dampening) {
  return SgdCoeffs{maximize ? -1.0 : 1.0, weight_decay, momentum, 1.0 - dampening, 0.0};
}

// torch's SGD (unlike Adam) updates complex params with complex arithmetic; with a real
// scalar that is the real-view update with unfused multiply-adds (kFma = false).
template <typename M, bool kWeightDecay, Momentum kMomentum, bool kFma = true>
struct SgdRule {
  using Coeffs = SgdCoeffs;
  template <typename V>  // the same rule on another math type (Note [vector rules])
  using WithMath = SgdRule<V, kWeightDecay, kMomentum, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = kMomentum == Momentum::kNone ? 0 : 1;
  // Two fmas an element: the loop waits on its loads (Note [float loops in AVX2]).
  static constexpr bool kLoadBound = true;
  M grad_sign, weight_decay, momentum, one_minus_dampening, neg_lr;

  FO_HOST_DEVICE explicit SgdRule(const SgdCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        momentum(static_cast<M>(c.momentum)),
        one_minus_dampening(static_cast<M>(c.one_minus_dampening)),
        neg_lr(static_cast<M>(c.neg_lr)) {}

  // state[0]: momentum_buffer
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    g = negated_if_(grad_sign, g);            // maximize: grad = -grad (a sign flip)
    if constexpr (kWeightDecay) {
      g = madd_<kFma>(p, weight_decay, g);    // grad.add(param, alpha=weight_decay)
    }
    if constexpr (kMomentum != Momentum::kNone) {
      M& buf = state[0];
      if constexpr (kMomentum == Momentum::kFirstStep ||
                    kMomentum == Momentum::kFirstStepNesterov) {
        buf = g;                              // torch.clone(grad)
      } else {
        buf = madd_<kFma>(g, one_minus_dampening, buf * momentum);  // buf.mul_(m).add_(g, alpha=1-d)
      }
      if constexpr (kMomentum == Momentum::kFirstStepNesterov ||
                    kMomentum == Momentum::kUpdateNesterov) {
        g = madd_<kFma>(buf, momentum, g);    // grad.add(buf, alpha=momentum)
      } else {
        g = buf;
      }
    }
    p = madd_<kFma>(g, neg_lr, p);            // param.add_(grad, alpha=-lr)
  }
};

// ---------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam, decoupled_weight_decay=True is AdamW): amsgrad,
// maximize, L2 or decoupled weight decay. Bias corrections depend on each param's own
// step, so the step-dependent coefficients are per tensor.
// ---------------------------------------------------------------------------------------
struct AdamCoeffs {  // as double
  double grad_sign, weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2, eps;
  double bias_correction2_sqrt, neg_step_size;  // per tensor (per step count)
  double beta1;

  FO_HOST_DEVICE void at(double lr, bool lr_is_f32, double step) {
    // 1 - lr * weight_decay (AdamW's param.mul_), in lr's dtype for a Tensor lr.
    decay_factor = lr_is_f32 ? static_cast<double>(1.0f - static_cast<float>(lr) *
                                                              static_cast<float>(weight_decay))
                             : 1.0 - lr * weight_decay;
    const double bias_correction1 = 1.0 - pow_(beta1, step);
    const double bias_correction2 = 1.0 - pow_(beta2, step);
    const double step_size =
        lr_is_f32 ? static_cast<double>(static_cast<float>(lr) / static_cast<float>(bias_correction1))
                  : lr / bias_correction1;
    neg_step_size = -step_size;
    bias_correction2_sqrt = pow_(bias_correction2, 0.5);  // bias_correction2 ** 0.5
  }
};

inline AdamCoeffs adam_coeffs(bool maximize, double weight_decay, double beta1, double beta2,
                              double eps) {
  AdamCoeffs c{};
  c.grad_sign = maximize ? -1.0 : 1.0;
  c.weight_decay = weight_decay;
  c.beta1 = beta1;
  c.one_minus_beta1 = 1.0 - beta1;
  c.beta2 = beta2;
  c.one_minus_beta2 = 1.0 - beta2;
  c.eps = eps;
  return c;
}

// torch's Adam takes the real view of a complex param after the weight decay, so the L2
// term is a complex multiply-add there (kFma = false); the rest is real arithmetic.
template <typename M, WeightDecay kWeightDecay, bool kAmsgrad, bool kFma = true>
struct AdamRule {
  using Coeffs = AdamCoeffs;
  template <typename V>
  using WithMath = AdamRule<V, kWeightDecay, kAmsgrad, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = kAmsgrad ? 3 : 2;
  M grad_sign, weight_decay, decay_factor, beta2, one_minus_beta2, eps;
  M bias_correction2_sqrt, inv_bias_correction2_sqrt, neg_step_size;
  LerpWeight<M> lerp;

  FO_HOST_DEVICE explicit AdamRule(const AdamCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        decay_factor(static_cast<M>(c.decay_factor)),
        beta2(static_cast<M>(c.beta2)),
        one_minus_beta2(static_cast<M>(c.one_minus_beta2)),
        eps(static_cast<M>(c.eps)),
        bias_correction2_sqrt(static_cast<M>(c.bias_correction2_sqrt)),
        inv_bias_correction2_sqrt(M(1.0f) / bias_correction2_sqrt),
        neg_step_size(static_cast<M>(c.neg_step_size)),
        lerp(c.one_minus_beta1) {}

  // state[0]: exp_avg, state[1]: exp_avg_sq, state[2]: max_exp_avg_sq (amsgrad)
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& exp_avg = state[0];
    M& exp_avg_sq = state[1];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay == WeightDecay::kDecoupled) {
      p = p * decay_factor;                   // param.mul_(1 - lr * weight_decay)
    } else if constexpr (kWeightDecay == WeightDecay::kL2) {
      g = madd_<kFma>(p, weight_decay, g);    // grad.add(param, alpha=weight_decay)
    }
    exp_avg = lerp(exp_avg, g);               // exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq = fma_(one_minus_beta2 * g, g, exp_avg_sq * beta2);  // .mul_(b2).addcmul_
    M second = exp_avg_sq;
    if constexpr (kAmsgrad) {
      state[2] = maximum_(state[2], exp_avg_sq);
      second = state[2];
    }
    // exp_avg_sq.sqrt() / bias_correction2_sqrt, then .add_(eps)
    const M denom = div_by_(sqrt_(second), bias_correction2_sqrt, inv_bias_correction2_sqrt) + eps;
    p = p + (neg_step_size * exp_avg) / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
};

// ---------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop): L2 weight decay, centered, momentum, maximize. The step
// counter is only counted, never used.
// ---------------------------------------------------------------------------------------
struct RmspropCoeffs {  // as double
  double grad_sign, weight_decay, alpha, one_minus_alpha, eps, momentum, neg_lr;
  // alpha=-lr / value=-lr in torch's for-loop; the step is only counted.
  FO_HOST_DEVICE void at(double lr, bool /*lr_is_f32*/, double /*step*/) { neg_lr = -lr; }
};

inline RmspropCoeffs rmsprop_coeffs(bool maximize, double weight_decay, double alpha,
                                    double eps, double momentum) {
  return RmspropCoeffs{maximize ? -1.0 : 1.0, weight_decay, alpha, 1.0 - alpha, eps, momentum, 0.0};
}

// As in Adam, a complex param is viewed as real after the weight decay (kFma = false).
template <typename M, bool kWeightDecay, bool kCentered, bool kMomentum, bool kFma = true>
struct RmspropRule {
  using Coeffs = RmspropCoeffs;
  template <typename V>
  using WithMath = RmspropRule<V, kWeightDecay, kCentered, kMomentum, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 1 + int(kCentered) + int(kMomentum);
  M grad_sign, weight_decay, alpha, one_minus_alpha, eps, momentum, neg_lr;
  LerpWeight<M> lerp;

  FO_HOST_DEVICE explicit RmspropRule(const RmspropCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        alpha(static_cast<M>(c.alpha)),
        one_minus_alpha(static_cast<M>(c.one_minus_alpha)),
        eps(static_cast<M>(c.eps)),
        momentum(static_cast<M>(c.momentum)),
        neg_lr(static_cast<M>(c.neg_lr)),
        lerp(c.one_minus_alpha) {}

  // state[0]: square_avg, then grad_avg (centered), then momentum_buffer (momentum > 0)
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& square_avg = state[0];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay) {
      g = madd_<kFma>(p, weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    square_avg = fma_(one_minus_alpha * g, g, square_avg * alpha);  // .mul_(a).addcmul_
    M avg;
    if constexpr (kCentered) {
      M& grad_avg = state[1];
      grad_avg = lerp(grad_avg, g);                       // grad_avg.lerp_(grad, 1 - alpha)
      avg = sqrt_(fma_(-grad_avg, grad_avg, square_avg));  // addcmul(ga, ga, value=-1).sqrt_()
    } else {
      avg = sqrt_(square_avg);
    }
    avg = avg + eps;                                      // avg.add_(eps)
    if constexpr (kMomentum) {
      M& buf = state[kCentered ? 2 : 1];
      buf = buf * momentum + g / avg;                     // buf.mul_(momentum).addcdiv_(grad, avg)
      p = fma_(buf, neg_lr, p);                           // param.add_(buf, alpha=-lr)
    } else {
      p = p + (neg_lr * g) / avg;                         // param.addcdiv_(grad, avg, value=-lr)
    }
  }
};

// ---------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad, dense grads): L2 weight decay, lr decay, maximize. The
// decayed lr depends on each param's own step, so it is per tensor.
// ---------------------------------------------------------------------------------------
struct AdagradCoeffs {  // as double
  double grad_sign, weight_decay, eps;
  double neg_clr;  // per tensor: -lr / (1 + (step - 1) * lr_decay)
  double lr_decay;

  FO_HOST_DEVICE void at(double lr, bool lr_is_f32, double step) {
    // clr = lr / (1 + (step - 1) * lr_decay), in lr's dtype for a Tensor lr.
    const double decay = 1.0 + (step - 1.0) * lr_decay;
    const double clr = lr_is_f32 ? static_cast<double>(static_cast<float>(lr) / static_cast<float>(decay))
                                 : lr / decay;
    neg_clr = -clr;
  }
};

inline AdagradCoeffs adagrad_coeffs(bool maximize, double weight_decay, double eps,
                                    double lr_decay) {
  return AdagradCoeffs{maximize ? -1.0 : 1.0, weight_decay, eps, 0.0, lr_decay};
}

// As in Adam, a complex param is viewed as real after the weight decay (kFma = false).
template <typename M, bool kWeightDecay, bool kFma = true>
struct AdagradRule {
  using Coeffs = AdagradCoeffs;
  template <typename V>
  using WithMath = AdagradRule<V, kWeightDecay, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 1;
  M grad_sign, weight_decay, eps, neg_clr;

  FO_HOST_DEVICE explicit AdagradRule(const AdagradCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        eps(static_cast<M>(c.eps)),
        neg_clr(static_cast<M>(c.neg_clr)) {}

  // state[0]: sum
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& sum = state[0];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay) {
      g = madd_<kFma>(p, weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    sum = fma_(g, g, sum);                  // state_sum.addcmul_(grad, grad, value=1)
    const M std = sqrt_(sum) + eps;         // state_sum.sqrt().add_(eps)
    p = p + (neg_clr * g) / std;            // param.addcdiv_(grad, std, value=-clr)
  }
};

// ---------------------------------------------------------------------------------------
// Adamax (torch.optim.Adamax): L2 weight decay, maximize. The bias correction depends on
// each param's own step, so the step size is per tensor.
// ---------------------------------------------------------------------------------------
struct AdamaxCoeffs {  // as double
  double grad_sign, weight_decay, one_minus_beta1, beta2, eps;
  double neg_clr;  // per tensor: -lr / (1 - beta1 ** step)
  double beta1;

  FO_HOST_DEVICE void at(double lr, bool lr_is_f32, double step) {
    // clr = lr / bias_correction, in lr's dtype for a Tensor lr (Note [Tensor lr]).
    const double bias_correction = 1.0 - pow_(beta1, step);
    const double clr = lr_is_f32 ? static_cast<double>(static_cast<float>(lr) /
                                                       static_cast<float>(bias_correction))
                                 : lr / bias_correction;
    neg_clr = -clr;
  }
};

inline AdamaxCoeffs adamax_coeffs(bool maximize, double weight_decay, double beta1, double beta2,
                                  double eps) {
  return AdamaxCoeffs{maximize ? -1.0 : 1.0, weight_decay, 1.0 - beta1, beta2, eps, 0.0, beta1};
}

// As in Adam, a complex param is viewed as real after the weight decay (kFma = false).
template <typename M, bool kWeightDecay, bool kFma = true>
struct AdamaxRule {
  using Coeffs = AdamaxCoeffs;
  template <typename V>
  using WithMath = AdamaxRule<V, kWeightDecay, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 2;
  M grad_sign, weight_decay, beta2, eps, neg_clr;
  LerpWeight<M> lerp;

  FO_HOST_DEVICE explicit AdamaxRule(const AdamaxCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        beta2(static_cast<M>(c.beta2)),
        eps(static_cast<M>(c.eps)),
        neg_clr(static_cast<M>(c.neg_clr)),
        lerp(c.one_minus_beta1) {}

  // state[0]: exp_avg, state[1]: exp_inf
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& exp_avg = state[0];
    M& exp_inf = state[1];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay) {
      g = madd_<kFma>(p, weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    exp_avg = lerp(exp_avg, g);             // exp_avg.lerp_(grad, 1 - beta1)
    // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf): NaN wins
    exp_inf = maximum_(exp_inf * beta2, abs_(g) + eps);
    p = p + (neg_clr * exp_avg) / exp_inf;  // param.addcdiv_(exp_avg, exp_inf, value=-clr)
  }
};

// ---------------------------------------------------------------------------------------
// Adadelta (torch.optim.Adadelta): L2 weight decay, maximize. The step counter is only
// counted, never used.
// ---------------------------------------------------------------------------------------
struct AdadeltaCoeffs {  // as double
  double grad_sign, weight_decay, rho, one_minus_rho, eps, neg_lr;
  // alpha=-lr in torch's for-loop; a Tensor lr becomes that Scalar exactly.
  FO_HOST_DEVICE void at(double lr, bool /*lr_is_f32*/, double /*step*/) { neg_lr = -lr; }
};

inline AdadeltaCoeffs adadelta_coeffs(bool maximize, double weight_decay, double rho, double eps) {
  return AdadeltaCoeffs{maximize ? -1.0 : 1.0, weight_decay, rho, 1.0 - rho, eps, 0.0};
}

// torch's Adadelta takes real views of the state and grad only, after the weight decay, and
// adds the complex delta to the complex param: both are complex arithmetic there, with
// unfused multiply-adds (kFma = false), as in SGD.
template <typename M, bool kWeightDecay, bool kFma = true>
struct AdadeltaRule {
  using Coeffs = AdadeltaCoeffs;
  template <typename V>
  using WithMath = AdadeltaRule<V, kWeightDecay, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 2;
  M grad_sign, weight_decay, rho, one_minus_rho, eps, neg_lr;

  FO_HOST_DEVICE explicit AdadeltaRule(const AdadeltaCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        rho(static_cast<M>(c.rho)),
        one_minus_rho(static_cast<M>(c.one_minus_rho)),
        eps(static_cast<M>(c.eps)),
        neg_lr(static_cast<M>(c.neg_lr)) {}

  // state[0]: square_avg, state[1]: acc_delta
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& square_avg = state[0];
    M& acc_delta = state[1];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay) {
      g = madd_<kFma>(p, weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    square_avg = fma_(one_minus_rho * g, g, square_avg * rho);  // .mul_(rho).addcmul_
    const M std = sqrt_(square_avg + eps);                      // square_avg.add(eps).sqrt_()
    M delta = sqrt_(acc_delta + eps);                           // acc_delta.add(eps).sqrt_()
    delta = (delta / std) * g;                                  // delta.div_(std).mul_(grad)
    acc_delta = fma_(one_minus_rho * delta, delta, acc_delta * rho);  // .mul_(rho).addcmul_
    p = madd_<kFma>(delta, neg_lr, p);                          // param.add_(delta, alpha=-lr)
  }
};

// ---------------------------------------------------------------------------------------
// NAdam (torch.optim.NAdam): L2 or decoupled weight decay, momentum decay, maximize. Each
// param's step and its `mu_product`, a 0-dim state tensor the kernel updates on the host
// (Note [scalar states] in plan.h), set the two step sizes, so they are per tensor.
// ---------------------------------------------------------------------------------------
struct NadamCoeffs {  // as double
  double grad_sign, weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2, eps;
  double bias_correction2, grad_step, exp_avg_step;  // per tensor
  double beta1, momentum_decay;
  // Per tensor, set before at(): the param's mu_product after this step's update.
  double mu_product;

  // mu at a step: beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay))), in double.
  FO_HOST_DEVICE double mu(double step) const {
    return beta1 * (1.0 - 0.5 * pow_(0.96, step * momentum_decay));
  }
  // `mu_product *= mu` on the 0-dim tensor: in its math type, float unless it is float64,
  // mu rounded to that first (torch's multiply by a Python scalar); the caller rounds the
  // product to the tensor's dtype.
  FO_HOST_DEVICE double next_mu_product(double mu_product_before, bool in_float,
                                        double step) const {
    return in_float ? static_cast<double>(static_cast<float>(mu_product_before) *
                                          static_cast<float>(mu(step)))
                    : mu_product_before * mu(step);
  }

  FO_HOST_DEVICE void at(double lr, bool lr_is_f32, double step) {
    // 1 - lr * weight_decay, in lr's dtype for a Tensor lr (as Adam's).
    decay_factor = lr_is_f32 ? static_cast<double>(1.0f - static_cast<float>(lr) *
                                                              static_cast<float>(weight_decay))
                             : 1.0 - lr * weight_decay;
    bias_correction2 = 1.0 - pow_(beta2, step);
    const double mu_t = mu(step);
    const double mu_next = mu(step + 1.0);
    // mu_product_next = _get_value(mu_product) * mu_next: a Python float.
    const double mu_product_next = mu_product * mu_next;
    if (lr_is_f32) {
      // -lr * (1.0 - mu) / (1.0 - mu_product) and (-lr * mu_next) / (1.0 - mu_product_next)
      // with a float32 Tensor lr: float32 tensor ops, each Python float rounded to float.
      const float neg_lr = -static_cast<float>(lr);
      grad_step = static_cast<double>((neg_lr * static_cast<float>(1.0 - mu_t)) /
                                      static_cast<float>(1.0 - mu_product));
      exp_avg_step = static_cast<double>((neg_lr * static_cast<float>(mu_next)) /
                                         static_cast<float>(1.0 - mu_product_next));
    } else {
      grad_step = -lr * (1.0 - mu_t) / (1.0 - mu_product);
      exp_avg_step = (-lr * mu_next) / (1.0 - mu_product_next);
    }
  }
};

inline NadamCoeffs nadam_coeffs(bool maximize, double weight_decay, double beta1, double beta2,
                                double eps, double momentum_decay) {
  NadamCoeffs c{};
  c.grad_sign = maximize ? -1.0 : 1.0;
  c.weight_decay = weight_decay;
  c.one_minus_beta1 = 1.0 - beta1;
  c.beta2 = beta2;
  c.one_minus_beta2 = 1.0 - beta2;
  c.eps = eps;
  c.beta1 = beta1;
  c.momentum_decay = momentum_decay;
  c.mu_product = 1.0;
  return c;
}

// torch's NAdam takes the real view of a complex param before anything else: real
// arithmetic throughout (no kFma = false variant).
template <typename M, WeightDecay kWeightDecay, bool kFma = true>
struct NadamRule {
  using Coeffs = NadamCoeffs;
  template <typename V>
  using WithMath = NadamRule<V, kWeightDecay, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 2;
  M grad_sign, weight_decay, decay_factor, beta2, one_minus_beta2, eps;
  M bias_correction2, inv_bias_correction2, grad_step, exp_avg_step;
  LerpWeight<M> lerp;

  FO_HOST_DEVICE explicit NadamRule(const NadamCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        decay_factor(static_cast<M>(c.decay_factor)),
        beta2(static_cast<M>(c.beta2)),
        one_minus_beta2(static_cast<M>(c.one_minus_beta2)),
        eps(static_cast<M>(c.eps)),
        bias_correction2(static_cast<M>(c.bias_correction2)),
        inv_bias_correction2(M(1.0f) / bias_correction2),
        grad_step(static_cast<M>(c.grad_step)),
        exp_avg_step(static_cast<M>(c.exp_avg_step)),
        lerp(c.one_minus_beta1) {}

  // state[0]: exp_avg, state[1]: exp_avg_sq
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& exp_avg = state[0];
    M& exp_avg_sq = state[1];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay == WeightDecay::kDecoupled) {
      p = p * decay_factor;                 // param.mul_(1 - lr * weight_decay)
    } else if constexpr (kWeightDecay == WeightDecay::kL2) {
      g = fma_(p, weight_decay, g);         // grad.add(param, alpha=weight_decay)
    }
    exp_avg = lerp(exp_avg, g);             // exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq = fma_(one_minus_beta2 * g, g, exp_avg_sq * beta2);  // .mul_(b2).addcmul_
    // exp_avg_sq.div(bias_correction2).sqrt(), then .add_(eps)
    const M denom =
        sqrt_(div_by_bias_correction_(exp_avg_sq, bias_correction2, inv_bias_correction2)) + eps;
    p = p + (grad_step * g) / denom;        // param.addcdiv_(grad, denom, value=...)
    p = p + (exp_avg_step * exp_avg) / denom;  // param.addcdiv_(exp_avg, denom, value=...)
  }
};

// ---------------------------------------------------------------------------------------
// RAdam (torch.optim.RAdam): L2 or decoupled weight decay, maximize. Each param's step
// decides whether its update is rectified (rho_t > 5) and sets the bias corrections, so
// those are per tensor.
// ---------------------------------------------------------------------------------------
struct RadamCoeffs {  // as double
  double grad_sign, weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2, eps, lr;
  double bias_correction1, bias_correction2_sqrt, rect;  // per tensor
  bool rectified;                                        // per tensor: rho_t > 5
  double beta1;

  FO_HOST_DEVICE void at(double lr_, bool lr_is_f32, double step) {
    // `bias_corrected_exp_avg * lr` takes lr as it is (a float32 Tensor lr's value is
    // exact in the math type); 1 - lr * weight_decay in lr's dtype (as Adam's).
    lr = lr_;
    decay_factor = lr_is_f32 ? static_cast<double>(1.0f - static_cast<float>(lr_) *
                                                              static_cast<float>(weight_decay))
                             : 1.0 - lr_ * weight_decay;
    bias_correction1 = 1.0 - pow_(beta1, step);
    const double bias_correction2 = 1.0 - pow_(beta2, step);
    const double rho_inf = 2 / (1 - beta2) - 1;
    const double rho_t = rho_inf - 2 * step * pow_(beta2, step) / bias_correction2;
    rectified = rho_t > 5.0;
    rect = pow_((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.5);
    bias_correction2_sqrt = pow_(bias_correction2, 0.5);
  }
};

inline RadamCoeffs radam_coeffs(bool maximize, double weight_decay, double beta1, double beta2,
                                double eps) {
  RadamCoeffs c{};
  c.grad_sign = maximize ? -1.0 : 1.0;
  c.weight_decay = weight_decay;
  c.one_minus_beta1 = 1.0 - beta1;
  c.beta2 = beta2;
  c.one_minus_beta2 = 1.0 - beta2;
  c.eps = eps;
  c.beta1 = beta1;
  return c;
}

// torch's RAdam takes the real view of a complex param before anything else: real
// arithmetic throughout.
template <typename M, WeightDecay kWeightDecay, bool kFma = true>
struct RadamRule {
  using Coeffs = RadamCoeffs;
  template <typename V>
  using WithMath = RadamRule<V, kWeightDecay, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 2;
  M grad_sign, weight_decay, decay_factor, beta2, one_minus_beta2, eps, lr;
  M bias_correction1, bias_correction2_sqrt, rect;
  bool rectified;
  LerpWeight<M> lerp;

  FO_HOST_DEVICE explicit RadamRule(const RadamCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        decay_factor(static_cast<M>(c.decay_factor)),
        beta2(static_cast<M>(c.beta2)),
        one_minus_beta2(static_cast<M>(c.one_minus_beta2)),
        eps(static_cast<M>(c.eps)),
        lr(static_cast<M>(c.lr)),
        bias_correction1(static_cast<M>(c.bias_correction1)),
        bias_correction2_sqrt(static_cast<M>(c.bias_correction2_sqrt)),
        rect(c.rectified ? static_cast<M>(c.rect) : M(1.0f)),
        rectified(c.rectified),
        lerp(c.one_minus_beta1) {}

  // state[0]: exp_avg, state[1]: exp_avg_sq
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& exp_avg = state[0];
    M& exp_avg_sq = state[1];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay == WeightDecay::kDecoupled) {
      p = p * decay_factor;                   // param.mul_(1 - lr * weight_decay)
    } else if constexpr (kWeightDecay == WeightDecay::kL2) {
      g = fma_(p, weight_decay, g);           // grad.add(param, alpha=weight_decay)
    }
    exp_avg = lerp(exp_avg, g);               // exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq = fma_(one_minus_beta2 * g, g, exp_avg_sq * beta2);  // .mul_(b2).addcmul_
    const M update = (exp_avg / bias_correction1) * lr;  // bias_corrected_exp_avg * lr
    // Rectified: (bias_correction2 ** 0.5) / exp_avg_sq.sqrt().add_(eps) (a Python float
    // divided by a tensor is the tensor's reciprocal times the float: Tensor.__rtruediv__),
    // then param.add_(bias_corrected_exp_avg * lr * adaptive_lr * rect, alpha=-1.0).
    // Unrectified: param.add_(bias_corrected_exp_avg * lr, alpha=-1.0), which is the same
    // with adaptive_lr and rect 1 (x * 1 is x, bit for bit, NaN and -0 included). A select
    // on bits, not a branch: with a branch here GCC left the float loops with weight
    // decay, and the bfloat16 loops without AVX512-BF16, scalar (7-9x slower, found
    // 2026-12-07; a ternary still left two of them scalar on AVX2: invariant_select_).
    const M rectified_lr = (M(1.0f) / (sqrt_(exp_avg_sq) + eps)) * bias_correction2_sqrt;
    const M adaptive_lr = invariant_select_(rectified, rectified_lr, M(1.0f));
    p = p - (update * adaptive_lr) * rect;
  }
};

// ---------------------------------------------------------------------------------------
// Rprop (torch.optim.Rprop): etas, step size bounds, maximize. lr is only the initial
// step size (made with the state); the step counter is only counted.
// ---------------------------------------------------------------------------------------
struct RpropCoeffs {  // as double
  double grad_sign, etaminus, etaplus, step_size_min, step_size_max;
  FO_HOST_DEVICE void at(double /*lr*/, bool /*lr_is_f32*/, double /*step*/) {}
};

inline RpropCoeffs rprop_coeffs(bool maximize, double etaminus, double etaplus,
                                double step_size_min, double step_size_max) {
  return RpropCoeffs{maximize ? -1.0 : 1.0, etaminus, etaplus, step_size_min, step_size_max};
}

// Note [Rprop's selects]
// The rule chooses per element (by the sign of grad * prev): each choice is if_less_, a
// comparison and a select, so the vector loops run it too (16-bit params with AVX2 or
// AVX-512), with the scalar loop's bits. Every choice being a comparison, NaN goes where
// torch sends it: torch.sign(NaN) is 0, so a NaN product takes the factor 1, and a NaN grad
// moves nothing but stays in `prev`. torch's complex Rprop works on real views: real
// arithmetic throughout.
template <typename M, bool kFma = true>
struct RpropRule {
  using Coeffs = RpropCoeffs;
  template <typename V>
  using WithMath = RpropRule<V, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 2;
  M grad_sign, etaminus, step_size_min, step_size_max;
  M held, flipped;  // the sign factors where grad * prev > 0 and < 0 (Note [Rprop's etas])

  // Note [Rprop's etas]
  // torch writes the etas into the sign tensor (of the grad's dtype, so rounded to it) one
  // assignment after the other: sign[sign > 0] = etaplus, sign[sign < 0] = etaminus,
  // sign[sign == 0] = 1, and then zeroes the grads where sign == etaminus. Each assignment
  // sees the ones before, so where the etas, rounded, are not 0 < etaminus < 1 < etaplus,
  // the factors collide: an etaplus below 0 becomes etaminus, a factor of 0 becomes 1, and
  // every element whose factor equals etaminus has its grad zeroed (all of them where
  // etaminus rounds to 1, none where it rounds to 0). The constructor's range lets some
  // such etas through, made so by the rounding alone (etaminus=0.999999999 is 1 in
  // float32, 1e-50 is 0), and a param group can hold any. So the factors of the three
  // cases are worked out here, as the assignments leave them, and the grad is zeroed where
  // the factor equals etaminus, as torch compares. With the etas in range, the same bits
  // as before: etaplus, etaminus and 1, and zeroed where grad * prev < 0.
  FO_HOST_DEVICE explicit RpropRule(const RpropCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        etaminus(static_cast<M>(c.etaminus)),
        step_size_min(static_cast<M>(c.step_size_min)),
        step_size_max(static_cast<M>(c.step_size_max)),
        held(M(held_factor(c))),
        flipped(M(flipped_factor(c))) {}

  // The factors in the element type (float for the vector types), rounded as torch's
  // sign tensor rounds them.
  using S = typename ScalarOf<M>::type;
  static FO_HOST_DEVICE S held_factor(const RpropCoeffs& c) {
    S f = static_cast<S>(c.etaplus);
    if (f < S(0.0)) f = static_cast<S>(c.etaminus);  // sign[sign < 0] = etaminus sees it too
    return f == S(0.0) ? S(1.0) : f;                   // sign[sign == 0] = 1 (-0 included)
  }
  static FO_HOST_DEVICE S flipped_factor(const RpropCoeffs& c) {
    const S f = static_cast<S>(c.etaminus);
    return f == S(0.0) ? S(1.0) : f;
  }

  // torch.sign: 1, -1, or +0 (for +-0 and NaN).
  static FO_HOST_DEVICE FO_INLINE M sign(M x) {
    return if_less_(M(0.0), x, M(1.0), if_less_(x, M(0.0), M(-1.0), M(0.0)));
  }

  // state[0]: prev, state[1]: step_size
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& prev = state[0];
    M& step_size = state[1];
    g = negated_if_(grad_sign, g);
    // sign = grad.mul(prev).sign(); sign[sign > 0] = etaplus; sign[sign < 0] = etaminus;
    // sign[sign == 0] = 1. sign(x) > 0 exactly where x > 0, and < 0 where x < 0 (NaN: 0),
    // so each choice compares x itself: a select of a select made GCC's vectorized loop
    // rebuild the masks bit by bit with scalar code (Rprop at 68% of the limit on an AMD
    // EPYC, Zen 4).
    const M x = g * prev;
    const M factor = if_less_(M(0.0), x, held, if_less_(x, M(0.0), flipped, M(1.0)));
    // step_size.mul_(sign).clamp_(step_size_min, step_size_max): min(max(x, lo), hi)
    M size = step_size * factor;
    size = if_less_(size, step_size_min, step_size_min, size);
    step_size = if_less_(step_size_max, size, step_size_max, size);
    g = if_equal_(factor, etaminus, M(0.0), g);  // grad[sign.eq(etaminus)] = 0
    p = fma_(-sign(g), step_size, p);    // param.addcmul_(grad.sign(), step_size, value=-1)
    prev = g;                            // prev.copy_(grad)
  }
};

// ---------------------------------------------------------------------------------------
// ASGD (torch.optim.ASGD): L2 weight decay, maximize, averaging. Each param's `eta` and
// `mu`, 0-dim state tensors the kernel reads and then updates on the host (Note [scalar
// states] in plan.h), set its step size and whether it averages, so they are per tensor.
// ---------------------------------------------------------------------------------------
struct AsgdCoeffs {  // as double
  double grad_sign, weight_decay, lambd, alpha, t0;
  // Per tensor, set before at(): the param's eta and mu as this step reads them (before
  // their update), as Python floats.
  double eta, mu;
  double decay, neg_eta, average;  // per tensor; average: mu != 1 (1.0 or 0.0)

  FO_HOST_DEVICE void at(double /*lr*/, bool /*lr_is_f32*/, double /*step*/) {
    decay = 1.0 - lambd * eta;  // param.mul_(1 - lambd * eta_value)
    neg_eta = -eta;             // param.add_(grad, alpha=-eta_value)
    average = mu != 1.0 ? 1.0 : 0.0;
  }
  // eta after a step: lr / ((1 + lambd * lr * step) ** alpha), Python floats, or for a
  // float32 Tensor lr float32 tensor ops (Note [Tensor lr]), where torch's pow of a float
  // by a Python float is the double pow of the two, rounded (measured: 7,164 cases, no
  // difference). Not mirrored: torch's pow kernel computes some exponents otherwise; for
  // alpha = 0.5 it takes its sqrt (MKL's, not correctly rounded on x86: measured 1 ulp
  // off the IEEE sqrt at lr 0.01, lambd 0.1, step 6), so with a float32 Tensor lr and
  // alpha 0.5 eta can differ by an ulp of float32 (and likewise 2, 3, -0.5, -1, -2).
  double next_eta(double lr, bool lr_is_f32, double step) const {
    if (lr_is_f32) {
      const float lr_f = static_cast<float>(lr);
      const float base = 1.0f + (static_cast<float>(lambd) * lr_f) * static_cast<float>(step);
      return static_cast<double>(lr_f /
                                 static_cast<float>(std::pow(static_cast<double>(base), alpha)));
    }
    return lr / std::pow(1.0 + lambd * lr * step, alpha);
  }
  // mu after a step: 1 / max(1, step - t0).
  double next_mu(double step) const {
    const double d = step - t0;
    return 1.0 / (d > 1.0 ? d : 1.0);
  }
};

inline AsgdCoeffs asgd_coeffs(bool maximize, double weight_decay, double lambd, double alpha,
                              double t0) {
  AsgdCoeffs c{};
  c.grad_sign = maximize ? -1.0 : 1.0;
  c.weight_decay = weight_decay;
  c.lambd = lambd;
  c.alpha = alpha;
  c.t0 = t0;
  return c;
}

// torch's ASGD takes the real view of a complex param before the weight decay: real
// arithmetic throughout.
template <typename M, bool kWeightDecay, bool kFma = true>
struct AsgdRule {
  using Coeffs = AsgdCoeffs;
  template <typename V>
  using WithMath = AsgdRule<V, kWeightDecay, kFma>;
  static constexpr bool kFmaVariant = kFma;  // (false: complex params' variant)
  static constexpr int kStates = 1;
  M grad_sign, weight_decay, decay, neg_eta, mu;
  bool average;

  FO_HOST_DEVICE explicit AsgdRule(const AsgdCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        weight_decay(static_cast<M>(c.weight_decay)),
        decay(static_cast<M>(c.decay)),
        neg_eta(static_cast<M>(c.neg_eta)),
        mu(static_cast<M>(c.mu)),
        average(c.average != 0.0) {}

  // state[0]: ax
  FO_HOST_DEVICE FO_INLINE void operator()(M& p, M g, M* state) const {
    M& ax = state[0];
    g = negated_if_(grad_sign, g);
    if constexpr (kWeightDecay) {
      g = fma_(p, weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    p = p * decay;                   // param.mul_(1 - lambd * eta)
    p = fma_(g, neg_eta, p);         // param.add_(grad, alpha=-eta)
    if (average) {
      ax = ax + (p - ax) * mu;       // ax.add_(param.sub(ax).mul_(mu))
    } else {
      ax = p;                        // ax.copy_(param)
    }
  }
};

// ---- SparseAdam -------------------------------------------------------------------------
// Note [sparse adam]
// torch's SparseAdam is op-by-op tensor code on the touched elements (the values of the
// coalesced sparse grad): each intermediate is a tensor of the param's dtype, so every
// operation below rounds to it (`r`: the identity for float and double, a rounding for
// bfloat16 and float16, whose ops torch computes in float). Its scalars are Python floats,
// converted as a tensor op converts them: to float for float and 16-bit tensors, kept as
// double for double ones (M); torch's CPU add, though, rounds its Python-float operand to a
// 16-bit tensor's dtype first, so eps is that rounding there (cpu/sparse_adam.cpp). The step size is computed per param on the host, in double,
// as torch does (lr * sqrt(1 - beta2**step) / (1 - beta1**step)). No fma anywhere: torch
// runs separate ops.
template <typename M>
struct SparseAdamCoeffs {
  M one_minus_beta1, one_minus_beta2, eps, neg_step_size;
};

template <typename M>
struct SparseAdamRule {
  // g: the coalesced grad value (negated under maximize); p, exp_avg, exp_avg_sq in place.
  template <typename Round>
  FO_HOST_DEVICE FO_INLINE static void apply(M& p, M& exp_avg, M& exp_avg_sq, M g,
                                             const SparseAdamCoeffs<M>& c, Round r) {
    const M old_exp_avg = exp_avg;
    const M old_exp_avg_sq = exp_avg_sq;
    const M avg_update = r(r(g - old_exp_avg) * c.one_minus_beta1);  // grad.sub(old).mul_(1 - b1)
    exp_avg = r(old_exp_avg + avg_update);                           // exp_avg.add_(sparse)
    const M sq_update = r(r(r(g * g) - old_exp_avg_sq) * c.one_minus_beta2);  // pow(2).sub_.mul_
    exp_avg_sq = r(old_exp_avg_sq + sq_update);
    const M numer = r(avg_update + old_exp_avg);                     // .add_(old_exp_avg_values)
    const M denom = r(r(sqrt_(r(sq_update + old_exp_avg_sq))) + c.eps);  // .add_(old).sqrt_().add_(eps)
    p = r(p + r(c.neg_step_size * r(numer / denom)));  // param.add_(-step_size * numer.div_(denom))
  }
};

// ---------------------------------------------------------------------------------------
// Adafactor (torch.optim.Adafactor): factored second moments for params of 2+ dims, a
// full one for the others, update clipping by RMS (d), a relative step size, decoupled
// weight decay, maximize. Its update needs three reductions per param (the row and column
// means of g*g, the RMS of the param and of the unclipped update), so it is not one rule
// per element: cpu/adafactor.cpp runs it as passes (Note [Adafactor's passes] there).
// What is per element lives here, as torch's for-loop computes it.
// ---------------------------------------------------------------------------------------
struct AdafactorCoeffs {  // per tensor, as double (Note [per-step coefficients])
  double grad_sign;
  double one_minus_beta2;  // step ** beta2_decay: the lerp weight of the second moments
  double eps1;             // clamp of the row factor's mean
  double eps1_sq;          // eps1 * eps1: clamp of the variance estimate
  double decay;            // 1 - lr * weight_decay
  double step_scale;       // -alpha / denom (set after the RMS of the update is known)
};

template <typename M>
struct AdafactorRule {
  M grad_sign, eps1, eps1_sq, decay, step_scale;
  LerpWeight<M> lerp;

  FO_HOST_DEVICE explicit AdafactorRule(const AdafactorCoeffs& c)
      : grad_sign(static_cast<M>(c.grad_sign)),
        eps1(static_cast<M>(c.eps1)),
        eps1_sq(static_cast<M>(c.eps1_sq)),
        decay(static_cast<M>(c.decay)),
        step_scale(static_cast<M>(c.step_scale)),
        lerp(c.one_minus_beta2) {}

  // The mean of squares of `count` elements from their sum of squares `sum`, as
  // torch.norm(grad, dim=...).square_().div_(count): the norm rounded to M, squared, divided.
  FO_HOST_DEVICE FO_INLINE static M mean_of_squares(double sum, double count) {
    const M norm = static_cast<M>(sqrt_(sum));
    return (norm * norm) / static_cast<M>(count);
  }
  // row_var.lerp_(row_mean, one_minus_beta2_t) (and col_var's).
  FO_HOST_DEVICE FO_INLINE M factor(M old, M mean) const { return lerp(old, mean); }
  // row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1), from the mean.
  FO_HOST_DEVICE FO_INLINE M clamp_row_mean(M mean) const { return maximum_(mean, eps1); }
  // variance.lerp_(grad * grad, one_minus_beta2_t) (params of fewer than 2 dims).
  FO_HOST_DEVICE FO_INLINE M variance(M old, M g) const {
    g = negated_if_(grad_sign, g);  // grad = -grad under maximize (a sign flip)
    return lerp(old, g * g);
  }
  // The unclipped update from the variance estimate:
  // var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad).
  FO_HOST_DEVICE FO_INLINE M update(M var_estimate, M g) const {
    const M v = maximum_(var_estimate, eps1_sq);
    return (M(1) / sqrt_(v)) * negated_if_(grad_sign, g);
  }
  // The unclipped update's square, g^2 / max(estimate, eps1^2), for its RMS (Note
  // [Adafactor's update RMS] in cpu/adafactor.cpp): no square root.
  FO_HOST_DEVICE FO_INLINE M update_squared(M var_estimate, M g) const {
    return (g * g) / maximum_(var_estimate, eps1_sq);
  }
  // The factored variance estimate of one element: (row_var @ col_var) / clamped row mean.
  FO_HOST_DEVICE FO_INLINE static M factored_estimate(M row, M col, M row_mean) {
    return (row * col) / row_mean;
  }
  // param.mul_(1 - lr * weight_decay) (if weight_decay != 0), then
  // param.add_(update, alpha=-alpha / denom).
  template <bool kDecay>
  FO_HOST_DEVICE FO_INLINE M apply(M p, M u) const {
    if constexpr (kDecay) p = p * decay;
    return fma_(u, step_scale, p);
  }
};

}  // namespace fused_optim
