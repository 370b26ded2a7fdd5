// Adadelta on CPU: checks, scalars, flag and dtype dispatch. The math is AdadeltaRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

void adadelta_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList acc_deltas, at::TensorList state_steps, double lr, double rho,
                  double eps, double weight_decay, bool maximize,
                  const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adadelta_";
  const bool unscale = has_tensor(grad_scale);
  const StateLists states{{"square_avgs", square_avgs}, {"acc_deltas", acc_deltas}};
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  // torch's for-loop uses alpha=-lr; a Tensor lr becomes that Scalar exactly.
  lr = lr_value(op, lr, lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  increment_steps(state_steps);  // counted, as torch does; Adadelta's math never reads it
  run_shared(plan, adadelta_coeffs(maximize, weight_decay, rho, eps), lr, inv_scale,
             [&](at::ScalarType dt, bool cplx) {
               return select_adadelta(dt, cplx, weight_decay != 0.0, PickSegment{unscale, plan.mixed_storage()});
             });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adadelta_", &adadelta_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adadelta_", adadelta_cpu);

}  // namespace fused_optim::cpu
