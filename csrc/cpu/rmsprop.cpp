// RMSprop on CPU: checks, scalars, flag and dtype dispatch. The math is RmspropRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

template <bool kWD, bool kCentered, bool kMomentum>
SegmentFn rmsprop_segment_fn(at::ScalarType dtype, bool complex, bool unscale) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    using M = at::opmath_type<T>;
    if constexpr (kWD && std::is_same_v<T, M>) {
      if (complex) {  // see RmspropRule: only the L2 term differs for complex params
        using Rule = RmspropRule<M, kWD, kCentered, kMomentum, /*kFma=*/false>;
        return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
      }
    }
    using Rule = RmspropRule<M, kWD, kCentered, kMomentum>;
    return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
  });
}

template <bool kWD>
SegmentFn select_rmsprop_wd(at::ScalarType dtype, bool complex, bool centered, bool momentum,
                            bool unscale) {
  if (centered) {
    return momentum ? rmsprop_segment_fn<kWD, true, true>(dtype, complex, unscale)
                    : rmsprop_segment_fn<kWD, true, false>(dtype, complex, unscale);
  }
  return momentum ? rmsprop_segment_fn<kWD, false, true>(dtype, complex, unscale)
                  : rmsprop_segment_fn<kWD, false, false>(dtype, complex, unscale);
}

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers,
                 at::TensorList state_steps, double lr, double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::rmsprop_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const bool use_momentum = momentum > 0.0;  // as torch: `if momentum > 0`
  std::vector<at::TensorList> states{square_avgs};
  if (centered) {
    states.push_back(grad_avgs);
  } else {
    TORCH_CHECK(grad_avgs.empty(), op, ": grad_avgs must be empty unless centered");
  }
  if (use_momentum) {
    states.push_back(momentum_buffers);
  } else {
    TORCH_CHECK(momentum_buffers.empty(), op,
                ": momentum_buffers must be empty unless momentum > 0");
  }
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale);
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  // torch's for-loop uses alpha=-lr / value=-lr; a Tensor lr becomes that Scalar exactly.
  lr = lr_value(op, lr, lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  increment_steps(state_steps);  // counted, as torch does; RMSprop's math never reads it
  const RmspropCoeffs coeffs{maximize ? -1.0 : 1.0, weight_decay, alpha, 1.0 - alpha, eps,
                             momentum, -lr};
  const int64_t n = plan.size();
  const std::vector<const void*> coeff_ptrs(n, &coeffs);
  const auto fns = segment_fns(plan, [&](at::ScalarType dt, bool cplx) {
    return weight_decay != 0.0
               ? select_rmsprop_wd<true>(dt, cplx, centered, use_momentum, unscale)
               : select_rmsprop_wd<false>(dt, cplx, centered, use_momentum, unscale);
  });
  run(plan, fns, coeff_ptrs, inv_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("rmsprop_", rmsprop_cpu);

}  // namespace fused_optim::cpu
