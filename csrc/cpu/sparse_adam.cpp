// SparseAdam on CPU: only the elements a sparse grad names are read and written. The math
// is SparseAdamRule in update_rules.h (Note [sparse adam]); here are the checks, the
// coalescing (torch's own, so duplicates are summed in its order) and one parallel region
// over the touched rows of every param of the group.
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/multi_tensor.h"

namespace fused_optim::cpu {
namespace {

// One param's update: its coalesced grad, and where each of its tensors keeps the
// elements of one sparse entry (the sparse dims' indices times the tensor's strides, then
// the dense part's elements: in order where that part is contiguous, else by `dense_*`).
struct Work {
  at::Tensor indices;  // [sparse_dim, nnz], contiguous
  at::Tensor values;   // [nnz, dense...], contiguous
  int64_t nnz = 0, row = 0, sparse_dim = 0;
  void* ptr[3] = {nullptr, nullptr, nullptr};  // param, exp_avg, exp_avg_sq
  std::vector<int64_t> strides[3];             // their strides over the sparse dims
  std::vector<int64_t> dense[3];               // dense offsets, or empty: contiguous
  double neg_step_size = 0.0;
  at::ScalarType dtype;
};

// The offset of each element of the dense part of `t` (dims sparse_dim.. of t), in the
// order of a contiguous tensor of that shape; empty where that order is t's memory order.
std::vector<int64_t> dense_offsets(const at::Tensor& t, int64_t sparse_dim) {
  const int64_t dims = t.dim();
  bool contiguous = true;
  int64_t expected = 1;
  for (int64_t d = dims - 1; d >= sparse_dim; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) contiguous = false;
    expected *= t.size(d);
  }
  if (contiguous) return {};
  std::vector<int64_t> offsets{0};
  for (int64_t d = sparse_dim; d < dims; ++d) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * static_cast<size_t>(t.size(d)));
    for (int64_t o : offsets) {
      for (int64_t i = 0; i < t.size(d); ++i) next.push_back(o + i * t.stride(d));
    }
    offsets = std::move(next);
  }
  return offsets;
}

template <typename T>
void update_entries(const Work& w, const SparseAdamCoeffs<at::opmath_type<T>>& c, int64_t begin,
                    int64_t end) {
  using M = at::opmath_type<T>;
  // Each intermediate rounded to T, as torch's tensor ops round it (Note [sparse adam]).
  auto round = [](M x) {
    if constexpr (std::is_same_v<T, M>) {
      return x;
    } else {
      T t;
      store(x, &t);
      return load(&t);
    }
  };
  SparseAdamCoeffs<M> coeffs = c;
  coeffs.neg_step_size = static_cast<M>(w.neg_step_size);
  const int64_t* ind = w.indices.const_data_ptr<int64_t>();
  const T* vals = w.values.const_data_ptr<T>();
  T* base[3];
  for (int k = 0; k < 3; ++k) base[k] = static_cast<T*>(w.ptr[k]);
  const bool contiguous = w.dense[0].empty() && w.dense[1].empty() && w.dense[2].empty();
  auto entry = [&](int64_t e, int k) {
    int64_t offset = 0;
    for (int64_t d = 0; d < w.sparse_dim; ++d) offset += ind[d * w.nnz + e] * w.strides[k][d];
    return base[k] + offset;
  };
  // Note [sparse prefetch]: the rows of a big table are far apart (a TLB and a cache miss
  // each, in each of the three tensors), so the rows kAhead entries on are asked for while
  // this one is updated.
  constexpr int64_t kAhead = 16;
  const int64_t row_bytes = w.row * static_cast<int64_t>(sizeof(T));
  for (int64_t e = begin; e < end; ++e) {
    if (contiguous && e + kAhead < end) {
      for (int k = 0; k < 3; ++k) {
        const char* ahead = reinterpret_cast<const char*>(entry(e + kAhead, k));
        for (int64_t b = 0; b < row_bytes && b < 4096; b += 64) __builtin_prefetch(ahead + b, 1);
      }
    }
    T* at[3];
    for (int k = 0; k < 3; ++k) at[k] = entry(e, k);
    const T* g = vals + e * w.row;
    if (contiguous) {
      // The common case (an embedding's rows): a loop the compiler vectorizes.
      T* __restrict__ p = at[0];
      T* __restrict__ m = at[1];
      T* __restrict__ v = at[2];
#pragma GCC ivdep
      for (int64_t j = 0; j < w.row; ++j) {
        M pj = load(p + j), mj = load(m + j), vj = load(v + j);
        SparseAdamRule<M>::apply(pj, mj, vj, load(g + j), coeffs, round);
        store(pj, p + j);
        store(mj, m + j);
        store(vj, v + j);
      }
      continue;
    }
    for (int64_t j = 0; j < w.row; ++j) {
      T* x[3];
      for (int k = 0; k < 3; ++k) x[k] = at[k] + (w.dense[k].empty() ? j : w.dense[k][j]);
      M p = load(x[0]), m = load(x[1]), v = load(x[2]);
      SparseAdamRule<M>::apply(p, m, v, load(g + j), coeffs, round);
      store(p, x[0]);
      store(m, x[1]);
      store(v, x[2]);
    }
  }
}

void sparse_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::ArrayRef<double> step_sizes, double beta1,
                     double beta2, double eps, bool maximize,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fused_optim::sparse_adam_";
  const size_t n = params.size();
  // Every check first: a bad input changes nothing.
  check_sparse_adam_inputs(op, params, grads, exp_avgs, exp_avg_sqs, step_sizes.size(),
                           c10::DeviceType::CPU, std::numeric_limits<int64_t>::max());
  const double inv_scale = inverse_grad_scale(op, grad_scale);
  if (skip_step(found_inf)) return;

  std::vector<Work> work;
  work.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor coalesced = sparse_adam_grad(grads[i], maximize, grad_scale, inv_scale);
    Work w;
    w.values = coalesced._values().contiguous();
    if (w.values.numel() == 0) continue;  // torch skips an empty grad (its step still counts)
    w.indices = coalesced._indices().contiguous();
    w.nnz = w.indices.size(1);
    w.row = w.values.numel() / w.nnz;
    w.sparse_dim = coalesced.sparse_dim();
    const at::Tensor* tensors[3] = {&params[i], &exp_avgs[i], &exp_avg_sqs[i]};
    for (int k = 0; k < 3; ++k) {
      w.ptr[k] = tensors[k]->data_ptr();
      w.strides[k].assign(tensors[k]->strides().begin(),
                          tensors[k]->strides().begin() + w.sparse_dim);
      w.dense[k] = dense_offsets(*tensors[k], w.sparse_dim);
    }
    w.neg_step_size = -step_sizes[i];
    w.dtype = params[i].scalar_type();
    work.push_back(std::move(w));
  }
  if (work.empty()) return;

  // One parallel region over the entries of every param, about kGrainSize elements a chunk.
  std::vector<int64_t> first{0};
  int64_t elements = 0;
  for (const Work& w : work) {
    first.push_back(first.back() + w.nnz);
    elements += w.nnz * w.row;
  }
  const int64_t entries = first.back();
  const int64_t grain = std::max<int64_t>(1, kGrainSize * entries / std::max<int64_t>(1, elements));
  at::parallel_for(0, entries, grain, [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t e = begin; e < end; ++t) {
      const Work& w = work[t];
      const int64_t stop = std::min(end, first[t + 1]);
      dispatch_dtype(w.dtype, [&]<typename T>() -> SegmentFn {
        using M = at::opmath_type<T>;
        // `sqrt(...).add_(eps)`: torch's CPU add rounds a Python-float operand to the
        // tensor's dtype first, 16-bit ones included (its mul keeps it in float).
        const SparseAdamCoeffs<M> c{static_cast<M>(1.0 - beta1), static_cast<M>(1.0 - beta2),
                                    static_cast<M>(static_cast<T>(eps)), M(0)};
        update_entries<T>(w, c, e - first[t], stop - first[t]);
        return nullptr;
      });
      e = stop;
    }
  });
}

}  // namespace

// The grads are sparse, so a call dispatches on SparseCPU.
TORCH_LIBRARY_IMPL(fused_optim, SparseCPU, m) { m.impl("sparse_adam_", &sparse_adam_cpu); }
TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("sparse_adam_", &sparse_adam_cpu); }

}  // namespace fused_optim::cpu
