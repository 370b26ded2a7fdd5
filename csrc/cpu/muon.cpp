// Muon (fused_optim::muon_): momentum, then Newton-Schulz orthogonalization of each 2-D
// update, then decoupled weight decay and the shape-adjusted step. The third kind of
// kernel of the library, next to the elementwise updates and the norms (grad_norm.cpp):
// its heart is matrix products, which ATen's BLAS (oneDNN / MKL on the CPU, cuBLAS on CUDA)
// computes on all the group's params of one shape at once, as one batched product per
// iteration; what this file fuses is the elementwise work around them.
#include <torch/library.h>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <map>
#include <utility>
#include <vector>

#include "cpu/grad_norm.h"
#include "cpu/multi_tensor.h"
#include "direct_call.h"
#include "plan.h"
#include "update_rules.h"

namespace fused_optim::cpu {
namespace {

constexpr const char* kOp = "fused_optim::muon_";

// Note [Muon as torch computes it]
// torch.optim.Muon's for-loop (torch/optim/_muon.py), per param, in the param's dtype T:
//   buf.lerp_(grad, 1 - momentum)
//   update = grad.lerp(buf, momentum) if nesterov else buf
//   X = update.bfloat16(), transposed (a view) if rows > cols
//   X.div_(X.norm().clamp(min=eps))               # in bfloat16
//   ns_steps times:  A = X @ X.T;  B = addmm(A, A, A, beta=b, alpha=c)
//                    X = addmm(X, B, X, beta=a)    # bfloat16 products
//   param.mul_(1 - lr * weight_decay)
//   param.add_(X (transposed back), alpha=-lr * ratio(shape))
// The Newton-Schulz iterations run in bfloat16 whatever T is, so the update has bfloat16's
// 8-bit precision. We compute the same expressions in the same order: the elementwise
// passes below bitwise as torch's kernels do (lerp's two forms, the fma of add with
// alpha, bfloat16 rounding, the norm: Note [global norm] in grad_norm.cpp), the products
// with the same ATen calls on a stacked batch of all params of one shape (bmm and baddbmm
// instead of mm and addmm; a param alone in its shape takes mm and addmm). A batched
// product gives the same bits as the single products wherever BLAS computes each matrix
// of the batch the way it computes one matrix; on
// oneDNN's bfloat16 kernels (AVX512-BF16, torch 2.13) it does, at every thread count we
// tried (1 to 16) and for every shape in tests/test_muon.py. BLAS promises neither, and
// the iterations are sensitive to a product rounded the other way, so the tests allow a
// tolerance where BLAS batches otherwise (Note [Muon's tolerance] in tests/test_muon.py).
//
// Note [Muon's bfloat16 buffer]
// With bfloat16 params and nesterov=False, torch's `update` is the momentum buffer
// itself. Before torch 2.15, update.bfloat16() returned that same tensor, and the
// in-place normalization divided the buffer by its norm: torch's next step started from
// the normalized buffer. torch 2.15 copies it (`grad.to(dtype=torch.bfloat16,
// copy=True)`), and the buffer stays as the momentum made it. We do what the installed
// torch does (normalize_buffer: fused_optim/muon.py asks torch's own function once per
// process), so that the two stay interchangeable (a checkpoint, a switch of optimizer
// mid-training).

// The update's scaling by shape, as torch's _adjust_lr: 0 is None or "original", 1 is
// "match_rms_adamw", 3 is "spectral_unclamped" (torch 2.14), 2 no adjustment
// (fused_optim/muon.py maps the names by what the installed torch's _adjust_lr computes).
double lr_ratio(int64_t adjust, int64_t rows, int64_t cols) {
  if (adjust == 0) {
    return std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
  }
  if (adjust == 1) return 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)));
  if (adjust == 3) return std::sqrt(static_cast<double>(rows) / static_cast<double>(cols));
  return 1.0;
}

// The two scalars of one param's final update: param * decay + alpha * update. A float32
// Tensor lr makes them float32 tensor ops in torch (Note [Tensor lr] in plan.h):
// `1 - lr * weight_decay` and `lr * ratio` each rounded to float.
struct FinalScalars {
  double decay;
  double alpha;
};

FinalScalars final_scalars(double lr, bool lr_f32, double weight_decay, double ratio) {
  if (lr_f32) {
    const float lr_f = static_cast<float>(lr);
    const float decay = 1.0f - lr_f * static_cast<float>(weight_decay);
    return {decay, -static_cast<double>(lr_f * static_cast<float>(ratio))};
  }
  return {1.0 - lr * weight_decay, -(lr * ratio)};
}

void check_inputs(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                  c10::Device device) {
  TORCH_CHECK(grads.size() == params.size() && bufs.size() == params.size(), kOp,
              ": expected as many grads and momentum buffers as params, got ", grads.size(),
              ", ", bufs.size(), " and ", params.size());
  const char* names[2] = {"grads", "momentum_buffers"};
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), kOp, ": params[", i, "] is undefined");
    // torch's errors (its step's), with its exception types.
    TORCH_CHECK_VALUE(p.dim() == 2, "Param gradient must be a 2D matrix");
    TORCH_CHECK(!p.is_complex(), "Muon does not support complex parameters");
    TORCH_CHECK(!p.is_sparse() && p.layout() == at::kStrided, kOp,
                ": params must be dense tensors");
    TORCH_CHECK(p.device() == device, kOp, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device);
    const auto dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                kOp, ": unsupported dtype ", dt);
    const at::Tensor* companions[2] = {&grads[i], &bufs[i]};
    for (int k = 0; k < 2; ++k) {
      const at::Tensor& t = *companions[k];
      TORCH_CHECK(t.defined(), kOp, ": ", names[k], "[", i, "] is undefined");
      if (k == 0) {
        TORCH_CHECK(!t.is_sparse(), "Muon does not support sparse gradients");
        TORCH_CHECK_VALUE(t.dim() == 2, "Param gradient must be a 2D matrix");
      }
      TORCH_CHECK(t.layout() == at::kStrided, kOp, ": ", names[k], "[", i,
                  "] must be a dense tensor");
      TORCH_CHECK(t.device() == p.device(), kOp, ": ", names[k], "[", i, "] is on ",
                  t.device(), " but its param is on ", p.device());
      TORCH_CHECK(t.scalar_type() == dt, kOp, ": ", names[k], "[", i, "] has dtype ",
                  t.scalar_type(), " but its param has dtype ", dt);
      TORCH_CHECK(t.sizes() == p.sizes(), kOp, ": ", names[k], "[", i, "] has shape ",
                  t.sizes(), " but its param has shape ", p.sizes());
      check_storage_holds(kOp, names[k], static_cast<int64_t>(i), t);  // (plan.h)
      if (k == 1) refuse_internal_overlap(t);
    }
    check_storage_holds(kOp, "params", static_cast<int64_t>(i), p);
    refuse_internal_overlap(p);
  }
}

void check_ns(int64_t ns_steps) {
  // torch's check (in _zeropower_via_newtonschulz); a negative count runs none there.
  TORCH_CHECK_VALUE(ns_steps < 100,
                    "Number of steps must be less than 100 for computational efficiency");
}

// What both kernels (muon_aten, muon_cpu) take from their arguments, every check first.
struct StepInputs {
  bool unscale;      // a GradScaler's grad_scale is given
  double inv_scale;  // 1/scale as GradScaler rounds it
  double lr;         // lr's value (a float or a Tensor lr)
  bool lr_f32;       // a float32 Tensor lr (Note [Tensor lr])
  bool skip;         // found_inf says the step is skipped
};

StepInputs step_inputs(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                       c10::Device device, int64_t ns_steps, double lr,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  check_inputs(params, grads, bufs, device);
  check_ns(ns_steps);
  return {has_tensor(grad_scale), inverse_grad_scale(kOp, grad_scale),
          lr_value(kOp, lr, lr_tensor), lr_is_float32(lr_tensor), skip_step(found_inf)};
}

// The params of one shape, in list order, and their stacked bfloat16 updates.
struct ShapeGroup {
  int64_t rows = 0, cols = 0;
  std::vector<int64_t> members;
  at::Tensor x;  // (members, rows, cols), bfloat16, contiguous: make_stack
};

// Note [Muon's overlapping params]
// torch's for-loop updates a group's params one after the other, so where two share
// memory (views of one flat buffer) the second's update (its weight decay reads the param)
// starts from the first's result. The shape groups run in another order, and the small
// ones side by side on threads; so a call whose params' memory overlaps makes one group per
// param, in list order, run on the calling thread (for_groups): the for-loop's bits. The
// check takes each param's span of bytes, from its first element to its last: a strided
// param's span may hold elements of another that it does not share, which only costs the
// batching.
bool params_overlap(at::TensorList params) {
  std::vector<std::pair<const char*, const char*>> spans;
  spans.reserve(params.size());
  for (const at::Tensor& p : params) {
    if (p.numel() == 0) continue;
    int64_t last = 0;  // the offset of the last element, in elements
    for (int64_t d = 0; d < p.dim(); ++d) last += (p.size(d) - 1) * std::abs(p.stride(d));
    const auto* lo = static_cast<const char*>(p.const_data_ptr());
    spans.emplace_back(lo, lo + (last + 1) * static_cast<int64_t>(p.element_size()));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t j = 0; j + 1 < spans.size(); ++j) {
    if (spans[j].second > spans[j + 1].first) return true;
  }
  return false;
}

// The params' shape groups, each group's members in list order; with `one_per_param`
// (Note [Muon's overlapping params]), one group per param, in list order.
std::vector<ShapeGroup> group_by_shape(at::TensorList params, bool one_per_param) {
  std::map<std::pair<int64_t, int64_t>, size_t> where;
  std::vector<ShapeGroup> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto key = std::make_pair(params[i].size(0), params[i].size(1));
    auto it = where.find(key);
    if (one_per_param || it == where.end()) {
      it = where.insert_or_assign(key, groups.size()).first;
      groups.emplace_back();
      groups.back().rows = key.first;
      groups.back().cols = key.second;
    }
    groups[it->second].members.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

// The group's stack, made when the group's turn comes and released after it (one group's
// bfloat16 updates alive at a time, as torch's for-loop has one param's).
void make_stack(ShapeGroup& g, const at::TensorOptions& opts) {
  g.x = at::empty({static_cast<int64_t>(g.members.size()), g.rows, g.cols},
                  opts.dtype(at::kBFloat16));
}

// Newton-Schulz on a stack of bfloat16 matrices (Note [Muon as torch computes it]),
// normalized already; returns the stack in the params' orientation (maybe a transposed
// view).
// A stack of one matrix takes the 2-D products, torch's own calls (mm, addmm): a batched
// product of one matrix is no faster, and oneDNN's was slower for some shapes (GPT-2's
// 50257 x 768 embedding on an Intel Xeon with AMX, torch 2.13: 765-818 ms against 562-586
// ms for the five iterations, the same bits); and BLAS promises mm's bits only for mm.
//
// Note [Muon's products]
// A group's matrices go through one batched product per iteration only while they are
// small: from kMatrixByMatrix elements up, each matrix takes the 2-D products on its own.
// Measured on this project's AMD EPYC (Zen 5), oneDNN, torch 2.13, five iterations: at 1
// thread, 3 matrices of 64 x 64 batched 0.29 ms against 0.81 one by one, 128 x 128 0.66
// against 1.15, 256 x 256 3.39 against 3.79, but 512 x 512 28.3 against 25.5; at 2 threads
// GPT-2's 12 matrices of 768 x 768 228 ms batched against 183, 768 x 2304 548 against 490,
// 768 x 3072 691 against 626 (W2-2d was 0.92x torch's for-loop, which makes the 2-D calls).
// Either way each matrix gets the bits of its own product on oneDNN (Note [Muon as torch
// computes it]); the 2-D calls are torch's own, so the bigger matrices are bitwise torch's
// on any BLAS whose bits do not follow the thread count (Note [Muon's small groups]).
constexpr int64_t kMatrixByMatrix = int64_t{1} << 17;
at::Tensor newton_schulz(const at::Tensor& stack, int64_t rows, int64_t cols, double a,
                         double b, double c, int64_t ns_steps) {
  const bool tall = rows > cols;
  if (stack.size(0) == 1) {
    at::Tensor x = tall ? stack[0].transpose(0, 1) : stack[0];
    for (int64_t k = 0; k < ns_steps; ++k) {
      const at::Tensor gram = at::mm(x, x.transpose(0, 1));
      const at::Tensor gram_update = at::addmm(gram, gram, gram, /*beta=*/b, /*alpha=*/c);
      x = at::addmm(x, gram_update, x, /*beta=*/a);
    }
    return (tall ? x.transpose(0, 1) : x).unsqueeze(0);
  }
  at::Tensor x = tall ? stack.transpose(1, 2) : stack;
  for (int64_t k = 0; k < ns_steps; ++k) {
    const at::Tensor gram = at::bmm(x, x.transpose(1, 2));
    const at::Tensor gram_update = at::baddbmm(gram, gram, gram, /*beta=*/b, /*alpha=*/c);
    x = at::baddbmm(x, gram_update, x, /*beta=*/a);
  }
  return tall ? x.transpose(1, 2) : x;
}

// ---- any device, through ATen ops ------------------------------------------------------

// A number as Python passes it to a binary op: a wrapped 0-dim double tensor, which the
// kernel of a 16-bit tensor reads in float (a C++ Scalar would be rounded to the tensor's
// dtype first).
at::Tensor wrapped(double v) {
  at::Tensor t = at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble));
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

// Note [Muon on CUDA]
// The same computation as muon_cpu, written with ATen's foreach and batched ops, so it runs
// on any device (CUDA's kernel; on the CPU, fused_optim::_muon_aten_ lets the tests check
// this code without a GPU). The products are the same calls as on the CPU; the
// elementwise parts are torch's own ops, a few passes instead of two. The updates' norms
// are one _foreach_norm, which on CUDA need not add in the order of torch's norm of one
// matrix (on the CPU it is that norm).
void muon_aten(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               double lr, double weight_decay, double momentum, bool nesterov, double ns_a,
               double ns_b, double ns_c, double eps, int64_t ns_steps, int64_t adjust_lr,
               bool normalize_buffer,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const StepInputs in = step_inputs(params, grads, momentum_buffers, params[0].device(),
                                    ns_steps, lr, lr_tensor, grad_scale, found_inf);
  if (in.skip) return;
  const bool unscale = in.unscale, lr_f32 = in.lr_f32;
  const double inv_scale = in.inv_scale;
  lr = in.lr;

  // (Numbers as Python passes them: wrapped().)
  if (unscale) {
    const at::Tensor inv = wrapped(inv_scale);
    for (const at::Tensor& g : grads) at::Tensor(g).mul_(inv);
  }
  at::_foreach_lerp_(momentum_buffers, grads, at::Scalar(1.0 - momentum));
  std::vector<at::Tensor> updates =
      nesterov ? at::_foreach_lerp(grads, momentum_buffers, at::Scalar(momentum))
               : momentum_buffers.vec();
  std::vector<ShapeGroup> groups = group_by_shape(params, params_overlap(params));
  for (ShapeGroup& g : groups) {
    make_stack(g, params[0].options());
    std::vector<at::Tensor> members, bufs, ps;
    for (int64_t i : g.members) {
      members.push_back(updates[i]);
      bufs.push_back(momentum_buffers[i]);
      ps.push_back(params[i]);
    }
    const int64_t n = static_cast<int64_t>(members.size());
    g.x.copy_(at::stack(members));
    // (torch's X.norm() of a 1x1 matrix is its |x|; CUDA's _foreach_norm squares it)
    const at::Tensor norms =
        g.rows * g.cols == 1 ? g.x.abs()
                             : at::stack(at::_foreach_norm(g.x.unbind(0), 2)).view({n, 1, 1});
    g.x.div_(norms.clamp_min(eps));
    // Note [Muon's bfloat16 buffer]
    for (int64_t j = 0; j < n && normalize_buffer && !nesterov; ++j) {
      if (bufs[j].scalar_type() == at::kBFloat16) bufs[j].copy_(g.x[j]);
    }
    const at::Tensor u = newton_schulz(g.x, g.rows, g.cols, ns_a, ns_b, ns_c, ns_steps);
    const FinalScalars sc =
        final_scalars(lr, lr_f32, weight_decay, lr_ratio(adjust_lr, g.rows, g.cols));
    // Per param, torch's own two calls as Python makes them. Python's param.mul_(float)
    // passes the number as a wrapped 0-dim tensor, which a 16-bit param's kernel reads in
    // float; Tensor::mul_(Scalar) and _foreach_mul_ would round it to the param's dtype
    // first. A bfloat16 update added to a param of another dtype is computed in their
    // common dtype.
    const at::Tensor decay = wrapped(sc.decay);
    for (int64_t j = 0; j < n; ++j) {
      ps[j].mul_(decay);
      ps[j].add_(u[j], at::Scalar(sc.alpha));
    }
    g.x.reset();
  }
}

// ---- the CPU kernel --------------------------------------------------------------------

// Note [torch's bfloat16 add]
// torch's param.add_(update, alpha=-lr) on bfloat16 params and a bfloat16 update converts
// alpha to bfloat16, and then computes each element one of two ways: in its vector loop
// (contiguous operands) fma(update, alpha, param) in float, rounded once; in its scalar
// loop (the last n % lanes elements of each contiguous run, and every element where the
// update is a transposed view: a tall matrix after Newton-Schulz) with bfloat16
// arithmetic, param + bfloat16(alpha * update), rounded twice. `lanes` is the length of
// its bfloat16 vector (32 with AVX-512, 16 otherwise, ATen's run-time choice). We do the
// same, for one contiguous run per param: what torch does on one thread. On several
// threads torch splits a param of 32,768 elements or more into runs, one per thread, each
// with its own scalar tail, so its bits there depend on its thread count; ours do not.
int64_t torch_bf16_lanes() {
  static const int64_t lanes = at::get_cpu_capability() == "AVX512" ? 32 : 16;
  return lanes;
}


// Where one param's elements are read and written: its own tensors, or contiguous
// temporaries (copied back after the step) where a layout is not plain row-major.
struct Slot {
  at::Tensor p, g, buf;  // contiguous
  bool p_temp = false, g_temp = false, buf_temp = false;
  // A bfloat16 param that is not row-major, stepped by ATen's mul_ and add_ on the param
  // itself, on the calling thread (Note [torch's bfloat16 add]), with `update` and these
  // scalars; its contiguous copy is not written back.
  bool aten_step = false;
  at::Tensor update;
  double decay = 1.0, alpha = 0.0;
  int64_t group = 0, index = 0;  // its shape group, and its place in that group's stack
};

// Fixed pieces of each param's elements: the passes are elementwise, so where a thread
// boundary falls changes no result.
struct Piece {
  int64_t slot, begin, end;
};
constexpr int64_t kPiece = 16384;

std::vector<Piece> pieces_of(const std::vector<Slot>& slots) {
  std::vector<Piece> pieces;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t n = slots[i].p.numel();
    for (int64_t b = 0; b < n; b += kPiece) {
      pieces.push_back({static_cast<int64_t>(i), b, std::min(n, b + kPiece)});
    }
  }
  return pieces;
}

// The loops of the three elementwise passes, compiled for the baseline and, on x86-64,
// for AVX2+FMA and AVX-512 (Note [ISA dispatch] in multi_tensor.h): the same source, every
// fma explicit, so every copy gives the same bits; the widest the CPU has runs.
template <typename T>
struct MomentumArgs {
  using M = at::opmath_type<T>;
  LerpWeight<M> to_grad, to_buf;  // buf.lerp_(grad, 1 - momentum), grad.lerp(buf, momentum)
  M inv_scale;
  bool unscale, nesterov;
};

// Pass 1: unscale, momentum, nesterov, bfloat16 (Note [Muon as torch computes it]).
template <typename T>
FO_INLINE void momentum_loop(const MomentumArgs<T>& a, T* g, T* buf, c10::BFloat16* x,
                             int64_t begin, int64_t end) {
  using M = at::opmath_type<T>;
  for (int64_t k = begin; k < end; ++k) {
    M gv = cpu::load(g + k);
    if (a.unscale) {
      store(gv * a.inv_scale, g + k);
      gv = cpu::load(g + k);
    }
    store(a.to_grad(cpu::load(buf + k), gv), buf + k);
    const M bv = cpu::load(buf + k);
    M u = bv;
    if (a.nesterov) {
      T rounded;
      store(a.to_buf(gv, bv), &rounded);
      u = cpu::load(&rounded);
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      store(u, x + k);
    } else {
      store(static_cast<float>(u), x + k);  // (a double is rounded to float first, as c10 does)
    }
  }
}

// x /= the clamped norm, in float, rounded to bfloat16 (torch's div_ by a 0-dim tensor);
// with `buf`, also stored there (Note [Muon's bfloat16 buffer]).
FO_INLINE void normalize_loop(c10::BFloat16* x, c10::BFloat16* buf, float d, int64_t begin,
                              int64_t end) {
  for (int64_t k = begin; k < end; ++k) store(cpu::load(x + k) / d, x + k);
  if (buf != nullptr) {
    for (int64_t k = begin; k < end; ++k) buf[k] = x[k];
  }
}

// Pass 2: param.mul_(decay); param.add_(update, alpha): fma(update, alpha, param) up to
// `fused_end`, and after it (bfloat16 only: Note [torch's bfloat16 add]) the two roundings
// of torch's scalar loop.
template <typename T>
FO_INLINE void step_loop(T* p, const c10::BFloat16* u, at::opmath_type<T> decay,
                         at::opmath_type<T> alpha, int64_t fused_end, int64_t begin,
                         int64_t end) {
  using M = at::opmath_type<T>;
  const int64_t mid = std::clamp(fused_end, begin, end);
  for (int64_t k = begin; k < mid; ++k) {
    store(cpu::load(p + k) * decay, p + k);
    store(fused_optim::fma_<M>(static_cast<M>(cpu::load(u + k)), alpha, cpu::load(p + k)), p + k);
  }
  for (int64_t k = mid; k < end; ++k) {
    store(cpu::load(p + k) * decay, p + k);
    c10::BFloat16 product;
    store(alpha * cpu::load(u + k), &product);
    store(cpu::load(p + k) + cpu::load(&product), p + k);
  }
}

template <typename T>
struct MuonLoops {
  void (*momentum)(const MomentumArgs<T>&, T*, T*, c10::BFloat16*, int64_t, int64_t);
  void (*normalize)(c10::BFloat16*, c10::BFloat16*, float, int64_t, int64_t);
  void (*step)(T*, const c10::BFloat16*, at::opmath_type<T>, at::opmath_type<T>, int64_t,
               int64_t, int64_t);
};

#define FO_MUON_LOOPS(SUFFIX, ATTR)                                                          \
  template <typename T>                                                                     \
  ATTR void momentum_##SUFFIX(const MomentumArgs<T>& a, T* g, T* buf, c10::BFloat16* x,     \
                              int64_t b, int64_t e) {                                       \
    momentum_loop<T>(a, g, buf, x, b, e);                                                   \
  }                                                                                         \
  ATTR inline void normalize_##SUFFIX(c10::BFloat16* x, c10::BFloat16* buf, float d,        \
                                      int64_t b, int64_t e) {                               \
    normalize_loop(x, buf, d, b, e);                                                        \
  }                                                                                         \
  template <typename T>                                                                     \
  ATTR void step_##SUFFIX(T* p, const c10::BFloat16* u, at::opmath_type<T> decay,           \
                          at::opmath_type<T> alpha, int64_t f, int64_t b, int64_t e) {      \
    step_loop<T>(p, u, decay, alpha, f, b, e);                                              \
  }                                                                                         \
  template <typename T>                                                                     \
  MuonLoops<T> loops_##SUFFIX() {                                                           \
    return {&momentum_##SUFFIX<T>, &normalize_##SUFFIX, &step_##SUFFIX<T>};                  \
  }

FO_MUON_LOOPS(baseline, )
#if FO_X86_CLONES
FO_MUON_LOOPS(avx2, FO_AVX2_TARGET)
FO_MUON_LOOPS(avx512, FO_AVX512_TARGET)
#endif
#undef FO_MUON_LOOPS

template <typename T>
MuonLoops<T> muon_loops() {
#if FO_X86_CLONES
  if (cpu_isa() >= Isa::kAvx512) return loops_avx512<T>();
  if (cpu_isa() == Isa::kAvx2) return loops_avx2<T>();
#endif
  return loops_baseline<T>();
}

void for_pieces(const std::vector<Piece>& pieces, const std::function<void(const Piece&)>& f) {
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(pieces[k]);
  });
}

// Note [Muon's small groups]
// The products of matrices under kSmallMatrix elements gain little from the threads of one
// product (oneDNN's bfloat16 Newton-Schulz chain on this project's Zen 5, 2 threads against
// 1: 1.11x at 128 x 128, 1.54x at 256, 1.56x at 512, 2.06x at 768), and most shape groups of
// a model with many small matrices hold one to three of them (W5: 500 matrices, 170
// shapes). So those groups run side by side, each whole on one thread (its elementwise
// passes, its products, with oneDNN single-threaded inside the parallel region), the
// costliest first, each thread taking the next group when it is done; the groups of larger
// matrices then run one at a time with all the threads, as does a small group that costs
// more than a thread's share of them all, and every group where the caller's thread-local
// state holds more than dispatch keys (plain_caller). BLAS gives a product the same bits
// at every thread count on oneDNN (Note [Muon as torch computes it]; tests/test_muon.py
// compares at 1 and 2 threads), and every param's computation is its own, so this changes
// no bit there; on a BLAS whose bits follow the thread count, the products of a small
// group are one thread's. The worker threads take the caller's dispatch keys, grad mode
// and autocast dtype for the ATen ops of a group (CallerState), and touch no tensor that
// Python holds: a step called from Python's thread with the GIL held (Note [direct
// calls]) would wait forever in a worker that copies such a tensor (an at::Tensor copy
// increfs its PyObject, which takes the GIL). So a group's kernels write the user's
// tensors through raw pointers only, and what went through a contiguous copy (a strided
// param, grad or buffer) is copied back on the calling thread after the parallel region.
// At most one small group per thread is alive at once (Note [Muon's memory]).
constexpr int64_t kSmallMatrix = int64_t{1} << 19;

// What of the caller's thread-local state the ATen ops of a group see on a worker: the
// dispatch keys (autocast, and any the caller excludes), grad mode and the CPU autocast
// dtype. Not the whole at::ThreadLocalState: copying its Python objects (saved-tensor
// hooks, for one) would take the GIL.
struct CallerState {
  c10::impl::LocalDispatchKeySet keys = c10::impl::tls_local_dispatch_key_set();
  bool grad = c10::GradMode::is_enabled();
  at::ScalarType autocast_dtype = at::autocast::get_autocast_dtype(at::kCPU);
};
struct CallerStateGuard {
  explicit CallerStateGuard(const CallerState& s)
      : keys(s.keys), grad(s.grad), autocast_dtype(at::autocast::get_autocast_dtype(at::kCPU)) {
    at::autocast::set_autocast_dtype(at::kCPU, s.autocast_dtype);
  }
  ~CallerStateGuard() { at::autocast::set_autocast_dtype(at::kCPU, autocast_dtype); }
  CallerStateGuard(const CallerStateGuard&) = delete;
  CallerStateGuard& operator=(const CallerStateGuard&) = delete;
  c10::impl::ForceDispatchKeyGuard keys;
  c10::AutoGradMode grad;
  at::ScalarType autocast_dtype;  // the worker's own, restored
};

// Whether the ATen ops of a group may run on a worker: not where the caller's thread-local
// state is more than dispatch keys (a dispatch mode, functorch's or Python's keys, whose
// state a worker would lack): there every group runs on the calling thread.
bool plain_caller() {
  return c10::impl::tls_local_dispatch_key_set().included_ == c10::default_included_set &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

void for_groups(const std::vector<ShapeGroup>& groups, const std::function<void(size_t)>& run,
                const std::function<void(size_t)>& copy_back, bool in_list_order) {
  if (in_list_order) {  // Note [Muon's overlapping params]
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      run(gi);
      copy_back(gi);
    }
    return;
  }
  auto cost = [&](size_t gi) {
    const ShapeGroup& g = groups[gi];
    return static_cast<double>(g.members.size()) * static_cast<double>(g.rows) *
           static_cast<double>(g.cols) * static_cast<double>(std::min(g.rows, g.cols));
  };
  std::vector<size_t> small, large;
  double small_cost = 0.0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const bool is_small = groups[gi].rows * groups[gi].cols < kSmallMatrix;
    (is_small ? small : large).push_back(gi);
    if (is_small) small_cost += cost(gi);
  }
  const int threads = at::get_num_threads();
  if (small.size() > 1 && threads > 1 && !at::in_parallel_region() && plain_caller()) {
    // A group costing more than a thread's share of them all keeps every thread (a
    // model whose few small shapes are most of its step would otherwise run them on one).
    std::vector<size_t> side_by_side;
    for (size_t gi : small) (cost(gi) > small_cost / threads ? large : side_by_side).push_back(gi);
    std::stable_sort(side_by_side.begin(), side_by_side.end(),
                     [&](size_t a, size_t b) { return cost(a) > cost(b); });
    std::atomic<size_t> next{0};
    std::vector<char> done(side_by_side.size(), 0);
    const CallerState caller;
    try {
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        const CallerStateGuard guard(caller);
        for (size_t k = next++; k < side_by_side.size(); k = next++) {
          try {
            run(side_by_side[k]);
          } catch (...) {
            next = side_by_side.size();  // (the other threads stop at their next group)
            throw;
          }
          done[k] = 1;
        }
      });
    } catch (...) {
      // What the finished groups changed in place stays, as on the calling thread: their
      // copies go back too, so no param is left without its strided update.
      for (size_t k = 0; k < side_by_side.size(); ++k) {
        if (done[k]) copy_back(side_by_side[k]);
      }
      throw;
    }
    for (size_t gi : side_by_side) copy_back(gi);
  } else {
    large.insert(large.begin(), small.begin(), small.end());
  }
  for (size_t gi : large) {
    run(gi);
    copy_back(gi);
  }
}

FO_INLINE c10::BFloat16 to_bf16(float v) {
  c10::BFloat16 out;
  narrow(v, &out);
  return out;
}

void muon_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double weight_decay, double momentum, bool nesterov, double ns_a,
              double ns_b, double ns_c, double eps, int64_t ns_steps, int64_t adjust_lr,
              bool normalize_buffer,
              const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const StepInputs in = step_inputs(params, grads, momentum_buffers, c10::Device(c10::kCPU),
                                    ns_steps, lr, lr_tensor, grad_scale, found_inf);
  const at::ScalarType dtype = params[0].scalar_type();
  for (const at::Tensor& p : params) {
    if (p.scalar_type() != dtype) {  // a group of several dtypes (rare): ATen's ops
      muon_aten(params, grads, momentum_buffers, lr, weight_decay, momentum, nesterov, ns_a,
                ns_b, ns_c, eps, ns_steps, adjust_lr, normalize_buffer, lr_tensor, grad_scale,
                found_inf);
      return;
    }
  }
  if (in.skip) return;
  const bool unscale = in.unscale, lr_f32 = in.lr_f32;
  const double inv_scale = in.inv_scale;
  lr = in.lr;

  const bool overlap = params_overlap(params);
  std::vector<ShapeGroup> groups = group_by_shape(params, overlap);
  const at::TensorOptions options = params[0].options();
  std::vector<Slot> slots(params.size());
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    for (size_t j = 0; j < groups[gi].members.size(); ++j) {
      const int64_t i = groups[gi].members[j];
      Slot& s = slots[i];
      s.group = static_cast<int64_t>(gi);
      s.index = static_cast<int64_t>(j);
      auto take = [](const at::Tensor& t, at::Tensor& out, bool& temp) {
        temp = !t.is_contiguous() || t.is_neg() || t.is_conj();
        out = temp ? t.contiguous().resolve_neg() : t;
      };
      take(params[i], s.p, s.p_temp);
      s.aten_step = dtype == at::kBFloat16 && !params[i].is_contiguous() && !params[i].is_neg();
      // (a param updated through a copy must share no element with another: Note
      // [overlapping params] in plan.cpp)
      if (s.p_temp && params[i].numel() != 0) MultiTensorPlan::check_no_overlap(kOp, i, params);
      take(grads[i], s.g, s.g_temp);
      take(momentum_buffers[i], s.buf, s.buf_temp);
    }
  }
  // Group by group (Note [Muon's memory]): each group's pieces, in list order.
  std::vector<std::vector<Piece>> group_pieces(groups.size());
  for (const Piece& pc : pieces_of(slots)) group_pieces[slots[pc.slot].group].push_back(pc);
  auto stacked = [&](const Slot& s) {
    return groups[s.group].x.data_ptr<c10::BFloat16>() +
           s.index * groups[s.group].rows * groups[s.group].cols;
  };

  dispatch_dtype(dtype, [&]<typename T>() -> SegmentFn {
    using M = at::opmath_type<T>;
    const MuonLoops<T> loops = muon_loops<T>();
    const MomentumArgs<T> margs{LerpWeight<M>(1.0 - momentum), LerpWeight<M>(momentum),
                                static_cast<M>(inv_scale), unscale, nesterov};
    constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
    const float eps_bf16 = static_cast<float>(c10::BFloat16(static_cast<float>(eps)));
    const int64_t bf16_lanes = torch_bf16_lanes();
    // Note [Muon's memory]
    // One shape group at a time, from its momentum to its params' update: the bfloat16
    // stack of the group's updates and the products' results are the only temporaries of
    // the params' size, and only one group's are alive at once (a W2-2d step: 536 MiB more
    // at its peak with every group's stack made first, torch's for-loop 294 MiB); one per
    // thread for the small groups (Note [Muon's small groups]). Every param's computation
    // is its own, so the order of the groups changes no bit.
    auto run_group = [&](size_t gi) {
      ShapeGroup& g = groups[gi];
      const std::vector<Piece>& pieces = group_pieces[gi];
      make_stack(g, options);
      for_pieces(pieces, [&](const Piece& pc) {
        const Slot& s = slots[pc.slot];
        loops.momentum(margs, s.g.data_ptr<T>(), s.buf.data_ptr<T>(), stacked(s), pc.begin,
                       pc.end);
      });

      // Each update's norm, bitwise torch's (Note [global norm]), then its clamp and the
      // division, in bfloat16 as torch's div_ by a 0-dim tensor computes it (in float).
      std::vector<at::Tensor> matrices;
      matrices.reserve(g.members.size());
      for (size_t j = 0; j < g.members.size(); ++j) matrices.push_back(g.x[static_cast<int64_t>(j)]);
      const at::Tensor norms = norms_cpu(matrices, 2.0, 1.0);
      const c10::BFloat16* nv = norms.const_data_ptr<c10::BFloat16>();
      std::vector<float> divisors(g.members.size());
      for (size_t j = 0; j < g.members.size(); ++j) {
        const float n = static_cast<float>(nv[j]);
        // clamp(min=eps): a NaN norm stays; a NaN eps makes every divisor NaN, as
        // torch's clamp with a NaN bound does
        divisors[j] = n < eps_bf16 || eps_bf16 != eps_bf16 ? eps_bf16 : n;
      }
      for_pieces(pieces, [&](const Piece& pc) {
        const Slot& s = slots[pc.slot];
        c10::BFloat16* buf = nullptr;
        if constexpr (kBf16) {  // Note [Muon's bfloat16 buffer]
          if (normalize_buffer && !nesterov) buf = s.buf.data_ptr<c10::BFloat16>();
        }
        loops.normalize(stacked(s), buf, divisors[s.index], pc.begin, pc.end);
      });

      const FinalScalars sc =
          final_scalars(lr, lr_f32, weight_decay, lr_ratio(adjust_lr, g.rows, g.cols));
      // Weight decay, then the step: param.mul_(decay); param.add_(update, alpha).
      const int64_t n = g.rows * g.cols;
      const M decay = static_cast<M>(sc.decay);
      M alpha = static_cast<M>(sc.alpha);
      int64_t fused_end = n;
      if constexpr (kBf16) {
        // Note [torch's bfloat16 add]: alpha in bfloat16; torch's scalar loop at the end.
        alpha = static_cast<float>(to_bf16(alpha));
        const bool strided_update = g.rows > g.cols && g.cols > 1 && ns_steps > 0;
        fused_end = strided_update ? 0 : n - n % bf16_lanes;
      }
      // The step of the group's members from `first` on, from their updates, row-major.
      auto step = [&](const at::Tensor& updates, int64_t first) {
        const c10::BFloat16* u = updates.const_data_ptr<c10::BFloat16>();
        for_pieces(pieces, [&](const Piece& pc) {
          const Slot& s = slots[pc.slot];
          if (s.index < first || s.index >= first + updates.size(0) || s.aten_step) return;
          loops.step(s.p.data_ptr<T>(), u + (s.index - first) * n, decay, alpha, fused_end,
                     pc.begin, pc.end);
        });
        // Note [torch's bfloat16 add]: a param that is not row-major, by torch's own two
        // calls on it, with the update in the layout torch's has (a tall matrix's is a
        // transposed view): where the strides differ torch's add_ rounds twice, and where
        // they agree its vector loop follows the param's memory order (found by a fuzz,
        // 2026-12-07: such a param, stepped as its contiguous copy, was up to 80 elements
        // an ulp from torch's).
        // (The calls are copy_back's, on the calling thread: Note [Muon's small groups].)
        for (int64_t i : g.members) {
          Slot& s = slots[i];
          if (!s.aten_step || s.index < first || s.index >= first + updates.size(0)) continue;
          s.update = updates[s.index - first];
          if (g.rows > g.cols && ns_steps > 0) s.update = s.update.t().contiguous().t();
          s.decay = sc.decay;
          s.alpha = sc.alpha;
        }
      };
      // The products (Note [Muon's products]), each result made row-major for the step:
      // the whole stack at once, or matrix by matrix, each stepped as soon as it is made.
      if (n >= kMatrixByMatrix) {
        for (int64_t j = 0; j < static_cast<int64_t>(g.members.size()); ++j) {
          step(newton_schulz(g.x.narrow(0, j, 1), g.rows, g.cols, ns_a, ns_b, ns_c, ns_steps)
                   .contiguous(),
               j);
        }
      } else {
        step(newton_schulz(g.x, g.rows, g.cols, ns_a, ns_b, ns_c, ns_steps).contiguous(), 0);
      }
      g.x.reset();
    };
    // What went through contiguous copies goes back (on the calling thread: Note [Muon's
    // small groups]).
    auto copy_back = [&](size_t gi) {
      for (int64_t i : groups[gi].members) {
        const Slot& s = slots[i];
        if (s.buf_temp) momentum_buffers[i].copy_(s.buf);
        if (unscale && s.g_temp) grads[i].copy_(s.g);
        if (s.p_temp && !s.aten_step) params[i].copy_(s.p);
      }
      for (int64_t i : groups[gi].members) {
        Slot& s = slots[i];
        if (!s.aten_step || !s.update.defined()) continue;
        params[i].mul_(wrapped(s.decay));
        params[i].add_(s.update, at::Scalar(s.alpha));
        s.update.reset();
      }
    };
    for_groups(groups, run_group, copy_back, overlap);
    return nullptr;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("muon_", &muon_cpu);
  m.impl("_muon_aten_", &muon_aten);
}
// The same kernels for the optimizers' eager steps: Note [direct calls].
FO_REGISTER_DIRECT_CALL("muon_", muon_cpu);
FO_REGISTER_DIRECT_CALL("_muon_aten_", muon_aten);

#if defined(FUSED_OPTIM_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("muon_", &muon_aten);
  m.impl("_muon_aten_", &muon_aten);
}
FO_REGISTER_DIRECT_CALL("muon_@cuda", muon_aten);
#endif

}  // namespace fused_optim::cpu
