#pragma once
// What the kernels of every device share on the host: the input checks, the layout
// handling (complex views, layout temporaries, copy-on-write), and the scalar arguments
// (steps, grad scale, found_inf, lr). The CPU loops (cpu/multi_tensor.h) and the CUDA
// launches (cuda/multi_tensor.cuh) both start from a MultiTensorPlan, so a bad input gets
// the same error on every device, and always before anything is written.
//
// This header is compiled by the host compiler and by nvcc: it names no ISA and no CUDA
// API.

#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

namespace fused_optim {

// The rule's states (3 at most), and the param storage's (Note [param storage]).
constexpr int kMaxRuleStates = 3;
constexpr int kMaxStates = kMaxRuleStates + 1;
// Below this many params in a call, a plan checks its tensors on one thread.
constexpr int64_t kParallelChecks = 1024;

// The param dtypes the elementwise kernels take (the fast path of python_step.cpp leaves
// a step with others to torch's own: fused_optim/optimizer.py, _torch_grads_reason).
inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf ||
         t == at::kComplexFloat || t == at::kComplexDouble;
}

// Pointers of one tensor's data (after layout handling), as seen by a loop.
struct TensorPtrs {
  void* param;
  void* grad;
  void* state[kMaxStates];
  const void* coeffs;  // CPU: the algorithm's coefficient struct for this tensor
  double inv_grad_scale;
  // CPU: the entry the loops walk after this one (null for the last) and this entry's
  // element count, for prefetching across the boundary (Note [software prefetch]).
  const TensorPtrs* next;
  int64_t numel;
  // CPU storage loops (Note [state storage]): the param's real dtype, each state's dtype
  // and, for an 8-bit state, its block scales.
  at::ScalarType param_dtype;
  at::ScalarType state_dtype[kMaxStates];
  float* state_scale[kMaxStates];
};

// Note [param storage]
// How the kernels keep a 16-bit (bfloat16 or float16) param between steps: the
// optimizers' keyword-only options, all off by default (then the param is the update's
// float result rounded to nearest, as torch's fused kernels store it).
//   kKahan (kahan_summation=True): a compensation buffer of the param's dtype
//     (state["kahan_comp"]) holds what the last rounding lost. The rule updates the float
//     p + comp; then p = round(result), comp = round(result - p). The param so carries
//     about 16 bits of mantissa in two 16-bit tensors: 2 bytes per param.
//   kStochastic (stochastic_rounding=True): the float result is rounded stochastically
//     (Note [stochastic rounding] in rounding.h), with the param's seed and counter
//     (state["rounding_state"], an int64 [seed, counter] CPU tensor the kernel counts;
//     for a DTensor's shard the optimizer passes [seed, counter, the shard's offset]).
//   kMaster (master_weights=True): a float32 copy of the param (state["master_param"]) is
//     what the rule updates; the param is its rounding to nearest. 4 bytes per param.
//     Note [master follows the param]: the param stays the truth, the master only its
//     extra bits. Before the update, each element whose master does not round to the
//     param's bits takes the param's value (widened); the others keep their master. The
//     param was then changed outside the optimizer since its last step (a clamp, a pruning
//     mask, an edit through .data, model.load_state_dict, a master from a checkpoint that
//     does not match the model), and the change stands, as with torch.optim; unchanged
//     elements lose nothing. A step leaves each param its master's rounding, so without
//     such a change no element is taken and the step is as before. The check reads the
//     param, whose cache lines the step's stores of it read anyway.
// The states of the rule keep the param's dtype (math in float, as always). The storage's
// elementwise buffer (kahan_comp, master_param) is the plan's last state list, so layouts
// and checks treat it as any state; its loops are cpu/multi_tensor.h's storage_loop and
// cuda/multi_tensor.cuh's storage_kernel (Note [storage on CUDA]). rounding_state is a CPU
// tensor on every device: its counter is counted on the host.
enum class ParamMode : int64_t { kNearest = 0, kKahan = 1, kStochastic = 2, kMaster = 3 };

// The option of a mode, for messages.
const char* param_mode_option(ParamMode mode);

// Note [state storage]
// state_dtype (an optimizer option): the rule's states of a float32, bfloat16 or
// float16 param may have another of those dtypes, or be uint8: 8-bit block-quantized
// (Note [8-bit state] in cpu/quant8.h), each with a float32 tensor of block scales. The
// math is float whatever the storage. The op's param_aux then goes on after the mode's
// entries with the scales: for each of the plan's rule states in order, one tensor per
// param (one of ceil(numel / 256) elements where that state is uint8, ignored otherwise),
// or nothing where no state of the call is uint8 (the scales on the param's device). A call
// with any such state runs the storage loops (cpu/multi_tensor.h; on CUDA the storage
// kernel), as a param storage mode does.

struct ParamStorage {
  ParamMode mode = ParamMode::kNearest;
  // kahan_comp, rounding_state or master_param, one per param (where a mode is on), then
  // the 8-bit states' scales (Note [state storage])
  at::TensorList aux;
};

// An op's param_mode and param_aux arguments, checked: a known mode (the plan checks the
// list).
ParamStorage param_storage(const char* op, int64_t param_mode,
                           std::optional<at::TensorList> param_aux);

// A call's state lists in the rule's order, each with the op's name for it: the plan's
// errors name a state as `exp_avg_sqs[1]` (entry 1 of the call's list; they said
// `state[1][1]` until 2026-12-06, which two reviews found unclear).
struct StateLists {
  std::vector<at::TensorList> lists;
  std::vector<const char*> names;
  StateLists() = default;
  StateLists(std::initializer_list<std::pair<const char*, at::TensorList>> named) {
    for (const auto& [name, list] : named) add(name, list);
  }
  void add(const char* name, at::TensorList list) {
    names.push_back(name);
    lists.push_back(list);
  }
};

// One call's lists, checked and laid out for flat elementwise loops. Building a plan
// changes nothing; all errors are raised while building, so a bad input never leaves a
// half-applied update. The device's loops then walk its entries, and finish() writes back
// the temporaries made for unusual layouts.
class MultiTensorPlan {
 public:
  // `device_type`: where the kernel runs (CPU or CUDA). A CUDA call runs on the device of
  // params[0]; every tensor must be there.
  // `grad_mutable`: grads are written (the unscaled grad, when a GradScaler is active).
  MultiTensorPlan(const char* op, at::TensorList params, at::TensorList grads,
                  const StateLists& states, bool grad_mutable,
                  c10::DeviceType device_type = c10::DeviceType::CPU,
                  const ParamStorage& storage = {});

  // Number of tensors in the call (zero-size ones included).
  int64_t size() const { return num_tensors_; }
  // dtype of tensor i (real dtype: complex params are updated as real views).
  at::ScalarType real_dtype(int64_t i) const { return real_dtypes_[i]; }
  bool is_complex(int64_t i) const { return is_complex_[i] != 0; }
  // The rule's state lists (the storage's buffer, where there is one, comes after them).
  int num_states() const { return num_states_ - (has_storage_buffer() ? 1 : 0); }
  ParamMode param_mode() const { return param_mode_; }
  // Whether the CPU loops are the storage loops: a param storage mode, or a state whose
  // dtype is not its param's (Note [state storage]).
  bool mixed_storage() const { return mixed_ || param_mode_ != ParamMode::kNearest; }
  // Whether a state is 8-bit (its blocks must each be one thread's).
  bool has_quantized_states() const { return quantized_; }
  bool has_storage_buffer() const {
    return param_mode_ == ParamMode::kKahan || param_mode_ == ParamMode::kMaster;
  }
  // kStochastic: counts a step in each param's rounding_state and returns its stream
  // (rounding.h), by position in the lists. Call once, when the update runs.
  std::vector<uint64_t> next_rounding_streams() const;

  // The entries the loops walk: the tensors with elements, in list order.
  int64_t num_entries() const { return static_cast<int64_t>(index_.size()); }
  int64_t entry_index(int64_t j) const { return index_[j]; }  // position in the lists
  int64_t entry_numel(int64_t j) const { return offsets_[j + 1] - offsets_[j]; }
  int64_t entry_offset(int64_t j) const { return offsets_[j]; }  // prefix sum of numels
  int64_t total_numel() const { return offsets_.back(); }
  TensorPtrs& entry(int64_t j) { return ptrs_[j]; }
  const std::vector<int64_t>& offsets() const { return offsets_; }

  // Whether entries share memory that the loops write (Note [aliased params] in
  // plan.cpp): then they run on one thread, in list order.
  bool serial() const { return serial_; }

  // Copies the layout temporaries of written tensors back (on CUDA: stream-ordered).
  void finish();
  // A serial call's entry j (Note [aliased params] in plan.cpp), around its update: its
  // layout temporaries copied again from their tensors (an earlier entry may have written
  // the memory they stand for), then its written ones copied back, so that the next
  // entries read what it wrote. A call of several entries with temporaries must be walked
  // so when serial(); finish() then has none of them left to write.
  void begin_serial_entry(int64_t j);
  void end_serial_entry(int64_t j);

  // Raises where param i, updated through a copy, shares elements with another param
  // (Note [overlapping params] in plan.cpp; also Adafactor's and Muon's kernels, which
  // update such params through copies too).
  static void check_no_overlap(const char* op, int64_t i, at::TensorList params);

 private:
  // The pointers of param i whose tensors need real views or layout temporaries.
  TensorPtrs unusual_layout(int64_t i, at::TensorList params, at::TensorList grads,
                            const std::vector<at::TensorList>& states, bool grad_mutable);
  // Raises where two of param i's tensors share memory, but for a grad that is its
  // param, exactly (Note [tensors of one param that share memory] in plan.cpp).
  void refuse_shared_memory(const char* op, int64_t i, const at::Tensor& param,
                            const at::Tensor& grad, const std::vector<at::TensorList>& states,
                            const char* const* state_names, const char* storage_name) const;
  // The temporaries of entry j, as a range of temps_ (they are made in entry order).
  std::pair<size_t, size_t> temporaries_of(int64_t j) const;
  // Whether two entries' params (kParams), grads (kGrads) or states of list k (k >= 0)
  // share memory (Note [aliased params] in plan.cpp).
  static constexpr int kParams = -1;
  static constexpr int kGrads = -2;
  bool entries_share_memory(int list) const;

  int64_t num_tensors_ = 0;
  int num_states_ = 0;  // the rule's, and the storage's buffer
  ParamMode param_mode_ = ParamMode::kNearest;
  bool mixed_ = false;
  bool quantized_ = false;
  bool serial_ = false;  // Note [aliased params]
  at::TensorList rounding_states_;  // kStochastic
  std::vector<at::ScalarType> real_dtypes_;
  std::vector<char> is_complex_;  // not vector<bool>: written from several threads
  // Only tensors with elements take part in the loop.
  std::vector<int64_t> index_;    // position in the call's lists
  std::vector<int64_t> offsets_;  // prefix sums of numel, size index_.size() + 1
  std::vector<TensorPtrs> ptrs_;
  // Note [layouts]: the layout temporaries, in entry order. `list` is the list whose
  // tensor (`original`) the temporary stands for: kParams, kGrads or a state list.
  struct Temporary {
    at::Tensor original, tmp;
    int64_t entry;
    int list;
    bool written;  // copied back after the update
  };
  std::vector<Temporary> temps_;
};

// Checks a list of n step tensors: one-element tensors, all on the CPU (the for-loop's
// steps: any real dtype, as torch's for-loop takes) or, where `device` is given, all on
// that device (the steps of capturable and fused groups: float32 or float64). Returns
// true when they are on `device`.
bool check_steps(const char* op, at::TensorList steps, int64_t n,
                 std::optional<c10::Device> device = std::nullopt);

// Note [scalar states]
// Besides `step`, some algorithms keep a 0-dim state tensor per param that the update reads
// (NAdam's mu_product). torch's for-loop keeps it on the CPU, updates it with a tensor op
// in its own dtype (float32, float64 under a float64 default dtype, or the param's dtype
// after load_state_dict, which casts every state but `step`) and reads it as a Python
// float; the kernels do the same on the host, per tensor, before the update, and so need
// the steps there too (a capturable group on the GPU runs torch's step). The list is
// checked as the steps are (check_steps), any floating dtype allowed.
bool check_scalar_states(const char* op, const char* name, at::TensorList states, int64_t n,
                         std::optional<c10::Device> device = std::nullopt);
// The value of a one-element floating point CPU tensor, and its assignment (the value
// rounded to the tensor's dtype).
double scalar_state_value(const at::Tensor& t);
void set_scalar_state(const at::Tensor& t, double value);
// `value` rounded to a floating dtype (as a tensor of that dtype made from it holds it).
double round_to_dtype(double value, at::ScalarType dtype);
// Adds 1 to each (CPU) step tensor, in its dtype, and returns the new values.
std::vector<double> increment_steps(at::TensorList steps);

// True when `found_inf` says this step must be skipped (a GradScaler saw inf/NaN), and
// while a CheckingOnly is alive on this thread. Every kernel calls it once, after all its
// checks and before it changes anything.
bool skip_step(const std::optional<at::Tensor>& found_inf);

// Note [every group checked first]
// An optimizer step over several param groups is one kernel call per group. A group's
// call checks everything before it writes anything, but a later group's error used to
// come after the earlier groups were updated (their steps counted): a retry, once the
// cause was mended, stepped them twice. The eager fast path (csrc/python_step.cpp) now
// calls every group but the first with a CheckingOnly alive first: each call runs its
// checks and returns at skip_step, having written nothing; then the groups run. The checks
// run twice for those groups: on 5,000 fp32 tensors of 64 to 4,096 elements in two groups of
// 2,500 (Intel Xeon, 2 threads), SGD's step took 2.56-2.61 ms against 2.31-2.38 without,
// about 90 ns per tensor of the later groups; one group, the usual call, pays nothing. The
// general path (FusedOptimizer.step in fused_optim/optimizer.py: first steps that make state, Adafactor,
// SparseAdam, subclasses) runs group by group through the op and checks there only what
// the storage modes add (a param's dtype), for every group first: docs/parity.md.
// Whether a CheckingOnly is alive on this thread (skip_step says so too; CUDA calls whose
// found_inf stays on the device ask CudaCall::updates(), which asks this).
bool checking_only_now();
class CheckingOnly {
 public:
  CheckingOnly();
  ~CheckingOnly();
  CheckingOnly(const CheckingOnly&) = delete;
  CheckingOnly& operator=(const CheckingOnly&) = delete;

 private:
  bool before_;
};
// 1/scale rounded to float, as GradScaler.unscale_ computes it; 1 without a scaler.
double inverse_grad_scale(const char* op, const std::optional<at::Tensor>& grad_scale);
// The value of lr: a Python float, or a 1-element tensor.
double lr_value(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor);
// Note [Tensor lr]: where torch's for-loop divides a Tensor lr by a Python float (Adam's
// bias correction, Adagrad's lr decay) it computes in the lr's dtype; with a float32 lr
// the kernels round those quotients to float the same way.
inline bool lr_is_float32(const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() && lr_tensor->defined() && lr_tensor->scalar_type() == at::kFloat;
}
// Each tensor's coefficient struct (update_rules.h) for its step, as counted after this
// step's increment (Note [per-step coefficients]); the pows run once per run of equal
// steps (a group's params usually share one).
template <typename Coeffs>
std::vector<Coeffs> per_step_coeffs(const Coeffs& base, double lr, bool lr_is_f32,
                                    const std::vector<double>& steps) {
  std::vector<Coeffs> coeffs(steps.size(), base);
  for (size_t i = 0; i < steps.size(); ++i) {
    if (i > 0 && steps[i] == steps[i - 1]) {
      coeffs[i] = coeffs[i - 1];
    } else {
      coeffs[i].at(lr, lr_is_f32, steps[i]);
    }
  }
  return coeffs;
}

// Each tensor's coefficient struct where they also depend on its scalar states (Note
// [scalar states]): `update(i, c)` updates tensor i's scalar states on the host and sets
// what `c.at` reads of them; the pows run once per run of equal inputs.
template <typename Coeffs, typename Update>
std::vector<Coeffs> per_tensor_coeffs(const Coeffs& base, double lr, bool lr_is_f32,
                                      const std::vector<double>& steps, Update&& update) {
  std::vector<Coeffs> coeffs(steps.size(), base);
  Coeffs previous_inputs = base;
  for (size_t i = 0; i < steps.size(); ++i) {
    Coeffs inputs = base;
    update(i, inputs);
    if (i > 0 && steps[i] == steps[i - 1] &&
        std::memcmp(&inputs, &previous_inputs, sizeof(Coeffs)) == 0) {
      coeffs[i] = coeffs[i - 1];
    } else {
      coeffs[i] = inputs;
      coeffs[i].at(lr, lr_is_f32, steps[i]);
    }
    previous_inputs = inputs;
  }
  return coeffs;
}

inline bool has_tensor(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// Whether any two of the m byte spans [span(j).first, span(j).second) overlap (Note
// [aliased params] in plan.cpp): one pass where they come in address order; else they
// are sorted, and a set found disjoint is remembered by a hash of the spans.
bool spans_overlap(int64_t m, c10::function_ref<std::pair<const char*, const char*>(int64_t)> span);

// The bytes from a tensor's lowest element to the end of its highest (it has elements).
std::pair<const char*, const char*> extent(const at::Tensor& t);

// A tensor the step writes whose elements share memory (an expanded state, or an expanded
// grad that a GradScaler step unscales in place): torch's in-place ops refuse to write it,
// with this error. Refused in pass 1, before anything is written (a layout temporary's
// write-back raised it after the update: found by a review, 2026-12-06).
inline void refuse_internal_overlap(const at::Tensor& t) {
  TORCH_CHECK(t.is_non_overlapping_and_dense() || at::has_internal_overlap(t) != at::MemOverlap::Yes,
              "unsupported operation: more than one element of the written-to tensor refers "
              "to a single memory location. Please clone() the tensor before performing the "
              "operation.");
}

// A tensor whose storage is smaller than its sizes, strides and offset reach (a storage
// resized by hand: FSDP frees params with untyped_storage().resize_(0)): the loops would
// read and write past the allocation, as torch's for-loop does (a crash, or a corrupted
// heap). Refused instead (found by a review, 2026-12-06; the plans of MultiTensorPlan,
// Adafactor, Muon and SparseAdam check every tensor they take). The bytes a contiguous
// tensor reaches are computed inline (the hot path: every tensor of every step), the
// others' by ATen's computeStorageNbytes.
inline __attribute__((always_inline)) void check_storage_holds(const char* op, const char* list,
                                                                int64_t i, const at::Tensor& t) {
  if (t.numel() == 0 || !t.has_storage()) return;
  const size_t itemsize = t.element_size();
  const size_t offset = static_cast<size_t>(t.storage_offset());
  const size_t needed = t.is_contiguous()
                            ? (offset + static_cast<size_t>(t.numel())) * itemsize
                            : at::detail::computeStorageNbytes(t.sizes(), t.strides(), itemsize, offset);
  const size_t holds = t.unsafeGetTensorImpl()->unsafe_storage().nbytes();
  TORCH_CHECK(C10_LIKELY(holds >= needed), op, ": ", list, "[", i, "] reaches ", needed,
              " bytes into its storage, which holds ", holds, " (was the storage resized, or "
              "freed with untyped_storage().resize_(0)?)");
}

// SparseAdam's inputs (Note [sparse adam]), checked for both devices before anything
// changes: lists of equal length, sparse grads (torch's error for a dense one), dense real
// params of at most max_dims dims on `device` with their grads' shape, dtype and device,
// states like their params, and every index of a grad within its param's bounds (on CUDA
// a host synchronisation: an index out of bounds would write outside the tensors).
void check_sparse_adam_inputs(const char* op, at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              size_t num_step_sizes, c10::DeviceType device, int64_t max_dims);
// A sparse grad as SparseAdam reads it: unscaled in place first where a GradScaler's
// grad_scale is given (as GradScaler.unscale_ leaves it), then as torch's SparseAdam takes
// it, -grad under maximize, coalesced (duplicates summed in torch's order).
at::Tensor sparse_adam_grad(const at::Tensor& grad, bool maximize,
                            const std::optional<at::Tensor>& grad_scale, double inv_scale);

}  // namespace fused_optim
