// NAdam on CPU: checks, scalars, flag and dtype dispatch. The math is NadamRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cpu {
namespace {

void nadam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList mu_products,
               at::TensorList state_steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, double momentum_decay,
               bool decoupled_weight_decay, bool maximize,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::nadam_";
  const bool unscale = has_tensor(grad_scale);
  const StateLists states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  check_scalar_states(op, "mu_products", mu_products, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): the step sizes and 1 - lr * weight_decay in the lr's dtype.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  const WeightDecay wd = adam_weight_decay(weight_decay, decoupled_weight_decay);
  const std::vector<NadamCoeffs> coeffs =
      nadam_step_coeffs(nadam_coeffs(maximize, weight_decay, beta1, beta2, eps, momentum_decay),
                        lr, lr_is_f32, increment_steps(state_steps), mu_products);
  run_each(plan, coeffs, inv_scale, [&](at::ScalarType dt, bool cplx) {
    return select_nadam(dt, cplx, wd, PickSegment{unscale, plan.mixed_storage()});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("nadam_", &nadam_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("nadam_", nadam_cpu);

}  // namespace fused_optim::cpu
