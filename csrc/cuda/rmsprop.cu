// RMSprop on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is RmspropRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cuda {
namespace {

void rmsprop_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList grad_avgs, at::TensorList momentum_buffers,
                  at::TensorList state_steps, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize,
                  const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::rmsprop_";
  const bool use_momentum = momentum > 0.0;  // as torch: `if momentum > 0`
  const auto states = rmsprop_state_lists(op, centered, use_momentum, square_avgs, grad_avgs,
                                          momentum_buffers);
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor, grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  // The step is counted, as torch does; RMSprop's math never reads it.
  const auto coeffs = call.count_step(
      rmsprop_coeffs(maximize, weight_decay, alpha, eps, momentum), /*per_step=*/false);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_rmsprop(dt, cplx, weight_decay != 0.0, centered, use_momentum,
                          PickKernel<RmspropCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("rmsprop_", &rmsprop_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("rmsprop_@cuda", rmsprop_cuda);

}  // namespace fused_optim::cuda
