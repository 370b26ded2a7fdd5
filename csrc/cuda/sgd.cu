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
              const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::sgd_";
  const auto states = sgd_state_lists(op, momentum, momentum_buffers);
  // No steps: nothing is read on the host unless it lives there (Note [CUDA scalars]).
  CudaCall call(op, params, grads, states, std::nullopt, lr, lr_tensor, grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // no params
  const auto coeffs =
      call.count_step(sgd_coeffs(maximize, weight_decay, momentum, dampening), /*per_step=*/false);
  const Momentum mode = sgd_momentum(momentum, nesterov, is_first_step);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_sgd(dt, cplx, weight_decay != 0.0, mode, PickKernel<SgdCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("sgd_", &sgd_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("sgd_@cuda", sgd_cuda);

}  // namespace fused_optim::cuda
