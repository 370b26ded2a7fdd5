// NAdam on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is NadamRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include "cuda/host_mirror.cuh"
#include "cuda/multi_tensor.cuh"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cuda {
namespace {

void nadam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList mu_products,
                at::TensorList state_steps, double lr, double beta1, double beta2,
                double weight_decay, double eps, double momentum_decay,
                bool decoupled_weight_decay, bool maximize,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::nadam_";
  const StateLists states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  CudaCall call(op, params, grads, states, state_steps, lr, lr_tensor,
                grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  // Note [scalar states] (plan.h): mu_product is updated and read on the host, so the
  // steps must be there too (torch's for-loop keeps both on the CPU unless capturable;
  // fused_optim.NAdam runs torch's own step for capturable CUDA groups).
  TORCH_CHECK(!call.device_steps(), op,
              ": steps and mu_products on the GPU (capturable) are not supported");
  // torch's load_state_dict moves every state but `step` to its param's device, so a
  // loaded checkpoint's mu_products are on the GPU, where torch's for-loop reads them
  // with .item(): worked on in one CPU copy of them all (host_mirror.cuh), as ASGD's are.
  HostMirror mirror;
  at::TensorList mu_in = mirror.add(op, "mu_products", mu_products, call_device(params));
  if (!mirror.lists.empty()) {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                op, ": mu_products on the GPU are read on the host (as torch's for-loop reads "
                "them), which cannot be captured in a CUDA graph");
    mirror.read();
    mu_in = mirror.copies[0];
  }
  check_scalar_states(op, "mu_products", mu_in, static_cast<int64_t>(params.size()));
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const WeightDecay wd = adam_weight_decay(weight_decay, decoupled_weight_decay);
  const auto coeffs = call.count_step_on_host([&](const std::vector<double>& steps,
                                                  double lr_value, bool lr_is_f32) {
    return nadam_step_coeffs(
        nadam_coeffs(maximize, weight_decay, beta1, beta2, eps, momentum_decay), lr_value,
        lr_is_f32, steps, mu_in);
  });
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_nadam(dt, cplx, wd, PickKernel<NadamCoeffs>{});
  });
  mirror.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("nadam_", &nadam_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("nadam_@cuda", nadam_cuda);

}  // namespace fused_optim::cuda
