// Adafactor on CUDA: the passes of Note [Adafactor's passes] (cpu/adafactor.cpp) as six
// kernels per call. The checks, layouts, scalars, entries and tasks are the CPU's
// (adafactor_plan.h), the per-element math is AdafactorRule (update_rules.h).
//
// Note [Adafactor on CUDA]
// The GPU cuts the group into the CPU's tasks and adds every sum in the CPU's order (Note
// [Adafactor's sums]), each chain of additions run by one thread, in double; the element
// math is the same rule with the same roundings (Note [CUDA bits]: -fmad=false, IEEE
// division and square root), and the step size is adafactor::step_scale on the GPU (IEEE
// operations only). So a CUDA step gives the CPU kernel's bits, at any thread count of
// either. The kernels, in stream order:
//   1. rows:    a row's eight lane sums of g*g (Note [Adafactor's sums]), one thread a
//               lane, added in lane order; the row factor (row_var). Under a GradScaler it
//               unscales the grads of params of 2+ dims and stores them back.
//   2. columns: a block's column sums of g*g, one thread a column, down the block's rows.
//   3. slices:  col_var from the blocks' column sums added in block order, and the clamped
//               mean of row_var (one thread a column, one for the mean).
//   4. sums:    pass 2's sixteen lane sums of each task (one thread a lane), added in lane
//               order; vectors' grads unscaled here.
//   5. finish:  each param's tasks' sums in task order, and its step size.
//   6. update:  pass 3, one element a thread: the new variance of vectors, the update.
// The tasks, the entries, the column sums and the other buffers live in one device
// allocation of the call, filled by one copy. Its column sums are one double per column of
// each row block (the CPU keeps them only for slices of several blocks): O(rows + cols) for
// a matrix, but 8 bytes per element for a batch of one-row slices (shape (N, 1, C)), and
// 6 MB beside the 9 MB of a float32 conv weight of shape (512, 512, 3, 3) (a batch of
// 3 x 3 slices). Computing one-block slices' col_var in kernel 2 would drop most of it.
// Reads: g three times (rows, columns, sums) and a fourth in the update, the param twice;
// the CPU reads g three times (its pass 1 sums rows and columns together).
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "adafactor_plan.h"

namespace fused_optim::cuda {
namespace {

using adafactor::Entry;
using adafactor::Finish;
using adafactor::kLanes;
using adafactor::kSumLanes;
using adafactor::MultiBlockSlice;
using adafactor::Task;

constexpr int kBlock = 256;                  // threads per block
constexpr int kRowsPerBlock = kBlock / kLanes;      // kernel 1
constexpr int kTasksPerBlock = kBlock / kSumLanes;  // kernel 4
constexpr int64_t kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// f(T{}) for the entry's param dtype (block-uniform in kernels 1-3 and 6).
template <typename F>
__device__ __forceinline__ void by_dtype(uint8_t dtype, F&& f) {
  switch (dtype) {
    case adafactor::kF64: f(double{}); break;
    case adafactor::kBF16: f(c10::BFloat16{}); break;
    case adafactor::kF16: f(c10::Half{}); break;
    default: f(float{}); break;
  }
}

// The grad's value in M, from the loaded `x` at g; under a GradScaler unscaled and stored
// back (as GradScaler.unscale_; the CPU's grad_value: the value of the stored grad).
template <typename T, typename M>
__device__ __forceinline__ M grad_value(T x, T* g, M inv_scale, bool unscale) {
  if (unscale) {
    x = static_cast<T>(static_cast<M>(x) * inv_scale);
    *g = x;
  }
  return static_cast<M>(x);
}

// Note [unrolled sums]
// A sum is one thread's chain of additions in a fixed order, so its speed is its loads'
// latency: each loop below loads kUnroll terms at once (independent loads, in flight
// together), then adds them in their order. The same additions in the same order as the
// plain loop, so the same bits.
constexpr int kUnroll = 8;

// 1. Row sums: kRowsPerBlock rows of a task per block row (blockIdx.y, striding by
// gridDim.y), kLanes threads a row.
__global__ void __launch_bounds__(kBlock) rows_kernel(const Entry* entries, const Task* tasks,
                                                      bool unscale) {
  const Task t = tasks[blockIdx.x];
  const Entry& e = entries[t.entry];
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int64_t n = e.cols;
  by_dtype(e.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = at::opmath_type<T>;
    using Rule = AdafactorRule<M>;
    const M inv = static_cast<M>(e.inv_grad_scale);
    const int64_t full = n - n % kLanes;
    // (the loop's bounds are the block's, so a warp's threads reach each shuffle together)
    for (int64_t first = t.begin + static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
         first < t.end; first += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
      const int64_t r = first + static_cast<int64_t>(threadIdx.x) / kLanes;
      const bool active = r < t.end;
      double s = 0.0;
      if (active) {
        T* g = static_cast<T*>(e.g) + (t.slice * e.rows + r) * n;
        int64_t j = lane;
        for (; j + (kUnroll - 1) * kLanes < full; j += kUnroll * kLanes) {  // Note [unrolled sums]
          T x[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) x[u] = g[j + u * kLanes];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const double v = static_cast<double>(grad_value(x[u], g + j + u * kLanes, inv, unscale));
            s += v * v;
          }
        }
        for (; j < full; j += kLanes) {
          const double v = static_cast<double>(grad_value(g[j], g + j, inv, unscale));
          s += v * v;
        }
        if (full + lane < n) {
          const double v =
              static_cast<double>(grad_value(g[full + lane], g + full + lane, inv, unscale));
          s += v * v;
        }
      }
      double sum = __shfl_sync(kFullMask, s, 0, kLanes);
      for (int l = 1; l < kLanes; ++l) sum += __shfl_sync(kFullMask, s, l, kLanes);
      if (active && lane == 0) {
        const Rule rule(e.c);
        T* row = static_cast<T*>(e.row) + t.slice * e.rows;
        const M v = rule.factor(static_cast<M>(row[r]), Rule::mean_of_squares(sum, double(n)));
        row[r] = static_cast<T>(v);
        if constexpr (!std::is_same_v<T, M>) e.row_f[t.slice * e.rows + r] = v;
      }
    }
  });
}

// 2. Column sums of a task's rows, one thread a column (blockIdx.y: groups of columns,
// striding by gridDim.y), into the task's share of the partials.
__global__ void __launch_bounds__(kBlock) columns_kernel(const Entry* entries, const Task* tasks,
                                                         double* partials) {
  const Task t = tasks[blockIdx.x];
  const Entry& e = entries[t.entry];
  const int64_t n = e.cols;
  by_dtype(e.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = at::opmath_type<T>;
    const T* first_row = static_cast<const T*>(e.g) + (t.slice * e.rows + t.begin) * n;
    for (int64_t j = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x; j < n;
         j += static_cast<int64_t>(gridDim.y) * kBlock) {
      const T* g = first_row + j;
      double s = 0.0;
      int64_t r = t.begin;
      for (; r + kUnroll <= t.end; r += kUnroll, g += kUnroll * n) {  // Note [unrolled sums]
        T x[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) x[u] = g[u * n];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const double v = static_cast<double>(static_cast<M>(x[u]));
          s += v * v;
        }
      }
      for (; r < t.end; ++r, g += n) {
        const double v = static_cast<double>(static_cast<M>(*g));
        s += v * v;
      }
      partials[t.partial + j] = s;
    }
  });
}

// 3. Each slice: col_var (thread j < cols) and the clamped mean of row_var (thread cols).
__global__ void __launch_bounds__(kBlock) slices_kernel(const Entry* entries,
                                                        const MultiBlockSlice* slices,
                                                        const double* partials) {
  const MultiBlockSlice s = slices[blockIdx.x];
  const Entry& e = entries[s.entry];
  const int64_t m = e.rows, n = e.cols;
  by_dtype(e.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = at::opmath_type<T>;
    using Rule = AdafactorRule<M>;
    const Rule rule(e.c);
    for (int64_t j = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x; j <= n;
         j += static_cast<int64_t>(gridDim.y) * kBlock) {
      if (j < n) {
        double sum = partials[s.partial + j];
        for (int64_t b = 1; b < s.blocks; ++b) sum += partials[s.partial + b * n + j];
        T* col = static_cast<T*>(e.col) + s.slice * n;
        const M v = rule.factor(static_cast<M>(col[j]), Rule::mean_of_squares(sum, double(m)));
        col[j] = static_cast<T>(v);
        if constexpr (!std::is_same_v<T, M>) e.col_f[s.slice * n + j] = v;
      } else {
        const M* row = adafactor::row_factors<T, M>(e) + s.slice * m;
        double sum = 0.0;
        int64_t r = 0;
        for (; r + kUnroll <= m; r += kUnroll) {  // Note [unrolled sums]
          M x[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) x[u] = row[r + u];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) sum += static_cast<double>(x[u]);
        }
        for (; r < m; ++r) sum += static_cast<double>(row[r]);
        const M mean = static_cast<M>(sum) / static_cast<M>(m);  // row_var.mean(dim=-2)
        e.row_means[s.slice] = static_cast<double>(rule.clamp_row_mean(mean));
      }
    }
  });
}

// 4. Pass 2's sums: kSumLanes threads a task, kTasksPerBlock tasks a block.
__global__ void __launch_bounds__(kBlock) sums_kernel(const Entry* entries, const Task* tasks,
                                                      int64_t num_tasks, bool unscale,
                                                      double* sums) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kTasksPerBlock + threadIdx.x / kSumLanes;
  const int lane = static_cast<int>(threadIdx.x) % kSumLanes;
  const bool active = k < num_tasks;
  double us = 0.0, ps = 0.0;
  if (active) {
    const Task t = tasks[k];
    const Entry& e = entries[t.entry];
    by_dtype(e.dtype, [&](auto tag) {
      using T = decltype(tag);
      using M = at::opmath_type<T>;
      using Rule = AdafactorRule<M>;
      const Rule rule(e.c);
      if (e.factored) {
        const int64_t m = e.rows, n = e.cols;
        const T* g = static_cast<const T*>(e.g) + (t.slice * m + t.begin) * n;
        const T* p = static_cast<const T*>(e.p) + (t.slice * m + t.begin) * n;
        const M* row = adafactor::row_factors<T, M>(e) + t.slice * m;
        const M* col = adafactor::col_factors<T, M>(e) + t.slice * n;
        const M inv_row_mean = M(1) / static_cast<M>(e.row_means[t.slice]);
        constexpr int kU = kUnroll / 2;  // (three loads a term)
        for (int64_t r = t.begin; r < t.end; ++r, g += n, p += n) {
          const M rv = row[r] * inv_row_mean;
          int64_t c = lane;
          for (; c + (kU - 1) * kSumLanes < n; c += kU * kSumLanes) {  // Note [unrolled sums]
            T gx[kU], px[kU];
            M cx[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u) {
              gx[u] = g[c + u * kSumLanes];
              px[u] = p[c + u * kSumLanes];
              cx[u] = col[c + u * kSumLanes];
            }
#pragma unroll
            for (int u = 0; u < kU; ++u) {
              us += static_cast<double>(rule.update_squared(rv * cx[u], static_cast<M>(gx[u])));
              const double pv = static_cast<double>(static_cast<M>(px[u]));
              ps += pv * pv;
            }
          }
          for (; c < n; c += kSumLanes) {
            us += static_cast<double>(rule.update_squared(rv * col[c], static_cast<M>(g[c])));
            const double pv = static_cast<double>(static_cast<M>(p[c]));
            ps += pv * pv;
          }
        }
      } else {
        // (g read first here: unscaled and stored back under a GradScaler)
        const M inv = static_cast<M>(e.inv_grad_scale);
        T* g = static_cast<T*>(e.g);
        const T* var = static_cast<const T*>(e.var);
        const T* p = static_cast<const T*>(e.p);
        constexpr int kU = kUnroll / 2;  // (three loads a term)
        int64_t i = t.begin + lane;
        for (; i + (kU - 1) * kSumLanes < t.end; i += kU * kSumLanes) {  // Note [unrolled sums]
          T gx[kU], vx[kU], px[kU];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            gx[u] = g[i + u * kSumLanes];
            vx[u] = var[i + u * kSumLanes];
            px[u] = p[i + u * kSumLanes];
          }
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const M gv = grad_value(gx[u], g + i + u * kSumLanes, inv, unscale);
            us += static_cast<double>(
                rule.update_squared(rule.variance(static_cast<M>(vx[u]), gv), gv));
            const double pv = static_cast<double>(static_cast<M>(px[u]));
            ps += pv * pv;
          }
        }
        for (; i < t.end; i += kSumLanes) {
          const M gv = grad_value(g[i], g + i, inv, unscale);
          us += static_cast<double>(
              rule.update_squared(rule.variance(static_cast<M>(var[i]), gv), gv));
          const double pv = static_cast<double>(static_cast<M>(p[i]));
          ps += pv * pv;
        }
      }
    });
  }
  double u = __shfl_sync(kFullMask, us, 0, kSumLanes);
  double q = __shfl_sync(kFullMask, ps, 0, kSumLanes);
  for (int l = 1; l < kSumLanes; ++l) {
    u += __shfl_sync(kFullMask, us, l, kSumLanes);
    q += __shfl_sync(kFullMask, ps, l, kSumLanes);
  }
  if (active && lane == 0) {
    sums[2 * k] = u;
    sums[2 * k + 1] = q;
  }
}

// 5. Each param's step size from its tasks' sums, in task order.
__global__ void __launch_bounds__(kBlock) finish_kernel(Entry* entries, int64_t n,
                                                        const double* sums, Finish f) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (i >= n) return;
  Entry& e = entries[i];
  double usum = 0.0, psum = 0.0;
  for (int64_t k = e.tasks2_begin; k < e.tasks2_end; ++k) {
    usum += sums[2 * k];
    psum += sums[2 * k + 1];
  }
  e.c.step_scale = adafactor::step_scale(e, f, usum, psum);
}

// 6. Pass 3: a block a task, one element a thread.
__global__ void __launch_bounds__(kBlock) update_kernel(const Entry* entries, const Task* tasks,
                                                        bool decay) {
  const Task t = tasks[blockIdx.x];
  const Entry& e = entries[t.entry];
  by_dtype(e.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = at::opmath_type<T>;
    using Rule = AdafactorRule<M>;
    const Rule rule(e.c);
    auto apply = [&](M p, M u) {
      return decay ? rule.template apply<true>(p, u) : rule.template apply<false>(p, u);
    };
    if (e.factored) {
      const int64_t m = e.rows, n = e.cols;
      const int64_t base = (t.slice * m + t.begin) * n;
      const int64_t count = (t.end - t.begin) * n;
      const T* g = static_cast<const T*>(e.g) + base;
      T* p = static_cast<T*>(e.p) + base;
      const M* row = adafactor::row_factors<T, M>(e) + t.slice * m + t.begin;
      const M* col = adafactor::col_factors<T, M>(e) + t.slice * n;
      const M row_mean = static_cast<M>(e.row_means[t.slice]);
      // (element x is in row r, column c; r and c follow x without a division where a
      // row holds at least a block's stride)
      int64_t r = threadIdx.x / n, c = threadIdx.x - r * n;
      for (int64_t x = threadIdx.x; x < count; x += kBlock) {
        const M u = rule.update(Rule::factored_estimate(row[r], col[c], row_mean),
                                static_cast<M>(g[x]));
        p[x] = static_cast<T>(apply(static_cast<M>(p[x]), u));
        if (n >= kBlock) {
          c += kBlock;
          if (c >= n) {
            c -= n;
            ++r;
          }
        } else {
          r = (x + kBlock) / n;
          c = x + kBlock - r * n;
        }
      }
    } else {
      const T* g = static_cast<const T*>(e.g);
      T* var = static_cast<T*>(e.var);
      T* p = static_cast<T*>(e.p);
      for (int64_t i = t.begin + threadIdx.x; i < t.end; i += kBlock) {
        const M gv = static_cast<M>(g[i]);
        const M v = rule.variance(static_cast<M>(var[i]), gv);
        var[i] = static_cast<T>(v);
        const M u = rule.update(v, gv);  // var_estimate = variance.clone()
        p[i] = static_cast<T>(apply(static_cast<M>(p[i]), u));
      }
    }
  });
}

// Offsets of a call's device buffer: each part 16-byte aligned.
struct Layout {
  int64_t size = 0;
  int64_t add(int64_t bytes) {
    const int64_t at = size;
    size += (bytes + 15) / 16 * 16;
    return at;
  }
};

template <typename X>
void put(std::vector<uint8_t>& host, int64_t at, const std::vector<X>& xs) {
  if (!xs.empty()) std::memcpy(host.data() + at, xs.data(), xs.size() * sizeof(X));
}

int grid_y(int64_t needed) { return static_cast<int>(std::clamp<int64_t>(needed, 1, kMaxGridY)); }

void adafactor_cuda(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                    at::TensorList col_vars, at::TensorList variances,
                    at::TensorList state_steps, double lr, double beta2_decay,
                    std::optional<double> eps1, double eps2, double d, double weight_decay,
                    bool maximize, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  // The call's device: its first CUDA param's (the optimizer calls once per device; a
  // param elsewhere is refused by make_plan's checks).
  c10::Device device(c10::kCUDA);
  for (const at::Tensor& p : params) {
    if (p.defined() && p.is_cuda()) {
      device = p.device();
      break;
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  // (torch's Adafactor reads its norms on the host and cannot be captured either; refused
  // before the plan, which reads found_inf and counts the steps: a review, 2026-12-06)
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              adafactor::kOp, ": Adafactor's step copies its tasks to the GPU and reads lr, "
              "grad_scale and found_inf on the host, which cannot be captured in a CUDA graph");
  adafactor::Plan plan;
  if (!adafactor::make_plan(plan, device, params, grads, row_vars, col_vars, variances,
                            state_steps, lr, beta2_decay, eps1, eps2, d, weight_decay,
                            maximize, lr_tensor, grad_scale, found_inf)) {
    return;
  }

  // Pass 1's tasks, each with its own column sums, and its slices (Note [Adafactor on
  // CUDA]: a slice's tasks are consecutive, so are their column sums).
  std::vector<Task> tasks1 = plan.tasks1;
  std::vector<MultiBlockSlice> slices;
  int64_t partials_size = 0, max_rows = 0, max_cols = 0;
  for (Task& t : tasks1) {
    const Entry& e = plan.entries[t.entry];
    if (slices.empty() || slices.back().entry != t.entry || slices.back().slice != t.slice) {
      slices.push_back(MultiBlockSlice{t.entry, t.slice, partials_size, 0});
    }
    ++slices.back().blocks;
    t.partial = partials_size;
    partials_size += e.cols;
    max_rows = std::max(max_rows, t.end - t.begin);
    max_cols = std::max(max_cols, e.cols);
  }
  const std::vector<Task>& tasks2 = plan.tasks2;
  const int64_t n = static_cast<int64_t>(plan.entries.size());
  const int64_t n1 = static_cast<int64_t>(tasks1.size());
  const int64_t n2 = static_cast<int64_t>(tasks2.size());

  Layout layout;
  const int64_t at_entries = layout.add(n * static_cast<int64_t>(sizeof(Entry)));
  const int64_t at_tasks1 = layout.add(n1 * static_cast<int64_t>(sizeof(Task)));
  const int64_t at_slices = layout.add(static_cast<int64_t>(slices.size() * sizeof(MultiBlockSlice)));
  const int64_t at_tasks2 = layout.add(n2 * static_cast<int64_t>(sizeof(Task)));
  const int64_t head = layout.size;  // (what the host fills)
  const int64_t at_partials = layout.add(partials_size * 8);
  const int64_t at_row_means = layout.add(plan.num_slices * 8);
  const int64_t at_sums = layout.add(2 * n2 * 8);
  const int64_t at_factors = layout.add(plan.num_factors * 4);
  at::Tensor buffer = at::empty({layout.size}, params[0].options().dtype(at::kByte));
  uint8_t* base = buffer.mutable_data_ptr<uint8_t>();
  plan.set_buffers(reinterpret_cast<double*>(base + at_row_means),
                   reinterpret_cast<float*>(base + at_factors));
  {
    std::vector<uint8_t> host(static_cast<size_t>(head));
    put(host, at_entries, plan.entries);
    put(host, at_tasks1, tasks1);
    put(host, at_slices, slices);
    put(host, at_tasks2, tasks2);
    at::Tensor staged = at::from_blob(host.data(), {head}, at::TensorOptions().dtype(at::kByte));
    buffer.narrow(0, 0, head).copy_(staged);  // (from pageable memory: done when it returns)
  }
  auto* entries = reinterpret_cast<Entry*>(base + at_entries);
  auto* d_tasks1 = reinterpret_cast<const Task*>(base + at_tasks1);
  auto* d_slices = reinterpret_cast<const MultiBlockSlice*>(base + at_slices);
  auto* d_tasks2 = reinterpret_cast<const Task*>(base + at_tasks2);
  auto* partials = reinterpret_cast<double*>(base + at_partials);
  auto* sums = reinterpret_cast<double*>(base + at_sums);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (n1 > 0) {
    rows_kernel<<<dim3(static_cast<unsigned>(n1), grid_y((max_rows + kRowsPerBlock - 1) / kRowsPerBlock)),
                  kBlock, 0, stream>>>(entries, d_tasks1, plan.unscale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    columns_kernel<<<dim3(static_cast<unsigned>(n1), grid_y((max_cols + kBlock - 1) / kBlock)),
                     kBlock, 0, stream>>>(entries, d_tasks1, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    slices_kernel<<<dim3(static_cast<unsigned>(slices.size()), grid_y(max_cols / kBlock + 1)),
                    kBlock, 0, stream>>>(entries, d_slices, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sums_kernel<<<static_cast<unsigned>((n2 + kTasksPerBlock - 1) / kTasksPerBlock), kBlock, 0,
                stream>>>(entries, d_tasks2, n2, plan.unscale, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<static_cast<unsigned>((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      entries, n, sums, plan.finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  update_kernel<<<static_cast<unsigned>(n2), kBlock, 0, stream>>>(entries, d_tasks2, plan.decay);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan.layouts.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adafactor_", &adafactor_cuda); }

}  // namespace fused_optim::cuda
