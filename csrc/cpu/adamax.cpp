// Adamax on CPU: checks, scalars, flag and dtype dispatch. The math is AdamaxRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

void adamax_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_infs, at::TensorList state_steps, double lr, double beta1,
                double beta2, double weight_decay, double eps, bool maximize,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adamax_";
  const bool unscale = has_tensor(grad_scale);
  const StateLists states{{"exp_avgs", exp_avgs}, {"exp_infs", exp_infs}};
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): lr / bias_correction in the lr's dtype, as torch's for-loop.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  run_per_step(plan, state_steps, adamax_coeffs(maximize, weight_decay, beta1, beta2, eps), lr,
               lr_is_f32, inv_scale, [&](at::ScalarType dt, bool cplx) {
                 return select_adamax(dt, cplx, weight_decay != 0.0, PickSegment{unscale, plan.mixed_storage()});
               });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adamax_", &adamax_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adamax_", adamax_cpu);

}  // namespace fused_optim::cpu
