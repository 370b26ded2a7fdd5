// ASGD on CUDA: the call's options and scalars. The checks and layouts are the CPU's
// (MultiTensorPlan, plan.h), the math is AsgdRule (update_rules.h), the launches are in
// cuda/multi_tensor.cuh.
#include <torch/library.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <optional>
#include <vector>

#include "cuda/multi_tensor.cuh"
#include "direct_call.h"
#include "state_lists.h"

namespace fused_optim::cuda {
namespace {

// Note [ASGD's scalar states on CUDA]
// torch keeps an ASGD param's step, eta and mu on the param's device, and its for-loop
// (not capturable) reads them with .item(), computing the next eta and mu on the host in
// Python floats. The kernels compute them on the host too (Note [scalar states] in plan.h:
// asgd_step_coeffs), so for a call whose steps are on the GPU they take the whole call's
// steps, etas and mus to the host at once (one copy, one synchronisation: the for-loop
// makes three a param), count the step and compute the coefficients there exactly as for
// CPU params, so a CUDA step gives the CPU kernels' bits, and put the new values back with
// one copy and a copy kernel a tensor. fused_optim.ASGD leaves capturable CUDA groups to
// torch's own step (no synchronisation there).

// CPU copies (same dtype and shape) of one-element tensors on `device`, read with one
// device-to-host copy. Each must be defined, of one element and on `device` (the dtypes
// are checked on the copies, with the CPU's checks and messages).
std::vector<at::Tensor> host_copies(const char* op, const char* name, at::TensorList ts,
                                    c10::Device device) {
  std::vector<at::Tensor> wide;
  wide.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.defined() && t.numel() == 1 && t.device() == device, op, ": ", name, "[", i,
                "] must be a one-element tensor on ", device, " (as state_steps[0] is)");
    TORCH_CHECK(!t.is_complex(), op, ": ", name, "[", i, "] must be real");
    wide.push_back(t.reshape({1}).to(at::kDouble));  // (exact: a float or a step count)
  }
  std::vector<at::Tensor> out;
  if (ts.empty()) return out;
  const at::Tensor values = at::cat(wide).cpu();  // the synchronisation
  const double* v = values.const_data_ptr<double>();
  out.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    at::Tensor h = at::empty(ts[i].sizes(), ts[i].options().device(at::kCPU));
    h.fill_(v[i]);
    out.push_back(std::move(h));
  }
  return out;
}

// The host copies' values put back into the device tensors (each value is one of its
// dtype's, so the conversions through double are exact).
void copy_back(at::TensorList device_tensors, const std::vector<at::Tensor>& host) {
  if (host.empty()) return;
  std::vector<double> values(host.size());
  for (size_t i = 0; i < host.size(); ++i) values[i] = host[i].item<double>();
  const at::Tensor on_device =
      at::from_blob(values.data(), {static_cast<int64_t>(values.size())},
                    at::TensorOptions().dtype(at::kDouble))
          .to(device_tensors[0].device());  // (from pageable memory: done when it returns)
  for (size_t i = 0; i < host.size(); ++i) {
    device_tensors[i].copy_(on_device[static_cast<int64_t>(i)].reshape(device_tensors[i].sizes()));
  }
}

void asgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList axs,
               at::TensorList mus, at::TensorList etas, at::TensorList state_steps, double lr,
               double lambd, double alpha, double t0, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::asgd_";
  const int64_t n = static_cast<int64_t>(params.size());
  // Note [ASGD's scalar states on CUDA]: steps, etas and mus on the params' GPU (as torch
  // keeps them) are worked on in CPU copies.
  const std::optional<c10::Device> device = call_device(params);
  const bool on_device = device.has_value() && !state_steps.empty() &&
                         state_steps[0].defined() && state_steps[0].device() == *device;
  std::vector<at::Tensor> host_steps, host_etas, host_mus;
  if (on_device) {
    TORCH_CHECK(static_cast<int64_t>(state_steps.size()) == n &&
                    static_cast<int64_t>(etas.size()) == n && static_cast<int64_t>(mus.size()) == n,
                op, ": expected one state_steps, etas and mus entry per param, got ",
                state_steps.size(), ", ", etas.size(), " and ", mus.size(), " for ", n, " params");
    host_steps = host_copies(op, "state_steps", state_steps, *device);
    host_etas = host_copies(op, "etas", etas, *device);
    host_mus = host_copies(op, "mus", mus, *device);
  }
  const at::TensorList steps_in = on_device ? at::TensorList(host_steps) : state_steps;
  const at::TensorList etas_in = on_device ? at::TensorList(host_etas) : etas;
  const at::TensorList mus_in = on_device ? at::TensorList(host_mus) : mus;
  CudaCall call(op, params, grads, {axs}, steps_in, lr, lr_tensor, grad_scale, found_inf,
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
  if (on_device) {
    copy_back(state_steps, host_steps);
    copy_back(etas, host_etas);
    copy_back(mus, host_mus);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("asgd_", &asgd_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("asgd_@cuda", asgd_cuda);

}  // namespace fused_optim::cuda
