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
// torch keeps an ASGD param's step, eta and mu on the param's device (a checkpoint loaded
// with map_location="cpu" leaves its steps on the CPU and moves eta and mu to the GPU), and
// its for-loop (not capturable) reads them with .item(), computing the next eta and mu on
// the host in Python floats. The kernels compute them on the host too (Note [scalar
// states] in plan.h: asgd_step_coeffs), so a call takes those of its lists that live on
// the GPU to the host at once (one device-to-host copy of them all: one synchronisation,
// where the for-loop makes three a param), counts the step and computes the coefficients
// there exactly as for CPU params, so a CUDA step gives the CPU kernels' bits, and puts the
// new values back (one host-to-device copy, then a copy kernel a tensor). fused_optim.ASGD
// leaves capturable CUDA groups to torch's own step, and a call refuses graph capture.
struct HostMirror {
  std::vector<at::TensorList> lists;            // the device lists, in order
  std::vector<std::vector<at::Tensor>> copies;  // their CPU copies (same dtype and shape)

  // `ts` itself where it is not on `device` (its first entry decides), else its CPU copy,
  // made by read().
  at::TensorList add(const char* op, const char* name, at::TensorList ts,
                     std::optional<c10::Device> device) {
    if (!device.has_value() || ts.empty() || !ts[0].defined() || ts[0].device() != *device) {
      return ts;
    }
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      TORCH_CHECK(t.defined() && t.numel() == 1 && t.device() == *device && !t.is_complex(), op,
                  ": ", name, "[", i, "] must be a one-element real tensor on ", *device, " (as ",
                  name, "[0] is)");
    }
    lists.push_back(ts);
    copies.emplace_back();
    return at::TensorList();  // (replaced by copy(k) after read())
  }

  // Reads every added list's values with one device-to-host copy (exact through double: a
  // float of any width, or a step count), into CPU tensors of their dtypes and shapes.
  void read() {
    std::vector<at::Tensor> wide;
    for (at::TensorList ts : lists) {
      for (const at::Tensor& t : ts) wide.push_back(t.reshape({1}).to(at::kDouble));
    }
    if (wide.empty()) return;
    const at::Tensor values = at::cat(wide).cpu();  // the synchronisation
    const double* v = values.const_data_ptr<double>();
    for (size_t k = 0; k < lists.size(); ++k) {
      for (const at::Tensor& t : lists[k]) {
        at::Tensor h = at::empty(t.sizes(), t.options().device(at::kCPU));
        h.fill_(*v++);
        copies[k].push_back(std::move(h));
      }
    }
  }

  // Writes the CPU copies' values back (each one of its dtype's values: exact through
  // double), with one host-to-device copy.
  void write_back() const {
    std::vector<double> values;
    for (const auto& hs : copies) {
      for (const at::Tensor& h : hs) values.push_back(h.item<double>());
    }
    if (values.empty()) return;
    const at::Tensor on_device =
        at::from_blob(values.data(), {static_cast<int64_t>(values.size())},
                      at::TensorOptions().dtype(at::kDouble))
            .to(lists[0][0].device());  // (from pageable memory: done when it returns)
    int64_t j = 0;
    for (at::TensorList ts : lists) {
      for (const at::Tensor& t : ts) t.copy_(on_device[j++].reshape(t.sizes()));
    }
  }
};

void asgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList axs,
               at::TensorList mus, at::TensorList etas, at::TensorList state_steps, double lr,
               double lambd, double alpha, double t0, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t param_mode,
    std::optional<at::TensorList> param_aux) {
  constexpr const char* op = "fused_optim::asgd_";
  const int64_t n = static_cast<int64_t>(params.size());
  // Note [ASGD's scalar states on CUDA]: the lists on the params' GPU (as torch keeps them)
  // are worked on in CPU copies.
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
  mirror.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("asgd_", &asgd_cuda); }
// The same kernel for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("asgd_@cuda", asgd_cuda);

}  // namespace fused_optim::cuda
