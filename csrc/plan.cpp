// The host side every device shares (plan.h): checks, layouts, scalar arguments.
#include "plan.h"

#include "rounding.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/COW.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>

namespace fused_optim {

namespace {

// The dtypes a param and its states may mix (Note [state storage]).
bool is_storable(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}
constexpr int64_t kQuantBlockSize = 256;  // Note [8-bit state] (cpu/quant8.h)

// Same layout as far as elementwise work goes: equal strides on every dimension of
// size > 1 (a size-1 dimension's stride is never used).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  const auto sizes = a.sizes();
  const auto sa = a.strides();
  const auto sb = b.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

// Whether a pass that reads n tensors' metadata runs on torch's threads (Note [prefetch] in
// python_step.cpp: after a step's stream, each tensor's metadata is a cache miss, and two
// cores have twice as many in flight), in chunks of kParallelChecks / 2.
bool metadata_pass_on_threads(int64_t n) {
  return n >= kParallelChecks && at::get_num_threads() > 1 && !at::in_parallel_region();
}

bool is_cow(const at::Tensor& t) {
  return c10::impl::cow::is_cow_data_ptr(t.unsafeGetTensorImpl()->unsafe_storage().data_ptr());
}

void check_companion(const char* op, const char* list, int64_t i, const at::Tensor& param,
                     const at::Tensor& t, std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(!t.is_sparse(), op, ": ", list, "[", i,
              "] is sparse; fused_optim kernels need dense tensors");
  TORCH_CHECK(t.device() == param.device(), op, ": ", list, "[", i, "] is on ", t.device(),
              " but its param is on ", param.device());
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, op, ": ", list, "[", i, "] has dtype ",
                t.scalar_type(), " but must be ", *dtype);
  } else {
    TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", list, "[", i, "] has dtype ",
                t.scalar_type(), " but its param has dtype ", param.scalar_type());
  }
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", list, "[", i, "] has shape ", t.sizes(),
              " but its param has shape ", param.sizes());
}

}  // namespace

const char* param_mode_option(ParamMode mode) {
  switch (mode) {
    case ParamMode::kKahan: return "kahan_summation";
    case ParamMode::kStochastic: return "stochastic_rounding";
    case ParamMode::kMaster: return "master_weights";
    default: return "round to nearest";
  }
}

ParamStorage param_storage(const char* op, int64_t param_mode,
                           std::optional<at::TensorList> param_aux) {
  TORCH_CHECK(param_mode >= 0 && param_mode <= 3, op, ": param_mode must be 0 (round to nearest), "
              "1 (kahan_summation), 2 (stochastic_rounding) or 3 (master_weights), got ",
              param_mode);
  return {static_cast<ParamMode>(param_mode), param_aux.value_or(at::TensorList())};
}

MultiTensorPlan::MultiTensorPlan(const char* op, at::TensorList params, at::TensorList grads,
                                 const StateLists& named_states, bool grad_mutable,
                                 c10::DeviceType device_type, const ParamStorage& storage)
    : num_tensors_(static_cast<int64_t>(params.size())),
      num_states_(static_cast<int>(named_states.lists.size())),
      param_mode_(storage.mode) {
  TORCH_CHECK(num_states_ <= kMaxRuleStates, op, ": too many state lists");
  // Note [param storage]: the storage's buffer is the last state list. param_aux: the
  // mode's entries, then the 8-bit states' scales (Note [state storage]).
  const std::vector<at::TensorList>& rule_states = named_states.lists;
  std::vector<at::TensorList> states = rule_states;
  const size_t n_params = params.size();
  const size_t mode_entries =
      param_mode_ == ParamMode::kNearest ? 0 : std::min(storage.aux.size(), n_params);
  const at::TensorList mode_aux = storage.aux.slice(0, mode_entries);
  const at::TensorList scales = storage.aux.slice(mode_entries);
  TORCH_CHECK(scales.empty() || scales.size() == rule_states.size() * n_params, op,
              ": param_aux must hold ", param_mode_ == ParamMode::kNearest ? "" : "the mode's "
              "entries (one per param), then ", "nothing or one scale tensor per rule state and "
              "param (", rule_states.size() * n_params, "), got ", storage.aux.size(),
              " tensors for ", n_params, " params");
  const char* storage_name = nullptr;
  std::optional<at::ScalarType> storage_dtype;  // kMaster: float32; kKahan: the param's
  if (param_mode_ != ParamMode::kNearest) {
    const char* option = param_mode_option(param_mode_);
    TORCH_CHECK(mode_aux.size() == params.size(), op, ": ", option, " needs one ",
                param_mode_ == ParamMode::kKahan        ? "kahan_comp"
                : param_mode_ == ParamMode::kStochastic ? "rounding_state"
                                                        : "master_param",
                " per param in param_aux, got ", mode_aux.size(), " for ", params.size(),
                " params");
    for (size_t i = 0; i < params.size(); ++i) {
      const at::ScalarType dt = params[i].defined() ? params[i].scalar_type() : at::kFloat;
      TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, op, ": ", option,
                  " applies to bfloat16 and float16 params; params[", i, "] has dtype ", dt);
    }
    if (param_mode_ == ParamMode::kStochastic) {
      for (size_t i = 0; i < mode_aux.size(); ++i) {
        const at::Tensor& r = mode_aux[i];
        TORCH_CHECK(r.defined() && r.device().is_cpu() && r.scalar_type() == at::kLong &&
                        (r.numel() == 2 || r.numel() == 3) && r.is_contiguous(),
                    op, ": param_aux[", i, "] (rounding_state) must be a contiguous int64 CPU "
                    "tensor of 2 elements, [seed, counter], or 3, [seed, counter, offset]");
        check_storage_holds(op, "param_aux", static_cast<int64_t>(i), r);
      }
      rounding_states_ = mode_aux;
    } else {
      states.push_back(mode_aux);
      ++num_states_;
      storage_name = param_mode_ == ParamMode::kKahan ? "kahan_comp" : "master_param";
      if (param_mode_ == ParamMode::kMaster) storage_dtype = at::kFloat;
    }
  }
  TORCH_CHECK(grads.size() == params.size(), op, ": expected as many grads as params, got ",
              grads.size(), " and ", params.size());
  for (const auto& s : states) {
    TORCH_CHECK(s.size() == params.size(), op,
                ": expected every state list to have one tensor per param, got ", s.size(),
                " and ", params.size());
  }
  const int64_t n = num_tensors_;
  real_dtypes_.resize(n);
  is_complex_.resize(n);
  index_.reserve(n);
  ptrs_.reserve(n);
  offsets_.reserve(n + 1);
  offsets_.push_back(0);

  // Pass 1 reads only: every check, and the data pointers of each param whose tensors all
  // have the layout the loops walk (the usual case). It runs on torch's threads for big
  // calls: after a step's kernel has streamed through the caches, each tensor's metadata
  // is a cache miss, and two cores have twice as many in flight. An error is raised in
  // list order whatever thread met it first: on any failure the checks rerun serially.
  std::vector<TensorPtrs> direct(n);
  std::vector<char> is_direct(n, 0);
  const char* state_names[kMaxStates] = {"state[0]", "state[1]", "state[2]", "state[3]"};
  for (size_t k = 0; k < named_states.names.size() && k < kMaxStates; ++k) {
    state_names[k] = named_states.names[k];
  }
  auto check = [&](int64_t i, int64_t end) {
    // The storages of the tensor kAhead places later, asked for now (Note [prefetch] in
    // python_step.cpp).
    constexpr int64_t kAhead = 8;
    if (i + kAhead < end) {
      // (two lines: the data pointer and, check_storage_holds', the size)
      auto prefetch_storage = [](const at::Tensor& t) {
        const char* impl = reinterpret_cast<const char*>(
            t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
        __builtin_prefetch(impl);
        __builtin_prefetch(impl + 64);
      };
      prefetch_storage(params[i + kAhead]);
      prefetch_storage(grads[i + kAhead]);
      for (int k = 0; k < num_states_; ++k) prefetch_storage(states[k][i + kAhead]);
    }
    // Note [no tensor copies]
    // The tensors are referenced, never copied: copying an at::Tensor that a Python object
    // owns increfs that object (and the copy's destructor takes the GIL to decref it),
    // which costs more than updating a small tensor. Only complex views and layout
    // temporaries (pass 2) are new tensors.
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(param.device().type() == device_type, op, ": params[", i, "] is on ",
                param.device(), "; this kernel runs on ", c10::DeviceTypeName(device_type),
                " tensors");
    // One call runs on one device (the optimizers bucket a group's params by device).
    TORCH_CHECK(param.device() == params[0].device(), op, ": params[", i, "] is on ",
                param.device(), " but params[0] is on ", params[0].device(),
                "; one call runs on one device");
    TORCH_CHECK(is_supported_dtype(param.scalar_type()), op, ": params[", i, "] has dtype ",
                param.scalar_type(), "; supported: float64, float32, bfloat16, float16 and complex");
    check_companion(op, "grads", i, param, grads[i]);
    // Every tensor the step reads must lie within its storage, and every one it writes
    // must not overlap itself (plan.h); an empty param's tensors have nothing to check.
    const bool empty = param.numel() == 0;
    check_storage_holds(op, "params", i, param);
    check_storage_holds(op, "grads", i, grads[i]);
    if (grad_mutable && !empty) refuse_internal_overlap(grads[i]);
    for (int k = 0; k < num_states_; ++k) {
      const bool buffer = storage_name != nullptr && k == num_states_ - 1;
      const at::Tensor& st = states[k][i];
      if (!buffer && st.defined() &&
          st.scalar_type() != param.scalar_type() && is_storable(param.scalar_type()) &&
          (is_storable(st.scalar_type()) || st.scalar_type() == at::kByte)) {
        // Note [state storage]
        check_companion(op, state_names[k], i, param, st, st.scalar_type());
        if (st.scalar_type() == at::kByte) {
          TORCH_CHECK(param.is_contiguous() && st.is_contiguous(), op, ": ", state_names[k],
                      "[", i, "] is an 8-bit state (uint8): it and its param must be contiguous");
          TORCH_CHECK(!scales.empty(), op, ": ", state_names[k], "[", i,
                      "] is an 8-bit state (uint8), but param_aux has no block scales");
          const at::Tensor& sc = scales[static_cast<size_t>(k) * n_params + i];
          const int64_t blocks = (param.numel() + kQuantBlockSize - 1) / kQuantBlockSize;
          TORCH_CHECK(sc.defined() && sc.device() == param.device() &&
                          sc.scalar_type() == at::kFloat && sc.is_contiguous() &&
                          sc.numel() == blocks,
                      op, ": the block scales of ", state_names[k], "[", i,
                      "] (8-bit) must be a contiguous float32 tensor of ", blocks,
                      " elements (one per 256 elements) on the param's device");
          check_storage_holds(op, "param_aux (block scales)", i, sc);
        }
      } else {
        check_companion(op, buffer ? storage_name : state_names[k], i, param, st,
                        buffer ? storage_dtype : std::nullopt);
      }
      check_storage_holds(op, buffer ? storage_name : state_names[k], i, st);
      if (!empty) refuse_internal_overlap(st);
    }
    const bool complex = param.is_complex();
    is_complex_[i] = complex;
    // Complex params are updated as real views, as torch.optim does (pass 2 makes them).
    real_dtypes_[i] = complex ? c10::toRealValueType(param.scalar_type()) : param.scalar_type();
    if (complex || param.numel() == 0) return;
    // (an expanded param, whose elements share memory: torch's in-place ops refuse to
    // write it, with this error; here before anything is written)
    refuse_internal_overlap(param);
    // Note [layouts]
    // The loops walk memory linearly, so every tensor of a param must share one dense
    // layout. The usual case (contiguous, transposed, channels_last params whose grad and
    // state share their strides) needs nothing: its pointers are taken here.
    if (!param.is_non_overlapping_and_dense()) return;
    bool same = same_layout(grads[i], param);
    for (int k = 0; k < num_states_; ++k) same = same && same_layout(states[k][i], param);
    if (!same) return;
    // A copy-on-write storage is copied when first written through: pass 2 does that, on
    // one thread (two tensors can share one).
    bool cow = is_cow(param) || is_cow(grads[i]);
    for (int k = 0; k < num_states_; ++k) cow = cow || is_cow(states[k][i]);
    if (cow) return;
    TensorPtrs& tp = direct[i];
    tp.param = param.data_ptr();
    tp.grad = grads[i].data_ptr();
    for (int k = 0; k < num_states_; ++k) tp.state[k] = states[k][i].data_ptr();
    // Note [tensors of one param that share memory]: dense and of one layout, each spans
    // numel elements from its pointer.
    {
      const int64_t numel = param.numel();
      std::array<std::pair<const char*, const char*>, 2 + kMaxStates> spans;
      auto span = [numel](const void* ptr, const at::Tensor& t) {
        const auto* lo = static_cast<const char*>(ptr);
        return std::make_pair(lo, lo + numel * static_cast<int64_t>(t.element_size()));
      };
      spans[0] = span(tp.param, param);
      spans[1] = span(tp.grad, grads[i]);
      for (int k = 0; k < num_states_; ++k) spans[2 + k] = span(tp.state[k], states[k][i]);
      const int count = 2 + num_states_;
      bool any = false;
      // (a grad that is its param exactly overlaps it too: ATen's status decides it, as
      // for the other layouts, so that both passes draw the line where torch's ops do)
      for (int a = 0; a < count; ++a) {
        for (int b = a + 1; b < count; ++b) {
          any |= spans[a].first < spans[b].second && spans[b].first < spans[a].second;
        }
      }
      if (__builtin_expect(any, 0)) {
        refuse_shared_memory(op, i, param, grads[i], states, state_names, storage_name);
      }
    }
    // What pass 2 needs of a direct param, read here while its tensors are in this thread's
    // cache: pass 2 runs on one thread and would otherwise miss on each again.
    tp.numel = param.numel();
    for (int k = 0; k < num_states_; ++k) tp.state_dtype[k] = states[k][i].scalar_type();
    is_direct[i] = 1;
  };
  bool checked = false;
  if (metadata_pass_on_threads(n)) {
    std::atomic<bool> failed{false};
    at::parallel_for(0, n, kParallelChecks / 2, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end && !failed.load(std::memory_order_relaxed); ++i) {
        try {
          check(i, end);
        } catch (...) {
          failed.store(true, std::memory_order_relaxed);
        }
      }
    });
    checked = !failed.load();
  }
  if (!checked) {
    for (int64_t i = 0; i < n; ++i) check(i, n);
  }

  // Pass 2, in list order: the loop's index and offsets, and for the unusual params the
  // real views of complex tensors and the layout temporaries.
  for (int64_t i = 0; i < n; ++i) {
    // (a direct param's numel and state dtypes are pass 1's; it is real and not empty)
    const int64_t numel =
        is_direct[i] ? direct[i].numel : params[i].numel() * (is_complex_[i] ? 2 : 1);
    if (numel == 0) continue;
    if (!is_direct[i]) {
      refuse_shared_memory(op, i, params[i], grads[i], states, state_names, storage_name);
      direct[i] = unusual_layout(i, params, grads, states, grad_mutable);
      for (int k = 0; k < num_states_; ++k) direct[i].state_dtype[k] = states[k][i].scalar_type();
    }
    // Note [state storage]: the dtypes the storage loops read, and the 8-bit scales.
    TensorPtrs& tp = direct[i];
    tp.param_dtype = real_dtypes_[i];
    const at::ScalarType param_dtype = is_complex_[i] ? c10::toComplexType(real_dtypes_[i])
                                                      : real_dtypes_[i];
    for (int k = 0; k < num_states_; ++k) {
      const at::ScalarType dt = tp.state_dtype[k];
      tp.state_dtype[k] = c10::isComplexType(dt) ? c10::toRealValueType(dt) : dt;
      tp.state_scale[k] = nullptr;
      const bool rule_state = storage_name == nullptr || k < num_states_ - 1;
      if (rule_state && dt != param_dtype) mixed_ = true;
      if (rule_state && dt == at::kByte) {
        quantized_ = true;
        tp.state_scale[k] = scales[static_cast<size_t>(k) * n_params + i].data_ptr<float>();
      }
    }
    ptrs_.push_back(direct[i]);
    index_.push_back(i);
    offsets_.push_back(offsets_.back() + numel);
  }
  // The storage loops (mixed_storage(): a state of another dtype than its param, or a param
  // mode) update float32, bfloat16 and float16 params only; a call that has them takes no
  // other param (refused here, before a step is counted or anything written; the optimizers
  // never make such a call: state_dtype and the modes refuse other params).
  if (mixed_storage()) {
    for (int64_t i = 0; i < n; ++i) {
      const at::ScalarType dt = params[i].scalar_type();
      TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                  ": a param storage mode or state_dtype applies to float32, bfloat16 and "
                  "float16 params only; params[", i, "] has dtype ", dt, " in a call with a "
                  "state of another dtype than its param");
    }
  }
  serial_ = entries_share_memory(kParams) || (grad_mutable && entries_share_memory(kGrads));
  for (int k = 0; k < num_states_ && !serial_; ++k) serial_ = entries_share_memory(k);
}

// Note [aliased params]
// torch.optim steps a group's params one after the other, so where two share memory (the
// same param twice in a group, which torch allows with a warning, or views of one buffer
// that overlap) the shared elements are updated twice, in list order; so are grads shared
// by two params where the step writes them (the unscaled grads of a GradScaler step, as
// torch's fused=True writes them, once per entry). Split across threads, the two updates
// would race. So a call whose entries' memory overlaps runs on one thread, in list order,
// which gives the for-loop's bits (on CUDA: one launch per entry, in list order). The same
// holds for the entries of a state list (a state tensor shared by two params, made by
// hand: two threads raced on it until 2026-12-06). Each entry's loop writes one dense span
// of memory per list, from its pointer; where a layout temporary stands in (Note
// [layouts]), the memory it stands for is the original's extent, from its lowest element
// to its highest (views that interleave without sharing an element run serially too).
// A serial call copies each entry's temporaries in just before its update and back just
// after (begin_serial_entry, end_serial_entry), so that each entry reads what the ones
// before it wrote: until 2026-12-06 they were all copied in first and back last, and a
// param listed twice whose state had another layout, or a transposed grad shared by two
// params under a GradScaler, came out as neither torch path leaves it (found by a review).
// So non-contiguous params that share elements with another param are stepped as torch's
// for-loop steps them (they were refused before: Note [overlapping params]).
// The check is one pass per list
// where the spans come in address order (ascending, or descending as mmap hands out big
// allocations); else the spans are sorted (~35 us for 5,000), and a call whose spans were
// found disjoint is remembered by a hash of them: a training loop's params are the same
// tensors step after step (its grads too, where they are kept), so the sort runs once.
bool MultiTensorPlan::entries_share_memory(int list) const {
  // An entry whose tensor of this list is a layout temporary: the memory it stands for,
  // the original's extent (two entries' temporaries of one tensor are different memory).
  std::vector<std::pair<int64_t, std::pair<const char*, const char*>>> originals;
  for (const Temporary& t : temps_) {
    if (t.list == list) originals.emplace_back(t.entry, extent(t.original));
  }
  return spans_overlap(num_entries(), [&](int64_t j) {
    if (!originals.empty()) {
      const auto it = std::lower_bound(
          originals.begin(), originals.end(), j,
          [](const auto& o, int64_t entry) { return o.first < entry; });
      if (it != originals.end() && it->first == j) return it->second;
    }
    const TensorPtrs& tp = ptrs_[j];
    const auto* lo = static_cast<const char*>(list == kParams  ? tp.param
                                              : list == kGrads ? tp.grad
                                                               : tp.state[list]);
    const at::ScalarType dt = list >= 0 ? tp.state_dtype[list] : real_dtypes_[index_[j]];
    return std::make_pair(lo, lo + entry_numel(j) * static_cast<int64_t>(c10::elementSize(dt)));
  });
}

bool spans_overlap(int64_t m, c10::function_ref<std::pair<const char*, const char*>(int64_t)> span) {
  if (m < 2) return false;
  bool ascending = true, descending = true;
  uint64_t hash = static_cast<uint64_t>(m);
  std::pair<const char*, const char*> before{};
  for (int64_t j = 0; j < m; ++j) {
    const auto a = span(j);
    hash = mix64(hash ^ reinterpret_cast<uintptr_t>(a.first)) +
           static_cast<uint64_t>(a.second - a.first);
    if (j > 0) {
      ascending = ascending && before.second <= a.first;
      descending = descending && a.second <= before.first;
    }
    before = a;
  }
  if (ascending || descending) return false;
  // (a few calls' hashes: a training loop's groups, params, grads and state lists)
  static std::array<std::atomic<uint64_t>, 32> disjoint{};
  for (const auto& h : disjoint) {
    if (h.load(std::memory_order_relaxed) == hash) return false;
  }
  std::vector<std::pair<const char*, const char*>> spans(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) spans[static_cast<size_t>(j)] = span(j);
  std::sort(spans.begin(), spans.end());
  for (size_t j = 0; j + 1 < spans.size(); ++j) {
    if (spans[j].second > spans[j + 1].first) return true;
  }
  static std::atomic<uint32_t> next{0};
  disjoint[next.fetch_add(1, std::memory_order_relaxed) % disjoint.size()].store(
      hash, std::memory_order_relaxed);
  return false;
}

// The bytes from a tensor's lowest element to the end of its highest (it has elements).
std::pair<const char*, const char*> extent(const at::Tensor& t) {
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto* base = static_cast<const char*>(t.const_data_ptr());
  const int64_t size = static_cast<int64_t>(t.element_size());
  return {base + lo * size, base + (hi + 1) * size};
}

namespace {
// Whether two views of one storage share an element: decided by ATen where it can, else by
// marking a's elements in a mask of the storage and looking under b's.
bool views_overlap(const at::Tensor& a, const at::Tensor& b) {
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::No: return false;
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial: return true;
    case at::MemOverlapStatus::TooHard: break;
  }
  const int64_t span = static_cast<int64_t>(a.storage().nbytes() / a.element_size());
  at::Tensor mask = at::zeros({span}, a.options().dtype(at::kBool).device(at::kCPU));
  mask.as_strided(a.sizes(), a.strides(), a.storage_offset()).fill_(true);
  return mask.as_strided(b.sizes(), b.strides(), b.storage_offset()).any().item<bool>();
}
// The same for any two tensors whose extents overlap (two storages of one memory, or two
// element sizes): the bytes of a's elements marked in a mask of both extents, looked up
// under b's. (A rare case: interleaved views of one numpy array, each its own storage.)
bool bytes_overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto [a_lo, a_hi] = extent(a);
  const auto [b_lo, b_hi] = extent(b);
  const char* lo = std::min(a_lo, b_lo);
  const int64_t span = std::max(a_hi, b_hi) - lo;
  at::Tensor mask = at::zeros({span}, at::TensorOptions().dtype(at::kBool));
  // The first byte of each element, as an offset from `lo`; then each of its bytes.
  auto byte_offsets = [&](const at::Tensor& t, const char* t_lo) {
    const int64_t size = static_cast<int64_t>(t.element_size());
    const int64_t elements = (extent(t).second - t_lo) / size;
    const int64_t first = (static_cast<const char*>(t.const_data_ptr()) - t_lo) / size;
    const at::Tensor index = at::arange(elements, at::TensorOptions().dtype(at::kLong))
                                 .as_strided(t.sizes(), t.strides(), first)
                                 .reshape({-1, 1})
                                 .mul(size)
                                 .add(static_cast<int64_t>(t_lo - lo));
    return index.add(at::arange(size, index.options())).reshape({-1});
  };
  mask.index_fill_(0, byte_offsets(a, a_lo), true);
  const at::Tensor under_b = mask.index_select(0, byte_offsets(b, b_lo));
  return under_b.any().item().toBool();
}
}  // namespace

// Note [overlapping params]
// Adafactor's and Muon's kernels update a param that is neither contiguous nor dense
// through a contiguous copy, written back whole after every param's update. Where it
// shares memory with another param of the call, that write-back would undo the other's
// update of the shared elements (torch's for-loop updates them twice, one param after the
// other): refused. (The elementwise kernels step such params in list order: Note [aliased
// params].) Shared memory is found by address, not by storage: two storages can hold the
// same memory, as two from_numpy views of one array do (found by a review, 2026-12-06).
void MultiTensorPlan::check_no_overlap(const char* op, int64_t i, at::TensorList params) {
  const at::Tensor& p = params[static_cast<size_t>(i)];
  const auto [p_lo, p_hi] = extent(p);
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor& q = params[j];
    if (static_cast<int64_t>(j) == i || q.numel() == 0) continue;
    // (by address: two storages can hold the same memory, as two from_numpy views of one
    // array do; found by a review, 2026-12-06)
    const auto [q_lo, q_hi] = extent(q);
    if (q_hi <= p_lo || p_hi <= q_lo) continue;
    const bool shared = q.storage().is_alias_of(p.storage()) &&
                                q.element_size() == p.element_size()
                            ? views_overlap(p, q)
                            : bytes_overlap(p, q);
    TORCH_CHECK(!shared, op, ": params[", i, "] is a non-contiguous view that shares "
                "elements with params[", j, "]; fused_optim updates such a param through a copy, "
                "which would undo the other's update of the shared elements: make them separate "
                "tensors (or give them to separate optimizers)");
  }
}

TensorPtrs MultiTensorPlan::unusual_layout(int64_t i, at::TensorList params,
                                           at::TensorList grads,
                                           const std::vector<at::TensorList>& states,
                                           bool grad_mutable) {
  // The param, its grad and its states, in that order; real views of complex ones.
  std::array<at::Tensor, 2 + kMaxStates> t;
  t[0] = params[i];
  t[1] = grads[i];
  for (int k = 0; k < num_states_; ++k) t[2 + k] = states[k][i];
  if (params[i].is_complex()) {
    for (int k = 0; k < 2 + num_states_; ++k) t[k] = at::view_as_real(t[k]);
  }
  // Note [layouts], continued: each tensor that differs from the target layout (the
  // param's own if it is dense, contiguous if not) is copied to a temporary of that
  // layout, and the temporaries of tensors we write are copied back after the update.
  // Never update a copy without writing it back.
  const at::Tensor& p = t[0];
  const bool param_dense = p.is_non_overlapping_and_dense();
  const int64_t entry = static_cast<int64_t>(ptrs_.size());  // (pass 2 pushes it next)
  auto data = [&](const at::Tensor& x, int list, bool mutated) -> void* {
    if (param_dense ? same_layout(x, p) : x.is_contiguous()) return x.data_ptr();
    // (in x's own dtype: a master_param is float32 beside a 16-bit param)
    const auto options = p.options().dtype(x.scalar_type());
    at::Tensor tmp = param_dense ? at::empty_strided(p.sizes(), p.strides(), options)
                                 : at::empty(p.sizes(), options);
    tmp.copy_(x);
    void* ptr = tmp.data_ptr();
    temps_.push_back(Temporary{x, std::move(tmp), entry, list, mutated});
    return ptr;
  };
  TensorPtrs tp{};
  tp.param = data(p, kParams, /*mutated=*/true);
  tp.grad = data(t[1], kGrads, grad_mutable);
  for (int k = 0; k < num_states_; ++k) tp.state[k] = data(t[2 + k], k, /*mutated=*/true);
  return tp;
}

// Note [tensors of one param that share memory]
// torch's in-place ops refuse an input that partly overlaps the tensor they write
// ("unsupported operation: some elements of the input tensor and the written-to tensor
// refer to a single memory location"): torch's for-loop raises it for a grad that is
// part of its param's memory shifted by an element (SGD, Adagrad, NAdam, ASGD), or a
// state loaded that way; its other ops read such a grad whole before writing, where the
// kernel, element by element, reads some of it written. A state that is another state
// of its param, or its param or grad (a crafted state_dict), is updated op after op by
// torch, and at once by the kernel. All of these are refused, with torch's message and
// the two tensors named, before anything changes (found by a review, 2026-12-06). The
// one sharing the kernel gives torch's bits for is kept: a grad that is its param's own
// memory, exactly (p.grad = p.detach(): docs/parity.md). Where ATen cannot tell (views
// with strides), torch's ops step, and so does the kernel, through layout copies taken
// before the update. Checked for every param with elements, from the spans of its tensors
// (a few compares; then ATen's overlap status, as torch's ops ask it).
void MultiTensorPlan::refuse_shared_memory(const char* op, int64_t i, const at::Tensor& param,
                                           const at::Tensor& grad,
                                           const std::vector<at::TensorList>& states,
                                           const char* const* state_names,
                                           const char* storage_name) const {
  std::array<const at::Tensor*, 2 + kMaxStates> t{};
  t[0] = &param;
  t[1] = &grad;
  for (int k = 0; k < num_states_; ++k) t[2 + k] = &states[k][i];
  // (named only for the error: pass 2 asks this of its params every step)
  auto name = [&](int a) {
    const bool buffer = storage_name != nullptr && a == 2 + num_states_ - 1;
    const char* list = a == 0 ? "params" : a == 1 ? "grads" : buffer ? storage_name : state_names[a - 2];
    return std::string(list) + "[" + std::to_string(i) + "]";
  };
  const int count = 2 + num_states_;
  for (int a = 0; a < count; ++a) {
    for (int b = a + 1; b < count; ++b) {
      const at::Tensor& x = *t[a];
      const at::Tensor& y = *t[b];
      if (!x.defined() || !y.defined() || x.numel() == 0 || y.numel() == 0) continue;
      // (as torch's ops decide it: where ATen cannot tell, strided views, torch steps,
      // and so do we, through the layout copies, which read every element first)
      const at::MemOverlapStatus status = at::get_overlap_status(x, y);
      if (status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::TooHard ||
          (a == 0 && b == 1 && status == at::MemOverlapStatus::Full)) {
        continue;  // (the last: a grad that is its param, exactly)
      }
      TORCH_CHECK(false, "unsupported operation: some elements of the input tensor and the "
                  "written-to tensor refer to a single memory location. Please clone() the "
                  "tensor before performing the operation. (", op, ": ", name(b),
                  " shares memory with ", name(a), ")");
    }
  }
}

std::pair<size_t, size_t> MultiTensorPlan::temporaries_of(int64_t j) const {
  const auto by_entry = [](const Temporary& t, int64_t e) { return t.entry < e; };
  const auto lo = std::lower_bound(temps_.begin(), temps_.end(), j, by_entry);
  auto hi = lo;
  while (hi != temps_.end() && hi->entry == j) ++hi;
  return {static_cast<size_t>(lo - temps_.begin()), static_cast<size_t>(hi - temps_.begin())};
}

void MultiTensorPlan::begin_serial_entry(int64_t j) {
  if (temps_.empty()) return;
  const auto [lo, hi] = temporaries_of(j);
  for (size_t k = lo; k < hi; ++k) temps_[k].tmp.copy_(temps_[k].original);
}

void MultiTensorPlan::end_serial_entry(int64_t j) {
  if (temps_.empty()) return;
  const auto [lo, hi] = temporaries_of(j);
  for (size_t k = lo; k < hi; ++k) {
    if (temps_[k].written) temps_[k].original.copy_(temps_[k].tmp);
    temps_[k].written = false;  // (done: finish() leaves it)
  }
}

std::vector<uint64_t> MultiTensorPlan::next_rounding_streams() const {
  std::vector<uint64_t> streams(rounding_states_.size());
  for (size_t i = 0; i < rounding_states_.size(); ++i) {
    int64_t* r = rounding_states_[i].data_ptr<int64_t>();
    r[1] += 1;  // this step's counter
    streams[i] = rounding_stream(static_cast<uint64_t>(r[0]), static_cast<uint64_t>(r[1]));
    // a shard's offset in its whole param (Note [stochastic rounding]: a shard's bits)
    if (rounding_states_[i].numel() == 3) streams[i] = shard_stream(streams[i], r[2]);
  }
  return streams;
}

void MultiTensorPlan::finish() {
  for (Temporary& t : temps_) {
    if (t.written) t.original.copy_(t.tmp);
  }
  temps_.clear();
}

namespace {

// A list of n one-element tensors, all on the CPU or, where `device` is given and the first
// one is there, all on that device; float32 or float64, or (`any_float`) any floating
// dtype. Returns true when they are on `device`.
bool check_scalar_list(const char* op, const char* name, at::TensorList list, int64_t n,
                       std::optional<c10::Device> device, bool any_float) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": expected one ", name,
              " entry per param, got ", list.size(), " and ", n);
  // The steps are where the first one is: on the CPU, or (capturable / fused groups) on
  // the params' device.
  const bool on_device = device.has_value() && !list.empty() && list[0].defined() &&
                         list[0].device() == *device;
  for (size_t i = 0; i < list.size(); ++i) {
    if (i + 8 < list.size()) {  // Note [prefetch] (python_step.cpp)
      __builtin_prefetch(list[i + 8].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
    }
    const at::Tensor& s = list[i];
    const bool where = s.defined() && (on_device ? s.device() == *device : s.device().is_cpu());
    const at::ScalarType t = where ? s.scalar_type() : at::kFloat;
    // Steps on the CPU: any real dtype, as torch's `step_t += 1` takes (increment_steps);
    // on a device (capturable groups) float32 or float64. Scalar states: floating point.
    bool dtype = t == at::kFloat || t == at::kDouble;
    if (!dtype && !on_device) {
      if (any_float) {
        dtype = t == at::kBFloat16 || t == at::kHalf;
      } else {
        // (torch's own error, from `step_t += 1`)
        TORCH_CHECK(t != at::kBool, "result type Long can't be cast to the desired output type Bool");
        dtype = t == at::kBFloat16 || t == at::kHalf || at::isIntegralType(t, /*includeBool=*/false);
      }
    }
    TORCH_CHECK(where && s.numel() == 1 && dtype, op, ": ", name, "[", i,
                "] must be a one-element ",
                on_device ? "float32 or float64" : any_float ? "floating point" : "real",
                " ", on_device ? c10::str(*device) : std::string("CPU"), " tensor",
                on_device ? c10::str(" (as ", name, "[0] is)") : std::string());
  }
  return on_device;
}

}  // namespace

bool check_steps(const char* op, at::TensorList steps, int64_t n,
                 std::optional<c10::Device> device) {
  return check_scalar_list(op, "state_steps", steps, n, device, /*any_float=*/false);
}

bool check_scalar_states(const char* op, const char* name, at::TensorList states, int64_t n,
                         std::optional<c10::Device> device) {
  // Any floating dtype: torch's load_state_dict casts these (unlike `step`) to the param's.
  return check_scalar_list(op, name, states, n, device, /*any_float=*/true);
}

double scalar_state_value(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return *t.data_ptr<float>();
    case at::kBFloat16: return static_cast<float>(*t.data_ptr<c10::BFloat16>());
    case at::kHalf: return static_cast<float>(*t.data_ptr<c10::Half>());
    default: return *t.data_ptr<double>();
  }
}

void set_scalar_state(const at::Tensor& t, double value) {
  // As Tensor.copy_ from a float64 value (through float for the 16-bit types).
  switch (t.scalar_type()) {
    case at::kFloat: *t.data_ptr<float>() = static_cast<float>(value); break;
    case at::kBFloat16: *t.data_ptr<c10::BFloat16>() = c10::BFloat16(static_cast<float>(value)); break;
    case at::kHalf: *t.data_ptr<c10::Half>() = c10::Half(static_cast<float>(value)); break;
    default: *t.data_ptr<double>() = value;
  }
}

double round_to_dtype(double value, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return static_cast<float>(value);
    case at::kBFloat16: return static_cast<float>(c10::BFloat16(static_cast<float>(value)));
    case at::kHalf: return static_cast<float>(c10::Half(static_cast<float>(value)));
    default: return value;
  }
}

std::vector<double> increment_steps(at::TensorList steps) {
  const int64_t n = static_cast<int64_t>(steps.size());
  std::vector<double> values(static_cast<size_t>(n));
  // Pass 1 reads only: where each step's value is. On 5,000 steps, chasing each TensorImpl,
  // StorageImpl and value one after the other cost 0.2 ms a step (Note [prefetch] in
  // python_step.cpp); this pass runs on torch's threads for big calls, and pass 3 then
  // walks an array of pointers, asking for the values ahead. Nothing is written before
  // every step has its pointer: an error leaves every step as it was.
  std::vector<void*> data(static_cast<size_t>(n));
  std::vector<at::ScalarType> dtypes(static_cast<size_t>(n));
  std::vector<char> cow(static_cast<size_t>(n), 0);
  auto locate = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + 8 < end) {
        __builtin_prefetch(steps[i + 8].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
      }
      const at::Tensor& s = steps[i];
      const at::ScalarType dtype = s.scalar_type();
      dtypes[static_cast<size_t>(i)] = dtype;
      if (is_cow(s)) {
        cow[static_cast<size_t>(i)] = 1;
        continue;
      }
      // The typed accessor, for torch's own error where the step's storage was freed.
      AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "increment_steps", [&] {
        data[static_cast<size_t>(i)] = const_cast<scalar_t*>(s.const_data_ptr<scalar_t>());
      });
    }
  };
  if (metadata_pass_on_threads(n)) {
    at::parallel_for(0, n, kParallelChecks / 2, locate);
  } else {
    locate(0, n);
  }
  // Pass 2, on this thread: a copy-on-write step gets its own copy now (torch materializes
  // one on the first write, and not on several threads), so that pass 3 cannot fail.
  for (int64_t i = 0; i < n; ++i) {
    if (cow[static_cast<size_t>(i)]) data[static_cast<size_t>(i)] = steps[i].data_ptr();
  }
  // Pass 3, in list order (a step listed twice is counted twice, as torch's would be).
  for (int64_t i = 0; i < n; ++i) {
    if (i + 16 < n) __builtin_prefetch(data[static_cast<size_t>(i + 16)], 1);
    void* ptr = data[static_cast<size_t>(i)];
    const at::ScalarType dtype = dtypes[static_cast<size_t>(i)];
    if (dtype == at::kFloat) {
      float* v = static_cast<float*>(ptr);
      *v += 1.0f;  // step_t += 1
      values[static_cast<size_t>(i)] = *v;
    } else {
      // step_t += 1 in the step's own dtype (an integer one wraps, a 16-bit one rounds, as
      // torch's add does), then its value as the for-loop's .item() reads it
      AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "increment_steps", [&] {
        scalar_t* v = static_cast<scalar_t*>(ptr);
        *v = static_cast<scalar_t>(*v + static_cast<scalar_t>(1));
        values[static_cast<size_t>(i)] = static_cast<double>(*v);
      });
    }
  }
  return values;
}

namespace {
thread_local bool checking_only = false;
}  // namespace

bool checking_only_now() { return checking_only; }
CheckingOnly::CheckingOnly() : before_(checking_only) { checking_only = true; }
CheckingOnly::~CheckingOnly() { checking_only = before_; }

bool skip_step(const std::optional<at::Tensor>& found_inf) {
  if (checking_only) return true;  // Note [every group checked first]
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0;
}

double inverse_grad_scale(const char* op, const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return 1.0;
  TORCH_CHECK(grad_scale->numel() == 1, op, ": grad_scale must have one element");
  // GradScaler.unscale_ multiplies by scale.double().reciprocal().float().
  return static_cast<double>(static_cast<float>(1.0 / grad_scale->item<double>()));
}

void check_sparse_adam_inputs(const char* op, at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              size_t num_step_sizes, c10::DeviceType device, int64_t max_dims) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  num_step_sizes == n,
              op, ": expects lists of equal length");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.layout() == at::kSparse,
                "SparseAdam does not support dense gradients, please consider Adam instead");
    TORCH_CHECK(p.layout() == at::kStrided && !p.is_complex(), op,
                ": expects dense real params, got ", p.layout(), " ", p.scalar_type());
    TORCH_CHECK(p.dim() <= max_dims, op, ": expects params of at most ", max_dims,
                " dims, got ", p.dim());
    TORCH_CHECK(p.device().type() == device && g.device() == p.device(), op, ": expects a ",
                c10::DeviceTypeName(device), " param and its grad on its device");
    TORCH_CHECK(g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type(), op,
                ": a grad must have its param's shape and dtype, got ", g.sizes(), " ",
                g.scalar_type(), " for ", p.sizes(), " ", p.scalar_type());
    check_storage_holds(op, "params", static_cast<int64_t>(i), p);
    refuse_internal_overlap(p);
    const char* names[2] = {"exp_avgs", "exp_avg_sqs"};
    for (int k = 0; k < 2; ++k) {
      const at::Tensor& s = k == 0 ? exp_avgs[i] : exp_avg_sqs[i];
      TORCH_CHECK(s.layout() == at::kStrided && s.device() == p.device() &&
                      s.sizes() == p.sizes() && s.scalar_type() == p.scalar_type(),
                  op, ": the state must have its param's shape, dtype and device");
      check_storage_holds(op, names[k], static_cast<int64_t>(i), s);
      refuse_internal_overlap(s);
    }
    const at::Tensor ind = g._indices();
    check_storage_holds(op, "grads (indices)", static_cast<int64_t>(i), ind);
    check_storage_holds(op, "grads (values)", static_cast<int64_t>(i), g._values());
    for (int64_t d = 0; d < g.sparse_dim() && ind.size(1) > 0; ++d) {
      const at::Tensor row = ind.select(0, d);
      TORCH_CHECK(row.min().item<int64_t>() >= 0 && row.max().item<int64_t>() < p.size(d), op,
                  ": a sparse grad's index is out of bounds for dimension ", d, " of size ",
                  p.size(d));
    }
  }
}

at::Tensor sparse_adam_grad(const at::Tensor& grad, bool maximize,
                            const std::optional<at::Tensor>& grad_scale, double inv_scale) {
  if (has_tensor(grad_scale)) {
    // As GradScaler's unscale: each value times the float32 1/scale in float (opmath), then
    // rounded to the grad's dtype. (mul_ with a double Scalar would round the scalar to a
    // bfloat16/float16 grad's dtype first: an ulp off where the scale is not a power of two.)
    at::Tensor values = grad._values();
    if (at::isReducedFloatingType(values.scalar_type())) {
      values.copy_(values.to(at::kFloat).mul_(inv_scale));
    } else {
      values.mul_(inv_scale);
    }
  }
  return (maximize ? grad.neg() : grad).coalesce();
}

double lr_value(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return lr;
  TORCH_CHECK(lr_tensor->numel() == 1, op, ": Tensor lr must be 1-element");
  return lr_tensor->item<double>();
}

}  // namespace fused_optim
