// ASGD on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is AsgdRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cuda {
namespace {

void asgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList axs,
               at::TensorList mus, at::TensorList etas, at::TensorList state_steps, double lr,
               double lambd, double alpha, double t0, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::asgd_";
  CudaCall call(op, params, grads, {axs}, state_steps, lr, lr_tensor, grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  // Note [scalar states] (plan.h): eta and mu are read and updated on the host, so the
  // steps must be there too. torch keeps all three on the param's device, so
  // fused_optim.ASGD runs torch's own step for CUDA params; this kernel takes CPU ones.
  TORCH_CHECK(!call.device_steps(), op, ": steps, etas and mus on the GPU are not supported");
  check_scalar_states(op, "mus", mus, static_cast<int64_t>(params.size()));
  check_scalar_states(op, "etas", etas, static_cast<int64_t>(params.size()));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const auto coeffs = call.count_step_on_host([&](const std::vector<double>& steps,
                                                  double lr_value, bool lr_is_f32) {
    return asgd_step_coeffs(asgd_coeffs(maximize, weight_decay, lambd, alpha, t0), lr_value,
                            lr_is_f32, has_tensor(lr_tensor), steps, etas, mus);
  });
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_asgd(dt, cplx, weight_decay != 0.0, PickKernel<AsgdCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("asgd_", &asgd_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("asgd_@cuda", asgd_cuda);

}  // namespace fused_optim::cuda
