// Adagrad on CPU (dense grads): checks, scalars, flag and dtype dispatch. The math is
// AdagradRule in update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                 double eps, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adagrad_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const StateLists states{{"state_sums", state_sums}};
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): lr / decay in the lr's dtype, as torch's for-loop.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  const AdagradCoeffs base = adagrad_coeffs(maximize, weight_decay, eps, lr_decay);
  run_per_step(plan, state_steps, base, lr, lr_is_f32, inv_scale,
               [&](at::ScalarType dt, bool cplx) {
                 return select_adagrad(dt, cplx, weight_decay != 0.0, PickSegment{unscale, plan.mixed_storage()});
               });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adagrad_", &adagrad_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adagrad_", adagrad_cpu);

}  // namespace fused_optim::cpu
