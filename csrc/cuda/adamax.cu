// Adamax on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is AdamaxRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"

namespace fused_optim::cuda {
namespace {

void adamax_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_infs, at::TensorList state_steps, double lr, double beta1,
                 double beta2, double weight_decay, double eps, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adamax_";
  const StateLists states{{"exp_avgs", exp_avgs}, {"exp_infs", exp_infs}};
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor, grad_scale,
                found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const auto coeffs = call.count_step(adamax_coeffs(maximize, weight_decay, beta1, beta2, eps),
                                      /*per_step=*/true);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_adamax(dt, cplx, weight_decay != 0.0, PickKernel<AdamaxCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adamax_", &adamax_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adamax_@cuda", adamax_cuda);

}  // namespace fused_optim::cuda
