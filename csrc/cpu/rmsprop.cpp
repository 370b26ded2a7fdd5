// RMSprop on CPU: checks, scalars, flag and dtype dispatch. The math is RmspropRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cpu {
namespace {

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers,
                 at::TensorList state_steps, double lr, double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::rmsprop_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const bool use_momentum = momentum > 0.0;  // as torch: `if momentum > 0`
  const auto states = rmsprop_state_lists(op, centered, use_momentum, square_avgs, grad_avgs,
                                          momentum_buffers);
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  // torch's for-loop uses alpha=-lr / value=-lr; a Tensor lr becomes that Scalar exactly.
  lr = lr_value(op, lr, lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  increment_steps(state_steps);  // counted, as torch does; RMSprop's math never reads it
  run_shared(plan, rmsprop_coeffs(maximize, weight_decay, alpha, eps, momentum), lr, inv_scale,
             [&](at::ScalarType dt, bool cplx) {
               return select_rmsprop(dt, cplx, weight_decay != 0.0, centered, use_momentum,
                                     PickSegment{unscale, plan.mixed_storage()});
             });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("rmsprop_", rmsprop_cpu);

}  // namespace fused_optim::cpu
