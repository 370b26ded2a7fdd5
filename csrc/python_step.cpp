// The Python module fused_optim._C: importing it loads this library, whose static
// initializers register the ops (csrc/ops.cpp) and their kernels; its functions are the
// optimizers' eager fast path (Note [direct calls] in direct_call.h).

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/grad_norm.h"
#include "cpu/tuning.h"
#include "direct_call.h"
#include "plan.h"

namespace fused_optim {
namespace {

// at::Tensor handles that alias tensors owned by Python objects without touching their
// reference counts (Note [no tensor copies] in cpu/multi_tensor.cpp). They are valid
// while the Python objects live: the param group and the state dict the caller passed
// hold them for the whole call.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (auto& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void reserve(size_t n) { tensors_.reserve(n); }
  void push(const at::Tensor& t) {
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  bool empty() const { return tensors_.empty(); }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// A dense CPU or CUDA tensor with nothing in between it and its memory: no tensor
// subclass, no functorch or functionalization wrapper, no conjugate or negative bit, no
// sparse layout. Anything else takes the dispatcher path, which handles it as before.
// A tensor a kernel takes: a dense tensor of the CPU or CUDA backends, nothing else in its
// key set (no subclass, no functorch or Python keys).
bool is_plain(const at::Tensor& t) {
  static const c10::DispatchKeySet plain_cpu{
      c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
      c10::DispatchKey::AutocastCPU};
  static const c10::DispatchKeySet plain_cuda{
      c10::DispatchKey::CUDA, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCUDA,
      c10::DispatchKey::AutocastCUDA};
  const c10::DispatchKeySet keys = t.key_set();
  return (plain_cpu.isSupersetOf(keys) || plain_cuda.isSupersetOf(keys)) &&
         t.layout() == at::kStrided;
}

// A plain tensor the step may write: not an inference tensor (made under
// torch.inference_mode(), which leaves out the ADInplaceOrView key). torch refuses to
// update those in place outside inference mode; the general path raises its error there
// (FusedOptimizer._update_group), and steps them inside it.
bool is_plain_writable(const at::Tensor& t) {
  return is_plain(t) && t.key_set().has(c10::DispatchKey::ADInplaceOrView);
}

// The tensor a Python object holds if it is a plain Tensor or Parameter (not a subclass)
// holding a plain tensor (one the step may write, with `written`); nullptr otherwise.
const at::Tensor* plain_tensor(PyObject* obj, bool written) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return (written ? is_plain_writable(t) : is_plain(t)) ? &t : nullptr;
}

// The kernel a group's call goes to: the CPU kernel registered as `name`, or for a group
// whose params are all on one CUDA device, the CUDA kernel (registered as name + "@cuda",
// Note [direct calls]) when the build has one and no host synchronisation would happen
// with the GIL held: no tensor argument (lr, grad_scale, found_inf) on the GPU, since a
// kernel may read those on the host (Note [CUDA scalars]). nullptr: the general path
// takes the step (it also gives params on several devices one call per device).
const DirectKernel* group_kernel(const std::string& name, const DirectKernel* cpu,
                                 const DirectCall& call) {
  const at::TensorList params = call.lists[0];
  if (params.empty()) return cpu;  // nothing to update
  const c10::Device device = params[0].device();
  for (const at::Tensor& p : params) {
    if (p.device() != device) return nullptr;
  }
  if (device.is_cpu()) return cpu;
  if (!device.is_cuda()) return nullptr;
  for (const auto& t : call.tensors) {
    if (t.has_value() && t->defined() && !t->device().is_cpu()) return nullptr;
  }
  return find_direct_call(name + "@cuda");
}

// Note [prefetch]
// After a step's kernel has streamed hundreds of MB through the caches, every tensor's
// Python object, TensorImpl and StorageImpl is a cache miss. Chased one tensor at a
// time, those misses are latency-bound: on 5,000 small tensors they cost half as much
// as the update itself. So the gather goes in passes (params, grads, state dicts, state
// tensors), each pass asks for the memory that the element kAhead places later will
// need, and the passes that call no Python API run on torch's threads: many misses are
// in flight at once.
constexpr Py_ssize_t kAhead = 8;
// The fewest elements of a param whose moments an 8-bit optimizer keeps in 8 bits
// (quantization.MIN_NUMEL; tests/test_state_dtype.py checks the two agree).
constexpr int64_t kQuantMinNumel = 4096;

// Note [version counters] (fused_optim/_ops.py, bump_versions): tensors written in place
// behind autograd's back count the write, as torch's in-place ops count it.
void count_writes(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

// kWrite: the memory will be written (a reference count), so it is asked for as such.
template <int kWrite = 0>
inline void prefetch(const void* p) {
  // Note [CPU tuning]: cpu_tuning().gather_prefetch
  if (cpu::gather_prefetch_on.load(std::memory_order_relaxed)) __builtin_prefetch(p, kWrite, 3);
}

// The first cache lines of a TensorImpl: key set, sizes, strides, dtype, storage.
inline void prefetch_lines(const at::TensorImpl* impl) {
  const char* base = reinterpret_cast<const char*>(impl);
  for (int line = 0; line < 4; ++line) prefetch(base + 64 * line);
}

// obj's TensorImpl, if obj is a Tensor or Parameter (its own header was asked for
// earlier: this reads it).
inline void prefetch_tensor_impl(PyObject* obj) {
  if (THPVariable_CheckExact(obj)) prefetch_lines(THPVariable_Unpack(obj).unsafeGetTensorImpl());
}

// Runs f(i, end) for every i in [0, n), where `end` bounds i's chunk (for prefetching),
// on torch's threads when n is large. f reads tensors and Python objects' fields only:
// it calls no Python API and touches no reference count (the caller keeps the GIL).
template <typename F>
void tensor_pass(Py_ssize_t n, const F& f) {
  constexpr int64_t kGrain = 512;
  if (n < 2 * kGrain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (Py_ssize_t i = 0; i < n; ++i) f(i, n);
    return;
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i, end);
  });
}

enum class Gathered { kOk, kDecline, kError };

// Python references the call owns until it returns.
class OwnedRefs {
 public:
  OwnedRefs() = default;
  OwnedRefs(const OwnedRefs&) = delete;
  OwnedRefs& operator=(const OwnedRefs&) = delete;
  ~OwnedRefs() {
    for (PyObject* o : refs_) Py_DECREF(o);
  }
  PyObject* own(PyObject* o) {
    Py_INCREF(o);
    refs_.push_back(o);
    return o;
  }

 private:
  std::vector<PyObject*> refs_;
};

// Note [borrowing safely]
// The lists borrow tensors without owning them, so nothing may change a param group, a
// grad or the state while they exist: no Python code runs from the first borrow to the
// end of the call, and the GIL is held throughout (also while the kernels run: another
// thread's zero_grad() must not free a grad under them). The one step that can run
// Python code, the state dict lookup (it calls Tensor.__hash__), comes first, for every
// group, and keeps owned references to what it found.
struct GroupSnapshot {
  bool any_key = false;           // the kernel takes state (a key is not None)
  std::vector<PyObject*> params;  // owned
  std::vector<PyObject*> states;  // owned; nullptr where there is none
};

// Note [state lookups by id]
// `state` is keyed by params, and a lookup calls Tensor.__hash__, a Python function that
// returns id(self): on 5,000 params those calls took 0.2-0.3 ms per step (W3's whole SGD
// step takes 4.5-5.5 ms at 2 threads here). Where a param's type hashes that way (checked
// with one real hash per type and call), the dict is searched with the hash it would
// return: the same entry, found without running Python code (the entry's key is the param
// itself, so no __eq__ runs either). Where the check fails, or the CPython API is not
// there, the lookup is the plain one.
class StateLookup {
 public:
  // The param's state dict (borrowed), or nullptr: none (no exception set) or an error.
  PyObject* operator()(PyObject* state, PyObject* obj) {
#if PY_VERSION_HEX < 0x030D0000
    PyTypeObject* type = Py_TYPE(obj);
    int k = 0;
    while (k < kTypes && types_[k] != nullptr && types_[k] != type) ++k;
    if (k < kTypes && types_[k] == nullptr) {  // a type not seen yet in this call
      const Py_hash_t h = PyObject_Hash(obj);
      if (h == -1 && PyErr_Occurred()) return nullptr;
      types_[k] = type;
      by_id_[k] = h == id_hash(obj);
    }
    if (k < kTypes && by_id_[k]) return _PyDict_GetItem_KnownHash(state, obj, id_hash(obj));
#endif
    return PyDict_GetItemWithError(state, obj);
  }

 private:
  // What Tensor.__hash__ returns: id(self), the address, as CPython turns an int into a
  // hash (an address is neither negative nor -1).
  static Py_hash_t id_hash(PyObject* obj) {
    return static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(obj));
  }
  static constexpr int kTypes = 4;  // Tensor and Parameter in practice
  PyTypeObject* types_[kTypes] = {nullptr, nullptr, nullptr, nullptr};
  bool by_id_[kTypes] = {false, false, false, false};
};

// The Python part of a group's gather: its params, and the state dict of each param that
// has one (when the kernel takes state: a key of `keys` is not None). It reads no tensor:
// the grads are read later, in the passes that prefetch (Note [prefetch]).
Gathered snapshot_group(PyObject* params, PyObject* state, PyObject* keys, OwnedRefs& owned,
                        GroupSnapshot& snap, StateLookup& lookup) {
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); ++k) {
    snap.any_key |= PyTuple_GET_ITEM(keys, k) != Py_None;
  }
  // The size is read again each time: a lookup can run Python code that changes the list.
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    // (the object kAhead places later, whose reference count is written: Note [prefetch])
    if (i + kAhead < PyList_GET_SIZE(params)) prefetch</*kWrite=*/1>(PyList_GET_ITEM(params, i + kAhead));
    PyObject* obj = owned.own(PyList_GET_ITEM(params, i));
    if (!THPVariable_CheckExact(obj)) return Gathered::kDecline;
    snap.params.push_back(obj);
    PyObject* param_state = nullptr;
    if (snap.any_key) {
      // A param without state is fine if it has no grad: gather_group decides.
      param_state = lookup(state, obj);
      if (param_state == nullptr && PyErr_Occurred()) return Gathered::kError;
      if (param_state != nullptr) owned.own(param_state);
    }
    snap.states.push_back(param_state);
  }
  return Gathered::kOk;
}

// The rest of a group's gather, which runs no Python code: params with a grad, their
// grads, then one list per key of `keys` (`lists` has 2 + len(keys) entries; a None
// key's list stays empty). kDecline: something the fast path does not take (see _step).
Gathered gather_group(const GroupSnapshot& snap, PyObject* keys,
                      std::vector<BorrowedTensors>& lists) {
  // The gather goes in passes over the group: Note [prefetch].
  const Py_ssize_t n = static_cast<Py_ssize_t>(snap.params.size());
  const Py_ssize_t num_keys = PyTuple_GET_SIZE(keys);
  // Pass 1: the params, and where their grads are.
  std::vector<const at::Tensor*> param_tensors(static_cast<size_t>(n));
  std::atomic<bool> decline{false};
  tensor_pass(n, [&](Py_ssize_t i, Py_ssize_t end) {
    if (i + 2 * kAhead < end) prefetch(snap.params[static_cast<size_t>(i + 2 * kAhead)]);
    if (i + kAhead < end) prefetch_tensor_impl(snap.params[static_cast<size_t>(i + kAhead)]);
    const at::Tensor* p = plain_tensor(snap.params[static_cast<size_t>(i)], /*written=*/true);
    if (p == nullptr) {
      decline.store(true, std::memory_order_relaxed);
      return;
    }
    const char* meta = reinterpret_cast<const char*>(p->unsafeGetTensorImpl()->autograd_meta());
    if (meta != nullptr) {  // where the grad is
      prefetch(meta);
      prefetch(meta + 64);
    }
    param_tensors[static_cast<size_t>(i)] = p;
  });
  if (decline.load()) return Gathered::kDecline;
  // Pass 2: the grads (TensorImpl::grad: torch.optim refuses non-leaf params, so the
  // non-leaf warning of Tensor::grad has nothing to say here).
  // A grad the fast path takes is plain, of its param's dtype (a grad of another dtype,
  // which torch >= 2.9 allows, goes to the general path, which runs torch's step for it,
  // as does a param of a dtype the kernels do not take: complex32, say);
  // checked here, on torch's threads, so that the serial loop below reads no TensorImpl.
  std::vector<const at::Tensor*> grad_tensors(static_cast<size_t>(n));
  tensor_pass(n, [&](Py_ssize_t i, Py_ssize_t end) {
    if (i + kAhead < end) {
      const at::Tensor& later =
          param_tensors[static_cast<size_t>(i + kAhead)]->unsafeGetTensorImpl()->grad();
      if (later.defined()) prefetch_lines(later.unsafeGetTensorImpl());
    }
    const at::Tensor& p = *param_tensors[static_cast<size_t>(i)];
    const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
    if (g.defined() && (!is_plain(g) || g.scalar_type() != p.scalar_type() ||
                        !is_supported_dtype(p.scalar_type()))) {
      decline.store(true, std::memory_order_relaxed);
    }
    grad_tensors[static_cast<size_t>(i)] = &g;
  });
  if (decline.load()) return Gathered::kDecline;
  for (auto& l : lists) l.reserve(static_cast<size_t>(n));
  std::vector<PyObject*> param_states;  // of the params with a grad
  param_states.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& g = *grad_tensors[static_cast<size_t>(i)];
    if (!g.defined()) continue;
    PyObject* param_state = snap.states[static_cast<size_t>(i)];
    if (snap.any_key) {
      if (param_state == nullptr || !PyDict_Check(param_state)) return Gathered::kDecline;
      prefetch(reinterpret_cast<PyDictObject*>(param_state)->ma_keys);
    }
    lists[0].push(*param_tensors[static_cast<size_t>(i)]);
    lists[1].push(g);
    param_states.push_back(param_state);
  }
  if (!snap.any_key) return Gathered::kOk;
  const Py_ssize_t m = static_cast<Py_ssize_t>(param_states.size());
  // Pass 3: the state entries' Python objects (str keys: no Python code runs).
  std::vector<PyObject*> values(static_cast<size_t>(m * num_keys), nullptr);
  for (Py_ssize_t i = 0; i < m; ++i) {
    PyObject* param_state = param_states[static_cast<size_t>(i)];
    for (Py_ssize_t k = 0; k < num_keys; ++k) {
      PyObject* key = PyTuple_GET_ITEM(keys, k);
      if (key == Py_None) continue;
      PyObject* value = PyDict_GetItem(param_state, key);  // borrowed
      if (value == nullptr) return Gathered::kDecline;
      prefetch(value);
      values[static_cast<size_t>(i * num_keys + k)] = value;
    }
  }
  // Pass 4: the state tensors, list by list.
  static PyObject* const scales_suffix = PyUnicode_InternFromString("_absmax");
  const at::TensorList params = lists[0].list();
  std::vector<const at::Tensor*> state_tensors(static_cast<size_t>(m));
  for (Py_ssize_t k = 0; k < num_keys; ++k) {
    PyObject* key = PyTuple_GET_ITEM(keys, k);
    if (key == Py_None) continue;
    // An 8-bit optimizer's block scales ("<moment>_absmax"): a param's moments are 8-bit
    // (scales) where it quantizes, float32 (no scales) elsewhere. A param whose layout
    // changed since (model.to(memory_format=...)) has the other kind: the general path
    // converts them (FusedOptimizer._convert_moments, quantization.quantizes).
    const bool scales = scales_suffix != nullptr && PyUnicode_Check(key) &&
                        PyUnicode_Tailmatch(key, scales_suffix, 0, PY_SSIZE_T_MAX, 1) == 1;
    auto value = [&](Py_ssize_t i) { return values[static_cast<size_t>(i * num_keys + k)]; };
    tensor_pass(m, [&](Py_ssize_t i, Py_ssize_t end) {
      if (i + kAhead < end) prefetch_tensor_impl(value(i + kAhead));
      const at::Tensor* s = plain_tensor(value(i), /*written=*/true);
      if (s == nullptr) decline.store(true, std::memory_order_relaxed);
      state_tensors[static_cast<size_t>(i)] = s;
      if (scales && s != nullptr) {
        const at::Tensor& p = params[static_cast<size_t>(i)];
        const bool quantizes = p.numel() >= kQuantMinNumel && p.is_contiguous();
        if ((s->numel() != 0) != quantizes) decline.store(true, std::memory_order_relaxed);
      }
    });
    if (decline.load()) return Gathered::kDecline;
    for (Py_ssize_t i = 0; i < m; ++i) {
      lists[static_cast<size_t>(2 + k)].push(*state_tensors[static_cast<size_t>(i)]);
    }
  }
  return Gathered::kOk;
}

// _step(op, groups, state, keys, args) -> bool
//
// A step of all param groups through the kernel registered as `op` (CPU, or CUDA for a
// group on one GPU: group_kernel), if this path can take every group: `groups` holds each
// group's param list, `state` is the optimizer's state dict, `keys[g]` the state key of
// each list the kernel takes after params and grads (None: an empty list), `args[g]` the
// kernel's other arguments in schema order. Params without a grad are left out, as in
// torch.optim. All groups are gathered before any is updated; the GIL stays held (Note
// [borrowing safely]). Returns False, having changed nothing, when any param, grad or
// state entry is not a plain dense CPU or CUDA tensor (a sparse grad, a subclass, a
// DTensor, ...), when group_kernel declines a group (params on several devices, ...), when
// a state entry is missing (the Python path creates the state), or when a torch function
// or dispatch mode is active (they must see the op): the caller then takes its general
// path. Each group's update runs as the op would: same checks, same errors.
PyObject* py_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 5, "_step expects 5 arguments, got ", nargs);
  PyObject* op = args[0];
  PyObject* groups = args[1];
  PyObject* state = args[2];
  PyObject* keys = args[3];
  PyObject* rest = args[4];
  // A state that is another mapping than a dict (a UserDict a user swapped in, which
  // torch's step takes) is the general path's: only a dict's entries are read here.
  if (!PyDict_Check(state)) Py_RETURN_FALSE;
  TORCH_CHECK_TYPE(PyUnicode_Check(op) && PyList_Check(groups) &&
                       PyList_Check(keys) && PyList_Check(rest) &&
                       PyList_GET_SIZE(keys) == PyList_GET_SIZE(groups) &&
                       PyList_GET_SIZE(rest) == PyList_GET_SIZE(groups),
                   "_step expects (str, list, dict, list, list), one entry per group");
  const char* op_name = PyUnicode_AsUTF8(op);
  if (op_name == nullptr) return nullptr;
  const std::string name = op_name;
  const DirectKernel* kernel = find_direct_call(name);
  TORCH_CHECK(kernel != nullptr, "_step: no CPU kernel registered as ", name);
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_FALSE;
  }
  // The CPU loops' choices (Note [CPU tuning]: FUSED_OPTIM_ISA and the others), made once
  // per process: a bad value raises here, before a step is counted (Adagrad's first step,
  // whose state its constructor made, comes here; the others' first steps through
  // FusedOptimizer._update_group, which asks the same).
  cpu::make_cpu_choices();
  const Py_ssize_t num_groups = PyList_GET_SIZE(groups);
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    PyObject* group_keys = PyList_GET_ITEM(keys, g);
    TORCH_CHECK_TYPE(PyList_Check(PyList_GET_ITEM(groups, g)) && PyTuple_Check(group_keys) &&
                         PyTuple_Check(PyList_GET_ITEM(rest, g)) &&
                         static_cast<size_t>(2 + PyTuple_GET_SIZE(group_keys)) >= kernel->num_lists &&
                         (static_cast<size_t>(2 + PyTuple_GET_SIZE(group_keys)) <=
                              kernel->num_lists + kernel->num_optional_lists ||
                          kernel->num_optional_lists > 0),
                     "_step expects each group's params as a list, and a tuple of ",
                     kernel->num_lists - 2, " keys (then the optional list's, if any) and a "
                     "tuple of args for ", name);
  }

  // Note [borrowing safely]: first what may run Python code, for every group.
  OwnedRefs owned;
  owned.own(groups);
  owned.own(state);
  std::vector<GroupSnapshot> snaps(static_cast<size_t>(num_groups));
  StateLookup lookup;
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    switch (snapshot_group(owned.own(PyList_GET_ITEM(groups, g)), state,
                           PyList_GET_ITEM(keys, g), owned, snaps[static_cast<size_t>(g)],
                           lookup)) {
      case Gathered::kOk: break;
      case Gathered::kDecline: Py_RETURN_FALSE;
      case Gathered::kError: return nullptr;
    }
  }
  // The arguments, by the kinds the kernel takes: anything else (a tensor where the
  // schema has a float, say) is left to the general path, whose op call handles it.
  std::vector<DirectCall> calls(static_cast<size_t>(num_groups));
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    PyObject* group_args = PyList_GET_ITEM(rest, g);
    if (static_cast<size_t>(PyTuple_GET_SIZE(group_args)) != kernel->arg_kinds.size()) {
      Py_RETURN_FALSE;
    }
    DirectCall& call = calls[static_cast<size_t>(g)];
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(group_args); ++j) {
      PyObject* a = PyTuple_GET_ITEM(group_args, j);
      if (kernel->arg_kinds[static_cast<size_t>(j)] == 't') {
        if (a == Py_None) {
          call.tensors.emplace_back(std::nullopt);
        } else if (THPVariable_Check(a)) {
          call.tensors.emplace_back(THPVariable_Unpack(a));
        } else {
          Py_RETURN_FALSE;
        }
      } else {
        if (!PyFloat_Check(a) && !PyLong_Check(a)) Py_RETURN_FALSE;  // bool is an int
        const double v = PyFloat_AsDouble(a);
        if (v == -1.0 && PyErr_Occurred()) return nullptr;
        call.numbers.push_back(v);
      }
    }
  }
  // From here on no Python code runs, and the GIL stays held (Note [borrowing safely]).
  std::vector<std::vector<BorrowedTensors>> lists;
  lists.reserve(static_cast<size_t>(num_groups));
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    // The keys after the required lists' are the optional list's (param_aux): where there
    // are several (the mode's buffers, the 8-bit scales: Note [state storage] in plan.h),
    // one more list holds them all, in order.
    const size_t num_key_lists = static_cast<size_t>(2 + PyTuple_GET_SIZE(PyList_GET_ITEM(keys, g)));
    const bool merge = num_key_lists > kernel->num_lists + 1;
    lists.emplace_back(num_key_lists + (merge ? 1 : 0));
    if (gather_group(snaps[static_cast<size_t>(g)], PyList_GET_ITEM(keys, g), lists.back()) !=
        Gathered::kOk) {
      Py_RETURN_FALSE;
    }
    std::vector<BorrowedTensors>& group_lists = lists.back();
    if (merge) {
      BorrowedTensors& aux = group_lists.back();
      for (size_t k = kernel->num_lists; k < num_key_lists; ++k) {
        for (const at::Tensor& t : group_lists[k].list()) aux.push(t);
      }
      for (size_t k = 0; k < kernel->num_lists; ++k) {
        calls[static_cast<size_t>(g)].lists.push_back(group_lists[k].list());
      }
      calls[static_cast<size_t>(g)].lists.push_back(aux.list());
    } else {
      for (const auto& l : group_lists) calls[static_cast<size_t>(g)].lists.push_back(l.list());
    }
  }
  std::vector<const DirectKernel*> kernels(static_cast<size_t>(num_groups));
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    kernels[static_cast<size_t>(g)] = group_kernel(name, kernel, calls[static_cast<size_t>(g)]);
    if (kernels[static_cast<size_t>(g)] == nullptr) Py_RETURN_FALSE;
  }
  // Note [the GIL during a step]
  // torch's ops release the GIL while they run; the kernels here ran with it held, so a
  // step froze every other Python thread for its whole length (a heartbeat thread's ticks
  // stopped for 13.6 ms during an 11.8 ms Adam step on 8M floats, found by a review,
  // 2026-12-06: on a big model, a second and more). A call of 2^20 elements or more now
  // runs without it: its lists are first copied into owning handles (a reference taken on
  // each tensor, as torch's ops hold their arguments), so another thread that drops a
  // tensor from a param group or the state meanwhile frees nothing the kernel reads; the
  // copies are dropped once the GIL is taken back. Calls of smaller tensors (under 8,192
  // elements on average: W3's 5,000, about 5 ms a step) keep it: there the copies cost a
  // measurable part of the step, and the wait is one of Python's own switch intervals.
  // Muon's calls release it whatever their size: they run ATen ops on torch's worker
  // threads (Note [Muon's small groups] in cpu/muon.cpp), and an op that is a Python kernel
  // (torch.library) waits there for the GIL, which the calling thread, waiting for the
  // workers, held: a step hung for good (found by a review, 2026-12-06). Its matrix
  // iterations dwarf the copies.
  int64_t elements = 0, tensors = 0, num_lists = 0;
  for (const DirectCall& call : calls) {
    for (const at::Tensor& t : call.lists[0]) elements += t.numel();
    tensors += static_cast<int64_t>(call.lists[0].size());
    num_lists += static_cast<int64_t>(call.lists.size());
  }
  std::vector<std::vector<at::Tensor>> owning;
  std::vector<DirectCall> owned_calls;
  const bool release_gil = (elements >= (int64_t{1} << 20) && elements >= 8192 * tensors) ||
                           name == "muon_" || name == "_muon_aten_";
  if (release_gil) {
    owning.reserve(static_cast<size_t>(num_lists));  // (the lists below point into these)
    owned_calls = calls;
    for (DirectCall& call : owned_calls) {
      for (at::TensorList& list : call.lists) {
        owning.emplace_back(list.begin(), list.end());
        list = owning.back();
      }
    }
  }
  const std::vector<DirectCall>& run_calls = release_gil ? owned_calls : calls;
  std::optional<pybind11::gil_scoped_release> no_gil;  // (destroyed before `owning`)
  if (release_gil) no_gil.emplace();
  // Note [every group checked first] (plan.h): the later groups' checks before the first
  // group's update, so that an error in any group leaves every group as it was.
  if (num_groups > 1) {
    CheckingOnly checking;
    for (Py_ssize_t g = 1; g < num_groups; ++g) {
      const DirectCall& call = run_calls[static_cast<size_t>(g)];
      if (!call.lists[0].empty()) kernels[static_cast<size_t>(g)]->fn(call);
    }
  }
  for (Py_ssize_t g = 0; g < num_groups; ++g) {
    const DirectCall& call = run_calls[static_cast<size_t>(g)];
    if (call.lists[0].empty()) continue;  // no grads in this group
    RECORD_FUNCTION("fused_optim::" + name, std::vector<c10::IValue>());
    kernels[static_cast<size_t>(g)]->fn(call);
    // Note [version counters]: the params were written in place, as torch's in-place ops
    // write them, so their version counters count it (autograd then refuses a graph that
    // saved a param's old value, as it does after torch's step). A complex param's real
    // view shares its counter.
    count_writes(call.lists[0]);
  }
  no_gil.reset();
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// _has_sparse_grad(params) -> bool: whether a tensor of the list has a sparse grad. SGD
// and Adagrad ask before every step, so it is a pass like _step's (Note [prefetch]); and
// the memory it reads is what _step reads next.
PyObject* py_has_sparse_grad(PyObject* /*module*/, PyObject* params) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyList_Check(params), "_has_sparse_grad expects a list");
  const Py_ssize_t n = PyList_GET_SIZE(params);
  // Any Tensor, subclasses included: their C++ grad is the one Python sees.
  auto tensor_impl = [&](Py_ssize_t i) -> const at::TensorImpl* {
    PyObject* obj = PyList_GET_ITEM(params, i);
    return THPVariable_Check(obj) ? THPVariable_Unpack(obj).unsafeGetTensorImpl() : nullptr;
  };
  for (Py_ssize_t i = 0; i < n; ++i) prefetch(PyList_GET_ITEM(params, i));
  std::vector<const at::TensorImpl*> impls(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      const at::TensorImpl* ahead = tensor_impl(i + kAhead);
      if (ahead != nullptr) prefetch_lines(ahead);
    }
    impls[static_cast<size_t>(i)] = tensor_impl(i);
  }
  bool sparse = false;
  for (Py_ssize_t i = 0; i < n && !sparse; ++i) {
    if (i + kAhead < n && impls[static_cast<size_t>(i + kAhead)] != nullptr) {
      prefetch(impls[static_cast<size_t>(i + kAhead)]->autograd_meta());
    }
    if (impls[static_cast<size_t>(i)] == nullptr) continue;
    const at::Tensor& g = impls[static_cast<size_t>(i)]->grad();
    sparse = g.defined() && g.is_sparse();
  }
  if (sparse) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

// Note [clipping's fast path]
// Clipping 5,000 grads through the dispatcher spent ~1.6 us per tensor converting the list
// (as much as the norm pass itself), and as much again in Python picking the grads and
// checking their types. These functions read the grads of a list of param lists in C++
// and call the CPU kernels of grad_norm.cpp directly; they decline (None / False),
// changing nothing, unless every grad is a plain dense CPU tensor of one dtype the kernels
// take and every param a plain Tensor or Parameter (clip.py then takes its general path).
// No Python code runs while the grads are borrowed (Note [borrowing safely]).
enum class Grads { kOk, kDecline };

Grads gather_grads(PyObject* groups, BorrowedTensors& grads) {
  TORCH_CHECK_TYPE(PyList_Check(groups), "expects a list of lists of params");
  std::optional<at::ScalarType> dtype;
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* params = PyList_GET_ITEM(groups, g);
    TORCH_CHECK_TYPE(PyList_Check(params), "expects a list of lists of params");
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
      const at::Tensor* p = plain_tensor(PyList_GET_ITEM(params, i), /*written=*/false);
      if (p == nullptr) return Grads::kDecline;
      const at::Tensor& grad = p->unsafeGetTensorImpl()->grad();
      if (!grad.defined()) continue;
      if (!is_plain_writable(grad) || !grad.device().is_cpu()) return Grads::kDecline;
      const at::ScalarType dt = grad.scalar_type();
      if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16 && dt != at::kHalf) {
        return Grads::kDecline;
      }
      if (dtype.has_value() && *dtype != dt) return Grads::kDecline;
      dtype = dt;
      grads.push(grad);
    }
  }
  return Grads::kOk;
}

// _grad_norms(groups, ord, inv_scale) -> Tensor | None: the norm of each grad of the params
// of `groups` (norms_cpu), in order; an empty float tensor where no param has a grad.
PyObject* py_grad_norms(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "_grad_norms expects 3 arguments, got ", nargs);
  const double ord = PyFloat_AsDouble(args[1]);
  if (ord == -1.0 && PyErr_Occurred()) return nullptr;
  const double inv_scale = PyFloat_AsDouble(args[2]);
  if (inv_scale == -1.0 && PyErr_Occurred()) return nullptr;
  at::Tensor norms;
  {
    BorrowedTensors grads;
    if (gather_grads(args[0], grads) == Grads::kDecline) Py_RETURN_NONE;
    norms = grads.empty() ? at::empty({0}, at::kFloat) : cpu::norms_cpu(grads.list(), ord, inv_scale);
  }
  return THPVariable_Wrap(std::move(norms));
  END_HANDLE_TH_ERRORS
}

// _mul_grads_(groups, scalar) -> bool: every grad of the params of `groups` times the
// 0-dim CPU tensor `scalar` (mul_cpu: Note [clipping's multiply] in grad_norm.cpp); False,
// having changed nothing, where it declines. The grads count a write even where the
// product, by exactly 1, was skipped, as torch's in-place multiply counts it (Note [version
// counters]: a graph that saved a grad made with create_graph=True refuses to run then).
PyObject* py_mul_grads(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2 && THPVariable_Check(args[1]), "_mul_grads_ expects (list, Tensor)");
  const at::Tensor& scalar = THPVariable_Unpack(args[1]);
  BorrowedTensors grads;
  if (gather_grads(args[0], grads) == Grads::kDecline) Py_RETURN_FALSE;
  if (grads.empty()) Py_RETURN_TRUE;
  cpu::mul_cpu(grads.list(), scalar);
  count_writes(grads.list());
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_grad_norms", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_grad_norms)),
     METH_FASTCALL, "The norm of each grad of the params (Note [clipping's fast path])."},
    {"_mul_grads_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_mul_grads)),
     METH_FASTCALL, "Every grad of the params times a scalar (Note [clipping's fast path])."},
    {"_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_step)),
     METH_FASTCALL, "A step of every param group through the kernels (Note [direct calls])."},
    {"_has_sparse_grad", py_has_sparse_grad, METH_O,
     "Whether a tensor of the list has a sparse grad."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fused_optim

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fused_optim::methods};
  return PyModule_Create(&module_def);
}
