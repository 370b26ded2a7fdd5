// SGD on CPU: checks, scalars, flag and dtype dispatch. The math is SgdRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

template <bool kWD, Momentum kMomentum>
SegmentFn sgd_segment_fn(at::ScalarType dtype, bool complex, bool unscale) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    using M = at::opmath_type<T>;
    if (complex) {  // only float and double have complex counterparts
      if constexpr (std::is_same_v<T, M>) {
        using Rule = SgdRule<M, kWD, kMomentum, /*kFma=*/false>;
        return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
      }
    }
    using Rule = SgdRule<M, kWD, kMomentum>;
    return unscale ? pick_segment_fn<T, true, Rule>() : pick_segment_fn<T, false, Rule>();
  });
}

template <bool kWD>
SegmentFn select_sgd_momentum(at::ScalarType dtype, bool complex, Momentum momentum,
                              bool unscale) {
  switch (momentum) {
    case Momentum::kNone: return sgd_segment_fn<kWD, Momentum::kNone>(dtype, complex, unscale);
    case Momentum::kFirstStep:
      return sgd_segment_fn<kWD, Momentum::kFirstStep>(dtype, complex, unscale);
    case Momentum::kFirstStepNesterov:
      return sgd_segment_fn<kWD, Momentum::kFirstStepNesterov>(dtype, complex, unscale);
    case Momentum::kUpdate: return sgd_segment_fn<kWD, Momentum::kUpdate>(dtype, complex, unscale);
    case Momentum::kUpdateNesterov:
      return sgd_segment_fn<kWD, Momentum::kUpdateNesterov>(dtype, complex, unscale);
  }
  TORCH_CHECK(false, "unreachable");
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::sgd_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  std::vector<at::TensorList> states;
  if (momentum != 0.0) {
    states.push_back(momentum_buffers);
  } else {
    TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty when momentum is 0");
  }
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale);
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  // torch's for-loop uses alpha=-lr; a Tensor lr becomes that Scalar exactly.
  lr = lr_value(op, lr, lr_tensor);
  if (skip_step(found_inf)) return;

  const Momentum mode = momentum == 0.0 ? Momentum::kNone
                        : is_first_step ? (nesterov ? Momentum::kFirstStepNesterov : Momentum::kFirstStep)
                        : (nesterov ? Momentum::kUpdateNesterov : Momentum::kUpdate);
  const SgdCoeffs coeffs{maximize ? -1.0 : 1.0, weight_decay, momentum, 1.0 - dampening, -lr};
  const int64_t n = plan.size();
  const std::vector<const void*> coeff_ptrs(n, &coeffs);
  const auto fns = segment_fns(plan, [&](at::ScalarType dt, bool cplx) {
    return weight_decay != 0.0 ? select_sgd_momentum<true>(dt, cplx, mode, unscale)
                               : select_sgd_momentum<false>(dt, cplx, mode, unscale);
  });
  run(plan, fns, coeff_ptrs, inv_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("sgd_", &sgd_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("sgd_", sgd_cpu);

}  // namespace fused_optim::cpu
