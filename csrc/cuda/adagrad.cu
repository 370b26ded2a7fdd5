// Adagrad on CUDA (dense grads): the call's options and scalars. The checks and layouts are
// the CPU's (MultiTensorPlan, plan.h), the math is AdagradRule (update_rules.h), the
// launches are in cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"

namespace fused_optim::cuda {
namespace {

void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                  double eps, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::adagrad_";
  const std::optional<c10::Device> device = call_device(params);
  const c10::cuda::OptionalCUDAGuard guard(device);
  MultiTensorPlan plan(op, params, grads, {state_sums}, has_tensor(grad_scale),
                       c10::DeviceType::CUDA);
  const bool device_steps = check_steps(op, state_steps, plan.size(), device);
  if (!device.has_value()) return;  // no params
  const CallScalars sc = call_scalars(op, *device, lr, lr_tensor, grad_scale, found_inf,
                                      /*host_steps=*/!device_steps, device_steps);
  if (sc.skip) return;  // after all checks; nothing has changed yet

  const AdagradCoeffs base = adagrad_coeffs(maximize, weight_decay, eps, lr_decay);
  std::vector<AdagradCoeffs> coeffs{base};
  if (device_steps) {
    increment_device_steps(state_steps, sc.found_inf);
  } else {
    coeffs = per_step_coeffs(base, sc.lr_value, sc.lr_is_f32, increment_steps(state_steps));
  }
  launch_update(plan, coeffs, device_steps ? state_steps : at::TensorList(), sc,
                [&](at::ScalarType dt, bool cplx) {
                  return select_adagrad(dt, cplx, weight_decay != 0.0,
                                        PickKernel<AdagradCoeffs>{});
                });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adagrad_", &adagrad_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adagrad_@cuda", adagrad_cuda);

}  // namespace fused_optim::cuda
