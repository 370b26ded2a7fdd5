#pragma once
// Adafactor's host side, shared by its CPU kernel (cpu/adafactor.cpp) and its CUDA kernel
// (cuda/adafactor.cu): the checks, the layouts, the scalars, the params' entries and the
// tasks of its passes (Note [Adafactor's passes] in cpu/adafactor.cpp), and the step size
// each param gets from its sums. Both devices cut a group into the same tasks and add every
// sum in the same order (Note [Adafactor's sums]), so a CUDA step gives the CPU kernel's
// bits (Note [Adafactor on CUDA] in cuda/adafactor.cu).
//
// Compiled by the host compiler and by nvcc: it names no ISA and no CUDA API.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "plan.h"
#include "update_rules.h"

namespace fused_optim::adafactor {

constexpr const char* kOp = "fused_optim::adafactor_";

constexpr int64_t kChunk = int64_t{1} << 16;              // passes 2-3: elements per task
// pass 1: elements per row block (small enough that a wave of one param still splits
// between threads: Note [Adafactor's waves] in cpu/adafactor.cpp)
constexpr int64_t kRowBlock = int64_t{1} << 18;
constexpr int64_t kMaxColumnPartials = int64_t{1} << 16;  // pass 1: buffer per slice
constexpr int kLanes = 8;         // pass 1's row sums: element j of a row in lane j % 8
constexpr int kSumLanes = 16;     // pass 2's sums: element j of a row (or task) in lane j % 16
constexpr int64_t kBuffer = 256;  // CPU pass 2: updates computed at a time (a multiple of kSumLanes)

// The param dtypes, as a kernel reads them from an entry.
enum Dtype : uint8_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

struct Entry {  // one param with a grad, after layout handling
  void* p;
  void* g;
  void* row;  // row_var (2+ dims)
  void* col;  // col_var (2+ dims)
  void* var;  // variance (fewer dims)
  bool factored;
  uint8_t dtype;            // Dtype
  int64_t rows, cols;       // of each slice (factored); vectors: 1 x numel
  int64_t numel;
  double* row_means;        // factored: the clamped row_var mean of each slice
  // factored 16-bit params: row_var and col_var as computed, before their rounding to 16
  // bits, for passes 2 and 3 (Note [Adafactor's 16-bit factors]); null otherwise.
  float* row_f;
  float* col_f;
  double inv_grad_scale;
  // The step size's inputs (step_scale below): numel ** 0.5 and 1 / step ** 0.5, as
  // torch's for-loop computes them on the host.
  double count_sqrt;
  double inv_sqrt_step;
  int64_t tasks2_begin, tasks2_end;  // the entry's tasks of passes 2 and 3
  AdafactorCoeffs c;
};

struct Task {
  int64_t entry, slice;  // slice of the entry (0 for vectors)
  int64_t begin, end;    // rows of the slice (factored) or elements (vectors)
  int64_t partial;       // CPU pass 1: offset of its column sums in the buffer; -1: own slice
};

struct MultiBlockSlice {  // pass 1: a slice whose column sums are in the buffer
  int64_t entry, slice, partial, blocks;
};

// row_var and col_var of a factored entry with params of type T, in their math type M, as
// this step computed them (Note [Adafactor's 16-bit factors] in cpu/adafactor.cpp): the
// state itself, or for 16-bit params the floats kept before its rounding.
template <typename T, typename M>
FO_HOST_DEVICE FO_INLINE const M* row_factors(const Entry& e) {
  if constexpr (std::is_same_v<T, M>) {
    return static_cast<const M*>(e.row);
  } else {
    return e.row_f;
  }
}
template <typename T, typename M>
FO_HOST_DEVICE FO_INLINE const M* col_factors(const Entry& e) {
  if constexpr (std::is_same_v<T, M>) {
    return static_cast<const M*>(e.col);
  } else {
    return e.col_f;
  }
}

// The group's scalars that the step size needs.
struct Finish {
  double lr, eps2, d;
  bool lr_is_f32;
};

// A value rounded to the opmath type of the param's dtype, as torch's norm of such a
// tensor is rounded (Note [Adafactor's sums]; 16-bit params: their math runs in float).
FO_HOST_DEVICE FO_INLINE double round_to_math_type(bool double_math, double x) {
  return double_math ? x : static_cast<double>(static_cast<float>(x));
}

// The 2-norm of a param or update from its sum of squares (added in double), as torch's
// norm computes it: in float for float32 and 16-bit tensors, whose squares and sum overflow
// to inf past float's largest value (a float32 param of 1e20 has an infinite norm there,
// and so an infinite step), rounded to float otherwise.
FO_HOST_DEVICE FO_INLINE double norm_from_squares(bool double_math, double sum) {
  constexpr double kFloatMax = 3.4028234663852886e38;
  if (!double_math && sum > kFloatMax) return static_cast<double>(INFINITY);
  return round_to_math_type(double_math, sqrt_(sum));
}

// -alpha / denom of a param from the sums of squares of its update (usum) and of the param
// (psum), as torch's for-loop computes them (Python floats; IEEE operations only, so the
// host and the GPU give the same bits).
FO_HOST_DEVICE FO_INLINE double step_scale(const Entry& e, const Finish& f, double usum,
                                           double psum) {
  const bool double_math = e.dtype == kF64;
  // max(eps2, param.norm(2).item() / numel ** 0.5): Python's max keeps eps2 unless the
  // RMS is greater (a NaN RMS gives eps2), and min(lr, 1 / step ** 0.5) keeps lr unless
  // the other is smaller.
  const double rms = norm_from_squares(double_math, psum) / e.count_sqrt;
  const double scale = rms > f.eps2 ? rms : f.eps2;
  const double r = e.inv_sqrt_step;
  // denom = max(1.0, update.norm(2).item() / (numel ** 0.5 * d))
  const double q = norm_from_squares(double_math, usum) / (e.count_sqrt * f.d);
  const double denom = q > 1.0 ? q : 1.0;
  if (f.lr_is_f32 && !(static_cast<float>(f.lr) > static_cast<float>(r))) {
    // rho_t is the float32 Tensor lr itself (the comparison too is a float32 tensor op):
    // alpha = scale * rho_t and -alpha / denom are float32 tensor ops.
    const float alpha = static_cast<float>(scale) * static_cast<float>(f.lr);
    return static_cast<double>(-alpha / static_cast<float>(denom));
  }
  const double rho = r < f.lr ? r : f.lr;
  return -(scale * rho) / denom;
}

// Tensors of unusual layouts (not contiguous, or a negated or conjugated view) are
// updated in contiguous temporaries, copied back after the passes.
struct Layouts {
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks;  // (original, temporary)
  std::vector<at::Tensor> keep_alive;

  static bool usual(const at::Tensor& t) {
    return t.is_contiguous() && !t.is_neg() && !t.is_conj();
  }
  void* written(const at::Tensor& t) {
    if (usual(t)) return t.mutable_data_ptr();  // (materializes copy-on-write storage)
    at::Tensor tmp = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    tmp.copy_(t);
    writebacks.emplace_back(t, tmp);
    return tmp.mutable_data_ptr();
  }
  void* read(const at::Tensor& t) {
    if (usual(t)) return const_cast<void*>(t.const_data_ptr());
    at::Tensor tmp = t.contiguous().resolve_neg().resolve_conj();
    if (!usual(tmp)) tmp = tmp.clone(at::MemoryFormat::Contiguous);
    keep_alive.push_back(tmp);
    return const_cast<void*>(tmp.const_data_ptr());
  }
  void finish() {
    for (auto& [original, tmp] : writebacks) original.copy_(tmp);
  }
};

// A call's plan: its entries and the tasks of its passes. The buffers it sizes
// (row_means: one double per slice; the 16-bit factors: one float per row and column of
// each slice of a 16-bit param; the column partials of pass 1) are the device's to make,
// and the entries' pointers into them are set by the kernel (set_buffers).
struct Plan {
  std::vector<Entry> entries;
  std::vector<Task> tasks1, tasks2;
  std::vector<MultiBlockSlice> multi;  // CPU pass 1: the slices of several blocks
  std::vector<int64_t> first_slice;    // per entry: its first slice in row_means
  std::vector<int64_t> factor_offset;  // per entry: its 16-bit factors' offset (or -1)
  int64_t num_slices = 0;
  int64_t num_factors = 0;
  int64_t partials_size = 0;  // CPU pass 1's column partials
  Finish finish;
  bool unscale = false;
  bool decay = false;
  Layouts layouts;

  // Points each entry at its share of row_means and of the 16-bit factors.
  void set_buffers(double* row_means, float* factors) {
    for (size_t i = 0; i < entries.size(); ++i) {
      Entry& e = entries[i];
      e.row_means = e.factored ? row_means + first_slice[i] : nullptr;
      e.row_f = e.col_f = nullptr;
      if (factor_offset[i] >= 0) {
        e.row_f = factors + factor_offset[i];
        e.col_f = e.row_f + e.numel / e.cols;  // after a row factor per row of every slice
      }
    }
  }
};

inline std::vector<int64_t> with_last_dims(at::IntArrayRef sizes, int64_t dim) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s[s.size() - dim] = 1;
  return s;
}

inline void check_state(const char* list, int64_t k, const at::Tensor& t, const at::Tensor& param,
                        at::IntArrayRef shape) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, kOp, ": ", list, "[", k,
              "] must be a dense tensor");
  TORCH_CHECK(t.device() == param.device(), kOp, ": ", list, "[", k, "] is on ", t.device(),
              " but its param is on ", param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), kOp, ": ", list, "[", k, "] has dtype ",
              t.scalar_type(), " but its param has dtype ", param.scalar_type());
  TORCH_CHECK(t.sizes() == shape, kOp, ": ", list, "[", k, "] has shape ", t.sizes(),
              " but must have shape ", shape, " for a param of shape ", param.sizes());
  check_storage_holds(kOp, list, k, t);  // (plan.h)
  refuse_internal_overlap(t);
}

inline double finfo_eps(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kBFloat16: return 0.0078125;      // torch.finfo(torch.bfloat16).eps
    case at::kHalf: return 0.0009765625;       // torch.finfo(torch.float16).eps
    default: return std::numeric_limits<float>::epsilon();
  }
}

inline uint8_t dtype_code(at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return kF32;
  }
}

// Checks every input (torch.optim.Adafactor's errors where it has them), then, unless the
// step is skipped (found_inf) or the group is empty, counts the steps and fills `plan`.
// Returns whether there is a step to run. Every check comes first: a bad input changes
// nothing. The params must all be on `device` (the optimizer calls the op once per device).
inline bool make_plan(Plan& plan, c10::Device device, at::TensorList params,
                      at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                      at::TensorList variances, at::TensorList state_steps, double lr,
                      double beta2_decay, std::optional<double> eps1, double eps2, double d,
                      double weight_decay, bool maximize,
                      const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  const int64_t n = static_cast<int64_t>(params.size());
  const bool unscale = has_tensor(grad_scale);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, kOp,
              ": expected as many grads as params, got ", grads.size(), " and ", n);
  int64_t factored = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.defined() && p.layout() == at::kStrided && p.device() == device, kOp,
                ": params[", i, "] must be a dense tensor on ", device,
                p.defined() ? c10::str(", got one on ", p.device()) : std::string());
    // torch.optim.Adafactor's own errors
    TORCH_CHECK(!p.is_complex(), "Adafactor does not support complex parameters");
    TORCH_CHECK(g.defined() && !g.is_sparse(), "Adafactor does not support sparse gradients");
    const at::ScalarType dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                kOp, ": unsupported dtype ", dt);
    TORCH_CHECK(g.layout() == at::kStrided && g.device() == p.device() &&
                    g.scalar_type() == dt && g.sizes() == p.sizes(),
                kOp, ": grads[", i, "] must be a dense tensor of its param's device, dtype and "
                "shape, got ", g.device(), ", ", g.scalar_type(), ", ", g.sizes(), " for ",
                p.device(), ", ", dt, ", ", p.sizes());
    // torch's for-loop divides the param's norm by sqrt(numel): a ZeroDivisionError.
    TORCH_CHECK(p.numel() > 0, kOp, ": params[", i, "] has no elements (torch.optim."
                "Adafactor divides by its size)");
    check_storage_holds(kOp, "params", i, p);  // (plan.h)
    check_storage_holds(kOp, "grads", i, g);
    refuse_internal_overlap(p);
    if (unscale) refuse_internal_overlap(g);
    if (p.dim() > 1) ++factored;
  }
  TORCH_CHECK(static_cast<int64_t>(row_vars.size()) == factored &&
                  static_cast<int64_t>(col_vars.size()) == factored &&
                  static_cast<int64_t>(variances.size()) == n - factored,
              kOp, ": expected a row_var and a col_var for each of the ", factored,
              " params of 2+ dims and a variance for each of the ", n - factored,
              " others, got ", row_vars.size(), ", ", col_vars.size(), " and ",
              variances.size());
  {
    int64_t k = 0, v = 0;
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& p = params[i];
      if (p.dim() > 1) {
        check_state("row_vars", k, row_vars[k], p, with_last_dims(p.sizes(), 1));
        check_state("col_vars", k, col_vars[k], p, with_last_dims(p.sizes(), 2));
        ++k;
      } else {
        check_state("variances", v, variances[v], p, p.sizes());
        ++v;
      }
    }
  }
  // (the steps stay on the CPU, as torch.optim.Adafactor keeps them, for every device)
  check_steps(kOp, state_steps, n);
  const double inv_scale = inverse_grad_scale(kOp, grad_scale);
  lr = lr_value(kOp, lr, lr_tensor);
  const bool lr_is_f32 = lr_is_float32(lr_tensor);
  if (n == 0 || skip_step(found_inf)) return false;  // after all checks; nothing has changed yet

  // -- scalars: torch's for-loop computes them on the host, in double -------------------
  // eps1=None: torch.finfo(param.dtype).eps of the first param, kept for the group's others
  // (the for-loop assigns the variable once).
  const double e1 = eps1.has_value() ? *eps1 : finfo_eps(params[0].scalar_type());
  // (a param updated through a copy must share no element with another: Note
  // [overlapping params] in plan.cpp; checked before anything is counted or written)
  for (int64_t i = 0; i < n; ++i) {
    if (!Layouts::usual(params[i]) && params[i].numel() != 0) {
      MultiTensorPlan::check_no_overlap(kOp, i, params);
    }
  }
  const std::vector<double> steps = increment_steps(state_steps);
  plan.unscale = unscale;
  plan.decay = weight_decay != 0.0;
  // 1 - lr * weight_decay; with a float32 Tensor lr a float32 tensor op (Note [Tensor lr]).
  const double decay_factor =
      lr_is_f32 ? static_cast<double>(1.0f - static_cast<float>(lr) * static_cast<float>(weight_decay))
                : 1.0 - lr * weight_decay;
  plan.finish = Finish{lr, eps2, d, lr_is_f32};

  // -- entries --------------------------------------------------------------------------
  Layouts& layouts = plan.layouts;
  plan.entries.resize(static_cast<size_t>(n));
  plan.first_slice.assign(static_cast<size_t>(n), 0);
  plan.factor_offset.assign(static_cast<size_t>(n), -1);
  {
    int64_t k = 0, v = 0;
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& p = params[i];
      Entry& e = plan.entries[i];
      e.p = layouts.written(p);
      e.g = unscale ? layouts.written(grads[i]) : layouts.read(grads[i]);
      e.factored = p.dim() > 1;
      e.dtype = dtype_code(p.scalar_type());
      e.numel = p.numel();
      e.inv_grad_scale = inv_scale;
      e.count_sqrt = std::pow(static_cast<double>(e.numel), 0.5);  // numel ** 0.5
      e.inv_sqrt_step = 1.0 / std::pow(steps[i], 0.5);
      if (e.factored) {
        e.row = layouts.written(row_vars[k]);
        e.col = layouts.written(col_vars[k]);
        e.var = nullptr;
        ++k;
        e.rows = p.size(-2);
        e.cols = p.size(-1);
        const int64_t slices = e.numel / (e.rows * e.cols);
        plan.first_slice[i] = plan.num_slices;
        plan.num_slices += slices;
        if (p.element_size() == 2) {  // Note [Adafactor's 16-bit factors]
          plan.factor_offset[i] = plan.num_factors;
          plan.num_factors += slices * (e.rows + e.cols);
        }
      } else {
        e.var = layouts.written(variances[v]);
        e.row = e.col = nullptr;
        ++v;
        e.rows = 1;
        e.cols = e.numel;
      }
      AdafactorCoeffs& c = e.c;
      c.grad_sign = maximize ? -1.0 : 1.0;
      c.one_minus_beta2 = std::pow(steps[i], beta2_decay);  // step_float ** beta2_decay
      c.eps1 = e1;
      c.eps1_sq = e1 * e1;
      c.decay = decay_factor;
      c.step_scale = 0.0;  // after pass 2
    }
  }

  // -- tasks ----------------------------------------------------------------------------
  for (int64_t i = 0; i < n; ++i) {
    Entry& e = plan.entries[i];
    const int64_t m = e.rows, cols = e.cols;
    e.tasks2_begin = static_cast<int64_t>(plan.tasks2.size());
    if (!e.factored) {
      for (int64_t b = 0; b < e.numel; b += kChunk) {
        plan.tasks2.push_back(Task{i, 0, b, std::min(e.numel, b + kChunk), -1});
      }
      e.tasks2_end = static_cast<int64_t>(plan.tasks2.size());
      continue;
    }
    const int64_t slices = e.numel / (m * cols);
    // Pass 1: blocks of about kRowBlock elements, at most kMaxColumnPartials column sums
    // in the buffer per slice.
    int64_t blocks = std::max<int64_t>(1, (m * cols + kRowBlock - 1) / kRowBlock);
    blocks = std::min(blocks, std::max<int64_t>(1, kMaxColumnPartials / cols));
    const int64_t rows1 = (m + blocks - 1) / blocks;
    blocks = (m + rows1 - 1) / rows1;
    // Passes 2 and 3: whole rows, about kChunk elements.
    const int64_t rows2 = std::max<int64_t>(1, kChunk / cols);
    for (int64_t s = 0; s < slices; ++s) {
      if (blocks > 1) plan.multi.push_back(MultiBlockSlice{i, s, plan.partials_size, blocks});
      for (int64_t r = 0; r < m; r += rows1) {
        plan.tasks1.push_back(
            Task{i, s, r, std::min(m, r + rows1), blocks > 1 ? plan.partials_size : -1});
        if (blocks > 1) plan.partials_size += cols;
      }
      for (int64_t r = 0; r < m; r += rows2) {
        plan.tasks2.push_back(Task{i, s, r, std::min(m, r + rows2), -1});
      }
    }
    e.tasks2_end = static_cast<int64_t>(plan.tasks2.size());
  }
  return true;
}

}  // namespace fused_optim::adafactor
