// ASGD on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is AsgdRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/host_mirror.cuh"
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
  const int64_t n = static_cast<int64_t>(params.size());
  // Note [ASGD's scalar states on CUDA] (host_mirror.cuh): the lists on the params' GPU
  // (as torch keeps them) are worked on in CPU copies.
  // (the lists' lengths are checked below, with the CPU's messages: a copy changes nothing)
  const std::optional<c10::Device> device = call_device(params);
  HostMirror mirror;
  at::TensorList steps_in = mirror.add(op, "state_steps", state_steps, device);
  at::TensorList etas_in = mirror.add(op, "etas", etas, device);
  at::TensorList mus_in = mirror.add(op, "mus", mus, device);
  if (!mirror.lists.empty()) {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                op, ": ASGD's steps, etas and mus on the GPU are read on the host (as torch's "
                "for-loop reads them), which cannot be captured in a CUDA graph");
    mirror.read();
    // (in the order they were added; a list that add() took came back empty)
    size_t k = 0;
    if (steps_in.empty() && !state_steps.empty()) steps_in = mirror.copies[k++];
    if (etas_in.empty() && !etas.empty()) etas_in = mirror.copies[k++];
    if (mus_in.empty() && !mus.empty()) mus_in = mirror.copies[k++];
  }
  const StateLists states{{"axs", axs}};
  CudaCall call(op, params, grads, states, steps_in, lr, lr_tensor, grad_scale, found_inf,
                param_storage(op, param_mode, param_aux));
  // Note [scalar states] (plan.h): eta and mu are read and updated on the host, with the
  // steps (on the CPU, or their copies).
  TORCH_CHECK(!call.device_steps(), op, ": steps on the GPU must come with their etas and mus");
  check_scalar_states(op, "mus", mus_in, n);
  check_scalar_states(op, "etas", etas_in, n);
  if (!call.updates()) return;  // after all checks; nothing has changed yet
  const auto coeffs = call.count_step_on_host([&](const std::vector<double>& steps,
                                                  double lr_value, bool lr_is_f32) {
    return asgd_step_coeffs(asgd_coeffs(maximize, weight_decay, lambd, alpha, t0), lr_value,
                            lr_is_f32, has_tensor(lr_tensor), steps, etas_in, mus_in);
  });
  call.launch(coeffs, [&](at::ScalarType dt, bool cplx) {
    return select_asgd(dt, cplx, weight_decay != 0.0, PickKernel<AsgdCoeffs>{});
  });
  mirror.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("asgd_", &asgd_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("asgd_@cuda", asgd_cuda);

}  // namespace fused_optim::cuda
