// Rprop on CPU: checks, scalars, dtype dispatch. The math is RpropRule in update_rules.h;
// the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"

namespace fused_optim::cpu {
namespace {

void rprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList prevs,
               at::TensorList step_sizes, at::TensorList state_steps, double etaminus,
               double etaplus, double step_size_min, double step_size_max, bool maximize,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::rprop_";
  const bool unscale = has_tensor(grad_scale);
  const StateLists states{{"prevs", prevs}, {"step_sizes", step_sizes}};
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  check_steps(op, state_steps, plan.size());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  if (skip_step(found_inf)) return;  // after all checks; nothing has changed yet

  increment_steps(state_steps);  // counted, as torch does; Rprop's math never reads it
  run_shared(plan, rprop_coeffs(maximize, etaminus, etaplus, step_size_min, step_size_max),
             /*lr=*/0.0, inv_scale, [&](at::ScalarType dt, bool cplx) {
               return select_rprop(dt, cplx, PickSegment{unscale, plan.mixed_storage()});
             });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("rprop_", &rprop_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("rprop_", rprop_cpu);

}  // namespace fused_optim::cpu
