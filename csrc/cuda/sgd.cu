// SGD on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is SgdRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cuda {
namespace {

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::sgd_";
  const auto states = sgd_state_lists(op, momentum, momentum_buffers);
  const std::optional<c10::Device> device = call_device(params);
  const c10::cuda::OptionalCUDAGuard guard(device);
  MultiTensorPlan plan(op, params, grads, states, has_tensor(grad_scale), c10::DeviceType::CUDA);
  if (!device.has_value()) return;  // no params
  // No steps: nothing is read on the host unless it lives there (Note [CUDA scalars]).
  const CallScalars sc = call_scalars(op, *device, lr, lr_tensor, grad_scale, found_inf,
                                      /*host_steps=*/false, /*steps_on_device=*/false);

  SgdCoeffs coeffs = sgd_coeffs(maximize, weight_decay, momentum, dampening);
  coeffs.at(sc.lr_value, false, 0.0);
  const Momentum mode = sgd_momentum(momentum, nesterov, is_first_step);
  launch_update(plan, std::vector<SgdCoeffs>{coeffs}, at::TensorList(), sc,
                [&](at::ScalarType dt, bool cplx) {
                  return select_sgd(dt, cplx, weight_decay != 0.0, mode, PickKernel<SgdCoeffs>{});
                });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("sgd_", &sgd_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("sgd_@cuda", sgd_cuda);

}  // namespace fused_optim::cuda
