// The non-template part of the CUDA machinery (cuda/multi_tensor.cuh).
#include "cuda/multi_tensor.cuh"

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <mutex>

namespace fused_optim::cuda {

namespace {

// The steps of one launch of increment_steps_kernel (by value, under 4 KB).
constexpr int kStepsPerLaunch = 384;
struct StepArgs {
  void* step[kStepsPerLaunch];
  uint8_t is_double[kStepsPerLaunch];
  int n;
  Scalar found_inf;
};

// A one-element scalar argument (lr, grad_scale, found_inf): read in the kernels where it
// lives on `device`, read on the host where it is a CPU tensor.
Scalar scalar_arg(const char* op, const char* name, const at::Tensor& t, c10::Device device) {
  Scalar s;
  if (t.device().is_cpu()) {
    s.value = t.item<double>();
    return s;
  }
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but the params are on ", device);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " on ", device, " must be float32 or float64, got ", t.scalar_type());
  s.ptr = t.const_data_ptr();
  s.is_double = t.scalar_type() == at::kDouble;
  return s;
}

__global__ void increment_steps_kernel(const StepArgs a) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= a.n || a.found_inf.get() != 0.0) return;
  if (a.is_double[i]) {
    *static_cast<double*>(a.step[i]) += 1.0;
  } else {
    *static_cast<float*>(a.step[i]) += 1.0f;
  }
}

}  // namespace

std::optional<c10::Device> call_device(at::TensorList params) {
  if (params.empty() || !params[0].defined() || !params[0].is_cuda()) return std::nullopt;
  return params[0].device();
}

// Note [CUDA scalars]
// Where the call's steps are CPU tensors (torch's for-loop keeps them there unless a group
// is capturable or fused), everything is read on the host, as the for-loop does: lr,
// found_inf (a skipped step then changes nothing, steps included), and the steps, whose
// coefficients are computed on the host (Note [CUDA bits]). Otherwise nothing is: lr,
// grad_scale and found_inf on the device are read by the kernels, the steps are
// incremented by a kernel, and no host synchronisation happens, so the step can be
// captured in a CUDA graph.
CallScalars call_scalars(const char* op, c10::Device device, double lr,
                         const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, bool host_steps,
                         bool steps_on_device) {
  CallScalars sc;
  sc.unscale = has_tensor(grad_scale);
  if (sc.unscale) {
    TORCH_CHECK(grad_scale->numel() == 1, op, ": grad_scale must have one element");
    sc.grad_scale = scalar_arg(op, "grad_scale", *grad_scale, device);
  }
  sc.lr_is_f32 = lr_is_float32(lr_tensor);
  // Where the steps are CPU tensors, a CUDA lr is read on the host too (its quotients
  // with the steps are computed there).
  const bool lr_on_device = !host_steps && has_tensor(lr_tensor) && !lr_tensor->device().is_cpu();
  if (lr_on_device) {
    TORCH_CHECK(lr_tensor->numel() == 1, op, ": Tensor lr must be 1-element");
    sc.lr = scalar_arg(op, "lr", *lr_tensor, device);
  } else {
    sc.lr_value = lr_value(op, lr, lr_tensor);
    sc.lr.value = sc.lr_value;
  }
  if (host_steps) {
    if (has_tensor(found_inf)) {
      TORCH_CHECK(found_inf->device().is_cpu() || found_inf->device() == device, op,
                  ": found_inf is on ", found_inf->device(), " but the params are on ", device);
    }
    sc.skip = skip_step(found_inf);
  } else if (has_tensor(found_inf)) {
    sc.found_inf = scalar_arg(op, "found_inf", *found_inf, device);
  }
  sc.device_coeffs = steps_on_device || lr_on_device;
  return sc;
}

uint8_t storage_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kStoreF32;
    case at::kBFloat16: return kStoreBF16;
    case at::kHalf: return kStoreF16;
    case at::kByte: return kStoreU8;
    default:
      TORCH_CHECK(false, "fused_optim: a param storage mode or state_dtype applies to float32, "
                  "bfloat16 and float16 params only, got a tensor of ", dtype);
  }
}

const cpu::Quant8Maps* device_quant8_maps(c10::Device device) {
  // (never destroyed: a CUDA tensor freed after the CUDA context has gone, at exit, crashes)
  static std::mutex mutex;
  static auto* maps = new std::array<at::Tensor, 64>();
  const int index = device.index();
  TORCH_CHECK(index >= 0 && index < static_cast<int>(maps->size()), "fused_optim: CUDA device ",
              index, " is beyond the 8-bit state's table of devices");
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& t = (*maps)[static_cast<size_t>(index)];
  if (!t.defined()) {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "fused_optim: the first step with 8-bit state (state_dtype=torch.uint8) on ", device,
                " copies the quantization maps to the GPU, which cannot happen while a CUDA graph "
                "is captured: run one step before capturing");
    const cpu::Quant8Maps& host = cpu::quant8_maps();
    const at::Tensor bytes = at::from_blob(const_cast<cpu::Quant8Maps*>(&host),
                                           {static_cast<int64_t>(sizeof(host))},
                                           at::TensorOptions().dtype(at::kByte));
    t = bytes.to(device);  // (a copy from pageable memory: complete when it returns)
  }
  return reinterpret_cast<const cpu::Quant8Maps*>(t.const_data_ptr());
}

void increment_device_steps(at::TensorList steps, const Scalar& found_inf) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  StepArgs args{};
  args.found_inf = found_inf;
  for (size_t begin = 0; begin < steps.size(); begin += kStepsPerLaunch) {
    const size_t n = std::min(steps.size() - begin, static_cast<size_t>(kStepsPerLaunch));
    for (size_t k = 0; k < n; ++k) {
      const at::Tensor& s = steps[begin + k];
      args.step[k] = s.data_ptr();
      args.is_double[k] = s.scalar_type() == at::kDouble;
    }
    args.n = static_cast<int>(n);
    constexpr int kStepThreads = 128;
    const int blocks = static_cast<int>((n + kStepThreads - 1) / kStepThreads);
    increment_steps_kernel<<<blocks, kStepThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fused_optim::cuda
