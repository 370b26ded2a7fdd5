// SGD on CPU: checks, scalars, flag and dtype dispatch. The math is SgdRule in
// update_rules.h; the loop and threading are in multi_tensor.h.
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cpu {
namespace {

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::sgd_";
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const auto states = sgd_state_lists(op, momentum, momentum_buffers);
  MultiTensorPlan plan(op, params, grads, states, /*grad_mutable=*/unscale,
                       c10::DeviceType::CPU, param_storage(op, param_mode, param_aux));
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  // torch's for-loop uses alpha=-lr; a Tensor lr becomes that Scalar exactly.
  lr = lr_value(op, lr, lr_tensor);
  if (skip_step(found_inf)) return;

  const Momentum mode = sgd_momentum(momentum, nesterov, is_first_step);
  run_shared(plan, sgd_coeffs(maximize, weight_decay, momentum, dampening), lr, inv_scale,
             [&](at::ScalarType dt, bool cplx) {
               return select_sgd(dt, cplx, weight_decay != 0.0, mode, PickSegment{unscale, plan.mixed_storage()});
             });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("sgd_", &sgd_cpu); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("sgd_", sgd_cpu);

}  // namespace fused_optim::cpu
