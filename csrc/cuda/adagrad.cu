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
                  const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adagrad_";
  const StateLists states{{"state_sums", state_sums}};
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor, grad_scale,
                found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const auto coeffs = call.count_step(adagrad_coeffs(maximize, weight_decay, eps, lr_decay),
                                      /*per_step=*/true);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_adagrad(dt, cplx, weight_decay != 0.0, PickKernel<AdagradCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adagrad_", &adagrad_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adagrad_@cuda", adagrad_cuda);

}  // namespace fused_optim::cuda
