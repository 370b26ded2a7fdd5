// The Python module fused_optim._C: importing it loads this library, whose static
// initializers register the ops (csrc/ops.cpp) and their kernels; its functions are the
// optimizers' eager fast path (Note [direct calls] in direct_call.h).

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <string>
#include <vector>

#include "direct_call.h"

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

// A dense CPU tensor with nothing in between it and its memory: no tensor subclass, no
// functorch or functionalization wrapper, no conjugate or negative bit, no sparse
// layout. Anything else takes the dispatcher path, which handles it as before.
bool is_plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet plain{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                         c10::DispatchKey::AutogradCPU,
                                         c10::DispatchKey::AutocastCPU};
  return plain.isSupersetOf(t.key_set()) && t.layout() == at::kStrided;
}

// The tensor a Python object holds if it is a plain Tensor or Parameter (not a subclass)
// holding a plain CPU tensor; nullptr otherwise.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return is_plain_cpu(t) ? &t : nullptr;
}

// Note [prefetch]
// After a step's kernel has streamed hundreds of MB through the caches, every tensor's
// Python object, TensorImpl and StorageImpl is a cache miss. Chased one tensor at a
// time, those misses are latency-bound: on 5,000 small tensors they cost half as much
// as the update itself. So the gather goes in passes (params, grads, state dicts, state
// tensors), and each pass asks for the memory that the element kAhead places later will
// need, to keep many misses in flight at once.
constexpr Py_ssize_t kAhead = 8;

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

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

// _step(op, params, state, keys, args) -> bool
//
// One param group's step through the CPU kernel registered as `op`, if this path can
// take it: `params` is the group's list, `state` the optimizer's state dict, `keys` the
// state key of each list the kernel takes after params and grads (None: an empty list),
// `args` the kernel's other arguments in schema order. Params without a grad are left
// out, as in torch.optim. Returns False, having changed nothing, when any param, grad or
// state entry is not a plain CPU tensor, when a state entry is missing (the Python
// path creates the state), or when a torch function or dispatch mode is active (they
// must see the op): the caller then takes the dispatcher path.
PyObject* py_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 5, "_step expects 5 arguments, got ", nargs);
  PyObject* op = args[0];
  PyObject* params = args[1];
  PyObject* state = args[2];
  PyObject* keys = args[3];
  PyObject* rest = args[4];
  TORCH_CHECK_TYPE(PyUnicode_Check(op) && PyList_Check(params) && PyDict_Check(state) &&
                       PyTuple_Check(keys) && PyTuple_Check(rest),
                   "_step expects (str, list, dict, tuple, tuple)");
  const std::string name = PyUnicode_AsUTF8(op);
  const DirectFn kernel = find_direct_call(name);
  TORCH_CHECK(kernel != nullptr, "_step: no CPU kernel registered as ", name);
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_FALSE;
  }

  // The gather goes in passes over the group: Note [prefetch].
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const Py_ssize_t num_keys = PyTuple_GET_SIZE(keys);
  // Pass 1: the params, and whether each has a grad.
  std::vector<const at::Tensor*> param_tensors(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + 2 * kAhead < n) prefetch(PyList_GET_ITEM(params, i + 2 * kAhead));
    if (i + kAhead < n) prefetch_tensor_impl(PyList_GET_ITEM(params, i + kAhead));
    const at::Tensor* p = plain_tensor(PyList_GET_ITEM(params, i));
    if (p == nullptr) Py_RETURN_FALSE;
    const char* meta = reinterpret_cast<const char*>(p->unsafeGetTensorImpl()->autograd_meta());
    if (meta != nullptr) {  // where the grad is
      prefetch(meta);
      prefetch(meta + 64);
    }
    param_tensors[static_cast<size_t>(i)] = p;
  }
  // Pass 2: the grads.
  std::vector<const at::Tensor*> grad_tensors(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& g = param_tensors[static_cast<size_t>(i)]->grad();
    if (g.defined()) prefetch_lines(g.unsafeGetTensorImpl());
    grad_tensors[static_cast<size_t>(i)] = &g;
  }
  std::vector<BorrowedTensors> lists(static_cast<size_t>(2 + num_keys));
  for (auto& l : lists) l.reserve(static_cast<size_t>(n));
  std::vector<PyObject*> with_grad;  // the params' Python objects, for the state lookups
  with_grad.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = *param_tensors[static_cast<size_t>(i)];
    const at::Tensor& g = *grad_tensors[static_cast<size_t>(i)];
    if (!g.defined()) continue;
    if (!is_plain_cpu(g)) Py_RETURN_FALSE;
    lists[0].push(p);
    lists[1].push(g);
    with_grad.push_back(PyList_GET_ITEM(params, i));
  }
  const Py_ssize_t m = static_cast<Py_ssize_t>(with_grad.size());
  bool any_key = false;
  for (Py_ssize_t k = 0; k < num_keys; ++k) any_key |= PyTuple_GET_ITEM(keys, k) != Py_None;
  if (any_key) {
    // Pass 3: each param's state dict.
    std::vector<PyObject*> param_states(static_cast<size_t>(m));
    for (Py_ssize_t i = 0; i < m; ++i) {
      PyObject* param_state = PyDict_GetItemWithError(state, with_grad[static_cast<size_t>(i)]);
      if (param_state == nullptr && PyErr_Occurred()) return nullptr;
      if (param_state == nullptr) Py_RETURN_FALSE;
      prefetch(param_state);
      param_states[static_cast<size_t>(i)] = param_state;
    }
    // Pass 4: the state entries' Python objects.
    std::vector<PyObject*> values(static_cast<size_t>(m * num_keys), nullptr);
    for (Py_ssize_t i = 0; i < m; ++i) {
      if (i + kAhead < m) {
        PyObject* ahead = param_states[static_cast<size_t>(i + kAhead)];
        if (PyDict_Check(ahead)) prefetch(reinterpret_cast<PyDictObject*>(ahead)->ma_keys);
      }
      PyObject* param_state = param_states[static_cast<size_t>(i)];
      if (!PyDict_Check(param_state)) Py_RETURN_FALSE;
      for (Py_ssize_t k = 0; k < num_keys; ++k) {
        PyObject* key = PyTuple_GET_ITEM(keys, k);
        if (key == Py_None) continue;
        PyObject* value = PyDict_GetItemWithError(param_state, key);  // borrowed
        if (value == nullptr && PyErr_Occurred()) return nullptr;
        if (value == nullptr) Py_RETURN_FALSE;
        prefetch(value);
        values[static_cast<size_t>(i * num_keys + k)] = value;
      }
    }
    // Pass 5: the state tensors, list by list.
    for (Py_ssize_t k = 0; k < num_keys; ++k) {
      if (PyTuple_GET_ITEM(keys, k) == Py_None) continue;
      for (Py_ssize_t i = 0; i < m; ++i) {
        if (i + kAhead < m) prefetch_tensor_impl(values[static_cast<size_t>((i + kAhead) * num_keys + k)]);
        const at::Tensor* s = plain_tensor(values[static_cast<size_t>(i * num_keys + k)]);
        if (s == nullptr) Py_RETURN_FALSE;
        lists[static_cast<size_t>(2 + k)].push(*s);
      }
    }
  }
  if (lists[0].empty()) Py_RETURN_TRUE;

  DirectCall call;
  for (const auto& l : lists) call.lists.push_back(l.list());
  for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(rest); ++j) {
    PyObject* a = PyTuple_GET_ITEM(rest, j);
    if (a == Py_None) {
      call.tensors.emplace_back(std::nullopt);
    } else if (THPVariable_Check(a)) {
      call.tensors.emplace_back(THPVariable_Unpack(a));
    } else {
      const double v = PyFloat_AsDouble(a);
      if (v == -1.0 && PyErr_Occurred()) return nullptr;
      call.numbers.push_back(v);
    }
  }
  {
    // As a torch op: the GIL is released while the kernel runs, and a profiler sees it.
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("fused_optim::" + name, std::vector<c10::IValue>());
    kernel(call);
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// _has_sparse_grad(params) -> bool: whether a tensor of the list has a sparse grad.
PyObject* py_has_sparse_grad(PyObject* /*module*/, PyObject* params) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyList_Check(params), "_has_sparse_grad expects a list");
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(obj)) continue;
    const at::Tensor& g = THPVariable_Unpack(obj).grad();
    if (g.defined() && g.is_sparse()) Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_step)),
     METH_FASTCALL, "One param group's step through a CPU kernel (Note [direct calls])."},
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
