// Adam and AdamW on CPU: checks, scalars, flag and dtype dispatch. The math is
// AdamRule in update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

template <WeightDecay kWD, bool kAmsgrad>
SegmentFn adam_segment_fn(at::ScalarType dtype, bool complex, bool unscale) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    using M = at::opmath_type<T>;
    if constexpr (kWD == WeightDecay::kL2 && std::is_same_v<T, M>) {
      if (complex) {  // see AdamRule: only the L2 term differs for complex params
        using Rule = AdamRule<M, kWD, kAmsgrad, /*kFma=*/false>;
        return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
      }
    }
    using Rule = AdamRule<M, kWD, kAmsgrad>;
    return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
  });
}

SegmentFn select_adam(at::ScalarType dtype, bool complex, WeightDecay wd, bool amsgrad,
                      bool unscale) {
  switch (wd) {
    case WeightDecay::kNone:
      return amsgrad ? adam_segment_fn<WeightDecay::kNone, true>(dtype, complex, unscale)
                     : adam_segment_fn<WeightDecay::kNone, false>(dtype, complex, unscale);
    case WeightDecay::kL2:
      return amsgrad ? adam_segment_fn<WeightDecay::kL2, true>(dtype, complex, unscale)
                     : adam_segment_fn<WeightDecay::kL2, false>(dtype, complex, unscale);
    case WeightDecay::kDecoupled:
      return amsgrad ? adam_segment_fn<WeightDecay::kDecoupled, true>(dtype, complex, unscale)
                     : adam_segment_fn<WeightDecay::kDecoupled, false>(dtype, complex, unscale);
  }
  TORCH_CHECK(false, "unreachable");
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize,
              bool decoupled_weight_decay, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::adam_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  std::vector<at::TensorList> states{exp_avgs, exp_avg_sqs};
  if (amsgrad) {
    states.push_back(max_exp_avg_sqs);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  }
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale);
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): torch's for-loop computes lr / bias_correction1 and
  // 1 - lr * weight_decay as tensor ops in lr's dtype; we round the same way.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::kNone
                         : decoupled_weight_decay ? WeightDecay::kDecoupled
                                                  : WeightDecay::kL2;
  AdamCoeffs base{};
  base.grad_sign = maximize ? -1.0 : 1.0;
  base.weight_decay = weight_decay;
  base.beta1 = beta1;
  base.one_minus_beta1 = 1.0 - beta1;
  base.beta2 = beta2;
  base.one_minus_beta2 = 1.0 - beta2;
  base.eps = eps;

  const std::vector<double> steps = increment_steps(state_steps);
  const int64_t n = plan.size();
  std::vector<AdamCoeffs> coeffs(n, base);
  std::vector<const void*> coeff_ptrs(n);
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0 && steps[i] == steps[i - 1]) {
      coeffs[i] = coeffs[i - 1];  // the usual case: a group's params share a step (no pows)
    } else {
      coeffs[i].at(lr, lr_is_f32, steps[i]);  // Note [per-step coefficients]
    }
    coeff_ptrs[i] = &coeffs[i];
  }
  const auto fns = segment_fns(plan, [&](at::ScalarType dt, bool cplx) {
    return select_adam(dt, cplx, wd, amsgrad, unscale);
  });
  run(plan, fns, coeff_ptrs, inv_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adam_", &adam_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adam_", adam_cpu);

}  // namespace fused_optim::cpu
