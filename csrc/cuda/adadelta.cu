// Adadelta on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is AdadeltaRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"

namespace fused_optim::cuda {
namespace {

void adadelta_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                   at::TensorList acc_deltas, at::TensorList state_steps, double lr, double rho,
                   double eps, double weight_decay, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adadelta_";
  const StateLists states{{"square_avgs", square_avgs}, {"acc_deltas", acc_deltas}};
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor,
                grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  // The step is only counted; the coefficients depend on lr alone.
  const auto coeffs = call.count_step(adadelta_coeffs(maximize, weight_decay, rho, eps),
                                      /*per_step=*/false);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_adadelta(dt, cplx, weight_decay != 0.0, PickKernel<AdadeltaCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adadelta_", &adadelta_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adadelta_@cuda", adadelta_cuda);

}  // namespace fused_optim::cuda
