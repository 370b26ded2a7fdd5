// Adagrad on CPU (dense grads): checks, scalars, flag and dtype dispatch. The math is
// AdagradRule in update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

template <bool kWD>
SegmentFn adagrad_segment_fn(at::ScalarType dtype, bool complex, bool unscale) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    using M = at::opmath_type<T>;
    if constexpr (kWD && std::is_same_v<T, M>) {
      if (complex) {  // see AdagradRule: only the L2 term differs for complex params
        using Rule = AdagradRule<M, kWD, /*kFma=*/false>;
        return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
      }
    }
    using Rule = AdagradRule<M, kWD>;
    return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
  });
}

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                 double eps, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::adagrad_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  MultiTensorPlan plan(op, params, grads, {state_sums}, /*grad_mutable=*/unscale);
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): lr / decay in the lr's dtype, as torch's for-loop.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  AdagradCoeffs base{maximize ? -1.0 : 1.0, weight_decay, eps, 0.0, lr_decay};
  const std::vector<double> steps = increment_steps(state_steps);
  const int64_t n = plan.size();
  std::vector<AdagradCoeffs> coeffs(n, base);
  std::vector<const void*> coeff_ptrs(n);
  for (int64_t i = 0; i < n; ++i) {
    coeffs[i].at(lr, lr_is_f32, steps[i]);  // Note [per-step coefficients]
    coeff_ptrs[i] = &coeffs[i];
  }
  const auto fns = segment_fns(plan, [&](at::ScalarType dt, bool cplx) {
    return weight_decay != 0.0 ? adagrad_segment_fn<true>(dt, cplx, unscale)
                               : adagrad_segment_fn<false>(dt, cplx, unscale);
  });
  run(plan, fns, coeff_ptrs, inv_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adagrad_", &adagrad_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adagrad_", adagrad_cpu);

}  // namespace fused_optim::cpu
