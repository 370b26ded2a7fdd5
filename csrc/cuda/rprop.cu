// Rprop on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is RpropRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"

namespace fused_optim::cuda {
namespace {

void rprop_cuda(at::TensorList params, at::TensorList grads, at::TensorList prevs,
                at::TensorList step_sizes, at::TensorList state_steps, double etaminus,
                double etaplus, double step_size_min, double step_size_max, bool maximize,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::rprop_";
  // lr is only Rprop's initial step size: the kernel has none.
  const StateLists states{{"prevs", prevs}, {"step_sizes", step_sizes}};
  CudaCall call(op, params, grads, states, state_steps, /*lr=*/0.0,
                /*lr_tensor=*/std::nullopt, grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  // The step is only counted; the coefficients are the options'.
  const auto coeffs = call.count_step(
      rprop_coeffs(maximize, etaminus, etaplus, step_size_min, step_size_max), /*per_step=*/false);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_rprop(dt, cplx, PickKernel<RpropCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("rprop_", &rprop_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("rprop_@cuda", rprop_cuda);

}  // namespace fused_optim::cuda
