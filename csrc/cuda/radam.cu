// RAdam on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is RadamRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"

namespace fused_optim::cuda {
namespace {

void radam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                double beta2, double weight_decay, double eps, bool decoupled_weight_decay,
                bool maximize, const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::radam_";
  const StateLists states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor,
                grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const auto coeffs = call.count_step(radam_coeffs(maximize, weight_decay, beta1, beta2, eps),
                                      /*per_step=*/true);
  const WeightDecay wd = adam_weight_decay(weight_decay, decoupled_weight_decay);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_radam(dt, cplx, wd, PickKernel<RadamCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("radam_", &radam_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("radam_@cuda", radam_cuda);

}  // namespace fused_optim::cuda
