// Adam and AdamW on CUDA: the call's options and scalars. The checks and layouts are the
// CPU's (MultiTensorPlan, plan.h), the math is AdamRule (update_rules.h), the launches are
// in cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cuda {
namespace {

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::adam_";
  const auto states = adam_state_lists(op, amsgrad, exp_avgs, exp_avg_sqs, max_exp_avg_sqs);
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor, grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const auto coeffs = call.count_step(adam_coeffs(maximize, weight_decay, beta1, beta2, eps),
                                      /*per_step=*/true);
  const WeightDecay wd = adam_weight_decay(weight_decay, decoupled_weight_decay);
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_adam(dt, cplx, wd, amsgrad, PickKernel<AdamCoeffs>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adam_", &adam_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("adam_@cuda", adam_cuda);

}  // namespace fused_optim::cuda
