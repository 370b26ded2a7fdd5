// Adam and AdamW on CPU: checks, scalars, flag and dtype dispatch. The math is
// AdamRule in update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cpu {
namespace {

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize,
              bool decoupled_weight_decay, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adam_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const auto states = adam_state_lists(op, amsgrad, exp_avgs, exp_avg_sqs, max_exp_avg_sqs);
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): torch's for-loop computes lr / bias_correction1 and
  // 1 - lr * weight_decay as tensor ops in lr's dtype; we round the same way.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  const WeightDecay wd = adam_weight_decay(weight_decay, decoupled_weight_decay);
  const AdamCoeffs base = adam_coeffs(maximize, weight_decay, beta1, beta2, eps);
  run_per_step(plan, state_steps, base, lr, lr_is_f32, inv_scale,
               [&](at::ScalarType dt, bool cplx) {
                 return select_adam(dt, cplx, wd, amsgrad, PickSegment{unscale, plan.mixed_storage()});
               });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adam_", &adam_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adam_", adam_cpu);

}  // namespace fused_optim::cpu
