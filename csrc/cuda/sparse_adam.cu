// SparseAdam on CUDA: the CPU binding's checks and coalescing (csrc/cpu/sparse_adam.cpp),
// then one launch per param over the elements its sparse grad names; the math is
// SparseAdamRule in update_rules.h (Note [sparse adam]), the same source the CPU runs.
// Compiled in CI's CUDA check; bitwise torch's CUDA SparseAdam on an H200 (docs/cuda.md).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "plan.h"
#include "update_rules.h"

namespace fused_optim::cuda {
namespace {

constexpr int kMaxDims = 8;
constexpr int kThreads = 256;

// Where each tensor (param, exp_avg, exp_avg_sq) keeps element j of sparse entry e: the
// entry's indices over the sparse dims, then j unravelled over the dense dims, times that
// tensor's strides.
struct SparseArgs {
  const int64_t* indices;  // [sparse_dim, nnz]
  int64_t nnz, row;
  int sparse_dim, dims;
  int64_t sizes[kMaxDims];
  int64_t strides[3][kMaxDims];
  void* ptr[3];
  const void* values;  // [nnz, row]
};

template <typename T>
__global__ void sparse_adam_kernel(SparseArgs a, SparseAdamCoeffs<at::opmath_type<T>> c) {
  using M = at::opmath_type<T>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.nnz * a.row) return;
  const int64_t e = i / a.row;
  int64_t j = i % a.row;
  int64_t offset[3] = {0, 0, 0};
  for (int d = 0; d < a.sparse_dim; ++d) {
    const int64_t index = a.indices[d * a.nnz + e];
    for (int k = 0; k < 3; ++k) offset[k] += index * a.strides[k][d];
  }
  for (int d = a.dims - 1; d >= a.sparse_dim; --d) {
    const int64_t coord = j % a.sizes[d];
    j /= a.sizes[d];
    for (int k = 0; k < 3; ++k) offset[k] += coord * a.strides[k][d];
  }
  T* p = static_cast<T*>(a.ptr[0]) + offset[0];
  T* m = static_cast<T*>(a.ptr[1]) + offset[1];
  T* v = static_cast<T*>(a.ptr[2]) + offset[2];
  M pv = static_cast<M>(*p), mv = static_cast<M>(*m), vv = static_cast<M>(*v);
  const M g = static_cast<M>(static_cast<const T*>(a.values)[i]);
  SparseAdamRule<M>::apply(pv, mv, vv, g, c,
                           [](M x) { return static_cast<M>(static_cast<T>(x)); });
  *p = static_cast<T>(pv);
  *m = static_cast<T>(mv);
  *v = static_cast<T>(vv);
}

void sparse_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::ArrayRef<double> step_sizes, double beta1,
                      double beta2, double eps, bool maximize,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::sparse_adam_";
  const size_t n = params.size();
  check_sparse_adam_inputs(op, params, grads, exp_avgs, exp_avg_sqs, step_sizes.size(),
                           c10::DeviceType::CUDA, kMaxDims);
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  if (skip_step(found_inf)) return;
  for (size_t i = 0; i < n; ++i) {
    const c10::cuda::CUDAGuard guard(params[i].device());
    const at::Tensor coalesced = sparse_adam_grad(grads[i], maximize, grad_scale, inv_scale);
    const at::Tensor values = coalesced._values().contiguous();
    if (values.numel() == 0) continue;
    const at::Tensor indices = coalesced._indices().contiguous();
    SparseArgs a{};
    a.indices = indices.const_data_ptr<int64_t>();
    a.nnz = indices.size(1);
    a.row = values.numel() / a.nnz;
    a.sparse_dim = static_cast<int>(coalesced.sparse_dim());
    a.dims = static_cast<int>(params[i].dim());
    const at::Tensor* tensors[3] = {&params[i], &exp_avgs[i], &exp_avg_sqs[i]};
    for (int d = 0; d < a.dims; ++d) {
      a.sizes[d] = params[i].size(d);
      for (int k = 0; k < 3; ++k) a.strides[k][d] = tensors[k]->stride(d);
    }
    for (int k = 0; k < 3; ++k) a.ptr[k] = tensors[k]->data_ptr();
    a.values = values.const_data_ptr();
    const int64_t total = a.nnz * a.row;
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "sparse_adam_", [&] {
      using M = at::opmath_type<scalar_t>;
      const SparseAdamCoeffs<M> c{static_cast<M>(1.0 - beta1), static_cast<M>(1.0 - beta2),
                                  static_cast<M>(eps), static_cast<M>(-step_sizes[i])};
      sparse_adam_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

// The grads are sparse, so a call dispatches on SparseCUDA.
TORCH_LIBRARY_IMPL(fused_optim, SparseCUDA, m) { m.impl("sparse_adam_", &sparse_adam_cuda); }
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("sparse_adam_", &sparse_adam_cuda); }

}  // namespace fused_optim::cuda
