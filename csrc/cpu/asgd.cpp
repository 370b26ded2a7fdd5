// ASGD on CPU: checks, scalars, flag and dtype dispatch. The math is AsgdRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cpu {
namespace {

void asgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList axs,
              at::TensorList mus, at::TensorList etas, at::TensorList state_steps, double lr,
              double lambd, double alpha, double t0, double weight_decay, bool maximize,
              const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::asgd_";
  const bool unscale = has_tensor(grad_scale);
  const StateLists states{{"axs", axs}};
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  check_scalar_states(op, "mus", mus, plan.size());
  check_scalar_states(op, "etas", etas, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  lr = lr_value(op, lr, lr_tensor);
  // Note [Tensor lr] (plan.h): the new eta in the lr's dtype, as torch's for-loop.
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  const std::vector<AsgdCoeffs> coeffs =
      asgd_step_coeffs(asgd_coeffs(maximize, weight_decay, lambd, alpha, t0), lr, lr_is_f32,
                       has_tensor(lr_tensor), increment_steps(state_steps), etas, mus);
  run_each(plan, coeffs, inv_scale, [&](at::ScalarType dt, bool cplx) {
    return select_asgd(dt, cplx, weight_decay != 0.0, PickSegment{unscale, plan.mixed_storage()});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("asgd_", &asgd_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("asgd_", asgd_cpu);

}  // namespace fused_optim::cpu
